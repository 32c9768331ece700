"""The GPU memory plan of an RL run: for each GPU, what each role placed on it needs, in bytes, and whether
it fits. Pure arithmetic on the models' `config.json` shapes, the config and the placement layout (the
caller passes `actors.placement.layout(cfg)`; this module imports no actor code), so a layout that cannot
fit is refused before anything starts, naming the GPU, the roles and the keys to change.

What each role needs (N parameters, d bytes per value: 2 for bfloat16, 4 for float32; `model.dtype=auto`
is bfloat16 on a GPU):

- **Trainer rank** (policy, and the critic for GAE), mixed-precision Adam as in the ZeRO paper (Rajbhandari
  et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", sec. 3.1): weights
  d*N, gradients d*N, optimizer states K*N with K = 12 in bfloat16 (fp32 master weights + Adam's two fp32
  moments) or K = 8 in float32 (the two moments; the weights are their own master): the usual 16 bytes per
  parameter. ZeRO partitions across the R = trainer.num_ranks ranks: stage 1 the optimizer states (K*N/R),
  stage 2 also the gradients (d*N/R), stage 3 also the weights (d*N/R). Offloading removes from the GPU
  the optimizer states (trainer.offload_optimizer) and the weights (trainer.offload_params); gradients are
  counted on the GPU even when offloading (an over-estimate by at most d*N/R). The stage is the one DeepSpeed
  runs (`effective_zero_stage`: one rank runs stage 0 unless offloading).
- **Activations** of one micro-batch of b = trainer.micro_batch_size sequences of s = data.max_prompt_len +
  rollout.max_new_tokens tokens: an ESTIMATE after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", sec. 4.1): s*b*h*(34 + 5*a*s/h) bytes per layer in 16 bits,
  here without the 5*a*s/h attention-score term (SDPA / FlashAttention does not store the s x s scores)
  and scaled by d/2, so L * 34*s*b*h * d/2. With gradient checkpointing each layer keeps only its input
  (2*s*b*h * d/2, the paper's full-recomputation figure) and one layer is recomputed at a time: L * 2*s*b*h
  * d/2 + 34*s*b*h * d/2. A language model adds its logits over the r = rollout.max_new_tokens response
  positions (`response_logprobs` keeps only those): b*r*V*(2d + 4) bytes (the logits, the fp32 exp saved
  by the log-softmax, the logits' gradient). Frozen forwards (reference, reward model, scoring) keep one
  layer at a time: 34*s*b*h * d/2, plus b*r*V*d of logits for a language model.
- **Reference** and **reward model**: weights d*N only (plus a frozen forward while scoring).
- **Rollout engine** (vLLM): rollout.gpu_memory_utilization x GPU memory (weights, KV cache, CUDA graphs;
  vLLM demands that share free at start-up); null means 0.85 on GPUs of its own, 0.4 colocated (both
  defaults, and whether engines sleep, are `rlhf_ray.engine_args`'s). The engine's weights (and
  rollout.kv_cache_gib when set) must fit inside the share. The `hf` engine instead holds the weights and
  the KV cache of its share of the batch: 2*L*kv_heads*head_dim*d bytes per token.
- **Context**: each process on a GPU takes CUDA context, cuBLAS workspace, NCCL and DeepSpeed
  communication buffers: counted as 1 GiB per trainer rank and 0.5 GiB per frozen model.

Phases. The roles of one step take turns: the engines **generate**, the reference, reward and critic
**score**, the trainers **train**. Roles on different GPUs do not compete, but colocated ones do, so each
GPU's need is the largest over the three phases of the sum of its roles' needs in that phase. An engine
with rollout.sleep (the default when colocated on GPUs) releases its share outside generation (vLLM's
sleep mode keeps about 1 GiB: context and CUDA graphs); with trainer.offload_during_rollout the trainers'
optimizer states sit in CPU memory while the engines generate.

Where Ray puts bundles is modelled as placement strategy PACK: bundles in layout order, first fit, onto
nodes of `gpus_per_node` GPUs. Only fractional GPU bundles can share a GPU, so for whole-GPU roles the
per-GPU figures do not depend on this model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_ray.config import ConfigError, RLHFConfig, RoleResources
from rlhf_ray.deepspeed_config import effective_zero_stage
from rlhf_ray.engine_args import engines_sleep, gpu_memory_utilization

GIB = 1024**3
PHASES = ("generate", "score", "train")
TRAINER_CONTEXT = 1 * GIB  # CUDA context, cuBLAS workspace, NCCL and DeepSpeed buckets of a trainer rank
FROZEN_CONTEXT = GIB // 2  # CUDA context and workspace of a reference or reward actor
ENGINE_ASLEEP = 1 * GIB  # what a sleeping vLLM engine keeps: context, CUDA graphs
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
Slot = tuple[int, float, RoleResources]  # actors.placement.Slot: bundle index, share of it, its resources


class MemoryPlanError(ConfigError):
    """The roles do not fit in the GPUs' memory, or a model's shape cannot be read."""


# ---- model shapes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder, read from its HF `config.json`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # the output projection has a bias (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm of head_dim on queries and keys

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], where: str = "config.json") -> ModelShape:
        """The shape of `config` (a parsed `config.json`); `where` names it in errors."""
        model_type = config.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise MemoryPlanError(
                f"{where}: model_type={model_type!r} is not one the memory plan can count; it counts the "
                f"parameters of Llama-family decoders ({', '.join(LLAMA_FAMILY)})"
            )
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=attention_bias,
                mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
            )
        except KeyError as exc:
            raise MemoryPlanError(f"{where}: no {exc.args[0]!r}, which the memory plan needs") from exc

    def trunk_params(self) -> int:
        """Parameters of the embedding, the decoder layers and the final norm (no output head)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        attention += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias  # SwiGLU
        layer = attention + mlp + 2 * h  # + the two RMSNorms
        return self.vocab_size * h + self.num_layers * layer + h

    def causal_lm_params(self) -> int:
        """Parameters of the `*ForCausalLM`: the trunk and an LM head of V*h, shared when tied."""
        return self.trunk_params() + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def value_model_params(self) -> int:
        """Parameters of the critic or reward model (`AutoModelForTokenClassification`, one label): the
        trunk and a scalar head Linear(h, 1) with a bias."""
        return self.trunk_params() + self.hidden_size + 1


