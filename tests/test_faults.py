"""Fault injection on a real local Ray (CPU): a killed worker, a removed node, a trial that
raises, a diverging trial, corrupt checkpoints, and the disk bound on checkpoints.

Every space is written to ``tmp_path`` from tests/spaces/fast.yaml with small epochs (SGD); a
divergence is injected at a known optimizer step (``train.inject_nan_at_step``), so it happens in
the same epoch on every CPU. The Ray tests run one after the other; the machine may be shared,
so waits are generous but each test stays short when it is not.
"""

import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import (
    WAIT,
    fast_space,
    kill_group,
    read_rows,
    reap_session,
    reported_epochs,
    reports,
    run_module,
    start_driver,
    steps_per_epoch,
    wait_for,
    write_yaml,
)

from ssam_tune.training.config import ConfigError
from ssam_tune.tuning.study import open_study

# Divergence is injected (train.inject_nan_at_step: the loss is NaN from that global step on),
# never provoked with a huge learning rate, whose overflow depends on the CPU's kernels.
# fast.yaml trains on train_size images in full batches: SPE optimizer steps per epoch.
_FAST = fast_space()
SPE = steps_per_epoch(_FAST["data"]["train_size"], _FAST["train"]["batch_size"])
# NaN in the middle of epoch 3: epochs 1 and 2 are reported (and checkpointed), then the
# trial stops as diverged with 2 epochs reached.
DIVERGE_IN_EPOCH_3 = {"inject_nan_at_step": 2 * SPE + SPE // 2}
# NaN at the very first step: diverged before any epoch is reported (0 epochs reached).
DIVERGE_AT_ONCE = {"inject_nan_at_step": 0}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _space(name: str, *, cases: list | None = None, epochs: int = 3, train: dict | None = None,
           data: dict | None = None, tune: dict | None = None, search: dict | None = None) -> dict:
    """fast.yaml as a cases (default) or search space: SGD, small epochs, no scheduler."""
    space = fast_space()
    space["name"] = name
    space["method"] = {"name": "sgd"}
    space["train"].update(epochs=epochs, **(train or {}))
    space["data"].update(data or {})
    space["tune"] = {"scheduler": "none", "resources": {"cpu": 1}, "max_concurrent_trials": 2, **(tune or {})}
    if search is None:
        space.pop("search")
        space["cases"] = cases or [{"label": "a", "method": {"name": "sgd"}}]
    else:
        space["search"] = search
    return space


def _write(tmp_path: Path, space: dict) -> Path:
    return write_yaml(tmp_path / f"{space['name']}.yaml", space)


def _run_cli(args, cwd):
    return run_module("ssam_tune.run", *args, cwd=cwd, timeout=WAIT)


def _monotone(epochs: list[int]) -> bool:
    """Never restarted from scratch: epoch 1 is reported once, first (a restart from a
    checkpoint may repeat the epochs after that checkpoint, never epoch 1)."""
    return epochs.count(1) == 1 and epochs[0] == 1


def _load_space(path: Path):
    from ssam_tune.tuning.space import load_space

    return load_space(path)


# ---------------------------------------------------------------------------------------------
# fast unit tests (no Ray cluster)
# ---------------------------------------------------------------------------------------------
def _state(epoch: int) -> dict:
    return {"format": 1, "epoch": epoch, "model": {"w": torch.arange(4096, dtype=torch.float32) + epoch},
            "optimizer": {}, "rng": {}, "tracker": {}}


def test_latest_state_skips_truncated_and_corrupt_checkpoints(tmp_path, monkeypatch):
    from ray import tune

    from ssam_tune.training.trainer import save_checkpoint
    from ssam_tune.tuning import trainable

    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    own = tmp_path / "own"
    save_checkpoint(own / "previous.pt", _state(2))
    save_checkpoint(own / "checkpoint.pt", _state(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # readable files: no warning
        assert trainable._latest_state(own)["epoch"] == 3

    ckpt = own / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # cut short by a crash
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint .*checkpoint.pt"):
        state = trainable._latest_state(own)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], _state(2)["model"]["w"])

    # Ray's checkpoint: a corrupt one is ignored, a readable newer one wins
    ray_dir = tmp_path / "ray_ckpt"
    ray_dir.mkdir()
    (ray_dir / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(ray_dir)))
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        assert trainable._latest_state(own)["epoch"] == 2
    save_checkpoint(ray_dir / "checkpoint.pt", _state(5))
    with pytest.warns(UserWarning):  # the truncated own checkpoint still warns
        assert trainable._latest_state(own)["epoch"] == 5

    # nothing readable anywhere: None (a fresh start), never an exception
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    (own / "previous.pt").write_bytes(b"")
    with pytest.warns(UserWarning):
        assert trainable._latest_state(own) is None
    assert trainable._latest_state(None) is None
    assert trainable._latest_state(tmp_path / "missing") is None  # no folder: no warning, None


