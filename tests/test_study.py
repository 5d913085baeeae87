"""The Optuna study the searcher keeps, driven through SsamSearcher's callbacks without the
Ray runtime: what it tells for each outcome, the anchors, the sampler across a restart, the
retry of an errored trial, and the sampler settings the space accepts."""

import optuna
import pytest
from _helpers import fast_space, write_ray_state, write_yaml

from ssam_tune.storage.experiment import Experiment
from ssam_tune.training.config import ConfigError
from ssam_tune.tuning.search import SsamSearcher, sampler_seed
from ssam_tune.tuning.space import load_space
from ssam_tune.tuning.study import open_study

EPOCHS = 4  # tests/spaces/fast.yaml


def make_space(tmp_path, objective="multi", sampler="tpe", baselines=False, num_samples=8, **tune):
    d = fast_space()
    d["tune"].update(objective=objective, sampler=sampler, baselines=baselines, num_samples=num_samples, **tune)
    if sampler != "tpe":
        d["tune"].pop("n_startup_trials")
    return load_space(write_yaml(tmp_path / "s.yaml", d))


def result(epoch, acc, status="running", flops=None):
    return {"epoch": epoch, "val_acc": acc, "status": status, "flops_theoretical": flops or 10.0 * epoch}


def study_of(space, tmp_path):
    return open_study(Experiment(str(tmp_path)).journal_path(), space.name, space.tune.objective)


def by_ray_id(study):
    return {t.user_attrs["ray_trial_id"]: t for t in study.trials}


def test_outcomes_diverged_and_errored_never_on_the_front(tmp_path):
    space = make_space(tmp_path)
    s = SsamSearcher(space, Experiment(str(tmp_path)))
    for tid in ("done", "div", "div0", "err", "cut"):
        assert s.suggest(tid)["ssam_tune"]["kind"] == "search"
    s.on_trial_result("done", result(1, 0.3))
    s.on_trial_complete("done", result(EPOCHS, 0.5, "completed"))
    s.on_trial_complete("done", result(EPOCHS, 0.9, "completed"))  # told once
    s.on_trial_complete("div", {"epoch": 1, "val_acc": 0.2, "status": "diverged", "flops_theoretical": 5.0})
    s.on_trial_complete("div0", {"epoch": 0, "val_acc": 0.0, "status": "diverged"})  # in its first epoch
    s.on_trial_complete("err", None, error=True)
    s.on_trial_complete("cut", result(2, 0.4))  # stopped at a rung
    trials = by_ray_id(study_of(space, tmp_path))
    S = optuna.trial.TrialState
    assert trials["done"].state == S.COMPLETE and trials["done"].values == [0.5, 40.0]
    for tid in ("div", "div0"):
        assert trials[tid].state == S.FAIL and trials[tid].user_attrs["status"] == "diverged"
    assert trials["err"].state == S.FAIL and trials["err"].user_attrs["status"] == "errored"
    assert trials["cut"].state == S.PRUNED and trials["cut"].user_attrs["epochs_reached"] == 2
    assert [t.user_attrs["ray_trial_id"] for t in study_of(space, tmp_path).best_trials] == ["done"]