def read_shape(path: str | Path, key: str) -> ModelShape:
    """The shape of the HF model directory `path`, named by the config key `key` in errors."""
    config = Path(path) / "config.json"
    if not str(path) or not config.is_file():
        raise MemoryPlanError(
            f"{key}={str(path)!r}: no {config} to read the model's shape from. Set {key} to an HF model "
            f"directory on this machine (its config.json is enough: no weights are read)"
        )
    return ModelShape.from_hf_config(json.loads(config.read_text()), where=str(config))


def model_shapes(cfg: RLHFConfig, need_critic: bool) -> dict[str, ModelShape]:
    """The shapes the plan needs, from the directories the run loads: 'policy' (also the reference and
    the engines), 'critic' (critic_path, else reward_path, else policy_path) and 'reward' (a reward model)."""
    m = cfg.model
    shapes = {"policy": read_shape(m.policy_path, "model.policy_path")}
    if need_critic:
        key = (
            "model.critic_path"
            if m.critic_path
            else "model.reward_path"
            if m.reward_path
            else "model.policy_path"
        )
        shapes["critic"] = read_shape(m.critic_path or m.reward_path or m.policy_path, key)
    if cfg.reward.kind == "model":
        shapes["reward"] = read_shape(m.reward_path or "", "model.reward_path")
    return shapes


# ---- per-role needs -------------------------------------------------------------------------------
@dataclass
class ActorNeed:
    """One actor's bytes on its GPU: the items (weights, grads, ...) and its total in each phase."""

    role: str
    index: int
    items: dict[str, int]
    phases: dict[str, int]
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}]"


@dataclass
class GpuPlan:
    node: int
    gpu: int
    actors: list[ActorNeed] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"node{self.node}:gpu{self.gpu}"

    def phase_totals(self) -> dict[str, int]:
        return {p: sum(a.phases[p] for a in self.actors) for p in PHASES}

    def peak(self) -> tuple[str, int]:
        """The phase with the largest need, and that need."""
        totals = self.phase_totals()
        phase = max(PHASES, key=lambda p: totals[p])
        return phase, totals[phase]


