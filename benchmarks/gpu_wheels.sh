#!/usr/bin/env bash
# Wheels for the GPU machine, whose image lacks DeepSpeed and may lack its requirements: all of
# them but torch, numpy, packaging and tqdm (which Lightning needs too), into .whl/ (git-ignored),
# which the device run carries and gpu_check.sh installs.
# DeepSpeed publishes source only; its wheel is built here (pure Python, kernels compiled on use).
set -euo pipefail
PIP="${PY:-.venv/bin/python} -m pip"
mkdir -p .whl
$PIP wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  annotated-types==0.8.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
  einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0
ls .whl