def test_anchors_enter_the_study_once_with_names(tmp_path):
    space = make_space(tmp_path, baselines=["sgd", "sam", "ssam"])
    exp = Experiment(str(tmp_path))
    s = SsamSearcher(space, exp)
    labels = {tid: s.suggest(tid)["ssam_tune"]["label"] for tid in ("a", "b", "c", "x")}
    assert labels["x"].startswith("optuna")
    s._trials["a"]["started"] -= 30.0  # the sgd anchor started 30 s ago
    s.on_trial_result("a", result(1, 0.3))
    s.on_trial_result("x", result(1, 0.2))
    s.on_trial_complete("a", result(EPOCHS, 0.50, "completed", flops=40.0))  # sgd
    s.on_trial_complete("b", result(EPOCHS, 0.60, "completed", flops=80.0))  # sam
    s.on_trial_complete("c", {"epoch": 2, "val_acc": 0.1, "status": "diverged"})  # ssam
    s.on_trial_complete("x", result(EPOCHS, 0.55, "completed", flops=100.0))  # dominated by sam
    s.save(str(tmp_path / "searcher.pkl"))
    again = SsamSearcher(space, exp)  # a restarted driver sees the anchor finish once more
    again.restore(str(tmp_path / "searcher.pkl"))
    again._trials["a"]["done"] = False
    again.on_trial_complete("a", result(EPOCHS, 0.50, "completed", flops=40.0))
    study = study_of(space, tmp_path)
    assert study.metric_names == ["val_acc", "flops_theoretical"]
    trials = by_ray_id(study)
    assert len(study.trials) == 4
    assert trials["a"].user_attrs["label"] == "sgd" and trials["a"].values == [0.5, 40.0]
    assert trials["a"].user_attrs["baseline"] == {"method.name": "sgd"}
    # an anchor's real duration; the learning curves (optuna-dashboard) of completed trials,
    # written when they are told under objective multi
    assert trials["a"].duration.total_seconds() >= 30
    assert trials["a"].intermediate_values == {1: 0.3, EPOCHS: 0.5}
    assert trials["x"].intermediate_values == {1: 0.2, EPOCHS: 0.55}
    assert trials["c"].state == optuna.trial.TrialState.FAIL and trials["c"].user_attrs["status"] == "diverged"
    assert sorted(t.user_attrs["label"] for t in study.best_trials) == ["sam", "sgd"]


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2"])
def test_restarted_sampler_does_not_replay(tmp_path, sampler):
    """A killed driver's searcher comes back from an older checkpoint: it must not propose
    the configurations it proposed before the kill again."""
    space = make_space(tmp_path, sampler=sampler, num_samples=12)
    exp = Experiment(str(tmp_path))
    first = SsamSearcher(space, exp)
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last experiment checkpoint
    before = [first.suggest(f"t{i}")["ssam_tune"]["params"] for i in range(4)]
    second = SsamSearcher(space, exp)  # the resumed driver
    second.restore(str(tmp_path / "searcher.pkl"))
    after = [second.suggest(f"u{i}")["ssam_tune"]["params"] for i in range(4)]
    proposed = [tuple(sorted(p.items())) for p in before + after]
    assert len(set(proposed)) == 8, proposed
    # the orphans of the first driver are closed; a fresh study starts from the search seed
    states = [t.state.name for t in study_of(space, tmp_path).trials]
    assert states.count("FAIL") == 4 and states.count("RUNNING") == 4
    assert sampler_seed(7, 0) == 7 and sampler_seed(7, 4) != sampler_seed(7, 5)


def test_trials_lost_with_rays_state_are_asked_again(tmp_path):
    """A driver killed in the middle of Ray's upload left the searcher's state newer than the
    experiment state Ray restores: the trials asked since (an anchor and a sampled trial) are
    unknown to Ray and never run. The resumed searcher asks for them again instead of
    counting them as running (with max_concurrent_trials 2 the search waited for ever)."""
    space = make_space(tmp_path, sampler="random", baselines=["sgd", "sam", "ssam"], num_samples=2)
    exp = Experiment(str(tmp_path))
    s = SsamSearcher(space, exp)
    s.set_max_concurrency(2)
    assert [s.suggest(t)["ssam_tune"]["label"] for t in ("a", "b")] == ["sgd", "sam"]
    s.on_trial_complete("a", result(EPOCHS, 0.50, "completed"))
    s.on_trial_complete("b", result(EPOCHS, 0.60, "completed"))
    lost = s.suggest("c")["ssam_tune"]["label"], s.suggest("x")["ssam_tune"]
    s.on_trial_result("x", result(1, 0.3))
    s.save(str(tmp_path / "searcher.pkl"))  # uploaded; the experiment state of that moment was not
    write_ray_state(tmp_path, {"a": "RUNNING", "b": "RUNNING"})  # the stored one: before a and b finished
    again = SsamSearcher(space, exp)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_result("a", result(4, 0.50))  # Ray runs a and b again from their checkpoints
    again.on_trial_result("b", result(4, 0.60))
    assert again.suggest("n1") is None  # two running: the limit
    again.on_trial_complete("a", result(EPOCHS, 0.50, "completed"))
    again.on_trial_complete("b", result(EPOCHS, 0.60, "completed"))
    asked = [again.suggest(t) for t in ("n1", "n2")]
    assert asked[0]["ssam_tune"]["label"] == lost[0] == "ssam"
    assert asked[1]["ssam_tune"]["kind"] == "search" and asked[1]["ssam_tune"]["params"] != lost[1]["params"]
    again.on_trial_complete("n1", result(EPOCHS, 0.55, "completed"))
    assert again.suggest("n3")["ssam_tune"]["kind"] == "search"  # the second sample of num_samples 2
    again.on_trial_complete("n2", result(2, 0.4))
    assert again.suggest("n4") == again.FINISHED
    study = {t.user_attrs["ray_trial_id"]: t for t in study_of(space, tmp_path).trials}
    assert study["x"].state == optuna.trial.TrialState.FAIL and study["x"].user_attrs["status"] == "orphaned"
    assert study["n2"].state == optuna.trial.TrialState.PRUNED
    assert study["n3"].state == optuna.trial.TrialState.RUNNING
    assert sorted(t.user_attrs["label"] for t in study.values() if t.user_attrs["kind"] == "baseline") == \
        ["sam", "sgd", "ssam"]


