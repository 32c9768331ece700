"""The GPU memory plan (rlhf_ray.memory_plan, python -m jobs.plan): parameter counts against transformers'
own, per-GPU figures against arithmetic written out by hand, the phases of colocated roles, refusals that
name the GPU, the role and the key, and the CLI on every shipped jobs/configs/gpu_*.yaml. Fast: no Ray
cluster, no GPU, no weights (the 7B model is a config.json alone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen3Config,
)

from jobs.plan import build_plan, main
from rlhf_ray.config import RLHFConfig
from rlhf_ray.memory_plan import (
    GIB,
    MemoryPlanError,
    ModelShape,
    assign_gpus,
    format_plan,
    read_shape,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE_7B = "jobs/configs/models/llama-7b-shape"
GPU_CONFIGS = sorted((ROOT / "jobs/configs").glob("gpu_*.yaml"))
N_7B = 6_738_415_616  # Llama-2-7B, counted below by hand
pytestmark = pytest.mark.timeout(120)


# ---- parameter counts -------------------------------------------------------------------------------
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True),
        LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),  # GQA, untied head
        LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=32, attention_bias=True, mlp_bias=True),
        Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),  # q/k/v biases
        Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),  # q/k norms
    ],
    ids=["llama-tied", "llama-gqa-untied", "llama-biases-head-dim", "qwen2", "qwen3"],
)
def test_parameter_count_matches_transformers(config):
    """The count from config.json equals the parameters transformers builds, for the causal LM and for
    the value model (critic, reward) with its one-label head."""
    shape = ModelShape.from_hf_config(config.to_dict())
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_config(config)
        config.num_labels = 1
        value = AutoModelForTokenClassification.from_config(config)
    assert shape.causal_lm_params() == sum(p.numel() for p in lm.parameters())
    assert shape.value_model_params() == sum(p.numel() for p in value.parameters())


def test_tiny_llama_count_is_not_trivially_equal():
    """The check above has teeth: a wrong vocabulary changes the count."""
    config = LlamaConfig(**SMALL, num_key_value_heads=4)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert ModelShape.from_hf_config({**config.to_dict(), "vocab_size": 102}).causal_lm_params() != n


def test_7b_shape_is_llama2_7b():
    # embedding 32000*4096 = 131,072,000; a layer: q,k,v,o 4*4096^2 = 67,108,864, MLP 3*4096*11008 =
    # 135,266,304, two norms 8,192 -> 202,383,360; 32 layers 6,476,267,520; final norm 4,096; untied head
    # 131,072,000: 131,072,000 + 6,476,267,520 + 4,096 + 131,072,000 = 6,738,415,616 (Llama-2-7B's count)
    shape = read_shape(ROOT / SHAPE_7B, "model.policy_path")
    assert shape.causal_lm_params() == N_7B
    # value model: no LM head, a Linear(4096, 1) with bias: 6,738,415,616 - 131,072,000 + 4,097
    assert shape.value_model_params() == 6_607_347_713


def test_unreadable_shapes_are_named(tmp_path):
    with pytest.raises(MemoryPlanError, match=r"model.policy_path='.*nowhere'.*config.json"):
        read_shape(tmp_path / "nowhere", "model.policy_path")
    with pytest.raises(MemoryPlanError, match="model_type='gpt2'.*Llama-family"):
        ModelShape.from_hf_config({"model_type": "gpt2", "n_embd": 64})
    with pytest.raises(MemoryPlanError, match="no 'intermediate_size'"):
        ModelShape.from_hf_config({"model_type": "llama", **{k: v for k, v in SMALL.items() if k[0] != "i"}})


# ---- the 7B policy, hand-computed --------------------------------------------------------------------
def cfg_7b(*overrides: str, mode: str = "separate") -> RLHFConfig:
    """GRPO on the 7B shape: 8 ranks, 1 engine, rule reward; prompts 512 + responses 1024 tokens."""
    data = {
        "model": {"policy_path": str(ROOT / SHAPE_7B)},
        "data": {"max_prompt_len": 512},
        "rollout": {"max_new_tokens": 1024, "num_engines": 1},
        "algorithm": {"estimator": "grpo", "mini_batch_size": 32},
        "trainer": {"num_ranks": 8, "zero_stage": 3, "micro_batch_size": 4},
        "reward": {"kind": "rule", "function": "rlhf_ray.rewards_builtin:concise_reward"},
        "placement": {
            "mode": mode,
            "policy": {"num_gpus": 1},
            "rollout": {"num_gpus": 1},
            "reference": {"num_gpus": 1},
        },
    }
    return RLHFConfig.from_dict(data).with_overrides(list(overrides))


def policy_rank0(plan):
    return next(a for g in plan.gpus for a in g.actors if a.name == "policy[0]")


def test_zero3_over_8_ranks_bf16_adam():
    """ZeRO-3 over 8 x 80 GiB, bf16 + Adam: each rank holds 1/8 of the bf16 weights (2N/8), of the bf16
    gradients (2N/8) and of the fp32 master weights and two moments (12N/8)."""
    plan = build_plan(cfg_7b(), gpu_memory_gib=80)
    items = policy_rank0(plan).items
    assert items["weights"] == 1_684_603_904  # 2 * 6,738,415,616 / 8
    assert items["grads"] == 1_684_603_904  # 2 * 6,738,415,616 / 8
    assert items["optimizer"] == 10_107_623_424  # 12 * 6,738,415,616 / 8
    # activations, no checkpointing: 32 layers * 34 * s=1536 * b=4 * h=4096 bytes = 27,380,416,512, plus the
    # response logits b=4 * r=1024 * V=32000 * (2+4+2) bytes = 1,048,576,000
    assert items["activations"] == 28_428_992_512
    assert plan.errors == []  # 1.57 + 1.57 + 9.41 + 26.48 + 1 (context) GiB = 40.0 GiB < 80
    assert [(g.node, g.gpu) for g in plan.gpus] == [(0, i) for i in range(8)] + [(1, 0), (1, 1)]


def test_gradient_checkpointing_activations():
    items = policy_rank0(build_plan(cfg_7b("trainer.gradient_checkpointing=true"))).items
    # each layer keeps its input, 32 * 2 * 1536 * 4 * 4096 = 1,610,612,736; one layer recomputed at a
    # time, 34 * 1536 * 4 * 4096 = 855,638,016; the logits as before, 1,048,576,000
    assert items["activations"] == 3_514_826_752


@pytest.mark.parametrize(
    "overrides, weights, grads, optimizer",
    [
        # ZeRO-2: weights whole (2N), gradients and optimizer states partitioned
        (["trainer.zero_stage=2"], 13_476_831_232, 1_684_603_904, 10_107_623_424),
        # ZeRO-1: only the optimizer states partitioned
        (["trainer.zero_stage=1"], 13_476_831_232, 13_476_831_232, 10_107_623_424),
        # ZeRO-0: 2N + 2N + 12N, the 16 bytes per parameter of mixed-precision Adam
        (["trainer.zero_stage=0"], 13_476_831_232, 13_476_831_232, 80_860_987_392),
        # offloading: optimizer states (and under ZeRO-3 the weights) leave the GPU
        (["trainer.offload_optimizer=true", "trainer.offload_params=true"], 0, 1_684_603_904, 0),
        # float32: 4N/8 weights, 4N/8 gradients, 8N/8 for the two moments (no separate master copy)
        (["model.dtype=float32"], 3_369_207_808, 3_369_207_808, 6_738_415_616),
    ],
    ids=["zero2", "zero1", "zero0", "offload", "fp32"],
)
def test_zero_stages_and_offload(overrides, weights, grads, optimizer):
    items = policy_rank0(build_plan(cfg_7b(*overrides))).items
    assert (items["weights"], items["grads"], items["optimizer"]) == (weights, grads, optimizer)


def test_one_rank_runs_stage_0():
    """One rank has nothing to partition: DeepSpeed runs stage 0 (rlhf_ray.deepspeed_config), 16N on the
    GPU, which does not fit 80 GiB; the error names the GPU, the role and the key."""
    plan = build_plan(cfg_7b("trainer.num_ranks=1", "algorithm.mini_batch_size=8"))
    assert policy_rank0(plan).items["optimizer"] == 80_860_987_392  # 12 * 6,738,415,616
    with pytest.raises(MemoryPlanError) as exc:
        plan.check()
    message = str(exc.value)
    assert "node0:gpu0" in message and "policy[0]" in message and "phase 'train'" in message
    assert "trainer.offload_optimizer=true" in message
    assert "trainer.zero_stage=3" not in message  # one rank: ZeRO would partition nothing


def test_vllm_share_on_its_own_gpu():
    plan = build_plan(cfg_7b(), gpu_memory_gib=80)
    engine = next(a for g in plan.gpus for a in g.actors if a.role == "rollout")
    # default 0.85 of 80 GiB on a GPU of its own: 68 GiB = 73,014,444,032 bytes, in every phase (no sleep)
    assert engine.phases == {"generate": 73_014_444_032, "score": 73_014_444_032, "train": 73_014_444_032}
    reference = next(a for g in plan.gpus for a in g.actors if a.role == "reference")
    assert reference.items["weights"] == 13_476_831_232  # 2 * 6,738,415,616, whole on its GPU


# ---- colocated: phases -------------------------------------------------------------------------------
def test_colocated_phases_take_turns():
    """GPU 0 holds policy rank 0, engine 0 and the reference. Generating: the engine's share
    0.4 * 80 GiB, the policy without its optimizer states (offloaded while the engines generate), the
    reference's weights. Training: the engine asleep (1 GiB), the policy with states and activations."""
    cfg = cfg_7b(
        "rollout.sleep=true",
        "trainer.offload_during_rollout=true",
        "rollout.gpu_memory_utilization=0.4",
        "rollout.weight_sync=object_store",
        "rollout.num_engines=8",
        "trainer.gradient_checkpointing=true",
        mode="colocate",
    )
    plan = build_plan(cfg, gpu_memory_gib=80)
    gpu0 = plan.gpus[0]
    assert [a.name for a in gpu0.actors] == ["policy[0]", "rollout[0]", "reference[0]"]
    totals = gpu0.phase_totals()
    # policy 1,684,603,904 * 2 + 1 GiB context = 4,442,949,632; engine 32 GiB = 34,359,738,368; reference
    # 13,476,831,232 + 0.5 GiB context = 14,013,702,144; sum 52,816,390,144
    assert totals["generate"] == 52_816_390_144
    # policy 1,684,603,904 * 2 + 10,107,623,424 + 3,514,826,752 + 1 GiB = 18,065,399,808; engine asleep
    # 1 GiB = 1,073,741,824; reference 14,013,702,144; sum 33,152,843,776
    assert totals["train"] == 33_152_843_776
    assert gpu0.peak() == ("generate", 52_816_390_144)
    assert plan.errors == []


