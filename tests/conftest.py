"""Shared fixtures: a tiny random-weight CLIP and a small demo dataset, built once per session
through the same code (`save_pretrained`, PNG files) a user's run goes through."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import demo

REPO = Path(__file__).resolve().parents[1]
FFPP_SPLITS = REPO.parent / "shared" / "ffpp-splits"

# Small enough to embed in about a second, large enough for every split to hold both classes.
DEMO_VIDEOS = 16
DEMO_FRAMES = 2


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny-clip"
    demo.make_tiny_clip(directory)
    return directory


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    demo.make_dataset(root, n_videos=DEMO_VIDEOS, frames=DEMO_FRAMES)
    return root


def demo_params(data_root: Path, model_dir: Path, **overrides) -> dict:
    """The default params.yaml, pointed at test data; `section={...}` overrides merge in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = str(data_root)
    params["model"]["name"] = str(model_dir)
    params["extract"]["num_workers"] = 0
    params["extract"]["batch_size"] = 16
    for section, values in overrides.items():
        params[section].update(values)
    return params


@pytest.fixture
def project(tmp_path, demo_images, tiny_clip):
    """A project directory with its own copy of the demo images and a params.yaml for them."""
    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(demo_params(data, tiny_clip)))
    return tmp_path


def update_params(project: Path, section: str, **values) -> None:
    """Change keys of one params.yaml section in a project directory."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params))