@pytest.mark.parametrize("objective", ["single", "multi"])
def test_errored_trial_retried_on_resume_gets_a_fresh_trial(tmp_path, objective):
    space = make_space(tmp_path, objective=objective)
    exp = Experiment(str(tmp_path))
    s = SsamSearcher(space, exp)
    config = s.suggest("t1")
    s.on_trial_result("t1", result(1, 0.3))
    s.on_trial_complete("t1", None, error=True)
    s.save(str(tmp_path / "searcher.pkl"))
    # --resume: Ray re-runs the errored trial with the same config, from its checkpoint
    again = SsamSearcher(space, exp)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.suggest("t1") == config
    again.on_trial_result("t1", result(2, 0.4))
    again.on_trial_result("t1", result(3, 0.45))
    again.on_trial_complete("t1", result(EPOCHS, 0.5, "completed"))
    study = study_of(space, tmp_path)
    old, new = study.trials
    assert old.state == optuna.trial.TrialState.FAIL and old.user_attrs["status"] == "errored"
    assert new.state == optuna.trial.TrialState.COMPLETE and new.user_attrs["status"] == "completed"
    assert new.params == old.params and new.user_attrs["retry_of"] == old.number
    assert new.user_attrs["ray_trial_id"] == "t1"
    assert new.values == ([0.5] if objective == "single" else [0.5, 40.0])
    # single: written live, so the retry's own epochs; multi: the whole curve at the end
    # (and the final epoch's, which Ray may hand only to on_trial_complete)
    assert new.intermediate_values == ({2: 0.4, 3: 0.45, EPOCHS: 0.5} if objective == "single"
                                       else {1: 0.3, 2: 0.4, 3: 0.45, EPOCHS: 0.5})
    assert config["ssam_tune"]["optuna_number"] == old.number  # the bookkeeping moves with it
    assert again.suggest("t1")["ssam_tune"]["optuna_number"] == new.number


def test_searcher_callbacks_never_raise(tmp_path, caplog):
    space = make_space(tmp_path, objective="single")
    s = SsamSearcher(space, Experiment(str(tmp_path)))
    s.suggest("t1")
    s.study.tell(s._trials["t1"]["number"], [0.1])  # finished behind the searcher's back
    s.on_trial_result("t1", result(1, 0.3))  # an intermediate value for a finished trial
    s.on_trial_complete("t1", result(EPOCHS, 0.5, "completed"))
    assert "Optuna study not updated for Ray trial t1" in caplog.text


def test_sampler_settings_follow_the_sampler(tmp_path):
    d = fast_space()
    d["tune"]["sampler"] = "nsga2"  # n_startup_trials: 3 is in fast.yaml
    with pytest.raises(ConfigError, match=r"tune.n_startup_trials: only applies to sampler tpe; sampler nsga2"):
        load_space(write_yaml(tmp_path / "a.yaml", d))
    d = fast_space()
    d["tune"]["population_size"] = 8
    with pytest.raises(ConfigError, match=r"tune.population_size: only applies to sampler nsga2"):
        load_space(write_yaml(tmp_path / "b.yaml", d))
    # the default population comes from the budget: four generations of full-fidelity trials
    d = fast_space()
    d["tune"].update(sampler="nsga2", num_samples=200)
    d["tune"].pop("n_startup_trials")
    d["train"]["epochs"] = 9
    d["tune"]["scheduler"] = {"type": "mo_asha", "grace_period": 1, "reduction_factor": 3}
    t = load_space(write_yaml(tmp_path / "c.yaml", d)).tune
    assert t.rungs(9) == [1, 3] and t.expected_full_runs(9) == pytest.approx(200 / 9)
    assert t.population_size == 5 and t.generations(9) == 4
    assert "population 5" in t.describe_sampler(9) and "4 generation(s)" in t.describe_sampler(9)


