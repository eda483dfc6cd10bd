#!/usr/bin/env bash
# One command for a GPU machine: the GPU-marked tests, then the GPU benchmarks; results to $OUT.
# The device image has torch, lightning and pytest but no jsonargparse or mlflow: carry them as
# wheels (see README, "GPU check") or run with what is there: the benchmarks then log nothing.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } | tee "$OUT/env.txt"
if [ "${1:-}" != "bench-only" ]; then
  $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_layers.py 2>&1 | tee "$OUT/gpu_tests.txt"
fi
timeout 120 $PY benchmarks/bench_tbptt.py --device cuda --hidden 1024 --embed 256 --batch 64 --k 256 --steps 60 --warmup 5 --repeats 2 --log_every 50 --no_mlflow 2>&1 | grep -v "^\s*$" | tail -4 | tee "$OUT/bench_tbptt_fp32.txt"
timeout 120 $PY benchmarks/bench_tbptt.py --device cuda --hidden 1024 --embed 256 --batch 64 --k 256 --steps 60 --warmup 5 --repeats 2 --log_every 50 --no_mlflow --precision bf16-mixed 2>&1 | grep -v "^\s*$" | tail -4 | tee "$OUT/bench_tbptt_bf16.txt"
timeout 300 $PY benchmarks/bench_recurrences.py --device cuda --json "$OUT/bench_gpu.json" ${GPU_BENCH_ARGS:---quick} 2>&1 | tee "$OUT/bench_gpu.txt"
