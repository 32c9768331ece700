"""`RolloutEngine`: the Ray actor that samples responses from the current policy.

Two engines behind one interface, chosen by `cfg.rollout.engine`:
- `vllm` (default): vLLM in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), its arguments
  from `rlhf_ray.engine_args` (eager mode and a capped KV cache on CPU; CUDA graphs and a share of the GPU
  on GPU), prefix caching so the samples of one prompt share its KV cache;
- `hf`: transformers `generate`, a fallback that needs nothing beyond transformers.

Sampling is reproducible, per call: the same prompts and `seed` on the same engine give the same
responses. How (`rollout.sampling_seeds`, `rlhf_ray.engine_args.per_sample_seeds`): per_sample (CPU
default) gives sample i of the call its own seed f(seed, i), so a sample is also the same however vLLM
batches it; per_call (GPU default) leaves the requests unseeded and seeds the engine process's global
generators with `seed` right before generating. Without `seed`, the engine draws one per call from
`cfg.run.seed` (and the engine's rank), so a whole run repeats.

Sleep mode (`rollout.sleep`, on by default when colocated on GPUs): `sleep()` frees the engine's GPU memory
while the trainer works; `wake_up(["weights"])` before a weight sync, `wake_up(["kv_cache"])` before
generating. vLLM supports it on GPUs only; an engine without it raises on `sleep`/`wake_up`.

Weights arrive after each training step through either transport of `rlhf_ray.weight_transport`:
`update_weights_from_store(refs)` (object store, one ref per bucket) or `open_broadcast` once + `receive_broadcast` per
sync (torch.distributed side group). Either way the engine reloads in place, re-ties a tied output layer
and drops its prefix cache (cached keys/values were computed with the old weights).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.engine_args import engine_args, per_sample_seeds
from rlhf_ray.rewards import FIELDS_META
from rlhf_ray.rollout_batch import build_rollout_batch, scatter_response_values, split_sequences
from rlhf_ray.runtime import device, has_gpu, resolve_dtype, set_actor_threads, setup_process_env
from rlhf_ray.weight_transport import BroadcastReceiver, ManifestEntry, bucket_bytes, unpack_bucket

WeightIter = Iterable[tuple[str, Tensor]]
SLEEP_TAGS = ("weights", "kv_cache")  # what vLLM's sleep frees and wake_up(tags) takes back, in wake order


def sample_seeds(seed: int, count: int) -> list[int]:
    """Per-sample seeds f(seed, i), i < count: well mixed, in [0, 2**31)."""
    return [int(s) >> 1 for s in np.random.SeedSequence(seed).generate_state(count)]


def seed_global_generators(seed: int) -> None:
    """Seed the generators an unseeded vLLM request draws from in this process (the engine runs in it:
    VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size=1). vLLM 0.32: the V1 model runner's samplers
    draw from torch's default generators (CPU: `TopKTopPSampler.forward_cpu`, `torch.randint`; CUDA:
    `random_sample`, `q.exponential_()`); the V2 model runner (the CUDA default when Triton is present) gives
    each unseeded request a seed from numpy's global generator (`v1/worker/gpu/sample/states.py`,
    `add_request`). `torch.manual_seed` seeds the CPU and every CUDA generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _store_weights(refs: list[ray.ObjectRef]) -> Iterator[tuple[str, Tensor]]:
    """The tensors of an object-store payload (`rlhf_ray.weight_transport.put_weights`: one ref per bucket),
    each bucket fetched only when the loader reaches it: zero-copy, read-only views of the object store's
    shared memory (the loader copies them into the engine's parameters)."""
    for ref in refs:
        yield from unpack_bucket(ray.get(ref))