def test_dry_run_warns_when_nsga2_cannot_leave_generation_zero(tmp_path):
    from ssam_tune.run import describe

    space = make_space(tmp_path, sampler="nsga2", num_samples=8)  # 4 epochs, rungs 1 and 2, rf 2
    text = describe(space)
    assert space.tune.population_size == 2 and space.tune.generations(EPOCHS) == 1
    assert "sampler: nsga2 (seed 0, population 2; about 2 full-fidelity trials expected: 1 generation(s))" in text
    assert "warning: the budget fills 1 NSGA-II generation(s) of 2; below 2 it is random search" in text
    assert "start-up" not in text
    assert "warning" not in describe(make_space(tmp_path, sampler="nsga2", num_samples=40))


def test_settle_tells_running_trials_how_they_ended(tmp_path):
    from ssam_tune.tuning.study import settle

    space = make_space(tmp_path)
    s = SsamSearcher(space, Experiment(str(tmp_path)))
    for tid in ("full", "cut", "never", "lost"):
        s.suggest(tid)
    s.study.tell(s._trials["lost"]["number"], state=optuna.trial.TrialState.PRUNED)  # already told: left alone
    extra = s.study.ask()  # asked by a driver that was killed before Ray recorded it
    outcomes = {"full": ("completed", EPOCHS, [0.5, 40.0]), "cut": ("pruned", 2, None), "never": ("pending", 0, None),
                "lost": ("completed", EPOCHS, [0.9, 1.0])}
    assert settle(s.study, outcomes) == 4
    trials = study_of(space, tmp_path).trials
    got = {t.user_attrs.get("ray_trial_id", "extra"): (t.state.name, t.user_attrs.get("status")) for t in trials}
    assert got == {"full": ("COMPLETE", "completed"), "cut": ("PRUNED", "pruned"), "never": ("FAIL", "pending"),
                   "lost": ("PRUNED", None), "extra": ("FAIL", "pending")}
    assert trials[extra.number].user_attrs["status"] == "pending"


def test_a_space_stored_by_an_older_version_still_loads(tmp_path):
    """Older versions wrote n_startup_trials whatever the sampler: a stored space.yaml with
    it must still load on --resume and export, while a user's YAML with it is refused."""
    d = fast_space()
    d["tune"]["sampler"] = "nsga2"  # fast.yaml has n_startup_trials: 3
    path = write_yaml(tmp_path / "space.yaml", d)
    with pytest.raises(ConfigError, match="n_startup_trials"):
        load_space(path)
    space = load_space(path, stored=True)
    assert space.tune.sampler == "nsga2" and space.tune.population_size >= 2

    from ssam_tune.export.read import load_space_file

    assert load_space_file(path).tune.sampler == "nsga2"


def test_experiments_of_older_versions_resume(tmp_path):
    """tuner.pkl of an older version names ssam_tune.search.AnchoredASHA / RungStateCallback,
    and its searcher's settings lack population_size."""
    import pickle

    from ssam_tune.tuning import schedulers

    for name in ("AnchoredASHA", "RungStateCallback"):
        assert pickle.loads(f"cssam_tune.search\n{name}\n.".encode()) is getattr(schedulers, name)  # noqa: S301
    space = make_space(tmp_path, sampler="nsga2")
    old = SsamSearcher(space, Experiment(str(tmp_path)))
    del old.space.tune.population_size
    old.save(str(tmp_path / "searcher.pkl"))
    again = SsamSearcher(make_space(tmp_path, sampler="nsga2"), Experiment(str(tmp_path)))
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.suggest("t1")["ssam_tune"]["kind"] == "search"
    assert again.study.sampler.population_size == 50  # what older versions ran with


def test_errored_anchor_rerun_on_resume_enters_the_study(tmp_path):
    space = make_space(tmp_path, baselines=["sgd"])
    exp = Experiment(str(tmp_path))
    s = SsamSearcher(space, exp)
    s.suggest("a")
    s.on_trial_complete("a", None, error=True)
    s.save(str(tmp_path / "searcher.pkl"))
    again = SsamSearcher(space, exp)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_result("a", result(1, 0.3))
    again.on_trial_complete("a", result(EPOCHS, 0.5, "completed"))
    study = study_of(space, tmp_path)
    assert [(t.state.name, t.user_attrs["status"]) for t in study.trials] == [("FAIL", "errored"),
                                                                              ("COMPLETE", "completed")]
    assert [t.user_attrs["label"] for t in study.best_trials] == ["sgd"]