def test_read_rejects_unsafe_and_incomplete_files(tmp_path):
    from ssam_tune.tuning import trainable

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"epoch": 1, "x": Evil()}, tmp_path / "evil.pt")  # code in a pickle: refused
    torch.save({"model": {}}, tmp_path / "no_epoch.pt")  # no epoch: not a checkpoint
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("evil.pt", "no_epoch.pt", "text.pt"):
        with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
            assert trainable._read(tmp_path / name) is None
    assert not (tmp_path / "pwned").exists()
    assert trainable._read(tmp_path / "absent.pt") is None
    assert trainable._read(tmp_path) is None  # a folder is not a checkpoint


def test_case_with_coupled_keys_is_accepted(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "val").mkdir()
    space = _space("coupled", cases=[{"label": "img", "data": {"name": "imagefolder",
                                                               "root": str(tmp_path / "imgs")}}])
    loaded = _load_space(_write(tmp_path, space))  # all of a case's keys are applied together
    assert loaded.fixed_trials()[0][1]["data"]["name"] == "imagefolder"


def test_case_with_clashing_keys_is_refused(tmp_path):
    space = _space("clash", cases=[{"label": "warm", "train": {"epochs": 2, "warmup_epochs": 2}}])
    with pytest.raises(ConfigError, match="warmup_epochs"):
        _load_space(_write(tmp_path, space))


# ---------------------------------------------------------------------------------------------
# 1. a trial's worker process SIGKILLed mid-epoch
# ---------------------------------------------------------------------------------------------
def test_worker_killed_mid_epoch_resumes_from_checkpoint(tmp_path):
    epochs = 5
    space = _space("fault-worker", epochs=epochs, data={"train_size": 512},
                   cases=[{"label": "victim", "method": {"name": "sgd"}}], tune={"max_failures": 2})
    path = _write(tmp_path, space)
    exp = tmp_path / "ray" / "fault-worker"
    log = tmp_path / "driver.log"
    driver = start_driver([str(path), "--storage", str(tmp_path / "ray"), "--results", str(tmp_path)],
                           tmp_path, log)
    killed = {}
    try:
        def reported_twice():
            for d in exp.glob("trial_*"):
                reps = reports(d)
                if reps and reps[-1]["epoch"] >= 2:
                    killed.update(pid=reps[-1]["pid"], epoch=reps[-1]["epoch"], dir=d)
                    return True
            return driver.poll() is not None

        assert wait_for(reported_twice), "the trial never reported two epochs"
        assert driver.poll() is None, log.read_text()[-3000:]
        assert killed["epoch"] < epochs, "trial finished before it could be killed"
        os.kill(killed["pid"], signal.SIGKILL)  # the trial's worker, mid-epoch
        assert driver.wait(timeout=WAIT) == 0, log.read_text()[-4000:]
    finally:
        kill_group(driver)
        reap_session(driver.pid)
    out = log.read_text()
    reps = reports(killed["dir"])
    seen = [r["epoch"] for r in reps]
    assert seen[-1] == epochs and _monotone(seen), seen
    assert any(r["pid"] != killed["pid"] for r in reps), "no report from a new worker after the kill"
    assert "resumed at epoch" in out
    resumed = [int(k) for k in re.findall(r"resumed at epoch (\d+)", out)]
    assert resumed and min(resumed) >= 1, resumed  # from a checkpoint, not from scratch
    (row,) = read_rows(tmp_path / "fault-worker" / "trials.csv")
    assert row["status"] == "completed" and int(row["epochs_reached"]) == epochs
    assert int(row["failures"]) >= 1 and row["error"]  # the worker's death is on record


