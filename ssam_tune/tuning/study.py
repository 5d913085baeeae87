"""The Optuna study of a search: where it is stored and how its trials are closed.

Optuna only, no Ray: the search (``search.py``) writes the study, the exports read it. The
study is a journal file (``JournalFileBackend`` with an open-lock, which works on NFS too);
:meth:`ssam_tune.storage.experiment.Experiment.journal_path` says where it lives.
"""

from __future__ import annotations

import warnings

import optuna

from ssam_tune.tuning import _private

__all__ = ["close_orphans", "directions", "metric_names", "objective_values", "open_study",
           "record", "settle"]

# a trial's status (as trials.csv says it) -> the Optuna state it is told
STATES = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
          "diverged": optuna.trial.TrialState.FAIL, "errored": optuna.trial.TrialState.FAIL,
          "pending": optuna.trial.TrialState.FAIL, "orphaned": optuna.trial.TrialState.FAIL}


def directions(objective: str) -> list[str]:
    """Validation accuracy is maximised; with ``objective: multi`` the cost is minimised too."""
    return ["maximize"] if objective == "single" else ["maximize", "minimize"]


def metric_names(objective: str, cost_metric: str = "flops_theoretical") -> list[str]:
    """The objectives' names as optuna-dashboard shows them."""
    return ["val_acc"] if objective == "single" else ["val_acc", cost_metric]


def open_study(journal_path: str, name: str, objective: str, cost_metric: str | None = None,
               sampler=None) -> optuna.Study:
    """Open (or create) the study ``name`` in the journal file ``journal_path``. With
    ``cost_metric`` a study without objective names gets them (a reader leaves them alone)."""
    from pathlib import Path

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    Path(journal_path).parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(journal_path, lock_obj=JournalFileOpenLock(journal_path))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Using an existing study" chatter
    study = optuna.create_study(storage=JournalStorage(backend), study_name=name,
                                directions=directions(objective), sampler=sampler, load_if_exists=True)
    if cost_metric is not None and study.metric_names is None:
        with warnings.catch_warnings():  # "experimental since 3.2": stable in use, and only a label
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(objective, cost_metric))
    return study


def objective_values(objective: str, metrics: dict, cost_metric: str) -> list[float] | None:
    """A trial's values for the study from its metrics (a result or a trials.csv row): [val_acc]
    or [val_acc, cost]; None when one is missing."""
    acc, cost = metrics.get("val_acc"), metrics.get(cost_metric)
    if acc is None or (objective == "multi" and cost is None):
        return None
    return [float(acc)] if objective == "single" else [float(acc), float(cost)]


def record(study: optuna.Study, number: int, status: str, epochs_reached: int,
           values: list[float] | None = None) -> None:
    """Tell Optuna how trial ``number`` ended, once, with the user attribute ``status``:
    completed -> COMPLETE with ``values`` (full fidelity only); pruned (stopped early by the
    scheduler, the time budget or a stopper) -> PRUNED, since a truncated accuracy is not a
    final value; diverged, errored, pending (never started), orphaned -> FAIL, so that none
    is ever a point of a front (a diverged trial would be the cheapest one)."""
    if _private.optuna_trial(study, number).state.is_finished():
        return
    state = STATES[status]
    if state == optuna.trial.TrialState.COMPLETE and values is None:
        status, state = "pruned", optuna.trial.TrialState.PRUNED
    _private.optuna_set_user_attr(study, number, "status", status)
    if status != "completed":
        _private.optuna_set_user_attr(study, number, "epochs_reached", int(epochs_reached))
    if state == optuna.trial.TrialState.COMPLETE:
        study.tell(number, values)
    else:
        study.tell(number, state=state)


def settle(study: optuna.Study, outcomes: dict[str, tuple[str, int, list[float] | None]]) -> int:
    """After ``fit()``: tell the trials still RUNNING how they ended, from ``outcomes`` (Ray
    trial id -> (status, epochs reached, values) as the exports read them). Ray ends trials
    without telling the searcher when a stopper or the time budget ends the search. A trial
    without an outcome never reported a result (it never started, or a killed driver asked
    for it before Ray recorded it): it is FAIL, ``pending``. Returns how many were told."""
    told = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        status, epochs, values = outcomes.get(str(trial.user_attrs.get("ray_trial_id")), ("pending", 0, None))
        record(study, trial.number, status, epochs, values)
        told += 1
    return told


def close_orphans(study: optuna.Study, keep: set[int] = frozenset()) -> int:
    """Mark the study's RUNNING trials (except the numbers in ``keep``) failed, with
    ``status=orphaned``: they were asked by a driver killed before Ray recorded them."""
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number not in keep:
            record(study, trial.number, "orphaned", 0)
            closed += 1
    return closed
