"""Real `dvc repro` in a temporary git repo holding a copy of the project: only what changed reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, demo_params

PROJECT_FILES = ["pipeline", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvcignore", ".gitignore"]


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture
def repo(tmp_path, demo_images, tiny_clip) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    shutil.copytree(demo_images, root / "data" / "demo")
    shutil.copytree(tiny_clip, root / "data" / "tiny-clip")
    params = demo_params("data/demo", "data/tiny-clip")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    sh(root, "dvc", "init", "-q", "--force")
    return root


def test_repro_runs_only_what_changed(repo):
    first = sh(repo, "dvc", "repro")
    assert ran(first) == ["manifest", "extract", "train", "evaluate"]

    assert ran(sh(repo, "dvc", "repro")) == [], "a second repro must run nothing"

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["C"] = [0.5, 5.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro")) == ["train", "evaluate"]
    card = json.loads((repo / "models" / "probe" / "card.json").read_text())
    assert card["C"] in (0.5, 5.0)

    new = repo / "data" / "demo" / "Test_Fake" / "Deepfakes" / "900_901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (200, 30 * i, 90)).save(new / f"{i:04d}.png")
    out = sh(repo, "dvc", "repro")
    assert ran(out)[:2] == ["manifest", "extract"]
    assert "3 to embed" in out, "extract must embed only the new images"

    metrics = sh(repo, "dvc", "metrics", "show", "--json")
    assert '"auc"' in metrics and "deepfakes" in metrics
    sh(repo, "dvc", "plots", "show", "--json")
