"""ssam-tune: Sparse SAM (Mi et al., NeurIPS 2022) optimizers and a Ray Tune search suite.

The folders are the layers, each importing only from those below it (``make lint`` checks
it with import-linter, contracts in pyproject.toml):

    run.py, train.py   the command lines (python -m ssam_tune.run / .train)
    export/            results: trials.csv, the front, plots, TensorBoard, summary (no Ray)
    tuning/            the search: spaces, Optuna study, searcher, schedulers, Ray trainable
    training/          one training run: config, models, data, batches, Trainer, data parallel
    method/            the method: SAM/SSAM optimizers, masks, Fisher scores, FLOPs
    storage/           the experiment folder's layout and atomic writes

``SAM`` and ``SSAM`` (the optimizers) and ``tune`` (a search from Python, returning a
``SearchResult``) are loaded on first use, so that the exports, which never train, do not
import torch. The one thing importing the package does is to let the module paths of the
flat layout before these folders resolve (``_compat.py``: old experiments' pickles and old
imports such as ``ssam_tune.optim``).
"""

from ssam_tune import _compat

__all__ = ["SAM", "SSAM", "SearchResult", "tune"]
__version__ = "0.1.0"

_compat.install()


def __getattr__(name: str):
    if name in ("SAM", "SSAM"):
        from ssam_tune.method import optim

        return getattr(optim, name)
    if name in ("SearchResult", "tune"):
        from ssam_tune import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
