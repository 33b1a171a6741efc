"""Extraction on a real dask.distributed LocalCluster (worker processes) gives the local result,
and survives a worker killed mid-run."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from tqdm import tqdm

from pipeline import backbones, config, extract, manifest
from pipeline.config import ConfigError
from pipeline.distributed import PartitionProgress, _trim_setting, gpu_for, partition_size
from pipeline.outputs import Outputs
from pipeline.store import caches
from pipeline.store.parquet import read_keys
from tests.conftest import (
    contents,
    fault_hooks,
    make_project,
    run_to_end,
    start_extract,
    update_params,
    wait_for_shards,
    wait_until_paused,
)


def test_a_dask_cluster_fills_the_cache_exactly_as_a_local_run(project, monkeypatch):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    local = extract.run(settings, outputs)
    (store,) = caches(outputs.embeddings)
    keys = sorted(store.keys())
    expected, _ = store.read(keys, "projection")
    shutil.rmtree(outputs.embeddings)

    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 2}, shard_size=24)
    distributed = extract.run(config.load(project / "params.yaml"), outputs)
    assert distributed == local  # same fingerprint, same counts
    (store,) = caches(outputs.embeddings)
    assert sorted(store.keys()) == keys
    got, _ = store.read(keys, "projection")
    np.testing.assert_array_equal(got, expected)
    assert len(store.shard_paths()) >= len(keys) // 24, "each worker committed its own shards"
    assert store.verify() == []

    # Nothing left to embed (the rerun DVC makes after an `evaluate` param changed): no cluster is
    # started and no worker loads the model; the description comes from cache/backbones.json.
    import distributed as dask_distributed

    started = []
    real_cluster = dask_distributed.LocalCluster
    monkeypatch.setattr(dask_distributed, "LocalCluster", lambda *a, **k: started.append(1) or real_cluster(*a, **k))
    assert extract.run(config.load(project / "params.yaml"), outputs) == local and started == []


def test_a_dask_run_with_nothing_new_after_a_local_run_starts_no_cluster(project, tiny_clip, monkeypatch):
    """The model named by a path relative to where the command runs (as the demo's params name
    it): the dask embedder, which hands its workers the resolved path, takes the description a
    local run remembered, instead of starting a cluster to have the workers describe the model."""
    import distributed as dask_distributed

    update_params(project, "model", name=os.path.relpath(tiny_clip))
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    local = extract.run(settings, outputs)
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    started = []
    real_cluster = dask_distributed.LocalCluster
    monkeypatch.setattr(dask_distributed, "LocalCluster", lambda *a, **k: started.append(1) or real_cluster(*a, **k))
    assert extract.run(config.load(project / "params.yaml"), outputs) == local and started == []


def test_a_task_retried_after_a_failure_midway_commits_each_image_once(project, monkeypatch, tmp_path, capfd):
    """dask reruns a task that raised (`retries`), from its first image: the rows its failed
    attempt had embedded are not committed beside the rerun's (each digest in one shard). The
    progress bar moves batch by batch within the one partition, and never counts an image twice."""
    marker = tmp_path / "failed once"
    fault_hooks(monkeypatch)
    monkeypatch.setenv("FAIL_ONCE_AFTER_IMAGES", "20")
    monkeypatch.setenv("FAIL_ONCE_MARKER", str(marker))
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1}, batch_size=4)
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    table = manifest.run(settings, outputs)
    extract.run(settings, outputs)
    assert marker.exists(), "the first attempt failed"
    (store,) = caches(outputs.embeddings)
    committed = [d for shard in store.shard_paths() for d in read_keys(shard)[0]]
    assert sorted(committed) == sorted(set(table.column("digest").to_pylist()))
    total = len(set(table.column("digest").to_pylist()))
    shown = [int(n) for n in re.findall(rf"embedding \(dask\):[^|]*\|[^|]*\| *(\d+)/{total}\b", capfd.readouterr().err)]
    assert shown[-1] == total and max(shown) == total, shown
    assert any(0 < n < total for n in shown), f"one partition of {total} images, shown only whole: {shown}"


def test_a_task_stopped_by_its_settings_is_not_retried_and_keeps_what_it_embedded(project, monkeypatch, tmp_path):
    """A task that dask would retry, but that its settings stopped (a batch too large for the
    GPU's memory, raised here whenever one image is read), would fail the same way again: it
    runs once, the run stops with the local run's sentence, named by the worker (on a cluster of
    unlike machines, the one to fix), and the images before it stay cached."""
    log = tmp_path / "out of memory"
    fault_hooks(monkeypatch)
    monkeypatch.setenv("OUT_OF_MEMORY_LOG", str(log))
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1}, batch_size=4)
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    table = manifest.run(settings, outputs)
    # The 11th image, in the third batch of the one task (160 images, one worker, shards of 4,096).
    monkeypatch.setenv("OUT_OF_MEMORY_ON", table.column("path")[10].as_py())
    with pytest.raises(
        ConfigError,
        match=r"^dask worker tcp://\S+: cpu ran out of memory on a batch of 4 images .+ extract.batch_size lower",
    ):
        extract.run(settings, outputs)
    assert len(log.read_text().splitlines()) == 1, "the task ran once"
    (store,) = caches(outputs.embeddings)
    assert store.keys() == set(table.column("digest").to_pylist()[:8]), "its first two batches are committed"
    assert store.verify() == []


def _executing(dask_worker) -> int:
    return dask_worker.state.executing_count  # a task whose client has gone counts until it returns


def test_a_stopped_runs_other_tasks_on_a_remote_scheduler_stop_at_their_next_batch(project, monkeypatch, tmp_path):
    """A run on a scheduler that outlives it (a cluster's) stops (here: one partition out of
    memory); dask cannot interrupt the threads of its other partitions, which used to run to their
    end, holding their workers from the next run and committing their shards after the run had let
    the cache's writer lock go. Each now notices at its next batch that its run has gone, and stops
    there, committing nothing."""
    from distributed import Client, LocalCluster, wait

    from pipeline.distributed import DaskEmbedder

    reads, log = tmp_path / "reads", tmp_path / "out of memory"
    fault_hooks(monkeypatch)
    monkeypatch.setenv("SLOW_READS_LOG", str(reads))
    monkeypatch.setenv("OUT_OF_MEMORY_LOG", str(log))
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    table = manifest.run(settings, outputs)
    # Two partitions of 80 (two workers, batches of 4): the first's first image is out of memory.
    monkeypatch.setenv("OUT_OF_MEMORY_ON", table.column("path")[0].as_py())
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        update_params(
            project, "extract", scheduler="dask", dask={"address": cluster.scheduler_address, "n_workers": 2},
            batch_size=4, num_workers=2,
        )  # fmt: skip
        with DaskEmbedder(config.load(project / "params.yaml")) as warm:
            wait(warm._warming)  # both workers hold the model: each takes a partition at once
        with pytest.raises(ConfigError, match="ran out of memory"):
            extract.run(config.load(project / "params.yaml"), outputs)
        deadline = time.monotonic() + 120
        while any(client.run(_executing).values()):
            assert time.monotonic() < deadline, "the stopped run's other partition is still running"
            time.sleep(0.2)
    (store,) = caches(outputs.embeddings)
    assert store.keys() == set(), "nothing committed after the run stopped"
    (stopped,) = {line.split()[0] for line in log.read_text().splitlines()}
    other = sum(pid != stopped for pid in reads.read_text().split())
    assert 0 < other < 80, f"the other partition read {other} of its 80 images"


def test_a_remote_clusters_workers_are_remembered_and_confirm_before_they_embed(project, monkeypatch, caplog):
    """What a remote scheduler's workers said of the model is remembered (under the model files as
    this machine sees them, the settings and the scheduler's address): a run with nothing to embed
    (the rerun DVC makes after an `evaluate` param changed) neither connects nor loads the model on
    every worker, and needs no scheduler at all (the cluster's job may have ended). Before they
    embed anything the workers describe it again: where they now load it otherwise (the cluster
    upgraded transformers), the run starts again with what they say, into a new cache."""
    import socket

    import dask
    from distributed import LocalCluster
    from PIL import Image

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]

    def cluster() -> LocalCluster:  # the same address each time, as a cluster's head node gives
        return LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address=None, host="127.0.0.1", scheduler_port=port
        )

    # precision auto (as params.yaml has it): the next run asks for the precision of the cache auto made
    address = f"tcp://127.0.0.1:{port}"
    update_params(project, "extract", scheduler="dask", dask={"address": address, "n_workers": 1}, precision="auto")
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    with cluster():
        first = extract.run(settings, outputs)
    assert first.embedded == first.images
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):  # no scheduler answers there now
        assert extract.run(settings, outputs) == first

    fault_hooks(monkeypatch)
    monkeypatch.setenv("OTHER_LIBRARY_VERSIONS", "1")  # for the workers of the clusters started from here on
    new = project / "data" / "Train_Real" / "Real_youtube" / "901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (i * 40, 10, 200)).save(new / f"{i:04d}.png")
    manifest.run(settings, outputs)
    here = backbones.base.library_versions("transformers")["transformers"]
    with cluster(), caplog.at_level("INFO", logger="pipeline.extract"):
        upgraded = extract.run(settings, outputs)
    assert (
        f"load {settings.model.name} otherwise than when they last described it: libraries.transformers "
        f"({here} then, {here}-other now); extract starts again" in caplog.text
    ), caplog.text
    assert upgraded.fingerprint != first.fingerprint and upgraded.embedded == upgraded.images == first.images + 3
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert extract.run(settings, outputs) == upgraded


def test_a_model_that_a_worker_cannot_load_stops_the_run_naming_the_worker(project):
    """The model is loaded, and described, on the workers only (this machine never loads it for a
    dask run it has not described before): a worker that cannot load it (here: a checkpoint of a
    family this version does not know) gives the local run's sentence, named by the worker, once,
    and the cluster started for it is closed (its workers held the model's memory, a GPU's too)."""
    (project / "model").mkdir()
    (project / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    update_params(project, "model", name=str(project / "model"))
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    with pytest.raises(ConfigError) as stopped:
        extract.run(settings, outputs)
    assert re.fullmatch(r"dask worker tcp://\S+: model '\S+/model' is a 'gpt2' checkpoint .+", str(stopped.value)), str(
        stopped.value
    )
    assert str(stopped.value).count("dask worker") == 1
    assert worker_processes(os.getpid()) == [], "the LocalCluster's workers outlived the run"


def test_a_task_stopped_by_a_full_disk_is_not_retried(project, monkeypatch, tmp_path):
    """A full disk (or quota, or a read-only cache) is no transient error: a task whose shard
    cannot be written runs once, not three times (each rerun embeds its whole partition again
    before it fails at the same write), and the run stops with the local run's error."""
    log = tmp_path / "shards refused"
    fault_hooks(monkeypatch)
    monkeypatch.setenv("NO_SPACE_LEFT_LOG", str(log))
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    with pytest.raises(OSError) as stopped:
        extract.run(settings, outputs)
    assert stopped.value.errno == errno.ENOSPC and "/shards/" in stopped.value.filename
    assert len(log.read_text().splitlines()) == 1, "the task ran once"


def test_a_worker_that_computes_another_fingerprint_stops_the_run_saying_what_differs(project, monkeypatch):
    """A worker whose libraries differ from the machine that described the model (a remote
    cluster's worker with another transformers) would put other numbers into the cache: it
    embeds nothing, and the run stops with one sentence naming the worker and what differs,
    instead of a traceback after dask retried the task on it."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    manifest.run(settings, outputs)
    extract.run(settings, outputs)  # cache/backbones.json now describes the model as loaded here
    shutil.rmtree(outputs.embeddings)
    fault_hooks(monkeypatch)
    monkeypatch.setenv("OTHER_LIBRARY_VERSIONS", "1")
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    here = backbones.base.library_versions("transformers")["transformers"]
    with pytest.raises(ConfigError) as stopped:
        extract.run(config.load(project / "params.yaml"), outputs)
    assert re.fullmatch(
        rf"dask worker tcp://\S+ loads the model otherwise than the cache \S+ was made: libraries\.transformers "
        rf"\({re.escape(here)} in the cache, {re.escape(here)}-other on the worker\); give every worker .+",
        str(stopped.value),
    ), str(stopped.value)
    (store,) = caches(outputs.embeddings)
    assert store.keys() == set()


def test_a_worker_that_cannot_find_images_this_machine_has_stops_the_run_naming_it(project, monkeypatch):
    """A remote worker without the shared folder (or with it mounted elsewhere) finds no image:
    the run stops with one sentence naming the worker and a file, not the local run's advice to
    rebuild the manifest (the files are there, and unchanged)."""
    settings, outputs = config.load(project / "params.yaml"), Outputs(project)
    table = manifest.run(settings, outputs)
    hidden = table.column("path")[5].as_py()
    fault_hooks(monkeypatch)
    monkeypatch.setenv("HIDDEN_FILE", hidden)
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    with pytest.raises(ConfigError) as stopped:
        extract.run(config.load(project / "params.yaml"), outputs)
    assert re.fullmatch(
        rf"dask worker tcp://\S+ cannot find 1 image file \(e\.g\. \S+{re.escape(hidden)}\) that this machine has; "
        r"every worker needs the model files, the images and the cache at the same paths as this machine \(.+",
        str(stopped.value),
    ), str(stopped.value)


def test_a_remote_worker_without_the_shared_folders_stops_the_run_naming_what_it_lacks(
    project, tiny_clip, tmp_path_factory
):
    """A remote scheduler's worker on a machine without the shared folders (here: a worker in a
    mount namespace of its own, with an empty tmpfs over the project folder) stops the run with
    one sentence naming the worker and what it cannot find, the model directory or the cache
    (not "download the model from the Hugging Face hub" or "run the extract stage first")."""
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("cannot start a process in a mount namespace of its own here (needs root and unshare)")
    shutil.copytree(tiny_clip, project / "model")
    scheduler_file = tmp_path_factory.mktemp("scheduler") / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    dask_cli = [sys.executable, "-m"]
    scheduler = subprocess.Popen(
        [*dask_cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)], **quiet,
    )  # fmt: skip
    worker = None
    try:
        for _ in range(300):
            if scheduler_file.exists() and scheduler_file.read_text().strip():
                break
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        command = [*dask_cli, "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"]
        worker = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs none "$0" && exec "$@"', str(project), *command], **quiet,
        )  # fmt: skip
        update_params(project, "extract", scheduler="dask", dask={"address": address, "n_workers": 1})
        update_params(project, "model", name=str(project / "model"))
        manifest.run(config.load(project / "params.yaml"), Outputs(project))
        with pytest.raises(ConfigError) as stopped:
            extract.run(config.load(project / "params.yaml"), Outputs(project))
        assert re.fullmatch(
            rf"dask worker tcp://\S+ cannot find the model directory {re.escape(str(project / 'model'))} that this "
            r"machine has; every worker needs the model files, the images and the cache at the same paths .+",
            str(stopped.value),
        ), str(stopped.value)

        update_params(project, "model", name=str(tiny_clip))  # a folder the worker sees
        with pytest.raises(ConfigError) as stopped:
            extract.run(config.load(project / "params.yaml"), Outputs(project))
        assert re.fullmatch(
            rf"dask worker tcp://\S+ cannot find the cache directory {re.escape(str(project))}/cache/embeddings/\S+ "
            r"that this machine has; every worker needs .+",
            str(stopped.value),
        ), str(stopped.value)
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_a_worker_running_other_code_of_this_package_stops_the_run_naming_the_files(project, tmp_path):
    """A remote scheduler's worker that imported this package before a `git pull` changed it (a
    cluster started days ago), or from another checkout, would embed what that version computes
    into the cache this version names: the run stops before it embeds anything, with one sentence
    naming the worker and the files that differ. Here the worker imports a copy of the package in
    which one file has one more line."""
    from distributed import LocalCluster

    import pipeline

    other = tmp_path / "other checkout"
    shutil.copytree(Path(pipeline.__file__).parent, other / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    changed = other / "pipeline" / "images.py"
    changed.write_text(changed.read_text() + "# a line added after the worker started\n")
    environment = {**os.environ, "PYTHONPATH": str(other)}  # and a folder without this checkout as its cwd
    with LocalCluster(n_workers=0, threads_per_worker=1, dashboard_address=None) as cluster:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1",
             "--no-dashboard"], env=environment, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            update_params(project, "extract", scheduler="dask", dask={"address": cluster.scheduler_address})
            settings, outputs = config.load(project / "params.yaml"), Outputs(project)
            manifest.run(settings, outputs)
            with pytest.raises(ConfigError) as stopped:
                extract.run(settings, outputs)
        finally:
            worker.terminate()
            worker.wait(timeout=20)
    assert re.fullmatch(
        r"dask worker tcp://\S+ runs another version of this package than this machine \(pipeline/images\.py "
        r"differs\): it was started before the code changed, or from another checkout; start the workers again "
        r"from this checkout .+",
        str(stopped.value),
    ), str(stopped.value)
    assert all(store.keys() == set() for store in caches(outputs.embeddings))


def worker_processes(pid: int) -> list[psutil.Process]:
    """The dask worker processes under an extract process (spawned Python children)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "multiprocessing" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_ctrl_c_on_a_local_clusters_run_is_one_sentence(tmp_path, many_images, tiny_clip):
    """Ctrl-C in a terminal goes to every process of the job, the LocalCluster's workers too: a
    busy one printed its KeyboardInterrupt traceback (dask's event loop, cancelled) and each warned
    that its running task "ended with CancelledError", above the run's one sentence. The workers
    leave Ctrl-C to the run, which closes the cluster."""
    project = make_project(tmp_path, many_images, tiny_clip)
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 1})
    port = contextlib.ExitStack()
    with contextlib.suppress(OSError):  # dask's usual port, held as a notebook's cluster holds it (or taken already)
        port.enter_context(socket.create_server(("", 8787)))
    with port:
        proc = start_extract(project, pause_after_images=8)
        wait_until_paused(proc, timeout=180)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: committed shards are kept; run the same command again to resume." in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "CancelledError" not in err, err
    assert "Worker process still alive" not in err, "killing the run's own busy worker on the way out is no news"
    assert "already in use" not in err, "the cluster's scheduler took dask's usual port, and said so when it was taken"


