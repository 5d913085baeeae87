"""The live TensorBoard (ssam_tune.export.live) on a real local Ray, read back as
TensorBoard reads it (event_accumulator: one accumulator per run folder, first metadata of a
tag wins): one run per trial, named with its method, the per-epoch scalars of result.json
under grouped tags, every HParams column for every trial, every searched key ticked,
trials.csv's status, nothing from Ray's own TensorBoard logger; then --resume.
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
# The tags TensorBoard must show, written out here (not read from ssam_tune.export.tensorboard.TAGS),
# so that the tests fail if the grouping is undone or changed by accident.
GROUPED = {"val_acc": "accuracy/val", "test_acc": "accuracy/test", "best_val_acc": "accuracy/best_val",
           "flops_theoretical": "cost/flops_theoretical", "train_seconds": "cost/train_seconds"}
GROUPS = {"accuracy", "loss", "cost", "mask", "optimizer", "run", "final", "other"}
FINAL_VAL, FINAL_COST = "final/accuracy/val", "final/cost/flops"


def expected_run(row) -> str:
    """``<method>-<label>_<trial id>``, the label alone where it is the method (a baseline)."""
    method, label = row["method.name"], safe_name(row["label"])
    return f"{label}_{row['trial_id']}" if label == method else f"{method}-{label}_{row['trial_id']}"


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


def check_tree(out, exp_dir, searched):
    rows = {r["trial_id"]: r for r in load_trials(exp_dir)}
    csv_status = {r["trial_id"]: r["status"] for r in read_rows(out / "trials.csv")}
    runs, experiment = read_tree(out / "tensorboard")
    assert sorted(runs) == sorted(expected_run(r) for r in rows.values())
    for name, run in runs.items():  # the method is in the run name
        assert name.startswith(run["hparams"]["method.name"]), name
    names = [i.name for i in experiment.hparam_infos]
    # every searched key ticked; the space searches four, so one usual key of the methods fills the five
    assert set(searched) <= set(shown_by_default(experiment))
    assert shown_by_default(experiment) == ["method.N_F", "method.T_m", "method.name", "method.rho",
                                            "method.sparsity"]
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics[:2] == [FINAL_VAL, FINAL_COST]
    for run in runs.values():  # grouped tags; the HParams metric columns read the final/* ones
        assert {t.split("/", 1)[0] for t in run["scalars"]} <= GROUPS and all("/" in t for t in run["scalars"])
        assert {t for t in run["scalars"] if t.startswith("final/")} <= set(metrics)
    for tid, row in rows.items():
        run = runs[expected_run(row)]
        hp = run["hparams"]
        assert hp is not None and sorted(hp) == sorted(names)  # every column, for parallel coordinates
        assert hp["status"] == csv_status[tid] == row["status"]
        assert hp["method.name"] == row["method.name"] and hp["label"] == row["label"]
        method = row["method.name"]  # the sentinel -1 where a key does not apply to the method
        assert hp["method.N_F"] == (row["method.N_F"] if method == "ssam_f" else -1)
        assert hp["method.rho"] == (-1 if method == "sgd" else pytest.approx(row["method.rho"]))
        assert hp["method.sparsity"] == (pytest.approx(row["method.sparsity"]) if method.startswith("ssam") else -1)
        for result in row["_series"]:  # every per-epoch metric of result.json, at step = epoch
            for key, tag in GROUPED.items():
                if key in result:
                    steps = dict(run["scalars"][tag])
                    assert steps[result["epoch"]] == pytest.approx(result[key], rel=1e-6)
        assert run["scalars"][FINAL_VAL][-1][1] == pytest.approx(row["val_acc"], rel=1e-6)
        if row["status"] == "completed":  # the HParams dashboard's first two metric columns
            assert FINAL_COST in run["scalars"]
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

    searched = list(data["search"])
    runs = check_tree(out, exp_dir, searched)
    status = {run["hparams"]["label"]: run["hparams"]["status"] for run in runs.values()}
    assert (status[PRUNED], status[RAISES]) == ("pruned", "errored")
    assert set(status.values()) == {"completed", "pruned", "errored"}
    # The export writes the same runs, tags and HParams (final/accuracy/best_val also when the
    # trainable does not report it, as the failing one here: it has the epochs to compute it).
    export_runs, export_exp = read_tree(out / "tensorboard_export")

    def tags_and_hparams(tree):
        return {k: (sorted(set(r["scalars"]) - {"final/accuracy/best_val"}), r["hparams"]) for k, r in tree.items()}

    assert tags_and_hparams(export_runs) == tags_and_hparams(runs)
    assert export_exp.hparam_infos == read_tree(out / "tensorboard")[1].hparam_infos
    assert not list(exp_dir.rglob("events.out.tfevents*"))  # Ray's own TensorBoard logger is off

    # --resume: Ray restores the callback from tuner.pkl; the errored trial runs again and
    # ends completed, in a new event file next to its first one.
    monkeypatch.delenv("SSAM_TEST_RAISE_LABEL")
    out = run_search(space, storage=storage, resume=True, results=str(tmp_path), trainable=flaky_trainable)
    runs = check_tree(out, exp_dir, searched)
    retried = next(r for r in runs.values() if r["hparams"]["label"] == RAISES)
    assert retried["hparams"]["status"] == "completed" and retried["files"] == 2
    assert [s for s, _ in retried["scalars"]["accuracy/val"]][-1] == 3
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


def test_every_metric_has_a_grouped_tag():
    """Every metric a trial reports gets a tag "<group>/<name>" (Time Series groups cards by
    the part before the "/"); an unknown one (a user's trainable) goes to "other"."""
    from ssam_tune.export import tensorboard as tb
    from ssam_tune.export.read import METRICS

    result = {"epoch": 2, "timestamp": 1.5e9, "best_epoch": 2, "best_val_acc": 0.5, "test_acc_at_best": 0.4,
              "time_total_s": 9.0, "workers": 1, "resumed_from": 0, "label": "optuna1", "my_metric": 1.0,
              **{k: 1.0 for k in METRICS}}
    tags = [v.tag for v in tb.epoch_event(result).summary.value]
    assert len(tags) == len(set(tags)) == len(result) - 3  # not epoch, timestamp, label
    assert all(t.split("/", 1)[0] in GROUPS and t.count("/") == 1 for t in tags)
    assert {k: tb.tag(k) for k in GROUPED} == GROUPED
    assert (tb.tag("workers"), tb.tag("my_metric"), tb.tag("mask_density")) == ("run/workers", "other/my_metric",
                                                                              "mask/density")
    assert not [k for k in METRICS if tb.tag(k).startswith("other/")]  # every known metric has its group
    finals = tb.final_metrics({"val_acc": 0.5, "flops_theoretical": 2.0}, "flops_theoretical", 4.0)
    assert finals == {FINAL_VAL: 0.5, FINAL_COST: 2.0, "final/cost/flops_rel": 0.5,
                      "final/cost/flops_theoretical": 2.0}
    assert set(finals) <= set(tb.FINAL_METRICS)  # the HParams metric columns: the final/* tags


def test_run_names_carry_the_method():
    from ssam_tune.export.tensorboard import run_name

    assert run_name({"method": {"name": "ssam_f"}}, "optuna3", "1a2b") == "ssam_f-optuna3_1a2b"
    assert run_name({"method": {"name": "sam"}}, "sam", "1a2b") == "sam_1a2b"  # a baseline: its label is the method
    assert run_name({"method": {"name": "sam"}}, "front3_sam/seed1", "1a2b") == "sam-front3_sam_seed1_1a2b"
    assert run_name({}, "case", "1a2b") == "case_1a2b"


def test_quickstart_ticks_every_searched_key(tmp_path):
    """search_spaces/quickstart.yaml samples five keys: all five are the HParams dashboard's
    default columns, with the final validation accuracy and cost first among the metrics."""
    from pathlib import Path

    from ssam_tune.export.front import hp_keys
    from ssam_tune.export.tensorboard import experiment_events, write_events
    from ssam_tune.tuning.space import load_space

    space = load_space(Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml")
    searched = sorted(d.key for d in space.search)
    assert len(searched) == 5
    (tmp_path / "tb").mkdir()
    write_events(tmp_path / "tb" / "events.out.tfevents.1.ssam_tune", experiment_events(hp_keys(space, []), 1))
    experiment = read_tree(tmp_path / "tb")[1]
    assert shown_by_default(experiment) == searched
    assert [m.name.tag for m in experiment.metric_infos][:2] == [FINAL_VAL, FINAL_COST]
