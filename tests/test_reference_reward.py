"""ReferenceModel and RewardModel actors on real Ray with the tiny model: reference log-probs equal the
shared `models.sequence_logprobs`; rewards from a reward model, a rule function and an HTTP scorer; a group
of actors scoring slices of a batch gives what one actor gives on the whole batch."""

from __future__ import annotations

import pytest
import ray
import torch

from actors import role_id
from actors.reference import ReferenceModel
from actors.reward import RewardModel
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data.synthetic import gold_reward
from rlhf_ray.models import (
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    save_pretrained_atomic,
    sequence_logprobs,
    sequence_scores,
)
from rlhf_ray.rewards import serve_rule_function
from rlhf_ray.rollout_batch import build_rollout_batch
from rlhf_ray.trainer.scoring import score_joined

pytestmark = pytest.mark.slow

PROMPTS = ["sort: 3 1 2 =", "sort: 9 5 =", "sort: 4 4 8 1 0 =", "sort: 7 7 7 =", "sort: 2 0 ="]
RESPONSES = ["1 2 3", "5 9 9 5 9", "0 1 4 8", "7 7", "="]
TEMPERATURE = 0.7


def make_cfg(model_dir, **reward) -> RLHFConfig:
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": str(model_dir), "dtype": "float32", **reward.pop("model", {})},
            "rollout": {"temperature": TEMPERATURE},
            "trainer": {"micro_batch_size": 2},  # 5 rows: chunks of 2, 2, 1
            "algorithm": {"mini_batch_size": 8},
            "reward": reward,
        }
    )


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    meta = {"prompt": PROMPTS, "response": RESPONSES, "prompt_index": list(range(len(PROMPTS)))}
    return build_rollout_batch(prompt_ids, response_ids, None, tok.pad_token_id, meta)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A value model from the tiny LM with a random (non-zero) head, saved like a trained reward model."""
    model = load_value_model(tiny_model_dir, trainable=False)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    return save_pretrained_atomic(model, load_tokenizer(tiny_model_dir), tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def scorer_url():
    server, url = serve_rule_function(gold_reward)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def actors(ray_local, tiny_model_dir, reward_model_dir, scorer_url):
    """All actors start together (each start-up is mostly imports)."""
    started = {
        "reference": ReferenceModel.options(num_cpus=1).remote(make_cfg(tiny_model_dir)),
        "model": RewardModel.options(num_cpus=1).remote(
            make_cfg(tiny_model_dir, kind="model", model={"reward_path": str(reward_model_dir)})
        ),
        "rule": RewardModel.options(num_cpus=1).remote(
            make_cfg(tiny_model_dir, kind="rule", function="rlhf_ray.data.synthetic:gold_reward")
        ),
        "http": RewardModel.options(num_cpus=1).remote(
            make_cfg(tiny_model_dir, kind="http", url=scorer_url, timeout_s=10.0)
        ),
    }
    ray.get([a.ping.remote() for a in started.values()])
    yield started
    for a in started.values():
        ray.kill(a)


def test_reference_logprobs_equal_shared_function(actors, batch, tiny_model_dir):
    out = ray.get(actors["reference"].logprobs.remote(batch))
    assert set(out.tensors) == {"ref_logprobs"} and out["ref_logprobs"].shape == batch["input_ids"].shape
    model = load_causal_lm(tiny_model_dir, trainable=False)
    with torch.no_grad():
        want, _ = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], temperature=TEMPERATURE
        )
    response = batch["response_mask"].bool()
    diff = float((out["ref_logprobs"] - want)[response].abs().max())
    print(f"reference vs sequence_logprobs (micro-batched, trimmed): max |diff| {diff:.2e}")
    assert diff < 1e-5
    assert (out["ref_logprobs"][batch["attention_mask"] == 0] == 0).all()
    assert (out["ref_logprobs"][:, 0] == 0).all()
    assert (out["ref_logprobs"][response] != 0).all()


def test_reward_model_scores_last_real_token(actors, batch, reward_model_dir):
    out = ray.get(actors["model"].score.remote(batch))
    assert set(out.tensors) == {"scores"}
    scores = out["scores"]
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    model = load_value_model(reward_model_dir, trainable=False)
    with torch.no_grad():
        want = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(scores, want, atol=1e-5)
    assert scores.std() > 0  # a real head, not the zero-initialised one


@pytest.mark.parametrize("kind", ["rule", "http"])
def test_text_rewards_equal_gold(actors, batch, kind):
    scores = ray.get(actors[kind].score.remote(batch))["scores"]
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(gold_reward(PROMPTS, RESPONSES))


@pytest.mark.parametrize("kind", ["reference", "model", "rule", "http"])
def test_a_group_scores_slices_and_joins_them_in_row_order(actors, batch, kind):
    """`placement.<role>.num_actors` actors each score a contiguous slice; joined, the answers are the
    one actor's on the whole batch. The group here is one actor named several times (the slicing and the
    joining do not care whose the handles are), so it costs no start-up: 2 slices (rows 0-1, 2-4), and 6
    slices for 5 rows, one of them empty, each scored in micro-batches of its own."""
    method, field = ("logprobs", "ref_logprobs") if kind == "reference" else ("score", "scores")
    role = role_id.REFERENCE if kind == "reference" else role_id.REWARD
    ref = ray.put(batch)
    whole = ray.get(getattr(actors[kind], method).remote(ref))[field]
    # the reference's values are read at response positions only (before a micro-batch's first response
    # position it writes 0, and a slice's micro-batches start elsewhere than the whole batch's)
    read = batch["response_mask"].bool() if kind == "reference" else torch.ones_like(whole, dtype=torch.bool)
    for n in (2, 6):
        joined = ray.get(score_joined(ref, role, [actors[kind]] * n, method), timeout=60)[field]
        assert joined.shape == whole.shape
        diff = (joined - whole)[read].abs()
        relative = float((diff / whole[read].abs().clamp(min=1.0)).max())
        print(f"{kind}, {n} slices vs one actor: max |diff| {float(diff.max()):.2e}, relative {relative:.2e}")
        # equal up to float32 rounding: other micro-batch shapes take other kernels' summation orders
        assert relative <= 1e-6, (kind, n, relative)


def test_bad_rule_function_fails_clearly(ray_local, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, kind="rule", function="rlhf_ray.data.synthetic:no_such_function")
    actor = RewardModel.options(num_cpus=0).remote(cfg)
    with pytest.raises(ray.exceptions.RayActorError, match="has no attribute 'no_such_function'"):
        ray.get(actor.ping.remote())
