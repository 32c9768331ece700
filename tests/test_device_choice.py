"""Each process picks its device, dtype, backend and DeepSpeed accelerator from the resources it was
given, never from the driver's: a role given no GPU runs on the CPU even on a GPU node, and the
environment handed to actors carries no accelerator choice. The GPU side is proven with Ray's simulated
GPUs (a node may declare GPUs it lacks): Ray's assignment is real, CUDA is not, so the device a GPU rank
would take is checked through the pure `choose_device` with the ids Ray gave it."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from rlhf_ray import runtime
from rlhf_ray.runtime import choose_device, ds_accelerator, runtime_env_vars

pytestmark = pytest.mark.timeout(120)


def test_choose_device_follows_what_the_process_was_given():
    assert choose_device(None, False, 0, 0) == torch.device("cpu")  # no CUDA
    assert choose_device([], True, 0, 8) == torch.device("cpu")  # a Ray actor given no GPU, on a GPU node
    assert choose_device([5], True, 0, 1) == torch.device("cuda", 0)  # Ray shows the actor only its GPU
    assert choose_device([2, 3], True, 1, 2) == torch.device("cuda", 1)  # two GPUs: by local rank
    assert choose_device(None, True, 3, 8) == torch.device("cuda", 3)  # a driver or script on a GPU node


def test_deepspeed_accelerator_is_each_process_own():
    assert ds_accelerator(False, None) == "cpu"
    assert ds_accelerator(False, "cuda") == "cpu"
    assert ds_accelerator(True, "cpu") is None  # inherited from a CPU-only driver: DeepSpeed detects CUDA
    assert ds_accelerator(True, None) is None
    assert ds_accelerator(True, "npu") == "npu"  # what a user set on purpose stays


def test_actors_are_not_handed_the_drivers_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a driver on a CPU-only head
    env = runtime_env_vars()
    assert "DS_ACCELERATOR" not in env
    assert env["HF_HUB_OFFLINE"] == "1"  # what every process needs still travels


@ray.remote
class Probe:
    """Reports what a role's process sees and decides, with the options the placement code gives it."""

    def report(self) -> dict:
        runtime.setup_process_env()
        return {
            "gpu_ids": ray.get_gpu_ids(),
            "assigned": runtime.assigned_gpus(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(runtime.device()),
            "backend": runtime.dist_backend(),
            "accelerator": os.environ.get("DS_ACCELERATOR"),
        }


@pytest.mark.slow
def test_roles_decide_from_their_own_gpus(tmp_path):
    from tests.ray_fixtures import start_local_ray

    start_local_ray(num_cpus=4, num_gpus=2)  # a node that declares two GPUs it does not have
    try:
        cpu_role = ray.get(Probe.options(num_cpus=1, num_gpus=0).remote().report.remote(), timeout=60)
        ranks = ray.get([Probe.options(num_cpus=1, num_gpus=1).remote().report.remote() for _ in range(2)])
    finally:
        ray.shutdown()
    # a role that asked for no GPU: Ray gives it none and it runs on the CPU with gloo
    assert cpu_role["gpu_ids"] == [] and cpu_role["assigned"] == []
    assert cpu_role["device"] == "cpu" and cpu_role["backend"] == "gloo" and cpu_role["accelerator"] == "cpu"
    # two GPU ranks: one GPU each, each its own, visible to it alone; the device each takes is cuda:0 of
    # its own view (on this CPU host CUDA is absent, so the process itself stays on the CPU)
    assert sorted(r["assigned"][0] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["visible"] == str(r["assigned"][0])
        assert choose_device(r["assigned"], True, 0, 1) == torch.device("cuda", 0)
        expected = choose_device(
            r["assigned"], torch.cuda.is_available(), 0, max(torch.cuda.device_count(), 1)
        )
        assert r["device"] == str(expected)
