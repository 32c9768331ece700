"""Ray fixtures shared by the tests (registered as a pytest plugin in pyproject.toml).

Each module that needs Ray gets its own local cluster with a capped object store, and shuts down only
the cluster it started. Logical CPUs exceed the 2 physical cores on purpose: roles are processes that
mostly wait on each other, and every actor sizes its torch threads to the CPUs Ray gave it.
"""

from __future__ import annotations

import pytest
import ray

from rlhf_ray.runtime import runtime_env_vars

OBJECT_STORE_BYTES = 512 * 1024**2


def start_local_ray(num_cpus: int = 8, **kwargs) -> None:
    if ray.is_initialized():
        raise RuntimeError("a Ray session is already initialised in this process; tests start their own")
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
