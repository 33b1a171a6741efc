#!/usr/bin/env bash
# The GPU checks and benchmarks of BENCHMARKS.md ("GPU"), one after another, on a CUDA machine
# with this package's dependencies installed (or their wheels in .whl/, installed here first;
# `bash benchmarks/gpu-wheels.sh` puts them there on a machine with PyPI):
#
#     bash benchmarks/gpu.sh [images]        # 20,000 JPEGs per benchmark by default
#
# Each step has its own time limit, so one that hangs does not take the others' time, and all of
# them together stay within GPU_BUDGET seconds (default 570: a device call is cut at 600; a step
# that would start with less than 30 s left is skipped and says so). The tables go to stdout and
# to $OUT/gpu-tables.txt, progress bars and logs to $OUT/gpu-progress.log (the current folder
# without OUT), so a run cut short still leaves what it measured.
set -u
cd "$(dirname "$0")/.."
IMAGES=${1:-20000}
BUDGET=${GPU_BUDGET:-570}
LOG=${OUT:-.}/gpu-progress.log
exec > >(tee -a "${OUT:-.}/gpu-tables.txt")
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
echo "$(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "bf16 flags: $(grep -o -E 'amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 -c 'import torch, transformers, dask; print("torch", torch.__version__, "CUDA", torch.version.cuda,
    "transformers", transformers.__version__, "dask", dask.__version__)'

step() {
    local limit=$1 left=$((BUDGET - SECONDS))
    shift
    echo
    if ((left < 30)); then
        echo "== skipped, ${left} s of the ${BUDGET} s budget left: $*"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $* (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>>"$LOG"
    echo "== rc $?, $((SECONDS - start)) s"
}

# The CUDA cases of the tests: uint8 crops normalised on the GPU are the processor's floats bit
# for bit; `submit` makes no synchronising call; a GPU extract run (batches read in parts, pinned,
# several in flight, fp32 without TF32) gives the CPU's fp32 vectors; a compiled model is one
# graph, compiled once (a smaller batch, inference tensors), and gives the eager vectors.
step 150 python3 -m pytest -q -p no:cacheprovider tests/test_embedder.py tests/test_extract.py -k "cuda or gpu"

# Item 2 of issue #13, the one figure no CPU machine of this project could give: two cores of
# this machine's CPU (the H100 host's Xeon has AMX; the flags line above says for this one) stand
# in for a 2-core AMX machine (the readers inherit the affinity; torch is given the 2 threads such
# a machine has). Second, so that the steps after it, whose GPU figures are already recorded,
# cannot crowd it out of the budget.
step 120 taskset -c 0,1 python3 benchmarks/extract_bench.py --device cpu --precision bf16 --images 2000 --workers 2 --torch-threads 2 --throughput-only

common=(--device cuda --precision bf16 --batch-size 256 --workers 12 --images "$IMAGES")
# Then, in order of what matters most: the ViT-L/14 target (b/c >= 0.90), then the same with the
# readers as threads of the main process (the dask workers' reader; 0.59 before the main process
# kept only the threads the readers leave), compiled (the fastest ViT-L/14 measured), ViT-B/16
# (decode-bound: the readers are its limit), and ViT-B/16 with 15 readers (does one more core of
# decoding pay?).
step 180 python3 benchmarks/extract_bench.py --model vit-l14 "${common[@]}" --original 16
# Item 3: a 2-worker LocalCluster on the one GPU against the local extractor, never measured on a
# GPU (until 5de228c (d) timed the local extractor again). Its own step, since a bench prints its
# table only at its end and a real cluster (worker imports, two ViT-L/14 loads) takes longer.
step 150 python3 benchmarks/extract_bench.py --model vit-l14 "${common[@]}" --throughput-only --dask 2
# The same with workers that are not daemonic, so that each decodes in processes started once and
# kept for every partition (in the main process, threads reached 0.59 of ViT-L/14's forward pass
# and processes 0.92): which of the two the README should tell GPU workers to use.
step 150 python3 benchmarks/extract_bench.py --model vit-l14 "${common[@]}" --throughput-only --dask 2 --dask-readers processes
step 90 python3 benchmarks/extract_bench.py --model vit-l14 "${common[@]}" --throughput-only --reader threads
step 150 python3 benchmarks/extract_bench.py --model vit-l14 "${common[@]}" --throughput-only --compile
step 90 python3 benchmarks/extract_bench.py --model vit-b16 "${common[@]}" --throughput-only
step 90 python3 benchmarks/extract_bench.py --model vit-b16 "${common[@]}" --workers 15 --throughput-only  # the last --workers counts
