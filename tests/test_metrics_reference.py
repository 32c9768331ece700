"""docs/METRICS.md lists exactly the keys the code can write to metrics.jsonl and samples.jsonl (fast: the
code is read, not run, except one cross-check of the reader against `make_experience` itself).

The keys are collected from the functions that build the metric dicts (`SOURCES`): the string keys written
into the dicts those functions name — `d = {"k": ...}`, `d["k"] = ...`, `d |= {...}`, `d.update(k=...)`,
`d["k"].append(...)`, dict literals in `return` — less keys a consumer `.pop`s, under the prefix the driver
puts on them (`policy/` and `critic/` from `PPOTrainer.update`, `train/` and `eval/` from the offline
stages). Each stage's set must equal its tables in docs/METRICS.md: a key logged but not documented, or
documented but no longer logged, fails with its name.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "METRICS.md"


# ---- reading keys out of the code ----------------------------------------------------------------------
@cache
def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def _function(path: str, qualname: str) -> ast.AST:
    """The (possibly class-level, `Class.method`) function `qualname` of the module at `path`."""
    scope: list[ast.stmt] = _tree(path).body
    node = None
    for part in qualname.split("."):
        node = next(
            (n for n in scope if isinstance(n, ast.ClassDef | ast.FunctionDef) and n.name == part), None
        )
        assert node is not None, f"{path} has no {qualname!r}: update SOURCES in {Path(__file__).name}"
        scope = node.body
    return node


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _literal_keys(expr: ast.AST) -> set[str]:
    """String keys of every dict literal in `expr` (through `|`, tuples, conditionals)."""
    return {k for n in ast.walk(expr) if isinstance(n, ast.Dict) for k in map(_str, n.keys) if k}


def _named(node: ast.AST, names: tuple[str, ...]) -> bool:
    return isinstance(node, ast.Name) and node.id in names


def _merged_names(expr: ast.AST) -> set[str]:
    """Names whose dicts `expr` merges: the operands of a `a | b | ...` chain, `{**a}`."""
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        return _merged_names(expr.left) | _merged_names(expr.right)
    if isinstance(expr, ast.Name):
        return {expr.id}
    if isinstance(expr, ast.Dict):
        return {v.id for k, v in zip(expr.keys, expr.values) if k is None and isinstance(v, ast.Name)}
    return set()


def _is_update_of(n: ast.AST, names: tuple[str, ...]) -> bool:
    """`n` is a call `d.update(...)` of one of `names`."""
    return (
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "update"
        and _named(n.func.value, names)
    )


def _tracked(fn: ast.AST, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` and every name whose dict is merged into one of them (`d = {**extra}`, `d |= extra`,
    `d.update(extra)`, `d | extra` anywhere), until no more are found."""
    tracked = set(names)
    while True:
        found = set(tracked)
        for n in ast.walk(fn):
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and _merged_names(n) & found:
                found |= _merged_names(n)
            elif isinstance(n, ast.Assign | ast.AugAssign) and any(
                _named(t, tuple(found)) for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            ):
                found |= _merged_names(n.value)
            elif _is_update_of(n, tuple(found)):
                found |= {a.id for a in n.args if isinstance(a, ast.Name)}
                found |= {kw.value.id for kw in n.keywords if not kw.arg and isinstance(kw.value, ast.Name)}
        if found == tracked:
            return tuple(sorted(tracked))
        tracked = found


def keys_written(path: str, qualname: str, names: tuple[str, ...]) -> set[str]:
    """The string keys `qualname` (nested functions included) writes into the dicts held by `names` (and
    by the names merged into them, `_tracked`); the name "return" stands for the dict literals it returns."""
    fn = _function(path, qualname)
    names = _tracked(fn, names)
    keys: set[str] = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign | ast.AugAssign | ast.AnnAssign) and n.value is not None:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            for t in targets:
                for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if _named(e, names):  # d = {...}, d |= {...}
                        keys |= _literal_keys(n.value)
                    elif isinstance(e, ast.Subscript) and _named(e.value, names) and _str(e.slice):
                        keys.add(_str(e.slice))  # d["k"] = ...
        elif _is_update_of(n, names):  # d.update(k=..., **other)
            keys |= {kw.arg for kw in n.keywords if kw.arg} | {k for a in n.args for k in _literal_keys(a)}
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "append":
            owner = n.func.value  # d["k"].append(...)
            if isinstance(owner, ast.Subscript) and _named(owner.value, names) and _str(owner.slice):
                keys.add(_str(owner.slice))
        elif isinstance(n, ast.Return) and "return" in names and n.value is not None:
            keys |= _literal_keys(n.value)
    return keys


