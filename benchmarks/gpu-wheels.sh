#!/usr/bin/env bash
# Puts into .whl/ (git-ignored) the wheels that benchmarks/gpu.sh installs on a GPU machine that
# cannot reach PyPI: the packages its image lacks (dask, distributed and their own needs) and
# transformers, each at the version of this checkout's venv, so that the GPU figures come from
# the versions the CPU figures and the tests use. Run it on a machine with PyPI, before the GPU run:
#
#     bash benchmarks/gpu-wheels.sh          # then carry .whl and run `bash benchmarks/gpu.sh`
#     PY_VERSION=3.11 bash benchmarks/gpu-wheels.sh   # for a box with another Python
#
# The GPU image these benchmarks ran on (Python 3.12) already has torch, numpy, pillow, pyarrow, h5py,
# scikit-learn, tqdm, huggingface-hub, tokenizers and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU box's Python (3.12 on the image above)
PACKAGES=(transformers dask distributed partd locket tblib zict tornado)

exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
pins=$("$PYTHON" -c 'import sys, importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls .whl
du -sh .whl
