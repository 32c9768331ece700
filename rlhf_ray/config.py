"""The typed configuration of an rlhf_ray run: one `RLHFConfig` tree, loaded from YAML, overridden with
dotted `section.key=value` strings, and validated so that a mistake fails before any actor starts.

Every error is a `ConfigError` that names the key, the value, what is allowed and how to fix it.
`to_dict`/`from_dict` round-trip exactly, so a config can travel through Ray Tune and checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and the fix."""


@dataclass
class ModelConfig:
    policy_path: str = ""  # HF directory of the initial policy (the SFT model in stage 4)
    reward_path: str | None = None  # HF directory of a trained reward model (reward.kind='model')
    critic_path: str | None = None  # initial critic trunk; defaults to reward_path, then policy_path
    tokenizer_path: str | None = None  # defaults to policy_path
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL, Parquet or a saved `datasets` directory
    eval_path: str | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_prompt_len: int = 128  # tokens
    max_response_len: int = 128  # tokens, for SFT and preference data
    apply_chat_template: bool = False  # wrap prompts as a user turn with the tokenizer's chat template
    chat_template: str | None = None  # Jinja template overriding the tokenizer's own
    overlong_prompt: Literal["truncate", "skip", "error"] = (
        "skip"  # what to do with a prompt > max_prompt_len
    )
    eval_fraction: float = 0.05  # held-out share of train_path when eval_path is not given


@dataclass
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"
    num_engines: int = 1
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    samples_per_prompt: int = 4
    kv_cache_gib: float = 1.0  # cap on the vLLM KV cache (GiB); on CPU it comes out of system memory
    enable_prefix_caching: bool = True  # the samples of one prompt share its KV cache
    weight_sync: Literal["object_store", "broadcast"] = "object_store"  # how new weights reach the engines


@dataclass
class AlgorithmConfig:
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "grpo"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2  # PPO ratio clip
    clip_eps_high: float | None = None  # asymmetric upper clip (DAPO "clip-higher"); None: = clip_eps
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages
    value_clip: float | None = 0.2
    kl_coef: float = 0.05  # weight of the KL penalty to the reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["reward", "loss"] = "loss"
    kl_target: float | None = None  # set to use the adaptive KL controller (Ziegler et al. 2019)
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    reward_clip: float | None = None  # clip scores to [-c, c]
    normalize_reward: bool = False  # scale scores by a running std
    ppo_epochs: int = 1
    mini_batch_size: int = 32  # sequences per optimiser step
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    entropy_coef: float = 0.0
    # Where the PPO ratio's "old" log-probs come from. auto: when one optimiser step takes the whole batch
    # (ppo_epochs=1, mini_batch_size >= the step's batch) and the KL is in the loss, the training forward's
    # own log-probs, detached (the ratio is exactly 1 there, as TRL does at num_iterations=1), and the
    # sampler's log-probs for the KL metric: one policy forward pass fewer per step. recompute: always a
    # separate forward on the policy ranks before the update.
    old_logprobs: Literal["auto", "recompute"] = "auto"


@dataclass
class TrainerConfig:
    num_ranks: int = 1  # DeepSpeed ranks of the policy (and of the critic)
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class RoleResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(
        default_factory=dict
    )  # custom Ray resources, e.g. {"node:rollout": 1}
    # torch threads of each actor; null: its num_cpus. The roles take turns within a step (generate, score,
    # train, sync), so on one node each may use all the cores that the others leave idle meanwhile while
    # Ray still reserves num_cpus (e.g. num_threads = the node's cores).
    num_threads: int | None = None


@dataclass
class PlacementConfig:
    mode: Literal["separate", "colocate"] = "separate"
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    policy: RoleResources = field(default_factory=RoleResources)  # per rank
    critic: RoleResources = field(default_factory=RoleResources)  # per rank
    rollout: RoleResources = field(default_factory=RoleResources)  # per engine
    reference: RoleResources = field(default_factory=RoleResources)
    reward: RoleResources = field(default_factory=RoleResources)


@dataclass
class RewardConfig:
    kind: Literal["model", "rule", "http"] = "model"
    function: str | None = None  # 'module:function' for kind='rule'
    url: str | None = None  # scorer endpoint for kind='http'
    timeout_s: float = 30.0
    retries: int = 2


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    total_steps: int = 100
    prompts_per_step: int = 8
    eval_interval: int = 0  # steps; 0: only at the end
    eval_prompts: int = 64
    eval_greedy: bool = True
    eval_function: str | None = (
        None  # 'module:function' scoring eval responses besides the reward (e.g. a gold score)
    )
    call_timeout_s: float = 1800.0  # longest wait for any role's answer before the run fails naming that role
    max_restarts: int = 3  # recoveries from dead/hung actors in one run; past it the run stops (resumable)
    # longest wait for a restarted role's placement-group bundle to get a node again (its node was lost);
    # past it the run stops, naming the roles and the missing resources (resumable)
    restart_timeout_s: float = 600.0


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    log_interval: int = 1


