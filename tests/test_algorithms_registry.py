"""The registry of estimators and policy losses: built-in names, `module:function` of the user's own, the
config's checks, `loss_agg=auto`, and make_experience going through it (dr_grpo, the overlong penalty).
Float64 values computed by hand; no Ray."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms import (
    AdvantageInputs,
    Estimator,
    compute_gae,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_rloo_advantages,
    estimator_names,
    get_estimator,
    get_policy_loss,
    gspo_policy_loss,
    policy_loss_names,
    ppo_policy_loss,
    register_estimator,
    register_policy_loss,
    resolve_loss_agg,
)
from rlhf_ray.algorithms.registry import ESTIMATORS, POLICY_LOSSES
from rlhf_ray.batch import Batch
from rlhf_ray.config import AlgorithmConfig, ConfigError, RLHFConfig
from rlhf_ray.experience import make_experience

HERE = "tests.test_algorithms_registry"


# a user's own, named as 'tests.test_algorithms_registry:...'
def sevens(x: AdvantageInputs):
    return 7.0 * x.mask, None


critic_sevens = Estimator(sevens, needs_critic=True)


def half_loss(logprobs, old_logprobs, advantages, mask, **_):
    return 0.5 * (logprobs * mask).sum(), {}


not_callable = 3


# ---- names ---------------------------------------------------------------------------------------------
def test_builtin_names():
    assert estimator_names() == ["dr_grpo", "gae", "grpo", "reinforce_pp", "rloo"]
    assert policy_loss_names() == ["gspo", "ppo"]
    assert get_policy_loss("ppo").fn is ppo_policy_loss
    assert get_policy_loss("gspo").fn is gspo_policy_loss


def test_estimator_flags():
    assert [n for n in estimator_names() if get_estimator(n).needs_critic] == ["gae"]
    assert [n for n in estimator_names() if get_estimator(n).needs_groups] == ["dr_grpo", "grpo", "rloo"]
    assert [n for n in estimator_names() if get_estimator(n).whiten] == ["gae", "rloo"]


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as info:
        get_estimator("ppo2")
    for needle in [
        "algorithm.estimator",
        "'ppo2'",
        "'dr_grpo'",
        "'gae'",
        "'grpo'",
        "'reinforce_pp'",
        "'rloo'",
    ]:
        assert needle in str(info.value)
    with pytest.raises(ValueError, match="algorithm.policy_loss='vanilla'.*'gspo', 'ppo'"):
        get_policy_loss("vanilla")


def test_config_rejects_unknown_names_with_the_list():
    with pytest.raises(ConfigError) as info:
        RLHFConfig.from_dict({"algorithm": {"estimator": "drgrpo"}})
    assert "algorithm.estimator='drgrpo'" in str(info.value) and "'dr_grpo'" in str(info.value)
    assert "module:function" in str(info.value)
    with pytest.raises(ConfigError, match="algorithm.policy_loss='gpso'.*'gspo'"):
        RLHFConfig.from_dict({"algorithm": {"policy_loss": "gpso"}})
    with pytest.raises(ConfigError, match="algorithm.estimator=':x'"):
        RLHFConfig.from_dict({"algorithm": {"estimator": ":x"}})


def test_config_accepts_registered_names_and_module_function():
    cfg = RLHFConfig.from_dict({"algorithm": {"estimator": "dr_grpo", "policy_loss": "gspo"}})
    assert (cfg.algorithm.estimator, cfg.algorithm.policy_loss) == ("dr_grpo", "gspo")
    # like reward.function: the form is checked here, the module loaded where it runs
    cfg = RLHFConfig.from_dict(
        {"algorithm": {"estimator": "not_here.mod:fn", "policy_loss": f"{HERE}:half_loss"}}
    )
    assert cfg.algorithm.estimator == "not_here.mod:fn"


def test_config_checks_of_the_new_keys():
    bad = [
        (
            {"algorithm": {"estimator": "dr_grpo"}, "rollout": {"samples_per_prompt": 1}},
            "samples_per_prompt=1",
        ),
        ({"algorithm": {"clip_eps_low": 1.5}}, "algorithm.clip_eps_low"),
        ({"algorithm": {"overlong_buffer": -1}}, "algorithm.overlong_buffer"),
        ({"algorithm": {"overlong_penalty": -1.0}}, "algorithm.overlong_penalty"),
        (
            {"algorithm": {"overlong_buffer": 65}, "rollout": {"max_new_tokens": 64}},
            "rollout.max_new_tokens=64",
        ),
        ({"algorithm": {"policy_loss": "gspo", "dual_clip": 3.0}}, "algorithm.dual_clip=3.0"),
        ({"algorithm": {"loss_agg": "sum"}}, "algorithm.loss_agg"),
    ]
    for data, needle in bad:
        with pytest.raises(ConfigError) as info:
            RLHFConfig.from_dict(data)
        assert needle in str(info.value), (data, str(info.value))
    ok = RLHFConfig.from_dict(
        {"algorithm": {"clip_eps_low": 0.1, "clip_eps_high": 0.28, "overlong_buffer": 16}}
    )
    assert ok.algorithm.loss_agg == "auto"


def test_defaults_keep_the_previous_behaviour():
    algo = AlgorithmConfig()
    assert (algo.estimator, algo.policy_loss, algo.clip_eps_low, algo.overlong_buffer) == (
        "grpo",
        "ppo",
        None,
        0,
    )
    assert resolve_loss_agg(algo.loss_agg, algo.estimator, algo.policy_loss) == "token-mean"


def test_loss_agg_auto():
    assert resolve_loss_agg("auto", "gae", "ppo") == "token-mean"
    assert resolve_loss_agg("auto", "dr_grpo", "ppo") == "seq-mean-token-sum-norm"
    assert resolve_loss_agg("auto", "grpo", "gspo") == "seq-mean-token-mean"
    assert resolve_loss_agg("auto", "dr_grpo", "gspo") == "seq-mean-token-mean"  # the loss's own first
    assert resolve_loss_agg("seq-mean-token-sum", "dr_grpo", "gspo") == "seq-mean-token-sum"  # explicit wins
    assert resolve_loss_agg("auto", f"{HERE}:sevens", f"{HERE}:half_loss") == "token-mean"


# ---- module:function -----------------------------------------------------------------------------------
def test_module_function_specs():
    plain = get_estimator(f"{HERE}:sevens")
    assert plain.fn is sevens and not (plain.needs_critic or plain.needs_groups or plain.whiten)
    assert get_estimator(f"{HERE}:critic_sevens") is critic_sevens  # an Estimator keeps its flags
    assert get_policy_loss(f"{HERE}:half_loss").fn is half_loss
    with pytest.raises(ValueError, match="cannot load"):
        get_estimator("tests.no_such_module:fn")
    with pytest.raises(ValueError, match="cannot load"):
        get_estimator(f"{HERE}:no_such_fn")
    with pytest.raises(ValueError, match="not a function"):
        get_policy_loss(f"{HERE}:not_callable")


def test_register_and_refuse_clashes():
    @register_estimator("test_only_zero", needs_groups=True)
    def zero(x):
        return torch.zeros_like(x.mask), None

    @register_policy_loss("test_only_loss", loss_agg="seq-mean-token-mean")
    def loss(*args, **kwargs):
        return torch.zeros(()), {}

    try:
        assert get_estimator("test_only_zero").needs_groups
        assert resolve_loss_agg("auto", "grpo", "test_only_loss") == "seq-mean-token-mean"
        register_estimator("test_only_zero", needs_groups=True)(zero)  # the same function again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("grpo")(zero)
        with pytest.raises(ValueError, match="cannot hold"):
            register_policy_loss("a:b")(loss)
    finally:
        ESTIMATORS.pop("test_only_zero", None)
        POLICY_LOSSES.pop("test_only_loss", None)


# ---- the built-in estimators are the functions of advantages.py, unchanged -------------------------------
def _inputs(group_size=3):
    g = torch.Generator().manual_seed(13)
    mask = torch.zeros(6, 7, dtype=torch.float64)
    for i, n in enumerate([3, 5, 1, 4, 2, 5]):
        mask[i, 1 : 1 + n] = 1
    rewards = torch.randn(6, 7, generator=g, dtype=torch.float64) * mask
    values = torch.randn(6, 7, generator=g, dtype=torch.float64) * mask
    return AdvantageInputs(rewards, mask, group_size, 0.9, 0.8, values)


def test_builtin_estimators_equal_the_functions():
    x = _inputs()
    seq = x.token_rewards.sum(dim=1)
    adv, ret = get_estimator("gae")(x)
    exp_adv, exp_ret = compute_gae(x.token_rewards, x.values, x.mask, 0.9, 0.8)
    assert torch.equal(adv, exp_adv) and torch.equal(ret, exp_ret)
    expected = {
        "grpo": compute_grpo_advantages(seq, 3)[:, None] * x.mask,
        "dr_grpo": compute_grpo_advantages(seq, 3, scale_by_std=False)[:, None] * x.mask,
        "rloo": compute_rloo_advantages(seq, 3)[:, None] * x.mask,
        "reinforce_pp": compute_reinforce_pp_advantages(x.token_rewards, x.mask, gamma=0.9),
    }
    for name, want in expected.items():
        adv, ret = get_estimator(name)(x)
        assert ret is None and torch.equal(adv, want), name


def test_dr_grpo_hand_values():
    mask = torch.tensor(
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64
    )
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    adv, _ = get_estimator("dr_grpo")(
        AdvantageInputs(scores[:, None] * mask / mask.sum(1, keepdim=True), mask, 2, 1, 1)
    )
    # groups (3, 1): mean 2, +-1 without the std (GRPO would give +-1 / (sqrt(2) + 1e-6)); (2, 2): 0
    expected = torch.tensor(
        [[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)


# ---- make_experience through the registry -----------------------------------------------------------------
def _batch(lengths, scores, t=4) -> Batch:
    n = len(lengths)
    mask = torch.zeros(n, t)
    for i, length in enumerate(lengths):
        mask[i, 1 : 1 + length] = 1
    lp = -0.5 * mask
    return Batch(
        {
            "input_ids": torch.ones(n, t, dtype=torch.long),
            "attention_mask": torch.ones(n, t, dtype=torch.long),
            "response_mask": mask,
            "logprobs": lp,
            "ref_logprobs": lp,
            "scores": torch.tensor(scores),
        }
    )


def test_make_experience_dr_grpo_and_overlong_penalty():
    algo = AlgorithmConfig(estimator="dr_grpo", overlong_buffer=2, overlong_penalty=1.0)
    # max_len 3, band (1, 3]: length 1 loses 0, length 3 loses 1 -> scores (1, 0): dr_grpo +-0.5
    out, stats = make_experience(_batch([1, 3], [1.0, 1.0]), algo, kl_coef=0.0, group_size=2, max_len=3)
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, -0.5, -0.5, -0.5]])
    assert torch.equal(out["advantages"], expected)
    assert stats["overlong/penalty_mean"] == pytest.approx(-0.5)
    assert stats["overlong/frac_penalised"] == 0.5
    assert stats["reward/mean"] == 1.0  # the raw scores
    # off (the default): equal scores, no advantage, no overlong stats
    out, stats = make_experience(_batch([1, 3], [1.0, 1.0]), AlgorithmConfig(estimator="dr_grpo"), 0.0, 2)
    assert torch.equal(out["advantages"], torch.zeros(2, 4)) and "overlong/penalty_mean" not in stats
    with pytest.raises(ValueError, match="max_len"):
        make_experience(_batch([1, 3], [1.0, 1.0]), algo, 0.0, 2)


def test_make_experience_with_a_users_estimator():
    algo = AlgorithmConfig(estimator=f"{HERE}:sevens")
    out, _ = make_experience(_batch([1, 2], [0.0, 1.0]), algo, kl_coef=0.0, group_size=1)
    assert torch.equal(out["advantages"], 7.0 * out["response_mask"])
    with pytest.raises(ValueError, match="no 'values'"):
        make_experience(
            _batch([1, 2], [0.0, 1.0]), AlgorithmConfig(estimator=f"{HERE}:critic_sevens"), 0.0, 1
        )
