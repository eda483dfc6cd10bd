#!/usr/bin/env bash
# The learning demos of issue 3 on a GPU, in one device call (~6 minutes): selective copy with a
# 3-layer minGRU at T=4096, then the adding problem at T=1000 with a 2-layer minGRU. Results to $OUT.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$OUT/learn_env.txt"
$PY benchmarks/learn.py jobs/configs/selective_copy_mingru.yaml --seconds ${SC_SECONDS:-210} --json "$OUT/learn_selective_copy.json" 2>&1 | grep -E '^\{|RESULT|Error|error' | tail -40
$PY benchmarks/learn.py jobs/configs/adding_mingru.yaml --seconds ${ADD_SECONDS:-110} --json "$OUT/learn_adding.json" 2>&1 | grep -E '^\{|RESULT|Error|error' | tail -40