@dataclass
class CheckpointConfig:
    dir: str | None = None  # defaults to <run.output_dir>/checkpoints
    interval: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir


@dataclass
class OfflineStageConfig:
    """Settings of one offline stage (read by `rlhf_ray.trainer.offline.stage_settings`; the jobs'
    --epochs/--batch-size/--lr flags override them)."""

    epochs: int = 1
    batch_size: int = 32  # sequences (SFT) or pairs (reward model, DPO) per optimiser step, all ranks
    lr: float | None = None  # None: trainer.lr
    beta: float = 0.1  # DPO only: strength of the implicit KL to the reference
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO only


@dataclass
class OfflineConfig:
    sft: OfflineStageConfig = field(default_factory=OfflineStageConfig)
    reward_model: OfflineStageConfig = field(default_factory=OfflineStageConfig)
    dpo: OfflineStageConfig = field(default_factory=OfflineStageConfig)


@dataclass
class PipelineConfig:
    """The four-stage job (`jobs.pipeline`) on the synthetic task: where the run lives, the task's sizes,
    how many preference pairs to sample and how the final report evaluates. Each stage's own settings are
    the sections above (offline.sft, offline.reward_model, and the rest for RL)."""

    output_dir: str = "runs/pipeline"  # task/, sft/, preferences/, reward_model/, rl/, summary.json
    n_demos: int = 8000  # noisy demonstrations for SFT
    n_train_prompts: int = 4000  # prompts for preference sampling and RL
    n_eval_prompts: int = 500  # held-out prompts: RL evaluation and the final report
    preference_prompts: int = 4000  # prompts sampled twice by the SFT policy (pairs <= this)
    report_greedy: bool = True  # the report also scores greedy answers (temperature-1 samples always)
    min_gold_gain: float = 0.02  # smallest rise of the sampled gold score that counts as an improvement


