"""Load: the whole search machinery (SsamSearcher + Optuna journal + MO-ASHA + exports)
on a real local Ray, driven by a trivial trainable (tests/_trivial.py): 100 trials, 4 at a
time. benchmarks/bench_load.py does 500 and measures memory and overhead.
"""

import json
import os
import time
from collections import Counter

import pytest
from _helpers import read_rows
from _trivial import BASELINES, flaky_trainable, load_space_dict, trivial_trainable, worker_pythonpath

from ssam_tune.tuning.study import open_study

N_SAMPLED = 97


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("objective", ["single", "multi"])
def test_errored_trial_then_resume_retries_it_in_a_fresh_optuna_trial(tmp_path, monkeypatch, objective):
    """An errored sampled trial, then --resume: Ray re-runs it; the driver must not die on
    the Optuna trial already told FAIL, and the study must end as trials.csv does."""
    import optuna

    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(os.environ))
    monkeypatch.chdir(tmp_path)
    data = load_space_dict("flaky", 4, baselines=[], concurrency=2)
    data["tune"].update(objective=objective, max_failures=0, scheduler="none")
    space = load_space(tmp_path / "flaky.yaml", data=data)
    storage = str(tmp_path / "ray")
    monkeypatch.setenv("SSAM_TEST_RAISE_LABEL", "optuna1")  # workers inherit it
    out = run_search(space, storage=storage, resume=False, results=str(tmp_path), trainable=flaky_trainable)
    rows = {t["label"]: t for t in read_rows(out / "trials.csv")}
    assert rows["optuna1"]["status"] == "errored"
    monkeypatch.delenv("SSAM_TEST_RAISE_LABEL")  # a fresh local Ray: its workers see no failure
    out = run_search(space, storage=storage, resume=True, results=str(tmp_path), trainable=flaky_trainable)
    rows = {t["label"]: t for t in read_rows(out / "trials.csv")}
    assert rows["optuna1"]["status"] == "completed" and rows["optuna1"]["optuna_status"] == "completed"
    study = open_study(str(tmp_path / "ray" / "flaky" / "optuna.journal"), "flaky", objective)
    tries = [t for t in study.trials if t.user_attrs.get("ray_trial_id") == rows["optuna1"]["trial_id"]]
    assert [t.state for t in tries] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert tries[1].user_attrs["retry_of"] == tries[0].number and tries[1].params == tries[0].params
    assert len(tries[1].values) == (1 if objective == "single" else 2)