@dataclass
class MemoryPlan:
    gpus: list[GpuPlan]
    on_cpu: list[tuple[str, int, str]]  # role, index, why it needs no GPU memory
    gpu_memory: int
    params: dict[str, int]
    dtype_bytes: int
    zero_stage: int
    errors: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise MemoryPlanError naming every GPU that does not fit (and every engine whose weights do
        not fit its share), with the keys to change."""
        if self.errors:
            raise MemoryPlanError("the memory plan does not fit:\n- " + "\n- ".join(self.errors))


def dtype_bytes(cfg: RLHFConfig) -> int:
    """Bytes per value on a GPU: model.dtype, where auto is bfloat16."""
    return 4 if cfg.model.dtype == "float32" else 2


def trainer_static(cfg: RLHFConfig, n: int) -> dict[str, int]:
    """Weights, gradients and optimizer states of one trainer rank of an `n`-parameter model (ZeRO,
    Rajbhandari et al. 2020: stage >= 1 partitions the optimizer states, >= 2 the gradients, 3 the
    weights, across trainer.num_ranks; offloading removes them from the GPU)."""
    t, d = cfg.trainer, dtype_bytes(cfg)
    ranks = t.num_ranks
    stage = effective_zero_stage(t, ranks)
    k = 12 if d == 2 else 8  # fp32 master + 2 moments, or 2 moments
    return {
        "weights": 0 if t.offload_params else d * n // (ranks if stage == 3 else 1),
        "grads": d * n // (ranks if stage >= 2 else 1),
        "optimizer": 0 if t.offload_optimizer else k * n // (ranks if stage >= 1 else 1),
    }


def seq_len(cfg: RLHFConfig) -> int:
    return cfg.data.max_prompt_len + cfg.rollout.max_new_tokens


def train_activations(cfg: RLHFConfig, shape: ModelShape, lm_head: bool) -> int:
    """Activations of one micro-batch's forward and backward (Korthikanti et al. 2022, simplified: see
    the module docstring); `lm_head` adds the response logits."""
    d, b, s, h = dtype_bytes(cfg), cfg.trainer.micro_batch_size, seq_len(cfg), shape.hidden_size
    layer = 34 * s * b * h * d // 2
    if cfg.trainer.gradient_checkpointing:
        layers = shape.num_layers * 2 * s * b * h * d // 2 + layer
    else:
        layers = shape.num_layers * layer
    logits = b * cfg.rollout.max_new_tokens * shape.vocab_size * (2 * d + 4) if lm_head else 0
    return layers + logits


def frozen_activations(cfg: RLHFConfig, shape: ModelShape, lm_head: bool) -> int:
    """A forward without gradients over one micro-batch: one layer at a time, and the response logits."""
    d, b, s, h = dtype_bytes(cfg), cfg.trainer.micro_batch_size, seq_len(cfg), shape.hidden_size
    logits = b * cfg.rollout.max_new_tokens * shape.vocab_size * d if lm_head else 0
    return 34 * s * b * h * d // 2 + logits


def actor_need(
    cfg: RLHFConfig, role: str, index: int, shapes: Mapping[str, ModelShape], gpu_memory: int
) -> ActorNeed:
    """What actor `index` of `role` needs on its GPU, by item and by phase."""
    d = dtype_bytes(cfg)
    if role in ("policy", "critic"):
        shape = shapes[role]
        n = shape.causal_lm_params() if role == "policy" else shape.value_model_params()
        items = trainer_static(cfg, n)
        items["activations"] = train_activations(cfg, shape, lm_head=role == "policy")
        items["context"] = TRAINER_CONTEXT
        static = items["weights"] + items["grads"] + items["optimizer"] + TRAINER_CONTEXT
        generate = static - (items["optimizer"] if cfg.trainer.offload_during_rollout else 0)
        score = static + frozen_activations(cfg, shape, lm_head=role == "policy")
        return ActorNeed(
            role, index, items, {"generate": generate, "score": score, "train": static + items["activations"]}
        )
    if role == "rollout":
        shape = shapes["policy"]
        weights = d * shape.causal_lm_params()
        if cfg.rollout.engine == "hf":
            sequences = math.ceil(
                cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt / cfg.rollout.num_engines
            )
            kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * d * sequences * seq_len(cfg)
            items = {"weights": weights, "kv_cache": kv, "context": FROZEN_CONTEXT}
            total = weights + kv + FROZEN_CONTEXT
            return ActorNeed(role, index, items, dict.fromkeys(PHASES, total), "hf engine")
        share = round(gpu_memory_utilization(cfg) * gpu_memory)
        rest = ENGINE_ASLEEP if engines_sleep(cfg) else share
        note = "asleep outside generate" if engines_sleep(cfg) else "awake throughout"
        return ActorNeed(
            role, index, {"vllm": share}, {"generate": share, "score": rest, "train": rest}, note
        )
    # frozen models: the reference (the policy's shape) and a reward model
    shape = shapes["policy" if role == "reference" else "reward"]
    n = shape.causal_lm_params() if role == "reference" else shape.value_model_params()
    items = {
        "weights": d * n,
        "activations": frozen_activations(cfg, shape, lm_head=role == "reference"),
        "context": FROZEN_CONTEXT,
    }
    static = items["weights"] + FROZEN_CONTEXT
    return ActorNeed(
        role, index, items, {"generate": static, "score": static + items["activations"], "train": static}
    )


# ---- bundles onto GPUs ----------------------------------------------------------------------------
def assign_gpus(bundles: Sequence[Mapping[str, float]], gpus_per_node: int) -> list[list[tuple[int, int]]]:
    """The (node, GPU) pairs of each bundle: bundles in order, first fit (placement strategy PACK), whole
    GPUs for a bundle of one or more, a fraction of a shared GPU for a bundle of less than one."""
    free: list[list[float]] = []  # per node, per GPU: the fraction still free
    out: list[list[tuple[int, int]]] = []
    for i, bundle in enumerate(bundles):
        g = bundle.get("GPU", 0.0)
        if g <= 0:
            out.append([])
            continue
        whole = math.ceil(g - 1e-9)
        if whole > gpus_per_node:
            raise MemoryPlanError(
                f"bundle {i} asks for {g:g} GPUs, more than one node has (--gpus-per-node {gpus_per_node}); "
                f"a role's actor must fit on one node: lower placement.<role>.num_gpus"
            )
        out.append(_first_fit(free, g, whole, gpus_per_node))
    return out


def _first_fit(free: list[list[float]], g: float, whole: int, per_node: int) -> list[tuple[int, int]]:
    """Take `g` GPUs (`whole` of them when g >= 1) on the first node that has them, else on a new node."""
    for node, gpus in enumerate([*free, [1.0] * per_node]):
        if node == len(free):
            free.append(gpus)
        if g < 1:
            shared = [j for j, left in enumerate(gpus) if left >= g - 1e-9][:1]
        else:
            shared = [j for j, left in enumerate(gpus) if left >= 1 - 1e-9][:whole]
            if len(shared) < whole:
                continue
        for j in shared:
            gpus[j] -= min(g, 1.0)
        if shared:
            return [(node, j) for j in shared]
    raise AssertionError("unreachable: a new node has room for any bundle of at most one node")


# ---- the plan -------------------------------------------------------------------------------------
def plan_memory(
    cfg: RLHFConfig,
    bundles: Sequence[Mapping[str, float]],
    slots: Mapping[str, Sequence[Slot]],
    shapes: Mapping[str, ModelShape],
    gpu_memory_gib: float = 80.0,
    gpus_per_node: int = 8,
) -> MemoryPlan:
    """The memory plan of the layout `(bundles, slots)` (`actors.placement.layout(cfg)`) on GPUs of
    `gpu_memory_gib` GiB, `gpus_per_node` to a node; `shapes` as `model_shapes` gives them. Problems are
    collected in `.errors`; `.check()` raises them."""
    gpu_memory = int(gpu_memory_gib * GIB)
    where = assign_gpus(bundles, gpus_per_node)
    gpus: dict[tuple[int, int], GpuPlan] = {}
    on_cpu: list[tuple[str, int, str]] = []
    errors: list[str] = []
    for role, role_slots in slots.items():
        for index, (bundle, share, res) in enumerate(role_slots):
            if res.num_gpus * share <= 0 or not where[bundle]:
                on_cpu.append((role, index, _cpu_note(cfg, role)))
                continue
            if role == "reward" and cfg.reward.kind != "model":
                on_cpu.append((role, index, f"no model (reward.kind={cfg.reward.kind}); its GPU share idles"))
                continue
            node, gpu = where[bundle][0]  # an actor computes on one device: its first GPU
            plan = gpus.setdefault((node, gpu), GpuPlan(node, gpu))
            plan.actors.append(actor_need(cfg, role, index, shapes, gpu_memory))
    ordered = [gpus[k] for k in sorted(gpus)]
    alike: dict[str, list[str]] = {}  # a problem with the GPU's name and actor indices left out -> GPUs
    for g in ordered:
        problem = _gpu_problem(cfg, g, gpu_memory)
        if problem:
            alike.setdefault(re.sub(r"\[\d+\]", "[i]", problem.split(": ", 1)[1]), []).append(g.name)
    for g in ordered:
        names = next((n for n in alike.values() if n[0] == g.name), None)
        if names:
            more = (
                f" (and {len(names) - 1} more GPUs alike: {', '.join(names[1:])})" if len(names) > 1 else ""
            )
            problem = _gpu_problem(cfg, g, gpu_memory) or ""
            errors.append(problem.replace(f"{g.name}: ", f"{g.name}{more}: ", 1))
    errors += _engine_problems(
        cfg, shapes, gpu_memory, any(a.role == "rollout" for g in ordered for a in g.actors)
    )
    params = {
        role: (s.causal_lm_params() if role == "policy" else s.value_model_params())
        for role, s in shapes.items()
    }
    return MemoryPlan(
        gpus=ordered,
        on_cpu=on_cpu,
        gpu_memory=gpu_memory,
        params=params,
        dtype_bytes=dtype_bytes(cfg),
        zero_stage=effective_zero_stage(cfg.trainer, cfg.trainer.num_ranks),
        errors=errors,
    )


def _cpu_note(cfg: RLHFConfig, role: str) -> str:
    if role == "reward" and cfg.reward.kind != "model":
        return f"no model (reward.kind={cfg.reward.kind})"
    return (
        f"placement.{role}.num_gpus=0: on the CPU (on a cluster with GPUs refused unless "
        f"placement.{role}.allow_cpu=true)"
    )


def _gpu_problem(cfg: RLHFConfig, g: GpuPlan, gpu_memory: int) -> str | None:
    """The error of a GPU whose largest phase does not fit, naming the roles and the keys to change."""
    phase, total = g.peak()
    if total <= gpu_memory:
        return None
    parts = ", ".join(f"{a.name} {a.phases[phase] / GIB:.1f}" for a in g.actors if a.phases[phase])
    return (
        f"{g.name}: in phase '{phase}' {', '.join(a.name for a in g.actors)} need {total / GIB:.1f} GiB "
        f"({parts} GiB) of {gpu_memory / GIB:.1f} GiB. To fit: {'; '.join(_fixes(cfg, g, phase))}"
    )


def _fixes(cfg: RLHFConfig, g: GpuPlan, phase: str) -> list[str]:
    """The keys that lower this GPU's need in `phase`, most effective first."""
    t = cfg.trainer
    roles = {a.role for a in g.actors if a.phases[phase]}
    colocated = cfg.placement.mode == "colocate"
    fixes: list[str] = []
    if roles & {"policy", "critic"}:
        if effective_zero_stage(t, t.num_ranks) < 3 and t.num_ranks > 1:
            fixes.append(f"trainer.zero_stage=3 (now {t.zero_stage}: partitions weights and gradients too)")
        if not t.offload_optimizer:
            fixes.append("trainer.offload_optimizer=true (optimizer states in CPU memory)")
        if effective_zero_stage(t, t.num_ranks) >= 1:
            fixes.append(f"more trainer.num_ranks (now {t.num_ranks}: ZeRO divides the states among them)")
        if phase == "train" and not t.gradient_checkpointing:
            fixes.append("trainer.gradient_checkpointing=true")
        if phase == "train":
            fixes.append(f"a smaller trainer.micro_batch_size (now {t.micro_batch_size})")
    awake = any(
        a.role == "rollout" and "vllm" in a.items and a.phases[phase] == a.items["vllm"] for a in g.actors
    )
    if awake:
        fixes.append(f"a lower rollout.gpu_memory_utilization (now {gpu_memory_utilization(cfg):g})")
        if colocated and phase != "generate" and not engines_sleep(cfg):
            fixes.append("rollout.sleep=true (the engines free their share while the others work)")
        if (
            colocated
            and phase == "generate"
            and not t.offload_during_rollout
            and roles & {"policy", "critic"}
        ):
            fixes.append(
                "trainer.offload_during_rollout=true (optimizer states in CPU memory while generating)"
            )
    for role in sorted(roles & {"reference", "reward"}):
        if len(roles) > 1 and colocated and role == "reference":
            fixes.append("placement.mode=separate (the reference on a GPU of its own)")
        elif len(roles) > 1:
            fixes.append(f"placement.{role}.num_gpus=1 (a GPU of its own for the {role})")
    return fixes or ["GPUs with more memory (--gpu-memory-gib)"]


