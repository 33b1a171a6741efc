"""Shared fixtures: a tiny random-weight CLIP and a small demo dataset, built once per session
through the same code (`save_pretrained`, PNG files) a user's run goes through."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import config, demo, distributed, manifest
from pipeline.outputs import Outputs
from pipeline.store import caches

REPO = Path(__file__).resolve().parents[1]
FFPP_SPLITS = REPO.parent / "shared" / "ffpp-splits"

# Small enough to embed in about a second, large enough for every split to hold both classes.
DEMO_VIDEOS = 16
DEMO_FRAMES = 2

# A test's `device` parameter: the GPU case runs where CUDA is (see BENCHMARKS.md, "GPU").
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def machine_memory(tmp_path_factory) -> None:
    """The scan remembers md5s per machine, under $XDG_CACHE_HOME (`file_index.machine_md5s`):
    the tests, and the stages they run in subprocesses, keep theirs in the session's own folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # `dvc init` in a test's new repo (whose config does not turn analytics off yet, as this project's
    # .dvc/config does) started DVC's analytics daemon: a request to the internet, a file left in /tmp.
    os.environ["DVC_NO_ANALYTICS"] = "1"


@pytest.fixture(autouse=True)
def environment_kept():
    """Each test leaves os.environ as it found it. A dask nanny started in this process (a test's
    own LocalCluster) exports its workers' settings here (OMP_NUM_THREADS=1, ...), and a later
    test's stage in a subprocess then ran single-threaded: on an AVX2 CPU, whose fp32 kernels
    depend on the thread count, with other last bits than the reference run."""
    with distributed._environ_kept():
        yield


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
    params["extract"]["precision"] = "fp32"  # tests compare numbers: never let a CPU's features decide
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


# --------------------------------------------------------------------------- extractor processes


@pytest.fixture(scope="session")
def many_images(tmp_path_factory):
    """Enough images that a run with tiny shards takes a few seconds."""
    root = tmp_path_factory.mktemp("many") / "data"
    demo.make_dataset(root, n_videos=40, frames=4)
    return root


def make_project(path, images, tiny_clip, fmt="parquet", workers=0):
    shutil.copytree(images, path / "data")
    params = demo_params(path / "data", tiny_clip)
    params["extract"].update(format=fmt, batch_size=4, shard_size=8, num_workers=workers)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    manifest.run(config.load(path / "params.yaml"), Outputs(path))
    return path


# With PAUSE_AFTER_IMAGES=N in the environment, `tests/pause/sitecustomize.py` makes every Python
# process of a run (the extractor, its DataLoader workers, dask workers) stop reading images for
# good after N and say "paused" on stdout: a test then interrupts a run that is certainly still
# going, at a known point, with no sleep and no race. The extractor's own code is untouched.
PAUSE_DIR = Path(__file__).parent / "pause"


def fault_hooks(monkeypatch) -> None:
    """Put `tests/pause/sitecustomize.py` on PYTHONPATH for the processes this test starts (dask
    workers inherit it); the test then sets the variable of the fault it injects."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PAUSE_DIR), os.environ.get("PYTHONPATH")])))


def paused_env(pause_after_images: int | None) -> dict:
    if pause_after_images is None:
        return dict(os.environ)
    path = os.pathsep.join(filter(None, [str(PAUSE_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PAUSE_AFTER_IMAGES": str(pause_after_images), "PYTHONPATH": path}


def start_extract(project, pause_after_images: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", "--params", str(project / "params.yaml")],
        env=paused_env(pause_after_images),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a job in a terminal
    )


def wait_until_paused(proc, timeout=120.0) -> None:
    """Block until a `start_extract(..., pause_after_images=N)` run has read its N images."""
    deadline = time.monotonic() + timeout
    while (line := proc.stdout.readline()) != "paused\n":
        assert line, f"extract ended before pausing:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the pause"


def shard_count(project) -> int:
    found = list((project / "cache" / "embeddings").glob("*/shards/*"))
    return sum(1 for p in found if not p.name.startswith(".tmp-"))


def wait_for_shards(proc, project, n, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while shard_count(project) < n:
        assert proc.poll() is None, f"extract ended before {n} shards:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for shards"
        time.sleep(0.005)


def run_to_end(project) -> str:
    proc = start_extract(project)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def contents(project) -> tuple[list[str], np.ndarray]:
    (store,) = caches(project / "cache" / "embeddings")
    assert store.verify() == []
    keys = sorted(store.keys())
    return keys, store.read(keys, "projection")[0]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, many_images, tiny_clip):
    project = make_project(tmp_path_factory.mktemp("reference"), many_images, tiny_clip)
    run_to_end(project)
    return contents(project)


def terminating_at(count: int, read, reads: list):
    """`read`, recording each path in `reads`, that sends this process a real SIGTERM at the
    `count`th; from then on each read takes 0.05 s (a large file's, during which the run takes
    the signal)."""

    def reading(path):
        reads.append(path)
        if len(reads) == count:
            os.kill(os.getpid(), signal.SIGTERM)
        if len(reads) >= count:
            time.sleep(0.05)
        return read(path)

    return reading


def run_terminated(run, *args) -> None:
    """`run(*args)`, which must end on SIGTERM, handled as `python -m pipeline` handles it."""
    from pipeline import cli

    before = signal.signal(signal.SIGTERM, cli._terminated)
    try:
        with pytest.raises(cli.Terminated):
            run(*args)
    finally:
        signal.signal(signal.SIGTERM, before)


def in_thread(call, timeout: float = 120, what: str = "the call"):
    """`call()` in a daemon thread, its result returned; a call still running after `timeout`
    seconds fails the test, instead of hanging the session, with where its thread and every other
    thread of this process were then (`stacks`): a hang seen only on CI's machine says where it
    waits."""
    result: list = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"in_thread: {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{what} still ran after {timeout:.0f} s; the threads of this process then:\n{stacks(thread)}")
    if failed:
        raise failed[0]
    return result[0]


def stacks(first: threading.Thread) -> str:
    """Every thread's stack in this process, `first`'s first: native frames too (OpenMP, a lock's
    wait) where py-spy (the dev extra) may read this process, else the Python frames."""
    spy = Path(sys.executable).parent / "py-spy"
    try:
        dump = subprocess.run(
            [str(spy), "dump", "--native", "--pid", str(os.getpid())], capture_output=True, text=True, timeout=60
        )
        blocks = ["Thread " + b for b in dump.stdout.split("\nThread ")[1:]] if dump.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        blocks = []
    if not blocks:
        names = {t.ident: t.name for t in threading.enumerate()}
        blocks = [
            f'Thread {ident}: "{names.get(ident, "?")}"\n{"".join(traceback.format_stack(frame))}'
            for ident, frame in sys._current_frames().items()
        ]
    return "\n".join(sorted(blocks, key=lambda block: f'"{first.name}"' not in block.partition("\n")[0]))
