"""Bad input fails early and clearly: one row per mistake a user can make, each through the real code
path (config loading, `PPOTrainer` construction, data loading, reward scoring, the HTTP scorer, resume),
asserting that the message names the problem and, where there is one, the fix.

Rows whose case is already covered in depth elsewhere (test_config, test_data, test_rewards,
test_checkpoint) call the same path here and check the message; this module is the single checklist.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from actors.placement import PlacementError
from rlhf_ray.checkpoint import CheckpointError, CheckpointManager
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.data import DataError, PromptSource, load_records
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.models import ModelError, load_tokenizer
from rlhf_ray.rewards import RemoteScorer, RewardError, load_rule_function, score_with_rule
from rlhf_ray.trainer.offline import load_split
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.http_scorer import ScorerServer
from tests.test_ppo_e2e import tiny_rl_config

PROMPTS = ["sort: 3 1 2 =", "sort: 5 4 ="]
RESPONSES = ["1 2 3", "4 5"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=20, n_eval_prompts=4
    )


@dataclass
class Row:
    """`call(env)` must raise `error` (or, with `error=None`, return the text it logged), and the message
    must contain every one of `needles` (a needle that is a function of `env` is built after the call)."""

    call: Callable[[SimpleNamespace], Any]
    error: type[BaseException] | None
    needles: tuple[str | Callable[[SimpleNamespace], str], ...]


# ---- helpers that build a real RL config / trainer ---------------------------------------------------
def rl_cfg(env, **sections) -> RLHFConfig:
    return tiny_rl_config(env.model, env.task, env.tmp / "run", **sections)


def trainer(env, **sections) -> PPOTrainer:
    """Construct the RL trainer: every check that needs no actor runs here."""
    return PPOTrainer(rl_cfg(env, **sections))


def start_roles_with(env, **sections) -> None:
    """Construct and start the RL trainer on the module's Ray cluster (the resource check lives there)."""
    env.request.getfixturevalue("ray_local")
    import ray

    t = trainer(env, **sections)
    start = time.perf_counter()
    try:
        t.start()
    finally:
        t.shutdown()
        # The check came before any actor or placement group: nothing was reserved, nothing waited.
        assert time.perf_counter() - start < 60
        assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")


def one_gpu_more(env) -> int:
    """One GPU more than the module's Ray cluster has, whatever the host (0 on a CPU machine); the count it
    has is kept as `env.gpus` for the message. The one rollout engine asks for all of them."""
    env.request.getfixturevalue("ray_local")
    import ray

    env.gpus = int(ray.cluster_resources().get("GPU", 0))
    return env.gpus + 1


def yaml_file(env, text: str):
    path = env.tmp / "config.yaml"
    path.write_text(text)
    return path


def jsonl(env, name: str, lines: list[bytes]):
    path = env.tmp / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def prompts_from(env, records: list[dict], **data) -> PromptSource:
    cfg = rl_cfg(env, data={"max_prompt_len": 16, **data})
    return PromptSource(records, load_tokenizer(env.model), cfg.data)


def logged(env, fn: Callable[[], Any], logger: str) -> str:
    env.caplog.clear()
    with env.caplog.at_level(logging.WARNING, logger=logger):
        fn()
    return env.caplog.text


def save_tokenizer_without(env, *tokens: str):
    tok = load_tokenizer(env.model)
    for t in tokens:
        setattr(tok, t, None)
    out = env.tmp / "tok"
    tok.save_pretrained(out)
    return out