def keys_popped(path: str, qualname: str) -> set[str]:
    """The keys `qualname` takes out of a stats dict with `.pop("k")` (renamed or moved elsewhere)."""
    return {
        _str(n.args[0])
        for n in ast.walk(_function(path, qualname))
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "pop"
        and n.args
        and _str(n.args[0])
    }


def module_dict_values(path: str, name: str) -> set[str]:
    """The string values of the module-level dict literal `name`."""
    for n in _tree(path).body:
        if isinstance(n, ast.Assign) and any(_named(t, (name,)) for t in n.targets):
            assert isinstance(n.value, ast.Dict), f"{path}: {name} is no longer a dict literal"
            return {v for v in map(_str, n.value.values) if v}
    raise AssertionError(f"{path} has no module-level {name}: update {Path(__file__).name}")


# ---- where each stage's keys come from -----------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """`prefix` + the keys `function` of `path` writes into `names` (`keys_written`), less those it pops."""

    prefix: str
    path: str
    function: str
    names: tuple[str, ...]

    def keys(self) -> tuple[set[str], set[str]]:
        p = self.prefix
        written = {p + k for k in keys_written(self.path, self.function, self.names)}
        return written, {p + k for k in keys_popped(self.path, self.function)}


ROW = Source("", "rlhf_ray/metrics.py", "MetricsLogger.log", ("record",))  # `step`, in every row
RANK_STEP = (
    "actors/deepspeed_rank.py",
    "DeepSpeedRank._train",
    ("step_stats",),
)  # grad_norm, lr of every trainer
SOURCES: dict[str, list[Source]] = {
    "rl": [
        ROW,
        Source("", "rlhf_ray/experience.py", "make_experience", ("stats",)),
        Source("", "actors/glue.py", "experience", ("stats",)),
        Source("", "actors/glue.py", "eval_scores", ("out",)),
        Source("", "rlhf_ray/data/prompts.py", "PromptSource.stats", ("return",)),
        Source("", "rlhf_ray/trainer/ppo.py", "PPOTrainer._one_step", ("metrics",)),
        Source("", "rlhf_ray/trainer/ppo.py", "PPOTrainer.train_step", ("times", "exp_stats", "return")),
        Source("", "rlhf_ray/trainer/ppo.py", "PPOTrainer.make_experience", ("times",)),
        # the policy's and the critic's rank stats, prefixed with their RoleKind by PPOTrainer.update
        Source("policy/", "rlhf_ray/algorithms/losses.py", "ppo_policy_loss", ("stats",)),
        Source("policy/", "rlhf_ray/algorithms/losses.py", "gspo_policy_loss", ("stats",)),
        Source("policy/", "actors/policy_trainer.py", "PolicyRank.train", ("stats",)),
        Source("policy/", *RANK_STEP),
        Source("critic/", "actors/critic_trainer.py", "CriticRank.train", ("stats",)),
        Source("critic/", "rlhf_ray/algorithms/losses.py", "value_loss_stats", ("return",)),
        Source("critic/", *RANK_STEP),
    ],
    "offline": [ROW, Source("", "rlhf_ray/trainer/offline.py", "fit_epochs", ("metrics",))],
    "sft": [
        Source("train/", "actors/sft_trainer.py", "SFTRank.train", ("return",)),
        Source("train/", *RANK_STEP),
        Source("", "rlhf_ray/trainer/sft.py", "run_sft", ("return",)),  # its `evaluate`: eval/loss
    ],
    "reward_model": [
        Source("train/", "actors/reward_trainer.py", "RewardRank.train", ("stats",)),
        Source("train/", "actors/reward_trainer.py", "_pair_stats", ("values",)),
        Source("train/", *RANK_STEP),
    ],
    "dpo": [
        Source("train/", "actors/dpo_trainer.py", "DPORank.train", ("stats",)),
        Source("train/", "actors/dpo_trainer.py", "_reward_stats", ("return",)),
        Source("train/", *RANK_STEP),
    ],
    "samples": [
        Source("", "rlhf_ray/metrics.py", "MetricsLogger.log_samples", ("record",)),
        Source("", "rlhf_ray/samples.py", "sample_rows", ("row",)),
    ],
}


