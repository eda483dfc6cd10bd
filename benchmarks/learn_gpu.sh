#!/usr/bin/env bash
# The learning demos of issue 3 on a GPU, in one device call (~6 minutes): selective copy with a
# 3-layer minGRU at T=4096, then the adding problem at T=1000 with a 2-layer minGRU. Everything
# goes to one file, $OUT/learn.txt (a device call brings back at most 8 files; gpu_check.sh
# writes 6): the card, then one JSON row per validation of each run, then each run's summary.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/learn.txt"
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee -a "$LOG"
for run in "selective_copy_mingru ${SC_SECONDS:-210}" "adding_mingru ${ADD_SECONDS:-110}"; do
  set -- $run
  echo "== jobs/configs/$1.yaml, $2 s" | tee -a "$LOG"
  $PY benchmarks/learn.py "jobs/configs/$1.yaml" --seconds "$2" --json "/tmp/learn_$1.json" 2>&1 \
    | grep -E '^\{|RESULT|Error|error' | tail -60 | tee -a "$LOG"
  cat "/tmp/learn_$1.json" >> "$LOG" 2>/dev/null; echo >> "$LOG"
done
