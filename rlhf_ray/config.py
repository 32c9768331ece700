"""The typed configuration of an rlhf_ray run: one `RLHFConfig` tree, loaded from YAML, overridden with
dotted `section.key=value` strings, and validated so that a mistake fails before any actor starts.

Every error is a `ConfigError` that names the key, the value, what is allowed and how to fix it.
`to_dict`/`from_dict` round-trip exactly, so a config can travel through Ray Tune and checkpoints.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and the fix."""


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")


# Each section checks its own values (`check(prefix)`, prefix being where it sits, e.g. "placement.policy.");
# the rules that span sections are in `RLHFConfig.validate`.


def _check_subsections(section: Any, prefix: str) -> None:
    """The checks of every field of `section` that is itself a section, in field order."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            value.check(f"{prefix}{f.name}.")


@dataclass
class ModelConfig:
    policy_path: str = ""  # HF directory of the initial policy (the SFT model in stage 4)
    reward_path: str | None = None  # HF directory of a trained reward model (reward.kind='model')
    critic_path: str | None = None  # initial critic trunk; defaults to reward_path, then policy_path
    tokenizer_path: str | None = None  # defaults to policy_path
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU

    def check(self, prefix: str) -> None:
        """Nothing to range-check: the paths are checked where they are loaded."""


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL, Parquet or a saved `datasets` directory
    eval_path: str | None = None  # held-out data, same formats (RL evaluates on it; else eval_fraction)
    prompt_field: str = "prompt"  # record field holding the prompt
    response_field: str = "response"  # record field holding the SFT answer
    chosen_field: str = "chosen"  # record field holding the preferred answer of a pair
    rejected_field: str = "rejected"  # record field holding the other answer of a pair
    max_prompt_len: int = 128  # longest prompt, in tokens
    max_response_len: int = 128  # longest SFT or preference answer, in tokens
    apply_chat_template: bool = False  # wrap prompts as a user turn with the tokenizer's chat template
    chat_template: str | None = None  # Jinja template overriding the tokenizer's own
    # what to do with a prompt longer than max_prompt_len
    overlong_prompt: Literal["truncate", "skip", "error"] = "skip"
    eval_fraction: float = 0.05  # held-out share of train_path when eval_path is not given

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "max_prompt_len", self.max_prompt_len, self.max_prompt_len >= 1, "an integer >= 1")
        _require(p + "max_response_len", self.max_response_len, self.max_response_len >= 1, "an integer >= 1")
        _require(p + "eval_fraction", self.eval_fraction, 0 <= self.eval_fraction < 1, "a number in [0, 1)")


@dataclass
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"  # hf: transformers generate, a fallback needing nothing else
    num_engines: int = 1  # rollout engine actors generating in parallel
    tensor_parallel_size: int = 1  # GPUs of one vLLM engine
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set of this probability
    max_new_tokens: int = 64  # longest sampled response, in tokens
    samples_per_prompt: int = 4  # responses per prompt (GRPO/RLOO compare them; >= 2 there)
    # vLLM KV cache (GiB); null: 1 GiB on CPU (out of system memory), on GPU what gpu_memory_utilization leaves
    kv_cache_gib: float | None = None
    # GPU memory share one engine may take (weights + KV cache; vLLM demands it free at start-up); null: 0.85
    # on GPUs of its own, 0.4 when colocated with the trainer (rlhf_ray.engine_args)
    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None  # no CUDA graphs; null: true on CPU, false on GPU
    max_num_seqs: int | None = None  # most sequences one engine step batches; null: vLLM's default
    max_num_batched_tokens: int | None = None  # most tokens one engine step batches; null: vLLM's default
    # per_sample: each sample its own seed (the same responses however vLLM batches them, but vLLM's slower
    # per-request sampling path); per_call: one seed per engine and call; auto: per_sample on CPU, per_call on GPU
    sampling_seeds: Literal["auto", "per_sample", "per_call"] = "auto"
    # free the engines' GPU memory (vLLM sleep mode) while the trainer works; null: when colocated on GPUs
    sleep: bool | None = None
    enable_prefix_caching: bool = True  # the samples of one prompt share its KV cache
    # how new weights reach the engines; auto: broadcast when the policy has GPUs of its own (separate
    # placement), else object_store (rlhf_ray.trainer.weight_sync.weight_sync_kind)
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    weight_bucket_mb: float = 64.0  # weights travel (and ZeRO-3 gathers them) in buckets of this size

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "num_engines", self.num_engines, self.num_engines >= 1, "an integer >= 1")
        _require(
            p + "tensor_parallel_size",
            self.tensor_parallel_size,
            self.tensor_parallel_size >= 1,
            "an integer >= 1",
        )
        _require(p + "temperature", self.temperature, self.temperature > 0, "a number > 0")
        _require(p + "top_p", self.top_p, 0 < self.top_p <= 1, "a number in (0, 1]")
        _require(p + "max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "an integer >= 1")
        _require(
            p + "samples_per_prompt", self.samples_per_prompt, self.samples_per_prompt >= 1, "an integer >= 1"
        )
        _require(
            p + "kv_cache_gib",
            self.kv_cache_gib,
            self.kv_cache_gib is None or self.kv_cache_gib > 0,
            "null or > 0",
        )
        _require(
            p + "gpu_memory_utilization",
            self.gpu_memory_utilization,
            self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
            "null or a number in (0, 1]",
        )
        _require(
            p + "max_num_seqs",
            self.max_num_seqs,
            self.max_num_seqs is None or self.max_num_seqs >= 1,
            "null or >= 1",
        )
        _require(
            p + "max_num_batched_tokens",
            self.max_num_batched_tokens,
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            "null or an integer >= 1",
        )
        _require(p + "weight_bucket_mb", self.weight_bucket_mb, self.weight_bucket_mb > 0, "a number > 0")
        if self.tensor_parallel_size > 1:
            # vLLM's Ray executor would need the TP workers placed on bundles of their own and every weight
            # update sent to each of them (collective_rpc); until the engine does that, say so up front
            raise ConfigError(
                f"{p}tensor_parallel_size={self.tensor_parallel_size}: tensor-parallel engines are not supported "
                f"yet (weights are reloaded in the engine's own process); use {p}tensor_parallel_size=1 and "
                f"more engines ({p}num_engines) instead, each holding the whole model"
            )
        if self.sleep and self.engine != "vllm":
            raise ConfigError(f"{p}sleep=true needs {p}engine=vllm (sleep mode is vLLM's); set {p}sleep=null")


def _check_registered(prefix: str, key: str, spec: str) -> None:
    """`spec` names a registered estimator/policy loss, or has the form 'module:function' (loaded where it
    runs, as reward.function is)."""
    from rlhf_ray.algorithms.registry import estimator_names, policy_loss_names  # torch: only when checked

    names = estimator_names() if key == "estimator" else policy_loss_names()
    if spec in names:
        return
    module, _, attr = spec.partition(":")
    if not (module and attr):
        raise ConfigError(
            f"{prefix}{key}={spec!r} is not registered: choose one of {', '.join(map(repr, names))}, or name "
            f"a function of your own as 'package.module:function'"
        )


@dataclass
class AlgorithmConfig:
    # advantage estimator: gae (learns a critic), grpo, dr_grpo, rloo, reinforce_pp, or 'module:function'
    # (rlhf_ray.algorithms.registry)
    estimator: str = "grpo"
    # the policy loss: ppo (token-level clipped ratio), gspo (sequence-level ratio), or 'module:function'
    policy_loss: str = "ppo"
    gamma: float = 1.0  # discount of future token rewards (GAE)
    lam: float = 0.95  # GAE lambda: bias/variance trade-off of the advantage
    clip_eps: float = 0.2  # PPO ratio clip
    clip_eps_low: float | None = None  # lower clip: ratio >= 1 - clip_eps_low; None: = clip_eps
    clip_eps_high: float | None = None  # asymmetric upper clip (DAPO "clip-higher"); None: = clip_eps
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages
    value_clip: float | None = 0.2  # clip of the critic's value change per update; None: off
    kl_coef: float = 0.05  # weight of the KL penalty to the reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # estimator of the per-token KL (Schulman's k1/k2/k3)
    kl_in: Literal["reward", "loss"] = "loss"  # the KL penalty as a per-token reward or a loss term
    kl_target: float | None = None  # set to use the adaptive KL controller (Ziegler et al. 2019)
    kl_horizon: int = 10000  # adaptive KL controller's horizon, in samples
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch (gae, rloo)
    reward_clip: float | None = None  # clip scores to [-c, c]
    # DAPO's soft overlong penalty: a response in the last `overlong_buffer` tokens before
    # rollout.max_new_tokens loses up to `overlong_penalty` of its score, linearly; 0: off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0  # what a response of rollout.max_new_tokens tokens loses
    normalize_reward: bool = False  # scale scores by a running std
    ppo_epochs: int = 1  # passes over each step's batch
    mini_batch_size: int = 32  # sequences per optimiser step
    # how the per-token losses are averaged into one: over all tokens, or per sequence first
    # (seq-mean-token-sum-norm: Dr. GRPO's sums over a constant, rollout.max_new_tokens; seq-mean-token-sum
    # is the same); auto: the policy loss's paper's (gspo: seq-mean-token-mean), else the estimator's
    # (dr_grpo: seq-mean-token-sum-norm), else token-mean
    loss_agg: Literal[
        "auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "auto"
    entropy_coef: float = 0.0  # weight of the entropy bonus
    # Where the PPO ratio's "old" log-probs come from. auto: when one optimiser step takes the whole batch
    # (ppo_epochs=1, mini_batch_size >= the step's batch) and the KL is in the loss, the training forward's
    # own log-probs, detached (the ratio is exactly 1 there, as TRL does at num_iterations=1), and the
    # sampler's log-probs for the KL metric: one policy forward pass fewer per step. recompute: always a
    # separate forward on the policy ranks before the update. (Decided by
    # rlhf_ray.experience.old_logprobs_source; the batch carries the outcome.)
    old_logprobs: Literal["auto", "recompute"] = "auto"

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "gamma", self.gamma, 0 <= self.gamma <= 1, "a number in [0, 1]")
        _require(p + "lam", self.lam, 0 <= self.lam <= 1, "a number in [0, 1]")
        _check_registered(p, "estimator", self.estimator)
        _check_registered(p, "policy_loss", self.policy_loss)
        _require(p + "clip_eps", self.clip_eps, 0 < self.clip_eps < 1, "a number in (0, 1)")
        _require(
            p + "clip_eps_low",
            self.clip_eps_low,
            self.clip_eps_low is None or 0 < self.clip_eps_low < 1,
            "null or a number in (0, 1)",
        )
        _require(
            p + "clip_eps_high",
            self.clip_eps_high,
            self.clip_eps_high is None or self.clip_eps_high > 0,
            "null or a number > 0",
        )
        _require(
            p + "dual_clip",
            self.dual_clip,
            self.dual_clip is None or self.dual_clip > 1,
            "null or a number > 1",
        )
        _require(
            p + "value_clip",
            self.value_clip,
            self.value_clip is None or self.value_clip > 0,
            "null or a number > 0",
        )
        _require(p + "kl_coef", self.kl_coef, self.kl_coef >= 0, "a number >= 0")
        _require(
            p + "kl_target",
            self.kl_target,
            self.kl_target is None or self.kl_target > 0,
            "null or a number > 0",
        )
        _require(p + "kl_horizon", self.kl_horizon, self.kl_horizon >= 1, "an integer >= 1")
        _require(
            p + "reward_clip",
            self.reward_clip,
            self.reward_clip is None or self.reward_clip > 0,
            "null or a number > 0",
        )
        _require(p + "overlong_buffer", self.overlong_buffer, self.overlong_buffer >= 0, "an integer >= 0")
        _require(p + "overlong_penalty", self.overlong_penalty, self.overlong_penalty >= 0, "a number >= 0")
        if self.policy_loss == "gspo" and self.dual_clip is not None:
            raise ConfigError(
                f"{p}dual_clip={self.dual_clip}: {p}policy_loss='gspo' clips whole sequences and has no dual "
                f"clip; set {p}dual_clip=null, or use {p}policy_loss=ppo"
            )
        _require(p + "ppo_epochs", self.ppo_epochs, self.ppo_epochs >= 1, "an integer >= 1")
        _require(p + "mini_batch_size", self.mini_batch_size, self.mini_batch_size >= 1, "an integer >= 1")
        _require(p + "entropy_coef", self.entropy_coef, self.entropy_coef >= 0, "a number >= 0")


@dataclass
class TrainerConfig:
    num_ranks: int = 1  # DeepSpeed ranks of the policy (and of the critic)
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage (one rank runs stage 0 unless offloading)
    lr: float = 1e-6  # policy learning rate
    critic_lr: float = 1e-5  # critic learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # optimiser steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # gradient-norm clip; 0: off
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # not read at present: a step accumulates its micro-batches itself
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    offload_optimizer: bool = False  # ZeRO: optimiser state in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory
    # colocated on GPUs: move the optimizer states (and, with offload_params, the parameters) to CPU memory
    # while the engines generate, and back for the update
    offload_during_rollout: bool = False
    # ZeRO-3: parameters below this many elements stay whole on every rank (norms, biases)
    param_persistence_threshold: int = 4096

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "num_ranks", self.num_ranks, self.num_ranks >= 1, "an integer >= 1")
        _require(p + "lr", self.lr, self.lr > 0, "a number > 0")
        _require(p + "critic_lr", self.critic_lr, self.critic_lr > 0, "a number > 0")
        _require(p + "weight_decay", self.weight_decay, self.weight_decay >= 0, "a number >= 0")
        _require(p + "warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "an integer >= 0")
        _require(p + "grad_clip", self.grad_clip, self.grad_clip >= 0, "a number >= 0 (0: off)")
        _require(p + "micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1, "an integer >= 1")
        _require(p + "grad_accum", self.grad_accum, self.grad_accum >= 1, "an integer >= 1")
        _require(
            p + "param_persistence_threshold",
            self.param_persistence_threshold,
            self.param_persistence_threshold >= 0,
            "an integer >= 0",
        )


@dataclass
class RoleResources:
    num_cpus: float = 1.0  # Ray CPUs of each actor of the role
    num_gpus: float = 0.0  # GPUs of each actor of the role (fractions share one)
    resources: dict[str, float] = field(
        default_factory=dict
    )  # custom Ray resources, e.g. {"node:rollout": 1}
    # torch threads of each actor; null: its num_cpus. The roles take turns within a step (generate, score,
    # train, sync), so on one node each may use all the cores that the others leave idle meanwhile while
    # Ray still reserves num_cpus (e.g. num_threads = the node's cores).
    num_threads: int | None = None
    # reference and reward only: actors of the role, each scoring a slice of the batch (the trainer's and the
    # engines' counts are trainer.num_ranks and rollout.num_engines)
    num_actors: int = 1
    # a model role with num_gpus=0 on a cluster with GPUs is refused (it would compute on the CPU); true:
    # on the CPU on purpose
    allow_cpu: bool = False

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "num_cpus", self.num_cpus, self.num_cpus >= 0, "a number >= 0")
        _require(p + "num_gpus", self.num_gpus, self.num_gpus >= 0, "a number >= 0")
        _require(p + "num_actors", self.num_actors, self.num_actors >= 1, "an integer >= 1")
        _require(
            p + "num_threads",
            self.num_threads,
            self.num_threads is None or self.num_threads >= 1,
            "null (= num_cpus) or an integer >= 1",
        )


@dataclass
class PlacementConfig:
    # colocate: the rollout engines and the reference share the policy ranks' bundles
    mode: Literal["separate", "colocate"] = "separate"
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # placement-group strategy
    policy: RoleResources = field(default_factory=RoleResources)  # per rank
    critic: RoleResources = field(default_factory=RoleResources)  # per rank
    rollout: RoleResources = field(default_factory=RoleResources)  # per engine
    reference: RoleResources = field(default_factory=RoleResources)  # the frozen reference policy
    reward: RoleResources = field(default_factory=RoleResources)  # the reward model or scorer

    def check(self, prefix: str) -> None:
        _check_subsections(self, prefix)
        for role, count in (
            ("policy", "trainer.num_ranks"),
            ("critic", "trainer.num_ranks"),
            ("rollout", "rollout.num_engines"),
        ):
            n = getattr(self, role).num_actors
            if n != 1:
                raise ConfigError(
                    f"{prefix}{role}.num_actors={n}: only the reference and the reward come in groups of actors; "
                    f"the number of {role} actors is {count}"
                )


@dataclass
class RewardConfig:
    kind: Literal["model", "rule", "http"] = "model"  # a reward model, a Python function, or an HTTP scorer
    function: str | None = None  # 'module:function' for kind='rule'
    url: str | None = None  # scorer endpoint for kind='http'
    timeout_s: float = 30.0  # longest wait for one answer of the HTTP scorer
    retries: int = 2  # retries of a failed HTTP scorer call

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "timeout_s", self.timeout_s, self.timeout_s > 0, "a number > 0")
        _require(p + "retries", self.retries, self.retries >= 0, "an integer >= 0")
        if self.kind == "rule" and not (self.function and ":" in self.function):
            raise ConfigError(
                f"{p}function={self.function!r}: {p}kind='rule' needs 'module:function' "
                f"(e.g. {p}function=rlhf_ray.data.synthetic:gold_reward)"
            )
        if self.kind == "http" and not (self.url or "").startswith(("http://", "https://")):
            raise ConfigError(f"{p}url={self.url!r}: {p}kind='http' needs an http(s) URL of the scorer")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # logs, checkpoints, config.yaml and the final model
    seed: int = 0  # seed of sampling, data order and initialisation
    total_steps: int = 100  # RL steps
    prompts_per_step: int = 8  # prompts of one RL step (x rollout.samples_per_prompt sequences)
    eval_interval: int = 0  # steps between evaluations, also run at step 0 and at the end; 0: only those
    eval_prompts: int = 64  # prompts of data.eval_path in each evaluation; 0: no evaluation
    eval_greedy: bool = True  # evaluate greedy answers, else one sample per prompt
    # 'module:function' scoring eval responses besides the reward (e.g. a gold score)
    eval_function: str | None = None
    call_timeout_s: float = 1800.0  # longest wait for any role's answer before the run fails naming that role
    max_restarts: int = 3  # recoveries from dead/hung actors in one run; past it the run stops (resumable)
    # longest wait for a restarted role's placement-group bundle to get a node again (its node was lost);
    # past it the run stops, naming the roles and the missing resources (resumable)
    restart_timeout_s: float = 600.0

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "total_steps", self.total_steps, self.total_steps >= 0, "an integer >= 0")
        _require(p + "prompts_per_step", self.prompts_per_step, self.prompts_per_step >= 1, "an integer >= 1")
        _require(p + "eval_interval", self.eval_interval, self.eval_interval >= 0, "an integer >= 0")
        _require(p + "eval_prompts", self.eval_prompts, self.eval_prompts >= 0, "an integer >= 0")
        _require(p + "call_timeout_s", self.call_timeout_s, self.call_timeout_s > 0, "a number > 0")
        _require(p + "max_restarts", self.max_restarts, self.max_restarts >= 0, "an integer >= 0")
        _require(p + "restart_timeout_s", self.restart_timeout_s, self.restart_timeout_s > 0, "a number > 0")
        if self.eval_function is not None and ":" not in self.eval_function:
            raise ConfigError(
                f"{p}eval_function={self.eval_function!r}: expected 'module:function' "
                f"(e.g. rlhf_ray.data.synthetic:gold_reward)"
            )


@dataclass
class LoggingConfig:
    jsonl: bool = True  # metrics.jsonl in <run.output_dir> (RL) or in its logs/<stage>/ (offline stages)
    tensorboard: bool = True  # metrics as TensorBoard events
    progress_bar: bool = True  # a progress bar on the terminal
    # steps between printed table rows; RL writes every step to metrics.jsonl, the offline stages only
    # these steps, evaluations and the last step
    log_interval: int = 1
    # RL: steps between sample records (prompt, response, reward, advantage, gold) in samples.jsonl and
    # TensorBoard text, also written at the last step; 0: off
    sample_interval: int = 10
    num_samples: int = 4  # responses per sample record, each of a different prompt

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "log_interval", self.log_interval, self.log_interval >= 1, "an integer >= 1")
        _require(
            p + "sample_interval", self.sample_interval, self.sample_interval >= 0, "an integer >= 0 (0: off)"
        )
        _require(p + "num_samples", self.num_samples, self.num_samples >= 1, "an integer >= 1")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # defaults to <run.output_dir>/checkpoints
    interval: int = 0  # steps between checkpoints; 0: off (the last step always saves one)
    # minutes of training since the last save that make the next step save one, so a crash costs at most
    # about this much work whatever the step time; 0: off
    interval_minutes: float = 30.0
    keep_last: int = 2  # newest checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the newest complete checkpoint in dir

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "interval", self.interval, self.interval >= 0, "an integer >= 0")
        _require(
            p + "interval_minutes",
            self.interval_minutes,
            self.interval_minutes >= 0,
            "a number >= 0 (0: off)",
        )
        _require(p + "keep_last", self.keep_last, self.keep_last >= 1, "an integer >= 1")


@dataclass
class OfflineStageConfig:
    """Settings of one offline stage (read by `rlhf_ray.trainer.offline.stage_settings`; the jobs'
    --epochs/--batch-size/--lr flags override them)."""

    epochs: int = 1  # passes over the stage's data
    batch_size: int = 32  # sequences (SFT) or pairs (reward model, DPO) per optimiser step, all ranks
    lr: float | None = None  # None: trainer.lr
    beta: float = 0.1  # DPO only: strength of the implicit KL to the reference
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO only

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        _require(p + "batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        _require(p + "lr", self.lr, self.lr is None or self.lr > 0, "null (trainer.lr) or a number > 0")
        _require(p + "beta", self.beta, self.beta > 0, "a number > 0")
        # the loader checks the Literal; the jobs' --loss-type flag (and code) can set any value
        choices = typing.get_args(typing.get_type_hints(OfflineStageConfig)["loss_type"])
        if self.loss_type not in choices:
            raise ConfigError(f"{p}loss_type={self.loss_type!r} is not allowed: choose one of {choices}")


@dataclass
class OfflineConfig:
    sft: OfflineStageConfig = field(default_factory=OfflineStageConfig)  # stage 2: supervised fine-tuning
    reward_model: OfflineStageConfig = field(default_factory=OfflineStageConfig)  # stage 3: reward model
    dpo: OfflineStageConfig = field(default_factory=OfflineStageConfig)  # DPO instead of stages 3 and 4

    def check(self, prefix: str) -> None:
        _check_subsections(self, prefix)


@dataclass
class PipelineConfig:
    """The four-stage job (`jobs.pipeline`): where the run lives, where its data and first model come from
    (the synthetic task and its sizes, or your own files: docs/OWN_DATA.md), stages to skip because you
    have their output, how many preference pairs to sample and how the final report evaluates. Each
    stage's own settings are the sections above (offline.sft, offline.reward_model, and the rest for RL)."""

    output_dir: str = "runs/pipeline"  # task/, sft/, preferences/, reward_model/, rl/, summary.json
    # synthetic: the embedded sorting task (n_demos ... below) and a random tiny model; own: your model
    # and files (base_model ... eval_prompts below)
    task: Literal["synthetic", "own"] = "synthetic"
    base_model: str | None = None  # own: local HF directory (model + tokenizer) that SFT fine-tunes
    demonstrations: str | None = None  # own: SFT data, JSONL/Parquet records {prompt, response}
    preference_pairs: str | None = None  # own: reward-model data, records {prompt, chosen, rejected}
    prompts: str | None = None  # own: RL prompts, records {prompt, ...}; the other fields reach the reward
    eval_prompts: str | None = None  # own: held-out prompts for RL's evaluations and the final report
    sft_model: str | None = None  # an SFT policy directory you already have: the SFT stage is skipped
    # a reward model directory you already have (same tokenizer as the policy): preference sampling and
    # reward-model training are skipped
    reward_model: str | None = None
    n_demos: int = 8000  # noisy demonstrations for SFT
    n_train_prompts: int = 4000  # prompts for preference sampling and RL
    n_eval_prompts: int = 500  # held-out prompts: RL evaluation and the final report (own: the first n)
    preference_prompts: int = 4000  # prompts sampled twice by the SFT policy (pairs <= this)
    report_greedy: bool = True  # the report also scores greedy answers (temperature-1 samples always)
    min_gold_gain: float = 0.02  # smallest rise of the sampled gold score that counts as an improvement

    def check(self, prefix: str) -> None:
        p = prefix
        _require(p + "n_demos", self.n_demos, self.n_demos >= 1, "an integer >= 1")
        _require(p + "n_train_prompts", self.n_train_prompts, self.n_train_prompts >= 1, "an integer >= 1")
        _require(p + "n_eval_prompts", self.n_eval_prompts, self.n_eval_prompts >= 1, "an integer >= 1")
        _require(
            p + "preference_prompts", self.preference_prompts, self.preference_prompts >= 2, "an integer >= 2"
        )
        _require(p + "min_gold_gain", self.min_gold_gain, self.min_gold_gain >= 0, "a number >= 0")
        own_keys = ("base_model", "demonstrations", "preference_pairs", "prompts", "eval_prompts")
        own = {k: getattr(self, k) for k in own_keys}
        if self.task == "synthetic":
            given = [k for k, v in own.items() if v is not None]
            if given:
                raise ConfigError(
                    f"{p}{given[0]}={own[given[0]]!r} is read only with {p}task=own (the synthetic task writes "
                    f"its own data and model); set {p}task=own, or remove {p}{given[0]}"
                )
            return
        if not self.prompts:
            raise ConfigError(
                f"{p}prompts is not set: {p}task=own needs the RL prompts (JSONL/Parquet records with a "
                f"prompt field); set {p}prompts=/path/to/prompts.jsonl"
            )
        if not self.sft_model and not (self.base_model and self.demonstrations):
            missing = "base_model" if not self.base_model else "demonstrations"
            raise ConfigError(
                f"{p}{missing} is not set: {p}task=own trains SFT from {p}base_model on {p}demonstrations; set "
                f"both, or {p}sft_model to an SFT model you already have (the SFT stage is then skipped)"
            )


