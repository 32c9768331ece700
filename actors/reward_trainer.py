"""The reward-model trainer (stage 3): DeepSpeed ranks that train an LM trunk with a scalar head on
preference pairs with the Bradley-Terry loss, plus `RewardTrainer`, the driver's handle on them.

Batches come from `rlhf_ray.data.encode_preferences` (chosen_* and rejected_* fields). The base rank's
sharding, micro-batching and loss weighting work on `pair_view(batch)`, which adds the three fields they
read: `input_ids`, `attention_mask` (either side's real tokens, so `trim` keeps both) and
`response_mask` = 1 on column 0 only, so that every pair counts once and the "token-mean" weight is a
mean over pairs. The chosen and rejected sequences of a micro-batch go through the model in one forward.
The math is `rlhf_ray.algorithms.bradley_terry_loss` and `rlhf_ray.models.sequence_scores`.
"""

from __future__ import annotations

import ray
import torch

from actors.deepspeed_rank import LossWeights, OfflineRank
from actors.worker_group import TrainerHandle, as_ref, wait_all
from rlhf_ray.algorithms import bradley_terry_loss
from rlhf_ray.batch import Batch
from rlhf_ray.models import load_value_model, sequence_scores

PAIR_FIELDS = ("input_ids", "attention_mask", "response_mask")


def pair_view(batch: Batch) -> Batch:
    """A preference batch with one unit of weight per pair (see the module docstring); idempotent."""
    if "response_mask" in batch:
        return batch
    missing = [f"{s}_{f}" for s in ("chosen", "rejected") for f in PAIR_FIELDS if f"{s}_{f}" not in batch]
    if missing:
        raise ValueError(
            f"not a preference batch: fields {missing} are missing (build it with "
            f"rlhf_ray.data.encode_preferences)"
        )
    attention = torch.maximum(batch["chosen_attention_mask"], batch["rejected_attention_mask"])
    unit = torch.zeros(attention.shape, dtype=torch.float32)
    unit[:, 0] = 1.0
    extra = {"input_ids": batch["chosen_input_ids"], "attention_mask": attention, "response_mask": unit}
    return Batch(batch.tensors | extra, dict(batch.meta))


def both_sides(part: Batch, name: str) -> torch.Tensor:
    """`chosen_<name>` then `rejected_<name>` stacked along the batch: one forward for both sides."""
    return torch.cat([part[f"chosen_{name}"], part[f"rejected_{name}"]])


# ---- runs in each rank (one Ray actor process per rank) ----------------------------------------------------
class RewardRank(OfflineRank):
    """One rank of the reward model (made a Ray actor by `WorkerGroup`). Starts from `model.reward_path`:
    a causal LM (the SFT model; its new scalar head starts at zero) or a value model saved by rlhf_ray."""

    offline_stage = "reward_model"

    def build_model(self) -> torch.nn.Module:
        return load_value_model(self.cfg.model.reward_path, dtype=self.dtype, device=self.device)

    def tokenizer(self):
        if self._tokenizer is None:
            from rlhf_ray.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.tokenizer_path or self.cfg.model.reward_path)
        return self._tokenizer

    def _scores(self, part: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = sequence_scores(
            self.engine, both_sides(part, "input_ids"), both_sides(part, "attention_mask")
        )
        return scores[: len(part)], scores[len(part) :]

    def train(self, batch: Batch) -> dict[str, float]:
        """Bradley-Terry on this rank's shard of pairs, a mean over all pairs of the batch. Stats: loss,
        accuracy (chosen scored higher; a tie counts half), margin (chosen - rejected), chosen_score,
        rejected_score (pair means over the shard), grad_norm, lr."""

        def micro_loss(part: Batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
            chosen, rejected = self._scores(part)
            loss = bradley_terry_loss(chosen, rejected)
            stats = {"loss": loss.item(), **_pair_stats(chosen.detach(), rejected.detach(), mean=True)}
            return weights("token-mean") * loss, stats

        return self._train(pair_view(batch), micro_loss)

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Sums over this rank's shard: pairs, loss_sum, accuracy_sum, margin_sum (the handle divides)."""
        batch = pair_view(batch)
        shard, _ = self._shard(batch)

        def score(part: Batch) -> dict[str, torch.Tensor]:
            chosen, rejected = self._scores(part)
            return {"chosen": chosen[:, None], "rejected": rejected[:, None]}

        out = self._infer(batch, score)  # every rank takes part (ZeRO-3 gathers are collectives)
        if not len(shard):
            return {"pairs": 0.0, "loss_sum": 0.0, "accuracy_sum": 0.0, "margin_sum": 0.0}
        chosen, rejected = out["chosen"][:, 0], out["rejected"][:, 0]
        stats = _pair_stats(chosen, rejected, mean=False)
        loss_sum = bradley_terry_loss(chosen, rejected).item() * len(shard)
        return {"pairs": float(len(shard)), "loss_sum": loss_sum, **stats}


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, mean: bool) -> dict[str, float]:
    correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    values = {"accuracy": correct, "margin": chosen - rejected}
    if mean:
        values |= {"chosen_score": chosen, "rejected_score": rejected}
        return {k: v.mean().item() for k, v in values.items()}
    return {f"{k}_sum": v.sum().item() for k, v in values.items()}


def combine_pair_sums(parts: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """Per-rank `*_sum` dicts and their `pairs` -> means over all pairs ({prefix}accuracy, ...)."""
    pairs = sum(p["pairs"] for p in parts)
    keys = sorted({k for p in parts for k in p if k.endswith("_sum")})
    out = {f"{prefix}{k.removesuffix('_sum')}": sum(p[k] for p in parts) / max(pairs, 1.0) for k in keys}
    return out | {f"{prefix}pairs": pairs}


# ---- runs on the driver ------------------------------------------------------------------------------------
class RewardTrainer(TrainerHandle):
    """Driver-side handle on the reward model's worker group (`cfg.trainer.num_ranks` RewardRank actors).
    The directory `save_pretrained` writes loads with `rlhf_ray.models.load_value_model` and serves
    `actors.reward.RewardModel` (reward.kind='model', model.reward_path=<that directory>)."""

    rank_cls = RewardRank

    def train(self, batch_ref: ray.ObjectRef | Batch) -> list[ray.ObjectRef]:
        """One pass over the pairs (one optimiser step per `offline.reward_model.batch_size` pairs); refs of the
        per-rank stats dicts."""
        return self.group.call("train", as_ref(batch_ref))

    def evaluate(self, batch_ref: ray.ObjectRef | Batch, timeout: float | None = None) -> dict[str, float]:
        """{accuracy, loss, margin, pairs} over every pair of the batch (accuracy: chosen scored higher,
        a tie counting half; loss: Bradley-Terry; margin: mean chosen - rejected score)."""
        parts = wait_all(self.group.call("evaluate", as_ref(batch_ref)), timeout, "reward model evaluate")
        return combine_pair_sums(parts)
