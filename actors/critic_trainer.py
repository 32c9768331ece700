"""The critic trainer: DeepSpeed ranks that estimate per-token values (the PPO/GAE baseline) and regress
them on the returns with the clipped value loss, plus `CriticTrainer`, the driver's handle on them.

The math is `rlhf_ray.algorithms.value_loss` and `rlhf_ray.models.token_values`.
"""

from __future__ import annotations

import ray
import torch

from actors.deepspeed_rank import DeepSpeedRank, LossWeights
from actors.worker_group import TrainerHandle, joined
from rlhf_ray.algorithms import value_loss, value_loss_stats
from rlhf_ray.batch import Batch, RankShard
from rlhf_ray.models import load_value_model, token_values


# ---- runs in each rank (one Ray actor process per rank) ----------------------------------------------------
class CriticRank(DeepSpeedRank):
    """One rank of the critic (made a Ray actor by `WorkerGroup`). Starts from model.critic_path, else
    the reward model, else the policy (a new scalar head starts at zero)."""

    role = "critic"

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        return load_value_model(
            m.critic_path or m.reward_path or m.policy_path, dtype=self.dtype, device=self.device
        )

    def learning_rate(self) -> float:
        return self.cfg.trainer.critic_lr

    def compute_values(self, batch: Batch | RankShard) -> Batch:
        """This rank's shard valued by the current critic: `values`, `[B_shard, T]` (aligned as in `Batch`)."""

        def value(part: Batch) -> dict[str, torch.Tensor]:
            real = part["attention_mask"]  # padding holds 0, as position 0 does
            return {"values": token_values(self.engine, part["input_ids"], real) * real}

        return self._infer(batch, value)

    def train(self, batch: Batch | RankShard) -> dict[str, float]:
        """Value regression on this rank's shard (fields input_ids, attention_mask, response_mask, values =
        the rollout-time estimates, returns). Stats: value_loss, vf_clip_frac, value_mean, return_mean,
        value_error, grad_norm, lr."""
        clip = self.cfg.algorithm.value_clip

        def micro_loss(part: Batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
            mask = part["response_mask"]
            values = token_values(self.engine, part["input_ids"], part["attention_mask"])
            loss = value_loss(values, part["values"], part["returns"], mask, clip=clip)
            stats = {
                "value_loss": loss.item(),
                **value_loss_stats(values, part["values"], part["returns"], mask, clip),
            }
            return weights("token-mean") * loss, stats

        return self._train(batch, micro_loss)


# ---- runs on the driver ------------------------------------------------------------------------------------
class CriticTrainer(TrainerHandle):
    """Driver-side handle on the critic's worker group (`cfg.trainer.num_ranks` CriticRank actors).
    Work on the ranks returns refs; blocking methods take `timeout` (seconds, None = no limit)."""

    rank_cls = CriticRank

    def compute_values(self, batch_ref: ray.ObjectRef | Batch) -> ray.ObjectRef:
        """Ref of a Batch with `values` for every sample of `batch_ref`, in order."""
        return joined(self.group.call_each("compute_values", self.per_rank(batch_ref)))

    def train(self, batch_ref: ray.ObjectRef | Batch) -> list[ray.ObjectRef]:
        """One critic update (algorithm.ppo_epochs over mini-batches); refs of the per-rank stats dicts."""
        return self.group.call_each("train", self.per_rank(batch_ref))
