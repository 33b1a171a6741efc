"""A teammate without the images: machine A extracts and pushes, machine B pulls only the cache
it needs and trains and evaluates with other settings, without ever loading the backbone.

Real DVC, two git clones, and two real remotes: a local directory and an S3 API served on
127.0.0.1 by moto_server (what dvc-s3's own tests use)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.test_dvc import commit, copy_project, ran, sh

BUCKET = "embeddings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3-compatible server on loopback, with one bucket."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.fail("moto_server is not installed; `pip install -e '.[dev]'` installs it")
    port = free_port()
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def remote_objects(kind: str, location) -> set[str]:
    """md5s of the objects a DVC remote holds."""
    if kind == "local":
        return {p.parent.name + p.name for p in Path(location).rglob("*") if p.is_file()}
    import boto3

    listing = boto3.client("s3", endpoint_url=location).list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {"".join(obj["Key"].split("/")[-2:]) for obj in listing}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_teammate_trains_and_evaluates_from_pulled_embeddings_only(kind, tmp_path, request):
    # ---- machine A: the images, the model, the GPU
    a = copy_project(tmp_path / "A", shard_size=24)  # several shards, so "only the new shard" is visible
    if kind == "local":
        location = tmp_path / "remote"
        sh(a, "dvc", "remote", "add", "-d", "shared", str(location))
    else:
        location = request.getfixturevalue("s3_endpoint")
        sh(a, "dvc", "remote", "add", "-d", "shared", f"s3://{BUCKET}/cache")
        sh(a, "dvc", "remote", "modify", "shared", "endpointurl", location)
    assert ran(sh(a, "dvc", "repro")) == ["demo", "scan", "manifest", "extract", "train", "evaluate"]
    commit(a, "results")
    sh(a, "dvc", "push")
    pushed_first = remote_objects(kind, location)
    assert pushed_first

    # ---- machine B: a clone with no images and no model
    b = tmp_path / "B"
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    assert not (b / "data").exists()
    sh(b, "dvc", "pull", "extract")
    assert (b / "cache" / "extract.json").exists()
    params = yaml.safe_load((b / "params.yaml").read_text())
    params["train"].update(C=[0.5], probe="linear_svm")
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(b, "dvc", "repro", "--pull", "--allow-missing")
    assert ran(out) == ["scan", "train", "evaluate"], "B must not run manifest or extract (no images, no model)"
    card = json.loads((b / "models" / "probe" / "card.json").read_text())
    assert (card["probe"], card["C"]) == ("linear_svm", 0.5)
    assert json.loads((b / "metrics" / "evaluate.json").read_text())["faceswap"]["frame"]["auc"] is not None
    assert not (b / "data").exists(), "B never saw an image nor the model's weights"
    commit(b, "B's settings")
    out = sh(
        b, "dvc", "exp", "run", "--pull", "--allow-missing", "-S", "train.C=[0.1,1]", "-S", "evaluate.bootstrap=200"
    )
    assert ran(out) == ["scan", "train", "evaluate"], "an experiment on B also runs without images or model"

    # B pulled what it needed, not every output of A (A's probe and reports were never fetched).
    lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    a_reports = next(o for o in lock["evaluate"]["outs"] if o["path"] == "reports")["md5"]
    a_probe = next(o for o in lock["train"]["outs"] if o["path"] == "models/probe")["md5"]
    b_objects = {p.parent.name + p.name for p in (b / ".dvc" / "cache").rglob("*") if p.is_file()}
    assert a_reports not in b_objects and a_probe not in b_objects

    # A has more images: the next push uploads the new shard, not the shards already there.
    shards_before = {md5(p) for p in (a / "cache" / "embeddings").glob("*/shards/*")}
    new = a / "data" / "demo" / "Test_Fake" / "Deepfakes" / "900_901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (200, 30 * i, 90)).save(new / f"{i:04d}.png")
    assert "3 to embed" in sh(a, "dvc", "repro")
    commit(a, "more images")
    sh(a, "dvc", "push")
    added = remote_objects(kind, location) - pushed_first
    new_shards = {md5(p) for p in (a / "cache" / "embeddings").glob("*/shards/*")} - shards_before
    assert len(new_shards) == 1
    assert new_shards <= added, "the new shard was pushed"
    assert not (shards_before & added), "no shard already on the remote was pushed again"
    assert len(added) < len(pushed_first)