def checkpoint_of(env, cfg: RLHFConfig) -> None:
    """A sealed checkpoint in the run's checkpoint dir, written by a run with config `cfg`."""
    mgr = CheckpointManager(
        env.tmp / "run" / "checkpoints", 2, cfg.hash(), identity=cfg.checkpoint_identity()
    )
    mgr.save(3, lambda tmp: (tmp / "driver_state.json").write_text("{}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scorer:
    """A local HTTP scorer that answers `body` after `delay` seconds."""

    def __init__(self, body: bytes, delay: float = 0.0):
        def respond(_request, _attempt):
            time.sleep(delay)
            return 200, body

        self.server = ScorerServer(respond)
        self.url = self.server.url

    def score(self, timeout_s: float = 5.0) -> list[float]:
        with self.server:
            return RemoteScorer(self.url, timeout_s=timeout_s, retries=1, backoff_s=0.01)(PROMPTS, RESPONSES)


def write_module(env, name: str, source: str) -> None:
    (env.tmp / f"{name}.py").write_text(source)
    env.monkeypatch.syspath_prepend(str(env.tmp))


# ---- the rows -------------------------------------------------------------------------------------------
ROWS: dict[str, Row] = {
    # configuration
    "unknown config key": Row(
        lambda env: RLHFConfig.from_dict({"algorithm": {"kl_coeff": 0.1}}),
        ConfigError,
        ("unknown config key 'algorithm.kl_coeff'", "did you mean 'algorithm.kl_coef'?"),
    ),
    "misspelt section": Row(
        lambda env: RLHFConfig.from_yaml(yaml_file(env, "rollot: {}\n")),
        ConfigError,
        ("unknown config key 'rollot'", "did you mean 'rollout'?"),
    ),
    "misspelt override": Row(
        lambda env: RLHFConfig.from_dict({}).with_overrides(["trainer.lrr=1e-5"]),
        ConfigError,
        ("unknown config key 'trainer.lrr'", "did you mean 'trainer.lr'?"),
    ),
    "wrong type": Row(
        lambda env: RLHFConfig.from_dict({}).with_overrides(["trainer.lr=fast"]),
        ConfigError,
        ("trainer.lr='fast'", "wrong type", "expected a number"),
    ),
    "wrong type (integer)": Row(
        lambda env: RLHFConfig.from_dict({"trainer": {"num_ranks": 1.5}}),
        ConfigError,
        ("trainer.num_ranks=1.5", "expected an integer"),
    ),
    "out-of-range value": Row(
        lambda env: RLHFConfig.from_dict({"algorithm": {"clip_eps": 1.5}}),
        ConfigError,
        ("algorithm.clip_eps=1.5", "out of range", "(0, 1)"),
    ),
    "out-of-range restart budget": Row(
        lambda env: RLHFConfig.from_dict({"run": {"max_restarts": -1}}),
        ConfigError,
        ("run.max_restarts=-1", ">= 0"),
    ),
    "non-positive restart wait": Row(
        lambda env: RLHFConfig.from_dict({"run": {"restart_timeout_s": 0}}),
        ConfigError,
        ("run.restart_timeout_s=0", "a number > 0"),
    ),
    "value not among the choices": Row(
        lambda env: RLHFConfig.from_dict({"algorithm": {"estimator": "ppo2"}}),
        ConfigError,
        ("algorithm.estimator='ppo2'", "choose one of", "'grpo'"),
    ),
    "sleep mode for engines without a GPU": Row(
        lambda env: trainer(env, rollout={"sleep": True}),
        ConfigError,
        ("rollout.sleep=true", "needs a GPU", "placement.rollout.num_gpus=1"),
    ),
    "tensor-parallel engines": Row(
        lambda env: RLHFConfig.from_dict({"rollout": {"tensor_parallel_size": 2}}),
        ConfigError,
        ("rollout.tensor_parallel_size=2", "not supported", "rollout.num_engines"),
    ),
    "colocated NCCL broadcast on GPUs": Row(
        lambda env: RLHFConfig.from_dict(
            {
                "placement": {"mode": "colocate", "policy": {"num_gpus": 1}},
                "rollout": {"weight_sync": "broadcast"},
            }
        ),
        ConfigError,
        ("rollout.weight_sync='broadcast'", "NCCL refuses", "rollout.weight_sync=object_store"),
    ),
    "a group count for a role that has its own": Row(
        lambda env: RLHFConfig.from_dict({"placement": {"rollout": {"num_actors": 2}}}),
        ConfigError,
        ("placement.rollout.num_actors=2", "rollout.num_engines"),
    ),
    "more GPUs than the cluster has": Row(
        lambda env: start_roles_with(env, placement={"rollout": {"num_gpus": one_gpu_more(env)}}),
        PlacementError,
        (
            lambda env: f"GPU: needs {env.gpus + 1:g}, cluster has {env.gpus:g}",
            "placement.<role>.num_cpus/num_gpus",
        ),
    ),
    "more CPUs than the cluster has": Row(
        lambda env: start_roles_with(env, placement={"policy": {"num_cpus": 16}}),
        PlacementError,
        ("CPU: needs 35, cluster has 8", "Lower trainer.num_ranks"),
    ),
    # model and tokenizer
    "missing model path": Row(
        lambda env: trainer(env, model={"policy_path": str(env.tmp / "no-model")}),
        ConfigError,
        ("model.policy_path=", "no-model", "is not a directory", "saved model"),
    ),
    "tokenizer without pad or EOS token": Row(
        lambda env: load_tokenizer(save_tokenizer_without(env, "pad_token", "eos_token")),
        ModelError,
        ("neither a pad token nor an EOS token", "add_special_tokens"),
    ),
    "tokenizer without pad token (handled: EOS pads)": Row(
        lambda env: logged(
            env, lambda: load_tokenizer(save_tokenizer_without(env, "pad_token")), "rlhf_ray.models"
        ),
        None,
        ("has no pad token: padding with its EOS token '<|eos|>'",),
    ),
    # data
    "dataset file missing": Row(
        lambda env: trainer(env, data={"train_path": str(env.tmp / "nope.jsonl")}),
        DataError,
        ("nope.jsonl", "does not exist", "data.train_path"),
    ),
    "dataset path not set": Row(
        lambda env: trainer(env, data={"train_path": ""}),
        DataError,
        ("data.train_path is not set",),
    ),
    "dataset missing the prompt field": Row(
        lambda env: trainer(
            env, data={"train_path": str(jsonl(env, "q.jsonl", [b'{"question": "sort: 1 ="}']))}
        ),
        DataError,
        ("line 1", "no field 'prompt'", "available fields: 'question'", "data.prompt_field"),
    ),
    "preference data missing the chosen field": Row(
        lambda env: load_split(
            rl_cfg(
                env, data={"train_path": str(jsonl(env, "p.jsonl", [b'{"prompt": "a", "rejected": "b"}']))}
            ),
            ["prompt", "chosen", "rejected"],
        ),
        DataError,
        ("no field 'chosen'", "available fields: 'prompt', 'rejected'", "data.prompt_field"),
    ),
    "preference data missing the rejected field": Row(
        lambda env: load_records(
            jsonl(env, "r.jsonl", [b'{"prompt": "a", "chosen": "b"}']), ["prompt", "chosen", "rejected"]
        ),
        DataError,
        ("no field 'rejected'",),
    ),
    "empty prompt": Row(
        lambda env: trainer(
            env,
            data={
                "train_path": str(jsonl(env, "e.jsonl", [b'{"prompt": "sort: 1 ="}', b'{"prompt": "  "}']))
            },
        ),
        DataError,
        ("prompt row 1 is empty", "remove the row or fill in its 'prompt' field"),
    ),
    "over-long prompt (data.overlong_prompt=error)": Row(
        lambda env: prompts_from(env, [{"prompt": "sort: " + "1 " * 30 + "="}], overlong_prompt="error"),
        DataError,
        (
            "prompt row 0 has 32 tokens, more than data.max_prompt_len=16",
            "data.overlong_prompt=skip or truncate",
        ),
    ),
    "over-long prompt (skip: counted and logged)": Row(
        lambda env: logged(
            env,
            lambda: _expect_counts(
                prompts_from(env, [{"prompt": "sort: 1 2 ="}, {"prompt": "sort: " + "1 " * 30 + "="}]),
                skipped=1,
                truncated=0,
            ),
            "rlhf_ray.data.prompts",
        ),
        None,
        ("longer than data.max_prompt_len=16: 1 skipped, 0 truncated (of 2)",),
    ),
    "over-long prompt (truncate: counted and logged)": Row(
        lambda env: logged(
            env,
            lambda: _expect_counts(
                prompts_from(env, [{"prompt": "sort: " + "1 " * 30 + "="}], overlong_prompt="truncate"),
                skipped=0,
                truncated=1,
            ),
            "rlhf_ray.data.prompts",
        ),
        None,
        ("longer than data.max_prompt_len=16: 0 skipped, 1 truncated (of 1)",),
    ),
    "every prompt over-long": Row(
        lambda env: prompts_from(env, [{"prompt": "sort: " + "1 " * 30 + "="}]),
        DataError,
        ("no prompts left", "data.overlong_prompt=truncate"),
    ),
    "non-UTF-8 JSONL line": Row(
        lambda env: trainer(
            env,
            data={"train_path": str(jsonl(env, "u.jsonl", [b'{"prompt": "a"}', b'{"prompt": "\xff\xfe"}']))},
        ),
        DataError,
        ("u.jsonl", "line 2", "not valid UTF-8", "re-save the file as UTF-8"),
    ),
    "malformed JSONL line": Row(
        lambda env: trainer(
            env,
            data={"train_path": str(jsonl(env, "m.jsonl", [b'{"prompt": "a"}', b"", b'{"prompt": "b",']))},
        ),
        DataError,
        ("m.jsonl", "line 3", "malformed JSON"),
    ),
    # rewards
    "reward function returns NaN": Row(
        lambda env: score_with_rule(
            lambda p, r: [0.5, float("nan")], PROMPTS, RESPONSES, "reward.function='m:f'"
        ),
        RewardError,
        ("reward.function='m:f'", "score 1 is nan", "must be finite"),
    ),
    "reward function returns inf": Row(
        lambda env: score_with_rule(
            lambda p, r: [float("-inf"), 1.0], PROMPTS, RESPONSES, "reward.function='m:f'"
        ),
        RewardError,
        ("score 0 is -inf", "must be finite"),
    ),
    "reward function returns a non-number": Row(
        lambda env: score_with_rule(lambda p, r: [1.0, "high"], PROMPTS, RESPONSES, "reward.function='m:f'"),
        RewardError,
        ("score 1 is 'high' (str), not a number",),
    ),
    "reward function returns the wrong count": Row(
        lambda env: score_with_rule(lambda p, r: [1.0], PROMPTS, RESPONSES, "reward.function='m:f'"),
        RewardError,
        ("got 1 scores for 2 responses", "exactly one score per response"),
    ),
    "reward function raises": Row(
        lambda env: score_with_rule(lambda p, r: 1 / 0, PROMPTS, RESPONSES, "reward.function='m:f'"),
        RewardError,
        ("the rule function raised ZeroDivisionError",),
    ),
    "HTTP reward server down": Row(
        lambda env: RemoteScorer(f"http://127.0.0.1:{free_port()}/score", 5, retries=1, backoff_s=0.01)(
            PROMPTS, RESPONSES
        ),
        RewardError,
        ("unavailable after 2 attempts", "cannot connect", "start the scorer or fix reward.url"),
    ),
    "HTTP reward server slow": Row(
        lambda env: Scorer(b'{"scores": [1, 2]}', delay=1.5).score(timeout_s=0.3),
        RewardError,
        ("did not answer within reward.timeout_s=0.3 s", "raise reward.timeout_s"),
    ),
    "HTTP reward server returns garbage": Row(
        lambda env: Scorer(b"<html>503 oops</html>").score(),
        RewardError,
        ("not JSON", "{'scores': [float, ...]}"),
    ),
    "HTTP reward server returns a bad score": Row(
        lambda env: Scorer(b'{"scores": [1, "__import__(\'os\')"]}').score(),
        RewardError,
        ("score 1 is", "not a number"),
    ),
    "rule-function module does not exist": Row(
        lambda env: load_rule_function("no_such_module_xyz:score"),
        RewardError,
        ("module 'no_such_module_xyz' was not found", "PYTHONPATH"),
    ),
    "rule-function module fails to import": Row(
        lambda env: (
            write_module(env, "broken_reward_xyz", "import not_installed_pkg_xyz\n"),
            load_rule_function("broken_reward_xyz:score"),
        ),
        RewardError,
        ("imports 'not_installed_pkg_xyz', which is not installed",),
    ),
    "rule-function attribute missing": Row(
        lambda env: load_rule_function("rlhf_ray.data.synthetic:gold_rewrd"),
        RewardError,
        ("has no attribute 'gold_rewrd'", "gold_reward"),
    ),
    "rule-function path malformed": Row(
        lambda env: RLHFConfig.from_dict(
            {"reward": {"kind": "rule", "function": "rlhf_ray.data.synthetic.gold_reward"}}
        ),
        ConfigError,
        ("reward.function=", "needs 'module:function'"),
    ),
    # resume and outputs
    "resume from a checkpoint of a different model": Row(
        lambda env: (
            checkpoint_of(env, rl_cfg(env).with_overrides([f"model.policy_path={env.tmp}"])),
            trainer(env),
        ),
        CheckpointError,
        ("refusing to resume", "model.policy_path:", "in the checkpoint", "checkpoint.resume=false"),
    ),
    "resume from a checkpoint of a different config": Row(
        lambda env: (
            checkpoint_of(env, rl_cfg(env).with_overrides(["algorithm.clip_eps=0.3"])),
            trainer(env),
        ),
        CheckpointError,
        ("refusing to resume", "algorithm.clip_eps: 0.3 in the checkpoint, 0.2 now", "new run.output_dir"),
    ),
    "output dir not writable": Row(
        lambda env: (
            (env.tmp / "a-file").write_text("x"),
            trainer(env, run={"output_dir": str(env.tmp / "a-file" / "run")}),
        ),
        CheckpointError,
        (
            "run.output_dir=",
            "a-file/run",
            "is not a writable directory",
            "Not a directory",
            "directory this user can write to",
        ),
    ),
    "checkpoint dir not writable": Row(
        lambda env: (
            (env.tmp / "b-file").write_text("x"),
            trainer(env, checkpoint={"dir": str(env.tmp / "b-file" / "ckpt")}),
        ),
        CheckpointError,
        ("checkpoint.dir=", "is not a writable directory"),
    ),
}


def _expect_counts(source: PromptSource, skipped: int, truncated: int) -> None:
    stats = source.stats()
    assert (stats["data/prompts_skipped"], stats["data/prompts_truncated"]) == (skipped, truncated)


# rows that start the module's Ray cluster (the resource check needs one): slow, out of `make test-fast`
STARTS_RAY = {"more GPUs than the cluster has", "more CPUs than the cluster has"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in STARTS_RAY else c for c in ROWS], ids=list(ROWS)
)
def test_bad_input_is_rejected_clearly(case, tmp_path, tiny_model_dir, task, caplog, monkeypatch, request):
    row = ROWS[case]
    env = SimpleNamespace(
        tmp=tmp_path, model=tiny_model_dir, task=task, caplog=caplog, monkeypatch=monkeypatch, request=request
    )
    if row.error is None:
        message = row.call(env)
    else:
        with pytest.raises(row.error) as info:
            row.call(env)
        message = str(info.value)
    for needle in row.needles:
        needle = needle(env) if callable(needle) else needle
        assert needle in message, f"{case}: {needle!r} not in {message!r}"


def test_nothing_of_a_finished_run_is_touched_by_a_refused_resume(tmp_path, tiny_model_dir, task):
    """A refused resume leaves the old run's checkpoint and files as they were."""
    env = SimpleNamespace(tmp=tmp_path, model=tiny_model_dir, task=task)
    old = rl_cfg(env).with_overrides(["algorithm.clip_eps=0.3"])
    checkpoint_of(env, old)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    before = json.loads((ckpt / "manifest.json").read_text())
    with pytest.raises(CheckpointError):
        trainer(env)
    assert json.loads((ckpt / "manifest.json").read_text()) == before
    assert CheckpointManager(ckpt.parent, config_hash=old.hash()).verify(ckpt)["step"] == 3
