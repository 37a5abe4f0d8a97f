#!/usr/bin/env bash
# P14's GPU check as one prepared command (for a machine with one NVIDIA GPU, such as the `device` tool lends):
# the tests that need CUDA, then the UNet step ours vs diffusers' at SD1.5 512x512 in fp16 (eager and --compile;
# the targets: >= 1.1x diffusers' eager it/s, >= 1.5x compiled), the same in bf16, and SDXL at 1024x1024 (ours,
# fp16). Each stage has its own time limit, so a slow one costs its rows, not the others. The log goes to
# $OUT/gpu.log when OUT is set (the device tool brings $OUT back), else to /tmp/latentloom-gpu/gpu.log.
#
# A device image without diffusers takes it as carried wheels (pure Python, so built anywhere):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp
# then run `bash bench/gpu.sh` with `.whl` carried.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/latentloom-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
CACHE=/tmp/latentloom-bench

stage() {  # stage SECONDS COMMAND...: run it under a limit, say so when the limit cut it short
    local limit=$1
    shift
    echo "== $* (limit ${limit} s)"
    timeout "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "== stopped at its ${limit} s limit"
    return 0
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    stage 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/diffusion/test_devices.py tests/diffusion/test_memory.py \
        tests/diffusion/test_samplers_more.py tests/server/test_cli_flags.py
    stage 200 "$PYTHON" bench/compile.py --device cuda --dtype float16 --steps 20 --cache-dir "$CACHE"
    stage 120 "$PYTHON" bench/compile.py --device cuda --dtype bfloat16 --steps 20 --no-compile --cache-dir "$CACHE"
    stage 150 "$PYTHON" bench/compile.py --device cuda --family sdxl --size 1024 --dtype float16 --steps 10 \
        --cache-dir "$CACHE"
} 2>&1 | tee "$OUT/gpu.log"
