#!/usr/bin/env bash
# One device call for what issue 3 still asks of a GPU (~9.5 minutes; run with timeout_s 590): the
# open goals' benchmarks (`bench_recurrences.py --goals`, ~2 min: minGRU vs its own loop at T=512
# in fp32 and bf16, minGRU checkpointed vs full BPTT at T=16384, a profile of the selective-copy
# stack), then the selective-copy run (benchmarks/learn_gpu.sh) for the rest of the call, going on
# from benchmarks/state/selective_copy/last.ckpt. Needs no wheels. Files: $OUT/goals.txt,
# $OUT/learn.txt, $OUT/sc/*.ckpt.
# A second call right after it (the machine still warm): SKIP_GOALS=1 CALL_SECONDS=... for the
# selective-copy run alone, after copying the first call's $OUT/sc/last.ckpt* over
# benchmarks/state/selective_copy/ (tracked in git: the run's state between sessions).
# GOALS=--mingru_checkpointed runs that part of the goals alone (~1-2 min: side by side with the
# profiles and the host's view first, then the segment split, the memory, the head everywhere);
# SKIP_LEARN=1 GOALS=--mingru_checkpointed ENGINE=last: that, then the engine's checks in the time left.
# GOALS="--mingru_checkpointed --split": that, then the Triton kernel with the time axis in
# chunks (kernel_split auto, session 40) against one chunk at small B x H (~1-2 min).
# SKIP_LEARN=1 leaves the selective-copy run out. ENGINE=1 first runs tests/test_gpu.py and the GPU tests of tests/test_kernels.py but the long
# kernel-against-loop one without resets (~2-3 min; $OUT/engine.txt), and the TBPTT engine against a
# plain loop on a small LSTM, where the engine's host cost per update shows (~30-60 s, and again with
# the progress bar on): what the prefetching loaders, the sync-free stop_on_nonfinite (session 33)
# and the host-side logging and reset masks (session 36), fp16 without a sync per update (session
# 38), all built on CPU, do on a GPU. ENGINE=last runs them after the selective-copy run instead,
# in the time it leaves (with SKIP_GOALS=1: the rest of the 60,000-update schedule, ~7 min at
# 55-58 updates/s, then the engine's checks).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
CALL_SECONDS=${CALL_SECONDS:-570}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch, lightning, triton; print('torch', torch.__version__, 'lightning', lightning.__version__, 'triton', triton.__version__)"; } | tee "$OUT/goals.txt"
# at most $1 seconds, and no more than the call has left
cap() { local left=$(( CALL_SECONDS - SECONDS - 5 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
engine() {
  timeout $(cap 240) $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py -k "not sequential_loop_on_gpu or resets" 2>&1 \
    | grep -E 'passed|failed|skipped|Error|assert|^(FAILED|ERROR)' | tail -30 | tee "$OUT/engine.txt"
  timeout $(cap 90) $PY benchmarks/bench_tbptt.py --device cuda --hidden 128 --embed 64 --batch 64 --k 256 --steps 300 --warmup 20 \
    --repeats 2 --log_every 50 --no_mlflow 2>&1 | grep -v "^\s*$" | tail -4 | tee -a "$OUT/engine.txt"
  # the same with the progress bar on, as `distrnn fit` runs (until session 36 Lightning read the
  # last logged loss from the GPU after every batch, bar or not, and the bar once more)
  timeout $(cap 90) $PY benchmarks/bench_tbptt.py --device cuda --hidden 128 --embed 64 --batch 64 --k 256 --steps 300 --warmup 20 \
    --repeats 2 --log_every 50 --no_mlflow --progress_bar 2>&1 | grep -v "^\s*$" | tail -4 | tee -a "$OUT/engine.txt"
  # fp16 loss scaling (session 38: the scaler hands the fused step its overflow flag; before, each
  # update waited for the GPU in PyTorch's unfused step): against the plain loop with the same scaler
  timeout $(cap 90) $PY benchmarks/bench_tbptt.py --device cuda --hidden 128 --embed 64 --batch 64 --k 256 --steps 300 --warmup 20 \
    --repeats 2 --log_every 50 --no_mlflow --precision 16-mixed 2>&1 | grep -v "^\s*$" | tail -4 | tee -a "$OUT/engine.txt"
}
[ "${ENGINE:-0}" = "1" ] && engine
if [ "${SKIP_GOALS:-0}" != "1" ]; then
  timeout $(cap 330) $PY benchmarks/bench_recurrences.py --device cuda ${GOALS:---goals} 2>&1 | tee -a "$OUT/goals.txt"
fi
left=$(( CALL_SECONDS - SECONDS - 25 ))  # learn.py's start (imports, the data) and its final saves
[ "${SKIP_LEARN:-0}" != "1" ] && [ "$left" -gt 30 ] && SC_SECONDS=$left bash benchmarks/learn_gpu.sh
# ENGINE=last: the engine's checks in whatever the call has left after the learning run (which
# stops early when its schedule ends)
[ "${ENGINE:-0}" = "last" ] && [ $(( CALL_SECONDS - SECONDS )) -gt 30 ] && engine
true
