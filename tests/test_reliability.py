"""Faults injected into real runs: the cache never serves wrong numbers, a failing disk never
hangs the extractor, and nothing already committed is lost."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml
from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock

from pipeline import backbones, cli, config, extract, images, manifest, manifest_table, perturb, probes, train
from pipeline.outputs import Outputs
from pipeline.store import EmbeddingStore, caches
from pipeline.store.shard import ShardData
from tests.conftest import (
    contents,
    in_thread,
    make_project,
    run_terminated,
    run_to_end,
    start_extract,
    update_params,
)


def cli_in_thread(argv: list[str], timeout: float = 120) -> int:
    """Run the CLI in-process, failing the test (instead of hanging it) if it does not return."""
    return in_thread(lambda: cli.main(argv), timeout, f"`{argv[0]}`")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_a_writer_failing_at_shard_k_stops_the_run_in_seconds_and_keeps_finished_shards(
    tmp_path, many_images, tiny_clip, reference, capsys, monkeypatch, fmt
):
    project = make_project(tmp_path, many_images, tiny_clip, fmt)
    real_write = EmbeddingStore.commit
    calls = []

    def fail_at_third_shard(self, data, fmt="parquet"):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "shards" / ".tmp-x"))
        return real_write(self, data, fmt)

    monkeypatch.setattr(EmbeddingStore, "commit", fail_at_third_shard)
    started = time.monotonic()
    code = cli_in_thread(["extract", "--params", str(project / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 60
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device while writing") and "finished shards" in last
    assert "Traceback" not in err

    (store,) = caches(project / "cache" / "embeddings")
    assert store.count() == 2 * 8, "the two shards committed before the failure are kept"
    assert store.verify() == [] and not list(store.directory.glob("shards/.tmp-*"))
    monkeypatch.undo()
    run_to_end(project)
    keys, embeddings = contents(project)
    assert keys == reference[0]
    np.testing.assert_array_equal(embeddings, reference[1])


def mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a real disk ({done.stderr.decode().strip() or 'not root'})")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_a_really_full_disk_is_one_clear_line_and_the_rerun_completes(tmp_path, many_images, tiny_clip, reference, fmt):
    project = make_project(tmp_path, many_images, tiny_clip, fmt)
    cache = project / "cache" / "embeddings"
    mount_tmpfs(cache, "48k")  # room for the card and a few shards of the 20 this run writes
    try:
        proc = start_extract(project)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("extract hung on a full disk")
        assert proc.returncode == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: no space left on device") and "rerun" in last, err
        assert "Traceback" not in err and "Segmentation" not in err
        (store,) = caches(cache)
        committed = store.count()
        assert 0 < committed < len(reference[0])
        assert store.verify() == [] and not list(cache.glob("*/shards/.tmp-*")), "no partial shard is visible"

        subprocess.run(["mount", "-o", "remount,size=8m", str(cache)], check=True)
        log = run_to_end(project)
        assert f"{len(reference[0]) - committed} to embed" in log
        keys, embeddings = contents(project)
        assert keys == reference[0]
        np.testing.assert_array_equal(embeddings, reference[1])
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_a_file_rewritten_after_the_manifest_is_never_cached_under_its_old_digest(project, capsys):
    params = str(project / "params.yaml")
    settings = config.load(params)
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    victim = project / "data" / "Train_Fake" / "FaceSwap" / "000_001" / "0000.png"
    other = project / "data" / "Train_Fake" / "FaceSwap" / "000_001" / "0001.png"
    old_digest = images.inspect_file(victim).digest
    st = victim.stat()
    payload = other.read_bytes()[: st.st_size].ljust(st.st_size, b"\0")  # other bytes, same size
    victim.write_bytes(payload)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: only the bytes differ

    assert cli.main(["extract", "--params", params]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 image file changed since the manifest was built" in err and "rerun the manifest stage" in err
    (store,) = caches(outputs.embeddings)
    assert old_digest not in store.keys() | set(store.failures()), "nothing stored under the old key"
    unique = len(set(manifest_table.read(outputs.manifest).column("digest").to_pylist()))
    assert store.count() == unique - 1, "everything else is cached"

    manifest.run(settings, outputs)  # the stat cache notices the rewrite (ctime), so the file is hashed again
    new_digest = images.inspect_file(victim).digest
    assert new_digest in manifest_table.read(outputs.manifest).column("digest").to_pylist()
    summary = extract.run(settings, outputs)
    assert summary.embedded + summary.failed == summary.images


def test_images_this_machine_lacks_are_never_recorded_as_failures_in_the_shared_cache(project, capsys, monkeypatch):
    # A teammate who pulled the cache but not the images asks for a robustness level: extract must
    # say that the images are not here, not record "file not found" under content keys (a fact
    # about this machine, pushed to everyone: the machine with the images would then skip them).
    params = str(project / "params.yaml")
    assert cli.main(["manifest", "--params", params]) == 0
    assert cli.main(["extract", "--params", params]) == 0
    update_params(project, "evaluate", robustness={"jpeg": [50]})
    (project / "data").rename(project / "elsewhere")
    capsys.readouterr()
    real_load, loads = backbones.load, []
    monkeypatch.setattr(backbones, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    assert cli.main(["extract", "--params", params]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not on this machine" in err[0] and "data.root" in err[0], err
    assert loads == [], "the model is not loaded for images that are not here"
    (store,) = caches(project / "cache" / "embeddings")
    assert store.failures() == {}, "nothing is recorded about files that are merely absent here"

    # The images are back, and one test image was deleted after the manifest listed it: the others
    # are embedded, the deleted one is named, and nothing is recorded for it either.
    (project / "elsewhere").rename(project / "data")
    table = manifest_table.read(project / "cache" / "manifest.parquet")
    rows = zip(table.column("path").to_pylist(), table.column("split").to_pylist(), strict=True)
    test_path = next(path for path, split in rows if split == "test")
    (project / "data" / test_path).unlink()
    assert cli.main(["extract", "--params", params]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"1 file the manifest lists is not on this machine (e.g. {test_path}), so it was not embedded" in err
    (store,) = caches(project / "cache" / "embeddings")
    assert store.failures() == {}
    keys = store.keys()
    variants = [k for k in keys if k.endswith("~jpeg=50")]
    assert variants, "the test images that are here were embedded"

    # A cache written before this fix holds such records: they are tried again, not skipped forever.
    update_params(project, "evaluate", robustness={"jpeg": [50, 30]})
    assert cli.main(["manifest", "--params", params]) == 0  # the deleted image leaves the manifest
    legacy = [perturb.key(perturb.split(k)[0], "jpeg=30") for k in variants]
    store.commit(ShardData(legacy, [test_path] * len(legacy), ["file not found"] * len(legacy), {
        layer: np.zeros((len(legacy), dim), np.float32) for layer, dim in store.header.dims.items()
    }))  # fmt: skip
    assert cli.main(["extract", "--params", params]) == 0
    (store,) = caches(project / "cache" / "embeddings")
    assert set(legacy) <= store.keys() and store.failures() == {}


def test_train_refuses_a_cache_with_a_deleted_or_damaged_shard_and_repair_fixes_it(project, capsys, caplog):
    params = str(project / "params.yaml")
    yaml_params = yaml.safe_load((project / "params.yaml").read_text())
    yaml_params["extract"].update(shard_size=40, batch_size=8)  # 40 rows a shard
    (project / "params.yaml").write_text(yaml.safe_dump(yaml_params))
    for stage in ("manifest", "extract", "train"):
        assert cli.main([stage, "--params", params]) == 0
    (store,) = caches(project / "cache" / "embeddings")
    first, second = store.shard_paths()[:2]
    second.unlink()
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0x01
    first.write_bytes(bytes(data))
    capsys.readouterr()

    assert cli.main(["train", "--params", params]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard ") and err.count("\n") == 1 and "cache repair" in err
    assert cli.main(["cache", "verify", "--params", params]) == 1
    out = capsys.readouterr().out
    assert first.name in out and second.name in out and "missing" in out

    assert cli.main(["cache", "repair", "--params", params]) == 0
    assert cli.main(["train", "--params", params]) == 2, "rows are still missing: train says so, never fits on less"
    assert "neither embedded nor recorded as failed" in capsys.readouterr().err
    caplog.set_level("INFO")
    assert cli.main(["extract", "--params", params]) == 0
    assert "80 to embed" in caplog.text, "extract re-embeds exactly the rows of the two shards dropped"
    assert cli.main(["train", "--params", params]) == 0
    assert cli.main(["cache", "verify", "--params", params]) == 0


def test_evaluate_refuses_a_probe_trained_on_another_cache(project, capsys):
    """Stages run by hand: extract fills another cache (here: float16 storage) after train, so the
    probe would score vectors it was not trained on. Evaluate stops naming both caches and the
    fix, and the metrics of the last evaluation stay as they were."""
    params = str(project / "params.yaml")
    update_params(project, "evaluate", protocols=["heldout"], bootstrap=0)
    for stage in ("manifest", "extract", "train", "evaluate"):
        assert cli.main([stage, "--params", params]) == 0
    outputs = Outputs(project)
    trained_on = probes.load(outputs.probe)[1]["fingerprint"]
    before = outputs.metrics.read_bytes()

    update_params(project, "model", dtype="float16")
    assert cli.main(["extract", "--params", params]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--params", params]) == 2
    err = capsys.readouterr().err
    (now,) = {s.header.fingerprint for s in caches(outputs.embeddings)} - {trained_on}
    assert err.startswith("error: the probe in ") and err.count("\n") == 1
    assert trained_on in err and now in err and "python -m pipeline train" in err
    assert outputs.metrics.read_bytes() == before

    for stage in ("train", "evaluate"):
        assert cli.main([stage, "--params", params]) == 0


def test_evaluate_refuses_a_probe_trained_before_the_splits_changed(project, capsys):
    """Stages run by hand: a new split seed moves videos the probe was trained on into the test
    split, and nothing new is embedded. Evaluate stops rather than score the probe on its own
    training frames."""
    params = str(project / "params.yaml")
    update_params(project, "evaluate", protocols=["heldout"], bootstrap=0)
    for stage in ("manifest", "extract", "train"):
        assert cli.main([stage, "--params", params]) == 0
    update_params(project, "data", split={"val": 0.14, "test": 0.14, "seed": 1})
    for stage in ("manifest", "extract"):
        assert cli.main([stage, "--params", params]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--params", params]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the probe in ") and err.count("\n") == 1
    assert "train/val rows" in err and "python -m pipeline train" in err
    assert not Outputs(project).metrics.exists()

    for stage in ("train", "evaluate"):
        assert cli.main([stage, "--params", params]) == 0


def test_a_fifo_that_replaced_an_image_is_recorded_not_waited_on(project):
    settings = config.load(project / "params.yaml")
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    victim = project / "data" / "Train_Real" / "Real_youtube" / "000" / "0000.png"
    victim.unlink()
    os.mkfifo(victim)
    in_thread(lambda: extract.run(settings, outputs), 120, "extract, with a FIFO among the images,")
    (store,) = caches(outputs.embeddings)
    assert "not a regular file" in [reason for _, reason in store.failures().values()]


def test_a_second_machine_with_other_cpu_features_extends_the_same_cache(project, monkeypatch, caplog):
    """Teammate A made the cache in bf16; B's CPU differs and B's params say `auto`: B adds one
    image to A's cache (same fingerprint) instead of re-embedding everything, and predict agrees."""
    from pipeline import backbones

    params = project / "params.yaml"
    settings = config.load(params)
    outputs = Outputs(project)
    manifest.run(settings, outputs)
    for native in (True, False):  # auto on a fresh project never depends on the CPU's features
        monkeypatch.setattr(backbones, "cpu_supports_bf16", lambda native=native: native)
        auto = config.load(params)
        assert extract.run(dataclass_replace_precision(auto, "auto"), outputs).precision == "fp32"
        shutil.rmtree(outputs.embeddings)
        outputs.extract_summary.unlink()

    a = extract.run(dataclass_replace_precision(settings, "bf16"), outputs)  # A, on a machine with native bf16
    new = project / "data" / "Train_Real" / "Real_youtube" / "000" / "0100.png"
    shutil.copy(project / "data" / "Train_Real" / "Real_youtube" / "001" / "0000.png", new)
    with new.open("ab") as fh:
        fh.write(b"\0")  # other bytes, still a valid PNG: a new image
    manifest.run(settings, outputs)
    monkeypatch.setattr(backbones, "cpu_supports_bf16", lambda: False)  # B: an AVX2-only CPU
    caplog.set_level("INFO")
    b = extract.run(dataclass_replace_precision(settings, "auto"), outputs)
    assert "1 to embed" in caplog.text
    assert b.fingerprint == a.fingerprint and b.precision == "bf16"
    assert len(list(outputs.embeddings.iterdir())) == 1, "one cache, not a second one per CPU"

    train.run(settings, outputs)
    update_params(project, "extract", precision="auto")
    caplog.clear()
    out = project / "predictions.csv"
    assert cli.main(["predict", str(new), "--params", str(params), "--out", str(out)]) == 0, "B's predict agrees"
    assert "not in the cache" not in caplog.text, "the image is in A's cache: nothing to embed"


