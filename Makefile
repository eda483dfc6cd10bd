# distrnn: `make train` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= jobs/configs/default.yaml
STRATEGY ?= ddp
DEVICES ?= auto
PYTEST_ARGS ?=
# 2 workers on 2 cores: 16:34 on 2026-12-06 with a training run beside (much of the suite waits on process start-ups; tests/conftest.py
# gives each worker its share of the cores and forks in-process ranks instead of spawning them)
TEST_WORKERS ?= 2
# the versions the suite last passed with (empty: let pip choose within pyproject's ranges)
CONSTRAINTS ?= constraints.txt

MLFLOW_UI_PORT ?= 5000
RAY_STATE ?= .ray-local
WORKERS ?= 2
SWEEP ?= jobs/configs/sweep_tiny.yaml
TRAIN_ARGS ?=

.PHONY: venv train train-multigpu test test-fast bench gpu-check gpu-bench gpu-goals mlflow-ui clean \
	cluster-up cluster-down submit-train submit-tune

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned, so that nothing else gets to choose a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ray]" "$(TORCH_SPEC)" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@touch $@

venv: $(VENV)/.installed

## Train the default experiment (offline once the environment exists), tracked in MLflow.
train: venv
	$(VENV)/bin/distrnn fit --config $(CONFIG)

## Every GPU of this node (Lightning DDP; strategy and device count from STRATEGY and DEVICES).
train-multigpu: venv
	$(VENV)/bin/distrnn fit --config $(CONFIG) --trainer.accelerator gpu --trainer.strategy $(STRATEGY) --trainer.devices $(DEVICES)

## The whole test suite (slow and multi-process tests included; GPU tests skip without a GPU), on
## TEST_WORKERS pytest-xdist workers, file by file (0: in this process).
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

## CPU sizes: distrnn's TBPTT engine against a plain PyTorch loop (tokens/s side by side), then
## every recurrence against T as ratios to the LSTM, and peak memory of TBPTT/full/checkpointed BPTT;
## then `distrnn fit` with the CPU set as distrnn sets it (glibc's malloc, subnormals flushed) against
## the CPU as it is.
bench: venv
	$(PY) benchmarks/bench_tbptt.py
	$(PY) benchmarks/bench_recurrences.py --device cpu
	$(PY) benchmarks/bench_host_memory.py

## On a machine with a GPU: GPU-marked tests and the GPU benchmarks in one command; results to $$OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

gpu-bench:
	bash benchmarks/gpu_check.sh bench-only

## Issue 3's open GPU goals and the selective-copy run, in one device call (benchmarks/gpu_goals.sh).
gpu-goals:
	bash benchmarks/gpu_goals.sh

## The MLflow UI on 127.0.0.1 over the default store (mlflow.db in this folder).
# For one person: one worker, and without MLflow 3's job runner for GenAI jobs (distrnn has none):
# 2 processes and 0.49 GB, where MLflow's defaults start 15 and 2.75 GB (26 s to answer, 7 s now).
mlflow-ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} $(VENV)/bin/mlflow ui \
	  --host 127.0.0.1 --port $(MLFLOW_UI_PORT) --workers 1 --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

## A local Ray head on 127.0.0.1 with token authentication (address and token in $(RAY_STATE)/).
cluster-up: venv
	$(PY) cluster/local_cluster.py up --state-dir $(RAY_STATE)

cluster-down: venv
	$(PY) cluster/local_cluster.py down --state-dir $(RAY_STATE)

# A job logs where `make train` and `make mlflow-ui` do (MLFLOW_TRACKING_URI, else mlflow.db here, made
# absolute): a job runs in its unpacked package in Ray's temporary folder, where a relative store would go.
# Shell-quoted here: a branch name or store path may hold a quote.
JOB_ENV = $(shell $(PY) -c 'import json, shlex; from distrnn.provenance import tracking_env; print(shlex.quote(json.dumps({"env_vars": tracking_env()})))')

## Ray Train job on the cluster in $(RAY_STATE) (or RAY_API_SERVER_ADDRESS); the config is checked here first.
## TRAIN_ARGS: jobs/train.py's options and config overrides (after the config, so they win).
submit-train: venv
	$(PY) jobs/train.py --check-only --num-workers $(WORKERS) --config $(CONFIG) $(TRAIN_ARGS)
	. $(abspath $(RAY_STATE))/cluster.env && $(VENV)/bin/ray job submit --working-dir . --runtime-env-json $(JOB_ENV) -- \
		python jobs/train.py --num-workers $(WORKERS) --config $(CONFIG) $(TRAIN_ARGS)

## Ray Tune sweep on the cluster in $(RAY_STATE); the search space is checked here first.
submit-tune: venv
	$(PY) jobs/tune.py --check-only --config $(SWEEP)
	. $(abspath $(RAY_STATE))/cluster.env && $(VENV)/bin/ray job submit --working-dir . --runtime-env-json $(JOB_ENV) -- \
		python jobs/tune.py --config $(SWEEP)

clean:
	rm -rf $(VENV) .pytest_cache checkpoints mlruns
