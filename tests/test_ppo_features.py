"""RL stage features on a tiny model: colocated placement with the broadcast weight sync, an HTTP reward
server that reads a prompt-record field, and the reference and reward as groups of two actors that give
the experience one actor gives (one of which dies and is restarted alone).
(Resume, and that the driver never holds a batch: tests/test_resume_exact.py.)"""

from __future__ import annotations

import pytest
import ray
import torch

from actors import role_id
from rlhf_ray.batch import Batch
from rlhf_ray.data.loading import load_records, write_jsonl
from rlhf_ray.data.synthetic import digit_shaped_reward, parse_prompt, write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.rewards import serve_rule_function
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.test_ppo_e2e import tiny_rl_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=200, n_eval_prompts=16
    )


def fit(cfg) -> dict:
    trainer = PPOTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def placement_of(actor) -> tuple[str, str | None, set[int]]:
    """(node id, placement group id, indices of the group's bundles whose resources it holds), asked inside
    the actor. The bundle comes from the resource ids the raylet granted (`CPU_group_<bundle>_<pg>`): no
    public API names an actor's bundle."""

    def ask(self):
        import re

        ctx = ray.get_runtime_context()
        granted = ray._private.worker.global_worker.core_worker.resource_ids()
        bundles = {int(m.group(1)) for k in granted if (m := re.search(r"_group_(\d+)_[0-9a-f]+$", k))}
        return ctx.get_node_id(), ctx.get_placement_group_id(), bundles

    return ray.get(actor.__ray_call__.remote(ask), timeout=60)


def experience_of(trainer: PPOTrainer, reference: list, reward: list) -> tuple[Batch, dict[str, float]]:
    """The next step's experience (batch and stats) as the given reference and reward actors score it;
    the data position and the reward normaliser are put back, so each call makes the same step from the
    same prompts and sampling seeds."""
    roles, data, normalizer = trainer.roles, trainer.prompts.state_dict(), trainer.normalizer
    kept = roles.reference, roles.reward
    roles.reference, roles.reward = reference, reward
    try:
        batch, stats, _ = trainer.make_experience(trainer.kl_ctl.value)
        return ray.get(batch, timeout=60), stats
    finally:
        roles.reference, roles.reward = kept
        trainer.prompts.load_state_dict(data)
        trainer.normalizer = normalizer


def with_digits_field(task: dict, out) -> dict:
    """The task's prompt files with a record field beside each prompt: `digits`, the prompt's own digits."""
    copy = dict(task)
    for key in ("prompts", "eval_prompts"):
        rows = load_records(task[key], ["prompt"]).to_list()
        digits = [{**r, "digits": " ".join(map(str, parse_prompt(r["prompt"])))} for r in rows]
        copy[key] = write_jsonl(out / f"{key}.jsonl", digits)
    return copy


