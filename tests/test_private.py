"""Every private Optuna/Ray access of ``ssam_tune.tuning._private`` against the installed versions:
an upgrade that moves an attribute fails here first."""

import optuna

from ssam_tune.tuning import _private
from ssam_tune.tuning.study import close_orphans, open_study


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


def test_trial_restore_checkpoint_access(tmp_path):
    """What RestoreFromNewest reads and replaces on a real Ray Trial."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    trial = Trial("fn", stub=True)
    assert _private.trial_restore_checkpoint(trial) is None
    old, new = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000002"
    old.mkdir()
    new.mkdir()
    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=tune.Checkpoint(str(old)), metrics={"epoch": 1}))
    assert _private.trial_restore_checkpoint(trial).path == str(old)
    _private.trial_set_restore_checkpoint(trial, tune.Checkpoint(str(new)))
    assert trial.checkpoint.path == str(new)  # what Ray restores the trial from


def test_quiet_train_reports_names_the_logger_ray_train_reports_on():
    import logging

    from ray.train.v2._internal.execution import context

    name = _private.quiet_train_reports()
    assert context.logger.name == name  # the logger of "Reporting training result ..."
    assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    assert logging.getLogger(name).isEnabledFor(logging.WARNING)
