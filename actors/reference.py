"""`ReferenceModel`: the frozen initial policy, scoring rollouts with log-probabilities for the KL penalty."""

from __future__ import annotations

import ray
import torch

from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.runtime import device, resolve_dtype, set_actor_threads, setup_process_env


@ray.remote
class ReferenceModel:
    """Frozen copy of the initial policy (`model.policy_path`); never updated."""

    def __init__(self, cfg: RLHFConfig):
        setup_process_env()
        set_actor_threads(cfg.placement.reference.num_threads)
        from rlhf_ray.models import load_causal_lm

        self.cfg = cfg
        self.device = device()
        self.model = load_causal_lm(
            cfg.model.policy_path, dtype=resolve_dtype(cfg.model.dtype), device=self.device, trainable=False
        )

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> Batch:
        """`ref_logprobs` `[B, T]` aligned with input_ids, at the sampler's temperature (as the trainer
        scores), computed in micro-batches of `trainer.micro_batch_size` sequences; 0 before a
        micro-batch's first response position (no loss reads the prompt's)."""
        from rlhf_ray.models import response_start, sequence_logprobs

        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        size = self.cfg.trainer.micro_batch_size
        for start in range(0, len(batch), size):
            mb = batch.select(slice(start, start + size)).trim()
            lp, _ = sequence_logprobs(
                self.model,
                mb["input_ids"].to(self.device),
                mb["attention_mask"].to(self.device),
                temperature=self.cfg.rollout.temperature,
                start=response_start(mb["response_mask"]),
            )
            out[start : start + len(mb), : lp.shape[1]] = lp.float().cpu() * mb["attention_mask"]
        return Batch({"ref_logprobs": out})
