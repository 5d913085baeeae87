"""Reading an experiment folder into rows: one per trial, from its ``params.json``,
``result.json`` and ``error.txt``, without the orphans of a killed driver (Ray's experiment
state), joined with Optuna's view of the study; and the space.yaml, read tolerantly.

Everything here reads a local folder (for a URI, the copy made by
:meth:`ssam_tune.storage.experiment.Experiment.fetch_small_files`, see :func:`local_copy`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssam_tune.storage.experiment import (
    CHECKPOINTS_DIR,
    DIAGNOSTICS_FILE,
    JOURNAL_FILE,
    META,
    SPACE_FILE,
    STATE_PREFIX,
    TRIAL_PREFIX,
    Experiment,
    full_fidelity,
)
from ssam_tune.training.config import flatten, key_applies

STATUSES = ("completed", "pruned", "diverged", "errored", "pending")
BASELINE_ORDER = ("sgd", "sam", "ssam")
# Per-epoch metrics of ssam_tune.training.trainer.Trainer, in the order the CSV shows them.
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "mask_density",
           "mask_overlap", "mask_refreshes", "e_norm", "epoch_seconds", "flops_count_seconds", "images_per_second",
           "flops_theoretical", "flops_executed", "flops_mask", "flops_steps_theoretical",
           "flops_steps_executed", "train_seconds", "perturbed_share", "perturbed_steps")
# The sharpness of a front point (tune.diagnostics: sharpness; ssam_tune/sharpness.py keeps the
# whole measurement in the experiment's diagnostics.json): column -> key of the measurement.
SHARPNESS = {"lambda_max": "lambda_max", "lambda_ratio": "lambda_max_over_lambda_5", "hessian_trace": "trace"}
# Ray's bookkeeping keys in result.json: not metrics.
RAY_KEYS = frozenset({"timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
                      "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
                      "config", "time_since_restore", "iterations_since_restore", "experiment_tag",
                      "warmup_time", "episodes_total", "timesteps_total", "timesteps_since_restore",
                      "status", "label", "epoch", "best_val_acc", "best_epoch"})
# What a per-epoch report keeps in a row's ``_series`` (see :func:`_series_entry`): its epoch,
# its time and its metrics, i.e. the finite numbers under keys that are not Ray's bookkeeping
# (best_val_acc, best_epoch and time_total_s are curves too: TensorBoard shows them).
_NOT_SERIES = RAY_KEYS - {"best_val_acc", "best_epoch", "time_total_s", "epoch", "timestamp"}


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``{}`` when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _result_lines(path: Path) -> Iterator[dict]:
    """The JSON lines of a ``result.json`` in file order (a line cut short by a crash is
    skipped), each without its ``config``, one at a time.

    Ray repeats the whole trial config in every line (about half of a line's text; the
    config is read from ``params.json``). The first line's ``"config": {...}`` text, as
    ``json.dumps`` writes it, is replaced by ``null`` in the lines that hold it before they
    are parsed, which halves the parsing time; a line without that exact text is parsed as
    it is (and its config dropped after)."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    cut = None
    with fh:
        for line in fh:
            if cut is not None and cut in line:
                line = line.replace(cut, '"config": null', 1)
            elif not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            config = row.pop("config", None)
            if cut is None and isinstance(config, dict):
                cut = '"config": ' + json.dumps(config)
            yield row


def _series_entry(row: dict) -> dict:
    """What ``_series`` keeps of one per-epoch report: epoch, timestamp and every metric
    (finite int or float, in the report's order), not Ray's bookkeeping (config, date,
    hostname, pid, node_ip, time_this_iter_s, ...). Values come from ``json.loads``, so exact
    types suffice (``finite_number`` without its calls: this runs for every key of every line)."""
    out = {}
    for k, v in row.items():
        t = type(v)
        if k in ("epoch", "timestamp") or ((t is float and v - v == 0.0 or t is int) and k not in _NOT_SERIES):
            out[_KEYS.setdefault(k, k)] = v  # one string per name, not one per line (~1.5 KB a line)
    return out