def test_errored_trial_stopped_at_its_first_result_after_resume_is_pruned(tmp_path):
    """Ray does not pass a result it stops a trial on to the searcher: the retry must also
    happen when only the completion arrives."""
    space = make_space(tmp_path)
    exp = Experiment(str(tmp_path))
    s = SsamSearcher(space, exp)
    s.suggest("t1")
    s.on_trial_complete("t1", None, error=True)
    s.save(str(tmp_path / "searcher.pkl"))
    again = SsamSearcher(space, exp)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_complete("t1", result(1, 0.2))  # pruned at the first rung
    old, new = study_of(space, tmp_path).trials
    assert (old.state.name, old.user_attrs["status"]) == ("FAIL", "errored")
    assert (new.state.name, new.user_attrs["status"], new.user_attrs["retry_of"]) == ("PRUNED", "pruned", 0)


def test_enqueued_configs_are_the_first_proposals_then_the_sampler(tmp_path):
    first = [{"method.name": "ssam_f", "method.sparsity": 0.9, "method.rho": 0.1, "method.N_F": 16},
             {"method": {"name": "ssam_d", "sparsity": 0.5}}]  # nested like the YAML's sections; rho is sampled
    space = make_space(tmp_path, num_samples=4, enqueue=first)
    assert space.tune.enqueue[1] == {"method.name": "ssam_d", "method.sparsity": 0.5}
    assert "2 enqueued configs (tune.enqueue), then tpe" in space.tune.describe_sampler(space.epochs)
    s = SsamSearcher(space, Experiment(str(tmp_path)))
    proposals = [s.suggest(f"t{i}")["ssam_tune"]["params"] for i in range(4)]
    assert proposals[0] == first[0]
    assert proposals[1]["method.name"] == "ssam_d" and proposals[1]["method.sparsity"] == 0.5
    assert 0.02 <= proposals[1]["method.rho"] <= 0.5 and set(proposals[1]) == {"method.name", "method.sparsity",
                                                                              "method.rho"}
    assert [t.user_attrs.get("enqueued") for t in study_of(space, tmp_path).trials] == [0, 1, None, None]


def test_enqueue_refuses_what_the_space_cannot_propose(tmp_path):
    cases = [
        ([{"method.sparsity": 0.9}], "tune.enqueue[0]: must give method.name"),
        ([{"method.name": "sgd"}], "tune.enqueue[0].method.name: must be one of the searched values"),
        ([{"method.name": "sam", "method.rho": 0.9}], "tune.enqueue[0].method.rho: must lie in the searched range"),
        ([{"method.name": "sam", "method.sparsity": 0.9}], "tune.enqueue[0].method.sparsity: does not apply to "
                                                          "method sam"),
        ([{"method.name": "sam", "train.lr": 0.1}], "tune.enqueue[0].train.lr: is not a searched key"),
        (["ssam_f"], "tune.enqueue[0]: must be a non-empty mapping"),
    ]
    for entries, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_space(tmp_path, enqueue=entries)


def test_tpe_keeps_sampling_after_pruned_trials_under_two_objectives(tmp_path):
    """Pruned trials in a multi-objective study: TPE ranks them by their intermediate values
    through study.direction, which raises for two objectives; the searcher writes them only
    for completed trials there."""
    space = make_space(tmp_path, n_startup_trials=1, num_samples=8)
    s = SsamSearcher(space, Experiment(str(tmp_path)))
    for i in range(4):
        tid = f"t{i}"
        s.suggest(tid)
        s.on_trial_result(tid, result(1, 0.2 + i / 100))
        s.on_trial_complete(tid, result(1, 0.2 + i / 100))  # stopped at epoch 1: PRUNED
    s.suggest("t4")
    for e in range(1, EPOCHS):
        s.on_trial_result("t4", result(e, 0.1 * e))
    s.on_trial_complete("t4", result(EPOCHS, 0.5, "completed"))
    trials = study_of(space, tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 4 + [optuna.trial.TrialState.COMPLETE]
    assert all(t.intermediate_values == {} for t in trials[:4])
    assert trials[4].intermediate_values == {**{e: 0.1 * e for e in range(1, EPOCHS)}, EPOCHS: 0.5}
    assert s.suggest("t9")["ssam_tune"]["optuna_number"] == 5  # TPE past its start-up: no RuntimeError
