"""Every private Optuna/Ray access of ``ssam_tune._private`` against the installed versions:
an upgrade that moves an attribute fails here first."""

import optuna

from ssam_tune import _private
from ssam_tune.study import close_orphans, open_study


def test_optuna_trial_access_by_number(tmp_path):
    study = open_study(str(tmp_path / "j.journal"), "s", "multi")
    a, b = study.ask(), study.ask()
    _private.optuna_set_user_attr(study, b.number, "status", "pruned")
    _private.optuna_set_intermediate(study, b.number, 3, 0.5)
    assert not _private.optuna_trial(study, b.number).state.is_finished()
    study.tell(b.number, state=optuna.trial.TrialState.PRUNED)
    assert _private.optuna_trial(study, b.number).state.is_finished()
    again = open_study(str(tmp_path / "j.journal"), "s", "multi")  # what a restarted driver sees
    t = again.trials[b.number]
    assert t.user_attrs == {"status": "pruned"} and t.intermediate_values == {3: 0.5}
    assert close_orphans(again, keep=set()) == 1  # a was left RUNNING
    t = open_study(str(tmp_path / "j.journal"), "s", "multi").trials[a.number]
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["status"] == "orphaned"


def test_asha_rungs_round_trip():
    from ray.tune.schedulers import ASHAScheduler

    def make():
        return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=9, grace_period=1,
                             reduction_factor=3)

    sched = make()
    state = _private.asha_rungs(sched)
    milestones = [m for m, _ in state["rungs"][0]]
    assert {1, 3} <= set(milestones) and state["num_stopped"] == 0
    state["rungs"][0] = [(m, {"t1": 0.5, "t2": 0.25} if m == 1 else {}) for m in milestones]
    state["num_stopped"] = 1
    fresh = make()
    _private.asha_load_rungs(fresh, state)
    assert _private.asha_rungs(fresh) == state