@pytest.mark.usefixtures("shared_ray")
class TestOneRay:
    """Searches that share one local Ray, as a caller that started Ray itself gets: the
    search uses it and leaves it running (one Ray start-up for the class)."""

    @pytest.fixture(scope="class")
    @classmethod
    def shared_ray(cls):
        import ray

        from ssam_tune.tuning.tuner import init_ray

        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_ADDRESS")}
        os.environ.pop("RAY_ADDRESS", None)
        os.environ["PYTHONPATH"] = worker_pythonpath(os.environ)  # workers import _trivial
        init_ray(None)  # the runtime environment a search would start
        node = ray.get_runtime_context().get_node_id()
        yield node
        assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # still the one
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    @pytest.mark.slow
    @pytest.mark.timeout(600)
    def test_100_trials_four_at_a_time(self, tmp_path, monkeypatch):
        from ssam_tune.run import run_search
        from ssam_tune.tuning.space import load_space

        monkeypatch.chdir(tmp_path)
        space = load_space(tmp_path / "load.yaml", data=load_space_dict("load", N_SAMPLED))
        assert space.budget() == 100
        t0 = time.perf_counter()
        out = run_search(space, storage=str(tmp_path / "ray"), resume=False, results=str(tmp_path),
                         trainable=trivial_trainable)
        wall = time.perf_counter() - t0

        trials = read_rows(out / "trials.csv")
        ids = [t["trial_id"] for t in trials]
        assert len(ids) == len(set(ids)) == 100, f"{len(ids)} rows, {len(set(ids))} unique"
        statuses = Counter(t["status"] for t in trials)
        assert set(statuses) <= {"completed", "pruned"}, statuses
        assert statuses["pruned"] > 0 and statuses["completed"] > 0, statuses  # ASHA did stop some
        for t in trials:
            if t["label"] in BASELINES:  # anchors always run to full fidelity
                assert t["status"] == "completed" and int(t["epochs_reached"]) == 4
            if t["status"] == "completed":
                assert int(t["epochs_reached"]) == 4

        study = open_study(str(tmp_path / "ray" / "load" / "optuna.journal"), "load", "multi")
        states = Counter(t.state.name for t in study.trials)
        assert len(study.trials) == N_SAMPLED + len(BASELINES), states  # the anchors are in the study too
        assert states["RUNNING"] == 0 and set(states) <= {"COMPLETE", "PRUNED"}, states
        sampled = Counter(t["status"] for t in trials if t["kind"] == "search")
        assert states["COMPLETE"] == sampled["completed"] + len(BASELINES) and states["PRUNED"] == sampled["pruned"]
        assert study.metric_names == ["val_acc", "flops_theoretical"]

        front = read_rows(out / "pareto.csv")
        assert front and all(p["trial_id"] in set(ids) for p in front)
        # The trivial trainable's accuracy grows with rho and density, so the front is a real
        # trade-off: several full-fidelity points, none dominated by any completed trial.
        by_id = {t["trial_id"]: t for t in trials}
        pts = [(float(by_id[p["trial_id"]]["val_acc"]), float(by_id[p["trial_id"]]["flops_theoretical"]))
               for p in front]
        assert len(pts) >= 2
        assert all(by_id[p["trial_id"]]["status"] == "completed" for p in front)
        done = [(float(t["val_acc"]), float(t["flops_theoretical"])) for t in trials if t["status"] == "completed"]
        dominated = lambda a, b: b[0] >= a[0] and b[1] <= a[1] and b != a  # noqa: E731
        assert not any(dominated(a, b) for a in pts for b in done)
        # Optuna's own front is the exported one (anchors included, nothing below full fidelity)
        best = {t.user_attrs["ray_trial_id"] for t in study.best_trials}
        assert best == {p["trial_id"] for p in front}
        front_json = json.loads((out / "pareto.json").read_text())
        assert [p["trial_id"] for p in front_json["front"]] == [p["trial_id"] for p in front]
        print(f"\n100 trials (4 at a time, trivial trainable) in {wall:.1f} s: {dict(statuses)}, "
              f"front of {len(front)}")

    @pytest.mark.slow
    @pytest.mark.timeout(600)
    def test_search_ended_by_a_stopper_leaves_an_honest_study(self, tmp_path, monkeypatch):
        """Ray ends the running trials without telling the searcher when a stopper (or the time
        budget) ends the search: the study must still say what trials.csv says."""
        from ray.tune.stopper import Stopper

        from ssam_tune.run import run_search
        from ssam_tune.tuning.space import load_space

        class AfterResults(Stopper):  # ends the whole search after 30 results
            def __init__(self):
                self.n = 0

            def __call__(self, trial_id, result):
                self.n += 1
                return False

            def stop_all(self):
                return self.n >= 30

        monkeypatch.chdir(tmp_path)
        space = load_space(tmp_path / "stop.yaml", data=load_space_dict("stop", 40, baselines=["sgd"]))
        out = run_search(space, storage=str(tmp_path / "ray"), resume=False, results=str(tmp_path),
                         trainable=trivial_trainable, stop=AfterResults())
        rows = [t for t in read_rows(out / "trials.csv") if t["kind"] == "search"]
        assert len(rows) < 40 and {"completed", "pruned"} <= {t["status"] for t in rows}
        study = open_study(str(tmp_path / "ray" / "stop" / "optuna.journal"), "stop", "multi")
        by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.trials if t.user_attrs["kind"] == "search"}
        state_of = {"completed": "COMPLETE", "pruned": "PRUNED", "pending": "FAIL"}
        assert {t["trial_id"]: state_of[t["status"]] for t in rows} == \
            {k: t.state.name for k, t in by_ray.items() if k in {r["trial_id"] for r in rows}}
        assert all(t.user_attrs["status"] == r["status"] for r in rows for t in [by_ray[r["trial_id"]]])
        # trials Ray created but never started have no folder: FAIL, pending
        never = [t for k, t in by_ray.items() if k not in {r["trial_id"] for r in rows}]
        assert all(t.state.name == "FAIL" and t.user_attrs["status"] == "pending" for t in never)
        best = {t.user_attrs["ray_trial_id"] for t in study.best_trials}
        assert best == {p["trial_id"] for p in read_rows(out / "pareto.csv")}
