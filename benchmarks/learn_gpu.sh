#!/usr/bin/env bash
# The selective-copy demo of issue 3 on a GPU (~52 updates/s on an H200):
# `jobs/configs/selective_copy_mingru.yaml` for SC_SECONDS (default 540), its checkpoints (best and
# last.ckpt at the stop) written to $OUT/sc. Its schedule is longer than one device call: when
# benchmarks/state/selective_copy/last.ckpt exists (the last call's $OUT/sc/last.ckpt with its
# .sha256, copied there and committed, so that the next session, on a fresh checkout, has it), the
# run goes on from it exactly (benchmarks/learn.py --resume).
# ADD_SECONDS=110 adds the adding problem at T=1000 (2-layer minGRU; learned on CPU already,
# benchmarks/RESULTS.md). Everything goes to one file, $OUT/learn.txt: the card, then one JSON row
# per validation of each run, then each run's summary.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/learn.txt"
STATE=${SC_RESUME:-benchmarks/state/selective_copy/last.ckpt}
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee -a "$LOG"
runs="selective_copy_mingru ${SC_SECONDS:-540}"
[ "${ADD_SECONDS:-0}" -gt 0 ] && runs="$runs;adding_mingru $ADD_SECONDS"
IFS=";" read -ra RUNS <<< "$runs"
for run in "${RUNS[@]}"; do
  set -- $run
  extra=()
  if [ "$1" = selective_copy_mingru ]; then
    extra=(--save "$OUT/sc")
    [ -f "$STATE" ] && extra+=(--resume "$STATE")
  fi
  echo "== jobs/configs/$1.yaml, $2 s ${extra[*]}" | tee -a "$LOG"
  $PY benchmarks/learn.py "jobs/configs/$1.yaml" --seconds "$2" --json "/tmp/learn_$1.json" "${extra[@]}" 2>&1 \
    | grep -E '^\{|RESULT|Error|error' | tail -100 | tee -a "$LOG"
  cat "/tmp/learn_$1.json" >> "$LOG" 2>/dev/null; echo >> "$LOG"
done
