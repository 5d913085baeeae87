"""Exports of a finished (or interrupted) experiment: tables, the accuracy-versus-cost front,
runnable configs, a summary and TensorBoard logs.

    python -m ssam_tune.export EXPERIMENT_DIR [--out DIR] [--confirm CONFIRM_EXPERIMENT_DIR]

``EXPERIMENT_DIR`` is a Ray experiment written by ``python -m ssam_tune.run`` (``space.yaml``,
``optuna.journal`` and one ``trial_<id>/`` folder per trial); ``--out`` defaults to
``results/<space name>`` below the current directory. What is written there:

- ``trials.csv``: one row per trial (status, final and best-epoch metrics, FLOPs, wall time,
  every training-config key flattened to dotted columns, front membership);
- ``pareto.csv`` / ``pareto.json`` / ``pareto.png``: the non-dominated COMPLETED trials on
  (validation accuracy: max, the space's cost column ``tune.flops_metric``: min). Pruned,
  diverged and errored trials are never candidates (their numbers are not full fidelity).
  With ``tune.objective: single`` the front is still computed on the same two columns;
- ``best_config.yaml`` and ``configs/front_<k>_<label>.yaml``: training configs that
  ``python -m ssam_tune.train FILE`` runs as they are;
- ``summary.md``: settings, counts, the best trial, the front, failures and provenance;
- ``tensorboard/``: one run per trial with every per-epoch metric and an HParams summary.

Selection (front, best config) uses validation accuracy only; test accuracy is reported.
Every file is written atomically (temporary file, then ``os.replace``; folders are built
aside and swapped in) and the exports are a pure function of the experiment's files, so
exporting twice gives byte-identical files.

Package layout, one job per module: ``read`` (an experiment folder into rows), ``front`` (the
Pareto front, the best trial, the key hyper-parameters), ``plot`` (pareto.png),
``tensorboard``, ``summary`` (summary.md), ``confirm`` (the confirmation step), ``write``
(tables and configs as text), ``build`` (:func:`export_experiment`, which writes every file)
and ``cli``. Exports never import Ray: the Optuna study is read through
:mod:`ssam_tune.tuning.study`, and the folder's layout comes from :mod:`ssam_tune.storage.experiment`.
"""

from ssam_tune.export.build import export_experiment
from ssam_tune.export.cli import main
from ssam_tune.export.confirm import confirm_cases, export_confirmation
from ssam_tune.export.front import pareto_front
from ssam_tune.export.plot import plot_front
from ssam_tune.export.read import error_message, load_trials
from ssam_tune.export.tensorboard import write_tensorboard

__all__ = ["confirm_cases", "error_message", "export_confirmation", "export_experiment", "load_trials", "main",
           "pareto_front", "plot_front", "write_tensorboard"]
