#!/usr/bin/env bash
# The selective-copy demo of issue 3 on a GPU, in one device call of its own (~7 minutes on an
# H200: 20,000 updates at ~52 updates/s plus validations): `jobs/configs/selective_copy_mingru.yaml`
# as it is (3-layer minGRU, T=4096), to the end of its schedule. ADD_SECONDS=110 adds the adding
# problem at T=1000 (2-layer minGRU; learned on CPU already, benchmarks/RESULTS.md). Everything goes
# to one file, $OUT/learn.txt: the card, then one JSON row per validation of each run, then each
# run's summary.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/learn.txt"
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee -a "$LOG"
runs="selective_copy_mingru ${SC_SECONDS:-540}"
[ "${ADD_SECONDS:-0}" -gt 0 ] && runs="$runs;adding_mingru $ADD_SECONDS"
IFS=";" read -ra RUNS <<< "$runs"
for run in "${RUNS[@]}"; do
  set -- $run
  echo "== jobs/configs/$1.yaml, $2 s" | tee -a "$LOG"
  $PY benchmarks/learn.py "jobs/configs/$1.yaml" --seconds "$2" --json "/tmp/learn_$1.json" 2>&1 \
    | grep -E '^\{|RESULT|Error|error' | tail -100 | tee -a "$LOG"
  cat "/tmp/learn_$1.json" >> "$LOG" 2>/dev/null; echo >> "$LOG"
done
