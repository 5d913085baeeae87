"""The TensorBoard format of an experiment, owned here: one run per trial,
``<method>-<label>_<trial id>/`` (:func:`run_name`), holding the per-epoch scalars (step =
epoch) under grouped tags (:data:`TAGS`), the ``final/*`` metrics and an HParams session; the
HParams experiment config at the top. The live callback
(:mod:`ssam_tune.export.live`) appends these events while the search runs; the export
rebuilds the same runs and tags from the experiment folder, byte-identically from one export
to the next (tensorboard is imported when writing).

What TensorBoard 2.21 does with them, and why the layout is what it is:

- a run keeps the first metadata it reads for a tag (``plugin_event_accumulator``), so the
  experiment config is written once, before any trial, and a trial's session (its
  hyper-parameters and status) once, when the trial ends;
- the HParams dashboard ticks its first five hyper-parameter columns, after the backend has
  sorted them by ``(not differs, name)`` (``backend_context``) and the page has stably
  sorted them differs-first (``tf-hparams-query-pane``: ``kNumHParamsToDisplayByDefault =
  5``). HParamInfo has no "show by default" field (name, display_name, description, type,
  domain, differs), so ``differs`` is set on exactly the five to show
  (:func:`shown_hparams`). It ticks the first five metrics in the config's order;
- Time Series groups the scalar cards by the tag's prefix up to the first ``/``, sorts the
  groups by name and opens only the first two on a fresh page (``metrics_reducers``:
  ``tagGroupExpanded``), so the groups are named by what they measure: ``accuracy`` and
  ``cost`` open;
- parallel coordinates leave out a trial without a value on every ticked column, so a key
  that does not apply to a trial's method gets a sentinel: -1 for a number, "n/a" for text.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ssam_tune.export.front import hp_values
from ssam_tune.export.read import RAY_KEYS, STATUSES, _trial_status, finite_number, sgd_cost_of
from ssam_tune.export.write import safe_name
from ssam_tune.storage.files import atomic_write, new_dir, swap_dir
from ssam_tune.training.config import flatten

# A numeric hyper-parameter that does not apply (N_F of SAM): -1, which no searched key can
# take (they are all >= 0), so it does not read as a real 0; text ones read "n/a".
NOT_APPLICABLE_NUMBER, NOT_APPLICABLE_TEXT = -1, "n/a"
KINDS = ("baseline", "search", "case")
# Columns the HParams dashboard ticks by default: the first SHOWN metrics below, and the
# SHOWN hyper-parameters marked as differing (see the module doc).
SHOWN = 5

# The ONE mapping from a reported metric key (result.json, trials.csv, Optuna: those keep their
# names) to its TensorBoard tag, for the export and the live callback alike. The group (before
# the "/") is what the value measures, so train, validation and test curves of one quantity sit
# side by side, and "accuracy" and "cost", the search's trade-off, are the two groups
# TensorBoard opens (module doc). A key not listed here goes to "other" (tag()).
TAGS = {
    "val_acc": "accuracy/val", "train_acc": "accuracy/train", "test_acc": "accuracy/test",
    "best_val_acc": "accuracy/best_val", "test_acc_at_best": "accuracy/test_at_best_val",
    "val_loss": "loss/val", "train_loss": "loss/train", "test_loss": "loss/test",
    "flops_theoretical": "cost/flops_theoretical", "flops_executed": "cost/flops_executed",
    "flops_mask": "cost/flops_mask", "flops_steps_theoretical": "cost/flops_steps_theoretical",
    "flops_steps_executed": "cost/flops_steps_executed", "flops_count_seconds": "cost/flops_count_seconds",
    "train_seconds": "cost/train_seconds", "epoch_seconds": "cost/epoch_seconds",
    "images_per_second": "cost/images_per_second", "time_total_s": "cost/time_total_s",
    "mask_density": "mask/density", "mask_overlap": "mask/overlap", "mask_refreshes": "mask/refreshes",
    "lr": "optimizer/lr", "e_norm": "optimizer/e_norm",
    # the perturbation schedules' share of perturbing steps (reported by trainers that have them)
    "perturbed_share": "optimizer/perturbed_share", "perturbed_steps": "optimizer/perturbed_steps",
    "best_epoch": "run/best_val_epoch", "workers": "run/workers", "resumed_from": "run/resumed_from",
    # a front point's sharpness (tune.diagnostics: sharpness), final/ only: measured once, at the end
    "lambda_max": "sharpness/lambda_max", "lambda_ratio": "sharpness/lambda_ratio",
    "hessian_trace": "sharpness/hessian_trace",
}
# final/* (one value per trial, at its last epoch): the HParams metrics. The search's cost
# (tune.flops: theoretical or executed FLOPs) and its ratio to the SGD anchor's have no
# per-epoch key of their own.
FINAL, COST, COST_REL = "final/", "cost/flops", "cost/flops_rel"
# Accuracy and cost first: every trial with a result has them (flops_rel needs the SGD anchor).
FINAL_METRICS = tuple(FINAL + t for t in (TAGS["val_acc"], COST, TAGS["test_acc"], TAGS["best_val_acc"],
                                          TAGS["train_seconds"], COST_REL, TAGS["flops_theoretical"],
                                          TAGS["flops_executed"], TAGS["lambda_max"], TAGS["lambda_ratio"],
                                          TAGS["hessian_trace"]))
# result.json keys that are bookkeeping, not curves (best_val_acc, best_epoch, time_total_s are curves).
_NOT_SCALARS = RAY_KEYS - {"best_val_acc", "best_epoch", "time_total_s"}


def tag(key: str) -> str:
    """The TensorBoard tag of a metric key: :data:`TAGS`, else ``other/<key>`` (a metric of a
    user's trainable), or the key itself where it already names a group (has a ``/``)."""
    return TAGS.get(key) or (key if "/" in key else f"other/{key}")


def run_name(config: Mapping, label: str, trial_id: str) -> str:
    """A trial's run folder: ``<method>-<label>_<trial id>`` (``ssam_f-optuna3_1a2b3c4d``), the
    label alone where it is the method (the baselines: ``sam_5e6f7a8b``), so the run list says
    which method a curve is. ``config``: the nested training config, as both writers read it
    from the trial's params; safe_name keeps it a file name."""
    method, label = (config.get("method") or {}).get("name"), safe_name(label)
    method = safe_name(str(method)) if method else label
    # "-" between them: method names and labels hold "_" themselves
    return f"{label if method == label else f'{method}-{label}'}_{trial_id}"


def event_file(folder: Path, t0: int) -> Path:
    """A new event file in ``folder``; a name already taken (a resumed driver) gets a suffix
    that sorts after it, as TensorBoard reads a run's files in name order."""
    path, k = folder / f"events.out.tfevents.{t0}.ssam_tune", 0
    while path.exists():
        k += 1
        path = folder / f"events.out.tfevents.{t0}.ssam_tune.{k}"
    return path


def _masked_crc(data: bytes) -> int:
    """The masked CRC-32C of the TFRecord framing. tensorboard's RecordWriter computes the
    same value in pure Python, which was half of a 2,000-trial export's time
    (benchmarks/bench_scale.txt); google-crc32c is Google's C implementation of it."""
    import google_crc32c

    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(events: Iterable) -> bytes:
    """The events as TFRecords: length (u64), its masked CRC, the bytes, their masked CRC,
    little-endian; byte-identical to tensorboard's RecordWriter (tests/test_tensorboard.py)."""
    parts = []
    for ev in events:
        data = ev.SerializeToString(deterministic=True)  # proto maps: stable order
        head = struct.pack("<Q", len(data))
        parts += [head, struct.pack("<I", _masked_crc(head)), data, struct.pack("<I", _masked_crc(data))]
    return b"".join(parts)


def write_events(path: Path, events: Iterable, append: bool = False) -> None:
    with open(path, "ab" if append else "wb") as fh:
        fh.write(_records(events))


def drop_sessions(run: Path) -> None:
    """Rewrite a run's event files without their HParams session. TensorBoard shows the first
    session a run holds; a trial that runs again (an errored trial retried by ``--resume``)
    writes a new one when it ends."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import metadata

    tags = {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    for path in sorted(run.glob("events.out.tfevents.*")):
        events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(str(path)).Load()]
        kept = [e for e in events if not any(v.tag in tags for v in e.summary.value)]
        if len(kept) < len(events):
            atomic_write(path, _records(kept))


def header_event(t0: float):
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(wall_time=float(t0), file_version="brain.Event:2")


def epoch_event(result: Mapping):
    """The scalars of one per-epoch result (step = epoch, time = its timestamp); None for a
    result that is not an epoch >= 1 (the exports' rows skip those too)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    epoch = result.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        return None
    # this runs for every metric of every epoch of every trial (~5M values in a 2,000-trial
    # export): exact types first, anything else (bools, numpy scalars) through finite_number
    summary = summary_pb2.Summary()
    add = summary.value.add
    for k, v in result.items():
        t = type(v)
        number = (t is float and v - v == 0.0) or t is int or (t is not float and finite_number(v) is not None)
        if number and k not in _NOT_SCALARS:
            add(tag=tag(k), simple_value=float(v))
    wall = finite_number(result.get("timestamp")) or 0.0
    return event_pb2.Event(wall_time=wall, step=epoch, summary=summary)


def _field(key: str):
    """The config schema's field of a dotted key (None for a key the schema lacks)."""
    from ssam_tune.training.config import SECTIONS, Config

    section, _, name = key.rpartition(".")
    cls = SECTIONS.get(section) if section else Config
    return next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None


def _is_number(key: str) -> bool:
    f = _field(key)
    return f is not None and isinstance(f.default, (int, float)) and not isinstance(f.default, bool)


def trial_hparams(config: Mapping, label: str, kind: str, status: str, keys: list[str]) -> dict:
    """The HParams of a trial (``config``: its nested training config): method.name, every key
    in ``keys`` (a sentinel where it does not apply to the method), label, status, kind."""
    flat = flatten(dict(config))
    hp: dict[str, Any] = {"method.name": str(flat.get("method.name"))}
    for k, v in hp_values(flat, keys).items():
        if v is None:
            hp[k] = NOT_APPLICABLE_NUMBER if _is_number(k) else NOT_APPLICABLE_TEXT
        elif _is_number(k) and finite_number(v) is not None:
            hp[k] = v
        else:
            hp[k] = str(v).lower() if isinstance(v, bool) else str(v)
    hp.update(label=label, status=status, kind=kind or "")
    return hp


def final_metrics(values: Mapping, cost_metric: str, sgd_cost: float | None) -> dict:
    """The final/* metrics of a trial from its last values (a trials.csv row or the last
    result); flops_rel is the cost over the completed SGD anchor's, as in trials.csv."""
    cost = finite_number(values.get(cost_metric))
    finals = {FINAL + tag(k): values.get(k)
              for k in ("val_acc", "test_acc", "best_val_acc", "train_seconds", "flops_theoretical", "flops_executed",
                        "lambda_max", "lambda_ratio", "hessian_trace")}
    finals[FINAL + COST] = cost
    finals[FINAL + COST_REL] = cost / sgd_cost if cost is not None and sgd_cost else None
    return {k: float(finals[k]) for k in FINAL_METRICS if finite_number(finals[k]) is not None}


def end_events(run: str, hp: dict, finals: dict, t0: float, t1: float, step: int) -> list:
    """A trial's closing events: its HParams session (group name = run name), its final/*
    metrics at its last epoch and, unless pruned or pending, TensorBoard's session status."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp_api

    session = hp_api.hparams_pb(hp, trial_id=run, start_time_secs=t0)
    events = [event_pb2.Event(wall_time=t0, step=0, summary=_stable_hparams(session))]
    if finals:
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in finals.items()]
        events.append(event_pb2.Event(wall_time=t1, step=step, summary=summary_pb2.Summary(value=values)))
    status = {"completed": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_FAILURE,
              "errored": api_pb2.STATUS_FAILURE}.get(hp["status"])  # pruned: no TB status fits
    if status is not None:
        data = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=t1))
        events.append(event_pb2.Event(wall_time=t1, step=step, summary=_plugin_summary(metadata.SESSION_END_INFO_TAG,
                                                                                        data)))
    return events


def trial_status(last: Mapping | None, epochs: int | None, errored: bool) -> str:
    """trials.csv's status of a trial that ended with result ``last``."""
    return _trial_status([last] if last else [], epochs, errored)


def _choices(name: str) -> list[str] | None:
    """The values a text column takes, where known: the dashboard's filter checkboxes."""
    from ssam_tune.method.methods import METHODS

    fixed = {"method.name": METHODS, "status": STATUSES, "kind": KINDS}
    if name in fixed:
        return list(fixed[name])
    f = _field(name)
    choices = ("true", "false") if f is not None and isinstance(f.default, bool) else \
        f.metadata.get("choices") if f is not None else None
    return [*(str(c) for c in choices if c is not None), NOT_APPLICABLE_TEXT] if choices else None


def shown_hparams(keys: list[str]) -> list[str]:
    """The hyper-parameter columns the HParams dashboard ticks: the method and the first keys,
    five in all (module doc). ``keys`` (front.hp_keys) lists the searched ones first, so every
    key a search samples is ticked when it samples at most five (method.name included), as
    search_spaces/quickstart.yaml does; status, label and kind are ticked by hand. The writers
    get ``keys`` only, not which of them were searched, so a search of fewer keys also ticks the
    method's usual ones that follow (front.KEY_PARAMS)."""
    return ["method.name", *keys][:SHOWN]


def experiment_events(keys: list[str], t: float) -> list:
    """The top run's events: the HParams experiment config (every column, its type and, for
    text, its values where known) with ``differs`` set on the columns to show (module doc)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    shown = shown_hparams(keys)
    infos = []
    for name in ["method.name", *keys, "label", "status", "kind"]:
        info = api_pb2.HParamInfo(name=name, differs=name in shown)
        if _is_number(name):
            info.type = api_pb2.DATA_TYPE_FLOAT64
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            if choices := _choices(name):
                info.domain_discrete.extend(choices)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in FINAL_METRICS]
    data = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=t))
    return [header_event(t), event_pb2.Event(wall_time=t, summary=_plugin_summary(metadata.EXPERIMENT_TAG, data))]


def _plugin_summary(tag: str, data):
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    return _stable_hparams(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)]))


def _stable_hparams(summary):
    """Re-serialise the HParams plugin payloads with a stable map order (protobuf map order
    follows Python's per-process hash seed otherwise): exports stay byte-identical."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for value in summary.value:
        if value.metadata.plugin_data.plugin_name == "hparams":
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            value.metadata.plugin_data.content = data.SerializeToString(deterministic=True)
    return summary


def write_tensorboard(rows: list[dict], dest: Path, keys: list[str], cost_metric: str) -> int:
    """Rebuild ``dest`` (built in a temporary folder, then swapped in): one run per trial plus
    the HParams experiment config at the top. Returns the number of runs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = new_dir(dest.parent, dest.name)
    sgd_cost = sgd_cost_of(rows, cost_metric)
    try:
        starts = []
        for row in rows:
            series = row["_series"]
            times = [int(r["timestamp"]) for r in series if finite_number(r.get("timestamp")) is not None]
            t0, t1 = (min(times), max(times)) if times else (0, 0)
            run = build / run_name(row["_config"], row["label"], row["trial_id"])
            run.mkdir()
            hp = trial_hparams(row["_config"], row["label"], row["kind"], row["status"], keys)
            events = [header_event(t0), *[ev for ev in map(epoch_event, series) if ev is not None],
                      *end_events(run.name, hp, final_metrics(row, cost_metric, sgd_cost), t0, t1,
                                  row["epochs_reached"])]
            write_events(event_file(run, t0), events)
            starts.append(t0)
        t = min((x for x in starts if x > 0), default=0)
        write_events(event_file(build, t), experiment_events(keys, t))
        swap_dir(build, dest)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return len(rows)
