"""Exports of a finished (or interrupted) experiment: tables, the accuracy-versus-cost front,
runnable configs, a summary and TensorBoard logs.

    python -m ssam_tune.export EXPERIMENT_DIR [--out DIR] [--confirm CONFIRM_EXPERIMENT_DIR]

``EXPERIMENT_DIR`` is a Ray experiment written by ``python -m ssam_tune.run`` (``space.yaml``,
``optuna.journal`` and one ``trial_<id>/`` folder per trial); ``--out`` defaults to
``results/<space name>`` below the current directory. What is written there:

- ``trials.csv``: one row per trial (status, final and best-epoch metrics, FLOPs, wall time,
  every training-config key flattened to dotted columns, front membership);
- ``pareto.csv`` / ``pareto.json`` / ``pareto.png``: the non-dominated COMPLETED trials on
  (validation accuracy: max, the space's cost column ``tune.flops_metric``: min). Pruned,
  diverged and errored trials are never candidates (their numbers are not full fidelity).
  With ``tune.objective: single`` the front is still computed on the same two columns;
- ``best_config.yaml`` and ``configs/front_<k>_<label>.yaml``: training configs that
  ``python -m ssam_tune.train FILE`` runs as they are;
- ``summary.md``: settings, counts, the best trial, the front, failures and provenance;
- ``tensorboard/``: one run per trial with every per-epoch metric and an HParams summary.

Selection (front, best config) uses validation accuracy only; test accuracy is reported.
Every file is written atomically (temporary file, then ``os.replace``; folders are built
aside and swapped in) and the exports are a pure function of the experiment's files, so
exporting twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["confirm_cases", "export_confirmation", "export_experiment", "load_trials", "main",
           "pareto_front", "plot_front"]

SPACE_FILE = "space.yaml"
JOURNAL_FILE = "optuna.journal"
STATUSES = ("completed", "pruned", "diverged", "errored", "pending")
BASELINE_ORDER = ("sgd", "sam", "ssam")
# Per-epoch metrics of ssam_tune.train.Trainer, in the order the CSV shows them.
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "mask_density",
           "mask_overlap", "mask_refreshes", "e_norm", "epoch_seconds", "images_per_second",
           "flops_theoretical", "flops_executed", "flops_mask", "flops_steps_theoretical",
           "flops_steps_executed", "train_seconds")
# Ray's bookkeeping keys in result.json: not metrics.
RAY_KEYS = frozenset({"timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
                      "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
                      "config", "time_since_restore", "iterations_since_restore", "experiment_tag",
                      "warmup_time", "episodes_total", "timesteps_total", "timesteps_since_restore",
                      "status", "label", "epoch", "best_val_acc", "best_epoch"})
# Method keys shown as "key hyper-parameters" besides the searched ones.
KEY_PARAMS = ("method.rho", "method.sparsity", "method.T_m", "method.N_F", "method.alpha")
CONFIRM_BEGIN = "<!-- ssam_tune:confirmation:begin -->"
CONFIRM_END = "<!-- ssam_tune:confirmation:end -->"
NOTE_SELECTION = ("Selection (the front, the best trial) used validation accuracy at the final epoch; "
                  "test accuracy is only reported, never used to choose.")


# ---------------------------------------------------------------------------------------------
# reading an experiment
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``{}`` when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_results(path: Path) -> list[dict]:
    """The JSON lines of a ``result.json`` in file order (a line cut short by a crash is skipped)."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (bools, strings, NaN and inf are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _per_epoch(rows: list[dict]) -> list[dict]:
    """One row per epoch >= 1, the newest report winning (a resumed trial repeats epochs)."""
    by_epoch: dict[int, dict] = {}
    for row in rows:
        epoch = row.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            by_epoch[epoch] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Timeout|Warning|Died)\w*"
                       r"(\([\w.]+\))?(:.*)?$")
_SKIP_LINE = re.compile(r"^(Failure # |Traceback |During handling|The above exception|ray::|\s)")


def error_message(text: str) -> str:
    """The meaningful line of a Ray ``error.txt``: the exception line (``ValueError: boom``) of
    the last failure recorded (a trial may fail, be retried and fail again), else its first
    non-boilerplate line. At most 300 characters."""
    blocks = re.split(r"(?m)^Failure # \d+.*$", text)
    block = next((b for b in reversed(blocks) if b.strip()), "")
    lines = [ln.rstrip() for ln in block.splitlines() if ln.strip()]
    found = None
    for ln in lines:
        if not _SKIP_LINE.match(ln) and _EXC_LINE.match(ln):
            found = ln  # the last one: the exception that ended the traceback
    if found is None:
        found = next((ln.strip() for ln in lines if not ln.startswith(("Failure # ", "Traceback "))), "")
    return found[:300]


def _failures(text: str) -> int:
    return len(re.findall(r"(?m)^Failure # \d+", text))


def _flatten(data: dict, prefix: str = "") -> dict:
    """Nested dict to dotted keys: ``{"method": {"rho": 0.1}}`` -> ``{"method.rho": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _canonical(config: dict) -> dict:
    """The training config in the schema's key order (Ray stores params.json sorted), or as
    found when it does not validate against this checkout's schema."""
    from ssam_tune.config import ConfigError, config_from_dict, config_to_dict

    try:
        ordered = config_to_dict(config_from_dict(config))
    except (ConfigError, TypeError, ValueError):
        return config
    return ordered if ordered == config else config


def _trial_status(rows: list[dict], epochs: int | None, has_error: bool) -> str:
    """completed (last report completed at the last epoch; wins over an error file of a retried
    trial), diverged, errored (error file), pruned (results, stopped early), pending (nothing)."""
    if rows:
        last = rows[-1]
        epoch = last.get("epoch") if isinstance(last.get("epoch"), int) else 0
        if last.get("status") == "completed" and (epochs is None or epoch >= epochs):
            return "completed"
        if last.get("status") == "diverged":
            return "diverged"
    if has_error:
        return "errored"
    return "pruned" if rows else "pending"


