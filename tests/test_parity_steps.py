"""One optimiser step of SFT, the reward model and DPO (issue 12), checked against float64 arithmetic
written out here: the loss formula by hand, torch float64 autograd on a copy of the model, the gradient
clip and the AdamW update by hand. Not against TRL (bench/parity_vs_trl.py does that).

Our side is the stage ranks the jobs run (`SFTRank`, `RewardRank`, `DPORank`: DeepSpeed engine, micro-batch
weighting, the `rlhf_ray.algorithms` losses), one rank in a spawned process (DeepSpeed takes over the
process's distributed state), on a 2-layer slice of SmolLM2-135M-Instruct (its real embeddings and first
two blocks) so that the three stages take seconds. A batch of 4 rows is cut into 2 micro-batches of
unequal token counts, so the loss weighting must make their accumulated gradient the whole batch's.

What one step is checked by:
- the loss our rank reports for the step against the float64 loss at the initial weights;
- every parameter's update against the float64 AdamW update (Adam's first step is nearly sign(g), so
  the update alone does not see a gradient that is off by a constant factor; hence also:)
- the loss our rank reports on a second call, at the updated weights, against the float64 loss at the
  float64-updated weights (it sees any error in the step), and the step must have moved that loss.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward_model", "dpo")
LR = {"sft": 1e-4, "reward_model": 1e-4, "dpo": 1e-4}
WEIGHT_DECAY = 0.01
BETA = 0.1  # DPO
BETAS, EPS, CLIP = (
    (0.9, 0.999),
    1e-8,
    1.0,
)  # torch AdamW defaults (ours); DeepSpeed's clip at trainer.grad_clip
LOSS_TOL = 2e-6  # relative: our fp32 step vs float64, before and after the step (measured: at most 3.8e-7)
UPDATE_TOL = 1e-3  # relative L2 distance of the whole update vector (measured: 1.2e-4 to 3.4e-4)
LOSS_MOVED = 1e-2  # the step must move the loss by more than this, relative (measured: 7% to 40%)


# ---- fixtures: the model slice, the data -----------------------------------------------------------------
@pytest.fixture(scope="module")
def slice_dirs(tmp_path_factory) -> dict[str, Path]:
    """A causal LM (SmolLM2's embeddings and first 2 blocks) and a value model of the same trunk with a
    seeded random scalar head (so the reward model's first step reaches the trunk; a zero head would not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.pretrained import smollm2_dir

    src = smollm2_dir()
    root = tmp_path_factory.mktemp("smollm2_slice")
    config = AutoConfig.from_pretrained(src)
    config.num_hidden_layers = 2
    lm = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32)
    tok = load_tokenizer(src)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    value_config = AutoConfig.from_pretrained(root / "lm")
    value_config.num_labels, value_config.classifier_dropout = 1, 0.0
    value = AutoModelForTokenClassification.from_pretrained(
        root / "lm", config=value_config, dtype=torch.float32
    )
    with torch.no_grad():
        value.score.weight.copy_(
            torch.randn(value.score.weight.shape, generator=torch.Generator().manual_seed(0))
        )
        value.score.weight.mul_(0.05)
        value.score.bias.zero_()
    value.save_pretrained(root / "value")
    tok.save_pretrained(root / "value")
    return {"lm": root / "lm", "value": root / "value"}


def records() -> list[dict[str, str]]:
    """4 arithmetic problems with a right (chosen, response) and a wrong answer of another length."""
    rows = [
        json.loads(line) for line in (ROOT / "jobs/data/arithmetic_train.jsonl").read_text().splitlines()[:4]
    ]
    out = []
    for i, r in enumerate(rows):
        right = f"The answer is {r['answer']}."
        wrong = (
            f"I think it is {r['answer'] + 3}, more or less."
            if i % 2
            else f"The answer is {r['answer'] + 1}."
        )
        out.append({"prompt": r["prompt"] + "\n", "response": right, "chosen": right, "rejected": wrong})
    return out


def stage_config(stage: str, dirs: dict[str, str]):
    from rlhf_ray.config import RLHFConfig

    section = {"epochs": 1, "batch_size": 4, "lr": LR[stage], "beta": BETA, "loss_type": "sigmoid"}
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": dirs["lm"], "reward_path": dirs["value"], "dtype": "float32"},
            "trainer": {
                "num_ranks": 1,
                "lr": LR[stage],
                "weight_decay": WEIGHT_DECAY,
                "warmup_steps": 0,
                "grad_clip": CLIP,
                "micro_batch_size": 2,
            },
            "offline": {stage: section},
            "run": {"seed": 0},
        }
    )


