"""Crash safety with real processes: SIGKILL or Ctrl-C at any point loses at most the shard in
flight, and the resumed run ends with exactly the keys and embeddings of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipeline.store import caches
from tests.conftest import (
    REPO,
    contents,
    make_project,
    run_to_end,
    start_extract,
    wait_for_shards,
    wait_until_paused,
)


# 160 images, batches of 4, shards of 8 rows. A reader pauses after `pause` images (each of the
# two DataLoader workers reads every other batch), then the run is killed once `shards` are
# committed: early, late, and with worker processes.
@pytest.mark.parametrize(
    ("pause", "shards", "fmt", "workers"),
    [(24, 2, "parquet", 0), (124, 15, "hdf5", 0), (60, 12, "parquet", 2)],
)
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    tmp_path, many_images, tiny_clip, reference, pause, shards, fmt, workers
):
    project = make_project(tmp_path, many_images, tiny_clip, fmt, workers)
    proc = start_extract(project, pause_after_images=pause)
    wait_until_paused(proc)
    wait_for_shards(proc, project, shards)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()

    (store,) = caches(project / "cache" / "embeddings")
    committed = store.count()
    assert 0 < committed < len(reference[0]), "the kill should land mid-run"
    assert store.verify() == [], "a killed run must leave no torn shard visible"

    log = run_to_end(project)
    assert f"{len(reference[0]) - committed} to embed" in log, "the rerun embeds only what was not committed"
    keys, embeddings = contents(project)
    assert keys == reference[0]
    np.testing.assert_array_equal(embeddings, reference[1])
    assert not list((project / "cache" / "embeddings").glob("*/shards/.tmp-*"))


def test_ctrl_c_commits_what_is_buffered_and_exits_cleanly(tmp_path, many_images, tiny_clip, reference):
    project = make_project(tmp_path, many_images, tiny_clip)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"]["shard_size"] = 10_000  # everything stays buffered until the end
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = start_extract(project, pause_after_images=40)
    wait_until_paused(proc)  # 10 batches embedded and buffered; the 11th is being read
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: committed shards are kept" in err
    assert "Traceback" not in err

    (store,) = caches(project / "cache" / "embeddings")
    assert store.count() == 40, "the buffered rows were committed on Ctrl-C"
    run_to_end(project)
    keys, embeddings = contents(project)
    assert keys == reference[0]
    np.testing.assert_array_equal(embeddings, reference[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_commits_what_is_buffered_as_ctrl_c_does(tmp_path, many_images, tiny_clip, reference, workers):
    """SIGTERM is how a run is usually stopped where nobody is at the keyboard: a batch system's
    time limit (SLURM sends it to every process of the job, then SIGKILL), `timeout`, `docker
    stop`, a pod evicted. It stops extract as Ctrl-C does: what is buffered is committed (up to a
    shard's worth of work, minutes of a CPU's), the DataLoader workers stop quietly, exit 143.
    Sent to the process group here, the workers' too."""
    project = make_project(tmp_path, many_images, tiny_clip, workers=workers)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"]["shard_size"] = 10_000  # everything stays buffered until the end
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = start_extract(project, pause_after_images=40)
    wait_until_paused(proc)  # with workers, each has read its first 40 images (10 batches)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM): committed shards are kept; run the same command again to resume." in err
    assert "Traceback" not in err and "killed by signal" not in err, err

    (store,) = caches(project / "cache" / "embeddings")
    assert store.count() >= 40, "the buffered rows were committed on SIGTERM"
    log = run_to_end(project)
    assert f"{len(reference[0]) - store.count()} to embed" in log
    keys, embeddings = contents(project)
    assert keys == reference[0]
    np.testing.assert_array_equal(embeddings, reference[1])


def test_a_second_extractor_on_the_same_cache_is_refused(tmp_path, many_images, tiny_clip, reference):
    project = make_project(tmp_path, many_images, tiny_clip)
    proc = start_extract(project, pause_after_images=8)
    wait_until_paused(proc)
    wait_for_shards(proc, project, 1)
    os.killpg(proc.pid, signal.SIGKILL)  # leaves a partly filled cache, as a first run would
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    (store,) = caches(project / "cache" / "embeddings")
    with store.writer_lock():  # this test process is now the extractor writing to the cache
        second = subprocess.run(
            [sys.executable, "-m", "pipeline", "extract", "--params", str(project / "params.yaml")],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    assert second.returncode == 2
    assert f"another extract (pid {os.getpid()}" in second.stderr and "is writing to" in second.stderr
    assert "Traceback" not in second.stderr
    run_to_end(project)  # the lock is free again: the next run completes the cache
    assert contents(project)[0] == reference[0]