def _engine_problems(
    cfg: RLHFConfig, shapes: Mapping[str, ModelShape], gpu_memory: int, on_gpu: bool
) -> list[str]:
    """An engine's weights (and rollout.kv_cache_gib) must fit inside its share of the GPU."""
    if not on_gpu or cfg.rollout.engine != "vllm":
        return []
    fraction = gpu_memory_utilization(cfg)
    share = fraction * gpu_memory
    weights = dtype_bytes(cfg) * shapes["policy"].causal_lm_params()
    kv = (cfg.rollout.kv_cache_gib or 0.0) * GIB
    if weights + kv <= share:
        return []
    need = (weights + kv) / gpu_memory
    kv_text = f" + rollout.kv_cache_gib={cfg.rollout.kv_cache_gib:g}" if kv else " + the KV cache"
    return [
        f"rollout: the engine's weights ({weights / GIB:.1f} GiB){kv_text} do not fit in its share "
        f"rollout.gpu_memory_utilization={fraction:g} x {gpu_memory / GIB:.1f} GiB = {share / GIB:.1f} GiB: raise "
        f"rollout.gpu_memory_utilization above {need:.2f}" + (" or lower rollout.kv_cache_gib" if kv else "")
    ]


# ---- the table ------------------------------------------------------------------------------------
COLUMNS = {  # item -> header
    "weights": "weights",
    "grads": "grads",
    "optimizer": "optim",
    "activations": "activ",
    "vllm": "vllm",
    "kv_cache": "kv",
    "context": "ctx",
}


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table, one block per GPU: each role's items and its need in each phase, then the
    GPU's total in each phase and its peak (GiB, 1 GiB = 2**30 bytes)."""

    def gib(b: int) -> str:
        return f"{b / GIB:.2f}" if b else "-"

    shown = [c for c in COLUMNS if any(a.items.get(c) for g in plan.gpus for a in g.actors)]
    params = ", ".join(f"{role} {n / 1e9:.2f} B params" for role, n in plan.params.items())
    dtype = "bfloat16" if plan.dtype_bytes == 2 else "float32"
    lines = [
        f"memory plan: {params}; {dtype}; ZeRO stage {plan.zero_stage}; "
        f"{len(plan.gpus)} GPUs of {plan.gpu_memory / GIB:g} GiB; figures in GiB",
    ]
    head = f"{'gpu':<11} {'role':<13}" + "".join(f"{COLUMNS[c]:>8}" for c in shown) + " |"
    head += "".join(f"{p:>9}" for p in PHASES)
    lines += [head, "-" * len(head)]
    for g in plan.gpus:
        for i, a in enumerate(g.actors):
            cells = "".join(f"{gib(a.items.get(c, 0)):>8}" for c in shown)
            phases = "".join(f"{gib(a.phases[p]):>9}" for p in PHASES)
            lines.append(f"{g.name if i == 0 else '':<11} {a.name:<13}{cells} |{phases}")
        totals = g.phase_totals()
        phase, peak = g.peak()
        fits = "fits" if peak <= plan.gpu_memory else "DOES NOT FIT"
        lines.append(
            f"{'':<11} {'total':<13}{'':>{8 * len(shown)}} |"
            + "".join(f"{gib(totals[p]):>9}" for p in PHASES)
            + f"  peak {peak / GIB:.1f} ({phase}): {fits}"
        )
    for role, index, note in plan.on_cpu:
        lines.append(f"{'cpu':<11} {f'{role}[{index}]':<13} {note}")
    return "\n".join(lines)