def encoded(stage: str, dirs: dict[str, str]):
    from rlhf_ray.data import encode_preferences, encode_sft
    from rlhf_ray.models import load_tokenizer

    cfg = stage_config(stage, dirs)
    encode = encode_sft if stage == "sft" else encode_preferences
    return encode(records(), load_tokenizer(dirs["lm"]), cfg.data)


# ---- our side, in a spawned process ------------------------------------------------------------------
def _run_ours(dirs: dict[str, str], out_dir: str) -> None:
    """Each stage's rank: one `train` call (one optimiser step), its weights after it, a second call."""
    from actors.dpo_trainer import DPORank
    from actors.reward_trainer import RewardRank
    from actors.sft_trainer import SFTRank

    torch.set_num_threads(2)
    for stage, cls in zip(STAGES, (SFTRank, RewardRank, DPORank)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rank = cls(stage_config(stage, dirs), 0, 1, "127.0.0.1", port)
        rank.init()
        batch = encoded(stage, dirs)
        args = (BETA, "sigmoid") if stage == "dpo" else ()
        first = rank.train(batch, *args)
        after = {k: v.detach().clone() for k, v in rank.engine.module.named_parameters()}
        second = rank.train(batch, *args)
        torch.save({"stats": [first, second], "after": after}, Path(out_dir) / f"{stage}.pt")
        del rank


@pytest.fixture(scope="module")
def ours(slice_dirs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ours")
    proc = mp.get_context("spawn").Process(
        target=_run_ours, args=({k: str(v) for k, v in slice_dirs.items()}, str(out))
    )
    proc.start()
    proc.join(200)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, f"our ranks' process failed (exit code {proc.exitcode}); see its output above"
    return {s: torch.load(out / f"{s}.pt", weights_only=False) for s in STAGES}


# ---- the float64 reference, written out ------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) = logit - logsumexp(logits), `[B, T-1]`."""
    logits = logits[:, :-1]
    chosen = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def sft_loss64(model, b) -> tuple[torch.Tensor, dict[str, float]]:
    """Token mean over the whole batch of -log p of the response tokens (and EOS)."""
    lp = token_logprobs(
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["input_ids"]
    )
    mask = b["response_mask"][:, 1:].double()
    return -(lp * mask).sum() / mask.sum(), {}


def rm_loss64(model, b) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over pairs of -log sigmoid(score(chosen) - score(rejected)); score = the head at the last real
    token; -log sigmoid(x) = log(1 + exp(-x))."""

    def score(side: str) -> torch.Tensor:
        mask = b[f"{side}_attention_mask"]
        out = model(input_ids=b[f"{side}_input_ids"], attention_mask=mask).logits[..., 0]
        last = mask.sum(dim=1) - 1
        return out[torch.arange(len(out)), last]

    diff = score("chosen") - score("rejected")
    loss = torch.log1p(torch.exp(-diff)).mean()
    return loss, {"accuracy": float((diff > 0).double().mean()), "margin": float(diff.mean())}


def dpo_loss64(model, b, reference) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over pairs of -log sigmoid(beta h), h = (policy - reference) summed response log-probs of the
    chosen minus those of the rejected."""

    def logp(m, side: str) -> torch.Tensor:
        ids = b[f"{side}_input_ids"]
        lp = token_logprobs(m(input_ids=ids, attention_mask=b[f"{side}_attention_mask"]).logits, ids)
        return (lp * b[f"{side}_response_mask"][:, 1:].double()).sum(dim=1)

    with torch.no_grad():
        ref_c, ref_r = logp(reference, "chosen"), logp(reference, "rejected")
    chosen, rejected = BETA * (logp(model, "chosen") - ref_c), BETA * (logp(model, "rejected") - ref_r)
    loss = torch.log1p(torch.exp(-(chosen - rejected))).mean()
    stats = {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean())}
    return loss, stats


def adamw_first_step(model: torch.nn.Module, lr: float) -> dict[str, torch.Tensor]:
    """The update of AdamW's first step after clipping the global gradient norm to CLIP (decoupled weight
    decay on matrices only; bias-corrected moments: m_hat = g, v_hat = g^2). Applies it in place and
    returns it per parameter name."""
    params = {k: p for k, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params.values()))
    coef = min(1.0, CLIP / (float(norm) + 1e-6))
    updates = {}
    with torch.no_grad():
        for name, p in params.items():
            g = p.grad * coef
            m_hat = (1 - BETAS[0]) * g / (1 - BETAS[0])
            v_hat = (1 - BETAS[1]) * g * g / (1 - BETAS[1])
            decay = WEIGHT_DECAY if p.dim() >= 2 else 0.0
            new = p * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + EPS)
            updates[name] = new - p
            p.copy_(new)
    return updates


