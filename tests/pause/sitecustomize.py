"""Test helper (see tests/conftest.py): with PAUSE_AFTER_IMAGES=N set, the image reader of this
process (`images.apply`, called once per image) stops for good after N images and prints
"paused"; with FAIL_ONCE_AFTER_IMAGES=N and FAIL_ONCE_MARKER=<path>, the first process to read N
images raises there once (it creates the marker; no process fails after that), as a transient
error in a dask task would; with OUT_OF_MEMORY_ON=<end of a path> and OUT_OF_MEMORY_LOG=<path>,
decoding the file whose path ends so raises CUDA's out-of-memory error every time (and appends
the process id and the path to the log), as a batch too large for a GPU would; with
NO_SPACE_LEFT_LOG=<path>, writing a shard raises ENOSPC every time (and appends a line to the
log), as a full disk would; with OTHER_LIBRARY_VERSIONS=1, the versions of the libraries in a
model's fingerprint end in "-other", as on a machine with other versions installed; with
HIDDEN_FILE=<end of a path>, the file whose path ends so cannot be found, as on a machine without
the folder that holds it; with SLOW_READS_LOG=<path>, reading each image takes 0.2 s (and appends
the process id to the log), as a long partition would; without them, this file does nothing."""

import os

if os.environ.get("PAUSE_AFTER_IMAGES"):
    import sys
    import time

    from pipeline import images

    _limit, _calls, _load = int(os.environ["PAUSE_AFTER_IMAGES"]), [0], images.apply

    def _pausing_load(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] > _limit:
            # One write, whole: two processes that pause together (two dask workers) under
            # PYTHONUNBUFFERED, where print writes "paused" and "\n" apart, wrote "pausedpaused\n\n",
            # and the test waiting for a line "paused" waited forever.
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), b"paused\n")
            while True:
                time.sleep(3600)
        return _load(*args, **kwargs)

    images.apply = _pausing_load

if os.environ.get("FAIL_ONCE_AFTER_IMAGES"):
    from pipeline import images

    _fail_at, _read, _apply = int(os.environ["FAIL_ONCE_AFTER_IMAGES"]), [0], images.apply

    def _failing_once(*args, **kwargs):
        _read[0] += 1
        if _read[0] == _fail_at:
            try:
                open(os.environ["FAIL_ONCE_MARKER"], "x").close()
            except FileExistsError:
                pass
            else:
                raise RuntimeError("an injected transient failure")
        return _apply(*args, **kwargs)

    images.apply = _failing_once

if os.environ.get("OUT_OF_MEMORY_ON"):
    import torch

    from pipeline import images

    _end, _decode = os.environ["OUT_OF_MEMORY_ON"], images.decode

    def _out_of_memory_on(path, *args, **kwargs):
        if str(path).endswith(_end):
            with open(os.environ["OUT_OF_MEMORY_LOG"], "a") as log:
                log.write(f"{os.getpid()} {path}\n")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _decode(path, *args, **kwargs)

    images.decode = _out_of_memory_on

if os.environ.get("NO_SPACE_LEFT_LOG"):
    import errno

    from pipeline import atomic

    _write_bytes = atomic.write_bytes

    def _no_space_for_shards(target, data):
        if target.parent.name == "shards":
            with open(os.environ["NO_SPACE_LEFT_LOG"], "a") as log:
                log.write(f"{target}\n")
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return _write_bytes(target, data)

    atomic.write_bytes = _no_space_for_shards

if os.environ.get("OTHER_LIBRARY_VERSIONS"):
    from pipeline.backbones import base

    _versions = base.library_versions
    base.library_versions = lambda *names: {k: f"{v}-other" for k, v in _versions(*names).items()}

if os.environ.get("HIDDEN_FILE"):
    from pipeline import images

    _read_file = images.read_regular_file

    def _hidden(path, *args, **kwargs):
        if str(path).endswith(os.environ["HIDDEN_FILE"]):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return _read_file(path, *args, **kwargs)

    images.read_regular_file = _hidden

if os.environ.get("SLOW_READS_LOG"):
    import time

    from pipeline import images

    _apply_now = images.apply

    def _slow(*args, **kwargs):
        with open(os.environ["SLOW_READS_LOG"], "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.2)
        return _apply_now(*args, **kwargs)

    images.apply = _slow