def test_colocated_engine_awake_throughout_does_not_fit():
    """Without sleep the engine keeps 0.7 * 80 GiB while the trainer trains beside it: refused, naming
    the GPU, the roles, the total and the keys that help."""
    cfg = cfg_7b(
        "rollout.sleep=false",
        "rollout.gpu_memory_utilization=0.7",
        "rollout.weight_sync=object_store",
        "rollout.num_engines=8",
        "trainer.gradient_checkpointing=true",
        mode="colocate",
    )
    with pytest.raises(MemoryPlanError) as exc:
        build_plan(cfg).check()
    message = str(exc.value)
    # train: policy 18,065,399,808 + engine 0.7 * 80 GiB = 60,129,542,144 + reference 14,013,702,144
    # = 92,208,644,096 bytes = 85.88 GiB
    assert "node0:gpu0: in phase 'train' policy[0], rollout[0], reference[0] need 85.9 GiB" in message
    assert "of 80.0 GiB" in message
    for key in ("rollout.sleep=true", "rollout.gpu_memory_utilization", "trainer.offload_optimizer=true"):
        assert key in message
    assert "node0:gpu1" not in message  # 85.9 - 13.1 (the reference, on GPU 0 only) = 72.8 GiB fits


def test_engine_weights_must_fit_its_share():
    # 0.1 * 80 GiB = 8 GiB < the weights' 2 * 6,738,415,616 bytes = 12.55 GiB
    with pytest.raises(
        MemoryPlanError, match=r"rollout.gpu_memory_utilization=0.1 x 80.0 GiB = 8.0 GiB: raise"
    ):
        build_plan(cfg_7b("rollout.gpu_memory_utilization=0.1")).check()