def dataclass_replace_precision(settings, precision):
    import dataclasses

    return dataclasses.replace(settings, extract=dataclasses.replace(settings.extract, precision=precision))


def test_a_stop_during_a_progress_bar_redraw_leaves_every_other_bar_working():
    """tqdm redraws a bar holding its lock with no try/finally (`refresh`): a SIGTERM raised as
    `Terminated` there (or Ctrl-C's KeyboardInterrupt) left the lock held by the main thread for
    the rest of the process, and the next bar of any other thread waited forever (a dask client's
    progress on its event loop; in the tests, a later in-thread extract: CI's run hung three of
    them). The stop is now taken once the redraw is done. Here the SIGTERM comes from inside the
    redraw."""

    class StoppedWhileRedrawing(tqdm):
        def display(self, *args, **kwargs):
            if self.n == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # taken at the next bytecode: inside `refresh`'s lock
            return super().display(*args, **kwargs)

    def count() -> None:
        with StoppedWhileRedrawing(total=1000, file=io.StringIO(), mininterval=0, miniters=1) as bar:
            for _ in range(1000):
                bar.update()
                time.sleep(0.001)

    run_terminated(count)
    try:
        in_thread(lambda: tqdm(range(3), file=io.StringIO()).close(), 10, "a progress bar in another thread")
    finally:  # where the lock was left held, the later tests' bars are spared the wait
        shared = TqdmDefaultWriteLock
        while shared.th_lock._is_owned():
            shared.th_lock.release()
        while shared.mp_lock._semlock._is_mine():
            shared.mp_lock.release()
