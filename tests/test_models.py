"""Tokenizers, the tiny model, loading/saving, and the per-token computations every role shares."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from rlhf_ray.data.synthetic import VOCAB
from rlhf_ray.models import (
    ModelError,
    build_word_tokenizer,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    response_start,
    save_pretrained_atomic,
    sequence_logprobs,
    sequence_scores,
    tiny_model,
    token_values,
)


def padded(tok, texts):
    """Right-padded input_ids/attention_mask of `texts` (no special tokens added)."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


TEXTS = ["sort: 3 9 1 4 = 1 3 4 9 <|eos|>", "sort: 5 0 = 0 5", "sort: 1 2 3 4 5 6 = 1 2 3 4 5 6 <|eos|>"]


# ---- tokenizers -----------------------------------------------------------------------------------
def test_word_tokenizer():
    tok = build_word_tokenizer(VOCAB)
    assert tok.convert_ids_to_tokens(list(range(6))) == [
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
        "<|unk|>",
        "<|user|>",
        "<|assistant|>",
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 6 + len(VOCAB)
    ids = tok("sort: 3  9\t1 =")["input_ids"]  # any whitespace splits; nothing is added
    assert tok.convert_ids_to_tokens(ids) == ["sort:", "3", "9", "1", "="]
    assert tok.decode(ids) == "sort: 3 9 1 ="
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == "sort: 3 9 1 ="
    assert tok("sort: banana")["input_ids"][1] == tok.unk_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "sort: 2 1 ="}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>sort: 2 1 =<|eos|><|assistant|>"
    assert tok.convert_ids_to_tokens(tok(rendered)["input_ids"]) == [
        "<|user|>",
        "sort:",
        "2",
        "1",
        "=",
        "<|eos|>",
        "<|assistant|>",
    ]
    with pytest.raises(ValueError, match="duplicates=\\['a'\\]"):
        build_word_tokenizer(["a", "a"])


def test_load_tokenizer_pad_fallback_and_errors(tmp_path, caplog, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token == "<|pad|>" and tok.chat_template
    assert load_tokenizer(tiny_model_dir, chat_template="X").chat_template == "X"

    no_pad = build_word_tokenizer(["a"])
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no_pad")
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.models"):
        tok = load_tokenizer(tmp_path / "no_pad")
    assert tok.pad_token == "<|eos|>" and tok.pad_token_id == tok.eos_token_id == 2
    assert "no pad token" in caplog.text

    neither = build_word_tokenizer(["a"])
    neither.pad_token = None
    neither.eos_token = None
    neither.save_pretrained(tmp_path / "neither")
    with pytest.raises(
        ModelError, match=r"neither.*has neither a pad token nor an EOS token.*add_special_tokens"
    ):
        load_tokenizer(tmp_path / "neither")
    with pytest.raises(ModelError, match="is not a directory"):
        load_tokenizer(tmp_path / "missing")


# ---- the tiny model, loading and saving -----------------------------------------------------------
def test_tiny_model(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        128,
        4,
        4,
        384,
    )
    assert cfg.max_position_embeddings == 256 and cfg.vocab_size == 6 + len(VOCAB)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 855_424
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )
    # the seed decides the weights, and building does not disturb the caller's RNG
    state = torch.random.get_rng_state()
    again = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / "again", seed=0))
    assert torch.equal(torch.random.get_rng_state(), state)
    other = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / "other", seed=1, hidden_size=64))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert other.config.hidden_size == 64


def test_load_causal_lm_modes(tiny_model_dir, tmp_path):
    train = load_causal_lm(tiny_model_dir)
    assert train.training and all(p.requires_grad for p in train.parameters())
    frozen = load_causal_lm(tiny_model_dir, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert load_causal_lm(tiny_model_dir, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="hub is never used"):
        load_causal_lm(tmp_path / "missing")


def test_save_pretrained_atomic(tiny_model_dir, tmp_path):
    model = load_causal_lm(tiny_model_dir, trainable=False)
    tok = load_tokenizer(tiny_model_dir)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0)
    assert save_pretrained_atomic(model, tok, out) == out.resolve()
    assert not (out / "stale.txt").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left
    reloaded = load_causal_lm(out, trainable=False)
    assert torch.equal(reloaded.model.norm.weight, torch.full((128,), 2.0))
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()