def test_ctrl_c_while_the_local_clusters_workers_start_is_one_sentence(tmp_path, many_images, tiny_clip):
    """Ctrl-C in a dask run's first seconds printed ~60-110 lines above the run's one sentence:
    (1) while the workers still imported distributed, before `dask_setup` ignores Ctrl-C, each
    printed its KeyboardInterrupt traceback, and the half-started cluster "Exception ignored in
    atexit callback: close_clusters" (multiprocessing's resource tracker, started on the cluster's
    first spawn, unblocked SIGINT in the thread that spawns the workers); (2) while a worker's
    event loop unpickled its first task (importing torch, 2-3 s), it missed the closing scheduler's
    goodbye and logged "Failed to communicate with scheduler during heartbeat", and, killed by its
    nanny, left tqdm's multiprocessing lock to the resource tracker's "leaked semaphore" warning.
    (1) fails here without its fix every time; (2) is a race that the demo project lost 6 times of
    6 (Ctrl-C as a worker maps libtorch) and this smaller project did not in 4 runs: kept as a guard."""
    project = make_project(tmp_path, many_images, tiny_clip)
    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 2})

    def workers(proc) -> list[psutil.Process]:
        return [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]

    def workers_started(proc) -> bool:
        return bool(workers(proc))

    def a_worker_imports_torch(proc) -> bool:  # unpickling its first task, on its event loop
        return any("libtorch_cpu" in Path(f"/proc/{p.pid}/maps").read_text() for p in workers(proc))

    for moment in (workers_started, a_worker_imports_torch):
        shutil.rmtree(project / "cache" / "embeddings", ignore_errors=True)
        proc = start_extract(project)
        deadline = time.monotonic() + 120
        while not moment(proc):
            assert proc.poll() is None and time.monotonic() < deadline, f"{moment.__name__} never came"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted: committed shards are kept; run the same command again to resume." in err, err
        for noise in ("Traceback", "KeyboardInterrupt", "Exception ignored", "heartbeat", "leaked semaphore"):
            assert noise not in err, f"{moment.__name__}: {err}"


