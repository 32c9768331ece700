"""The policy trainer on real Ray actors and real DeepSpeed (2 ranks, ZeRO-2 and ZeRO-3, tiny model, fp32).

One scenario per ZeRO stage runs in a module fixture (starting a group is the slow part) and the tests
check its facts: log-probs equal the driver's, the gradient equals the whole batch's, a PPO step raises
the log-probs of tokens with positive advantages, the ranks agree, exported weights equal the saved HF
directory, and a checkpoint loaded into a new group continues exactly like the group that saved it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.policy_trainer import PolicyTrainer
from actors.worker_group import combine_rank_stats
from rlhf_ray.algorithms import ppo_policy_loss
from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.experience import OldLogprobs, mark_old_logprobs, old_logprobs_source
from rlhf_ray.models import load_causal_lm, sequence_logprobs
from rlhf_ray.weight_transport import BroadcastReceiver, fetch_weights, named_weights

pytestmark = pytest.mark.slow

B, T, PROMPT = 8, 12, 4
TEMPERATURE = 0.9
LOGPROB_TOL = 1e-5  # measured: <= 2.4e-7 between the ranks and the driver (fp32)


def make_cfg(tiny_model_dir, **trainer) -> RLHFConfig:
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": str(tiny_model_dir), "dtype": "float32"},
            "trainer": {"num_ranks": 2, "micro_batch_size": 2, "lr": 1e-3, **trainer},
            "algorithm": {"estimator": "gae", "mini_batch_size": B, "kl_estimator": "k3"},
            "rollout": {"samples_per_prompt": 1, "temperature": TEMPERATURE, "max_new_tokens": T - PROMPT},
            "run": {"prompts_per_step": B, "seed": 0},
        }
    )


def make_batch(seed: int = 0) -> Batch:
    """Prompts of PROMPT tokens, responses of 2..8 tokens (so ranks and micro-batches get different token
    counts), right-padded; the vocabulary's non-special ids are 6..17."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT + 2, T + 1, (B,), generator=g)
    attention = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(6, 18, (B, T), generator=g) * attention
    response = ((torch.arange(T)[None] >= PROMPT) & (attention == 1)).float()
    return Batch({"input_ids": ids, "attention_mask": attention, "response_mask": response})


def with_advantages(batch: Batch, old_logprobs: torch.Tensor) -> Batch:
    """Advantage +1 on the first response token of every sequence, 0 elsewhere."""
    adv = torch.zeros(B, T)
    adv[:, PROMPT] = 1.0
    fields = {
        "logprobs": old_logprobs,
        "ref_logprobs": old_logprobs,
        "advantages": adv * batch["response_mask"],
    }
    return Batch(batch.tensors | fields)


def full_weights_per_rank(trainer: PolicyTrainer) -> list[dict[str, torch.Tensor]]:
    """Each rank's whole parameters (ZeRO-3: gathered on every rank, so all must enter)."""

    def collect(rank):
        with rank._full_parameters() as model:
            return {k: v.detach().clone() for k, v in named_weights(model)}

    return ray.get([a.__ray_call__.remote(collect) for a in trainer.group.actors])


def local_numel(rank) -> tuple[int, int]:
    """(elements this rank holds, elements of the model): ZeRO-3 keeps only a partition."""
    params = list(rank.engine.module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in params)


@ray.remote(num_cpus=0)
class BroadcastPeer:
    """One receiver of the broadcast transport (a stand-in for a rollout engine): connected once, then
    receives once per sync, as an engine does across RL steps."""

    def connect(self, addr, port):
        self.end = BroadcastReceiver(addr, port, rank=1, world_size=2, timeout_s=120)
        self.end.connect()

    def receive(self, manifest):
        return {name: t.clone() for name, t in self.end.receive(manifest)}


def open_broadcast(trainer: PolicyTrainer):
    """The trainer's side group with one connected peer; returns (peer, manifest)."""
    peer = BroadcastPeer.remote()
    manifest = trainer.weight_manifest(timeout=60)
    addr, port = trainer.open_broadcast(world_size=2, timeout=60)
    ray.get([trainer.connect_broadcast(), peer.connect.remote(addr, port)], timeout=120)
    return peer, manifest


