"""The SFT trainer (stage 2): DeepSpeed ranks that fine-tune a causal LM on demonstrations with the
token-mean cross entropy of the response tokens, plus `SFTTrainer`, the driver's handle on them.

Batches come from `rlhf_ray.data.encode_sft` (input_ids, attention_mask, response_mask). One `train`
call runs the ranks' `_train` over the batch: one pass, one optimiser step per `offline.sft.batch_size`
sequences (the SFT driver's mini-batches are that size, so one step each). The math is
`rlhf_ray.algorithms.sft_loss` and `rlhf_ray.models.sequence_logprobs`.
"""

from __future__ import annotations

import ray
import torch

from actors.deepspeed_rank import LossWeights, OfflineRank
from actors.worker_group import TrainerHandle, as_ref, wait_all
from rlhf_ray.algorithms import sft_loss
from rlhf_ray.batch import Batch
from rlhf_ray.models import load_causal_lm, sequence_logprobs


# ---- runs in each rank (one Ray actor process per rank) ----------------------------------------------------
class SFTRank(OfflineRank):
    """One rank of the SFT model (made a Ray actor by `WorkerGroup`); starts from `model.policy_path`."""

    offline_stage = "sft"

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.cfg.model.policy_path, dtype=self.dtype, device=self.device)

    def train(self, batch: Batch) -> dict[str, float]:
        """Cross entropy of the response tokens (and EOS) of this rank's shard, token-mean over the whole
        batch. Stats: loss (token-mean over the shard), grad_norm, lr."""

        def micro_loss(part: Batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
            ids = part["input_ids"]
            logits = self.engine(input_ids=ids, attention_mask=part["attention_mask"], use_cache=False).logits
            # logits at t predict token t + 1: shift the labels (and their mask) left by one
            loss = sft_loss(logits[:, :-1], ids[:, 1:], part["response_mask"][:, 1:])
            return weights("token-mean") * loss, {"loss": loss.item()}

        return self._train(batch, micro_loss)

    def eval_loss(self, batch: Batch) -> dict[str, float]:
        """Summed negative log-likelihood and count of the response tokens of this rank's shard (the
        handle divides the totals: the same token mean `sft_loss` takes)."""
        shard, _ = self._shard(batch)

        def nll(part: Batch) -> dict[str, torch.Tensor]:
            logprobs, _ = sequence_logprobs(self.engine, part["input_ids"], part["attention_mask"])
            return {"nll": -logprobs}

        out = self._infer(batch, nll)  # every rank takes part (ZeRO-3 gathers are collectives)
        mask = shard["response_mask"] if len(shard) else torch.zeros(0)
        total = float((out["nll"] * mask).sum()) if len(shard) else 0.0
        return {"nll_sum": total, "tokens": float(mask.sum())}


# ---- runs on the driver ------------------------------------------------------------------------------------
class SFTTrainer(TrainerHandle):
    """Driver-side handle on the SFT worker group (`cfg.trainer.num_ranks` SFTRank actors). `train`
    returns refs; blocking methods take `timeout` (seconds, None = no limit)."""

    rank_cls = SFTRank

    def train(self, batch_ref: ray.ObjectRef | Batch) -> list[ray.ObjectRef]:
        """One pass over the batch (one optimiser step per `offline.sft.batch_size` sequences); refs of
        the per-rank stats dicts (average them with `actors.worker_group.combine_rank_stats`)."""
        return self.group.call("train", as_ref(batch_ref))

    def eval_loss(self, batch_ref: ray.ObjectRef | Batch, timeout: float | None = None) -> float:
        """Token-mean cross entropy of the batch's response tokens under the current model."""
        parts = wait_all(self.group.call("eval_loss", as_ref(batch_ref)), timeout, "SFT eval_loss")
        tokens = sum(p["tokens"] for p in parts)
        return sum(p["nll_sum"] for p in parts) / tokens if tokens else float("nan")
