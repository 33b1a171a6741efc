"""The shape of the package: no import circles, no stage importing another stage, and torch only
on the extract side (`../shared/DESIGN.md`, direction of imports). Imports inside functions
count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO
from tests.test_stage_deps import module_file, registry_entry

PACKAGE = REPO / "pipeline"
STAGES = {"pipeline.manifest", "pipeline.extract", "pipeline.train", "pipeline.evaluate"}
# The modules that may import torch (besides pipeline.backbones.*); demo builds a tiny model.
EXTRACT_SIDE = {
    "pipeline.embedder",
    "pipeline.extract",
    "pipeline.distributed",
    "pipeline.faces",
    "pipeline.predict",
    "pipeline.check",
    "pipeline.demo",
}


def module_name(file: Path) -> str:
    parts = file.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def uses(file: Path) -> tuple[set[str], set[str]]:
    """(pipeline modules that `file` imports anywhere in it, other top-level packages it imports).
    `from pipeline.a import b` uses the module pipeline.a.b if there is one, else pipeline.a."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("pipeline") else theirs).add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if not node.module.startswith("pipeline"):
                theirs.add(node.module)
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                ours.add(sub if module_file(sub) else node.module)
        elif registry_entry(node):
            ours.add(node.value)
    return ours - {module_name(file)}, {name.split(".")[0] for name in theirs}


def graph() -> dict[str, set[str]]:
    return {name: uses(file)[0] for name, file in modules().items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += edges.get(v, ())
    return seen


def test_the_package_has_no_import_circles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    """The check above is only as good as this: a three-module circle and a self-standing tail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_but_the_cli_imports_a_stage():
    offenders = {
        f"{name} -> {target}"
        for name, targets in graph().items()
        for target in targets & STAGES
        if name not in ("pipeline.cli", "pipeline.__main__")
    }
    assert not offenders, f"stages import stages (move what they share into a core module): {sorted(offenders)}"


def test_the_walk_sees_lazy_and_from_imports():
    edges = graph()
    assert "pipeline.distributed" in edges["pipeline.extract"]  # imported inside a function
    assert {"pipeline.embedder", "pipeline.store.summary"} <= edges["pipeline.extract"]
    assert "pipeline.backbones.base" in edges["pipeline.backbones.clip"]
    assert "pipeline.backbones.clip" in edges["pipeline.backbones"]  # the registry names it


def test_torch_stays_on_the_extract_side():
    """train and evaluate start fast and run where no GPU stack is installed."""
    files = modules()
    edges = graph()
    with_torch = {name for name, file in files.items() if "torch" in uses(file)[1]}
    assert with_torch, "the walk must see torch imports somewhere (the backbones)"
    for stage in ("pipeline.train", "pipeline.evaluate", "pipeline.manifest"):
        assert not reachable(edges, stage) & with_torch, (
            f"{stage} reaches torch through {reachable(edges, stage) & with_torch}"
        )
    allowed = EXTRACT_SIDE | {n for n in files if n.startswith("pipeline.backbones")}
    assert with_torch <= allowed, f"torch imported outside the extract side: {sorted(with_torch - allowed)}"
