"""Who holds a shared GPU's memory in each phase of a step, when the engines share the policy's GPUs.

In colocate mode on GPUs the trainer (weights, gradients, optimizer states) and a vLLM engine (weights,
KV cache) live on one device and cannot both hold their full memory at once. The schedule the peers
converged on (OpenRLHF's hybrid engine, veRL's), which this module runs from the driver:

    train ─► [trainer states to CPU] ─► wake engine weights ─► sync weights ─► wake KV cache
          ─► generate (and evaluate) ─► engine to sleep ─► [trainer states back] ─► score ─► train

vLLM's sleep mode (`rollout.sleep`) frees the engine's memory between generations (level 1: weights to
CPU memory, KV cache dropped); `trainer.offload_during_rollout` moves the optimizer states to CPU memory
while the engines are awake. Without either (every CPU run, and separate placement) each call here does
nothing. Engines start asleep-capable and awake; `mark_unknown` after a recovery makes the next phase
issue every call again (waking an awake engine is harmless).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from actors import role_id
from rlhf_ray.trainer.roles import wait_for


class SharingRoles(Protocol):
    """The part of `Roles` the schedule drives: the engines' sleep/wake and the policy ranks' offload."""

    engines: list[Any]
    policy: Any


class Engines(enum.Enum):
    ASLEEP = "asleep"  # nothing on the GPU
    WEIGHTS = "weights"  # weights resident (ready for a sync), no KV cache
    AWAKE = "awake"  # ready to generate
    UNKNOWN = "unknown"  # after a recovery: every call is made again


class GpuSharing:
    """The phase changes of one run; `sleep` and `offload` are the resolved `rollout.sleep` and
    `trainer.offload_during_rollout`. `asleep`: the engines were put to sleep at start."""

    def __init__(
        self,
        roles: SharingRoles,
        sleep: bool,
        offload: bool,
        timeout_s: float,
        asleep: bool = False,
        wait: Callable[[dict[Any, Any], float], Any] = wait_for,
    ):
        self.roles, self.sleep, self.offload, self.timeout = roles, sleep, offload, timeout_s
        self.wait = wait  # `roles.wait_for`; a test's stand-in at the one seam CUDA would run behind
        self.engines = Engines.ASLEEP if asleep else Engines.AWAKE
        self.trainer_offloaded: bool | None = False  # None: not known

    def mark_unknown(self) -> None:
        """After actors were replaced: the next phases make their calls again."""
        self.engines, self.trainer_offloaded = Engines.UNKNOWN, None

    def _engines(self, method: str, *args: Any) -> None:
        calls = {
            role_id.engine(i): getattr(e, method).remote(*args) for i, e in enumerate(self.roles.engines)
        }
        self.wait(calls, self.timeout)

    def _policy(self, method: str) -> None:
        refs = self.roles.policy.group.call(method)  # every rank: each holds its own shard of the states
        self.wait({role_id.rank(role_id.POLICY, i): r for i, r in enumerate(refs)}, self.timeout)

    def before_sync(self) -> None:
        """The update is done: the optimizer states may leave the GPU, and the engines' weights must be
        resident to be overwritten."""
        if self.offload and self.trainer_offloaded is not True:
            self._policy("offload_states")
            self.trainer_offloaded = True
        if self.sleep and self.engines in (Engines.ASLEEP, Engines.UNKNOWN):
            self._engines("wake_up", ["weights"])
            self.engines = Engines.WEIGHTS

    def after_sync(self) -> None:
        """The engines' weights are current: their KV cache comes back, ready to generate."""
        if self.sleep and self.engines in (Engines.WEIGHTS, Engines.UNKNOWN):
            self._engines("wake_up", ["kv_cache"])
            self.engines = Engines.AWAKE

    def before_generate(self) -> None:
        """Generation needs the engines' weights and KV cache (after a sync only the cache was missing)."""
        self.before_sync()
        self.after_sync()

    def before_scoring(self) -> None:
        """Generation is over: the engines release the GPU, the trainer's states come back."""
        if self.sleep and self.engines is not Engines.ASLEEP:
            self._engines("sleep")
            self.engines = Engines.ASLEEP
        self.trainer_resident()

    def trainer_resident(self) -> None:
        """The trainer's states back where the update (or a checkpoint) expects them."""
        if self.offload and self.trainer_offloaded is not False:
            self._policy("reload_states")
            self.trainer_offloaded = False