# ---- engines: plain classes, so they also run outside Ray ------------------------------------------------
class VLLMGenerator:
    """vLLM in this process, engine `rank` of the run. Rollout log-probs are vLLM's `processed_logprobs`:
    those of the distribution actually sampled from (after temperature), which is what the trainer computes
    with the same temperature."""

    def __init__(self, cfg: RLHFConfig, tokenizer_path: str, rank: int = 0):
        from vllm import LLM  # after setup_process_env/set_threads: vLLM reads them at import/start

        gpu = has_gpu()
        args = engine_args(cfg, tokenizer_path, gpu, rank)
        self.cfg = cfg
        self.max_model_len = args["max_model_len"]
        self.per_sample_seeds = per_sample_seeds(cfg, gpu)
        self.can_sleep: bool = args["enable_sleep_mode"]
        self._asleep: set[str] = set()  # of SLEEP_TAGS: what sleep() freed and wake_up() has not taken back
        self.llm = LLM(**args)

    def generate(
        self, prompts: list[list[int]], seed: int, greedy: bool, max_new_tokens: int
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One response per prompt and its sampler log-probs; the same `seed` repeats the call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_awake("generate")
        r = self.cfg.rollout
        seeds: list[int | None] = [None] * len(prompts)
        if greedy:
            pass  # nothing is drawn
        elif self.per_sample_seeds:
            seeds = list(sample_seeds(seed, len(prompts)))
        else:
            seed_global_generators(seed)
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else r.temperature,
                top_p=1.0 if greedy else r.top_p,
                seed=s,
                logprobs=0,
                detokenize=False,
            )
            for s in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        responses, logprobs = [], []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            logprobs.append([float(step[t].logprob) for step, t in zip(c.logprobs, ids)])
        return responses, logprobs

    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """log p(token t | < t) for t >= 1 of each prompt+response (raw logits, temperature 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_awake("score")
        fulls = [p + r for p, r in sequences]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=f) for f in fulls], params, use_tqdm=False)
        return [
            [float(o.prompt_logprobs[t][full[t]].logprob) for t in range(1, len(full))]
            for o, full in zip(outs, fulls)
        ]

    # ---- sleep mode (RECIPES/GPU_PATH: colocated engines sleep while the trainer works) ------------------
    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory: level 1 moves the weights to host memory and drops the KV cache,
        level 2 drops the weights too (the next weight sync must then send all of them). Does nothing when
        already asleep. Needs sleep mode (`rollout.sleep`, `rlhf_ray.engine_args.sleep_enabled`)."""
        self._require_sleep_mode("sleep")
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level}): level 1 (weights to host memory) or 2 (weights dropped)")
        if not self._asleep:
            self.llm.sleep(level=level)
            self._asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory of `tags` (None: all): "weights" before a weight sync, then "kv_cache"
        before generating, so the trainer's weights and the KV cache are never both allocated anew at once.
        Tags already awake are skipped; vLLM resumes scheduling once everything is awake."""
        self._require_sleep_mode("wake_up")
        wanted = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = [t for t in wanted if t not in SLEEP_TAGS]
        if unknown:
            raise ValueError(f"wake_up(tags={tags}): unknown tags {unknown}; vLLM's are {list(SLEEP_TAGS)}")
        todo = [t for t in SLEEP_TAGS if t in wanted and t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    def is_sleeping(self) -> bool:
        """Whether any of the engine's memory is still freed by `sleep` (it cannot generate until not)."""
        return bool(self._asleep)

    def _require_sleep_mode(self, what: str) -> None:
        if not self.can_sleep:
            raise RuntimeError(
                f"{what}: this engine runs without vLLM's sleep mode (rollout.sleep={self.cfg.rollout.sleep}, "
                f"placement.mode={self.cfg.placement.mode}, GPU: {has_gpu()}); sleep mode is on with "
                f"rollout.sleep=true, or by default when colocated on GPUs, and needs a GPU"
            )

    def _require_awake(self, what: str) -> None:
        # a sleeping vLLM engine pauses its scheduler: llm.generate would wait forever instead of failing
        if self._asleep:
            raise RuntimeError(
                f"{what}: the engine is asleep ({sorted(self._asleep)} freed); call wake_up() first"
            )

    def load_weights(self, weights: WeightIter) -> None:
        """RECIPES "Updating weights in place": `reload_weights` (plain `load_weights` misses vLLM's CPU
        repacking), re-tie a tied output layer, drop the prefix cache."""
        executor = self.llm.llm_engine.model_executor
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        if worker is None:
            raise RuntimeError(
                "in-place weight update needs vLLM's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                "and rollout.tensor_parallel_size=1); use more engines (rollout.num_engines) instead of TP"
            )
        with _quiet_tied_head_warnings():
            worker.reload_weights(weights_iterator=iter(weights))
        model = worker.model_runner.model
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            model.lm_head.weight = model.model.embed_tokens.weight
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        self.llm.reset_prefix_cache()


