"""The policy trainer: DeepSpeed ranks that score batches with the current policy (old log-probs) and
optimise it with the clipped PPO objective (or the policy loss `algorithm.policy_loss` names), plus
`PolicyTrainer`, the driver's handle on them.

The math is `rlhf_ray.algorithms` (the policy loss from its registry, kl_estimate, masked_mean) and
`rlhf_ray.models.sequence_logprobs`; this file only puts it on ranks and batches.
"""

from __future__ import annotations

import ray
import torch

from actors.deepspeed_rank import DeepSpeedRank, LossWeights
from actors.worker_group import TrainerHandle, joined, wait_all
from rlhf_ray.algorithms import get_policy_loss, kl_estimate, masked_mean, resolve_loss_agg
from rlhf_ray.batch import Batch, RankShard
from rlhf_ray.experience import OldLogprobs, old_logprobs_of
from rlhf_ray.models import load_causal_lm, response_start, sequence_logprobs


# ---- runs in each rank (one Ray actor process per rank) ----------------------------------------------------
class PolicyRank(DeepSpeedRank):
    """One rank of the policy (made a Ray actor by `WorkerGroup`)."""

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.cfg.model.policy_path, dtype=self.dtype, device=self.device)

    def compute_logprobs(self, batch: Batch | RankShard) -> Batch:
        """This rank's shard scored by the current policy: `logprobs` and `entropy`, `[B_shard, T]`
        (at the sampler's temperature, aligned as in `Batch`; 0 before the first response position)."""

        def score(part: Batch) -> dict[str, torch.Tensor]:
            lp, ent = sequence_logprobs(
                self.engine,
                part["input_ids"],
                part["attention_mask"],
                self.cfg.rollout.temperature,
                with_entropy=True,
                start=response_start(part["response_mask"]),
            )
            real = part["attention_mask"]  # padding holds 0, as position 0 does
            return {"logprobs": lp * real, "entropy": ent * real}

        return self._infer(batch, score)

    def train(self, batch: Batch | RankShard, kl_coef: float) -> dict[str, float]:
        """PPO on this rank's shard of `batch` (fields input_ids, attention_mask, response_mask, advantages,
        ref_logprobs for the KL term, and the old `logprobs` unless the batch says they come from the
        update itself: `rlhf_ray.experience.old_logprobs_of`). Stats: policy_loss, clip_frac, approx_kl, entropy,
        kl_loss, grad_norm, lr (and the other diagnostics of `ppo_policy_loss`)."""
        algo = self.cfg.algorithm
        temperature = self.cfg.rollout.temperature
        policy_loss = get_policy_loss(algo.policy_loss)
        loss_agg = resolve_loss_agg(algo.loss_agg, algo.estimator, algo.policy_loss)
        clip_eps_low = algo.clip_eps if algo.clip_eps_low is None else algo.clip_eps_low
        own = self.own_rows(batch)
        source = old_logprobs_of(own.stand_in)  # every row of a batch carries the same mark
        steps = self.optimiser_steps(own.total_rows)
        if source is OldLogprobs.FROM_UPDATE and steps != 1:
            raise ValueError(
                f"train: the batch has no old log-probs (they were to come from the update itself), but this "
                f"update takes {steps} optimiser steps ({own.total_rows} sequences, algorithm.mini_batch_size="
                f"{algo.mini_batch_size}, ppo_epochs={algo.ppo_epochs}): that is exact only when one step "
                f"takes the whole batch (see algorithm.old_logprobs); score it with compute_logprobs first"
            )

        def micro_loss(part: Batch, weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
            mask = part["response_mask"]
            logprobs, entropy = sequence_logprobs(
                self.engine,
                part["input_ids"],
                part["attention_mask"],
                temperature,
                with_entropy=True,
                start=response_start(mask),
                entropy_grad=bool(algo.entropy_coef),  # without the bonus, only a metric
            )
            # FROM_UPDATE: one on-policy optimiser step (checked above), so old = current, detached
            old = part["logprobs"] if source is OldLogprobs.SCORED else logprobs.detach()
            pg_loss, stats = policy_loss(
                logprobs,
                old,
                part["advantages"],
                mask,
                clip_eps=clip_eps_low,
                clip_eps_high=algo.clip_eps_high,
                dual_clip=algo.dual_clip,
                agg=loss_agg,
                max_len=self.cfg.rollout.max_new_tokens,  # seq-mean-token-sum(-norm): a constant, not the padded T
            )
            loss = weights(loss_agg) * pg_loss
            entropy_mean = masked_mean(entropy, mask)
            bonus = {}
            if algo.entropy_coef:  # the entropy bonus: minus entropy_coef * mean token entropy
                loss = loss - algo.entropy_coef * weights("token-mean") * entropy_mean
                bonus["entropy_bonus"] = algo.entropy_coef * entropy_mean.item()
            kl = torch.zeros((), device=logprobs.device)
            if "ref_logprobs" in part:
                kl = masked_mean(kl_estimate(logprobs, part["ref_logprobs"], algo.kl_estimator), mask)
                if algo.kl_in == "loss" and kl_coef:
                    loss = loss + kl_coef * weights("token-mean") * kl
            stats = {"policy_loss": stats.pop("pg_loss") if "pg_loss" in stats else pg_loss.item(), **stats}
            stats.update(entropy=entropy_mean.item(), kl_loss=kl.item(), **bonus)
            if (
                source is OldLogprobs.FROM_UPDATE and "rollout_logprobs" in part
            ):  # no scoring pass compared them
                gap = (part["rollout_logprobs"] - logprobs.detach()).abs()
                stats["rollout_vs_trainer_logprob_diff"] = masked_mean(gap, mask).item()
            return loss, stats

        return self._train(own, micro_loss)


# ---- runs on the driver ------------------------------------------------------------------------------------
class PolicyTrainer(TrainerHandle):
    """Driver-side handle on the policy's worker group (`cfg.trainer.num_ranks` PolicyRank actors, one
    `.options()` dict per rank from the placement module). Work on the ranks returns refs; the driver
    never holds a batch. Blocking methods take `timeout` (seconds, None = no limit)."""

    rank_cls = PolicyRank

    def compute_logprobs(self, batch_ref: ray.ObjectRef | Batch) -> ray.ObjectRef:
        """Ref of a Batch with `logprobs` and `entropy` for every sample of `batch_ref`, in order."""
        return joined(self.group.call_each("compute_logprobs", self.per_rank(batch_ref)))

    def train(self, batch_ref: ray.ObjectRef | Batch, kl_coef: float) -> list[ray.ObjectRef]:
        """One PPO update (algorithm.ppo_epochs over mini-batches); refs of the per-rank stats dicts
        (average them with `actors.worker_group.combine_rank_stats`)."""
        return self.group.call_each("train", self.per_rank(batch_ref), float(kl_coef))

    # ---- broadcast transport (rlhf_ray.weight_transport): trainer rank 0 is rank 0 of the side group
    def weight_manifest(self, timeout: float | None = None) -> list[tuple[str, tuple[int, ...], str]]:
        """`[(hf_name, shape, dtype)]` the receivers must expect (what `broadcast_weights` sends)."""
        return wait_all([self.group.call_rank0("weight_manifest")], timeout, "weight_manifest")[0]

    def open_broadcast(self, world_size: int, timeout: float | None = None) -> tuple[str, int]:
        """Start the side group's store on rank 0 (world_size = 1 + receivers); returns (addr, port)."""
        ref = self.group.call_rank0("open_broadcast", world_size)
        return wait_all([ref], timeout, "open_broadcast")[0]

    def connect_broadcast(self) -> ray.ObjectRef:
        """Ref of rank 0 joining the side group: `ray.get` it together with the receivers' connect."""
        return self.group.call_rank0("connect_broadcast")

    def broadcast_weights(self) -> list[ray.ObjectRef]:
        """Refs of every rank's part of one send (ZeRO-3: all ranks gather one bucket at a time, rank 0
        sends; its ref holds the bytes sent): `ray.get` them together with the receivers' receive."""
        return self.group.call("broadcast_weights")

    def close_broadcast(self, timeout: float | None = None) -> None:
        wait_all([self.group.call_rank0("close_broadcast")], timeout, "close_broadcast")
