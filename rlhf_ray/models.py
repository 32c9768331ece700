"""Models and tokenizers: load and save Hugging Face causal LMs, value models (the critic and the reward
model: an LM trunk with a scalar head) and tokenizers; build a tiny word-level model for tests and the
quickstart; compute the per-token log-probabilities, values and sequence scores every role shares.

Per-token outputs follow the `Batch` convention: `[B, T]`, aligned with `input_ids`, position t scores
token t given the tokens before it, position 0 holds 0. Sequences are left-aligned and right-padded, so
positions count from 0 at the first token, as in vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhf_ray.algorithms import entropy_from_logits, logprobs_from_logits

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, USER, ASSISTANT = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]
# One turn per message, each closed by EOS; the generation prompt opens the assistant's turn, so a
# response followed by EOS renders exactly as the template's own assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelError(ValueError):
    """A model or tokenizer directory that cannot be used; the message names the path and the fix."""


# ---- tokenizers -----------------------------------------------------------------------------------
def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: text is split on whitespace and each word is one token. Specials (ids 0-5):
    <|pad|> <|bos|> <|eos|> <|unk|> <|user|> <|assistant|>; words outside `words` become <|unk|>. No
    BOS/EOS is added on encoding; `decode` joins words with single spaces; a chat template is set."""
    duplicates = sorted({w for w in words if words.count(w) > 1})
    bad = [w for w in words if not w or w != w.strip() or len(w.split()) != 1 or w in SPECIAL_TOKENS]
    if duplicates or bad:
        raise ValueError(
            f"build_word_tokenizer: words must be unique, non-special, without whitespace; "
            f"duplicates={duplicates}, invalid={bad}"
        )
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece decoding puts one space between tokens; cleanup=False keeps punctuation as written.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, with a pad token guaranteed: a tokenizer without one pads with
    its EOS token (a warning says so). `chat_template` (Jinja) replaces the tokenizer's own."""
    path = _existing_dir(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(
                f"tokenizer at {str(path)!r} has neither a pad token nor an EOS token, so batches cannot be "
                f"padded and responses cannot end; add them and save the tokenizer again, e.g. "
                f"tok.add_special_tokens({{'pad_token': '<pad>', 'eos_token': '</s>'}}); "
                f"model.resize_token_embeddings(len(tok)); tok.save_pretrained(path); model.save_pretrained(path)"
            )
        logger.warning("tokenizer at %s has no pad token: padding with its EOS token %r", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


# ---- the tiny model -------------------------------------------------------------------------------
def tiny_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """A randomly initialised LlamaForCausalLM with tied embeddings, saved with its tokenizer in `out_dir`
    (transformers and vLLM load the directory). Without `tokenizer`, the synthetic task's word tokenizer.
    A small `max_position_embeddings` keeps vLLM's default context (and its memory) small."""
    if tokenizer is None:
        from rlhf_ray.data.synthetic import VOCAB

        tokenizer = build_word_tokenizer(VOCAB)
    if hidden_size % num_heads:
        raise ValueError(f"tiny_model: hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    tokenizer.model_max_length = max_position_embeddings
    return save_pretrained_atomic(model, tokenizer, out_dir)


# ---- loading and saving ---------------------------------------------------------------------------
def enable_zero3_loading(ds_config: dict[str, Any]) -> Any:
    """From now on, in this process, `from_pretrained` of a trainable model builds it under DeepSpeed's ZeRO-3
    init (`deepspeed.zero.Init`), so each rank materialises only its partition of every parameter instead of
    the whole model (transformers 5.19: `HfDeepSpeedConfig` in `transformers/integrations/deepspeed.py`, read
    by `PreTrainedModel.get_init_context` in `modeling_utils.py`). Call it after
    `deepspeed.init_distributed`, with the `ds_config` the engine gets (ZeRO stage 3).

    Returns the `HfDeepSpeedConfig`: transformers holds only a weak reference to it, so the caller keeps the
    object alive for as long as models are loaded (a trainer rank: its lifetime)."""
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(ds_config)
    if not hf_config.is_zero3():
        raise ValueError(
            f"enable_zero3_loading: the DeepSpeed config runs ZeRO stage "
            f"{ds_config.get('zero_optimization', {}).get('stage')}, not 3; only stage 3 partitions parameters"
        )
    return hf_config


def _zero3_loading() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def _whole_loading() -> Iterator[None]:
    """Loads inside are not partitioned even after `enable_zero3_loading`: a frozen model (the DPO ranks'
    reference) never enters an engine, so nothing would gather its partitioned parameters."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' only handle on the active config
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def local_parameter_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model): under ZeRO-3 a parameter
    holds its partition (`ds_tensor`) plus its whole data while that is available (gathered, or kept whole
    by the persistence threshold; an empty placeholder otherwise); without ZeRO-3 the two are equal. Tied
    parameters count once."""
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() + p.data.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in params)


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trainable: bool = True,
) -> PreTrainedModel:
    """A causal LM from a local directory. Trainable: train mode with gradients (partitioned after
    `enable_zero3_loading`); otherwise eval mode with every parameter frozen (the reference model), whole."""
    path = _existing_dir(path, "model")
    with contextlib.nullcontext() if trainable else _whole_loading():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return _prepare(model, device, trainable)


def load_value_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trainable: bool = True,
) -> PreTrainedModel:
    """A value model (critic or reward model): `AutoModelForTokenClassification` with one label, i.e. the
    LM trunk plus a linear scalar head on every position. From a causal-LM directory the trunk weights are
    loaded and the new head is zero-initialised (every value starts at 0); from a directory saved by a
    value model the head is loaded too. The head's dropout is switched off so values are deterministic."""
    path = _existing_dir(path, "model")
    config = AutoConfig.from_pretrained(str(path))
    config.num_labels = 1
    config.classifier_dropout = 0.0
    # transformers reports the new head (and an untied LM's unused lm_head) as a warning; both are expected
    # here, and a missing trunk weight raises below instead.
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        with contextlib.nullcontext() if trainable else _whole_loading():
            model, info = AutoModelForTokenClassification.from_pretrained(
                str(path), config=config, dtype=dtype, output_loading_info=True
            )
    finally:
        report.setLevel(level)
    missing = set(info["missing_keys"])
    trunk_missing = sorted(k for k in missing if not k.startswith("score."))
    if trunk_missing:
        raise ModelError(
            f"model at {str(path)!r}: the value model's trunk weights {trunk_missing[:5]} were not found in the "
            f"checkpoint; point the path at a causal LM or a value model saved by rlhf_ray"
        )
    new_head = [name for name, _ in model.score.named_parameters() if f"score.{name}" in missing]
    head = [getattr(model.score, name) for name in new_head]
    with torch.no_grad(), _gathered(head):
        for param in head:
            param.zero_()
    if new_head:
        logger.info("value model from %s: trunk loaded, scalar head zero-initialised", path)
    return _prepare(model, device, trainable)


