"""The Optuna study of a search: where it is stored and how its trials are closed.

Optuna only, no Ray: the search (``search.py``) writes the study, the exports read it. The
study is a journal file (``JournalFileBackend`` with an open-lock, which works on NFS too);
:meth:`ssam_tune.experiment.Experiment.journal_path` says where it lives.
"""

from __future__ import annotations

import warnings

import optuna

from ssam_tune import _private

__all__ = ["close_orphans", "directions", "metric_names", "open_study"]


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


def close_orphans(study: optuna.Study, keep: set[int] = frozenset()) -> int:
    """Mark the study's RUNNING trials (except the numbers in ``keep``) failed, with
    ``status=orphaned``: they were asked by a driver killed before Ray recorded them."""
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number not in keep:
            _private.optuna_set_user_attr(study, trial.number, "status", "orphaned")
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            closed += 1
    return closed
