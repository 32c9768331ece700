"""A message that names a config key names one that exists: every `section.key[.key...]` in the strings of
rlhf_ray/, actors/ and jobs/ (string constants and the literal parts of f-strings), and in the help texts
that `--help` shows, resolves to a field of the `RLHFConfig` tree."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

import rlhf_ray.config as config_module
from rlhf_ray.config import RLHFConfig, config_reference

ROOT = Path(__file__).resolve().parents[1]
HOLE = "\x00"  # stands for an f-string's `{...}`: matches any field at its level, like `<role>`
SECTIONS = [f.name for f in dataclasses.fields(RLHFConfig)]
# a section name starting a dotted token that is not part of a longer dotted name (`rlhf_ray.data.x`)
TOKEN = re.compile(rf"(?<![\w.])(?:{'|'.join(SECTIONS)})(?:\.(?:<\w+>|[\w{HOLE}]+))+")
# `run.py`, `model.safetensors`: file names, not keys
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "txt", "log", "png", "safetensors", "bin", "pt"}

# Wrong keys in files whose owners have yet to fix them: (path, token) -> why it is allowed for now.
# Empty: every key named in the sources exists. Add an entry only with the issue that will fix it.
ALLOWED: dict[tuple[str, str], str] = {}


def strings(tree: ast.AST) -> typing.Iterator[tuple[int, str]]:
    """(line, text) of every string constant; an f-string is one text with HOLE for each `{...}`."""
    in_fstring = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                in_fstring.add(id(value))
                parts.append(value.value if isinstance(value, ast.Constant) else HOLE)
            yield node.lineno, "".join(parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstring:
            yield node.lineno, node.value


def key_tokens(text: str) -> list[str]:
    """The dotted config keys `text` names, leaving out calls (`data.load(`) and file names (`run.py`)."""
    found = []
    for match in TOKEN.finditer(text):
        token = match.group()
        if text[match.end() : match.end() + 1] == "(" or token.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue
        found.append(token)
    return found


def resolves(parts: list[str], tp: typing.Any = RLHFConfig) -> bool:
    """Whether the key parts lead through the config tree; `<name>` or a hole matches any field there."""
    if not parts:
        return True
    if typing.get_origin(tp) is dict:
        return len(parts) == 1  # one key inside a mapping (placement.<role>.resources.<name>)
    if not dataclasses.is_dataclass(tp):
        return False  # below a leaf value
    head, rest = parts[0], parts[1:]
    if head.startswith("<"):
        pattern = re.compile(r"\w+")
    else:
        pattern = re.compile(r"\w*".join(map(re.escape, head.split(HOLE))))
    hints = typing.get_type_hints(tp)
    return any(resolves(rest, hints[name]) for name in hints if pattern.fullmatch(name))


def resolves_key(token: str) -> bool:
    return resolves(token.split("."))


def source_files() -> list[Path]:
    return sorted(p for d in ("rlhf_ray", "actors", "jobs") for p in (ROOT / d).rglob("*.py"))


def test_the_scanner_finds_keys_and_skips_what_is_not_one():
    text = (
        "set rollout.samples_per_prompt=4; reward.kind='model' needs model.reward_path (see "
        "rlhf_ray.data.synthetic, jobs/run.py, <run.output_dir>/sft, model.safetensors, data.load(x))."
    )
    assert key_tokens(text) == [
        "rollout.samples_per_prompt",
        "reward.kind",
        "model.reward_path",
        "run.output_dir",
    ]
    fstring = ast.parse('f"offline.{stage}.epochs={n}"')
    assert [text for _, text in strings(fstring)] == [f"offline.{HOLE}.epochs={HOLE}"]
    for good in (
        "data.train_path",
        "placement.<role>.num_cpus",
        f"offline.{HOLE}.epochs",
        "placement.rollout.resources.node",
        "offline.sft",
    ):
        assert resolves_key(good), good
    for bad in ("algorithm.samples_per_prompt", "data.train_path.x", f"offline.{HOLE}.kl_coef", "run.steps"):
        assert not resolves_key(bad), bad


def test_every_key_named_in_the_sources_exists():
    wrong, used, checked = [], set(), 0
    for path in source_files():
        rel = str(path.relative_to(ROOT))
        for line, text in strings(ast.parse(path.read_text(), filename=rel)):
            for token in key_tokens(text):
                checked += 1
                if (rel, token) in ALLOWED:
                    used.add((rel, token))
                elif not resolves_key(token):
                    wrong.append(f"{rel}:{line}: {token.replace(HOLE, '{...}')}")
    assert checked > 200  # the scan reaches the messages (268 keys named when this was written)
    assert wrong == [], "messages name config keys that do not exist:\n" + "\n".join(wrong)
    assert used == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - used}"


def test_every_key_named_in_the_field_help_exists():
    wrong = [
        f"{key}: {token}"
        for key, _, _, help_ in config_reference()
        for token in key_tokens(help_)
        if not resolves_key(token)
    ]
    assert wrong == []


SECTION_CLASSES = [
    name
    for name, obj in vars(config_module).items()
    if dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__ and name != "RLHFConfig"
]


@pytest.mark.parametrize("cls_name", SECTION_CLASSES)
def test_section_checks_name_the_field_they_check(cls_name):
    """`_require(p + "name", self.name, ...)` in a section's `check`: the key in the message is the field read."""
    tree = ast.parse((ROOT / "rlhf_ray" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    fields = {
        n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    for call in ast.walk(cls):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_require":
            key, value = call.args[0], call.args[1]
            assert isinstance(key, ast.BinOp) and isinstance(key.right, ast.Constant), ast.unparse(call)
            assert isinstance(value, ast.Attribute), ast.unparse(call)
            assert key.right.value == value.attr and value.attr in fields, ast.unparse(call)