@contextlib.contextmanager
def _quiet_tied_head_warnings() -> Iterator[None]:
    """vLLM warns "<Layer>: Failed to load weights" for the tied head and rotary buffers we deliberately do
    not send (the head is re-tied right after); hide exactly those lines, once per update."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Failed to load weights" not in record.getMessage()

    flt = _Filter()
    loggers = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("vllm")]
    handlers = {h for lg in [*loggers, logging.getLogger()] for h in lg.handlers}
    for h in handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(flt)


class HFGenerator:
    """transformers `generate` (left-padded batches). A call with one seed is reproducible, but a sample
    depends on the whole call (one generator for the batch), not only on its own seed. No sleep mode: it
    is vLLM's, and this fallback is not meant to share a GPU with the trainer (`sleep`/`wake_up` raise)."""

    can_sleep = False

    def __init__(self, cfg: RLHFConfig, tokenizer, micro_batch: int = 64):
        from rlhf_ray.models import load_causal_lm

        self.cfg, self.tok, self.micro_batch = cfg, tokenizer, micro_batch
        self.device = device()
        self.model = load_causal_lm(
            cfg.model.policy_path, dtype=resolve_dtype(cfg.model.dtype), device=self.device, trainable=False
        )

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], seed: int, greedy: bool, max_new_tokens: int
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One response per prompt and its sampler log-probs; micro-batch k draws from the seed of its
        first sample, f(seed, start of k)."""
        r, pad, eos = self.cfg.rollout, self.tok.pad_token_id, self.tok.eos_token_id
        seeds = sample_seeds(seed, len(prompts))
        responses, logprobs = [], []
        for start in range(0, len(prompts), self.micro_batch):
            chunk = prompts[start : start + self.micro_batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            gen = torch.Generator(device="cpu").manual_seed(seeds[start] if seeds else 0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=not greedy,
                    temperature=None if greedy else r.temperature,
                    top_p=None if greedy else r.top_p,
                    top_k=0 if not greedy else None,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            new = out.sequences[:, width:]
            temperature = 1.0 if greedy else r.temperature
            step_lp = torch.stack(out.logits, dim=1).float().div(temperature).log_softmax(-1)
            token_lp = step_lp.gather(-1, new[..., None]).squeeze(-1)
            for row, lp in zip(new.tolist(), token_lp.tolist()):
                n = row.index(eos) + 1 if eos in row else len(row)
                responses.append(row[:n])
                logprobs.append(lp[:n])
        return responses, logprobs

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        from rlhf_ray.models import sequence_logprobs

        batch = build_rollout_batch(
            [p for p, _ in sequences], [r for _, r in sequences], None, self.tok.pad_token_id
        )
        lp, _ = sequence_logprobs(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        )
        lengths = batch["attention_mask"].sum(1).tolist()
        return [lp[b, 1:n].tolist() for b, n in enumerate(lengths)]

    def sleep(self, level: int = 1) -> None:
        raise RuntimeError("sleep: the transformers engine has no sleep mode; use rollout.engine=vllm")

    def wake_up(self, tags: list[str] | None = None) -> None:
        raise RuntimeError("wake_up: the transformers engine has no sleep mode; use rollout.engine=vllm")

    def is_sleeping(self) -> bool:
        return False

    @torch.no_grad()
    def load_weights(self, weights: WeightIter) -> None:
        params = dict(self.model.named_parameters())
        unknown = []
        for name, tensor in weights:
            if name in params:
                params[name].copy_(tensor)
            else:
                unknown.append(name)
        if unknown:
            raise KeyError(f"weights not in the rollout model: {unknown[:5]} (a different architecture?)")


# ---- the actor ----------------------------------------------------------------------------------------
@ray.remote
class RolloutEngine:
    """Samples `n` responses per prompt from the current policy and returns them as a `Batch`."""

    def __init__(self, cfg: RLHFConfig, rank: int = 0):
        setup_process_env()
        # before vLLM starts: it takes over the thread count
        self.num_threads = set_actor_threads(cfg.placement.rollout.num_threads)
        from rlhf_ray.models import load_tokenizer

        self.cfg, self.rank = cfg, rank
        tokenizer_path = cfg.model.tokenizer_path or cfg.model.policy_path
        self.tokenizer = load_tokenizer(tokenizer_path, chat_template=cfg.data.chat_template)
        self.engine: VLLMGenerator | HFGenerator
        if cfg.rollout.engine == "vllm":
            self.engine = VLLMGenerator(cfg, tokenizer_path, rank)
        else:
            self.engine = HFGenerator(cfg, self.tokenizer)
        self._seeds = random.Random(cfg.run.seed * 100_003 + rank)
        self._receiver: BroadcastReceiver | None = None
        self._manifest: list[ManifestEntry] = []
        self._stats = {
            "num_generated_tokens": 0,
            "num_prompt_tokens": 0,
            "num_sequences": 0,
            "generate_s": 0.0,
            "num_weight_updates": 0,
            "last_update_s": 0.0,
        }

    def ping(self) -> bool:
        return True

    # ---- generation ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        greedy: bool = False,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        fields: list[dict[str, Any]] | None = None,
    ) -> Batch:
        """`n` samples of each prompt, the samples of one prompt consecutive (meta `prompt_index`).
        `fields[i]`: prompt i's record fields (e.g. its answer), copied to each of its samples (meta
        `FIELDS_META`) so the reward sees them; the engine does not read them."""
        if fields is not None and len(fields) != len(prompts):
            raise ValueError(f"generate: {len(fields)} field records for {len(prompts)} prompts")
        max_new = max_new_tokens or self.cfg.rollout.max_new_tokens
        limit = self.cfg.data.max_prompt_len + self.cfg.rollout.max_new_tokens
        for i, p in enumerate(prompts):
            if not p or len(p) + max_new > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; it needs 1..{limit - max_new} so that it plus "
                    f"max_new_tokens={max_new} fits the engine's context of data.max_prompt_len + "
                    f"rollout.max_new_tokens = {limit} (raise data.max_prompt_len, or shorten the prompt)"
                )
        if seed is None:
            seed = self._seeds.getrandbits(31)
        expanded = [list(p) for p in prompts for _ in range(n)]
        start = time.perf_counter()
        responses, logprobs = self.engine.generate(expanded, seed, greedy, max_new)
        self._stats["generate_s"] += time.perf_counter() - start
        self._stats["num_generated_tokens"] += sum(len(r) for r in responses)
        self._stats["num_prompt_tokens"] += sum(len(p) for p in expanded)
        self._stats["num_sequences"] += len(responses)
        decode = self.tokenizer.decode
        prompt_text = [decode(p, skip_special_tokens=True) for p in prompts]
        meta = {
            "prompt_index": [i for i in range(len(prompts)) for _ in range(n)],
            "prompt": [prompt_text[i] for i in range(len(prompts)) for _ in range(n)],
            "response": [decode(r, skip_special_tokens=True) for r in responses],
        }
        if fields is not None:
            meta[FIELDS_META] = [dict(fields[i]) for i in range(len(prompts)) for _ in range(n)]
        return build_rollout_batch(expanded, responses, logprobs, self.tokenizer.pad_token_id, meta)

    def logprobs(self, batch: Batch) -> Tensor:
        """The engine's log p(token t | < t) of the given sequences, `[B, T]` fp32 aligned with input_ids
        (0 at position 0 and on padding); raw distribution, temperature 1. For tests and diagnostics."""
        sequences = split_sequences(batch)
        values = self.engine.score(sequences)
        return scatter_response_values(values, [1] * len(values), tuple(batch["input_ids"].shape))

    # ---- weights ------------------------------------------------------------------------------------
    def _load(self, weights: WeightIter) -> float:
        start = time.perf_counter()
        self.engine.load_weights(weights)
        elapsed = time.perf_counter() - start
        self._stats["num_weight_updates"] += 1
        self._stats["last_update_s"] = elapsed
        return elapsed

    def update_weights_from_store(self, refs: list[ray.ObjectRef]) -> None:
        """Object-store transport: one ref per bucket (`rlhf_ray.weight_transport.put_weights`), in a list
        so that Ray hands the references over unresolved; loaded bucket by bucket, read zero-copy."""
        self._load(_store_weights(refs))

    def open_broadcast(
        self,
        addr: str,
        port: int,
        rank: int,
        world_size: int,
        manifest: list[ManifestEntry],
        timeout_s: float = 600.0,
    ) -> None:
        """Join the side group of the broadcast transport as `rank` (1..world_size-1), concurrently with
        the sender's `connect`. `manifest` (`weight_manifest` of the trainer's model) fixes what each
        `receive_broadcast` expects; `timeout_s` bounds every wait on the sender."""
        if self._receiver is not None:
            self._receiver.close()
        buckets = bucket_bytes(self.cfg.rollout.weight_bucket_mb)  # the sender cuts with the same size
        self._receiver = BroadcastReceiver(addr, port, rank, world_size, timeout_s, buckets)
        self._receiver.connect()
        self._manifest = [(n, tuple(s), d) for n, s, d in manifest]

    def receive_broadcast(self) -> None:
        """Receive one sync (concurrently with the sender's `send`) and reload the weights as the buckets
        arrive. The receiver lands every bucket in one reused buffer, so each tensor is copied out before
        it goes to the loader: vLLM's in-place reload keeps a layer's tensors until all of that layer's
        weights have arrived (q/k/v of one attention, or gate/up of one MLP, can sit in different buckets)
        and a padded layer's (the vocabulary embedding) until the end, and views would be overwritten by the
        next bucket. So the engine holds one bucket buffer plus the copies its loader still keeps, never a
        second copy of the whole model."""
        if self._receiver is None:
            raise RuntimeError("receive_broadcast: call open_broadcast first")
        self._load((name, t.clone()) for name, t in self._receiver.receive(self._manifest))

    def close_broadcast(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    # ---- sleep mode (colocated on GPUs: the trainer's loop frees the engine's memory between rollouts) -----
    def can_sleep(self) -> bool:
        """Whether this engine runs with vLLM's sleep mode (`rlhf_ray.engine_args.sleep_enabled`)."""
        return self.engine.can_sleep

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory (level 1: weights to host memory, KV cache dropped; level 2: both
        dropped). Raises when the engine has no sleep mode (see `can_sleep`)."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory of `tags` (None: all): ["weights"] before a weight sync, ["kv_cache"]
        before generating."""
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    # ---- counters -----------------------------------------------------------------------------------
    def num_generated_tokens(self) -> int:
        return int(self._stats["num_generated_tokens"])

    def stats(self) -> dict[str, float]:
        """Counters since start: tokens, sequences, generation seconds, weight updates and the last one's
        duration (seconds)."""
        return dict(self._stats)