_KEYS: dict[str, str] = {}  # the metric names seen, each kept once (json.loads makes new ones per line)


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, else None (bools, strings, NaN and inf are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _scan_results(path: Path) -> tuple[dict | None, list[dict], str | None, str | None]:
    """One pass over a ``result.json``: (the newest report, config dropped, or None without
    one; the per-epoch ``_series``: one entry per epoch >= 1, the newest report winning (a
    resumed trial repeats epochs), each trimmed by :func:`_series_entry`; the first and the
    last ``date``). Only one full report is held at a time: a 2,000-trial search has
    ~180,000 report lines."""
    last = None
    by_epoch: dict[int, dict] = {}
    first_date = last_date = None
    for row in _result_lines(path):
        last = row
        date = row.get("date")
        if date:
            date = str(date)
            first_date = date if first_date is None or date < first_date else first_date
            last_date = date if last_date is None or date > last_date else last_date
        epoch = row.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            by_epoch[epoch] = _series_entry(row)
    return last, [by_epoch[e] for e in sorted(by_epoch)], first_date, last_date


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


def _canonical(config: dict) -> dict:
    """The training config in the schema's key order (Ray stores params.json sorted), or as
    found when it does not validate against this checkout's schema."""
    from ssam_tune.training.config import ConfigError, config_from_dict, config_to_dict

    try:
        ordered = config_to_dict(config_from_dict(config))
    except (ConfigError, TypeError, ValueError):
        return config
    return ordered if ordered == config else config


def _trial_status(rows: list[dict], epochs: int | None, has_error: bool) -> str:
    """completed (last report at full fidelity: :func:`~ssam_tune.storage.experiment.full_fidelity`;
    wins over an error file of a retried trial), diverged, errored (error file), pruned
    (results, stopped early), pending (nothing)."""
    if rows:
        last = rows[-1]
        if full_fidelity(last, epochs):
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
    states = sorted(exp.glob(f"{STATE_PREFIX}*.json"))
    if not states:
        return None
    ids = _state_trial_ids(states[-1])
    return ids if ids else _parsed_trial_ids(states[-1])


# Ray 2.60 stores each trial as a JSON string (indent 2) inside the state file, so a trial's
# own id is that string's top-level key trial_id, written in the file as \n  \"trial_id\": \"<id>\"
# (the ids nested deeper, in the config and the last result, are indented further).
_STATE_ID = re.compile(r'\\n  \\"trial_id\\": \\"([^"\\]+)\\"')


def _state_trial_ids(path: Path) -> set[str]:
    """The trial ids of an experiment state file, found in its text 4 MiB at a time (the file
    holds ~50 KB per trial; parsing it whole took seconds and hundreds of MiB at 2,000
    trials). Empty when none is found: the caller then parses the file."""
    ids: set[str] = set()
    tail = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            while chunk := fh.read(1 << 22):
                text = tail + chunk
                ids.update(m.group(1) for m in _STATE_ID.finditer(text))
                tail = text[-80:]  # a match cut by the chunk boundary is found in the next round
    except OSError:
        return set()
    return ids


def _parsed_trial_ids(path: Path) -> set[str] | None:
    """The trial ids of an experiment state file by parsing it (any layout Ray writes)."""
    try:
        data = json.loads(path.read_text())
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
        is_trial = p.name.startswith(TRIAL_PREFIX) or (p / "params.json").is_file()
        if p.is_dir() and p.name != CHECKPOINTS_DIR and is_trial:
            if known is not None and p.name.removeprefix(TRIAL_PREFIX) not in known:
                tid = read_json(p / "params.json").get(META, {}).get("trial_id")
                if tid not in known:
                    continue
            out.append(p)
    return out


def _read_trial(path: Path) -> dict:
    """One row for one trial folder (see :func:`load_trials`), plus private ``_series``/``_config``."""
    params = read_json(path / "params.json")
    meta = params.get(META, {}) if isinstance(params.get(META), dict) else {}
    config = _canonical(params.get("config") if isinstance(params.get("config"), dict) else {})
    last, series, date_first, date_last = _scan_results(path / "result.json")
    error_text = None
    if (path / "error.txt").is_file():
        try:
            error_text = (path / "error.txt").read_text(errors="replace")
        except OSError:
            error_text = ""
    epochs = meta.get("epochs") or (config.get("train") or {}).get("epochs")
    epochs = int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    status = _trial_status([last] if last is not None else [], epochs, error_text is not None)
    last = last or {}
    trial_id = meta.get("trial_id") or last.get("trial_id") or path.name.removeprefix(TRIAL_PREFIX)
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
    final = {k: finite_number(v) for k, v in last.items() if k not in RAY_KEYS and finite_number(v) is not None}
    for key in METRICS:
        row[key] = final.pop(key, None)
    for key in sorted(final):
        row[key] = final[key]
    best = None
    for r in series:
        acc = finite_number(r.get("val_acc"))
        if acc is not None and (best is None or acc > finite_number(best.get("val_acc"))):
            best = r  # ties: the earliest epoch, as the Trainer counts it
    row["best_epoch"] = best["epoch"] if best else None
    row["best_val_acc"] = finite_number(best.get("val_acc")) if best else None
    row["test_acc_at_best"] = finite_number(best.get("test_acc")) if best else None
    if finite_number(last.get("best_val_acc")) is not None and last.get("best_epoch"):
        # The trainer tracks its best epoch across restarts; Ray's result.json of a restored
        # trial may start at the epoch it resumed from.
        row["best_epoch"] = int(last["best_epoch"])
        row["best_val_acc"] = finite_number(last["best_val_acc"])
        row["test_acc_at_best"] = finite_number(last.get("test_acc_at_best", row["test_acc_at_best"]))
    row["time_total_s"] = finite_number(last.get("time_total_s"))
    row["date_first"] = date_first
    row["date_last"] = date_last
    row["hostname"] = last.get("hostname")
    flat = flatten(config)
    for key, value in flat.items():  # a value that does not apply is left empty, as in every output
        row[key] = value if key_applies(flat, key) else None
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
    found): ({ray trial id: status attr}, [trials without a Ray trial folder], problem).
    The journal is the folder's own: for a URI, ``fetch_small_files`` has copied it there."""
    journal = exp / JOURNAL_FILE
    if not journal.is_file() or not name:
        return {}, [], "no optuna.journal"
    try:
        from ssam_tune.tuning.study import open_study  # Optuna only: the exports never import Ray

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


