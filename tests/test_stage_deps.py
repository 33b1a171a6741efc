"""Stale results impossible from `dvc.yaml`'s side: every module a stage runs is a dependency of
that stage (so editing it reruns the stage), and no stage asks for a params key that a valid
short params.yaml may leave out."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from pipeline import config
from tests.conftest import REPO

PACKAGE = REPO / "pipeline"


def module_file(name: str) -> Path | None:
    """pipeline.x.y -> its file (module or package __init__), None if it is not a module."""
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def registry_entry(node: ast.AST) -> str | None:
    """A string constant naming a pipeline module (a registry entry, imported with importlib)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("pipeline."):
        return node.value if module_file(node.value) else None
    return None


def imported_modules(file: Path, module_level_only: bool) -> set[str]:
    """Names of the pipeline modules `file` imports (anywhere in it, or only at module level)."""
    tree = ast.parse(file.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
        elif not module_level_only and registry_entry(node):
            found.add(node.value)
    # importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py too
    return {".".join(m.split(".")[: i + 1]) for m in found for i in range(len(m.split(".")))}


def stage_modules(stage: str) -> set[Path]:
    """Every file that `python -m pipeline <stage>` may run. The CLI is followed through its
    module-level imports only: it imports the one stage module it dispatches to."""
    todo, seen = ["pipeline.__main__", "pipeline.cli", f"pipeline.{stage}"], set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name), module_level_only=name == "pipeline.cli")
    return {module_file(n) for n in seen}


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == REPO / d or ((REPO / d).is_dir() and (REPO / d) in file.parents) for d in deps)


def test_every_module_a_stage_imports_is_a_dependency_of_that_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[:3] == ["python", "-m", "pipeline"], f"stage {name} runs `{stage['cmd']}`"
        files = stage_modules(command[3])
        assert module_file(f"pipeline.{command[3]}") in files
        lacking = sorted(str(f.relative_to(REPO)) for f in files if not covered(f, stage.get("deps", [])))
        if lacking:
            missing[name] = lacking
    assert not missing, f"add these to the stages' deps in dvc.yaml: {missing}"


def test_the_import_walk_sees_lazy_imports():
    """The check above is only as good as this walk: it must follow imports inside functions."""
    extract = {str(f.relative_to(PACKAGE)) for f in stage_modules("extract")}
    assert {"distributed.py", "embedder.py", "images.py", "atomic.py", "config.py", "outputs.py"} <= extract
    assert "backbones/clip.py" in extract, "a family named in the backbone registry is a dependency"
    assert "report.py" in {f.name for f in stage_modules("evaluate")}


SHORT_PARAMS = {  # what the README's "Running it on FaceForensics++" needs, and nothing more
    "data": {
        "root": "data",
        "datasets": {"real": {"path": "real", "label": "real"}, "fs": {"path": "fs", "label": "fake"}},
    },
    "model": {"name": "openai/clip-vit-large-patch14"},
    "extract": {},
    "train": {"datasets": ["real", "fs"]},
    "evaluate": {"datasets": ["fs"]},
}


def test_dvc_yaml_asks_only_for_params_a_short_valid_params_file_has():
    config.from_dict(SHORT_PARAMS)  # valid
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            value = SHORT_PARAMS
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, (
                    f"stage {name} depends on params key '{key}', which a valid params.yaml may omit: "
                    "DVC would refuse to run it"
                )
                value = value[part]