@dataclass
class RLHFConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

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

    def reuses_training_logprobs(self) -> bool:
        """Whether the PPO ratio's old log-probs are the training forward's own (no separate scoring pass):
        `algorithm.old_logprobs=auto`, a single optimiser step per batch, and the KL in the loss."""
        a = self.algorithm
        batch = self.run.prompts_per_step * self.rollout.samples_per_prompt
        one_step = a.ppo_epochs == 1 and a.mini_batch_size >= batch
        return a.old_logprobs == "auto" and one_step and a.kl_in == "loss"

    def _essential(self) -> dict[str, dict[str, Any]]:
        essential = {k: v for k, v in self.to_dict().items() if k in ("model", "algorithm", "trainer")}
        essential["trainer"] = {k: v for k, v in essential["trainer"].items() if k in ("zero_stage",)}
        return essential

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Range checks and checks across sections; types were checked while building."""
        checks: list[tuple[str, Any, bool, str]] = [
            (
                "rollout.num_engines",
                self.rollout.num_engines,
                self.rollout.num_engines >= 1,
                "an integer >= 1",
            ),
            (
                "rollout.tensor_parallel_size",
                self.rollout.tensor_parallel_size,
                self.rollout.tensor_parallel_size >= 1,
                "an integer >= 1",
            ),
            ("rollout.temperature", self.rollout.temperature, self.rollout.temperature > 0, "a number > 0"),
            ("rollout.top_p", self.rollout.top_p, 0 < self.rollout.top_p <= 1, "a number in (0, 1]"),
            (
                "rollout.max_new_tokens",
                self.rollout.max_new_tokens,
                self.rollout.max_new_tokens >= 1,
                "an integer >= 1",
            ),
            (
                "rollout.samples_per_prompt",
                self.rollout.samples_per_prompt,
                self.rollout.samples_per_prompt >= 1,
                "an integer >= 1",
            ),
            (
                "rollout.kv_cache_gib",
                self.rollout.kv_cache_gib,
                self.rollout.kv_cache_gib > 0,
                "a number > 0",
            ),
            ("algorithm.gamma", self.algorithm.gamma, 0 <= self.algorithm.gamma <= 1, "a number in [0, 1]"),
            ("algorithm.lam", self.algorithm.lam, 0 <= self.algorithm.lam <= 1, "a number in [0, 1]"),
            (
                "algorithm.clip_eps",
                self.algorithm.clip_eps,
                0 < self.algorithm.clip_eps < 1,
                "a number in (0, 1)",
            ),
            (
                "algorithm.clip_eps_high",
                self.algorithm.clip_eps_high,
                self.algorithm.clip_eps_high is None or self.algorithm.clip_eps_high > 0,
                "null or a number > 0",
            ),
            (
                "algorithm.dual_clip",
                self.algorithm.dual_clip,
                self.algorithm.dual_clip is None or self.algorithm.dual_clip > 1,
                "null or a number > 1",
            ),
            (
                "algorithm.value_clip",
                self.algorithm.value_clip,
                self.algorithm.value_clip is None or self.algorithm.value_clip > 0,
                "null or a number > 0",
            ),
            ("algorithm.kl_coef", self.algorithm.kl_coef, self.algorithm.kl_coef >= 0, "a number >= 0"),
            (
                "algorithm.kl_target",
                self.algorithm.kl_target,
                self.algorithm.kl_target is None or self.algorithm.kl_target > 0,
                "null or a number > 0",
            ),
            (
                "algorithm.kl_horizon",
                self.algorithm.kl_horizon,
                self.algorithm.kl_horizon >= 1,
                "an integer >= 1",
            ),
            (
                "algorithm.reward_clip",
                self.algorithm.reward_clip,
                self.algorithm.reward_clip is None or self.algorithm.reward_clip > 0,
                "null or a number > 0",
            ),
            (
                "algorithm.ppo_epochs",
                self.algorithm.ppo_epochs,
                self.algorithm.ppo_epochs >= 1,
                "an integer >= 1",
            ),
            (
                "algorithm.mini_batch_size",
                self.algorithm.mini_batch_size,
                self.algorithm.mini_batch_size >= 1,
                "an integer >= 1",
            ),
            (
                "algorithm.entropy_coef",
                self.algorithm.entropy_coef,
                self.algorithm.entropy_coef >= 0,
                "a number >= 0",
            ),
            ("trainer.num_ranks", self.trainer.num_ranks, self.trainer.num_ranks >= 1, "an integer >= 1"),
            ("trainer.lr", self.trainer.lr, self.trainer.lr > 0, "a number > 0"),
            ("trainer.critic_lr", self.trainer.critic_lr, self.trainer.critic_lr > 0, "a number > 0"),
            (
                "trainer.weight_decay",
                self.trainer.weight_decay,
                self.trainer.weight_decay >= 0,
                "a number >= 0",
            ),
            (
                "trainer.warmup_steps",
                self.trainer.warmup_steps,
                self.trainer.warmup_steps >= 0,
                "an integer >= 0",
            ),
            (
                "trainer.grad_clip",
                self.trainer.grad_clip,
                self.trainer.grad_clip >= 0,
                "a number >= 0 (0: off)",
            ),
            (
                "trainer.micro_batch_size",
                self.trainer.micro_batch_size,
                self.trainer.micro_batch_size >= 1,
                "an integer >= 1",
            ),
            ("trainer.grad_accum", self.trainer.grad_accum, self.trainer.grad_accum >= 1, "an integer >= 1"),
            (
                "data.max_prompt_len",
                self.data.max_prompt_len,
                self.data.max_prompt_len >= 1,
                "an integer >= 1",
            ),
            (
                "data.max_response_len",
                self.data.max_response_len,
                self.data.max_response_len >= 1,
                "an integer >= 1",
            ),
            (
                "data.eval_fraction",
                self.data.eval_fraction,
                0 <= self.data.eval_fraction < 1,
                "a number in [0, 1)",
            ),
            ("reward.timeout_s", self.reward.timeout_s, self.reward.timeout_s > 0, "a number > 0"),
            ("reward.retries", self.reward.retries, self.reward.retries >= 0, "an integer >= 0"),
            ("run.total_steps", self.run.total_steps, self.run.total_steps >= 0, "an integer >= 0"),
            (
                "run.prompts_per_step",
                self.run.prompts_per_step,
                self.run.prompts_per_step >= 1,
                "an integer >= 1",
            ),
            ("run.eval_interval", self.run.eval_interval, self.run.eval_interval >= 0, "an integer >= 0"),
            ("run.eval_prompts", self.run.eval_prompts, self.run.eval_prompts >= 0, "an integer >= 0"),
            ("run.call_timeout_s", self.run.call_timeout_s, self.run.call_timeout_s > 0, "a number > 0"),
            ("run.max_restarts", self.run.max_restarts, self.run.max_restarts >= 0, "an integer >= 0"),
            (
                "run.restart_timeout_s",
                self.run.restart_timeout_s,
                self.run.restart_timeout_s > 0,
                "a number > 0",
            ),
            (
                "logging.log_interval",
                self.logging.log_interval,
                self.logging.log_interval >= 1,
                "an integer >= 1",
            ),
            (
                "checkpoint.interval",
                self.checkpoint.interval,
                self.checkpoint.interval >= 0,
                "an integer >= 0",
            ),
            (
                "checkpoint.keep_last",
                self.checkpoint.keep_last,
                self.checkpoint.keep_last >= 1,
                "an integer >= 1",
            ),
        ]
        for role in ("policy", "critic", "rollout", "reference", "reward"):
            res: RoleResources = getattr(self.placement, role)
            checks.append((f"placement.{role}.num_cpus", res.num_cpus, res.num_cpus >= 0, "a number >= 0"))
            checks.append((f"placement.{role}.num_gpus", res.num_gpus, res.num_gpus >= 0, "a number >= 0"))
            checks.append(
                (
                    f"placement.{role}.num_threads",
                    res.num_threads,
                    res.num_threads is None or res.num_threads >= 1,
                    "null (= num_cpus) or an integer >= 1",
                )
            )
        for stage in ("sft", "reward_model", "dpo"):
            st: OfflineStageConfig = getattr(self.offline, stage)
            checks += [
                (f"offline.{stage}.epochs", st.epochs, st.epochs >= 1, "an integer >= 1"),
                (f"offline.{stage}.batch_size", st.batch_size, st.batch_size >= 1, "an integer >= 1"),
                (
                    f"offline.{stage}.lr",
                    st.lr,
                    st.lr is None or st.lr > 0,
                    "null (trainer.lr) or a number > 0",
                ),
                (f"offline.{stage}.beta", st.beta, st.beta > 0, "a number > 0"),
            ]
        pipe = self.pipeline
        checks += [
            ("pipeline.n_demos", pipe.n_demos, pipe.n_demos >= 1, "an integer >= 1"),
            ("pipeline.n_train_prompts", pipe.n_train_prompts, pipe.n_train_prompts >= 1, "an integer >= 1"),
            ("pipeline.n_eval_prompts", pipe.n_eval_prompts, pipe.n_eval_prompts >= 1, "an integer >= 1"),
            (
                "pipeline.preference_prompts",
                pipe.preference_prompts,
                pipe.preference_prompts >= 2,
                "an integer >= 2",
            ),
            ("pipeline.min_gold_gain", pipe.min_gold_gain, pipe.min_gold_gain >= 0, "a number >= 0"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")

        algo, rollout = self.algorithm, self.rollout
        if algo.estimator in ("grpo", "rloo") and rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"rollout.samples_per_prompt={rollout.samples_per_prompt}: estimator {algo.estimator!r} compares "
                f"the samples of one prompt, so it needs at least 2 (set rollout.samples_per_prompt=4, "
                f"or use algorithm.estimator=gae)"
            )
        batch = self.run.prompts_per_step * rollout.samples_per_prompt
        if algo.mini_batch_size > batch:
            raise ConfigError(
                f"algorithm.mini_batch_size={algo.mini_batch_size} is larger than the batch of one step "
                f"(run.prompts_per_step * rollout.samples_per_prompt = {batch}); set it to {batch} or less"
            )
        if algo.mini_batch_size % self.trainer.num_ranks:
            raise ConfigError(
                f"algorithm.mini_batch_size={algo.mini_batch_size} must split evenly across "
                f"trainer.num_ranks={self.trainer.num_ranks} ranks; make it a multiple of {self.trainer.num_ranks}"
            )
        if self.reward.kind == "rule" and not (self.reward.function and ":" in self.reward.function):
            raise ConfigError(
                f"reward.function={self.reward.function!r}: reward.kind='rule' needs 'module:function' "
                f"(e.g. reward.function=rlhf_ray.data.synthetic:gold_reward)"
            )
        if self.run.eval_function is not None and ":" not in self.run.eval_function:
            raise ConfigError(
                f"run.eval_function={self.run.eval_function!r}: expected 'module:function' "
                f"(e.g. rlhf_ray.data.synthetic:gold_reward)"
            )
        if self.reward.kind == "http" and not (self.reward.url or "").startswith(("http://", "https://")):
            raise ConfigError(
                f"reward.url={self.reward.url!r}: reward.kind='http' needs an http(s) URL of the scorer"
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