# ---------------------------------------------------------------------------------------------
# 2. a worker node removed from a multi-node cluster mid-search
# ---------------------------------------------------------------------------------------------
def test_node_removed_mid_search_trials_move_and_finish(tmp_path, capfd, ray_cluster):
    import ray

    from ssam_tune.run import run_search

    epochs = 5
    space = _space("fault-node", epochs=epochs, data={"train_size": 384},
                   cases=[{"label": "a", "method": {"name": "sgd"}}, {"label": "b", "method": {"name": "sgd"}}],
                   tune={"max_failures": 2, "max_concurrent_trials": 2})
    path = _write(tmp_path, space)
    exp = tmp_path / "ray" / "fault-node"
    removed: dict = {}
    stop = threading.Event()

    def remove_a_busy_node():
        try:
            while not stop.is_set():
                last = {d: reports(d) for d in exp.glob("trial_*")}
                if len(last) == 2 and all(r and r[-1]["epoch"] >= 1 for r in last.values()):
                    busy = {r[-1]["node_id"] for r in last.values()}
                    driver_node = ray._private.worker.global_worker.node
                    for node in list(cluster.worker_nodes):
                        if node.node_id in busy and (driver_node is None or
                                                     node._raylet_socket_name != driver_node._raylet_socket_name):
                            removed["trials"] = {d.name for d, r in last.items() if r[-1]["node_id"] == node.node_id}
                            removed["epochs"] = {d.name: r[-1]["epoch"] for d, r in last.items()}
                            cluster.remove_node(node)
                            removed["node_id"] = node.node_id
                            return
                    removed["error"] = f"no removable node among {busy}"
                    return
                time.sleep(0.3)
        except Exception as err:  # noqa: BLE001 - reported by the test below
            removed["error"] = repr(err)

    cluster = ray_cluster({"num_cpus": 0}, workers=[{"num_cpus": 2}] * 2)  # trials only on workers
    try:
        chaos = threading.Thread(target=remove_a_busy_node, daemon=True)
        chaos.start()
        out = run_search(_load_space(path), storage=str(tmp_path / "ray"), resume=False, address=cluster.address,
                         results=str(tmp_path))
        stop.set()
        chaos.join(timeout=30)
    finally:
        stop.set()  # (the ray_cluster fixture shuts the cluster down)
    assert "error" not in removed, removed.get("error")
    assert removed.get("node_id"), "the node was never removed (trials finished first?)"
    assert all(e < epochs for e in removed["epochs"].values()), removed
    trials = read_rows(out / "trials.csv")
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials), trials
    for d in exp.glob("trial_*"):
        reps = reports(d)
        assert reps[-1]["epoch"] == epochs and reps[-1]["node_id"] != removed["node_id"]
        assert _monotone([r["epoch"] for r in reps]), [r["epoch"] for r in reps]
        if d.name in removed["trials"]:  # moved: reports from both nodes
            assert len({r["node_id"] for r in reps}) == 2
    captured = capfd.readouterr()
    assert "resumed at epoch" in captured.out + captured.err


# ---------------------------------------------------------------------------------------------
# 3, 4 and 6 on one cases experiment: a trial that raises, a diverging trial, a normal trial
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_cases(tmp_path_factory):
    from ssam_tune.run import run_search

    root = tmp_path_factory.mktemp("mixed")
    empty = root / "no_data"
    (empty / "train").mkdir(parents=True)  # exists (validation passes), holds no data
    space = _space("fault-mixed", epochs=4, tune={"max_failures": 0, "keep_checkpoints": 2}, cases=[
        {"label": "ok", "method": {"name": "sgd"}},
        {"label": "nodata", "data": {"root": str(empty)}},
        {"label": "div", "train": DIVERGE_IN_EPOCH_3},
    ])
    out = run_search(_load_space(_write(root, space)), storage=str(root / "ray"), resume=False,
                     results=str(root))
    rows = {r["label"].split("/")[0]: r for r in read_rows(out / "trials.csv")}
    return root, out, rows