# ---- bundles onto GPUs, roles on the CPU ------------------------------------------------------------
def test_assign_gpus_packs_in_order():
    bundles = [{"GPU": 1.0}] * 9 + [{"CPU": 1.0}, {"GPU": 0.5}, {"GPU": 0.5}, {"GPU": 2.0}]
    where = assign_gpus(bundles, gpus_per_node=8)
    assert where[:9] == [[(0, i)] for i in range(8)] + [[(1, 0)]]
    assert where[9] == []
    assert where[10] == where[11] == [(1, 1)]  # two halves share a GPU
    assert where[12] == [(1, 2), (1, 3)]
    with pytest.raises(MemoryPlanError, match="more than one node has"):
        assign_gpus([{"GPU": 9.0}], gpus_per_node=8)


def test_roles_without_gpus_are_listed_on_cpu():
    plan = build_plan(cfg_7b("placement.reference.num_gpus=0", "placement.reference.allow_cpu=true"))
    assert ("reference", 0) in [(r, i) for r, i, _ in plan.on_cpu]
    table = format_plan(plan)
    assert re.search(r"cpu\s+reference\[0\]\s+placement.reference.num_gpus=0: on the CPU", table)
    assert "placement.reference.allow_cpu=true" in table
    assert re.search(r"cpu\s+reward\[0\]\s+no model \(reward.kind=rule\)", table)


