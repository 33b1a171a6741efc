#!/usr/bin/env bash
# Puts into .whl/ (git-ignored) the wheels that benchmarks/gpu.sh installs on a GPU machine that
# cannot reach PyPI: the packages its image lacks (dask, distributed and their own needs) and
# transformers, each at the version of this checkout's venv, so that the GPU figures come from
# the versions the CPU figures and the tests use. Run it here, before the device call:
#
#     bash benchmarks/gpu-wheels.sh          # then carry .whl and run `bash benchmarks/gpu.sh`
#
# The GPU image (Python 3.12) has torch, numpy, pillow, pyarrow, h5py, scikit-learn, tqdm,
# huggingface-hub, tokenizers and safetensors (/work/.library/device/KINDS.md lists it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES=(transformers dask distributed partd locket tblib zict tornado)

exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
pins=$("$PYTHON" -c 'import sys, importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls .whl
du -sh .whl
