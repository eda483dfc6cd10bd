#!/usr/bin/env bash
# One command for a GPU machine: the GPU-marked tests, then the GPU benchmarks; results to $OUT.
# The device image has torch, lightning and pytest but no jsonargparse or mlflow; nothing here needs
# them (the TBPTT benchmark runs with --no_mlflow). Takes about 9 minutes on an H100: give the
# device call its 600-second limit. GPU_BENCH_ARGS="--scan" runs the minGRU/minLSTM comparison instead.
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
timeout 400 $PY benchmarks/bench_recurrences.py --device cuda --json "$OUT/bench_gpu.json" ${GPU_BENCH_ARGS:---quick} 2>&1 | tee "$OUT/bench_gpu.txt"