# ---- per-token computations -----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_float64(tiny_model_dir, temperature):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, trainable=False)
    ids, mask = padded(tok, TEXTS)
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, ids, mask, temperature=temperature, with_entropy=True)
        assert lp.dtype == torch.float32 and lp.shape == ids.shape and ent.shape == ids.shape
        # reference: the whole model in float64, full log_softmax
        model64 = load_causal_lm(tiny_model_dir, dtype=torch.float64, trainable=False)
        logits = model64(input_ids=ids, attention_mask=mask).logits[:, :-1] / temperature
    logp = torch.log_softmax(logits, dim=-1)
    want = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    assert torch.all(lp[:, 0] == 0) and torch.all(ent[:, 0] == 0)
    real = mask[:, 1:].bool()
    torch.testing.assert_close(lp[:, 1:][real].double(), want[real], atol=2e-5, rtol=0)
    torch.testing.assert_close(ent[:, 1:][real].double(), want_ent[real], atol=2e-5, rtol=0)
    assert sequence_logprobs(model, ids, mask)[1] is None
    # right padding changes nothing at the real positions: each row alone gives the same numbers
    for b, text in enumerate(TEXTS):
        single_ids, single_mask = padded(tok, [text])
        with torch.no_grad():
            alone, _ = sequence_logprobs(model, single_ids, single_mask, temperature=temperature)
        torch.testing.assert_close(alone[0], lp[b, : single_ids.shape[1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("start", [1, 3, 5])
def test_sequence_logprobs_from_a_start_position(tiny_model_dir, start):
    """Scoring from `start` (the output layer runs on the last T - start + 1 positions only) gives the same
    numbers at positions >= start and zeros before; the gradient flows too."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    ids, mask = padded(tok, TEXTS)
    with torch.no_grad():
        full_lp, full_ent = sequence_logprobs(model, ids, mask, temperature=0.7, with_entropy=True)
    lp, ent = sequence_logprobs(model, ids, mask, temperature=0.7, with_entropy=True, start=start)
    assert lp.shape == ids.shape and ent.shape == ids.shape
    assert (lp[:, :start] == 0).all() and (ent[:, :start] == 0).all()
    real = mask[:, start:].bool()
    torch.testing.assert_close(lp[:, start:][real], full_lp[:, start:][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:, start:][real], full_ent[:, start:][real], atol=1e-5, rtol=0)
    (-(lp * mask).sum()).backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_response_start():
    response = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert response_start(response) == 2
    assert response_start(torch.zeros(2, 4)) == 4


def test_sequence_logprobs_are_differentiable(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    ids, mask = padded(tok, TEXTS[:2])
    lp, _ = sequence_logprobs(model, ids, mask)
    (-(lp * mask).sum()).backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_value_model_from_lm(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir, trainable=False)
    vm = load_value_model(tiny_model_dir, trainable=False)
    assert type(vm).__name__ == "LlamaForTokenClassification" and vm.config.num_labels == 1
    ids, mask = padded(tok, TEXTS)
    with torch.no_grad():
        h_lm = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        h_vm = vm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(h_lm, h_vm)  # the causal LM's trunk really loaded
        for name, p in lm.model.named_parameters():
            assert torch.equal(p, vm.model.get_parameter(name)), name
        assert torch.count_nonzero(vm.score.weight) == 0 and torch.count_nonzero(vm.score.bias) == 0
        assert torch.equal(token_values(vm, ids, mask), torch.zeros(ids.shape))
        assert torch.equal(sequence_scores(vm, ids, mask), torch.zeros(len(TEXTS)))
    trainable = load_value_model(tiny_model_dir)
    assert trainable.training and trainable.score.weight.requires_grad
    assert trainable.dropout.p == 0.0  # values do not depend on train/eval mode


def test_value_model_refuses_a_checkpoint_without_its_trunk(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"trunk weights \['model.norm.weight'\] were not found"):
        load_value_model(broken)


def test_values_and_scores_alignment_and_roundtrip(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    vm = load_value_model(tiny_model_dir, trainable=False)
    torch.manual_seed(0)
    with torch.no_grad():
        vm.score.weight.normal_()
        vm.score.bias.fill_(0.25)
    ids, mask = padded(tok, TEXTS)
    with torch.no_grad():
        h = vm.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        head = h @ vm.score.weight.double()[0] + 0.25  # [B, T]: the head at every position
        values = token_values(vm, ids, mask)
        scores = sequence_scores(vm, ids, mask)
    assert values.dtype == torch.float32 and values.shape == ids.shape
    assert torch.all(values[:, 0] == 0)
    torch.testing.assert_close(values[:, 1:].double(), head[:, :-1], atol=1e-5, rtol=0)  # V(t) = head(h[t-1])
    last = mask.sum(1) - 1
    assert last.tolist() == [10, 5, 14]
    torch.testing.assert_close(scores.double(), head[torch.arange(3), last], atol=1e-5, rtol=0)

    out = save_pretrained_atomic(vm, tok, tmp_path / "rm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"]
    reloaded = load_value_model(out, trainable=False)
    assert torch.equal(reloaded.score.bias, torch.tensor([0.25]))  # the trained head is kept, not zeroed
    for (name, a), b in zip(vm.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    plain = AutoModelForTokenClassification.from_pretrained(out)  # a plain transformers load works too
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(reloaded, ids, mask), scores, atol=0, rtol=0)
        torch.testing.assert_close(
            plain.eval()(input_ids=ids, attention_mask=mask).logits[..., 0][:, :-1],
            values[:, 1:],
            atol=1e-6,
            rtol=0,
        )


# ---- vLLM loads the tiny model ---------------------------------------------------------------------
VLLM_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    start = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 28, seed=0)
    prompts = json.loads(sys.argv[2])
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, logprobs=0))
    sampled = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=1))
    result = {
        "max_model_len": llm.llm_engine.model_config.max_model_len,
        "prompt_ids": [o.prompt_token_ids for o in outs],
        "ids": [list(o.outputs[0].token_ids) for o in outs],
        "text": [o.outputs[0].text for o in outs] + [c.text for o in sampled for c in o.outputs],
        "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs],
        "seconds": time.time() - start,
    }
    print("RESULT " + json.dumps(result), flush=True)
""")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_vllm_loads_tiny_model(tiny_model_dir):
    prompts = ["sort: 3 9 1 4 =", "sort: 5 0 5 =", "sort: 9 8 7 6 5 4 ="]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # a separate process: an in-process engine takes over torch's threads and distributed state
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1].removeprefix("RESULT "))
    assert res["max_model_len"] == 256

    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, trainable=False)
    for prompt, prompt_ids, ids, vllm_lp, text in zip(
        prompts, res["prompt_ids"], res["ids"], res["logprobs"], res["text"]
    ):
        prompt_t = torch.tensor([tok(prompt)["input_ids"]])
        assert prompt_ids == prompt_t[0].tolist()
        with torch.no_grad():
            hf = model.generate(
                prompt_t,
                attention_mask=torch.ones_like(prompt_t),
                do_sample=False,
                max_new_tokens=10,
                pad_token_id=tok.pad_token_id,
            )[0, prompt_t.shape[1] :].tolist()
        assert ids == hf[: len(ids)]  # greedy decoding agrees token for token
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            lp, _ = sequence_logprobs(model, full, torch.ones_like(full))
        torch.testing.assert_close(torch.tensor(vllm_lp), lp[0, len(prompt_ids) :], atol=1e-4, rtol=0)
        assert text.strip() == tok.decode(ids, skip_special_tokens=True)
    for text in res["text"]:
        assert "  " not in text and text == text.rstrip()  # single spaces between words
        assert text == "" or text.startswith(" ")  # vLLM decodes after the prompt: one leading space
