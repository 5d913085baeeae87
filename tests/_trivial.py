"""The trivial trainable of the load tests (the search machinery without the training), and
what the tests add to it.

The trainable itself, its fake but deterministic metrics and the load-test space are
``benchmarks/_search_trivial.py`` (one copy for the tests and the search benchmarks; pytest
finds it through ``pythonpath`` in pyproject.toml). Ray workers import trainables by module
name, so both folders must be on the workers' ``PYTHONPATH``: :func:`worker_pythonpath`.
"""

from __future__ import annotations

import os

from _search_trivial import (  # noqa: F401 - re-exported for the test files
    BASELINES,
    final_accuracy,
    flops_per_epoch,
    load_space_dict,
    trivial_trainable,
)

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(os.path.dirname(HERE), "benchmarks")


def worker_pythonpath(environ: dict) -> str:
    """PYTHONPATH that lets Ray workers started from ``environ`` import this module and
    ``_search_trivial``."""
    ours = [HERE, BENCHMARKS]
    return os.pathsep.join(ours + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in ours])


def flaky_trainable(config: dict) -> None:
    """``trivial_trainable``, except that the trial labelled ``$SSAM_TEST_RAISE_LABEL`` raises
    after its second epoch (an errored trial that a later ``--resume`` retries)."""
    from ray import tune

    if config.get("ssam_tune", {}).get("label") == os.environ.get("SSAM_TEST_RAISE_LABEL"):
        for e in (1, 2):
            tune.report({"epoch": e, "val_acc": 0.1 * e, "flops_theoretical": 1e12 * e, "status": "running"})
        raise RuntimeError("injected failure")
    trivial_trainable(config)
