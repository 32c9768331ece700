"""`RewardModel`: the sequence-level score of each rollout, from a trained reward model, a Python rule
function or a remote HTTP scorer (`cfg.reward.kind`; protocol in `rlhf_ray.rewards`). Rules and scorers
also get each row's prompt-record fields (batch meta `FIELDS_META`), e.g. a verifiable task's answer."""

from __future__ import annotations

import ray
import torch

from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.rewards import (
    RemoteScorer,
    RewardError,
    check_scores,
    fields_of,
    load_rule_function,
    score_with_rule,
)
from rlhf_ray.runtime import device, resolve_dtype, set_actor_threads, setup_process_env


@ray.remote
class RewardModel:
    """Scores rollouts: `score(batch) -> Batch` with `scores` `[B]` float32."""

    def __init__(self, cfg: RLHFConfig):
        setup_process_env()
        set_actor_threads(cfg.placement.reward.num_threads)
        self.cfg, self.kind = cfg, cfg.reward.kind
        if self.kind == "model":
            if not cfg.model.reward_path:
                raise RewardError("reward.kind='model' needs model.reward_path (a reward model directory)")
            from rlhf_ray.models import load_value_model

            self.device = device()
            self.model = load_value_model(
                cfg.model.reward_path,
                dtype=resolve_dtype(cfg.model.dtype),
                device=self.device,
                trainable=False,
            )
            self.source = f"reward model {cfg.model.reward_path}"
        elif self.kind == "rule":
            self.fn = load_rule_function(cfg.reward.function or "")
            self.source = f"reward.function={cfg.reward.function!r}"
        else:
            if not cfg.reward.url:
                raise RewardError("reward.kind='http' needs reward.url (the scorer's endpoint)")
            self.scorer = RemoteScorer(cfg.reward.url, cfg.reward.timeout_s, cfg.reward.retries)
            self.source = f"scorer {cfg.reward.url}"

    def ping(self) -> bool:
        return True

    def score(self, batch: Batch) -> Batch:
        """`scores` of the batch's rows, in order. An empty batch (the slice of a reward actor that has
        more actors than the batch has rows) scores nothing, without asking the scorer."""
        if len(batch) == 0:
            return Batch({"scores": torch.zeros(0, dtype=torch.float32)})
        if self.kind == "model":
            scores = self._model_scores(batch)
        else:
            for key in ("prompt", "response"):
                if key not in batch.meta:
                    raise RewardError(
                        f"reward.kind={self.kind!r} scores texts: the batch has no meta {key!r}"
                    )
            prompts, responses = batch.meta["prompt"], batch.meta["response"]
            fields = fields_of(batch.meta)  # each row's prompt-record fields (e.g. the answer), as columns
            if self.kind == "rule":
                values = score_with_rule(self.fn, prompts, responses, self.source, fields)
            else:
                values = self.scorer(prompts, responses, fields)
            scores = torch.tensor(values, dtype=torch.float32)
        return Batch({"scores": scores})

    @torch.no_grad()
    def _model_scores(self, batch: Batch) -> torch.Tensor:
        from rlhf_ray.models import sequence_scores

        parts = []
        for mb in batch.chunks(self.cfg.trainer.micro_batch_size):
            mb = mb.trim()
            parts.append(
                sequence_scores(
                    self.model, mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device)
                )
                .float()
                .cpu()
            )
        scores = torch.cat(parts) if parts else torch.zeros(0)
        return torch.tensor(check_scores(scores, len(batch), self.source), dtype=torch.float32)
