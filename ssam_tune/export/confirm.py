"""The confirmation step: which front points to re-run with fresh seeds
(:func:`confirm_cases`), and the summary of that re-run, ``confirm.csv`` plus the
"Confirmation" section of ``summary.md`` (:func:`export_confirmation`).

Both take an experiment folder or a URI (read through a local copy of its small files).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ssam_tune.export.front import front_rows
from ssam_tune.export.read import load_rows, load_space_file, local_copy, read_json, try_space
from ssam_tune.export.summary import CONFIRM_BEGIN, CONFIRM_END, with_confirmation
from ssam_tune.export.write import csv_text, fmt_pct, fmt_sci, md_table, safe_name
from ssam_tune.storage.experiment import SPACE_FILE, Experiment
from ssam_tune.storage.files import atomic_write, is_uri


def confirm_cases(exp_dir: str | os.PathLike, top_k: int, seeds: Sequence[int]) -> list[tuple[str, dict]]:
    """The ``top_k`` front points with the highest val_acc (ties: lower cost), each re-run
    with every seed: ``[(f"front{k}_{label}/seed{s}", training config with seed s), ...]``,
    where k is the point's index in the cost-sorted front (its ``configs/front_<k>_...``)."""
    import copy

    with local_copy(exp_dir) as exp:
        space = load_space_file(exp / SPACE_FILE)
        cost = space.tune.flops_metric
        rows = load_rows(exp, cost, space)[0]
    front = front_rows(rows, cost)
    ranked = sorted(range(len(front)), key=lambda k: (-front[k]["val_acc"], front[k][cost], k))[:max(0, top_k)]
    out = []
    for k in ranked:
        r = front[k]
        for seed in seeds:
            cfg = copy.deepcopy(r["_config"])
            cfg["seed"] = int(seed)
            out.append((f"front{k}_{safe_name(r['label'])}/seed{seed}", cfg))
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _natural(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", label))


def export_confirmation(confirm_exp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Summarise a confirmation experiment (trials labelled ``front<k>_<label>/seed<s>``):
    ``confirm.csv`` with, per configuration, the number of completed seeds, test_acc and
    val_acc mean and sample std (ddof 1), mean FLOPs and wall time, and the search's
    single-seed numbers when ``out_dir/pareto.json`` has the point; then a refreshed
    "Confirmation" section at the end of ``summary.md``. Returns paths and the rows."""
    out = Path(out_dir)
    if is_uri(confirm_exp_dir):
        shown, found = str(confirm_exp_dir), Experiment(str(confirm_exp_dir)).exists()
    else:
        shown, found = str(Path(confirm_exp_dir)), Path(confirm_exp_dir).is_dir()
    if not found:
        raise FileNotFoundError(f"{shown}: not found")
    with local_copy(confirm_exp_dir) as exp:
        space = try_space(exp)
        cost = space.tune.flops_metric if space is not None else "flops_theoretical"
        rows = load_rows(exp, cost, space)[0]
        if not is_uri(confirm_exp_dir):
            shown = str(exp.resolve())  # the summary names the folder by its absolute path
    groups: dict[str, list[dict]] = {}
    for r in rows:
        base, _, seed = r["label"].rpartition("/")
        groups.setdefault(base if seed.startswith("seed") else r["label"], []).append(r)
    searched = {}
    pareto = read_json(out / "pareto.json")
    for p in pareto.get("front", []) if isinstance(pareto.get("front"), list) else []:
        searched[f"front{p.get('k')}_{safe_name(str(p.get('label')))}"] = p
    table = []
    for label in sorted(groups, key=_natural):
        done = [r for r in groups[label] if r["status"] == "completed"]
        stats = {}
        for key in ("test_acc", "val_acc"):
            stats[f"{key}_mean"], stats[f"{key}_std"] = _mean_std([r[key] for r in done if r.get(key) is not None])
        row = {"label": label, "n_seeds": len(done), "n_trials": len(groups[label]),
               "seeds": ";".join(str(r.get("seed")) for r in sorted(done, key=lambda r: (r.get("seed") or 0))),
               **stats}
        for key in dict.fromkeys(("flops_theoretical", "flops_executed", cost, "train_seconds")):
            row[key] = _mean_std([r[key] for r in done if r.get(key) is not None])[0]
        row["not_completed"] = ";".join(f"{r['label']}:{r['status']}" for r in groups[label]
                                        if r["status"] != "completed")
        p = searched.get(label, {})
        row["search_trial_id"] = p.get("trial_id")
        row["search_val_acc"] = p.get("val_acc")
        row["search_test_acc"] = p.get("test_acc")
        table.append(row)
    columns = ["label", "n_seeds", "n_trials", "seeds", "test_acc_mean", "test_acc_std", "val_acc_mean",
               "val_acc_std", *dict.fromkeys(("flops_theoretical", "flops_executed", cost, "train_seconds")),
               "search_trial_id", "search_val_acc", "search_test_acc", "not_completed"]
    columns = list(dict.fromkeys(columns))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "confirm.csv", csv_text(table, columns))

    def pm(mean, std):
        return "n/a" if mean is None else fmt_pct(mean) + (f" ± {100 * std:.2f}" if std is not None else "")

    body = [[r["label"], r["n_seeds"], pm(r["test_acc_mean"], r["test_acc_std"]),
             pm(r["val_acc_mean"], r["val_acc_std"]), fmt_sci(r.get(cost)), fmt_pct(r["search_val_acc"]),
             fmt_pct(r["search_test_acc"])] for r in table]
    block = [CONFIRM_BEGIN, "## Confirmation", "",
             (f"Front points re-run with fresh seeds (experiment folder `{shown}`): mean ± sample "
              "standard deviation (ddof 1) over the completed seeds; `confirm.csv` has the numbers. The points "
              "were chosen on validation accuracy; the test accuracy is only reported."), ""]
    block += md_table(["configuration", "seeds", "test_acc", "val_acc", cost, "search val_acc (1 seed)",
                        "search test_acc (1 seed)"], body)
    missing = [r for r in table if r["not_completed"]]
    if missing:
        block += ["", "Seeds that did not complete: " + "; ".join(r["not_completed"] for r in missing)]
    block += ["", CONFIRM_END]
    summary_path = out / "summary.md"
    text = summary_path.read_text() if summary_path.is_file() else "# Summary\n"
    atomic_write(summary_path, with_confirmation(text, "\n".join(block)))
    return {"confirm_csv": str(out / "confirm.csv"), "summary": str(summary_path), "rows": table}
