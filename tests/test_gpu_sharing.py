"""The colocated GPU-sharing schedule (`rlhf_ray.trainer.gpu_sharing`), driven the way the RL loop drives
it. vLLM's sleep mode and DeepSpeed's state offload need CUDA, so the engines and the policy group are
recording stand-ins at that one seam: what is proven here is the order of the calls, which is what a GPU
run's memory depends on (the calls themselves run in `python -m bench.gpu_check`)."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_ray.trainer.gpu_sharing import Engines, GpuSharing

pytestmark = pytest.mark.timeout(30)


class _Method:
    def __init__(self, log: list[str], name: str):
        self.log, self.name = log, name

    def remote(self, *args: Any) -> str:
        self.log.append(self.name + (f"{args[0]}" if args else ""))
        return self.name


class _Engine:
    def __init__(self, log: list[str], index: int):
        self.wake_up = _Method(log, f"engine{index}.wake_up")
        self.sleep = _Method(log, f"engine{index}.sleep")


class _Group:
    def __init__(self, log: list[str]):
        self.log = log

    def call(self, method: str) -> list[str]:
        self.log.append(f"policy.{method}")
        return [method, method]  # two ranks


class _Policy:
    def __init__(self, log: list[str]):
        self.group = _Group(log)


class _Roles:
    def __init__(self, log: list[str], engines: int = 2):
        self.engines = [_Engine(log, i) for i in range(engines)]
        self.policy = _Policy(log)


def _step(sharing: GpuSharing, log: list[str], evaluate: bool = False, checkpoint: bool = False) -> None:
    """One RL step as `PPOTrainer` runs it: generate, score, train, sync; then evaluation, checkpoint."""
    sharing.before_generate()
    log.append("generate")
    sharing.before_scoring()
    log.append("score")
    log.append("train")
    sharing.before_sync()
    log.append("sync")
    sharing.after_sync()
    if evaluate:
        sharing.before_generate()
        log.append("evaluate")
    if checkpoint:
        sharing.trainer_resident()
        log.append("checkpoint")


def _sharing(log: list[str], sleep: bool, offload: bool, asleep: bool) -> GpuSharing:
    return GpuSharing(_Roles(log), sleep, offload, 60.0, asleep=asleep, wait=lambda calls, timeout: calls)


def test_hybrid_engine_schedule_frees_the_gpu_for_each_phase():
    log: list[str] = []
    sharing = _sharing(
        log, sleep=True, offload=True, asleep=True
    )  # engines slept at start, before the trainer
    _step(sharing, log)
    _step(sharing, log, evaluate=True, checkpoint=True)
    _step(sharing, log)
    wake_w = ["engine0.wake_up['weights']", "engine1.wake_up['weights']"]
    wake_kv = ["engine0.wake_up['kv_cache']", "engine1.wake_up['kv_cache']"]
    sleep = ["engine0.sleep", "engine1.sleep"]
    first = ["policy.offload_states", *wake_w, *wake_kv, "generate", *sleep, "policy.reload_states"]
    # later steps: the sync needs only the weights resident, the KV cache comes back after it
    after_train = ["train", "policy.offload_states", *wake_w, "sync", *wake_kv]
    assert log == [
        *first,
        "score",
        *after_train,
        "generate",  # awake since the sync: nothing to do
        *sleep,
        "policy.reload_states",
        "score",
        *after_train,
        "evaluate",  # still awake
        "policy.reload_states",  # a checkpoint saves the optimizer states from where DeepSpeed keeps them
        "checkpoint",
        "policy.offload_states",
        "generate",
        *sleep,
        "policy.reload_states",
        "score",
        *after_train,
    ]
    assert sharing.engines is Engines.AWAKE and sharing.trainer_offloaded


def test_sleep_alone_and_offload_alone():
    log: list[str] = []
    _step(_sharing(log, sleep=True, offload=False, asleep=True), log)
    assert not any(entry.startswith("policy.") for entry in log)
    assert log.index("engine0.sleep") == log.index("generate") + 1
    log.clear()
    _step(_sharing(log, sleep=False, offload=True, asleep=False), log)
    offload, reload = "policy.offload_states", "policy.reload_states"
    assert log == [offload, "generate", reload, "score", "train", offload, "sync"]


def test_nothing_is_called_without_sharing_and_everything_again_after_a_recovery():
    log: list[str] = []
    sharing = _sharing(log, sleep=False, offload=False, asleep=False)
    _step(sharing, log, evaluate=True, checkpoint=True)
    assert log == ["generate", "score", "train", "sync", "evaluate", "checkpoint"]
    log.clear()
    sharing = _sharing(log, sleep=True, offload=True, asleep=False)
    sharing.before_generate()  # awake engines: only the offload
    assert log == ["policy.offload_states"]
    sharing.mark_unknown()  # actors replaced: their state is not known
    log.clear()
    sharing.before_generate()
    assert log[0] == "policy.offload_states" and log.count("engine0.wake_up['weights']") == 1
    assert log[-1] == "engine1.wake_up['kv_cache']"


def test_engines_sleep_when_they_share_the_policys_gpus():
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.engine_args import engines_sleep

    def cfg(**placement: Any) -> RLHFConfig:
        return RLHFConfig.from_dict({"placement": placement})

    assert engines_sleep(cfg(mode="colocate", policy={"num_gpus": 1}))
    assert not engines_sleep(cfg(mode="colocate"))  # on the CPU: vLLM has no sleep mode there
    assert not engines_sleep(cfg(rollout={"num_gpus": 1}))  # GPUs of their own: nothing to share
    assert not engines_sleep(
        RLHFConfig.from_dict(
            {"placement": {"mode": "colocate", "policy": {"num_gpus": 1}}, "rollout": {"sleep": False}}
        )
    )
