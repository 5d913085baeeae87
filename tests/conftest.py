"""Fixtures shared by the test files. Plain helper functions are in tests/_helpers.py; the
trivial trainable that Ray workers import by name stays in tests/_trivial.py."""

from __future__ import annotations

import pytest


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
