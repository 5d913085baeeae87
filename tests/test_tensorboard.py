"""The live TensorBoard (ssam_tune.export.live) on a real local Ray, read back as
TensorBoard reads it (event_accumulator: one accumulator per run folder, first metadata of a
tag wins): one run per trial, the per-epoch scalars of result.json, every HParams column for
every trial, trials.csv's status, nothing from Ray's own TensorBoard logger; then --resume.
"""

import os

import pytest
from _helpers import read_rows
from _trivial import flaky_trainable, load_space_dict, worker_pythonpath
from ray.tune.stopper import Stopper

from ssam_tune.export import load_trials
from ssam_tune.export.write import safe_name

# optuna0 starts with the anchor; the numbers after it depend on when the anchor enters the study
PRUNED, RAISES = "optuna0", "sgd"


class StopOne(Stopper):
    """Stops the trial labelled PRUNED after its first epoch: a pruned trial, deterministically."""

    def __call__(self, trial_id, result):
        return result.get("label") == PRUNED and result.get("epoch", 0) >= 1

    def stop_all(self):
        return False


def read_tree(folder):
    """{run: {"scalars": {tag: [(step, value)]}, "hparams": {name: value}}} and the experiment
    config, as TensorBoard's accumulators load them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    def load(path):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        return acc

    def value(v):
        return v.string_value if v.HasField("string_value") else v.number_value

    runs = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        acc = load(run)
        scalars = {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        content = acc.PluginTagToContent("hparams").get(metadata.SESSION_START_INFO_TAG)
        hparams = None
        if content is not None:
            start = metadata.parse_session_start_info_plugin_data(content)
            hparams = {k: value(v) for k, v in start.hparams.items()}
        runs[run.name] = {"scalars": scalars, "hparams": hparams, "files": len(list(run.iterdir()))}
    top = load(folder).PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG]
    return runs, metadata.parse_experiment_plugin_data(top)


def shown_by_default(experiment) -> list[str]:
    """The HParams dashboard's default columns (TensorBoard 2.21): the backend sorts by
    (not differs, name) (backend_context._sort_and_reduce_to_hparams_limit), the page ticks
    the first five after a stable sort on differs."""
    infos = sorted(experiment.hparam_infos, key=lambda i: (not i.differs, i.name))
    return sorted(i.name for i in infos[:5])


def check_tree(out, exp_dir):
    rows = {r["trial_id"]: r for r in load_trials(exp_dir)}
    csv_status = {r["trial_id"]: r["status"] for r in read_rows(out / "trials.csv")}
    runs, experiment = read_tree(out / "tensorboard")
    assert sorted(runs) == sorted(f"{safe_name(r['label'])}_{tid}" for tid, r in rows.items())
    names = [i.name for i in experiment.hparam_infos]
    assert shown_by_default(experiment) == ["method.N_F", "method.name", "method.rho", "method.sparsity", "status"]
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["final/val_acc", "final/flops"]
    for tid, row in rows.items():
        run = runs[f"{safe_name(row['label'])}_{tid}"]
        hp = run["hparams"]
        assert hp is not None and sorted(hp) == sorted(names)  # every column, for parallel coordinates
        assert hp["status"] == csv_status[tid] == row["status"]
        assert hp["method.name"] == row["method.name"] and hp["label"] == row["label"]
        method = row["method.name"]  # the sentinel -1 where a key does not apply to the method
        assert hp["method.N_F"] == (row["method.N_F"] if method == "ssam_f" else -1)
        assert hp["method.rho"] == (-1 if method == "sgd" else pytest.approx(row["method.rho"]))
        assert hp["method.sparsity"] == (pytest.approx(row["method.sparsity"]) if method.startswith("ssam") else -1)
        for result in row["_series"]:  # every per-epoch metric of result.json, at step = epoch
            for key in ("val_acc", "test_acc", "flops_theoretical", "train_seconds", "best_val_acc"):
                if key in result:
                    steps = dict(run["scalars"][key])
                    assert steps[result["epoch"]] == pytest.approx(result[key], rel=1e-6)
        assert run["scalars"]["final/val_acc"][-1][1] == pytest.approx(row["val_acc"], rel=1e-6)
    return runs


@pytest.mark.timeout(600)
def test_live_tensorboard_tree_and_resume(tmp_path, monkeypatch):
    from ssam_tune.export import build
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # always a fresh local Ray
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(os.environ))  # workers import _trivial
    monkeypatch.chdir(tmp_path)
    # The export would rebuild results/<name>/tensorboard when the search ends: it writes
    # next to it instead, so the test reads what the callback wrote while the search ran.
    real = build.write_tensorboard
    monkeypatch.setattr(build, "write_tensorboard",
                        lambda rows, dest, *a: real(rows, dest.with_name("tensorboard_export"), *a))
    data = load_space_dict("tb", 3, baselines=["sgd"], concurrency=2, cpu=1, epochs=3)
    data["tune"].update(max_failures=0, scheduler="none")
    space = load_space(tmp_path / "tb.yaml", data=data)
    storage, exp_dir = str(tmp_path / "ray"), tmp_path / "ray" / "tb"
    monkeypatch.setenv("SSAM_TEST_RAISE_LABEL", RAISES)  # workers inherit it
    out = run_search(space, storage=storage, resume=False, results=str(tmp_path), trainable=flaky_trainable,
                     stop=StopOne())

    runs = check_tree(out, exp_dir)
    status = {name.rsplit("_", 1)[0]: run["hparams"]["status"] for name, run in runs.items()}
    assert (status[PRUNED], status[RAISES]) == ("pruned", "errored")
    assert set(status.values()) == {"completed", "pruned", "errored"}
    # The export writes the same runs, tags and HParams (final/best_val_acc also when the
    # trainable does not report it, as the failing one here: it has the epochs to compute it).
    export_runs, export_exp = read_tree(out / "tensorboard_export")

    def tags_and_hparams(tree):
        return {k: (sorted(set(r["scalars"]) - {"final/best_val_acc"}), r["hparams"]) for k, r in tree.items()}

    assert tags_and_hparams(export_runs) == tags_and_hparams(runs)
    assert export_exp.hparam_infos == read_tree(out / "tensorboard")[1].hparam_infos
    assert not list(exp_dir.rglob("events.out.tfevents*"))  # Ray's own TensorBoard logger is off

    # --resume: Ray restores the callback from tuner.pkl; the errored trial runs again and
    # ends completed, in a new event file next to its first one.
    monkeypatch.delenv("SSAM_TEST_RAISE_LABEL")
    out = run_search(space, storage=storage, resume=True, results=str(tmp_path), trainable=flaky_trainable)
    runs = check_tree(out, exp_dir)
    retried = next(r for name, r in runs.items() if name.startswith(f"{RAISES}_"))
    assert retried["hparams"]["status"] == "completed" and retried["files"] == 2
    assert [s for s, _ in retried["scalars"]["val_acc"]][-1] == 3
    assert not list(exp_dir.rglob("events.out.tfevents*"))


def test_ray_loggers_of_an_older_experiment_stay_on_when_resumed(tmp_path, monkeypatch):
    """An experiment whose tuner.pkl holds no JSON logger (started before the live callback)
    needs Ray's default loggers on resume, or its result.json would stop."""
    import pickle

    from ray.tune.logger import JsonLoggerCallback

    from ssam_tune.export.live import ray_tensorboard_off
    from ssam_tune.storage.experiment import Experiment

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "x")
    exp = Experiment(str(tmp_path))
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"callbacks": [JsonLoggerCallback()]}))
    for resume, expected in ((False, "1"), (True, "1")):
        with ray_tensorboard_off(exp, resume):
            assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == expected
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"callbacks": []}))
    with ray_tensorboard_off(exp, resume=True):
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "0"
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "x"  # put back


def test_event_records_are_byte_identical_to_tensorboards_record_writer():
    """The export frames events itself (a C CRC-32C): the bytes must be what tensorboard's own
    RecordWriter writes, for every kind of event the export writes and for large records."""
    import io

    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    from ssam_tune.export import tensorboard as tb

    hp = {"method.name": "ssam_f", "method.rho": 0.05, "status": "completed", "label": "optuna3"}
    big = event_pb2.Event(summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"t{i}", simple_value=i / 7) for i in range(5000)]))  # > 64 KiB
    events = [tb.header_event(1.5e9), tb.epoch_event({"epoch": 3, "timestamp": 1.5e9, "val_acc": 0.5,
                                                      "train_loss": 1.25, "flops": 3e15}),
              *tb.end_events("optuna3_abc", hp, {"final/val_acc": 0.5}, 1.5e9, 1.6e9, 3),
              *tb.experiment_events(["method.rho"], 1.5e9), big, event_pb2.Event()]
    events = [e for e in events if e is not None]
    assert len(events) >= 6 and len(big.SerializeToString()) > 65536
    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for ev in events:
        writer.write(ev.SerializeToString(deterministic=True))
    assert tb._records(events) == buf.getvalue()
    assert tb._records([]) == b""