def test_raising_trial_is_errored_and_the_others_finish(mixed_cases):
    _, out, rows = mixed_cases
    assert set(rows) == {"ok", "nodata", "div"}
    bad = rows["nodata"]
    assert bad["status"] == "errored"
    assert "DataError" in bad["error"] and "embedded data file not found" in bad["error"], bad["error"]
    assert int(bad["failures"]) == 1  # max_failures 0: no retry
    assert rows["ok"]["status"] == "completed" and int(rows["ok"]["epochs_reached"]) == 4
    assert not rows["ok"]["error"]
    summary = (out / "summary.md").read_text()
    assert "## Errored trials (1)" in summary
    assert bad["trial_id"] in summary and "embedded data file not found" in summary
    front = {r["trial_id"] for r in read_rows(out / "pareto.csv")}
    assert bad["trial_id"] not in front and rows["ok"]["trial_id"] in front
    assert bad["trial_id"] not in (out / "pareto.json").read_text()


def test_diverging_case_is_diverged_not_errored(mixed_cases):
    root, out, rows = mixed_cases
    div = rows["div"]
    assert div["status"] == "diverged" and not div["error"], div
    assert int(div["epochs_reached"]) == 2  # NaN from a step of epoch 3
    # epochs 1 and 2, then the diverged report (the last good epoch, re-marked) and nothing more
    div_reports = reports(root / "ray" / "fault-mixed" / f"trial_{div['trial_id']}")
    assert [(r["epoch"], r["status"]) for r in div_reports] == [(1, "running"), (2, "running"), (2, "diverged")]
    assert div["on_front"] in ("False", "false", "0", "")
    assert div["trial_id"] not in {r["trial_id"] for r in read_rows(out / "pareto.csv")}
    assert "## Diverged trials (1)" in (out / "summary.md").read_text()


def test_checkpoint_disk_use_is_bounded(mixed_cases):
    root, _, rows = mixed_cases
    exp = root / "ray" / "fault-mixed"
    ok = rows["ok"]["trial_id"]
    kept = sorted(p.name for p in (exp / f"trial_{ok}").glob("checkpoint_*"))
    assert kept == ["checkpoint_000003"], kept  # 4 epochs checkpointed; after the search: the newest
    assert not list((exp / "checkpoints" / ok).glob("*"))  # its own copy: gone once it finished
    for trial_dir in exp.glob("trial_*"):
        assert len(list(trial_dir.glob("checkpoint_*"))) <= 2, trial_dir
    for own in (exp / "checkpoints").iterdir():  # one own copy at most (the errored trial's)
        assert len(list(own.iterdir())) <= 1, sorted(own.iterdir())


# ---------------------------------------------------------------------------------------------
# 4 (searcher path) and 6 (keep_checkpoints 1) on a search
# ---------------------------------------------------------------------------------------------
def test_diverging_search_trial_in_journal_and_keep_one_checkpoint(tmp_path):
    import optuna

    from ssam_tune.run import run_search

    space = _space("fault-search", epochs=4,
                   search={f"train.{k}": {"type": "choice", "values": [v]} for k, v in DIVERGE_IN_EPOCH_3.items()},
                   tune={"num_samples": 1, "baselines": ["sgd"], "keep_checkpoints": 1, "objective": "multi"})
    out = run_search(_load_space(_write(tmp_path, space)), storage=str(tmp_path / "ray"), resume=False,
                     results=str(tmp_path))
    exp = tmp_path / "ray" / "fault-search"
    rows = {r["kind"]: r for r in read_rows(out / "trials.csv")}
    assert set(rows) == {"baseline", "search"}
    div = rows["search"]
    assert div["status"] == "diverged" and div["optuna_status"] == "diverged" and not div["error"], div
    assert int(div["epochs_reached"]) == 2  # NaN from a step of epoch 3 (epoch 1: test_first_epoch_...)
    assert div["trial_id"] not in {r["trial_id"] for r in read_rows(out / "pareto.csv")}
    study = open_study(str(exp / "optuna.journal"), "fault-search", "multi")
    (t,) = [t for t in study.trials if t.user_attrs["kind"] == "search"]
    # FAIL: a diverged trial is never on Optuna's front (it would be its cheapest point)
    assert t.state == optuna.trial.TrialState.FAIL and t.values is None and t.user_attrs["epochs_reached"] == 2
    assert t.user_attrs["status"] == "diverged" and t.user_attrs["ray_trial_id"] == div["trial_id"]
    assert [b.user_attrs["label"] for b in study.best_trials] == ["sgd"]
    base = rows["baseline"]
    assert base["status"] == "completed" and int(base["epochs_reached"]) == 4
    assert len(list((exp / f"trial_{base['trial_id']}").glob("checkpoint_*"))) == 1  # keep_checkpoints 1
    for own in (exp / "checkpoints").iterdir():
        assert len(list(own.iterdir())) <= 2


