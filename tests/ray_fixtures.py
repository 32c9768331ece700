"""Ray fixtures shared by the tests (registered as a pytest plugin in pyproject.toml).

Each module that needs Ray gets its own local cluster with a capped object store, and shuts down only
the cluster it started. Logical CPUs exceed the 2 physical cores on purpose: roles are processes that
mostly wait on each other, and every actor sizes its torch threads to the CPUs Ray gave it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from rlhf_ray.runtime import runtime_env_vars

OBJECT_STORE_BYTES = 512 * 1024**2


def _require_no_ray() -> None:
    if ray.is_initialized():
        raise RuntimeError("a Ray session is already initialised in this process; tests start their own")


def start_local_ray(num_cpus: int = 8, **kwargs) -> None:
    _require_no_ray()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": runtime_env_vars()},
        **kwargs,
    )


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster for one test module."""
    start_local_ray()
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_cluster(**head_node_args) -> Iterator[Cluster]:
    """A `ray.cluster_utils.Cluster` of local raylets (the head made from `head_node_args`, no dashboard;
    add worker nodes with `add_node`) with this process connected to it; both shut down on exit."""
    _require_no_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head_node_args})
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": runtime_env_vars()})
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