def test_ctrl_c_before_the_loop_starts_a_client_call_leaves_no_traceback(caplog):
    """CI, once: Ctrl-C came while distributed's `sync` (behind every blocking client call) had
    queued the call on its event loop but the loop had not started it; the callback `sync` queues
    to cancel the call failed (NameError) and tornado logged its traceback above the run's one
    sentence. Here the loop is busy when Ctrl-C comes to the thread waiting in `sync`, so the call
    has not started."""
    import asyncio
    import threading

    from distributed.utils import LoopRunner, sync

    from pipeline import distributed

    def waiting_in_sync(thread: int) -> bool:  # in `sync`'s own `wait`, which takes Ctrl-C
        frame = sys._current_frames().get(thread)
        while frame is not None and not (frame.f_code.co_name == "wait" and frame.f_back.f_code.co_name == "sync"):
            frame = frame.f_back
        return frame is not None

    def busy() -> None:  # the loop's turn: Ctrl-C to the thread waiting in `sync`, then some more work
        while not waiting_in_sync(main):
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.3)

    distributed.quiet_interrupted_calls()
    main = threading.main_thread().ident
    runner = LoopRunner()
    runner.start()
    try:
        runner.loop.add_callback(busy)  # before the call below, which waits its turn
        with caplog.at_level(logging.ERROR, logger="tornado.application"), pytest.raises(KeyboardInterrupt):
            sync(runner.loop, asyncio.sleep, 5)
        time.sleep(1)  # the loop runs the call, then the cancelling callback
        assert not [r for r in caplog.records if r.exc_info], caplog.text
    finally:
        runner.stop()