def broadcast(trainer: PolicyTrainer, peer, manifest) -> dict[str, torch.Tensor]:
    """One sync over the open side group: what the peer received."""
    return ray.get([*trainer.broadcast_weights(), peer.receive.remote(manifest)], timeout=120)[-1]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def scenario(request, ray_local, tiny_model_dir, tmp_path_factory):
    """Score, one PPO step, checks, checkpoint, a second step; then the checkpoint is loaded and the second
    step repeated: under ZeRO-3 in a NEW group (fresh processes), under ZeRO-2 in the same group (it has
    moved on by then; one group start less keeps the module within its time budget)."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"policy-zero{stage}")
    cfg = make_cfg(tiny_model_dir, zero_stage=stage)
    batch = make_batch()
    facts: dict = {"stage": stage, "batch": batch}

    trainer = PolicyTrainer(cfg)
    peer = None
    try:
        facts["before"] = ray.get(trainer.compute_logprobs(ray.put(batch)), timeout=120)
        step1 = with_advantages(batch, facts["before"]["logprobs"])
        facts["step1"] = step1
        facts["stats1"] = ray.get(trainer.train(ray.put(step1), kl_coef=0.1), timeout=300)
        facts["after"] = ray.get(trainer.compute_logprobs(batch), timeout=120)
        facts["rank_weights"] = full_weights_per_rank(trainer)
        facts["exported"] = fetch_weights(trainer.export_weights(timeout=120), timeout=60)
        peer, manifest = open_broadcast(trainer)
        facts["broadcast"] = broadcast(trainer, peer, manifest)
        facts["local_numel"] = ray.get(
            [a.__ray_call__.remote(local_numel) for a in trainer.group.actors], timeout=60
        )
        facts["saved_dir"] = trainer.save_pretrained(str(tmp / "hf"), timeout=120)
        trainer.save_checkpoint(str(tmp / "ckpt"), timeout=300)
        # second step: new old-log-probs, the reference stays the initial policy (a live KL term)
        step2 = with_advantages(batch, facts["after"]["logprobs"])
        step2["ref_logprobs"] = facts["before"]["logprobs"]
        facts["stats2"] = combine_rank_stats(ray.get(trainer.train(step2, kl_coef=0.1), timeout=300))
        facts["after2"] = ray.get(trainer.compute_logprobs(batch), timeout=120)
        # a second sync over the same side group, after the step changed the weights
        facts["exported2"] = fetch_weights(trainer.export_weights(timeout=120), timeout=60)
        facts["broadcast2"] = broadcast(trainer, peer, manifest)
        trainer.close_broadcast(timeout=60)
        if stage == 3:
            trainer.kill()
            trainer = PolicyTrainer(cfg)
        trainer.load_checkpoint(str(tmp / "ckpt"), timeout=300)
        facts["resumed_after"] = ray.get(trainer.compute_logprobs(batch), timeout=120)
        facts["resumed_stats2"] = combine_rank_stats(ray.get(trainer.train(step2, kl_coef=0.1), timeout=300))
        facts["resumed_after2"] = ray.get(trainer.compute_logprobs(batch), timeout=120)
        # uneven shards (4 + 3 rows) and an empty one (1 row): every rank still runs the same passes
        parts = {rows: step2.select(list(range(rows))) for rows in (7, 1)}
        for rows, part in parts.items():
            facts[f"rows{rows}"] = ray.get(trainer.compute_logprobs(part), timeout=120)["logprobs"]
        for rows, part in parts.items():
            facts[f"rows{rows}_stats"] = ray.get(trainer.train(part, kl_coef=0.1), timeout=120)
        facts["parts"] = parts
        facts["handed"] = {rows: ray.get(trainer.per_rank(part), timeout=60) for rows, part in parts.items()}
    finally:
        trainer.kill()
        if peer is not None:
            ray.kill(peer)
    return facts


def driver_logprobs(tiny_model_dir, batch: Batch):
    model = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], TEMPERATURE, True)


def test_logprobs_equal_the_driver(scenario, tiny_model_dir):
    batch, got = scenario["batch"], scenario["before"]
    lp, ent = driver_logprobs(tiny_model_dir, batch)
    assert set(got.tensors) == {"logprobs", "entropy"} and got["logprobs"].shape == (B, T)
    mask = batch["attention_mask"].bool()
    assert (got["logprobs"][~mask] == 0).all() and (
        got["logprobs"][:, :PROMPT] == 0
    ).all()  # prompt: not scored
    response = batch["response_mask"].bool()
    assert (got["logprobs"] - lp)[response].abs().max() < LOGPROB_TOL
    assert (got["entropy"] - ent)[response].abs().max() < LOGPROB_TOL


def test_gradient_is_that_of_the_whole_batch(scenario, tiny_model_dir):
    """The 2 ranks x 2 micro-batches accumulate exactly the gradient of the global token-mean loss
    (DeepSpeed's pre-clip norm against one backward pass in the driver). The KL term (k3, ref = old) has
    zero gradient at the first step, the entropy term is off."""
    step1 = scenario["step1"]
    model = load_causal_lm(tiny_model_dir)
    lp, _ = sequence_logprobs(model, step1["input_ids"], step1["attention_mask"], TEMPERATURE)
    loss, _ = ppo_policy_loss(lp, step1["logprobs"], step1["advantages"], step1["response_mask"], 0.2)
    loss.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    stats = scenario["stats1"]
    assert len(stats) == 2
    for s in stats:
        assert s["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    lp = lp.detach()
    for s, rows in zip(stats, (slice(0, B // 2), slice(B // 2, B))):  # each rank: token mean over its shard
        f = {k: v[rows] for k, v in step1.tensors.items()}
        shard_loss, _ = ppo_policy_loss(lp[rows], f["logprobs"], f["advantages"], f["response_mask"], 0.2)
        assert s["policy_loss"] == pytest.approx(shard_loss.item(), rel=1e-4)
    for key in ("policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm", "lr", "kl_loss"):
        assert key in stats[0]
    assert stats[0]["lr"] == pytest.approx(1e-3)


def test_step_raises_logprobs_of_advantaged_tokens(scenario):
    before, after = scenario["before"]["logprobs"], scenario["after"]["logprobs"]
    rise = (after - before)[:, PROMPT]
    assert (rise > 0).all(), rise
    assert rise.mean() > 0.1, rise


def test_ranks_hold_identical_parameters(scenario):
    rank0, rank1 = scenario["rank_weights"]
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_zero3_partitions_the_parameters(scenario):
    for held, total in scenario["local_numel"]:
        if scenario["stage"] == 3:
            assert held < 0.6 * total, (held, total)
        else:
            assert held == total


def test_broadcast_sends_the_exported_weights(scenario):
    first, second = scenario["exported"], scenario["exported2"]
    for received, exported in ((scenario["broadcast"], first), (scenario["broadcast2"], second)):
        assert list(received) == list(exported)  # the manifest order: named_weights'
        for name, value in received.items():
            assert torch.equal(value, exported[name]), name
    # the second step changed the weights, and the second sync carried the change: a sync that resent
    # the first step's weights (or nothing, leaving the peer's reused buffers as they were) fails here
    changed = [n for n in first if not (first[n] == second[n]).all()]
    assert len(changed) > len(first) // 2, (len(changed), len(first))
    for name in changed:
        assert not torch.equal(scenario["broadcast"][name], scenario["broadcast2"][name]), name


def test_exported_weights_equal_saved_directory_and_ranks(scenario):
    exported = scenario["exported"]
    saved = AutoModelForCausalLM.from_pretrained(scenario["saved_dir"])
    expected = dict(named_weights(saved))
    assert exported.keys() == expected.keys()
    assert "lm_head.weight" not in exported  # tied to the embeddings
    rank0 = scenario["rank_weights"][0]
    for name, value in expected.items():
        assert torch.equal(exported[name], value.detach()), name
        assert torch.equal(rank0[name], value.detach()), name
    # the saved model is the trained one: it reproduces the trainer's log-probs
    batch = scenario["batch"]
    with torch.no_grad():
        lp, _ = sequence_logprobs(saved, batch["input_ids"], batch["attention_mask"], TEMPERATURE)
    assert (lp * batch["response_mask"] - scenario["after"]["logprobs"]).abs().max() < LOGPROB_TOL


def test_checkpoint_resumes_exactly(scenario):
    assert torch.equal(scenario["resumed_after"]["logprobs"], scenario["after"]["logprobs"])
    expected, got = scenario["stats2"], scenario["resumed_stats2"]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert (scenario["resumed_after2"]["logprobs"] - scenario["after2"]["logprobs"]).abs().max() < 1e-6
    # the second step did something, with a live KL term (not a comparison of two idle models)
    assert scenario["stats2"]["kl_loss"] > 1e-4
    assert (scenario["after2"]["logprobs"] - scenario["after"]["logprobs"]).abs().max() > 1e-3


def test_micro_batching_does_not_change_the_update(ray_local, tiny_model_dir):
    """1 rank, one optimiser step on 8 sequences: one micro-batch of 8 and four of 2 give the same
    gradient (norm) and the same parameters. Adam's first step moves a weight by lr * g / (|g| + 1e-8):
    by lr where |g| >> 1e-8, so a misweighted micro-batch shows as weights 2 lr apart (sign flips); the
    fp32 summation-order noise shows only on weights with |g| ~ 1e-9 (measured: <= 2.4e-6 apart at
    lr = 1e-4, 2.4e-5 at lr = 1e-3).

    A third group gets the batch without old log-probs: one optimiser step on the whole batch takes them
    from its own forward (`rlhf_ray.experience.old_logprobs_source`), and must make the same update."""
    batch = make_batch(seed=3)
    cfgs = [make_cfg(tiny_model_dir, num_ranks=1, micro_batch_size=m, lr=1e-4) for m in (B, B // 4, B)]
    assert old_logprobs_source(cfgs[2]) is OldLogprobs.FROM_UPDATE
    with ThreadPoolExecutor(3) as pool:  # start the groups at once
        trainers = list(pool.map(PolicyTrainer, cfgs))
    try:
        old = ray.get(trainers[0].compute_logprobs(batch), timeout=120)["logprobs"]
        step = with_advantages(batch, old)
        noise = torch.randn(B, T, generator=torch.Generator().manual_seed(4))
        step.tensors["advantages"] = noise * step["response_mask"]
        no_old = Batch({k: v for k, v in step.tensors.items() if k != "logprobs"})
        mark_old_logprobs(no_old, OldLogprobs.FROM_UPDATE)
        batches = (step, step, no_old)
        stats = ray.get([t.train(b, kl_coef=0.1)[0] for t, b in zip(trainers, batches)], timeout=300)
        weights = [fetch_weights(t.export_weights(timeout=120), timeout=60) for t in trainers]
        # twice the rows: two optimiser steps, where the second needs the log-probs from before the first
        with pytest.raises(ray.exceptions.RayTaskError, match="no old log-probs.*takes 2 optimiser steps"):
            ray.get(trainers[2].train(Batch.concat([no_old, no_old]), kl_coef=0.1)[0], timeout=120)
    finally:
        for t in trainers:
            t.kill()
    for other in (1, 2):
        assert stats[0]["grad_norm"] == pytest.approx(stats[other]["grad_norm"], rel=1e-5)
        assert stats[0]["policy_loss"] == pytest.approx(stats[other]["policy_loss"], rel=1e-5, abs=1e-7)
        worst = max(abs(weights[0][k] - weights[other][k]).max() for k in weights[0])
        assert worst < 1e-5, (other, worst)
    assert stats[2]["clip_frac"] == 0.0  # the ratio is exactly 1 at the only step


def test_uneven_and_empty_shards(scenario):
    """7 rows on 2 ranks, then 1 row (rank 0 has nothing): no rank waits forever for a peer's collective,
    and the log-probs are those of the full batch."""
    current = scenario["resumed_after2"]["logprobs"]
    assert (scenario["rows7"] - current[:7]).abs().max() < LOGPROB_TOL
    assert (scenario["rows1"] - current[:1]).abs().max() < LOGPROB_TOL
    for rows in (7, 1):
        stats = scenario[f"rows{rows}_stats"]
        assert all(s["grad_norm"] > 0 and s["grad_norm"] == stats[0]["grad_norm"] for s in stats)
    assert "policy_loss" not in scenario["rows1_stats"][0]  # rank 0 only ran zero-weight stand-in passes


def test_each_rank_is_handed_only_its_rows(scenario):
    """The handle cuts a batch on the glue worker before it travels: rank r receives a `RankShard` of its
    own rows (4 + 3 of 7; 0 + 1 of 1), with the counts that keep the ranks in step, not the whole batch."""
    for rows, expected in ((7, [4, 3]), (1, [0, 1])):
        handed, part = scenario["handed"][rows], scenario["parts"][rows]
        assert [len(h.batch) for h in handed] == expected
        assert all(h.total_rows == rows and h.max_rows == max(expected) for h in handed)
        start = 0
        for h, n in zip(handed, expected):
            assert torch.equal(h.batch["input_ids"], part["input_ids"][start : start + n])
            assert torch.equal(h.stand_in["input_ids"], part["input_ids"][:1])
            start += n