# ---- the CLI on the shipped configs -----------------------------------------------------------------
def test_the_gpu_configs_are_shipped():
    assert [p.name for p in GPU_CONFIGS] == [
        "gpu_1x8_colocate.yaml",
        "gpu_1x8_separate.yaml",
        "gpu_2x8_separate.yaml",
    ]


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_cli_plans_each_gpu_config(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name the 7B shape relative to the repository root
    plan = main(["--config", str(path.relative_to(ROOT))])
    out = capsys.readouterr().out
    assert out.startswith("memory plan: policy 6.74 B params") and "; bfloat16; ZeRO stage 3; " in out
    assert out.count("fits") == len(plan.gpus) and "DOES NOT FIT" not in out
    expected_gpus = 16 if "2x8" in path.name else 8
    assert len(plan.gpus) == expected_gpus
    assert {g.node for g in plan.gpus} == set(range(expected_gpus // 8))


def test_cli_refuses_a_too_small_gpu(capsys, monkeypatch):
    """The documented failure: the colocated 7B layout on 24 GiB GPUs exits non-zero naming GPU 0."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        main(["--config", "jobs/configs/gpu_1x8_colocate.yaml", "--gpu-memory-gib", "24"])
    assert str(exc.value).startswith("config error: the memory plan does not fit:")
    # every GPU alike: policy 18,065,399,808 + engine asleep 1,073,741,824 + reference 14,013,702,144 bytes
    # = 33,152,843,776 = 30.88 GiB in the train phase
    assert "node0:gpu0 (and 7 more GPUs alike: node0:gpu1, node0:gpu2," in str(exc.value)
    assert "in phase 'train' policy[0], rollout[0], reference[0] need 30.9 GiB" in str(exc.value)
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_names_a_missing_model_path(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    missing = tmp_path / "no-model"
    with pytest.raises(SystemExit) as exc:
        main(["--config", "jobs/configs/gpu_1x8_separate.yaml", f"model.policy_path={missing}"])
    assert f"model.policy_path='{missing}': no {missing}/config.json" in str(exc.value)


def test_readme_shows_the_current_plans(monkeypatch, capsys):
    """cluster/README.md pastes the output of `python -m jobs.plan` for each gpu_*.yaml: it must be what
    the plan prints today (regenerate it with the command above the block when the plan changes)."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "cluster/README.md").read_text()
    for path in GPU_CONFIGS:
        command = f"$ python -m jobs.plan --config jobs/configs/{path.name}\n"
        assert command in readme, f"cluster/README.md shows no plan of {path.name}"
        main(["--config", f"jobs/configs/{path.name}"])
        printed = capsys.readouterr().out
        shown = readme.split(command, 1)[1].split("```", 1)[0]
        assert shown == printed, f"the plan of {path.name} in cluster/README.md is stale:\n{printed}"


def test_gib_is_binary():
    assert GIB == 2**30