def test_colocated_broadcast_sync_and_http_reward(ray_local, tiny_model_dir, task, tmp_path):
    rows_seen: list[int] = []

    def checked_reward(prompts: list[str], responses: list[str], digits: list[str]) -> list[float]:
        """`digit_shaped_reward`, which also checks that each response came with its own prompt's record
        field (a field given to another row fails the scorer, so the step)."""
        for i, (prompt, field) in enumerate(zip(prompts, digits, strict=True)):
            if parse_prompt(prompt) != [int(d) for d in field.split()]:
                raise ValueError(f"row {i}: field digits={field!r} does not belong to prompt {prompt!r}")
        rows_seen.append(len(digits))
        return digit_shaped_reward(prompts, responses)

    server, url = serve_rule_function(checked_reward)
    try:
        cfg = tiny_rl_config(
            tiny_model_dir,
            with_digits_field(task, tmp_path),
            tmp_path / "run",
            placement={
                "mode": "colocate",
                "policy": {"num_cpus": 2},
                "reference": {"num_actors": 2},
                "reward": {"num_actors": 2},
            },
            rollout={"weight_sync": "broadcast"},
            reward={"kind": "http", "url": url, "function": None},
            run={"total_steps": 3, "eval_prompts": 8},
        )
        trainer = PPOTrainer(cfg)
        try:
            trainer.start()
            roles, plan = trainer.roles, trainer.roles.plan
            # colocate: rollout engine 0 and reference actor 0 share policy rank 0's bundle, reference actor
            # 1 rank 1's; the two reward actors have their own
            ref0, ref1 = role_id.members(role_id.REFERENCE, 2)
            assert roles.ids()[-4:] == [ref0, ref1, *role_id.members(role_id.REWARD, 2)]
            shared = plan.bundles_of(role_id.rank(role_id.POLICY, 0))
            assert len(shared) == 1
            assert plan.bundles_of(role_id.engine(0)) == shared == plan.bundles_of(ref0)
            assert plan.bundles_of(ref1) == plan.bundles_of(role_id.rank(role_id.POLICY, 1)) != shared
            reward_bundles = plan.bundles_of(role_id.REWARD)
            assert len(set(reward_bundles)) == 2 and not set(reward_bundles) & set(
                plan.bundles_of(role_id.POLICY)
            )
            # ... and the actors really run there: in that bundle of the run's group, on one node
            colocated = {
                "policy rank 0": roles.policy.group.actors[0],
                "rollout engine 0": roles.engines[0],
                "reference model 0": roles.reference[0],
            }
            where = {name: placement_of(actor) for name, actor in colocated.items()}
            group = plan.placement_group.id.hex()
            for name, (_, pg, bundles) in where.items():
                assert pg == group and bundles == set(shared), (name, where)
            assert len({node for node, _, _ in where.values()}) == 1, where
            assert placement_of(roles.policy.group.actors[1])[2] == set(
                plan.bundles_of(role_id.rank(role_id.POLICY, 1))
            )
            assert placement_of(roles.reference[1])[2] == set(plan.bundles_of(ref1))

            # two actors each scoring half the batch make the experience one actor makes of all of it
            groups, group_stats = experience_of(trainer, roles.reference, roles.reward)
            single, single_stats = experience_of(trainer, roles.reference[:1], roles.reward[:1])
            assert torch.equal(groups["input_ids"], single["input_ids"])  # the same rollout
            response = single["response_mask"].bool()
            for key, read in (("ref_logprobs", response), ("scores", ...), ("advantages", response)):
                diff = float((groups[key] - single[key])[read].abs().max())
                print(f"{key}: two actors vs one, max |diff| {diff:.2e}")
                assert diff <= 1e-6, (key, diff)
            assert single["scores"].std() > 0 and single["ref_logprobs"][response].abs().min() > 0
            assert group_stats["kl"] == pytest.approx(single_stats["kl"], abs=1e-6)

            # one actor of a group dies: the first step meets it, recovery restarts that actor alone
            lost, kept = roles.reference[1], roles.reference[0]
            ray.kill(lost, no_restart=True)
            trainer.fit()
            assert trainer.recovery.restarts == 1
            assert roles.reference[0] is kept and roles.reference[1] is not lost
            # the prompt records' field reached the scorer with every batch: a slice of each of the two
            # reward actors (32 rows -> 16 each; the held-out 8 -> 4 each), and all 32 for one actor
            assert {16, 4, 32} <= set(rows_seen), rows_seen
        finally:
            trainer.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "time/step" in r]
    assert len(rows) == 3
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    # after each broadcast sync the engine samples from the trainer's current weights
    assert max(r["rollout_vs_trainer_logprob_diff"] for r in rows) < 1e-3
    assert rows[-1]["time/sync"] > 0
    assert all(r["time/reference"] > 0 and r["time/reward"] > 0 for r in rows)
    assert [r["faults/restarts"] for r in rows] == [1, 1, 1]