def test_first_epoch_divergence_does_not_abort_the_experiment(tmp_path):
    from ssam_tune.run import run_search

    space = _space("fault-div0", epochs=2, cases=[{"label": "div0", "train": DIVERGE_AT_ONCE}],
                   tune={"max_failures": 0})
    out = run_search(_load_space(_write(tmp_path, space)), storage=str(tmp_path / "ray"), resume=False,
                     results=str(tmp_path))
    (row,) = read_rows(out / "trials.csv")
    assert row["status"] == "diverged" and row["epochs_reached"] == "0" and not row["error"]
    # one report, before any epoch finished: epoch 0, diverged
    (only,) = reports(tmp_path / "ray" / "fault-div0" / f"trial_{row['trial_id']}")
    assert only["epoch"] == 0 and only["status"] == "diverged"


# ---------------------------------------------------------------------------------------------
# 5. truncated / corrupt checkpoints after a killed driver, then --resume
# ---------------------------------------------------------------------------------------------
def test_corrupt_checkpoints_then_resume_falls_back(tmp_path):
    from ssam_tune.training.trainer import load_checkpoint

    epochs = 6
    space = _space("fault-ckpt", epochs=epochs, cases=[{"label": "c", "method": {"name": "sgd"}}])
    path = _write(tmp_path, space)
    args = [str(path), "--storage", str(tmp_path / "ray"), "--results", str(tmp_path)]
    exp = tmp_path / "ray" / "fault-ckpt"
    driver = start_driver(args, tmp_path, tmp_path / "first.log")
    found: dict = {}
    try:
        def mid_run():
            if driver.poll() is not None:
                return True
            for d in exp.glob("trial_*"):
                tid = d.name.removeprefix("trial_")
                own = exp / "checkpoints" / tid
                states = list(exp.glob("experiment_state-*.json"))
                if (own / "checkpoint.pt").exists() and len(reported_epochs(d)) >= 3 and states and \
                        any(tid in s.read_text() for s in states):
                    found.update(dir=d, own=own)
                    return True
            return False

        assert wait_for(mid_run), "the run never reached the kill point"
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, no clean-up
        driver.wait()
    finally:
        kill_group(driver)
        reap_session(driver.pid)  # no worker of the killed run writes checkpoints any more
    own, trial_dir = found["own"], found["dir"]
    assert reported_epochs(trial_dir)[-1] < epochs
    # The trial's own (newest) copy is cut in half: the resume falls back to a checkpoint Ray
    # kept, the one its last snapshot recorded (one of the <= 2 it keeps).
    ckpt = own / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    ray_epochs = {int(load_checkpoint(f)["epoch"]) for f in trial_dir.glob("checkpoint_*/checkpoint.pt")}
    assert ray_epochs
    r = _run_cli([*args, "--resume"], cwd=tmp_path)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert "ignoring unreadable checkpoint" in text
    resumed = [int(m) for m in re.findall(r"resumed at epoch (\d+)", text)]
    assert resumed and resumed[0] in ray_epochs, (resumed, ray_epochs)
    seen = reported_epochs(trial_dir)
    assert seen[-1] == epochs and _monotone(seen), seen
    (row,) = read_rows(tmp_path / "fault-ckpt" / "trials.csv")
    assert row["status"] == "completed" and int(row["epochs_reached"]) == epochs
    assert not list(own.glob("*"))  # the finished trial's own copy is gone
    (last,) = trial_dir.glob("checkpoint_*/checkpoint.pt")  # Ray's newest stays
    assert int(load_checkpoint(last)["epoch"]) == epochs


def test_readable_file_that_is_not_a_training_checkpoint_is_skipped(tmp_path):
    from ssam_tune.training.trainer import save_checkpoint
    from ssam_tune.tuning.trainable import _read

    save_checkpoint(tmp_path / "other.pt", {"epoch": 7, "weights": torch.zeros(3)})
    with pytest.warns(UserWarning, match="not an ssam-tune training checkpoint"):
        assert _read(tmp_path / "other.pt") is None
