"""The only place that touches private Optuna and Ray attributes.

Each function names the public behaviour it stands in for. They were written against
Optuna 5.0 and Ray 2.60 (the versions pyproject's lower bounds name and the tests run);
``tests/test_private.py`` exercises every one of them, so an upgrade that moves an attribute
fails there first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["asha_load_rungs", "asha_rungs", "optuna_set_intermediate", "optuna_set_user_attr",
           "optuna_trial", "quiet_train_reports", "trial_restore_checkpoint", "trial_set_restore_checkpoint"]


# -- Optuna: a trial addressed by number after its Trial object is gone (driver restart) ------
def _trial_id(study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def optuna_set_user_attr(study, number: int, key: str, value: Any) -> None:
    """``Trial.set_user_attr`` for the trial ``number`` of ``study``."""
    study._storage.set_trial_user_attr(_trial_id(study, number), key, value)


def optuna_set_intermediate(study, number: int, step: int, value: float) -> None:
    """``Trial.report`` (a learning-curve point for optuna-dashboard) for trial ``number``."""
    study._storage.set_trial_intermediate_value(_trial_id(study, number), step, value)


def optuna_trial(study, number: int):
    """The FrozenTrial ``number`` of ``study``, read from storage (``study.trials[number]``
    without copying every trial of a large study)."""
    return study._storage.get_trial(_trial_id(study, number))


# -- Ray Tune: ASHA's rung records (Tuner.restore rebuilds the scheduler from tuner.pkl) ------
def asha_rungs(scheduler) -> dict:
    """``{"rungs": [[(milestone, {trial id: value}), ...] per bracket], "num_stopped": int}``."""
    return {"rungs": [[(m, dict(rec)) for m, rec in b._rungs] for b in scheduler._brackets],
            "num_stopped": scheduler._num_stopped}


def asha_load_rungs(scheduler, state: dict) -> None:
    """Put records saved by :func:`asha_rungs` back into a freshly built scheduler."""
    for bracket, rungs in zip(scheduler._brackets, state["rungs"], strict=True):
        saved = dict(rungs)
        bracket._rungs = [(m, dict(saved.get(m, {}))) for m, _ in bracket._rungs]
    scheduler._num_stopped = state["num_stopped"]


# -- Ray Tune: the checkpoint a restored trial will resume from --------------------------------
def trial_restore_checkpoint(trial):
    """The checkpoint Ray will restore ``trial`` from (``Trial.checkpoint``), or None."""
    result = trial.latest_checkpoint_result
    return None if result is None else result.checkpoint


def trial_set_restore_checkpoint(trial, checkpoint) -> None:
    """Make Ray restore ``trial`` from ``checkpoint`` (a ``ray.tune.Checkpoint``) instead."""
    trial.latest_checkpoint_result.checkpoint = checkpoint


# -- Ray Train: the worker's INFO line per report ----------------------------------------------
def quiet_train_reports() -> str:
    """``RunConfig(logging_config=LoggingConfig(log_level="WARNING"))`` for the line that
    each worker logs per ``ray.train.report`` (the whole metrics dict): Ray Train 2.60 logs
    it on a logger named by its module's file path, which its "ray.train" level filter does
    not match. Returns the logger's name."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    return context.__file__
