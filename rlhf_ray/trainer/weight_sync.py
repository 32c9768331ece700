"""Weight sync from the policy trainer to the rollout engines: one interface, two transports.

- `ObjectStoreSync` (portable: host memory, works everywhere): policy rank 0 puts the parameters in the
  object store, one object per bucket, in the model's dtype; every engine gets them zero-copy and reloads
  in place, bucket by bucket.
- `BroadcastSync` (the GPU default): a torch.distributed side group from policy rank 0 to the engines
  (gloo on CPU, NCCL on GPU), opened once and reused; every sync broadcasts the parameters in buckets.

Either way the buckets are `rollout.weight_bucket_mb`, and under ZeRO-3 the trainer ranks gather one
bucket at a time, never the whole model (`rlhf_ray.weight_transport.WeightBuckets`).
"""

from __future__ import annotations

from actors import role_id
from rlhf_ray.config import RLHFConfig
from rlhf_ray.trainer.roles import Roles, wait_for


class ObjectStoreSync:
    def __init__(self, roles: Roles, timeout_s: float):
        self.roles, self.timeout = roles, timeout_s

    def sync(self) -> None:
        refs = self.roles.policy.export_weights(self.timeout)  # a ref per bucket, not fetched here
        engines = enumerate(self.roles.engines)
        wait_for(
            {role_id.engine(i): e.update_weights_from_store.remote(refs) for i, e in engines}, self.timeout
        )
        del refs  # the last reference to the weights: the store frees them now


class BroadcastSync:
    def __init__(self, roles: Roles, timeout_s: float):
        self.roles, self.timeout = roles, timeout_s
        world = 1 + len(roles.engines)
        addr, port = roles.policy.open_broadcast(world, timeout_s)
        manifest = roles.policy.weight_manifest(timeout_s)
        joins = {
            role_id.engine(i): e.open_broadcast.remote(addr, port, i + 1, world, manifest)
            for i, e in enumerate(roles.engines)
        }
        joins[role_id.rank(role_id.POLICY, 0)] = roles.policy.connect_broadcast()
        wait_for(joins, timeout_s)

    def sync(self) -> None:
        calls = {role_id.engine(i): e.receive_broadcast.remote() for i, e in enumerate(self.roles.engines)}
        sends = self.roles.policy.broadcast_weights()
        calls |= {role_id.rank(role_id.POLICY, i): r for i, r in enumerate(sends)}
        wait_for(calls, self.timeout)


def weight_sync_kind(cfg: RLHFConfig) -> str:
    """The transport `rollout.weight_sync` names; `auto`: the broadcast (NCCL, in buckets) when the policy
    ranks have GPUs of their own, the object store (portable, host memory) otherwise: on CPU, and when the
    engines share the policy's GPUs (two ranks of one NCCL group cannot share a GPU)."""
    chosen = cfg.rollout.weight_sync
    if chosen != "auto":
        return chosen
    own_gpus = cfg.placement.policy.num_gpus > 0 and cfg.placement.mode == "separate"
    return "broadcast" if own_gpus else "object_store"


def make_weight_sync(cfg: RLHFConfig, roles: Roles) -> ObjectStoreSync | BroadcastSync:
    kind = {"object_store": ObjectStoreSync, "broadcast": BroadcastSync}[weight_sync_kind(cfg)]
    return kind(roles, cfg.run.call_timeout_s)
