"""Fixtures shared by the test files, and the test tiers. Plain helper functions are in
tests/_helpers.py; the trainables that Ray workers import by name are in tests/_trivial.py
and benchmarks/_search_trivial.py.

Tiers: a test that starts Ray (in process or in a ``python -m ssam_tune.run`` subprocess)
is marked ``e2e`` here, from its source and its fixtures' sources, so nobody has to
remember to; ``make test-fast`` runs ``-m "not e2e and not slow"``, ``make test`` runs
everything. A test left unmarked that starts Ray (in process or in a subprocess) fails (the
check after each fast test), so the fast tier cannot quietly grow a Ray start-up.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
import tempfile

import pytest

# What starts Ray: a search in process or as a subprocess (a --dry-run subprocess does not),
# a Ray cluster, a Tuner, a Ray Train run.
_STARTS_RAY = re.compile(
    r"\brun_search\(|\bstart_driver\(|\b_run_cli\(|\bray\.init\(|\bray_cluster\b|\bray_local\b|\bshared_ray\b|"
    r"\bTuner\(|\bTorchTrainer\(|\b_?init_ray\(|\bssam_tune\.tune\(|"
    r"run_module\(\s*\"(?:ssam_tune\.run|driver)\"(?!.*--dry-run)")


def _source(func) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def _sources(item) -> str:
    """The source of the test function, of every fixture it uses from the tests' files, and of
    the test module's own functions that these call (one level: helpers such as ``_run``)."""
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs if "/tests/" in getattr(getattr(d.func, "__code__", None), "co_filename", "")]
    text = "\n".join(_source(f) for f in funcs)
    module = getattr(item, "module", None)
    own = {name for name, f in vars(module).items()
           if inspect.isfunction(f) and f.__module__ == module.__name__} if module else set()
    helpers = own & set(re.findall(r"\b(\w+)\(", text))
    return text + "\n".join(_source(getattr(module, name)) for name in sorted(helpers))


def _ray_sessions() -> set[str]:
    """Ray's session folders (every Ray start, in this process or a subprocess, makes one)."""
    root = os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray")
    try:
        return {n for n in os.listdir(root) if n.startswith("session_2")}
    except OSError:
        return set()


def pytest_configure(config):
    # Ray's session folders of this test run in a folder of its own: the check that a fast test
    # started no Ray is then blind to other Ray instances on the machine. Short (Ray's socket
    # paths must fit in 107 bytes). Under pytest-xdist each worker gets its own (the workers
    # inherit the controller's environment), so a fast test on one worker does not see the Ray
    # that an e2e test on the other started.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if "RAY_TMPDIR" not in os.environ or (worker and os.environ.get("SSAM_TUNE_TEST_RAY_TMPDIR")):
        config._ray_tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(
            prefix=f"rt{worker or ''}", dir="/tmp" if os.path.isdir("/tmp") else None)
        os.environ["SSAM_TUNE_TEST_RAY_TMPDIR"] = "1"  # ours, not the user's: workers make their own


def pytest_unconfigure(config):
    if getattr(config, "_ray_tmpdir", None):
        shutil.rmtree(config._ray_tmpdir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") is None and _STARTS_RAY.search(_sources(item)):
            item.add_marker(pytest.mark.e2e)
        # `make test` runs two pytest-xdist workers with --dist loadgroup: the e2e tests one
        # after the other on one worker (one Ray at a time, as on a user's laptop; kill points
        # and timeouts sized for that), the rest on both, alongside.
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.xdist_group("e2e"))


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request):
    """A test not marked e2e must start no Ray, in this process or in a subprocess."""
    fast = request.node.get_closest_marker("e2e") is None
    before = _ray_sessions() if fast else set()
    yield
    if not fast:
        return
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("this test started Ray: mark it e2e (or teach tests/conftest.py's _STARTS_RAY)")
    if _ray_sessions() - before:
        pytest.fail("this test started Ray in a subprocess: mark it e2e (or teach tests/conftest.py's _STARTS_RAY)")


@pytest.fixture(scope="module")
def embedded():
    """The embedded CIFAR-10 subset, split as the Trainer splits it (val_fraction 0.1, seed 0).
    One load per test module; tests only read it."""
    from ssam_tune.training.data import load_dataset

    return load_dataset("embedded", val_fraction=0.1, seed=0)


@pytest.fixture
def ray_cluster():
    """A factory for local multi-node Ray clusters (``ray.cluster_utils.Cluster``), each shut
    down when the test ends::

        cluster = ray_cluster({"num_cpus": 0}, workers=[{"num_cpus": 2}] * 2)
    """
    from ray.cluster_utils import Cluster

    started: list[Cluster] = []

    def start(head_node_args: dict, workers: list[dict] = ()) -> Cluster:
        cluster = Cluster(initialize_head=True, head_node_args=head_node_args)
        started.append(cluster)
        for node_args in workers:
            cluster.add_node(**node_args)
        if workers:
            cluster.wait_for_nodes()
        return cluster

    yield start
    for cluster in reversed(started):
        cluster.shutdown()