def _pair_eval_keys(path: str, rank_evaluate: str, extra_sums: set[str]) -> set[str]:
    """A preference stage's eval/ keys: its ranks return `<stat>_sum` (and `pairs`),
    `actors.reward_trainer.combine_pair_sums` turns them into means named `<stat>`, and the driver's
    `evaluate` drops `pairs` and adds the `eval/` prefix."""
    sums = keys_written(path, rank_evaluate, ("return",)) | extra_sums
    return {"eval/" + k.removesuffix("_sum") for k in sums if k.endswith("_sum")}


def code_keys(stage: str) -> set[str]:
    written: set[str] = set()
    popped: set[str] = set()
    for source in SOURCES[stage]:
        w, p = source.keys()
        written |= w
        popped |= p
    if stage == "rl":  # `time/<role>` of each scoring role (`rlhf_ray.trainer.scoring.role_times`)
        written |= {"time/" + v for v in module_dict_values("rlhf_ray/trainer/ppo.py", "SCORE_TIMES")}
    if stage == "reward_model":
        written |= _pair_eval_keys("actors/reward_trainer.py", "RewardRank.evaluate", set())
    if stage == "dpo":  # the DPO ranks' sums are `_reward_stats` keys + "_sum" (an f-string)
        reward_stats = keys_written("actors/dpo_trainer.py", "_reward_stats", ("return",))
        written |= _pair_eval_keys(
            "actors/dpo_trainer.py", "DPORank.evaluate", {k + "_sum" for k in reward_stats}
        )
    return written - popped


# ---- reading keys out of docs/METRICS.md -----------------------------------------------------------------
HEADINGS = {  # the heading of each stage's table in docs/METRICS.md
    "RL stage": "rl",
    "Offline stages (all three)": "offline",
    "SFT stage": "sft",
    "Reward-model stage": "reward_model",
    "DPO stage": "dpo",
    "samples.jsonl": "samples",
}
ROW_RE = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def documented_keys(text: str) -> dict[str, set[str]]:
    """{stage: the keys in the first column of the tables under its heading}."""
    found: dict[str, set[str]] = {stage: set() for stage in HEADINGS.values()}
    stage = None
    for line in text.splitlines():
        if line.startswith("#"):
            stage = HEADINGS.get(line.lstrip("#").strip())
        elif stage and (m := ROW_RE.match(line)):
            found[stage].add(m.group(1))
    return found


def differences(code: set[str], documented: set[str]) -> tuple[list[str], list[str]]:
    """(keys the code logs that the document lacks, keys the document lists that the code no longer logs)."""
    return sorted(code - documented), sorted(documented - code)


def expected(stage: str) -> set[str]:
    return code_keys(stage) | (code_keys("offline") if stage in ("sft", "reward_model", "dpo") else set())


def documented(stage: str, text: str) -> set[str]:
    docs = documented_keys(text)
    return docs[stage] | (docs["offline"] if stage in ("sft", "reward_model", "dpo") else set())


# ---- the checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["rl", "sft", "reward_model", "dpo", "samples"])
def test_every_key_is_documented_and_every_documented_key_is_logged(stage):
    missing, stale = differences(expected(stage), documented(stage, DOC.read_text(encoding="utf-8")))
    assert not missing, f"docs/METRICS.md lacks {stage} keys the code logs: {missing}"
    assert not stale, f"docs/METRICS.md lists {stage} keys the code no longer logs: {stale}"


def test_the_check_has_teeth():
    """A made-up key on either side is reported; and the collection finds keys of every kind of source."""
    text = DOC.read_text(encoding="utf-8")
    rl = expected("rl")
    missing, stale = differences(rl | {"reward/made_up"}, documented("rl", text))
    assert missing == ["reward/made_up"] and not stale
    doctored = text.replace("| `kl` |", "| `kl/made_up` | x | x | x |\n| `kl` |", 1)
    missing, stale = differences(rl, documented("rl", doctored))
    assert stale == ["kl/made_up"] and not missing
    assert {
        "step",  # MetricsLogger.log
        "reward/mean",  # make_experience
        "tokens",  # the glue worker
        "eval/gold",  # eval_scores
        "data/prompts_skipped",  # PromptSource.stats
        "faults/restarts",  # the driver loop
        "tokens_per_s",  # train_step's return
        "time/train",  # a tuple target
        "time/reference",  # SCORE_TIMES
        "policy/policy_loss",  # renamed from pg_loss ...
        "policy/entropy_bonus",  # .update(**bonus): a dict merged into the stats
        "policy/lr",  # d["k"].append(...)
        "critic/value_error",  # value_loss_stats' return
    } <= rl
    assert "policy/pg_loss" not in rl  # ... which is popped
    assert "policy/rollout_vs_trainer_logprob_diff" not in rl  # moved to the top level by train_step
    assert {"eval/rewards/accuracy", "train/logps/chosen"} <= expected("dpo")
    assert {"eval/accuracy", "train/chosen_score"} <= expected("reward_model")
    assert {"eval/loss", "epoch"} <= expected("sft")
    assert all(documented_keys(text).values()), "a stage's heading in docs/METRICS.md was renamed"


