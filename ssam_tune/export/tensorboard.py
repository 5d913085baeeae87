"""The ``tensorboard/`` folder: one event file per trial (per-epoch scalars, final metrics,
an HParams session) and the HParams experiment config, written byte-identically from one
export to the next (tensorboard is imported when writing).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ssam_tune.experiment import new_dir, swap_dir
from ssam_tune.export.front import hp_values
from ssam_tune.export.read import RAY_KEYS, finite_number
from ssam_tune.export.write import safe_name


def _tb_events(row: dict, hp: dict, cost_metric: str) -> list:
    """TensorBoard events of one trial: per-epoch scalars (step = epoch), an HParams session
    with the trial's hyper-parameters, and final/* metrics. Times come from the results."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp_api

    series = row["_series"]
    times = [int(r["timestamp"]) for r in series if finite_number(r.get("timestamp")) is not None]
    t0 = float(min(times)) if times else 0.0
    t1 = float(max(times)) if times else 0.0
    events = [event_pb2.Event(wall_time=t0, file_version="brain.Event:2")]
    for r in series:
        wall = float(r["timestamp"]) if finite_number(r.get("timestamp")) is not None else t0
        shown = RAY_KEYS - {"best_val_acc", "best_epoch", "time_total_s"}
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in r.items()
                  if k not in shown and finite_number(v) is not None]
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
    for k, v in hp_values(row, keys).items():
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
    build = new_dir(dest.parent, dest.name)
    try:
        all_hp, starts = [], []
        for row in rows:
            hp = _tb_hparams(row, keys)
            all_hp.append(hp)
            run = build / f"{safe_name(row['label'])}_{row['trial_id']}"
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
        swap_dir(build, dest)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return len(rows)