@contextlib.contextmanager
def local_copy(exp_dir: str | os.PathLike) -> Iterator[Path]:
    """The experiment's small files in a local folder: ``exp_dir`` itself, or for a URI a
    temporary copy (:meth:`Experiment.fetch_small_files`) removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Experiment(str(exp_dir)).fetch_small_files(Path(tmp))


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
    reports: epoch, timestamp and the metrics, see :func:`_series_entry`), ``_config`` (the
    nested training config), ``_params`` (the sampled keys).
    Rows are sorted: baselines (sgd, sam, ssam), search trials by Optuna number, the rest.
    """
    with local_copy(exp_dir) as exp:
        space = try_space(exp)
        if cost_metric is None:
            cost_metric = space.tune.flops_metric if space is not None else "flops_theoretical"
        return load_rows(exp, cost_metric, space)[0]


def load_rows(exp: Path, cost_metric: str, space) -> tuple[list[dict], list[dict], str | None]:
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
    sgd_cost = sgd_cost_of(rows, cost_metric)
    measured = read_json(exp / DIAGNOSTICS_FILE).get("sharpness", {})
    for row in rows:
        row["optuna_status"] = by_ray.get(row["trial_id"])
        entry = measured.get(row["trial_id"])
        if isinstance(entry, dict) and "error" not in entry:
            row.update({column: entry.get(key) for column, key in SHARPNESS.items()})
        cost = row.get(cost_metric)
        row["flops_rel"] = cost / sgd_cost if cost is not None and sgd_cost else None
    return rows, loose, problem


def sgd_cost_of(rows: list[dict], cost_metric: str) -> float | None:
    """The final cost of the completed SGD anchor (the 1x of every relative cost), or None."""
    for row in rows:
        if row["kind"] == "baseline" and row["label"] == "sgd" and row["status"] == "completed":
            cost = row.get(cost_metric)
            if cost:
                return cost
    return None


def try_space(exp: Path):
    """The experiment's SearchSpace, or None when space.yaml is missing or invalid."""
    try:
        return load_space_file(exp / SPACE_FILE)
    except Exception:  # noqa: BLE001
        return None


def load_space_file(path: Path):
    """``load_space``, tolerating a data folder that exists only on the machines that trained
    (the exporter never reads the data)."""
    from ssam_tune.training.config import ConfigError, load_yaml
    from ssam_tune.tuning.space import load_space

    try:
        return load_space(path, stored=True)
    except ConfigError as err:
        if err.path != "data.root":
            raise
        raw = load_yaml(path)
        raw.setdefault("data", {})["download"] = True  # skips only the "directory not found" check
        return load_space(path, data=raw, stored=True)
