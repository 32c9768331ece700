"""cluster/: every YAML parses, names jobs and configs that exist, and every `section.key=value` written in
cluster/README.md or the YAML files is a valid override of RLHFConfig (fast, no Ray cluster)."""

from __future__ import annotations

import importlib
import json
import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import COMMANDS
from rlhf_ray.config import ConfigError, RLHFConfig, apply_overrides
from rlhf_ray.runtime import runtime_env_vars

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = CLUSTER / "README.md"
YAML_FILES = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")])

PLANNED_CONFIGS = {"jobs/configs/tiny.yaml"}

ENTRYPOINT_RE = re.compile(r"python[\w.]*\s+-m\s+jobs\.([a-z_][a-z0-9_]*)")  # not the placeholder jobs.X
CONFIG_RE = re.compile(r"--config[=\s]+([\w./-]+\.ya?ml)")
_KEY = r"[a-z_]+(?:\.[a-z_]+)+"
QUOTED_OVERRIDE_RE = re.compile(rf"""(?<!\S)(["'])({_KEY})=(.*?)\1""")
PLAIN_OVERRIDE_RE = re.compile(rf"""(?<!\S)({_KEY})=(\$\([^)]*\)|\S+)""")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(_text(path)) if d is not None]


def _join_continuations(lines: list[str]) -> list[str]:
    """Logical command lines: a line ending with a backslash continues on the next."""
    out, current = [], ""
    for line in lines:
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        out.append(current + stripped)
        current = ""
    if current:
        out.append(current)
    return out


def markdown_groups(text: str) -> list[str]:
    """Commands of the fenced code blocks (one per logical line) and every inline code span outside them:
    the overrides of one group are checked together, as one command line."""
    groups: list[str] = []
    prose: list[str] = []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2:  # inside a fence
            groups += _join_continuations(part.splitlines())
        else:
            prose.append(part)
    for part in prose:
        groups += re.findall(r"`([^`\n]+)`", part)
    return groups


def yaml_groups(path: Path) -> list[str]:
    """Commands in a YAML file: its comment lines (continuations joined) and every string value."""
    comments = [
        line.split("#", 1)[1].lstrip() for line in _text(path).splitlines() if line.lstrip().startswith("#")
    ]
    groups = _join_continuations(comments)

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    for doc in _docs(path):
        groups += list(strings(doc))
    return groups


def extract_overrides(group: str) -> list[tuple[str, str]]:
    found = [(m.group(2), m.group(3)) for m in QUOTED_OVERRIDE_RE.finditer(group)]
    rest = QUOTED_OVERRIDE_RE.sub(" ", group)
    return found + [(m.group(1), m.group(2)) for m in PLAIN_OVERRIDE_RE.finditer(rest)]


def _default(key: str):
    node = RLHFConfig().to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_placeholder(value: str) -> bool:
    return value.startswith(("$", "<")) or "$(" in value


def check_group(group: str) -> list[str]:
    """Build the config of one command line: its --config file (when it exists) plus its overrides, with
    shell substitutions and <placeholders> replaced by the key's default. Returns the keys checked."""
    overrides = extract_overrides(group)
    if not overrides:
        return []
    base: dict = {}
    config = CONFIG_RE.search(group)
    if config and (ROOT / config.group(1)).is_file():
        base = yaml.safe_load(_text(ROOT / config.group(1))) or {}
    items = [f"{k}={json.dumps(_default(k)) if _is_placeholder(v) else v}" for k, v in overrides]
    try:
        RLHFConfig.from_dict(apply_overrides(base, items))
    except ConfigError as exc:
        raise AssertionError(f"invalid overrides in {group!r}: {exc}") from exc
    return [k for k, _ in overrides]