def _known_trial_ids(exp: Path) -> set[str] | None:
    """Trial ids in Ray's newest experiment state, or None without one.

    A driver killed between starting a trial and Ray's next state save leaves a trial folder
    that the resumed experiment never knew; such orphans are not part of the experiment."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        data = json.loads(states[-1].read_text())
        ids = set()
        for entry in data["trial_data"]:  # [trial json, runtime json] pairs in Ray 2.60
            first = entry[0] if isinstance(entry, list) else entry
            ids.add((json.loads(first) if isinstance(first, str) else first)["trial_id"])
        return ids
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _trial_dirs(exp: Path) -> list[Path]:
    """Trial folders: ``trial_*`` or any folder holding a ``params.json`` (sorted by name),
    without the orphans of a killed driver (see :func:`_known_trial_ids`)."""
    known = _known_trial_ids(exp)
    out = []
    for p in sorted(exp.iterdir()):
        if p.is_dir() and p.name != "checkpoints" and (p.name.startswith("trial_") or (p / "params.json").is_file()):
            if known is not None and p.name.removeprefix("trial_") not in known:
                tid = _read_json(p / "params.json").get("ssam_tune", {}).get("trial_id")
                if tid not in known:
                    continue
            out.append(p)
    return out


def _read_trial(path: Path) -> dict:
    """One row for one trial folder (see :func:`load_trials`), plus private ``_series``/``_config``."""
    params = _read_json(path / "params.json")
    meta = params.get("ssam_tune", {}) if isinstance(params.get("ssam_tune"), dict) else {}
    config = _canonical(params.get("config") if isinstance(params.get("config"), dict) else {})
    rows = _read_results(path / "result.json")
    error_text = None
    if (path / "error.txt").is_file():
        try:
            error_text = (path / "error.txt").read_text(errors="replace")
        except OSError:
            error_text = ""
    epochs = meta.get("epochs") or (config.get("train") or {}).get("epochs")
    epochs = int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    status = _trial_status(rows, epochs, error_text is not None)
    series = _per_epoch(rows)
    last = rows[-1] if rows else {}
    trial_id = meta.get("trial_id") or last.get("trial_id") or path.name.removeprefix("trial_")
    row: dict[str, Any] = {
        "trial_id": str(trial_id),
        "label": meta.get("label") or last.get("label") or "",
        "kind": meta.get("kind", ""),
        "anchor": bool(meta.get("anchor", False)),
        "status": status,
        "epochs_reached": max((r["epoch"] for r in series), default=0),
        "epochs": epochs,
        "optuna_number": meta.get("optuna_number"),
        "error": error_message(error_text) if error_text is not None else None,
        "failures": _failures(error_text) if error_text else 0,
    }
    # final-epoch metrics: the newest report (a diverged report repeats the last good epoch)
    final = {k: _number(v) for k, v in last.items() if k not in RAY_KEYS and _number(v) is not None}
    for key in METRICS:
        row[key] = final.pop(key, None)
    for key in sorted(final):
        row[key] = final[key]
    best = None
    for r in series:
        acc = _number(r.get("val_acc"))
        if acc is not None and (best is None or acc > _number(best.get("val_acc"))):
            best = r  # ties: the earliest epoch, as the Trainer counts it
    row["best_epoch"] = best["epoch"] if best else None
    row["best_val_acc"] = _number(best.get("val_acc")) if best else None
    row["test_acc_at_best"] = _number(best.get("test_acc")) if best else None
    if _number(last.get("best_val_acc")) is not None and last.get("best_epoch"):
        # The trainer tracks its best epoch across restarts; Ray's result.json of a restored
        # trial may start at the epoch it resumed from.
        row["best_epoch"] = int(last["best_epoch"])
        row["best_val_acc"] = _number(last["best_val_acc"])
        row["test_acc_at_best"] = _number(last.get("test_acc_at_best", row["test_acc_at_best"]))
    row["time_total_s"] = _number(last.get("time_total_s"))
    dates = sorted(str(r["date"]) for r in rows if r.get("date"))
    row["date_first"] = dates[0] if dates else None
    row["date_last"] = dates[-1] if dates else None
    row["hostname"] = last.get("hostname")
    for key, value in _flatten(config).items():
        row[f"{key}"] = value
    row["_series"] = series
    row["_config"] = config
    row["_params"] = meta.get("params") or {}
    return row


_STATUS_RANK = {"completed": 0, "diverged": 1, "errored": 2, "pruned": 3, "pending": 4}


def _sort_key(row: dict) -> tuple:
    kind_rank = {"baseline": 0, "search": 1, "case": 2}.get(row["kind"], 3)
    label = row["label"]
    base_rank = BASELINE_ORDER.index(label) if row["kind"] == "baseline" and label in BASELINE_ORDER else 99
    number = row["optuna_number"] if isinstance(row["optuna_number"], int) else 1 << 30
    return (kind_rank, base_rank, number, label, row["trial_id"])


def _optuna_info(exp: Path, name: str | None, objective: str) -> tuple[dict, list[dict], str | None]:
    """Optuna's view, read from a temporary copy of the journal (the experiment is left as
    found): ({ray trial id: status attr}, [trials without a Ray trial folder], problem)."""
    journal = exp / JOURNAL_FILE
    if not journal.is_file() and name:
        journal = Path("~/.cache/ssam_tune/optuna").expanduser() / f"{name}.journal"  # remote storage
    if not journal.is_file() or not name:
        return {}, [], "no optuna.journal"
    try:
        from ssam_tune.search import open_study

        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / JOURNAL_FILE
            shutil.copyfile(journal, copy)
            study = open_study(str(copy), name, objective)
            trials = study.get_trials(deepcopy=False)
    except Exception as err:  # noqa: BLE001 - the exports do not need Optuna's view
        return {}, [], f"optuna.journal not read ({type(err).__name__}: {err})"
    by_ray, loose = {}, []
    for t in trials:
        ray_id = t.user_attrs.get("ray_trial_id")
        status = t.user_attrs.get("status") or t.state.name.lower()
        if ray_id:
            by_ray[str(ray_id)] = status
        loose.append({"number": t.number, "ray_trial_id": ray_id, "status": status, "params": dict(t.params)})
    return by_ray, loose, None


def load_trials(exp_dir: str | os.PathLike, cost_metric: str | None = None) -> list[dict]:
    """One row per trial folder of an experiment, each trial once (deduplicated by trial id).

    Columns: trial_id, label, kind (baseline|search|case), anchor, status (completed, pruned,
    diverged, errored, pending), epochs_reached, epochs, optuna_number, optuna_status (the
    journal's status attribute), error (the exception line of ``error.txt``), failures, the
    final-epoch metrics (val_acc, test_acc, flops_theoretical, flops_executed, flops_mask,
    train_seconds, ...), the best epoch (best_epoch, best_val_acc, test_acc_at_best: the
    epoch with the highest val_acc, the earliest on ties), time_total_s (Ray's wall time),
    date_first/date_last, hostname, every training-config key as a dotted column (seed,
    model.name, ..., method.rho, ...), and flops_rel: the cost column (``cost_metric``;
    default the space's ``tune.flops_metric``, else flops_theoretical) divided by the
    completed SGD anchor's (None without one). Private keys: ``_series`` (the per-epoch
    reports), ``_config`` (the nested training config), ``_params`` (the sampled keys).
    Rows are sorted: baselines (sgd, sam, ssam), search trials by Optuna number, the rest.
    """
    exp = Path(exp_dir)
    space = _try_space(exp)
    if cost_metric is None:
        cost_metric = space.tune.flops_metric if space is not None else "flops_theoretical"
    return _load(exp, cost_metric, space)[0]


def _load(exp: Path, cost_metric: str, space) -> tuple[list[dict], list[dict], str | None]:
    """(rows of :func:`load_trials`, Optuna's trials, a note when the journal was not read)."""
    chosen: dict[str, dict] = {}
    for path in _trial_dirs(exp):
        row = _read_trial(path)
        old = chosen.get(row["trial_id"])
        if old is None or (_STATUS_RANK[row["status"]], -row["epochs_reached"]) < \
                (_STATUS_RANK[old["status"]], -old["epochs_reached"]):
            chosen[row["trial_id"]] = row
    rows = sorted(chosen.values(), key=_sort_key)
    by_ray, loose, problem = {}, [], None
    if space is not None and space.mode == "search":
        by_ray, loose, problem = _optuna_info(exp, space.name, space.tune.objective)
    sgd_cost = _sgd_cost(rows, cost_metric)
    for row in rows:
        row["optuna_status"] = by_ray.get(row["trial_id"])
        cost = row.get(cost_metric)
        row["flops_rel"] = cost / sgd_cost if cost is not None and sgd_cost else None
    return rows, loose, problem


def _sgd_cost(rows: list[dict], cost_metric: str) -> float | None:
    """The final cost of the completed SGD anchor (the 1x of every relative cost), or None."""
    for row in rows:
        if row["kind"] == "baseline" and row["label"] == "sgd" and row["status"] == "completed":
            cost = row.get(cost_metric)
            if cost:
                return cost
    return None


def _try_space(exp: Path):
    """The experiment's SearchSpace, or None when space.yaml is missing or invalid."""
    try:
        return _load_space(exp / SPACE_FILE)
    except Exception:  # noqa: BLE001
        return None


def _load_space(path: Path):
    """``load_space``, tolerating a data folder that exists only on the machines that trained
    (the exporter never reads the data)."""
    from ssam_tune.config import ConfigError, load_yaml
    from ssam_tune.space import load_space

    try:
        return load_space(path)
    except ConfigError as err:
        if err.path != "data.root":
            raise
        raw = load_yaml(path)
        raw.setdefault("data", {})["download"] = True  # skips only the "directory not found" check
        return load_space(path, data=raw)


# ---------------------------------------------------------------------------------------------
# the front
# ---------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(accuracy, cost)`` points, accuracy maximised and cost
    minimised, sorted by cost (then index).

    q dominates p when q's accuracy >= p's and q's cost <= p's with at least one strict.
    Identical points do not dominate each other, so all copies of a front point are on it.
    Points with a missing or non-finite value are never on the front. O(n log n).
    """
    valid = [i for i, (acc, cost) in enumerate(points) if _number(acc) is not None and _number(cost) is not None]
    valid.sort(key=lambda i: (float(points[i][1]), i))
    front: list[int] = []
    best_before = -math.inf  # the best accuracy among strictly cheaper points
    j = 0
    while j < len(valid):
        k = j
        cost = float(points[valid[j]][1])
        while k < len(valid) and float(points[valid[k]][1]) == cost:
            k += 1
        group = valid[j:k]
        top = max(float(points[i][0]) for i in group)
        if top > best_before:
            front.extend(i for i in group if float(points[i][0]) == top)
        best_before = max(best_before, top)
        j = k
    return front


def _front_rows(rows: list[dict], cost_metric: str) -> list[dict]:
    """The front over the COMPLETED trials (full fidelity only), sorted by cost; marks every
    row's ``on_front`` and ``dominated`` (true/false for completed trials, None otherwise)."""
    cand = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None
            and r.get(cost_metric) is not None]
    idx = pareto_front([(r["val_acc"], r[cost_metric]) for r in cand])
    on = {id(cand[i]) for i in idx}
    candidates = {id(c) for c in cand}
    for r in rows:
        r["on_front"] = id(r) in on
        r["dominated"] = (id(r) not in on) if id(r) in candidates else None
    return [cand[i] for i in idx]


def _best_row(rows: list[dict], cost_metric: str) -> dict | None:
    """The completed trial with the highest val_acc; ties: lower cost, then trial id."""
    cand = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None]
    if not cand:
        return None
    inf = float("inf")
    return min(cand, key=lambda r: (-r["val_acc"], r.get(cost_metric) if r.get(cost_metric) is not None else inf,
                                    r["trial_id"]))


def _safe(label: str) -> str:
    """A label usable in a file name: ``case/seed1`` -> ``case_seed1``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "trial"


def _hp_keys(space, rows: list[dict]) -> list[str]:
    """The key hyper-parameters: the searched keys (or the keys the cases set) and the method's
    usual ones, without method.name (shown as ``method``)."""
    keys: list[str] = []
    if space is not None:
        keys += [d.key for d in space.search]
        for case in space.cases:
            keys += [k for k in case if k not in ("label", "seed")]
    keys += list(KEY_PARAMS)
    keys = [k for k in dict.fromkeys(keys) if k != "method.name"]
    return [k for k in keys if any(k in r for r in rows)] or keys


def _applies(key: str, method: str | None) -> bool:
    from ssam_tune.space import applies

    return method is None or applies(key, method)


def _hp_values(row: dict, keys: list[str]) -> dict:
    """The row's values of ``keys``; None where the key does not apply to its method."""
    method = row.get("method.name")
    return {k: (row.get(k) if _applies(k, method) else None) for k in keys}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: the umask's permissions
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_dir(parent: Path, name: str) -> Path:
    """An empty scratch folder ``parent/.<name>.<pid>.new`` (a leftover of a crash is cleared)."""
    path = parent / f".{name}.{os.getpid()}.new"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _swap_dir(built: Path, dest: Path) -> None:
    """Put the folder ``built`` in place of ``dest`` (the old one is renamed away, then removed)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fmt_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _trial_columns(rows: list[dict], cost_metric: str) -> list[str]:
    head = ["trial_id", "label", "kind", "anchor", "status", "on_front", "dominated", "epochs_reached", "epochs",
            "val_acc", "test_acc", cost_metric, "flops_rel", "best_epoch", "best_val_acc", "test_acc_at_best",
            "flops_theoretical", "flops_executed", "flops_mask", "train_seconds", "time_total_s",
            "optuna_number", "optuna_status", "failures", "error"]
    head = list(dict.fromkeys(head))
    rest = [k for row in rows for k in row if not k.startswith("_")]
    metrics = [k for k in dict.fromkeys(rest) if k not in head and "." not in k and k != "seed"
               and k not in ("date_first", "date_last", "hostname")]
    config = [k for k in dict.fromkeys(rest) if k not in head and ("." in k or k == "seed")]
    return head + metrics + ["date_first", "date_last", "hostname"] + config


def _yaml_config(row: dict, exp_name: str, cost_metric: str, why: str) -> str:
    """A training-config YAML with a comment header naming the trial it came from."""
    import yaml

    rel = f" ({row['flops_rel']:.2f}x SGD)" if row.get("flops_rel") else ""
    cost = row.get(cost_metric)
    header = [
        f"# {why}",
        (f"# From experiment {exp_name}, trial {row['trial_id']} ({row['label']}, method {row.get('method.name')}), "
         f"{row['epochs_reached']}/{row['epochs']} epochs."),
        (f"# val_acc {_pct(row.get('val_acc'))}, test_acc {_pct(row.get('test_acc'))} (final epoch); "
         f"{cost_metric} {_sci(cost)}{rel}."),
        "# Selected on validation accuracy; the test accuracy is only reported.",
        "# Run it: python -m ssam_tune.train THIS_FILE",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(row["_config"], sort_keys=False)


def _pct(value: Any) -> str:
    return "n/a" if _number(value) is None else f"{100 * value:.2f}%"


def _sci(value: Any) -> str:
    return "n/a" if _number(value) is None else f"{value:.4g}"


def _cost_words(flops_kind: str) -> tuple[str, str]:
    """(description, unit) of a cost column."""
    if flops_kind == "wall":
        return "training wall time", "s"
    return f"{flops_kind} training FLOPs", "FLOPs"


def plot_front(rows: list[dict], front: list[dict], path: str | os.PathLike, *, title: str,
               cost_metric: str = "flops_theoretical", flops_kind: str = "theoretical",
               sgd_cost: float | None = None) -> tuple[list[float], list[float]]:
    """Draw validation accuracy against cost to ``path`` (PNG) and return the (x, y) of the
    front as drawn (x: cost as a multiple of SGD's when ``sgd_cost`` is given, else the
    cost itself; y: val_acc), so callers can check them against pareto.csv.

    Completed trials are light points (by method), the front a step line through exactly the
    ``front`` rows, the anchors (SGD 1x, SAM ~2x, the default SSAM) marked and labelled, and
    pruned trials faint crosses at their last accuracy (not full fidelity). Uses the Agg
    canvas directly: no pyplot, no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    def xval(r):
        c = r.get(cost_metric)
        return None if c is None else (c / sgd_cost if sgd_cost else c)

    fig = Figure(figsize=(11, 5.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    completed = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None and xval(r) is not None]
    pruned = [r for r in rows if r["status"] == "pruned" and r.get("val_acc") is not None and xval(r) is not None]
    xs_all = [xval(r) for r in completed + pruned]
    methods = sorted({str(r.get("method.name")) for r in completed})
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    if pruned:
        ax.scatter([xval(r) for r in pruned], [r["val_acc"] for r in pruned], marker="x", s=22, color="0.6",
                   alpha=0.5, linewidths=1, label="pruned: accuracy when stopped (not full fidelity)", zorder=1)
    for m in methods:
        pts = [r for r in completed if str(r.get("method.name")) == m]
        ax.scatter([xval(r) for r in pts], [r["val_acc"] for r in pts], s=36, color=colors[m], alpha=0.35,
                   edgecolors="none", label=f"completed: {m}", zorder=2)
    front = sorted(front, key=xval)  # a step line runs left to right (stable: ties keep their order)
    fx = [xval(r) for r in front]
    fy = [r["val_acc"] for r in front]
    if front:
        ax.step(fx, fy, where="post", color="black", linewidth=1.6, zorder=3,
                label=f"Pareto front ({len(front)} completed trial{'s' if len(front) != 1 else ''})")
        ax.scatter(fx, fy, s=42, color="black", zorder=4)
        for x, y, r in zip(fx, fy, front, strict=True):
            if r["kind"] == "baseline" and r["label"] in BASELINE_ORDER:
                continue  # labelled as an anchor below
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7, color="0.15")
    if len(completed) <= 15:  # few points: name the dominated ones too
        on_front = {id(r) for r in front}
        for r in completed:
            if id(r) not in on_front and not (r["kind"] == "baseline" and r["label"] in BASELINE_ORDER):
                ax.annotate(r["label"], (xval(r), r["val_acc"]), textcoords="offset points", xytext=(5, -11),
                            fontsize=7, color="0.5")
    names = {"sgd": "SGD", "sam": "SAM", "ssam": "SSAM-F default"}
    marks = {"sgd": ("s", "black"), "sam": ("D", "black"), "ssam": ("^", "black")}
    for r in completed:
        if r["kind"] == "baseline" and r["label"] in names:
            shape, color = marks[r["label"]]
            x = xval(r)
            text = f"{names[r['label']]} ({x:.2f}x)" if sgd_cost else names[r["label"]]
            if sgd_cost and r["label"] == "sgd":
                text = "SGD (1x)"
            ax.scatter([x], [r["val_acc"]], marker=shape, s=110, facecolors="none", edgecolors=color,
                       linewidths=2, zorder=5, label=f"anchor: {text}")
            ax.annotate(text, (x, r["val_acc"]), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        color=color, fontweight="bold")
    what, unit = _cost_words(flops_kind)
    if sgd_cost:
        ax.set_xlabel(f"{what}, multiple of SGD's (1x = {sgd_cost:.3g} {unit})")
    else:
        ax.set_xlabel(f"{what} ({unit})")
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_ylabel("validation accuracy, final epoch (%)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(True, alpha=0.3)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    ax.set_title(f"{title}: validation accuracy vs {what}\n"
                 f"{counts['completed']} completed, {counts['pruned']} pruned, {counts['diverged']} diverged, "
                 f"{counts['errored']} errored; front over completed trials only", fontsize=10)
    if not completed:
        ax.text(0.5, 0.5, "no completed trials yet", transform=ax.transAxes, ha="center", va="center")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, markerscale=0.7)
    ax.margins(x=0.1, y=0.08)
    fig.subplots_adjust(left=0.08, right=0.69, top=0.88, bottom=0.11)  # the legend sits right of the axes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    _write_atomic(Path(path), buf.getvalue())
    return fx, fy