@dataclass
class RLHFConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the models each role starts from
    data: DataConfig = field(default_factory=DataConfig)  # datasets, their fields and length limits
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # generation by the rollout engines
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # advantages, PPO loss, KL penalty
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # DeepSpeed ranks and the optimiser
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # Ray resources of each role
    reward: RewardConfig = field(default_factory=RewardConfig)  # where the scores come from
    run: RunConfig = field(default_factory=RunConfig)  # length, output, evaluation and fault tolerance
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # where metrics go
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving and resuming
    offline: OfflineConfig = field(default_factory=OfflineConfig)  # the offline stages' own settings
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # the four-stage job (jobs.pipeline)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLHFConfig:
        cfg = _build(cls, data or {}, "")
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RLHFConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (pass --config with a YAML file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"
            )
        return cls.from_dict(apply_overrides(data, overrides or []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str]) -> RLHFConfig:
        return RLHFConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    def hash(self) -> str:
        """Stable short hash of the settings that make a checkpoint incompatible when changed."""
        return hashlib.sha256(json.dumps(self._essential(), sort_keys=True).encode()).hexdigest()[:16]

    def checkpoint_identity(self) -> dict[str, Any]:
        """The settings `hash()` covers, as flat `section.key` entries: stored in checkpoint manifests so
        that a refused resume can name what changed."""
        return {
            f"{section}.{key}": value
            for section, values in self._essential().items()
            for key, value in values.items()
        }

    def _essential(self) -> dict[str, dict[str, Any]]:
        essential = {k: v for k, v in self.to_dict().items() if k in ("model", "algorithm", "trainer")}
        essential["trainer"] = {k: v for k, v in essential["trainer"].items() if k in ("zero_stage",)}
        return essential

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Each section's own checks, in field order, then the rules across sections; types were checked
        while building."""
        _check_subsections(self, "")
        algo, rollout = self.algorithm, self.rollout
        from rlhf_ray.algorithms.registry import ESTIMATORS  # torch: only when checked

        groups = algo.estimator in ESTIMATORS and ESTIMATORS[algo.estimator].needs_groups
        if groups and rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"rollout.samples_per_prompt={rollout.samples_per_prompt}: estimator {algo.estimator!r} compares "
                f"the samples of one prompt, so it needs at least 2 (set rollout.samples_per_prompt=4, "
                f"or use algorithm.estimator=gae)"
            )
        if algo.overlong_buffer > rollout.max_new_tokens:
            raise ConfigError(
                f"algorithm.overlong_buffer={algo.overlong_buffer} is longer than rollout.max_new_tokens="
                f"{rollout.max_new_tokens}: the penalty band ends at the generation limit; set it to "
                f"{rollout.max_new_tokens // 4} or so"
            )
        batch = self.run.prompts_per_step * rollout.samples_per_prompt
        if algo.mini_batch_size > batch:
            raise ConfigError(
                f"algorithm.mini_batch_size={algo.mini_batch_size} is larger than the batch of one step "
                f"(run.prompts_per_step * rollout.samples_per_prompt = {batch}); set it to {batch} or less"
            )
        place = self.placement
        if place.mode == "colocate" and rollout.weight_sync == "broadcast" and place.policy.num_gpus > 0:
            raise ConfigError(
                "rollout.weight_sync='broadcast' with placement.mode='colocate' on GPUs would put policy rank 0 "
                "and an engine, two ranks of one NCCL group, on one GPU, which NCCL refuses: use "
                "rollout.weight_sync=object_store (or auto) when colocated, or placement.mode=separate"
            )
        if self.trainer.offload_during_rollout and place.mode != "colocate":
            raise ConfigError(
                "trainer.offload_during_rollout=true only helps when the engines share the trainer's GPUs "
                "(placement.mode=colocate); set it to false, or placement.mode=colocate"
            )
        if algo.mini_batch_size % self.trainer.num_ranks:
            raise ConfigError(
                f"algorithm.mini_batch_size={algo.mini_batch_size} must split evenly across "
                f"trainer.num_ranks={self.trainer.num_ranks} ranks; make it a multiple of {self.trainer.num_ranks}"
            )


# ---- overrides ------------------------------------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` applied; values are parsed as YAML scalars."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. algorithm.kl_coef=0.05)"
            )
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. trainer.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value {raw!r} is not a valid YAML scalar ({exc})") from exc
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return out


# ---- typed building -------------------------------------------------------------------------------
def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"allowed keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}': {hint}")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in names if name in data}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_describe(a) for a in args)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {allowed}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[choices.index(value)]):
            raise ConfigError(
                f"{key}={value!r} is not allowed: choose one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin is dict:
        ktype, vtype = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return {_coerce(ktype, k, key): _coerce(vtype, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string; it is a number to a user
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} (a bug in rlhf_ray.config)")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# ---- reference ------------------------------------------------------------------------------------
@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field of the dataclass `cls` with its help text, read from the class source: the `# comment` on
    the field's line(s), else the comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    trailing: dict[int, str] = {}  # line -> comment after code
    alone: dict[int, str] = {}  # line -> comment on a line of its own
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            own_line = tok.line.strip().startswith("#")
            (alone if own_line else trailing)[tok.start[0]] = tok.string.lstrip("#").strip()
    helps = {}
    for node in typing.cast(ast.ClassDef, ast.parse(source).body[0]).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing]
            line = node.lineno - 1
            while not text and line in alone:
                line -= 1
            text = text or [alone[n] for n in range(line + 1, node.lineno)]
            helps[node.target.id] = " ".join(text)
    return helps


def config_reference(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every leaf key of the config tree as (dotted key, type, default as YAML, help), in field order:
    what `--help` lists and what a YAML file may set."""
    cls = cls or RLHFConfig
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += config_reference(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        type_str = f.type if isinstance(f.type, str) else _describe(f.type)
        rows.append((prefix + f.name, type_str, json.dumps(default), helps.get(f.name, "")))
    return rows
