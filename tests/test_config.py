"""RLHFConfig: YAML + dotted overrides, typed validation with errors that name key, value and fix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from rlhf_ray.config import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OfflineConfig,
    OfflineStageConfig,
    PipelineConfig,
    PlacementConfig,
    RewardConfig,
    RLHFConfig,
    RoleResources,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
    apply_overrides,
    config_reference,
    field_help,
)
from rlhf_ray.experience import OldLogprobs, old_logprobs_source


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_validate_and_round_trip():
    cfg = RLHFConfig.from_dict({"model": {"policy_path": "/m"}})
    again = RLHFConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_saved_config_yaml_loads_back(tmp_path):
    """What a run writes to <output_dir>/config.yaml (yaml.safe_dump of to_dict) is a --config file again."""
    cfg = RLHFConfig.from_dict(
        {"model": {"policy_path": "/m"}, "placement": {"rollout": {"resources": {"n": 1}, "num_threads": 2}}}
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert RLHFConfig.from_yaml(path) == cfg


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, {"algorithm": {"estimator": "gae", "kl_coef": 0.1}, "trainer": {"lr": 1e-5}})
    cfg = RLHFConfig.from_yaml(path, ["algorithm.kl_coef=0.05", "trainer.zero_stage=3", "run.seed=7"])
    assert cfg.algorithm.estimator == "gae"
    assert cfg.algorithm.kl_coef == 0.05
    assert cfg.trainer.zero_stage == 3
    assert cfg.trainer.lr == 1e-5
    assert cfg.run.seed == 7


def test_int_accepted_for_float_and_null_for_optional():
    cfg = RLHFConfig.from_dict({"algorithm": {"kl_coef": 1, "clip_eps_high": None}})
    assert isinstance(cfg.algorithm.kl_coef, float)
    assert cfg.algorithm.clip_eps_high is None


def test_nested_role_resources():
    cfg = RLHFConfig.from_dict({"placement": {"rollout": {"num_cpus": 2, "resources": {"rollout_node": 1}}}})
    assert cfg.placement.rollout.num_cpus == 2.0
    assert cfg.placement.rollout.resources == {"rollout_node": 1.0}


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"algorithm": {"kl_coeff": 0.1}}, ["algorithm.kl_coeff", "did you mean", "algorithm.kl_coef"]),
        ({"algoritm": {}}, ["algoritm", "algorithm"]),
        ({"trainer": {"lr": "fast"}}, ["trainer.lr", "'fast'", "a number"]),
        ({"trainer": {"num_ranks": 1.5}}, ["trainer.num_ranks", "integer"]),
        ({"logging": {"jsonl": "yes"}}, ["logging.jsonl", "true or false"]),
        ({"trainer": {"lr": -1e-5}}, ["trainer.lr", "-1e-05", "> 0"]),
        ({"algorithm": {"clip_eps": 1.0}}, ["algorithm.clip_eps", "(0, 1)"]),
        ({"algorithm": {"estimator": "ppo2"}}, ["algorithm.estimator", "'ppo2'", "'gae'", "'grpo'"]),
        ({"algorithm": {"kl_estimator": "k4"}}, ["algorithm.kl_estimator", "'k3'"]),
        ({"trainer": {"zero_stage": 4}}, ["trainer.zero_stage", "choose one of"]),
        (
            {"algorithm": {"estimator": "grpo"}, "rollout": {"samples_per_prompt": 1}},
            ["rollout.samples_per_prompt=1", "grpo", "at least 2"],
        ),
        (
            {"algorithm": {"estimator": "rloo"}, "rollout": {"samples_per_prompt": 1}},
            ["rollout.samples_per_prompt=1", "rloo"],
        ),
        (
            {
                "algorithm": {"mini_batch_size": 64},
                "run": {"prompts_per_step": 2},
                "rollout": {"samples_per_prompt": 4},
            },
            ["algorithm.mini_batch_size=64", "8"],
        ),
        ({"reward": {"kind": "rule"}}, ["reward.function", "module:function"]),
        ({"reward": {"kind": "http", "url": "localhost:1"}}, ["reward.url", "http"]),
        ({"placement": {"rollout": {"num_gpus": -1}}}, ["placement.rollout.num_gpus", ">= 0"]),
        ({"placement": {"policy": {"num_threads": 0}}}, ["placement.policy.num_threads", "integer >= 1"]),
        ({"algorithm": {"old_logprobs": "rollout"}}, ["algorithm.old_logprobs", "'auto'", "'recompute'"]),
        ({"trainer": 3}, ["trainer", "mapping"]),
    ],
)
def test_bad_config_names_key_value_and_rule(data, needles):
    with pytest.raises(ConfigError) as info:
        RLHFConfig.from_dict(data)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_gae_allows_one_sample_per_prompt():
    cfg = RLHFConfig.from_dict(
        {"algorithm": {"estimator": "gae", "mini_batch_size": 8}, "rollout": {"samples_per_prompt": 1}}
    )
    assert cfg.rollout.samples_per_prompt == 1


def test_bad_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["algorithm.kl_coef"])
    with pytest.raises(ConfigError, match="section.key"):
        apply_overrides({}, ["kl_coef=1"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.lrr'"):
        RLHFConfig.from_dict(apply_overrides({}, ["trainer.lrr=1e-5"]))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RLHFConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RLHFConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        RLHFConfig.from_yaml(listy)


def test_hash_tracks_model_and_algorithm_not_logging():
    a = RLHFConfig.from_dict({})
    assert a.hash() == a.with_overrides(["logging.tensorboard=false", "run.total_steps=5"]).hash()
    assert a.hash() != a.with_overrides(["algorithm.clip_eps=0.3"]).hash()
    assert a.hash() != a.with_overrides(["model.policy_path=/other"]).hash()


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads `1e-6` as a string; in a float field it means the number
    cfg = RLHFConfig.from_dict(apply_overrides({"trainer": {"lr": "1e-6"}}, ["algorithm.kl_coef=5e-2"]))
    assert cfg.trainer.lr == 1e-6 and cfg.algorithm.kl_coef == 0.05
    with pytest.raises(ConfigError, match="trainer.lr"):
        RLHFConfig.from_dict({"trainer": {"lr": "fast"}})


@pytest.mark.parametrize(
    ("algorithm", "reuses"),
    [
        ({}, True),  # defaults: ppo_epochs 1, mini-batch = the whole batch of 4 x 4, KL in the loss
        ({"old_logprobs": "recompute"}, False),
        ({"ppo_epochs": 2}, False),  # the second epoch's ratio is not 1: needs the log-probs before it
        ({"mini_batch_size": 8}, False),  # the second mini-batch sees a moved policy
        ({"kl_in": "reward"}, False),  # the reward's KL penalty uses the trainer's log-probs
    ],
)
def test_old_logprobs_come_from_the_update_only_for_one_on_policy_step(algorithm, reuses):
    cfg = RLHFConfig.from_dict(
        {
            "algorithm": {"mini_batch_size": 16, **algorithm},
            "run": {"prompts_per_step": 4},
            "rollout": {"samples_per_prompt": 4},
        }
    )
    assert (old_logprobs_source(cfg) is OldLogprobs.FROM_UPDATE) is reuses


# ---- each section checks its own values ------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "prefix", "needle"),
    [
        (DataConfig(eval_fraction=1.0), "data.", "data.eval_fraction=1.0"),
        (RolloutConfig(top_p=0.0), "rollout.", "rollout.top_p=0.0"),
        (AlgorithmConfig(clip_eps=2), "algorithm.", "algorithm.clip_eps=2"),
        (TrainerConfig(grad_clip=-1.0), "trainer.", "trainer.grad_clip=-1.0"),
        (RoleResources(num_cpus=-1.0), "placement.policy.", "placement.policy.num_cpus=-1.0"),
        (
            PlacementConfig(critic=RoleResources(num_threads=0)),
            "placement.",
            "placement.critic.num_threads=0",
        ),
        (RewardConfig(retries=-1), "reward.", "reward.retries=-1"),
        (RewardConfig(kind="rule", function="no_colon"), "reward.", "reward.function='no_colon'"),
        (RewardConfig(kind="http", url="ftp://x"), "reward.", "reward.url='ftp://x'"),
        (RunConfig(eval_function="gold"), "run.", "run.eval_function='gold'"),
        (RunConfig(max_restarts=-1), "run.", "run.max_restarts=-1"),
        (LoggingConfig(log_interval=0), "logging.", "logging.log_interval=0"),
        (CheckpointConfig(keep_last=0), "checkpoint.", "checkpoint.keep_last=0"),
        (OfflineStageConfig(beta=0.0), "offline.dpo.", "offline.dpo.beta=0.0"),
        (OfflineConfig(sft=OfflineStageConfig(epochs=0)), "offline.", "offline.sft.epochs=0"),
        (PipelineConfig(preference_prompts=1), "pipeline.", "pipeline.preference_prompts=1"),
    ],
)
def test_each_section_checks_its_own_values(section, prefix, needle):
    with pytest.raises(ConfigError) as info:
        section.check(prefix)
    assert needle in str(info.value)


def test_section_defaults_pass_their_own_check():
    cfg = RLHFConfig()
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).check(f"{f.name}.")
    ModelConfig().check("model.")


def test_rules_across_sections_stay_on_the_whole_config():
    # each section alone is fine; together they are not
    AlgorithmConfig(mini_batch_size=64).check("algorithm.")
    RunConfig(prompts_per_step=2).check("run.")
    with pytest.raises(ConfigError, match="algorithm.mini_batch_size=64"):
        RLHFConfig.from_dict({"algorithm": {"mini_batch_size": 64}, "run": {"prompts_per_step": 2}})
    with pytest.raises(ConfigError, match="multiple of 3"):
        RLHFConfig.from_dict({"algorithm": {"mini_batch_size": 32}, "trainer": {"num_ranks": 3}})


# ---- the reference that --help shows ---------------------------------------------------------------
def test_config_reference_covers_every_leaf_key_with_help():
    rows = config_reference()
    keys = [key for key, _, _, _ in rows]
    assert len(keys) == len(set(keys))

    def leaves(data, prefix=""):
        for name, value in data.items():
            if isinstance(value, dict) and name != "resources":
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield prefix + name

    assert keys == list(leaves(RLHFConfig().to_dict()))
    assert [key for key, _, _, help_ in rows if not help_.strip()] == []
    row = {key: (tp, default, help_) for key, tp, default, help_ in rows}
    assert row["algorithm.kl_coef"] == ("float", "0.05", "weight of the KL penalty to the reference")
    assert row["placement.rollout.num_threads"][:2] == ("int | None", "null")
    assert "torch threads" in row["placement.rollout.num_threads"][2]  # the comment block above the field
    assert row["data.overlong_prompt"][1] == '"skip"'


def test_field_help_reads_trailing_and_preceding_comments():
    @dataclass
    class Example:
        a: int = 1  # trailing
        # above, first line
        # above, second line
        b: str = "x"
        c: dict[str, int] = field(
            default_factory=dict,  # a field spread over lines
        )
        d: int = 0

    assert field_help(Example) == {
        "a": "trailing",
        "b": "above, first line above, second line",
        "c": "a field spread over lines",
        "d": "",
    }
