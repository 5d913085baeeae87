"""Real searches on a real local Ray: end to end, SIGKILL + resume, and a multi-node cluster.

The test-only space (tests/spaces/fast.yaml) has epochs of about a second on a CPU.
"""

import json
import os
import signal
from itertools import pairwise
from pathlib import Path

import pytest
from _helpers import (
    FAST,
    REPO,
    fast_space,
    kill_group,
    read_rows,
    reap_session,
    reported_epochs,
    run_module,
    start_driver,
    wait_for,
    write_yaml,
)

from ssam_tune.training.trainer import load_checkpoint
from ssam_tune.tuning.study import open_study


def _run_cli(args, cwd):
    return run_module("ssam_tune.run", *args, cwd=cwd, timeout=900)


def _dominates(a, b):
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    # with the front's sharpness measured (tune.diagnostics: sharpness, off by default)
    r = _run_cli([str(FAST), "--storage", str(root / "ray"), "--results", str(root),
                  "--set", "tune.diagnostics=sharpness"], cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def test_end_to_end_search(finished_search):
    out = finished_search / "fast"
    trials = read_rows(out / "trials.csv")
    assert len(trials) == 9 and len({t["trial_id"] for t in trials}) == 9  # 3 baselines + 6 sampled
    statuses = {t["status"] for t in trials}
    # Whether ASHA stops a trial depends on how the accuracies of real (CPU-rounded) training
    # runs compare, so pruning is not required here: it is checked with the deterministic
    # trainable of tests/test_load.py. A pruned trial here stopped before full fidelity.
    assert "completed" in statuses, statuses
    for t in trials:  # the anchors always run to full fidelity
        if t["label"] in ("sgd", "sam", "ssam"):
            assert t["status"] == "completed"
        if t["status"] == "pruned":
            assert int(t["epochs_reached"]) < 4, t
    front = read_rows(out / "pareto.csv")
    # SGD (1x) is always on the front; with second-long epochs a sparse or SAM trial may or may
    # not beat it, so the two-point front is checked with the deterministic load trainable
    # (tests/test_load.py). Here: the front is exactly the non-dominated completed trials.
    assert len(front) >= 1
    by_id = {t["trial_id"]: t for t in trials}
    points = []
    for p in front:
        t = by_id[p["trial_id"]]
        assert t["status"] == "completed" and int(t["epochs_reached"]) == 4
        points.append((float(t["val_acc"]), float(t["flops_theoretical"])))
    for a in points:
        assert not any(_dominates(b, a) for b in points)
    completed = [(float(t["val_acc"]), float(t["flops_theoretical"])) for t in trials if t["status"] == "completed"]
    for a in points:  # nothing completed dominates a front point
        assert not any(_dominates(b, a) for b in completed)
    for name in ("pareto.json", "pareto.png", "best_config.yaml", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_the_fronts_sharpness_is_measured_and_exported(finished_search):
    """tune.diagnostics: sharpness: every front point's final checkpoint measured once, kept in
    diagnostics.json, shown in pareto.csv, trials.csv and summary.md; the figures are those of
    python -m ssam_tune.sharpness on the same checkpoint."""
    from ssam_tune.sharpness import measure

    exp, out = finished_search / "ray" / "fast", finished_search / "fast"
    measured = json.loads((exp / "diagnostics.json").read_text())["sharpness"]
    front = read_rows(out / "pareto.csv")
    assert {p["trial_id"] for p in front} == set(measured)
    trials = {t["trial_id"]: t for t in read_rows(out / "trials.csv")}
    for p in front:
        entry = measured[p["trial_id"]]
        assert "error" not in entry, entry
        assert entry["epoch"] == 4 and entry["samples"] == 256  # the final weights; train_size 256
        assert float(p["lambda_max"]) == pytest.approx(entry["lambda_max"], rel=1e-6)
        assert float(p["hessian_trace"]) == pytest.approx(entry["trace"], rel=1e-6)
        assert float(trials[p["trial_id"]]["lambda_max"]) == pytest.approx(entry["lambda_max"], rel=1e-6)
        assert entry["lambda_max"] >= entry["lambda_5"] and entry["lambda_max"] > 0
        again = measure(exp / entry["checkpoint"] / "checkpoint.pt")
        assert again["lambda_max"] == pytest.approx(entry["lambda_max"], rel=1e-3)
    assert all(t["lambda_max"] == "" for i, t in trials.items() if i not in measured)
    assert "| lambda_max | Hessian trace |" in (out / "summary.md").read_text()
    # TensorBoard: each front run's final/sharpness/* metrics (HParams columns)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for trial_id, entry in measured.items():
        (run,) = (out / "tensorboard").glob(f"*_{trial_id}")
        events = EventAccumulator(str(run))
        events.Reload()
        (last,) = events.Scalars("final/sharpness/lambda_max")
        assert last.value == pytest.approx(entry["lambda_max"], rel=1e-6)


def test_checkpoints_of_finished_trials_are_bounded(finished_search):
    """retain_checkpoints: front (the default): only the front points and the best keep their
    checkpoints; Ray's are there for them, the trials' own copies are gone for all."""
    exp = finished_search / "ray" / "fast"
    out = finished_search / "fast"
    front = {p["trial_id"] for p in read_rows(out / "pareto.csv")}
    trials = read_rows(out / "trials.csv")
    top = max(float(t["val_acc"]) for t in trials if t["status"] == "completed")
    best = {t["trial_id"] for t in trials if t["status"] == "completed" and float(t["val_acc"]) == top}
    kept = {t["trial_id"]: sorted(d.name for d in (exp / f"trial_{t['trial_id']}").glob("checkpoint_*"))
            for t in trials}
    for t in trials:
        if t["trial_id"] in front:
            assert len(kept[t["trial_id"]]) == 1, t["label"]  # the newest
        elif t["trial_id"] not in best:
            assert kept[t["trial_id"]] == [], (t["label"], t["status"], kept[t["trial_id"]])
    assert any(kept[i] for i in best)  # the best (the first of equals) keeps its checkpoints
    assert not list((exp / "checkpoints").rglob("*.pt"))  # the own copies of finished trials


def test_early_stopped_trials_are_pruned_in_optuna(finished_search):
    exp = finished_search / "ray" / "fast"
    study = open_study(str(exp / "optuna.journal"), "fast", "multi")
    assert study.metric_names == ["val_acc", "flops_theoretical"]
    anchors = [t for t in study.trials if t.user_attrs.get("kind") == "baseline"]
    assert sorted(t.user_attrs["label"] for t in anchors) == ["sam", "sgd", "ssam"]
    assert all(t.state.name == "COMPLETE" and len(t.values) == 2 for t in anchors)  # the anchors run to the end
    # Optuna's front is the completed part of the exported one
    front = read_rows(finished_search / "fast" / "pareto.csv")
    assert {t.user_attrs["ray_trial_id"] for t in study.best_trials} == \
        {p["trial_id"] for p in front if p.get("status", "completed") == "completed"}
    sampled_trials = [t for t in study.trials if t.user_attrs.get("kind") == "search"]
    states = {t.number: (t.state.name, t.user_attrs.get("status")) for t in sampled_trials}
    assert len(states) == 6
    pruned = [n for n, (s, _) in states.items() if s == "PRUNED"]
    # (how many ASHA stops depends on the runs' accuracies: tests/test_load.py requires some)
    assert all(states[n][1] == "pruned" for n in pruned)
    # each sampled trial's Optuna state follows from its status in trials.csv
    state_of = {"completed": "COMPLETE", "diverged": "FAIL", "pruned": "PRUNED", "errored": "FAIL"}
    sampled = [t for t in read_rows(finished_search / "fast" / "trials.csv") if t["kind"] == "search"]
    assert {t["trial_id"]: state_of[t["status"]] for t in sampled} == \
        {t.user_attrs["ray_trial_id"]: t.state.name for t in sampled_trials}
    for t in sampled_trials:
        reached = max(reported_epochs(exp / f"trial_{t.user_attrs['ray_trial_id']}"), default=0)
        if t.state.name == "COMPLETE":
            assert reached == 4  # complete only at full fidelity
        if t.state.name == "PRUNED":
            assert reached < 4
        assert not (t.values and t.state.name == "COMPLETE" and reached < 4)


def test_best_config_reruns(finished_search, tmp_path):
    best = finished_search / "fast" / "best_config.yaml"
    r = run_module("ssam_tune.train", str(best), "--set", "train.epochs=1", "--out", str(tmp_path / "rerun"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rerun" / "metrics.json").read_text())["status"] == "completed"


def test_existing_experiment_needs_resume(finished_search, capsys):
    from ssam_tune.run import main

    assert main([str(FAST), "--storage", str(finished_search / "ray"), "--results", str(finished_search)]) == 2
    assert "already exists" in capsys.readouterr().err


def _experiment_done(exp: Path, total: int) -> bool:
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return False
    try:
        data = json.loads(states[-1].read_text())
        trials = [json.loads(t[0] if isinstance(t, list) else t) for t in data["trial_data"]]
    except (OSError, ValueError):
        return False
    return len(trials) == total and all(t.get("status") == "TERMINATED" for t in trials)


# (sampled trials, anchors) per kill point: as many trials as the kill point needs, the whole
# budget where the kill must land in the middle of the search
BUDGET = {"before_state": (2, ["sgd"]), "first_trials": (3, ["sgd", "sam"]),
          "mid_search": (6, ["sgd", "sam", "ssam"]), "export": (2, ["sgd"])}


@pytest.mark.parametrize("moment", ["before_state", "first_trials", "mid_search", "export"])
def test_sigkill_driver_then_resume(moment, tmp_path):
    space = fast_space()
    space["train"]["epochs"] = 4  # rungs at epochs 1 and 2
    space["tune"]["scheduler"]["grace_period"] = 1
    n_sampled, anchors = BUDGET[moment]
    space["tune"].update(num_samples=n_sampled, baselines=anchors)
    total = n_sampled + len(anchors)
    # the random sampler: a resumed driver must not replay the proposals of the killed one
    space["tune"]["sampler"] = "random"
    space["tune"].pop("n_startup_trials")
    write_yaml(tmp_path / "kill.yaml", space)
    args = ["kill.yaml", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path)]
    exp = tmp_path / "ray" / "fast"
    driver = start_driver(args, tmp_path, tmp_path / "driver.log")

    def rung_records():
        f = exp / "asha_rungs.json"
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return {}
        return {(m, t): tuple(v) for m, rec in data["rungs"].items() for t, v in rec.items()}

    checkpoints = lambda: len(list(exp.glob("checkpoints/*/checkpoint.pt")))  # noqa: E731
    # trials that reported at least once (a finished trial's own checkpoint copy is deleted
    # once Ray's stored state says it is done, so copies count only live trials: at most 2)
    started = lambda: sum(1 for f in exp.glob("trial_*/result.json") if f.stat().st_size)  # noqa: E731
    when = {
        # Ray has written tuner.pkl; the state files are removed after the kill, as a driver
        # killed before Ray's first snapshot leaves the folder: --resume starts it afresh
        "before_state": lambda: (exp / "tuner.pkl").exists(),
        "first_trials": lambda: checkpoints() >= 1,
        "mid_search": lambda: started() >= 4 and len(rung_records()) >= 3 and checkpoints() >= 1,
        # Ray is done with every trial: the driver is writing (or about to write) the exports
        "export": lambda: _experiment_done(exp, total) or (tmp_path / "fast" / "trials.csv").exists(),
    }[moment]
    try:
        assert wait_for(when, 600), f"search never reached the kill point {moment}"
        before_rungs = rung_records()
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, no clean-up
        driver.wait()
    finally:
        kill_group(driver)
        reap_session(driver.pid)  # no worker of the killed run is left to write
    if moment == "before_state":
        for f in [*exp.glob("experiment_state-*"), *exp.glob("search*-state-*"), *exp.glob("callback-states-*")]:
            f.unlink()
    # Read after the kill, when nothing writes any more: a checkpoint (or a result line) read
    # before it could be overtaken by one more epoch of the run being killed.
    before_ckpt = {d.name: load_checkpoint(d / "checkpoint.pt")["epoch"]
                   for d in exp.glob("checkpoints/*") if (d / "checkpoint.pt").exists()} \
        if moment != "export" else {}
    before_lines = {d.name.removeprefix("trial_"): len((d / "result.json").read_text().splitlines())
                    for d in exp.glob("trial_*") if (d / "result.json").exists()}
    r = _run_cli([*args, "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # ASHA's rung records from before the kill are still there
    assert set(before_rungs) <= set(rung_records())
    trials = read_rows(tmp_path / "fast" / "trials.csv")
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == total  # every trial once
    assert all(t["status"] in ("completed", "pruned") for t in trials)
    for trial_id in ids:
        epochs = reported_epochs(exp / f"trial_{trial_id}")
        # never restarted from scratch: epochs only go up (a finished trial may repeat its last)
        assert all(b > a or (b == a == epochs[-1]) for a, b in pairwise(epochs)), (trial_id, epochs)
        if trial_id in before_ckpt:
            # every epoch reported after the kill came from a run resumed at its checkpoint
            lines = [json.loads(x) for x in (exp / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
            later = [x for x in lines[before_lines.get(trial_id, 0):] if x["epoch"] > before_ckpt[trial_id]]
            assert all(x.get("resumed_from", 0) >= before_ckpt[trial_id] for x in later), (trial_id, later)
    study = open_study(str(exp / "optuna.journal"), "fast", "multi")
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in study.trials)  # none left running
    sampled = [t for t in study.trials if t.user_attrs.get("kind") == "search"]
    assert len([t for t in sampled if t.state.name != "FAIL"]) == n_sampled  # the budget, each once
    assert len([t for t in study.trials if t.user_attrs.get("kind") == "baseline"]) == len(anchors)  # each once
    # never the same configuration twice, orphans of the killed driver included
    proposed = [tuple(sorted(t.params.items())) for t in sampled]
    assert len(proposed) == len(set(proposed)), proposed
    for name in ("pareto.csv", "pareto.png", "summary.md", "best_config.yaml"):
        assert (tmp_path / "fast" / name).exists()


def test_fractional_gpus_on_a_multi_node_cluster(tmp_path, ray_cluster):
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    space = fast_space()
    space["tune"].update(num_samples=2, baselines=["sgd", "sam"], resources={"cpu": 1, "gpu": 0.5},
                         max_concurrent_trials=4, scheduler="none")
    space["train"]["epochs"] = 2
    write_yaml(tmp_path / "gpu.yaml", space)
    # two worker nodes that declare one GPU each (they have none)
    cluster = ray_cluster({"num_cpus": 1, "num_gpus": 0}, workers=[{"num_cpus": 2, "num_gpus": 1}] * 2)
    out = run_search(load_space(tmp_path / "gpu.yaml"), storage=str(tmp_path / "ray"), resume=False,
                     address=cluster.address, results=str(tmp_path))
    exp = tmp_path / "ray" / "fast"
    nodes, devices = set(), set()
    for d in exp.glob("trial_*"):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        nodes.add(rows[-1]["node_id"])
        devices.add(rows[-1]["device"])
    assert len(nodes) >= 2  # 0.5-GPU trials spread over both GPU nodes
    assert devices == {"cpu"}  # CUDA_VISIBLE_DEVICES set, no CUDA: CPU fallback
    assert len(read_rows(out / "trials.csv")) == 4


def test_confirmation_reruns_front_points_with_seeds(tmp_path):
    space = fast_space()
    space["train"]["epochs"] = 2
    space["tune"].update(num_samples=1, baselines=["sgd"], scheduler="none", confirm={"top_k": 1, "seeds": [1, 2]})
    write_yaml(tmp_path / "c.yaml", space)
    r = _run_cli(["c.yaml", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_rows(tmp_path / "fast" / "confirm.csv")
    assert len(rows) == 1
    row = rows[0]
    assert int(row["n_seeds"]) == 2 and row["test_acc_std"], row
    front = read_rows(tmp_path / "fast" / "pareto.csv")
    assert row["label"].split("_", 1)[1] in {p["label"] for p in front}
    assert "Confirmation" in (tmp_path / "fast" / "summary.md").read_text()
    seeds = sorted(json.loads((d / "params.json").read_text())["config"]["seed"]
                   for d in (tmp_path / "ray" / "fast-confirm").glob("trial_*"))
    assert seeds == [1, 2]


def test_smoke_runs_a_paper_space(tmp_path):
    # the README's cluster check: --smoke changes the model (WRN-28-10), the data (CIFAR-100,
    # downloaded) and the resources (a GPU per trial). The data-parallel ImageNet space's smoke
    # is checked without Ray (tests/test_space.py) and data-parallel searches run in
    # tests/test_parallel.py.
    # one sampled trial (the first of the space's enqueued paper settings) besides the anchors
    r = _run_cli([str(REPO / "search_spaces" / "wrn_cifar100.yaml"), "--smoke", "--num-samples", "1", "--storage",
                  str(tmp_path / "ray"), "--results", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = read_rows(tmp_path / "wrn_cifar100-smoke" / "trials.csv")
    assert len(trials) == 4 and all(t["status"] in ("completed", "pruned") for t in trials)
    sampled = [t for t in trials if t["kind"] == "search"]
    assert [(t["method.name"], t["method.sparsity"]) for t in sampled] == [("ssam_f", "0.9")]  # enqueued first
    assert {t["model.name"] for t in trials} == {"resnet18"} and {t["data.name"] for t in trials} == {"embedded"}


def test_resume_auto_starts_then_resumes_and_ray_client_is_refused(tmp_path, monkeypatch, capsys):
    """An idempotent entrypoint for jobs a cluster may restart: start if absent, resume if
    present; and a ray:// address is refused before anything starts."""
    space = fast_space()
    space["train"]["epochs"] = 1
    space["tune"].update(num_samples=1, baselines=False, n_startup_trials=1)
    write_yaml(tmp_path / "auto.yaml", space)
    args = ["auto.yaml", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path), "--resume", "auto"]
    r = _run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--resume auto: starting" in r.stdout
    # the console is the search's: none of Ray's banners, INFO lines or notices
    for noise in ("Number of trials", "View detailed results", "Token authentication", "Started a local Ray",
                  "Wrote the latest version"):
        assert noise not in r.stdout + r.stderr, noise
    first = read_rows(tmp_path / "fast" / "trials.csv")
    r = _run_cli(args, cwd=tmp_path)  # the job restarted after the search finished
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--resume auto: resuming" in r.stdout
    again = read_rows(tmp_path / "fast" / "trials.csv")
    assert [t["trial_id"] for t in again] == [t["trial_id"] for t in first] and len(first) == 1
    assert again[0]["status"] == "completed"
    # refusals happen before Ray starts: the command line's code, in process
    from ssam_tune.run import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["auto.yaml", "--storage", str(tmp_path / "ray2"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no experiment to resume" in err and "--resume auto starts it" in err
    assert main(["auto.yaml", "--address", "ray://head:10001"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "ray job submit" in err
    assert not (tmp_path / "results").exists()
