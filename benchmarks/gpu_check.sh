#!/usr/bin/env bash
# One command for a GPU machine: the GPU-marked tests, then the GPU benchmarks; results to $OUT.
# The device image has torch, lightning, triton and pytest but no jsonargparse, mlflow, ray or
# deepspeed; nothing here needs the first three (the TBPTT benchmark runs with --no_mlflow;
# tests/test_gpu_check.py checks on CPU that all of this loads without them), and DeepSpeed comes as
# wheels in .whl/ (`bash benchmarks/gpu_wheels.sh` here, then carry .whl), else its GPU test is
# skipped. About 8 minutes on an H200 (each part has its own timeout and writes its file as it
# goes, so a call stopped at its limit still returns what ran). A device call returns at
# most 8 files: this writes 6 (7 with GPU_LEARN=1, 8 with GPU_FULL=1); each case is a JSON line.
#   bash benchmarks/gpu_check.sh            (make gpu-check) GPU tests + scan + memory + TBPTT engine
#   bash benchmarks/gpu_check.sh bench-only (make gpu-bench) the same benchmarks, then every recurrence
#                                           for T from 256 to 16384 and peak memory against T
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch, lightning, triton; print('torch', torch.__version__, 'lightning', lightning.__version__, 'triton', triton.__version__)"; $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1; } | tee "$OUT/env.txt"
if [ "${1:-}" != "bench-only" ]; then
  timeout 300 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_layers.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests_full.txt" \
    | grep -E '^\{"equal|passed|failed|skipped|Error|assert|^(FAILED|ERROR)' | tail -40 | tee "$OUT/gpu_tests.txt"
fi
timeout 220 $PY benchmarks/bench_recurrences.py --device cuda --scan 2>&1 | tee "$OUT/bench_scan.txt"
timeout 240 $PY benchmarks/bench_recurrences.py --device cuda --memory_only 2>&1 | tee "$OUT/bench_memory.txt"
timeout 90 $PY benchmarks/bench_tbptt.py --device cuda --hidden 1024 --embed 256 --batch 64 --k 256 --steps 60 --warmup 5 --repeats 2 --log_every 50 --no_mlflow 2>&1 | grep -v "^\s*$" | tail -4 | tee "$OUT/bench_tbptt_fp32.txt"
if [ "${GPU_LEARN:-0}" = "1" ]; then  # selective copy (~7 min more; better a device call of its own): benchmarks/learn_gpu.sh
  bash benchmarks/learn_gpu.sh
fi
if [ "${1:-}" = "bench-only" ]; then  # make gpu-bench: every recurrence for T from 256 to 16384 (~10 min more)
  timeout 1200 $PY benchmarks/bench_recurrences.py --device cuda 2>&1 | tee "$OUT/bench_gpu.txt"
  # rows resetting inside a window: cuDNN cut at the resets, the min* scan taking them (~1 min)
  timeout 300 $PY benchmarks/bench_recurrences.py --device cuda --resets 2>&1 | tee -a "$OUT/bench_gpu.txt"
elif [ "${GPU_FULL:-0}" = "1" ]; then  # within a device call's 10 minutes: T = 256 and 4096 only
  timeout 400 $PY benchmarks/bench_recurrences.py --device cuda --quick 2>&1 | tee "$OUT/bench_gpu.txt"
fi
