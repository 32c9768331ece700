"""The DPO trainer: DeepSpeed ranks that optimise a causal LM directly on preference pairs (Rafailov et
al. 2023; IPO, Azar et al. 2023), plus `DPOTrainer`, the driver's handle on them.

Each rank holds the policy (in its DeepSpeed engine) and a frozen reference copy of the same initial
weights (`model.policy_path`), a plain module that only runs under no_grad. Under ZeRO-3 the reference
is NOT partitioned: every rank keeps a whole copy (fine for small models; precompute reference
log-probs for big ones). Batches are preference batches (`rlhf_ray.data.encode_preferences`), weighted
per pair as in `actors.reward_trainer.pair_view`. The math is `rlhf_ray.algorithms.dpo_loss` on summed
response log-probs from `rlhf_ray.models.sequence_logprobs`.
"""

from __future__ import annotations

from typing import Literal

import ray
import torch

from actors.deepspeed_rank import LossWeights, OfflineRank
from actors.reward_trainer import both_sides, combine_pair_sums, pair_view
from actors.worker_group import TrainerHandle, as_ref, wait_all
from rlhf_ray.algorithms import dpo_loss, masked_sum
from rlhf_ray.batch import Batch
from rlhf_ray.models import load_causal_lm, sequence_logprobs

LossType = Literal["sigmoid", "ipo"]


# ---- runs in each rank (one Ray actor process per rank) ----------------------------------------------------
class DPORank(OfflineRank):
    """One rank of the DPO policy and its reference (made a Ray actor by `WorkerGroup`)."""

    offline_stage = "dpo"

    def build_model(self) -> torch.nn.Module:
        path = self.cfg.model.policy_path
        self.reference = load_causal_lm(path, dtype=self.dtype, device=self.device, trainable=False)
        return load_causal_lm(path, dtype=self.dtype, device=self.device)

    def _sequence_logps(self, model: torch.nn.Module, part: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of the response tokens (EOS included): (chosen [b], rejected [b])."""
        logprobs, _ = sequence_logprobs(
            model, both_sides(part, "input_ids"), both_sides(part, "attention_mask")
        )
        summed = masked_sum(logprobs, both_sides(part, "response_mask"), dim=1)
        return summed[: len(part)], summed[len(part) :]

    def _loss(self, part: Batch, beta: float, loss_type: LossType):
        chosen, rejected = self._sequence_logps(self.engine, part)
        with torch.no_grad():
            ref_chosen, ref_rejected = self._sequence_logps(self.reference, part)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta, loss_type
        )
        return losses, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach()

    def train(self, batch: Batch, beta: float, loss_type: LossType = "sigmoid") -> dict[str, float]:
        """DPO on this rank's shard of pairs, a mean over all pairs of the batch. Stats (pair means over
        the shard): loss, rewards/chosen, rewards/rejected (beta * (policy - reference) log-prob of each
        side), rewards/margin, rewards/accuracy (chosen reward higher; a tie counts half), logps/chosen,
        logps/rejected; and grad_norm, lr."""

        def micro_loss(part: Batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
            losses, chosen_r, rejected_r, chosen_lp, rejected_lp = self._loss(part, beta, loss_type)
            loss = losses.mean()
            stats = {"loss": loss.item(), **_reward_stats(chosen_r, rejected_r)}
            stats |= {"logps/chosen": chosen_lp.mean().item(), "logps/rejected": rejected_lp.mean().item()}
            return weights("token-mean") * loss, stats

        return self._train(pair_view(batch), micro_loss)

    def evaluate(self, batch: Batch, beta: float, loss_type: LossType = "sigmoid") -> dict[str, float]:
        """Sums over this rank's shard: pairs, loss_sum, rewards/{chosen,rejected,margin,accuracy}_sum."""
        batch = pair_view(batch)
        shard, _ = self._shard(batch)

        def score(part: Batch) -> dict[str, torch.Tensor]:
            losses, chosen_r, rejected_r, _, _ = self._loss(part, beta, loss_type)
            return {"loss": losses[:, None], "chosen": chosen_r[:, None], "rejected": rejected_r[:, None]}

        out = self._infer(batch, score)  # every rank takes part (ZeRO-3 gathers are collectives)
        if not len(shard):
            return {"pairs": 0.0}
        chosen, rejected = out["chosen"][:, 0], out["rejected"][:, 0]
        sums = {f"{k}_sum": v * len(shard) for k, v in _reward_stats(chosen, rejected).items()}
        return {"pairs": float(len(shard)), "loss_sum": out["loss"][:, 0].sum().item(), **sums}


def _reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margin": (chosen - rejected).mean().item(),
        "rewards/accuracy": correct.mean().item(),
    }


# ---- runs on the driver ------------------------------------------------------------------------------------
class DPOTrainer(TrainerHandle):
    """Driver-side handle on the DPO worker group (`cfg.trainer.num_ranks` DPORank actors); the directory
    `save_pretrained` writes is a causal LM like the SFT model's (transformers and vLLM load it)."""

    rank_cls = DPORank

    def train(
        self, batch_ref: ray.ObjectRef | Batch, beta: float, loss_type: LossType = "sigmoid"
    ) -> list[ray.ObjectRef]:
        """One pass over the pairs (one optimiser step per `offline.dpo.batch_size` pairs); refs of the
        per-rank stats dicts."""
        return self.group.call("train", as_ref(batch_ref), float(beta), loss_type)

    def evaluate(
        self,
        batch_ref: ray.ObjectRef | Batch,
        beta: float,
        loss_type: LossType = "sigmoid",
        timeout: float | None = None,
    ) -> dict[str, float]:
        """{loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy, pairs} over every
        pair of the batch, with the current policy against the reference."""
        refs = self.group.call("evaluate", as_ref(batch_ref), float(beta), loss_type)
        return combine_pair_sums(wait_all(refs, timeout, "DPO evaluate"))