def _tb_events(row: dict, hp: dict, cost_metric: str) -> list:
    """TensorBoard events of one trial: per-epoch scalars (step = epoch), an HParams session
    with the trial's hyper-parameters, and final/* metrics. Times come from the results."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp_api

    series = row["_series"]
    times = [int(r["timestamp"]) for r in series if _number(r.get("timestamp")) is not None]
    t0 = float(min(times)) if times else 0.0
    t1 = float(max(times)) if times else 0.0
    events = [event_pb2.Event(wall_time=t0, file_version="brain.Event:2")]
    for r in series:
        wall = float(r["timestamp"]) if _number(r.get("timestamp")) is not None else t0
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in r.items()
                  if k not in RAY_KEYS - {"best_val_acc", "best_epoch", "time_total_s"} and _number(v) is not None]
        events.append(event_pb2.Event(wall_time=wall, step=int(r["epoch"]), summary=summary_pb2.Summary(value=values)))
    session = hp_api.hparams_pb(hp, trial_id=row["trial_id"], start_time_secs=t0)
    events.append(event_pb2.Event(wall_time=t0, step=0, summary=_stable_hparams(session)))
    step = int(row["epochs_reached"])
    finals = {"final/val_acc": row.get("val_acc"), "final/test_acc": row.get("test_acc"),
              "final/best_val_acc": row.get("best_val_acc"), "final/flops": row.get(cost_metric),
              "final/flops_rel": row.get("flops_rel"), "final/flops_theoretical": row.get("flops_theoretical"),
              "final/flops_executed": row.get("flops_executed"), "final/train_seconds": row.get("train_seconds")}
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in finals.items() if v is not None]
    if values:
        events.append(event_pb2.Event(wall_time=t1, step=step, summary=summary_pb2.Summary(value=values)))
    status = {"completed": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_FAILURE,
              "errored": api_pb2.STATUS_FAILURE}.get(row["status"])  # pruned: no TB status fits
    if status is not None:
        data = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=t1))
        end = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data),
            tensor=metadata.NULL_TENSOR)])
        events.append(event_pb2.Event(wall_time=t1, step=step, summary=end))
    return events


FINAL_METRICS = ("final/val_acc", "final/test_acc", "final/best_val_acc", "final/flops", "final/flops_rel",
                 "final/flops_theoretical", "final/flops_executed", "final/train_seconds")


def _stable_hparams(summary):
    """Re-serialise the HParams plugin payloads with a stable map order (protobuf map order
    follows Python's per-process hash seed otherwise): exports stay byte-identical."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for value in summary.value:
        if value.metadata.plugin_data.plugin_name == "hparams":
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            value.metadata.plugin_data.content = data.SerializeToString(deterministic=True)
    return summary


def _write_events(path: Path, events: Iterable) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for ev in events:
        writer.write(ev.SerializeToString(deterministic=True))  # proto maps: stable order
    path.write_bytes(buf.getvalue())


def _tb_hparams(row: dict, keys: list[str]) -> dict:
    """The HParams of a trial: method.name, the key hyper-parameters that apply, label, status, kind."""
    hp: dict[str, Any] = {"method.name": str(row.get("method.name"))}
    for k, v in _hp_values(row, keys).items():
        if isinstance(v, (bool, int, float, str)):
            hp[k] = v
    hp.update(label=row["label"], status=row["status"], kind=row["kind"] or "")
    return hp


def _hp_domain(values: list):
    from tensorboard.plugins.hparams import summary_v2 as hp_api

    if values and all(isinstance(v, str) for v in values):
        return hp_api.Discrete(sorted(set(values)))
    if values and all(isinstance(v, bool) for v in values):
        return hp_api.Discrete(sorted(set(values)))
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return hp_api.RealInterval(float(min(values)), float(max(values)))
    return None


def write_tensorboard(rows: list[dict], dest: Path, keys: list[str], cost_metric: str) -> int:
    """Rebuild ``dest`` (built in a temporary folder, then swapped in): one run per trial plus
    the HParams experiment config at the top. Returns the number of runs."""
    from tensorboard.plugins.hparams import summary_v2 as hp_api

    dest.parent.mkdir(parents=True, exist_ok=True)
    build = _new_dir(dest.parent, dest.name)
    try:
        all_hp, starts = [], []
        for row in rows:
            hp = _tb_hparams(row, keys)
            all_hp.append(hp)
            run = build / f"{_safe(row['label'])}_{row['trial_id']}"
            run.mkdir()
            events = _tb_events(row, hp, cost_metric)
            t0 = int(events[0].wall_time)
            starts.append(t0)
            _write_events(run / f"events.out.tfevents.{t0}.ssam_tune", events)
        names = list(dict.fromkeys(k for hp in all_hp for k in hp))
        hparams = [hp_api.HParam(n, _hp_domain([hp[n] for hp in all_hp if n in hp])) for n in names]
        metrics = [hp_api.Metric(m) for m in FINAL_METRICS]
        from tensorboard.compat.proto import event_pb2

        t = float(min((x for x in starts if x > 0), default=0))
        config = _stable_hparams(hp_api.hparams_config_pb(hparams, metrics, time_created_secs=t))
        _write_events(build / f"events.out.tfevents.{int(t)}.ssam_tune",
                      [event_pb2.Event(wall_time=t, file_version="brain.Event:2"),
                       event_pb2.Event(wall_time=t, summary=config)])
        _swap_dir(build, dest)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return len(rows)


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _md_table(header: list[str], body: list[list[Any]]) -> list[str]:
    def cell(v):
        return _fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    return lines


def _fmt_hp(row: dict, keys: list[str]) -> str:
    parts = []
    for k, v in _hp_values(row, keys).items():
        if v is None:
            continue
        short = k.split(".", 1)[-1]
        parts.append(f"{short}={v:.4g}" if isinstance(v, float) else f"{short}={v}")
    return ", ".join(parts)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("ssam-tune", "torch", "ray", "optuna"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _hardware() -> str:
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        gpu = "unknown"
    return f"{platform.platform()}, {os.cpu_count()} CPUs, GPU: {gpu}"


def _experiment_started(exp: Path) -> str | None:
    names = sorted(p.name for p in exp.glob("experiment_state-*.json"))
    if not names:
        return None
    return names[0].removeprefix("experiment_state-").removesuffix(".json")


def _settings_lines(space) -> list[str]:
    t = space.tune
    what, _ = _cost_words(t.flops)
    lines = [f"- mode: {space.mode}"]
    if space.mode == "search":
        lines.append("- searched keys: " + "; ".join(f"`{d.key}` {d.describe()}" for d in space.search))
        fixed = len(space.tune.baselines)
        lines.append(f"- budget: {fixed + t.num_samples} trials ({fixed} baselines: "
                     f"{', '.join(t.baselines) or 'none'}; {t.num_samples} sampled), "
                     f"{space.epochs} epochs each at most")
    else:
        lines.append(f"- budget: {len(space.cases)} cases x {len(space.seeds)} seeds, {space.epochs} epochs each")
    if t.objective == "single":
        lines.append("- objective: single (validation accuracy, max). The front below is still computed on "
                     f"(val_acc, `{t.flops_metric}`) for reference.")
    else:
        lines.append(f"- objective: multi (validation accuracy: max; `{t.flops_metric}`: min)")
    lines.append(f"- cost: {t.flops} ({what}; column `{t.flops_metric}`)")
    lines.append(f"- sampler: {t.sampler} (seed {t.seed}, {t.n_startup_trials} start-up trials)")
    if t.scheduler == "asha":
        lines.append(f"- scheduler: ASHA on val_acc over epochs, grace period {t.grace_period}, reduction factor "
                     f"{t.reduction_factor:g}; anchor trials always run to the end")
    else:
        lines.append("- scheduler: none (every trial runs all epochs)")
    lines.append(f"- resources per trial: {t.cpu:g} CPU, {t.gpu:g} GPU; max concurrent trials: "
                 f"{t.max_concurrent_trials or 'auto'}; time budget: "
                 f"{f'{t.time_budget_s:g} s' if t.time_budget_s else 'none'}; max failures: {t.max_failures}")
    if t.confirm_top_k:
        lines.append(f"- confirmation: top {t.confirm_top_k} front points x seeds {t.confirm_seeds}")
    return lines


def _summary_text(space, exp: Path, rows: list[dict], front: list[dict], best: dict | None, keys: list[str],
                  sgd_cost: float | None, loose: list[dict], optuna_problem: str | None, configs: dict,
                  shown: str) -> str:
    t = space.tune
    cost = t.flops_metric
    lines = [f"# Experiment `{space.name}`", ""]
    dates = sorted(d for r in rows for d in (r.get("date_first"), r.get("date_last")) if d)
    started = _experiment_started(exp)
    lines.append(f"Experiment folder `{shown}`" + (f", started {started}" if started else "") +
                 (f"; results from {dates[0]} to {dates[-1]}." if dates else "; no results yet."))
    lines += ["", f"**{NOTE_SELECTION}**", "", "## Search settings", ""]
    lines += _settings_lines(space)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines += ["", "## Trials", ""]
    lines += _md_table(["status", "trials"], [[s, counts[s]] for s in STATUSES] + [["total", len(rows)]])
    lines += ["", ("completed: ran every epoch (full fidelity); pruned: stopped early by the scheduler or the "
                   "time budget; diverged: NaN/inf loss; errored: Ray recorded an error; pending: never reported.")]
    if sgd_cost:
        lines += ["", (f"Relative costs (`flops_rel`) are multiples of the SGD anchor's final `{cost}` "
                       f"({sgd_cost:.4g}).")]
    else:
        lines += ["", "No SGD anchor completed: costs are absolute."]
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No trial completed.")
    else:
        rel = f" ({best['flops_rel']:.2f}x SGD)" if best.get("flops_rel") else ""
        lines.append(f"Trial `{best['trial_id']}` ({best['label']}, method {best.get('method.name')}; "
                     f"{_fmt_hp(best, keys) or 'no tuned keys'}): val_acc {_pct(best['val_acc'])}, "
                     f"test_acc {_pct(best.get('test_acc'))}, `{cost}` {_sci(best.get(cost))}{rel}. "
                     "Config: `best_config.yaml`.")
    lines += ["", f"## Pareto front (val_acc: max, `{cost}`: min; completed trials only)", ""]
    if front:
        body = [[k, r["trial_id"], r["label"], r.get("method.name"), _fmt_hp(r, keys), _pct(r["val_acc"]),
                 _pct(r.get("test_acc")), _sci(r.get(cost)), f"{r['flops_rel']:.3f}" if r.get("flops_rel") else "",
                 f"`{configs.get(r['trial_id'], '')}`"] for k, r in enumerate(front)]
        lines += _md_table(["k", "trial", "label", "method", "hyper-parameters", "val_acc", "test_acc", cost,
                            "x SGD", "config"], body)
    else:
        lines.append("Empty: no trial completed.")
    lines += ["", "![front](pareto.png)", ""]
    for status, note in (("pruned", "stopped early; their accuracies are not full fidelity"),
                         ("diverged", "loss became NaN or infinite"), ("errored", "Ray recorded an error")):
        group = [r for r in rows if r["status"] == status]
        lines += [f"## {status.capitalize()} trials ({len(group)})", ""]
        if not group:
            lines += ["None.", ""]
            continue
        lines.append(f"({note})")
        lines.append("")
        for r in group:
            extra = f"; error: `{r['error']}`" if r.get("error") else ""
            acc = f", last val_acc {_pct(r.get('val_acc'))}" if r.get("val_acc") is not None else ""
            lines.append(f"- `{r['trial_id']}` {r['label']} ({r.get('method.name')}; {_fmt_hp(r, keys)}): "
                         f"{r['epochs_reached']}/{r['epochs']} epochs{acc}{extra}")
        lines.append("")
    recovered = [r for r in rows if r.get("failures") and r["status"] in ("completed", "pruned")]
    if recovered:
        lines += ["Trials that failed and were retried: " + ", ".join(
            f"`{r['trial_id']}` ({r['failures']}x, last: `{r['error']}`)" for r in recovered), ""]
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        names = ", ".join(f"`{r['trial_id']}` {r['label']}" for r in pending)
        lines += [f"Pending (never reported): {names}", ""]
    known = {r["trial_id"] for r in rows}
    orphans = [t_ for t_ in loose if t_["ray_trial_id"] not in known]
    if orphans:
        lines += ["Optuna trials without a Ray trial folder: " + ", ".join(
            f"#{t_['number']} ({t_['status']})" for t_ in orphans), ""]
    if optuna_problem and any(r["optuna_number"] is not None for r in rows):
        lines += [f"Note: {optuna_problem}.", ""]
    v = _versions()
    hosts = sorted({str(r["hostname"]) for r in rows if r.get("hostname")})
    lines += ["## Provenance", "",
              f"- ssam_tune git commit: {_git_commit() or 'unknown (not a git checkout)'}",
              "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
              f"- search seed: {t.seed}",
              f"- trained on host(s): {', '.join(hosts) or 'unknown'}",
              f"- exported on: {_hardware()}", ""]
    return "\n".join(lines)


def _confirmation_block(text: str) -> str | None:
    start, end = text.find(CONFIRM_BEGIN), text.find(CONFIRM_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(CONFIRM_END)]


def _with_confirmation(summary: str, block: str | None) -> str:
    """``summary`` with the confirmation block put at its end (replacing an older one)."""
    old = _confirmation_block(summary)
    if old is not None:
        summary = summary.replace(old, "").rstrip("\n") + "\n"
    if block:
        summary = summary.rstrip("\n") + "\n\n" + block + "\n"
    return summary


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------
def _local_experiment(exp_dir: str, tmp: Path) -> Path:
    """A local folder with the experiment's small files: ``exp_dir`` itself, or for a URI
    (``s3://...``) a copy of space.yaml, optuna.journal, experiment_state-*.json and each
    trial's params.json, result.json and error.txt (checkpoints are never fetched)."""
    if "://" not in str(exp_dir):
        return Path(exp_dir)
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(str(exp_dir))
    wanted = {"params.json", "result.json", "error.txt"}
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = Path(info.path).relative_to(root)
        top = rel.parts[0]
        top_level = len(rel.parts) == 1 and (rel.name in (SPACE_FILE, JOURNAL_FILE)
                                             or rel.name.startswith("experiment_state-"))
        if top_level or (len(rel.parts) == 2 and top.startswith("trial_") and rel.name in wanted):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(info.path) as src:
                dest.write_bytes(src.read())
    return tmp


def export_experiment(exp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write every export of the experiment at ``exp_dir`` (a folder, or a URI such as
    ``s3://bucket/exp``) into ``out_dir``; see the module docstring for the files.

    Returns ``{"out_dir", "trials_csv", "pareto_csv", "pareto_json", "pareto_png",
    "best_config" (None without a completed trial), "configs" (paths), "summary",
    "tensorboard", "tensorboard_runs", "n_trials", "counts" (per status), "front" (trial
    ids, by cost), "best_trial", "front_xy" (the front as drawn in pareto.png)}``.
    Raises FileNotFoundError without ``space.yaml``; ConfigError if it is invalid.
    """
    with tempfile.TemporaryDirectory() as tmp:
        exp = _local_experiment(str(exp_dir), Path(tmp))
        return _export(exp, Path(out_dir), shown=str(exp_dir) if "://" in str(exp_dir) else None)


def _export(exp: Path, out: Path, shown: str | None = None) -> dict:
    if not (exp / SPACE_FILE).is_file():
        raise FileNotFoundError(f"{exp / SPACE_FILE}: not found (not an ssam_tune experiment folder?)")
    space = _load_space(exp / SPACE_FILE)
    cost = space.tune.flops_metric
    rows, loose, problem = _load(exp, cost, space)
    sgd_cost = _sgd_cost(rows, cost)
    front = _front_rows(rows, cost)
    best = _best_row(rows, cost)
    keys = _hp_keys(space, rows)
    out.mkdir(parents=True, exist_ok=True)

    # configs/ (built aside, swapped in) and best_config.yaml
    build = _new_dir(out, "configs")
    config_names: dict[str, str] = {}
    try:
        for k, r in enumerate(front):
            name = f"front_{k}_{_safe(r['label'])}.yaml"
            (build / name).write_text(_yaml_config(r, space.name, cost, f"Pareto front point {k} (sorted by cost)."))
            config_names[r["trial_id"]] = f"configs/{name}"
        _swap_dir(build, out / "configs")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    best_path = out / "best_config.yaml"
    if best is not None:
        _write_atomic(best_path, _yaml_config(best, space.name, cost,
                                              "Best trial: highest validation accuracy (ties: lower cost)."))
    else:
        best_path.unlink(missing_ok=True)

    _write_atomic(out / "trials.csv", _csv_text(rows, _trial_columns(rows, cost)))
    hp_cols = keys
    front_records = []
    for k, r in enumerate(front):
        rec = {"k": k, "trial_id": r["trial_id"], "label": r["label"], "kind": r["kind"],
               "method": r.get("method.name")}
        rec.update(_hp_values(r, hp_cols))
        rec.update({"val_acc": r["val_acc"], "test_acc": r.get("test_acc"), cost: r.get(cost),
                    "flops_rel": r.get("flops_rel"), "epochs": r["epochs_reached"],
                    "config": config_names[r["trial_id"]]})
        front_records.append(rec)
    columns = ["k", "trial_id", "label", "kind", "method", *hp_cols, "val_acc", "test_acc", cost, "flops_rel",
               "epochs", "config"]
    columns = list(dict.fromkeys(columns))
    _write_atomic(out / "pareto.csv", _csv_text(front_records, columns))
    meta = {"experiment": space.name, "objective": space.tune.objective, "accuracy": "val_acc",
            "cost": cost, "flops": space.tune.flops, "sgd_cost": sgd_cost,
            "note": NOTE_SELECTION + " Candidates: completed (full-fidelity) trials only.",
            "front": [{c: rec.get(c) for c in columns} for rec in front_records]}
    _write_atomic(out / "pareto.json", json.dumps(meta, indent=2, allow_nan=False) + "\n")
    front_xy = plot_front(rows, front, out / "pareto.png", title=space.name, cost_metric=cost,
                          flops_kind=space.tune.flops, sgd_cost=sgd_cost)
    n_tb = write_tensorboard(rows, out / "tensorboard", keys, cost)

    summary_path = out / "summary.md"
    old_block = None
    if summary_path.is_file():
        old_block = _confirmation_block(summary_path.read_text())
    text = _summary_text(space, exp, rows, front, best, keys, sgd_cost, loose, problem, config_names,
                         shown or str(exp.resolve()))
    _write_atomic(summary_path, _with_confirmation(text, old_block))
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"out_dir": str(out), "trials_csv": str(out / "trials.csv"), "pareto_csv": str(out / "pareto.csv"),
            "pareto_json": str(out / "pareto.json"), "pareto_png": str(out / "pareto.png"),
            "best_config": str(best_path) if best is not None else None,
            "configs": [str(out / p) for p in config_names.values()], "summary": str(summary_path),
            "tensorboard": str(out / "tensorboard"), "tensorboard_runs": n_tb, "n_trials": len(rows),
            "counts": counts, "front": [r["trial_id"] for r in front],
            "best_trial": best["trial_id"] if best is not None else None, "front_xy": front_xy}


# ---------------------------------------------------------------------------------------------
# confirmation
# ---------------------------------------------------------------------------------------------
def confirm_cases(exp_dir: str | os.PathLike, top_k: int, seeds: Sequence[int]) -> list[tuple[str, dict]]:
    """The ``top_k`` front points with the highest val_acc (ties: lower cost), each re-run
    with every seed: ``[(f"front{k}_{label}/seed{s}", training config with seed s), ...]``,
    where k is the point's index in the cost-sorted front (its ``configs/front_<k>_...``)."""
    import copy

    exp = Path(exp_dir)
    space = _load_space(exp / SPACE_FILE)
    cost = space.tune.flops_metric
    rows = _load(exp, cost, space)[0]
    front = _front_rows(rows, cost)
    ranked = sorted(range(len(front)), key=lambda k: (-front[k]["val_acc"], front[k][cost], k))[:max(0, top_k)]
    out = []
    for k in ranked:
        r = front[k]
        for seed in seeds:
            cfg = copy.deepcopy(r["_config"])
            cfg["seed"] = int(seed)
            out.append((f"front{k}_{_safe(r['label'])}/seed{seed}", cfg))
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
    exp, out = Path(confirm_exp_dir), Path(out_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"{exp}: not found")
    space = _try_space(exp)
    cost = space.tune.flops_metric if space is not None else "flops_theoretical"
    rows = _load(exp, cost, space)[0]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        base, _, seed = r["label"].rpartition("/")
        groups.setdefault(base if seed.startswith("seed") else r["label"], []).append(r)
    searched = {}
    pareto = _read_json(out / "pareto.json")
    for p in pareto.get("front", []) if isinstance(pareto.get("front"), list) else []:
        searched[f"front{p.get('k')}_{_safe(str(p.get('label')))}"] = p
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
    _write_atomic(out / "confirm.csv", _csv_text(table, columns))

    def pm(mean, std):
        return "n/a" if mean is None else _pct(mean) + (f" ± {100 * std:.2f}" if std is not None else "")

    body = [[r["label"], r["n_seeds"], pm(r["test_acc_mean"], r["test_acc_std"]),
             pm(r["val_acc_mean"], r["val_acc_std"]), _sci(r.get(cost)), _pct(r["search_val_acc"]),
             _pct(r["search_test_acc"])] for r in table]
    block = [CONFIRM_BEGIN, "## Confirmation", "",
             (f"Front points re-run with fresh seeds (experiment folder `{exp.resolve()}`): mean ± sample "
              "standard deviation (ddof 1) over the completed seeds; `confirm.csv` has the numbers. The points "
              "were chosen on validation accuracy; the test accuracy is only reported."), ""]
    block += _md_table(["configuration", "seeds", "test_acc", "val_acc", cost, "search val_acc (1 seed)",
                        "search test_acc (1 seed)"], body)
    missing = [r for r in table if r["not_completed"]]
    if missing:
        block += ["", "Seeds that did not complete: " + "; ".join(r["not_completed"] for r in missing)]
    block += ["", CONFIRM_END]
    summary_path = out / "summary.md"
    text = summary_path.read_text() if summary_path.is_file() else "# Summary\n"
    _write_atomic(summary_path, _with_confirmation(text, "\n".join(block)))
    return {"confirm_csv": str(out / "confirm.csv"), "summary": str(summary_path), "rows": table}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.export",
                                description="Export an ssam_tune experiment: tables, front, configs, summary, "
                                            "TensorBoard.")
    p.add_argument("experiment", help="experiment folder (holds space.yaml and trial_*/)")
    p.add_argument("--out", default=None, help="output folder (default: results/<space name>)")
    p.add_argument("--confirm", default=None, metavar="DIR",
                   help="also summarise a confirmation experiment (front<k>_<label>/seed<s> trials)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 (one-line error) for a missing folder or a bad space.yaml."""
    from ssam_tune.config import ConfigError

    args = _parser().parse_args(argv)
    exp = args.experiment
    try:
        if "://" not in exp:
            if not Path(exp).is_dir():
                raise FileNotFoundError(f"experiment folder not found: {exp}")
            if not (Path(exp) / SPACE_FILE).is_file():
                raise FileNotFoundError(f"{Path(exp) / SPACE_FILE}: not found (not an ssam_tune experiment folder?)")
            name = _load_space(Path(exp) / SPACE_FILE).name
        else:
            name = Path(exp.rstrip("/")).name
        if args.confirm is not None and not Path(args.confirm).is_dir():
            raise FileNotFoundError(f"confirmation experiment folder not found: {args.confirm}")
        out = Path(args.out) if args.out else Path("results") / name
        info = export_experiment(exp, out)
        if args.confirm is not None:
            export_confirmation(args.confirm, out)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = info["counts"]
    detail = ", ".join(f"{v} {k}" for k, v in c.items() if v)
    print(f"{info['n_trials']} trials{f' ({detail})' if detail else ''}; "
          f"front: {len(info['front'])} point(s); exports written to {info['out_dir']}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