# ---- the files parse --------------------------------------------------------------------------------
def test_cluster_has_the_expected_files():
    names = {p.name for p in CLUSTER.iterdir()}
    for expected in (
        "README.md",
        "runtime_env.yaml",
        "gpu-cluster.yaml",
        "kuberay-raycluster.yaml",
        "kuberay-rayjob.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name} holds no mapping"


def test_launcher_config_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    (cfg,) = _docs(CLUSTER / "gpu-cluster.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "RAY_AUTH_MODE=token" in starts
    assert any('pip install -e ".[gpu' in c for c in cfg["setup_commands"])


def test_kuberay_manifests():
    (cluster,) = _docs(CLUSTER / "kuberay-raycluster.yaml")
    (job,) = _docs(CLUSTER / "kuberay-rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert job["spec"]["entrypoint"].startswith("python -m jobs.ppo --config jobs/configs/")
    # the RayJob's runtime env is cluster/runtime_env.yaml, with the code baked into the image
    job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    (runtime_env,) = _docs(CLUSTER / "runtime_env.yaml")
    assert job_env["env_vars"] == runtime_env["env_vars"]


# ---- jobs and configs named exist -------------------------------------------------------------------
def test_yaml_entrypoints_name_existing_jobs():
    named = {m for p in YAML_FILES for m in ENTRYPOINT_RE.findall(_text(p))}
    assert "ppo" in named
    missing = sorted(m for m in named if not (ROOT / "jobs" / f"{m}.py").is_file())
    assert not missing, f"cluster/*.yaml run jobs that do not exist under jobs/: {missing}"


READMES = (ROOT / "README.md", README)
README_JOBS = sorted({m for p in READMES for m in ENTRYPOINT_RE.findall(_text(p))})
# README.md: "Every job is `python -m jobs.<name>`": the `rlhf-ray` subcommands' modules are jobs too.
ALL_JOBS = sorted({*README_JOBS, *(module.removeprefix("jobs.") for module, _ in COMMANDS.values())})
# Jobs configured by --config and section.key=value (their --help lists every config key); the others
# (writing the task, converting a checkpoint) take only their own flags.
CONFIG_JOBS = {"ppo", "sft", "reward_model", "dpo", "pipeline", "sweep", "plan"}


def test_readmes_name_the_jobs():
    # the extraction found the commands of both READMEs' code blocks
    assert {"pipeline", "synthetic_task", "ppo", "sweep", "convert_smollm2"} <= set(README_JOBS)
    assert {"ppo", "sweep", "convert_smollm2", "synthetic_task"} <= set(ENTRYPOINT_RE.findall(_text(README)))


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:'jobs.*found in sys.modules:RuntimeWarning")  # imported just above
@pytest.mark.parametrize("job", ALL_JOBS)
def test_job_exists_and_its_help_runs(job, monkeypatch, capsys):
    """Every `python -m jobs.X` in README.md and cluster/README.md (and every `rlhf-ray` subcommand's
    module): the module exists, has `main`, and `python -m jobs.X --help` (run in-process as `python -m`
    runs it: it needs the `__main__` guard; nothing starts Ray) prints its usage and its flags."""
    module = importlib.import_module(f"jobs.{job}")
    assert callable(getattr(module, "main", None)), f"jobs/{job}.py has no main()"
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert out.startswith("usage: "), out[:500]
    if job in CONFIG_JOBS:
        assert "--config" in out and "config keys" in out
        assert "algorithm.kl_coef: float = 0.05" in out and "placement.mode:" in out
    else:
        assert "--out" in out and "config keys" not in out


def test_yaml_config_paths_exist():
    paths = {c for p in YAML_FILES for c in CONFIG_RE.findall(_text(p))}
    assert paths
    missing = sorted(c for c in paths if not (ROOT / c).is_file())
    assert not missing, f"--config files named in cluster/*.yaml do not exist: {missing}"


def test_readme_config_paths_exist_or_are_planned():
    paths = set(CONFIG_RE.findall(_text(README)))
    unknown = sorted(c for c in paths if not (ROOT / c).is_file() and c not in PLANNED_CONFIGS)
    assert not unknown, f"cluster/README.md names config files that do not exist: {unknown}"


# ---- overrides are valid config keys and values -----------------------------------------------------
def test_readme_overrides_are_valid():
    keys = {k for group in markdown_groups(_text(README)) for k in check_group(group)}
    for expected in (
        "trainer.num_ranks",
        "rollout.num_engines",
        "placement.policy.num_gpus",
        "placement.mode",
        "model.policy_path",
        "run.output_dir",
    ):
        assert expected in keys, f"{expected} not found among the README's overrides: the extraction broke"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_overrides_are_valid(path):
    for group in yaml_groups(path):
        check_group(group)


def test_override_check_has_teeth():
    assert check_group(
        "python -m jobs.ppo --config jobs/configs/smollm2_grpo.yaml placement.policy.num_gpus=1"
    )
    with pytest.raises(AssertionError, match="unknown config key"):
        check_group("python -m jobs.ppo --config x.yaml placement.polcy.num_gpus=1")
    with pytest.raises(AssertionError, match="wrong type"):
        check_group("trainer.num_ranks=two")
    assert extract_overrides("""x "placement.rollout.resources={a: 1}" run.seed=$(echo 1) --port=1""") == [
        ("placement.rollout.resources", "{a: 1}"),
        ("run.seed", "$(echo 1)"),
    ]


# ---- the runtime environment -------------------------------------------------------------------------
def test_runtime_env():
    (env,) = _docs(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    try:  # the matcher `ray job submit` itself applies to `excludes`
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:
        PathSpec = pytest.importorskip("pathspec").PathSpec
    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    for excluded in (".venv/bin/python", ".cache/models/x", "runs/default/metrics.jsonl", ".git/HEAD"):
        assert spec.match_file(excluded), f"{excluded} is uploaded with every job"
    for shipped in (
        "rlhf_ray/config.py",
        "jobs/ppo.py",
        "jobs/configs/smollm2_grpo.yaml",
        "jobs/data/chat_prompts.jsonl",
    ):
        assert not spec.match_file(shipped), f"{shipped} is excluded from the job's working_dir"
        assert (ROOT / shipped).is_file()

    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "Ray needs string values in env_vars"
    assert "DS_ACCELERATOR" not in env_vars, "each process picks its own accelerator"
    assert env_vars["HF_HUB_OFFLINE"] == "1"
    known = set(runtime_env_vars()) | {"RAY_OVERRIDE_JOB_RUNTIME_ENV"}
    assert set(env_vars) <= known, f"unknown variables: {sorted(set(env_vars) - known)}"
    assert all(
        os.path.isabs(v) for k, v in env_vars.items() if k.endswith(("_DIR", "_HOME", "_ROOT", "CACHE"))
    )
