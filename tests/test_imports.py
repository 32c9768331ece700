"""Imports run one way (ARCHITECTURE.md): jobs -> rlhf_ray.trainer -> actors -> the rest of rlhf_ray ->
rlhf_ray.algorithms, with no circle, counting imports inside functions too. Read from the source with
`ast`, so the test sees every import statement, not only those that ran."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_ray", "actors", "jobs")
pytestmark = pytest.mark.timeout(60)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at any depth of the file (absolute imports only: the
    project uses no relative ones, which this test also enforces)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module!r}; use the absolute name"
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n and n.split(".")[0] in PACKAGES}
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        # `from pkg import mod` names a module; `from mod import func` names the module itself
        edges[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in our_imports(path)} - {name}
        edges[name] = {m for m in edges[name] if m in modules}
    return edges


def layer(module: str) -> int:
    """Higher layers may import lower ones only."""
    if module.startswith("jobs"):
        return 4
    if module.startswith("rlhf_ray.trainer"):
        return 3
    if module.startswith("actors"):
        return 2
    if module.startswith("rlhf_ray.algorithms"):
        return 0
    return 1  # the rest of rlhf_ray


def test_imports_flow_down_the_layers():
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if (layer(b) > layer(a) and not (a.split(".")[0] == b.split(".")[0] == "rlhf_ray" and layer(a) == 1))
        or (layer(a) == 0 and layer(b) != 0)
    ]
    # the package roots (`rlhf_ray`, `actors`) import nothing of ours: a package's __init__ is layer-neutral
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_algorithms_import_nothing_of_ours():
    algos = {a: t for a, t in graph().items() if a.startswith("rlhf_ray.algorithms")}
    outside = {a: sorted(t - set(algos)) for a, t in algos.items() if t - set(algos)}
    assert not outside


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_wrong_import(tmp_path):
    """The graph reads imports inside functions too (a check that can fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from rlhf_ray.trainer.ppo import PPOTrainer\n    import jobs.common\n")
    assert our_imports(src) == {"rlhf_ray.trainer.ppo", "rlhf_ray.trainer.ppo.PPOTrainer", "jobs.common"}
    assert layer("rlhf_ray.trainer.ppo") > layer("actors.worker_group") > layer("rlhf_ray.batch")
