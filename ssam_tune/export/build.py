"""The export of one experiment: reads it once and writes every file (tables, front,
configs, picture, TensorBoard, summary) into the output folder; see :mod:`ssam_tune.export`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ssam_tune.export.front import best_row, front_rows, hp_keys, hp_values
from ssam_tune.export.plot import plot_front
from ssam_tune.export.read import SHARPNESS, STATUSES, load_rows, load_space_file, local_copy, sgd_cost_of
from ssam_tune.export.summary import (
    NOTE_SELECTION,
    confirmation_block,
    console_text,
    summary_text,
    with_confirmation,
)
from ssam_tune.export.tensorboard import write_tensorboard
from ssam_tune.export.write import csv_text, safe_name, trial_columns, yaml_config
from ssam_tune.storage.experiment import JOURNAL_FILE, SPACE_FILE
from ssam_tune.storage.files import atomic_write, is_uri, new_dir, swap_dir


def export_experiment(exp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write every export of the experiment at ``exp_dir`` (a folder, or a URI such as
    ``s3://bucket/exp``) into ``out_dir``; see :mod:`ssam_tune.export` for the files.

    Returns ``{"out_dir", "trials_csv", "pareto_csv", "pareto_json", "pareto_png",
    "best_config" (None without a completed trial), "configs" (paths), "summary",
    "tensorboard", "tensorboard_runs", "n_trials", "counts" (per status), "front" (trial
    ids, by cost), "best_trial", "front_xy" (the front as drawn in pareto.png), "console"
    (the end-of-search report the run prints)}``.
    Raises FileNotFoundError without ``space.yaml``; ConfigError if it is invalid.
    """
    with local_copy(exp_dir) as exp:
        # A URI's files are read from a temporary copy: the summary names the URI instead.
        return _export(exp, Path(out_dir), shown=str(exp_dir) if is_uri(exp_dir) else None)


def _export(exp: Path, out: Path, shown: str | None = None) -> dict:
    if not (exp / SPACE_FILE).is_file():
        raise FileNotFoundError(f"{exp / SPACE_FILE}: not found (not an ssam_tune experiment folder?)")
    space = load_space_file(exp / SPACE_FILE)
    cost = space.tune.flops_metric
    rows, loose, problem = load_rows(exp, cost, space)
    sgd_cost = sgd_cost_of(rows, cost)
    front = front_rows(rows, cost)
    best = best_row(rows, cost)
    keys = hp_keys(space, rows)
    out.mkdir(parents=True, exist_ok=True)

    # configs/ (built aside, swapped in) and best_config.yaml
    build = new_dir(out, "configs")
    config_names: dict[str, str] = {}
    try:
        for k, r in enumerate(front):
            name = f"front_{k}_{safe_name(r['label'])}.yaml"
            (build / name).write_text(yaml_config(r, space.name, cost, f"Pareto front point {k} (sorted by cost)."))
            config_names[r["trial_id"]] = f"configs/{name}"
        swap_dir(build, out / "configs")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    best_path = out / "best_config.yaml"
    if best is not None:
        atomic_write(best_path, yaml_config(best, space.name, cost,
                                             "Best trial: highest validation accuracy (ties: lower cost)."))
    else:
        best_path.unlink(missing_ok=True)

    atomic_write(out / "trials.csv", csv_text(rows, trial_columns(rows, cost)))
    hp_cols = keys
    front_records = []
    for k, r in enumerate(front):
        rec = {"k": k, "trial_id": r["trial_id"], "label": r["label"], "kind": r["kind"],
               "method": r.get("method.name")}
        rec.update(hp_values(r, hp_cols))
        rec.update({"val_acc": r["val_acc"], "test_acc": r.get("test_acc"), cost: r.get(cost),
                    "flops_rel": r.get("flops_rel"), "epochs": r["epochs_reached"],
                    "config": config_names[r["trial_id"]]})
        front_records.append(rec)
    # the sharpness columns where the front was measured (tune.diagnostics: sharpness)
    measured = [c for c in SHARPNESS if any(c in r for r in front)]
    for rec, r in zip(front_records, front, strict=True):
        rec.update({c: r.get(c) for c in measured})
    columns = ["k", "trial_id", "label", "kind", "method", *hp_cols, "val_acc", "test_acc", cost, "flops_rel",
               *measured, "epochs", "config"]
    columns = list(dict.fromkeys(columns))
    atomic_write(out / "pareto.csv", csv_text(front_records, columns))
    meta = {"experiment": space.name, "objective": space.tune.objective, "accuracy": "val_acc",
            "cost": cost, "flops": space.tune.flops, "sgd_cost": sgd_cost,
            "note": NOTE_SELECTION + " Candidates: completed (full-fidelity) trials only.",
            "front": [{c: rec.get(c) for c in columns} for rec in front_records]}
    atomic_write(out / "pareto.json", json.dumps(meta, indent=2, allow_nan=False) + "\n")
    front_xy = plot_front(rows, front, out / "pareto.png", title=space.name, cost_metric=cost,
                          flops_kind=space.tune.flops, sgd_cost=sgd_cost)
    n_tb = write_tensorboard(rows, out / "tensorboard", keys, cost)

    summary_path = out / "summary.md"
    old_block = None
    if summary_path.is_file():
        old_block = confirmation_block(summary_path.read_text())
    text = summary_text(space, exp, rows, front, best, keys, sgd_cost, loose, problem, config_names,
                         shown or str(exp.resolve()))
    atomic_write(summary_path, with_confirmation(text, old_block))
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    journal = exp / JOURNAL_FILE if space.mode == "search" and shown is None else None
    console = console_text(space, rows, front, best, keys, out, str(journal) if journal else None)
    return {"out_dir": str(out), "trials_csv": str(out / "trials.csv"), "pareto_csv": str(out / "pareto.csv"),
            "pareto_json": str(out / "pareto.json"), "pareto_png": str(out / "pareto.png"),
            "best_config": str(best_path) if best is not None else None,
            "configs": [str(out / p) for p in config_names.values()], "summary": str(summary_path),
            "tensorboard": str(out / "tensorboard"), "tensorboard_runs": n_tb, "n_trials": len(rows),
            "counts": counts, "front": [r["trial_id"] for r in front],
            "best_trial": best["trial_id"] if best is not None else None, "front_xy": front_xy,
            "console": console}