def save_pretrained_atomic(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path
) -> Path:
    """`save_pretrained` of the model (and tokenizer) into a temporary sibling directory, then a rename
    onto `out_dir`: a reader never sees a half-written directory. An existing `out_dir` is replaced."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the result from other users
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"{what} path {str(path)!r} is not a directory; give a local save_pretrained directory "
            f"(the hub is never used: HF_HUB_OFFLINE=1)"
        )
    return path


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3-partitioned `params` whole for an in-place change (rank 0's is kept); others as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def _prepare(model: PreTrainedModel, device: str | torch.device, trainable: bool) -> PreTrainedModel:
    if not any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 init placed the partitions
        model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


# ---- per-token computations -----------------------------------------------------------------------
def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    start: int = 1,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log p(token t | tokens < t) of every token t >= `start`, `[B, T]` fp32, earlier positions (position
    0 always) = 0; with `with_entropy`, the entropy of the distribution each token was drawn from, aligned
    the same way. Logits are divided by `temperature` (that of the sampler, to score what it sampled from).
    Differentiable when the model is; the entropy only with `entropy_grad` (without, it is a detached metric
    and its softmax over the vocabulary is not kept for the backward pass: a `[B, T, V]` tensor saved).

    `start` = the first response position (`response_start`) skips the output layer and the softmax on
    the prompt, which no loss reads: on a 45-token chat prompt with 64-token answers that is 40% of the
    largest matmul of a small model (TRL does the same with `logits_to_keep`)."""
    width = input_ids.shape[1]
    start = min(max(start, 1), width)
    keep = width - start + 1  # the positions start-1 .. T-1 predict tokens start .. T (the last is unused)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, :-1]
    if temperature != 1.0:  # in place when no gradient flows: no second [B, T, V] copy
        logits = logits / temperature if logits.requires_grad else logits.div_(temperature)
    logprobs = _pad_left(logprobs_from_logits(logits, input_ids[:, start:]), start)
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            entropy = _pad_left(entropy_from_logits(logits), start)
    return logprobs, entropy


def response_start(response_mask: Tensor) -> int:
    """The first position holding a response token in any row (the width when there is none)."""
    any_response = response_mask.bool().any(dim=0).nonzero()
    return int(any_response[0]) if len(any_response) else response_mask.shape[1]


def token_values(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The critic's value of the state before each token, `[B, T]` fp32: values[:, t] = head(h[:, t-1]),
    position 0 = 0 (aligned with log-probs, so the value at t is V of the prefix that token t extends)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[..., 0]
    return _shift_right(out[:, :-1].float())


def sequence_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The reward model's score of each sequence, `[B]` fp32: the head's output at the last real token."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[..., 0]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.bool() * positions).argmax(dim=1)
    return out.gather(1, last[:, None]).squeeze(1).float()


def _shift_right(x: Tensor) -> Tensor:
    return _pad_left(x, 1)


def _pad_left(x: Tensor, n: int) -> Tensor:
    return torch.nn.functional.pad(x.float(), (n, 0))