def reference(stage: str, dirs: dict[str, Path]) -> dict[str, Any]:
    """Float64: the loss at the initial weights, the AdamW update, the loss at the updated weights."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    torch.set_num_threads(2)
    b = {k: v for k, v in encoded(stage, {k: str(v) for k, v in dirs.items()}).tensors.items()}
    if stage == "reward_model":
        model = AutoModelForTokenClassification.from_pretrained(dirs["value"], dtype=torch.float64)
        loss_fn = rm_loss64
    else:
        model = AutoModelForCausalLM.from_pretrained(dirs["lm"], dtype=torch.float64)
        if stage == "sft":
            loss_fn = sft_loss64
        else:
            ref = AutoModelForCausalLM.from_pretrained(dirs["lm"], dtype=torch.float64).eval()

            def loss_fn(m, batch):
                return dpo_loss64(m, batch, ref)

    model.eval()  # no dropout (there is none in SmolLM2; gradients still flow)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss, stats = loss_fn(model, b)
    loss.backward()
    updates = adamw_first_step(model, LR[stage])
    with torch.no_grad():
        loss_after, stats_after = loss_fn(model, b)
    return {
        "loss": loss.item(),
        "stats": stats,
        "before": before,
        "updates": updates,
        "loss_after": float(loss_after),
        "stats_after": stats_after,
    }


# ---- the checks -------------------------------------------------------------------------------------------
def check_step(stage: str, ours: dict[str, Any], ref: dict[str, Any]) -> None:
    first, second = ours["stats"]
    got, want = first["loss"], ref["loss"]
    assert abs(got - want) <= LOSS_TOL * abs(want), f"{stage}: step loss {got} vs float64 {want}"
    names = sorted(ref["updates"])
    assert names == sorted(ours["after"]), "our rank trains other parameters than the reference"
    ours_update = torch.cat([(ours["after"][k].double() - ref["before"][k]).flatten() for k in names])
    ref_update = torch.cat([ref["updates"][k].flatten() for k in names])
    distance = float((ours_update - ref_update).norm() / ref_update.norm())
    assert distance <= UPDATE_TOL, f"{stage}: update off by {distance:.2e} (relative L2)"
    moved = abs(ref["loss_after"] - ref["loss"]) / abs(ref["loss"])
    assert moved > LOSS_MOVED, f"{stage}: the step moved the loss by only {moved:.2e}"
    got, want = second["loss"], ref["loss_after"]
    assert abs(got - want) <= LOSS_TOL * abs(want), f"{stage}: loss after the step {got} vs float64 {want}"


def test_sft_one_step_matches_float64(ours, slice_dirs):
    check_step("sft", ours["sft"], reference("sft", slice_dirs))


def test_reward_model_one_step_matches_float64(ours, slice_dirs):
    ref = reference("reward_model", slice_dirs)
    check_step("reward_model", ours["reward_model"], ref)
    for stats, want in zip(ours["reward_model"]["stats"], (ref["stats"], ref["stats_after"])):
        assert stats["accuracy"] == want["accuracy"]  # no tie: the head starts random
        assert stats["margin"] == pytest.approx(want["margin"], rel=1e-4, abs=1e-6)


def test_dpo_one_step_matches_float64(ours, slice_dirs):
    ref = reference("dpo", slice_dirs)
    check_step("dpo", ours["dpo"], ref)
    first, second = ours["dpo"]["stats"]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0  # policy = reference before the step
    for key in ("rewards/chosen", "rewards/rejected"):
        assert second[key] == pytest.approx(ref["stats_after"][key], rel=1e-3, abs=1e-6)
