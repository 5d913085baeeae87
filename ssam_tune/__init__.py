"""ssam-tune: Sparse SAM (Mi et al., NeurIPS 2022) optimizers and a Ray Tune search suite.

Importing the package has no side effects. ``SAM`` and ``SSAM`` are loaded on first use, so
that the exports (``python -m ssam_tune.export``), which never train, do not import torch
(about 450 MiB of memory).
"""

__all__ = ["SAM", "SSAM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from ssam_tune import optim

        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