def test_only_the_known_drivers_write_metrics():
    """SOURCES covers every place a `MetricsLogger` is made: a new one (a new stage, a new loop) must be
    added there and documented."""
    makers = sorted(
        str(p.relative_to(ROOT))
        for top in ("rlhf_ray", "actors", "jobs")
        for p in (ROOT / top).rglob("*.py")
        if "MetricsLogger(" in p.read_text(encoding="utf-8") and p.name != "metrics.py"
    )
    assert makers == ["rlhf_ray/trainer/offline.py", "rlhf_ray/trainer/ppo.py"], makers


def registered_policy_losses() -> set[str]:
    """The functions `rlhf_ray/algorithms/registry.py` registers as policy losses: `register_policy_loss(
    name)(fn)` calls and functions decorated with it."""
    found = set()
    for n in ast.walk(_tree("rlhf_ray/algorithms/registry.py")):
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Call)
            and _named(n.func.func, ("register_policy_loss",))
        ):
            found |= {a.id for a in n.args if isinstance(a, ast.Name)}
        elif isinstance(n, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and _named(d.func, ("register_policy_loss",)) for d in n.decorator_list
        ):
            found.add(n.name)
    return found


def test_every_registered_policy_loss_is_read():
    """Each policy loss `algorithm.policy_loss` can name returns stats that are logged as `policy/<stat>`:
    SOURCES reads every one of them."""
    read = {s.function for s in SOURCES["rl"] if s.path == "rlhf_ray/algorithms/losses.py"}
    registered = registered_policy_losses()
    assert {"ppo_policy_loss", "gspo_policy_loss"} <= registered or registered == {"ppo_policy_loss"}
    assert registered <= read, f"add the stats of {sorted(registered - read)} to SOURCES and docs/METRICS.md"


def test_the_rank_stats_prefixes_are_the_role_kinds():
    """`PPOTrainer.update` names the ranks' stats `<RoleKind.value>/<stat>`: the prefixes of SOURCES."""
    from actors.role_id import RoleKind

    assert (RoleKind.POLICY.value, RoleKind.CRITIC.value) == ("policy", "critic")
    assert 'f"{kind.value}/{k}"' in (ROOT / "rlhf_ray/trainer/ppo.py").read_text(encoding="utf-8")


def test_the_reader_sees_what_make_experience_returns():
    """The static reading of `make_experience` finds every key of the dict it really returns (GAE, and
    GRPO; the reader also finds the keys of options these calls leave off)."""
    import torch

    from rlhf_ray.batch import Batch
    from rlhf_ray.config import AlgorithmConfig
    from rlhf_ray.experience import OldLogprobs, make_experience, mark_old_logprobs

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    read = keys_written("rlhf_ray/experience.py", "make_experience", ("stats",))
    returned: set[str] = set()
    for estimator in ("gae", "grpo"):
        batch = Batch(
            {
                "response_mask": mask,
                "scores": torch.tensor([1.0, 0.0]),
                "logprobs": torch.full((2, 3), -1.0),
                "rollout_logprobs": torch.full((2, 3), -1.1),
                "ref_logprobs": torch.full((2, 3), -1.2),
                "values": torch.zeros(2, 3),
            }
        )
        mark_old_logprobs(batch, OldLogprobs.SCORED)
        _, stats = make_experience(batch, AlgorithmConfig(estimator=estimator), 0.1, group_size=2)
        returned |= set(stats)
    assert returned <= read, f"the reader misses {sorted(returned - read)}"
    assert {"value/mean", "return/mean", "reward/mean", "kl"} <= returned  # GAE's keys and the rest