def test_killing_a_worker_mid_run_then_rerunning_redoes_no_committed_shard(tmp_path, many_images, tiny_clip, reference):
    project = make_project(tmp_path, many_images, tiny_clip)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"].update(scheduler="dask", dask={"address": "", "n_workers": 2}, shard_size=16)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # Each worker reads 32 images (two partitions, committed) and then pauses in its third.
    proc = start_extract(project, pause_after_images=32)
    wait_until_paused(proc, timeout=180)
    shards = project / "cache" / "embeddings"
    wait_for_shards(proc, project, 2)
    victims = worker_processes(proc.pid)
    assert victims, "expected dask worker processes"
    os.kill(victims[0].pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)  # then stop the whole run, as a crash or a cancelled job would
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()

    (store,) = caches(shards)
    committed = set(store.keys())
    before = {p.name for p in store.shard_paths()}
    assert 0 < len(committed) < len(reference[0])
    assert store.verify() == []

    log = run_to_end(project)
    assert f"{len(reference[0]) - len(committed)} to embed" in log, "committed shards are not redone"
    (store,) = caches(shards)
    assert before <= {p.name for p in store.shard_paths()}
    keys, embeddings = contents(project)
    assert keys == reference[0]
    # Both runs embedded on dask workers, one thread each (dask's OMP_NUM_THREADS=1), and the
    # reference locally with every core: where fp32 kernels depend on the thread count, as AVX2's
    # do at batches of 4, the last bits may differ (up to 1.5e-6, measured with the kernels capped
    # at AVX2); on AVX-512 they match bit for bit. A wrong or misplaced vector differs by far more.
    np.testing.assert_allclose(embeddings, reference[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("address", ["", None])
def test_an_empty_address_means_a_local_cluster(project, address):
    update_params(project, "extract", scheduler="dask", dask={"address": address, "n_workers": 1})
    assert config.load(project / "params.yaml").extract.dask.address is None


def test_an_address_where_no_scheduler_answers_is_one_sentence_naming_the_key(project):
    import socket

    import dask

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    update_params(project, "extract", scheduler="dask", dask={"address": address, "n_workers": 1})
    settings = config.load(project / "params.yaml")
    manifest.run(settings, Outputs(project))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(config.ConfigError) as error:
        extract.run(settings, Outputs(project))
    assert str(error.value).startswith(f"extract.dask.address is {address}, where no dask scheduler answered")
    assert "LocalCluster" in str(error.value) and "\n" not in str(error.value)


def test_a_scheduler_without_workers_yet_is_waited_for_and_says_so(project, caplog):
    """A scheduler whose workers are still queued (a batch system): the run says that it waits,
    then runs on the first worker that joins, and says that this worker runs with dask's
    MALLOC_TRIM_THRESHOLD_ (slower) and how to start it without."""
    import threading
    import time

    from distributed import LocalCluster

    with LocalCluster(n_workers=0, threads_per_worker=1, dashboard_address=None) as cluster:
        update_params(project, "extract", scheduler="dask", dask={"address": cluster.scheduler_address, "n_workers": 1})
        settings = config.load(project / "params.yaml")
        manifest.run(settings, Outputs(project))
        done = []
        run = threading.Thread(target=lambda: done.append(extract.run(settings, Outputs(project))))
        with caplog.at_level("WARNING", logger="pipeline.distributed"):
            run.start()
            deadline = time.monotonic() + 60
            while "has no workers yet" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            assert f"waiting for the first to join (`dask worker {cluster.scheduler_address}`)" in caplog.text
            assert not done, "nothing can run before a worker joins"
            cluster.scale(1)
            run.join(120)
    assert done and done[0].embedded == done[0].images > 0
    assert "1 of 1 dask workers run with MALLOC_TRIM_THRESHOLD_ set" in caplog.text
    assert "`distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`" in caplog.text


def test_workers_are_spread_over_the_gpus_of_a_machine():
    """Worker i takes GPU i mod n (checked here as logic: this machine has no GPU)."""
    assert [gpu_for(i, "auto", 4) for i in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert [gpu_for(f"gpu-box-{i}", "cuda", 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert gpu_for(3, "cuda:1", 4) == "cuda:1" and gpu_for(3, "cpu", 4) == "cpu", "an explicit device is kept"
    assert gpu_for(3, "auto", 1) == "auto" and gpu_for("scheduler-less", "cuda", 2) == "cuda"


def test_partitions_keep_every_worker_busy_to_the_end():
    """Tasks are at most a shard, in whole batches (so a worker embeds the batches a local run
    would: on CPUs whose fp32 kernels depend on the batch, such as AVX2's, a vector's last bits
    do), and as many as the shards would be rounded up to a multiple of the workers: handed to
    whichever worker is free (as dask does), no worker finishes more than one batch per task after
    the others (random cases)."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, batch, workers = int(rng.integers(1, 60_000)), int(rng.choice([8, 64, 256])), int(rng.integers(1, 9))
        shard = int(rng.choice([batch, 24, 1000, 4096, 16_384]))
        size = partition_size(n, shard, batch, workers)
        sizes = [min(size, n - start) for start in range(0, n, size)]
        assert sum(sizes) == n and all(0 < s <= max(shard, batch) for s in sizes), (n, shard, batch, workers, sizes)
        assert all(s % batch == 0 for s in sizes[:-1]), "whole batches, but for the last task"
        loads = [0] * workers
        for s in sizes:
            loads[loads.index(min(loads))] += s
        rounds = -(-len(sizes) // workers)
        assert max(loads) <= n / workers + rounds * batch, (n, shard, batch, workers, sizes, loads)


def test_progress_counts_each_partitions_latest_attempt_and_its_result_once():
    """The workers' per-batch reports arrive on the client's event loop, in any order across
    workers: a rerun attempt restarts its partition's count, a late report of the attempt it
    replaced or of a finished partition moves nothing, and the results make the exact total."""
    bar = tqdm(total=100, file=io.StringIO())
    progress = PartitionProgress(bar)
    progress.report(0, "a", 20)
    progress.report(1, "c", 10)
    progress.report(0, "b", 4)  # partition 0 rerun after its worker died
    assert bar.n == 14
    progress.report(0, "a", 40)  # the dead attempt's last report, late
    assert bar.n == 14
    progress.finish(1, 50)
    progress.report(1, "c", 30)  # after its result
    progress.report(0, "b", 24)
    assert bar.n == 74
    progress.finish(0, 50)
    assert bar.n == 100


def _models_loaded() -> int:
    from pipeline import distributed

    return len(distributed._BACKBONES)


def test_every_worker_loads_its_model_while_the_first_describes_it(project):
    """A first run (the model not yet described in cache/backbones.json) asks every worker, not one
    while the others wait: their models are loaded by the time their partitions come. The workers
    run without the MALLOC_TRIM_THRESHOLD_ that dask's nannies set (each large allocation of the
    model page-faulted anew: 20 % of a forward pass), and this process's environment is left as it
    was (a nanny exports its worker's settings into the process that starts it)."""
    from distributed import wait

    from pipeline.distributed import DaskEmbedder

    update_params(project, "extract", scheduler="dask", dask={"address": "", "n_workers": 2})
    environ = dict(os.environ)
    with DaskEmbedder(config.load(project / "params.yaml")) as dask_embedder:
        wait(dask_embedder._warming)
        assert dict(os.environ) == environ, "the nannies' settings (OMP_NUM_THREADS=1, ...) stay out of this process"
        loaded = dask_embedder.client.run(_models_loaded)
        allocators = dask_embedder.client.run(_trim_setting)
    assert sorted(loaded.values()) == [1, 1], loaded
    assert list(allocators.values()) == [None, None], allocators


def _reader_processes() -> list[int]:
    import multiprocessing

    return sorted(child.pid for child in multiprocessing.active_children())


def test_a_worker_that_may_have_children_decodes_in_processes_kept_for_every_partition(project):
    """A worker that may have children (`distributed.worker.daemon: False`; dask's default, a
    daemonic one, decodes in threads) reads in `extract.num_workers` processes, started on its
    first partition and kept for all the others, this run's and the next's (their start is not
    paid again per partition); the cache is the one a local run makes."""
    import dask
    from distributed import Client, LocalCluster

    outputs = Outputs(project)
    manifest.run(config.load(project / "params.yaml"), outputs)
    extract.run(config.load(project / "params.yaml"), outputs)
    expected = contents(project)
    shutil.rmtree(outputs.embeddings)

    params = yaml.safe_load((project / "params.yaml").read_text())
    everything, tested = params["data"]["datasets"], params["evaluate"]["datasets"]
    with (
        dask.config.set({"distributed.worker.daemon": False}),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        address = {"address": cluster.scheduler_address, "n_workers": 1}
        update_params(project, "extract", scheduler="dask", dask=address, shard_size=16, num_workers=2)
        update_params(project, "data", datasets={k: v for k, v in everything.items() if k != "face2face"})
        update_params(project, "evaluate", datasets=[name for name in tested if name != "face2face"])
        manifest.run(config.load(project / "params.yaml"), outputs)
        first = extract.run(config.load(project / "params.yaml"), outputs)
        (readers,) = client.run(_reader_processes).values()
        assert len(readers) == 2, "the worker's reader processes, alive after the run"

        update_params(project, "data", datasets=everything)  # a dataset added: the next run embeds it
        update_params(project, "evaluate", datasets=tested)
        manifest.run(config.load(project / "params.yaml"), outputs)
        second = extract.run(config.load(project / "params.yaml"), outputs)
        assert second.embedded > 0 and second.images > first.images
        assert list(client.run(_reader_processes).values()) == [readers], "the same processes read the new images"
    keys, embeddings = contents(project)
    assert keys == expected[0]
    np.testing.assert_array_equal(embeddings, expected[1])
