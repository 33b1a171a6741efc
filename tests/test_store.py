"""The embedding store: content-addressed, atomic shards that describe themselves.

Every test runs against both shard formats (Parquet and HDF5).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import cache_report
from pipeline.outputs import Outputs
from pipeline.store import FORMATS, EmbeddingStore, StoreError, directory_name, fingerprint, hdf5, text
from pipeline.store.shard import ShardData

DESCRIPTION = {"model": {"weights_sha256": "abc"}, "layers": ["projection", "pooled"], "dtype": "float32"}
DIMS = {"projection": 4, "pooled": 6}


def rows(digests, seed=0, errors=None):
    rng = np.random.default_rng(seed)
    n = len(digests)
    return ShardData(
        digests=list(digests),
        paths=[f"img/{d}.png" for d in digests],
        errors=errors or [None] * n,
        arrays={k: rng.normal(size=(n, d)).astype(np.float32) for k, d in DIMS.items()},
    )


@pytest.fixture(params=sorted(FORMATS))
def fmt(request) -> str:
    return request.param


@pytest.fixture
def store(tmp_path):
    return EmbeddingStore.create(tmp_path, "org/model", DESCRIPTION, DIMS)


def test_fingerprint_is_stable_and_order_independent():
    reordered = {"dtype": "float32", "layers": ["projection", "pooled"], "model": {"weights_sha256": "abc"}}
    assert fingerprint(DESCRIPTION) == fingerprint(reordered)
    assert fingerprint(DESCRIPTION) != fingerprint({**DESCRIPTION, "dtype": "float16"})
    assert directory_name("openai/clip-vit-large-patch14", "f00") == "clip-vit-large-patch14-f00"


def test_commit_then_read_round_trips_every_layer(store, fmt):
    data = rows(["a", "b", "c"])
    store.commit(data, fmt)
    assert store.keys() == {"a", "b", "c"}
    assert store.count() == 3 and store.dimension("pooled") == 6
    for layer in DIMS:
        got, found = store.read(["c", "zz", "a"], layer)
        assert found.tolist() == [True, False, True]
        np.testing.assert_array_equal(got[0], data.arrays[layer][2])
        np.testing.assert_array_equal(got[2], data.arrays[layer][0])
        assert not got[1].any()


def test_both_formats_hold_the_same_numbers(tmp_path):
    data = rows([f"d{i}" for i in range(50)], seed=7)
    results = []
    for fmt in sorted(FORMATS):
        s = EmbeddingStore.create(tmp_path / fmt, "org/model", DESCRIPTION, DIMS)
        s.commit(data, fmt)
        results.append(s.read(data.digests, "pooled")[0])
    np.testing.assert_array_equal(*results)


def test_float16_storage_halves_the_bytes_and_keeps_the_numbers(tmp_path, fmt):
    data = rows([f"d{i}" for i in range(200)])
    sizes = {}
    for dtype in ("float32", "float16"):
        s = EmbeddingStore.create(tmp_path / dtype, "org/model", {**DESCRIPTION, "dtype": dtype}, DIMS)
        s.commit(data, fmt)
        got, _ = s.read(data.digests, "projection")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, data.arrays["projection"], rtol=1e-3, atol=1e-3)
        sizes[dtype] = s.size_on_disk()
    assert sizes["float16"] < sizes["float32"]


def test_reopening_sees_committed_shards_and_only_them(store, fmt, tmp_path):
    store.commit(rows(["a", "b"]), fmt)
    store.commit(rows(["c"], seed=1), fmt)
    (store.directory / "shards" / f".tmp-shard.{fmt}.xyz").write_bytes(b"garbage from a killed writer")
    again = EmbeddingStore.create(tmp_path, "org/model", DESCRIPTION, DIMS)
    assert again.directory == store.directory
    assert again.keys() == {"a", "b", "c"}
    assert len(again.shard_paths()) == 2
    assert again.verify() == []
    assert again.remove_leftovers() == 1


def test_a_read_decodes_only_the_shards_holding_what_it_asks_for(store, fmt, tmp_path, monkeypatch):
    """Robustness variants and other datasets sit in shards of their own: a read of some rows
    decodes the shards that hold them (in order: a later shard's row still wins), also one
    committed after the first read, and any shard another writer added since."""
    first, second = rows(["a", "b"]), rows(["c", "a"], seed=1)
    store.commit(first, fmt)
    store.commit(second, fmt)
    decoded = []
    real = EmbeddingStore.read_shard
    monkeypatch.setattr(
        EmbeddingStore, "read_shard", lambda self, shard, layer: decoded.append(shard) or real(self, shard, layer)
    )
    X, found = store.read(["b"], "projection")
    assert decoded == store.shard_paths()[:1] and found.all()
    np.testing.assert_array_equal(X[0], first.arrays["projection"][1])
    decoded.clear()
    X, _ = store.read(["a"], "projection")
    assert decoded == store.shard_paths() and np.array_equal(X[0], second.arrays["projection"][1])
    third = rows(["d"], seed=2)
    store.commit(third, fmt)
    EmbeddingStore.create(tmp_path, "org/model", DESCRIPTION, DIMS).commit(rows(["e"], seed=3), fmt)  # another writer
    decoded.clear()
    X, found = store.read(["d", "e"], "projection")
    assert found.all() and len(decoded) == 2 and np.array_equal(X[0], third.arrays["projection"][0])


def test_failures_are_recorded_and_a_later_success_wins(store, fmt):
    store.commit(rows(["a", "bad"], errors=[None, "not an image (unrecognised format)"]), fmt)
    assert store.keys() == {"a"}
    assert store.failures() == {"bad": ("img/bad.png", "not an image (unrecognised format)")}
    store.commit(rows(["bad"], seed=3), fmt)
    assert store.keys() == {"a", "bad"} and store.failures() == {}
    _, found = store.read(["bad"], "projection")
    assert found.all()


def test_verify_names_a_shard_with_one_flipped_byte(store, fmt):
    store.commit(rows(["a", "b"]), fmt)
    victim = store.commit(rows(["c", "d"], seed=2), fmt)
    assert store.verify() == []
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and victim.name in problems[0]


def test_keys_longer_than_a_digest_keep_their_own_rows(store, fmt):
    """A video frame's key (`<digest>@<index>`) and a robustness variant's (`<digest>~jpeg=50`)
    are longer than an image's digest: each keeps its own row, none stands under the digest."""
    image = "a" * 64
    variants = [f"{image}@0", f"{image}@1", f"{image}~jpeg=50"]
    clean, perturbed = rows([image], seed=1), rows(variants, seed=2)
    store.commit(clean, fmt)
    store.commit(perturbed, fmt)
    again = EmbeddingStore.open(store.directory)
    assert again.keys() == {image, *variants} and again.verify() == []
    got, found = again.read([image, *variants], "pooled")
    assert found.all()
    np.testing.assert_array_equal(got[0], clean.arrays["pooled"][0])
    np.testing.assert_array_equal(got[1:], perturbed.arrays["pooled"])


def legacy_hdf5_shard(store, data) -> Path:
    """A shard as the HDF5 writer before 2026-11-27 wrote it: keys in fixed 64-byte fields, so a
    longer key was cut to its first 64 characters (its image's or its video's digest)."""
    buffer = io.BytesIO(hdf5.to_bytes(store.header, data))
    with h5py.File(buffer, "r+") as f:
        del f["digest"]
        f.create_dataset("digest", data=np.array(data.digests, dtype="S64"))
    payload = buffer.getvalue()
    target = store.directory / "shards" / f"{time.time_ns():020d}-{hashlib.sha256(payload).hexdigest()[:16]}.h5"
    target.write_bytes(payload)
    return target


def test_hdf5_shards_whose_keys_were_cut_are_refused_and_repair_drops_them(store):
    """Such a shard put a robustness variant's vector under its clean image's digest (which the
    clean shard also holds) and every frame of a video under one key: reads refuse the cache,
    naming the shard and the fix; verify lists every shard involved; repair drops them, so the
    next extract embeds their rows again under their whole keys. Old shards without a cut key stay."""
    image, video = "a" * 64, "c" * 64
    clean = legacy_hdf5_shard(store, rows([image, "b" * 64]))
    variant = legacy_hdf5_shard(store, rows([f"{image}~jpeg=50"], seed=1))
    frames = legacy_hdf5_shard(store, rows([f"{video}@0", f"{video}@1"], seed=2))
    sound = legacy_hdf5_shard(store, rows(["d" * 64], seed=3))
    store.commit(rows([f"{'d' * 64}~blur=2"], seed=4), "hdf5")
    with pytest.raises(StoreError, match=r"shard .*\.h5 is damaged \(.*64 characters.*cache repair"):
        EmbeddingStore.open(store.directory).read([image], "pooled")
    problems = store.verify()
    assert sorted(p.split(":")[0] for p in problems) == sorted(str(s) for s in (clean, variant, frames))
    with store.writer_lock():
        store.repair()
    repaired = EmbeddingStore.open(store.directory)
    assert sound.exists() and repaired.verify() == []
    assert repaired.keys() == {"d" * 64, f"{'d' * 64}~blur=2"}


def test_the_same_numbers_under_another_model_name_share_the_cache(store, fmt):
    store.commit(rows(["a"]), fmt)
    copy = EmbeddingStore.create(store.directory.parent, "/models/local-copy-of-it", DESCRIPTION, DIMS)
    assert copy.directory == store.directory and copy.keys() == {"a"}


def test_other_settings_get_another_directory(store):
    other = EmbeddingStore.create(store.directory.parent, "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    assert other.directory != store.directory


def test_reading_a_layer_that_is_not_cached_says_how_to_fix_it(store):
    with pytest.raises(StoreError, match=r"add it to model\.layers and re-run extract"):
        store.read(["a"], "block_3")


def test_opening_with_the_wrong_fingerprint_is_an_error(store):
    with pytest.raises(StoreError, match="different model"):
        EmbeddingStore.open(store.directory, expect_fingerprint="0000000000000000")


def test_a_foreign_shard_is_refused_not_read(store, fmt, tmp_path):
    other = EmbeddingStore.create(tmp_path / "elsewhere", "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    shard = other.commit(rows(["a"]), fmt)
    shard.rename(store.directory / "shards" / shard.name)
    with pytest.raises(StoreError, match="was written for fingerprint"):
        store.keys()


def test_repair_sends_a_shard_of_another_cache_home_and_never_deletes_it(store, fmt, tmp_path):
    """A shard of another cache (copied into this one by hand) stops every reader; repair moves it
    into the cache it belongs to where that is beside this one, else into this cache's `foreign/`:
    embeddings are never deleted for being in the wrong place."""
    home = EmbeddingStore.create(store.directory.parent, "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    elsewhere = EmbeddingStore.create(tmp_path / "elsewhere", "org/model", {**DESCRIPTION, "layers": ["pooled"]}, DIMS)
    store.commit(rows(["a"]), fmt)
    strays = [home.commit(rows(["b"], seed=2), fmt), elsewhere.commit(rows(["c"], seed=3), fmt)]
    for stray in strays:
        stray.rename(store.directory / "shards" / stray.name)
    with store.writer_lock():
        done = store.repair()
    assert len(done) == 2 and all("another cache" in d for d in done), done
    assert EmbeddingStore.open(store.directory).keys() == {"a"} and store.verify() == []
    assert EmbeddingStore.open(home.directory).keys() == {"b"}, "back home, readable there"
    assert (store.directory / "foreign" / strays[1].name).is_file(), "kept aside: its cache is not here"


def test_a_second_writer_gets_a_clear_error(store):
    with store.writer_lock():
        again = EmbeddingStore.open(store.directory)
        with pytest.raises(StoreError, match=r"another extract \(pid \d+"), again.writer_lock():
            pass
    with again.writer_lock():  # released: the next run proceeds
        pass


def test_parquet_shards_are_plain_parquet(store):
    shard = store.commit(rows(["a", "b"]), "parquet")
    df = pq.read_table(shard).to_pandas()
    assert list(df.columns) == ["digest", "path", "error", "projection", "pooled"]
    assert len(df.projection[0]) == 4
    # Embedding columns are stored as plain values: dictionary-encoded float16 (at most 65,536
    # values, so its dictionary never overflows) read 4x slower and saved nothing.
    chunks = pq.ParquetFile(shard).metadata.row_group(0)
    encodings = {chunks.column(i).path_in_schema.split(".")[0]: chunks.column(i).encodings for i in range(5)}
    assert not any("DICTIONARY" in e for layer in DIMS for e in encodings[layer]), encodings


def test_the_lock_dies_with_its_process_even_if_a_forked_child_lives_on(store):
    """DataLoader workers are forked while the lock is held; they must not keep it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from pathlib import Path
        from pipeline.store import EmbeddingStore
        store = EmbeddingStore.open(Path({str(store.directory)!r}))
        with store.writer_lock():
            child = os.fork()
            if child == 0:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)  # let go of the test's pipes, or it would wait for this child
                os.dup2(devnull, 2)
                time.sleep(30)  # a worker that outlives its parent
                os._exit(0)
            print(child, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    child = int(proc.stdout.split()[0])
    try:
        with store.writer_lock():  # free at once, although the forked child is still alive
            pass
    finally:
        os.kill(child, 9)


# --------------------------------------------------------------------------- integrity on every read


def damage(shard, how: str) -> None:
    data = bytearray(shard.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:  # truncate
        shard.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_every_reader_refuses_a_damaged_shard_naming_it(store, fmt, how):
    store.commit(rows(["a", "b"]), fmt)
    victim = store.commit(rows(["c", "d"], seed=2), fmt)
    damage(victim, how)
    fresh = EmbeddingStore.open(store.directory)  # a new reader, as train or evaluate would be
    for read in (fresh.keys, lambda: fresh.read(["a", "c"], "projection"), lambda: fresh.read_shard(victim, "pooled")):
        with pytest.raises(StoreError, match=r"cache repair") as exc:
            read()
        assert str(victim) in str(exc.value) and "damaged" in str(exc.value)


def test_a_shard_the_index_lists_but_the_disk_lacks_is_an_error_and_repair_drops_it(store, fmt):
    store.commit(rows(["a", "b"]), fmt)
    lost = store.commit(rows(["c", "d"], seed=2), fmt)
    store.write_index()
    lost.unlink()
    fresh = EmbeddingStore.open(store.directory)
    with pytest.raises(StoreError, match=rf"{lost.name}.*not on disk"):
        fresh.keys()
    assert any(lost.name in p and "missing" in p for p in fresh.verify())

    with fresh.writer_lock():
        done = fresh.repair()
    assert any(lost.name in d for d in done)
    repaired = EmbeddingStore.open(store.directory)
    assert repaired.verify() == [] and repaired.keys() == {"a", "b"}, "the next extract re-embeds c and d only"


def test_a_damaged_index_is_one_clear_error_and_repair_rebuilds_it_from_the_shards(store, fmt):
    """A damaged `index.json` (a crash of an older writer, a bad merge) stops every reader with one
    sentence naming repair; repair lists the shards on disk again and drops a damaged prompt table
    too (extract embeds the prompts again), and every embedded row is still there."""
    store.commit(rows(["a", "b"]), fmt)
    store.commit(rows(["c"], seed=2), fmt)
    store.write_index()
    text.add(
        store.directory,
        {"a real face": np.ones(4, np.float32)},
        {"logit_scale": 100.0, "logit_bias": 0.0, "scoring": "softmax"},
    )
    damage(store.directory / "index.json", "truncate")
    damage(store.directory / text.FILENAME, "truncate")
    fresh = EmbeddingStore.open(store.directory)
    with pytest.raises(StoreError, match=r"index\.json is damaged; run `python -m pipeline cache repair`"):
        fresh.keys()
    assert any("index.json is damaged" in p for p in fresh.verify())

    with fresh.writer_lock():
        done = fresh.repair()
    assert "rebuilt the damaged index.json" in done and any(text.FILENAME in d for d in done)
    repaired = EmbeddingStore.open(store.directory)
    assert repaired.verify() == [] and repaired.keys() == {"a", "b", "c"}
    assert not (store.directory / text.FILENAME).exists()


def test_repair_removes_a_damaged_shard_and_keeps_the_sound_ones(store, fmt):
    store.commit(rows(["a", "b"]), fmt)
    victim = store.commit(rows(["c"], seed=2), fmt)
    store.write_index()
    damage(victim, "flip")
    with store.writer_lock():
        done = store.repair()
    assert len(done) == 1 and victim.name in done[0] and not victim.exists()
    assert EmbeddingStore.open(store.directory).keys() == {"a", "b"}


def test_a_shard_holding_nan_is_damaged_and_repair_drops_it(store, fmt):
    """Vectors with NaN or inf, cached before the extractor checked for them (an fp16 overflow),
    are refused by every read, listed by verify and dropped by repair, so they are embedded again."""
    store.commit(rows(["a", "b"]), fmt)
    poisoned = rows(["c", "d"], seed=2)
    poisoned.arrays["pooled"][1, 3] = np.nan
    victim = store.commit(poisoned, fmt)
    store.write_index()
    damaged = rf"{victim.name} is damaged \(its layer 'pooled' holds NaN or inf.*cache repair"
    with pytest.raises(StoreError, match=damaged):
        store.read(["a", "c"], "pooled")
    assert [p for p in store.verify() if victim.name in p and "NaN or inf" in p]
    with store.writer_lock():
        store.repair()
    repaired = EmbeddingStore.open(store.directory)
    assert repaired.verify() == [] and repaired.keys() == {"a", "b"}, "the next extract re-embeds c and d only"


def test_verify_never_crashes_on_a_damaged_card_or_prompt_table(fmt, tmp_path, capsys):
    outputs = Outputs(tmp_path)
    good = EmbeddingStore.create(outputs.embeddings, "org/model", DESCRIPTION, DIMS)
    good.commit(rows(["a"]), fmt)
    text.add(
        good.directory,
        {"a real face": np.ones(4, np.float32)},
        {"logit_scale": 100.0, "logit_bias": 0.0, "scoring": "softmax"},
    )
    bad = EmbeddingStore.create(outputs.embeddings, "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    (bad.directory / "card.json").write_text('{"fingerprint": "trunc')
    damage(good.directory / text.FILENAME, "truncate")

    assert cache_report.run(outputs, "verify") == 1
    out = capsys.readouterr().out
    assert f"{bad.directory / 'card.json'} is damaged" in out
    assert f"{good.directory / text.FILENAME}: unreadable" in out
    with pytest.raises(StoreError, match=r"card\.json is damaged"):
        EmbeddingStore.open(bad.directory)


def test_cache_info_describes_every_cache_and_names_a_damaged_shard(tmp_path, capsys):
    """`cache info` is where one looks when something is wrong: a damaged shard is one line under
    its cache, naming it and the fix, and the other caches are still described."""
    outputs = Outputs(tmp_path)
    good = EmbeddingStore.create(outputs.embeddings, "org/model", DESCRIPTION, DIMS)
    good.commit(rows(["a"]))
    bad = EmbeddingStore.create(outputs.embeddings, "org/model", {**DESCRIPTION, "dtype": "float16"}, DIMS)
    victim = bad.commit(rows(["b", "c"]))
    damage(victim, "flip")
    assert cache_report.run(outputs, "info") == 1
    out = capsys.readouterr().out
    assert f"{good.directory}\n  model      org/model\n  images     1 embedded, 0 failed" in out
    assert f"{bad.directory}\n  damaged    shard {victim} is damaged" in out and "cache repair" in out


def test_writing_a_shard_never_leaves_a_partial_file(store, fmt, tmp_path):
    """A write that fails (here: the shard folder became read-only) leaves nothing behind."""
    store.commit(rows(["a"]), fmt)
    shards = store.directory / "shards"
    before = sorted(shards.iterdir())
    real_write = Path.write_bytes

    def full_disk(self, data):
        real_write(self, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_bytes", full_disk)
        with pytest.raises(OSError) as exc:
            store.commit(rows(["b"], seed=1), fmt)
    assert exc.value.errno == errno.ENOSPC and str(shards) in exc.value.filename
    assert sorted(shards.iterdir()) == before, "no temp file or torn shard is left"


def test_the_extract_summary_round_trips_and_a_damaged_one_is_one_clear_error(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.store.summary import ExtractSummary

    path = tmp_path / "extract.json"
    summary = ExtractSummary("m", "0123", "m-0123", {"projection": 8}, "fp32", 10, 9, 1)
    summary.write(path)
    first = path.read_bytes()
    assert ExtractSummary.read(path) == summary
    summary.write(path)
    assert path.read_bytes() == first, "the same summary, the same bytes (DVC sees no change)"
    path.write_text('{"model": "m"}')
    with pytest.raises(ConfigError, match="not an extract summary"):
        ExtractSummary.read(path)
    with pytest.raises(ConfigError, match="run the extract stage first"):
        ExtractSummary.read(tmp_path / "missing.json")
