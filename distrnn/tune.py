"""Hyperparameter search with Ray Tune over any key of a distrnn config.

A sweep YAML names the distrnn config every trial starts from, a search space over its keys,
the metric, the scheduler (ASHA by default, PBT as an option) and the resources per trial.
Each trial is ``distrnn fit`` in a Tune trial process, or, with ``workers_per_trial`` > 1, a Ray
Train run of that many ranks (as ``jobs/train.py`` runs one); either reports after every validation
with a full checkpoint (what ASHA compares and PBT copies) and logs to its own MLflow run nested
under one parent run for the sweep. The whole space is checked before any trial starts.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from distrnn.raytrain import (CKPT_NAME, ReportToRay, check_config, check_room_for_workers, check_store,
                              fit_from_ray_checkpoint, init_ray, keep_a_local_ray_on_loopback, metric_name, ray_trainer,
                              storage_location, strategy_error, tracking_env)
from distrnn.runs import STOPPED_EARLY_TAG
from distrnn.runs import SWEEP_TAG as PARENT_TAG

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


class SearchSpaceError(ValueError):
    """A search space entry is invalid; the message names the key."""


@dataclass
class SchedulerConfig:
    """How trials are stopped early (ASHA) or evolved (PBT)."""

    name: Literal["asha", "pbt", "fifo"] = "asha"
    """asha: stop the worse trials at each rung; pbt: copy good trials and perturb their values; fifo: run all to the end."""
    max_t: int = 10
    """ASHA: the most validations (reports) a trial gets."""
    grace_period: int = 1
    """ASHA: validations every trial gets before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    perturbation_interval: int = 2
    """PBT: validations between exploit/explore steps."""
    resample_probability: float = 0.25
    """PBT: the chance that explore draws a value anew from the search space instead of perturbing
    the copied one (x0.8 or x1.2; a choice moves to a neighbouring value)."""
    synch: bool = False
    """PBT: wait until every trial reaches the perturbation step before exploiting (Ray's
    synchronous PBT: deterministic for small populations, at the cost of idle trials)."""


@dataclass
class SweepConfig:
    """A Ray Tune sweep over distrnn configs."""

    config: list[str] = field(default_factory=list)
    """distrnn config files every trial starts from (as ``distrnn fit --config``), relative to the working directory."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed values for every trial, by dotted key (``trainer.max_steps: 200``)."""
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Key -> one distribution: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [...]}, {grid: [...]}."""
    metric: str = "val/loss"
    """The logged metric trials are compared on."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or a larger metric is better."""
    num_samples: int = 4
    """Trials drawn from the space (each grid point is tried num_samples times)."""
    max_concurrent_trials: int = 2
    """Trials running at once."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial (with several workers, split evenly over them)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial (fractions share a GPU; with several workers, split evenly over them)."""
    workers_per_trial: int = 1
    """Ranks per trial. 1: the trial trains in its Tune process. More (or a DeepSpeed strategy):
    each trial is a Ray Train run of that many workers, as ``jobs/train.py`` runs one (each rank
    its own streams; the global batch is the per-rank batch times the workers)."""
    strategy: str = "ddp"
    """The strategy of a trial's Ray Train run: ddp, deepspeed_stage_1/2/3 or deepspeed_stage_3_offload."""
    reuse_actors: bool = True
    """Run the next trial in a finished trial's worker process (Ray's default is a new process per
    trial, which pays the imports of torch, Lightning and MLflow, seconds, every time). Trials of
    several workers never do: a stopped trial's process must end to take its workers with it."""
    search: Literal["random", "optuna"] = "random"
    """How trials get their values. random: independent draws from the distributions (every point
    of a grid); optuna: Optuna's TPE sampler draws each new trial near the values that scored best
    so far (Bayesian optimization; needs Optuna, in distrnn[ray]; no grid, not with PBT)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping or population-based training."""
    seed: Optional[int] = 0
    """Seeds the search algorithm's draws."""
    name: str = "distrnn-sweep"
    """The sweep's name: Ray's run folder under storage_path, and the MLflow parent run's name."""
    storage_path: str = "~/ray_results"
    """Where Ray keeps trial checkpoints and the sweep's state (shared by all nodes on a cluster)."""
    max_failures: int = 0
    """Times a failed trial (an error, a lost worker or node) is restarted from its latest
    checkpoint, in its own MLflow run, before the sweep counts it as failed."""
    keep_checkpoints: Optional[int] = None
    """Checkpoints each trial keeps in storage: its N best by ``metric`` and its latest (Tune
    removes the others as it goes). None: every report's (Ray's default). PBT needs at least 3: a
    trial copies another's latest checkpoint, which that one's next reports must not remove first."""
    experiment_name: str = "distrnn-sweeps"
    """MLflow experiment of the parent run and the trials."""


def _cli_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def as_args(values: dict[str, Any]) -> list[str]:
    return [f"--{k}={_cli_value(v)}" for k, v in values.items()]


def base_args(sweep: SweepConfig) -> list[str]:
    return [a for c in sweep.config for a in ("--config", c)] + as_args(sweep.overrides)


def validate_space(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every distribution; return two sample assignments (all lows, all highs) that the
    caller builds a full config from, so a key the CLI does not know also fails before any trial."""
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    if not space:
        raise SearchSpaceError("search_space: empty; name at least one key to search")
    for key, spec in space.items():
        where = f"search_space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SearchSpaceError(f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(arg, list) or not arg:
                raise SearchSpaceError(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
            lows[key], highs[key] = arg[0], arg[-1]
            continue
        if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
            raise SearchSpaceError(f"{where}: {kind} needs [lower, upper] numbers, got {arg!r}")
        lo, hi = arg
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise SearchSpaceError(f"{where}: {kind} lower bound {lo} must be below the upper bound {hi}")
        if kind == "loguniform" and lo <= 0:
            raise SearchSpaceError(f"{where}: loguniform bounds must be > 0, got [{lo}, {hi}]")
        if kind == "randint":
            if not (float(lo).is_integer() and float(hi).is_integer()):
                raise SearchSpaceError(f"{where}: randint bounds must be integers, got [{lo}, {hi}]")
            lo, hi = int(lo), int(hi) - 1  # Tune's randint excludes the upper bound
        lows[key], highs[key] = lo, hi
    return [lows, highs]


def tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(arg)
        elif kind == "grid":
            out[key] = tune.grid_search(arg)
        elif kind == "randint":
            out[key] = tune.randint(int(arg[0]), int(arg[1]))
        else:
            out[key] = getattr(tune, kind)(float(arg[0]), float(arg[1]))
    return out


def _trial(sweep: dict[str, Any]) -> dict[str, Any]:
    """What the trial's training needs to know of its Tune trial (a Ray Train worker has no Tune context)."""
    from ray import tune

    context = tune.get_context()
    return {"parent_run_id": sweep["parent_run_id"], "experiment_name": sweep["experiment_name"],
            "name": context.get_trial_name(), "id": context.get_trial_id()}


def join_trial_run(cli: Any, trial: dict[str, Any]) -> None:
    """Log into the trial's own MLflow run, nested under the sweep's parent run."""
    logger = cli.trainer.logger
    if logger is None or not hasattr(logger, "tags"):
        return
    logger.tags = {**(logger.tags or {}), "mlflow.parentRunId": trial["parent_run_id"],
                   "distrnn.trial": trial["name"], "distrnn.trial_id": trial["id"]}
    logger._run_name = trial["name"]
    logger._experiment_name = trial["experiment_name"]
    logger._async = False  # ASHA may stop a trial at any report: send each metric before going on
    # A trial restored (failure, Tuner.restore) continues its own run; a PBT trial that took
    # another trial's checkpoint must not continue that trial's run, which the checkpoint names.
    own = _trial_run(trial["experiment_name"], trial["parent_run_id"], trial["id"])
    if own is not None:
        logger._run_id = own


def run_trial(values: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial of one rank: distrnn's CLI in the Tune trial's process, reporting to Tune after each validation."""
    from ray import tune

    from distrnn.cli import DistrnnCLI

    if os.path.isdir(sweep["cwd"]):
        os.chdir(sweep["cwd"])
    trial = _trial(sweep)
    cli = DistrnnCLI(
        args=sweep["args"] + as_args(values),
        run=False,
        trainer_extra={"callbacks": [ReportToRay(after_validation=True, tune=True)], "enable_progress_bar": False,
                       "devices": 1},
    )
    join_trial_run(cli, trial)
    fit_from_ray_checkpoint(cli, tune.get_checkpoint(), same_run=False)


TRAIN_RUNS = "train-runs"


def run_trial_group(values: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial of several ranks: a Ray Train run of ``jobs/train.py``'s workers (placed by Ray
    Train, DDP or DeepSpeed), started from the trial's Tune checkpoint. Every report the workers
    make after a validation reaches Tune with its checkpoint, which Tune copies into the trial's
    folder: ASHA compares the reports, PBT copies the checkpoints, a restored sweep resumes from them.

    Ray's own ``TuneReportCallback`` hands Tune the metrics only (the checkpoint's path as one of
    them), so PBT and ``--resume`` would have no checkpoint: here a Train callback passes each
    report to this process, which reports it to Tune and removes the Train run's copy."""
    import threading
    import uuid

    from ray import tune
    from ray.util.queue import Empty, Queue

    trial = _trial(sweep)
    trial["checkpoint"] = tune.get_checkpoint()
    workers, gpus = sweep["workers_per_trial"], sweep["gpus_per_trial"]
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = ray_trainer(
        {"args": sweep["args"] + as_args(values), "strategy": sweep["strategy"], "report_every": None,
         "use_gpu": gpus > 0, "cwd": sweep["cwd"], "job": None, "trial": trial},
        workers=workers, resources_per_worker={"CPU": sweep["cpus_per_trial"] / workers, **({"GPU": gpus / workers} if gpus else {})},
        # a new name for each start: Ray Train resumes a run of the same name from its own latest
        # checkpoint, which is not the one Tune gives a restarted trial (PBT's copy of another's)
        name=f"{trial['id']}-{uuid.uuid4().hex[:8]}", storage=sweep["train_storage"], env=sweep["env"],
        callbacks=[_forward_reports(reports)],
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:
            outcome["error"] = e

    training = threading.Thread(target=fit, name="distrnn-trial-ray-train", daemon=True)
    training.start()
    while True:
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except Empty:
            # the Train run has made its last report once fit returned
            if training.is_alive() or not reports.empty():
                continue
            break
        tune.report(metrics, checkpoint=None if checkpoint is None else tune.Checkpoint(checkpoint.path, checkpoint.filesystem))
        if checkpoint is not None:  # Tune holds its own copy now
            checkpoint.filesystem.delete_dir(checkpoint.path)
    training.join()
    if "error" in outcome:
        raise outcome["error"]


def _forward_reports(queue: Any) -> Any:
    """A Ray Train callback (run by the Train controller) that puts each report, rank 0's metrics
    and the persisted checkpoint, on ``queue``."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((metrics[0], checkpoint))

    return ForwardReports()


def remove_train_runs(storage: str, name: str) -> None:
    """The sweep's Ray Train run folders (each trial's report of several ranks is also in Tune's
    folder; a stopped trial's Train run was killed before it could remove its own)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
    try:
        fs.delete_dir(f"{path.rstrip('/')}/{name}/{TRAIN_RUNS}")
    except (FileNotFoundError, OSError):
        pass


def _trial_run(experiment_name: str, parent: str, trial_id: str) -> Optional[str]:
    import mlflow

    client = mlflow.MlflowClient()
    try:
        exp = client.get_experiment_by_name(experiment_name)
    except Exception:  # tracking unreachable: the trial starts a run when it can
        return None
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                    f"tags.`distrnn.trial_id` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _fail(message: str) -> None:
    print(f"distrnn: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_sweep(argv: list[str]) -> tuple[SweepConfig, bool, bool]:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from distrnn.cli import asks_for_help, field_docs_in_help

    parser = ArgumentParser(prog="jobs/tune.py", description="A Ray Tune sweep over distrnn configs.",
                            exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="the sweep YAML: the options below as keys (its `config:` key, the distrnn configs, is"
                             " --sweep.config on the command line)")
    parser.add_argument("--resume", type=bool, default=False, help="continue an interrupted sweep (Tuner.restore)")
    parser.add_argument("--check_only", type=bool, default=False, help="check the sweep and the configs, then exit")
    if asks_for_help(argv):  # the keys as given: at the top level (see _nest)
        import re

        with field_docs_in_help(argv):
            parser.add_class_arguments(SweepConfig, "sweep", as_group=False)
            print(re.sub(r"--sweep\.(?!config\b)", "--", parser.format_help()))
        sys.exit(0)
    parser.add_class_arguments(SweepConfig, "sweep", as_group=False)
    try:
        ns = parser.parse_args(_nest(argv))
    except Exception as e:  # jsonargparse's message names the key
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _fail(" ".join(lines[:2]).replace('"sweep.', '"'))
    from dataclasses import fields as dc_fields

    init = parser.instantiate_classes(ns)
    sweep = SweepConfig(**{f.name: init.sweep[f.name] for f in dc_fields(SweepConfig)})
    # Values for the trials' own CLI stay data: jsonargparse reads a {class_path: ...} inside them
    # (a callback in trainer.callbacks) as a class to build, which the trials' parser does.
    sweep.overrides, sweep.search_space = _as_data(ns.sweep.overrides), _as_data(ns.sweep.search_space)
    return sweep, bool(ns.resume), bool(ns.check_only)


def _as_data(value: Any) -> Any:
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _as_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_data(v) for v in value]
    return value


def _nest(argv: list[str]) -> list[str]:
    """The sweep YAML's keys sit at the top level; the parser keeps them under ``sweep``."""
    import yaml

    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            path = a.split("=", 1)[1] if "=" in a else next(it, "")
            if not Path(path).is_file():
                _fail(f"--config: no such file: {path}")
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                _fail(f"{path}: a sweep config is a mapping of keys")
            out += ["--config", yaml.safe_dump({"sweep": data})]
        elif a in ("--resume", "--check-only", "--check_only"):  # bare flags
            out.append(a.replace("-", "_").replace("__", "--", 1) + "=true")
        elif a.startswith("--") and a.split("=")[0] not in ("--resume", "--check_only") and not a.startswith("--sweep."):
            out.append("--sweep." + a[2:])
        else:
            out.append(a)
    return out


def _scheduler(sweep: SweepConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=tune_space(sweep.search_space), synch=s.synch,
                                       resample_probability=s.resample_probability)
    return FIFOScheduler()


def _searcher(sweep: SweepConfig) -> Any:
    """Where the next trial's values come from: independent draws, or Optuna's TPE, which draws
    near the values that scored best so far (each trial's last report is its score)."""
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=sweep.max_concurrent_trials)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)


def search_error(sweep: SweepConfig) -> Optional[str]:
    """Why ``sweep.search`` cannot search this sweep, or None."""
    if sweep.search != "optuna":
        return None
    grid = [k for k, spec in sweep.search_space.items() if isinstance(spec, dict) and "grid" in spec]
    if grid:
        return f"search: optuna draws every value itself; search_space.{grid[0]} is a grid (use choice)"
    if sweep.scheduler.name == "pbt":
        return "search: optuna picks each trial's values once, PBT changes them as trials run: use search: random with pbt"
    try:
        import optuna  # noqa: F401
    except ImportError:
        return "search: optuna needs Optuna (pip install 'distrnn[ray]')"
    return None


def _parent_run(sweep: SweepConfig, resume: bool) -> str:
    import mlflow

    from distrnn.provenance import code_version
    from distrnn.tracking import INTERRUPTED_TAG, artifact_location

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(sweep.experiment_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        sweep.experiment_name, artifact_location=artifact_location(mlflow.get_tracking_uri()))
    if resume:
        runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{sweep.name}'", order_by=["start_time DESC"], max_results=1)
        if runs:
            client.update_run(runs[0].info.run_id, status="RUNNING")
            if INTERRUPTED_TAG in runs[0].data.tags:  # from here on a failing trial is FAILED again
                client.delete_tag(runs[0].info.run_id, INTERRUPTED_TAG)
            return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep.name, tags={**code_version()[0], PARENT_TAG: sweep.name})
    params = {f"sweep.{k}": json.dumps(v)[:6000] for k, v in _plain(sweep).items()}
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    return run.info.run_id


def _plain(sweep: SweepConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(sweep)


def main(argv: Optional[list[str]] = None) -> Any:
    keep_a_local_ray_on_loopback()
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep, resume, check_only = load_sweep(argv)
    if not sweep.config:
        _fail("config: name the distrnn config file(s) the trials start from")
    for c in sweep.config:
        if not Path(c).is_file():
            _fail(f"config: no such file: {c}")
    if sweep.num_samples < 1:
        _fail(f"num_samples: must be >= 1, got {sweep.num_samples}")
    if sweep.max_concurrent_trials < 1:
        _fail(f"max_concurrent_trials: must be >= 1, got {sweep.max_concurrent_trials}")
    try:
        samples = validate_space(sweep.search_space)
    except SearchSpaceError as e:
        _fail(str(e))
    if not 0 <= sweep.scheduler.resample_probability <= 1:
        _fail(f"scheduler.resample_probability: must be within [0, 1], got {sweep.scheduler.resample_probability}")
    if sweep.workers_per_trial < 1:
        _fail(f"workers_per_trial: must be >= 1, got {sweep.workers_per_trial}")
    if sweep.max_failures < 0:
        _fail(f"max_failures: must be >= 0, got {sweep.max_failures}")
    if sweep.gpus_per_trial < 0:
        _fail(f"gpus_per_trial: must be >= 0, got {sweep.gpus_per_trial}")
    if sweep.cpus_per_trial < 0 or (sweep.cpus_per_trial == 0 and not sweep.gpus_per_trial):
        _fail(f"cpus_per_trial: must be > 0 (or 0 with gpus_per_trial), got {sweep.cpus_per_trial}")
    if sweep.keep_checkpoints is not None and sweep.keep_checkpoints < (3 if sweep.scheduler.name == "pbt" else 1):
        pbt = " with PBT (a trial may copy another's checkpoint after that one's next reports)" if sweep.scheduler.name == "pbt" else ""
        _fail(f"keep_checkpoints: must be >= {3 if pbt else 1}{pbt} or null (keep all), got {sweep.keep_checkpoints}")
    problem = strategy_error(sweep.strategy) or search_error(sweep)
    if problem:
        _fail(problem)
    if sweep.workers_per_trial > 1 and sweep.gpus_per_trial and not float(sweep.gpus_per_trial / sweep.workers_per_trial).is_integer():
        # two ranks of one process group on one GPU: NCCL refuses them
        _fail(f"gpus_per_trial: {sweep.gpus_per_trial} GPUs cannot be split evenly into whole GPUs for"
              f" {sweep.workers_per_trial} workers (workers_per_trial); give 0 or a multiple of it")
    args = base_args(sweep)
    for sample in samples:  # an unknown key or an impossible value fails here, before any trial
        check_config(args + as_args(sample), sweep.workers_per_trial, use_gpu=sweep.gpus_per_trial > 0,
                     device_setting="gpus_per_trial")
    if check_only:
        print("distrnn: sweep OK")
        return None

    import mlflow
    from ray import tune

    from distrnn.tracking import INTERRUPTED_TAG, ui_hint

    env = tracking_env()
    check_store(env)
    storage = storage_location(sweep.storage_path)
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    init_ray(env)
    workers, gpus = sweep.workers_per_trial, sweep.gpus_per_trial
    check_room_for_workers(workers, {"CPU": sweep.cpus_per_trial / workers, **({"GPU": gpus / workers} if gpus else {})},
                           key=lambda resource: "workers_per_trial" if workers > 1 else resource.lower() + "s_per_trial",
                           lower="workers_per_trial, cpus_per_trial or gpus_per_trial")
    parent = _parent_run(sweep, resume)
    grouped = sweep.workers_per_trial > 1 or sweep.strategy != "ddp"
    shared = {"args": args, "cwd": os.getcwd(), "parent_run_id": parent, "experiment_name": sweep.experiment_name}
    if grouped:
        # The trial's process only forwards reports; Ray Train reserves the workers' resources. A
        # trial with no resources at all is refused by Tune: it reserves a mebibyte of memory.
        shared.update(workers_per_trial=sweep.workers_per_trial, strategy=sweep.strategy, env=env,
                      cpus_per_trial=sweep.cpus_per_trial, gpus_per_trial=sweep.gpus_per_trial,
                      train_storage=f"{storage.rstrip('/')}/{sweep.name}/{TRAIN_RUNS}")
        trainable = tune.with_resources(tune.with_parameters(run_trial_group, sweep=shared), {"cpu": 0, "memory": 2**20})
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=shared),
                                        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    metric = metric_name(sweep.metric)
    path = f"{storage.rstrip('/')}/{sweep.name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.search_space),  # PBT too: its first values are drawn from it
            tune_config=tune.TuneConfig(
                metric=metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=_scheduler(sweep),
                max_concurrent_trials=sweep.max_concurrent_trials, reuse_actors=sweep.reuse_actors and not grouped,
                search_alg=_searcher(sweep),
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, checkpoint_config=tune.CheckpointConfig(
                num_to_keep=sweep.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=sweep.mode),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
        )
    def mark_interrupted() -> None:
        # before Tune stops a trial: each trial run's logger reads it when its training ends
        try:
            mlflow.MlflowClient().set_tag(parent, INTERRUPTED_TAG, "true")
        except Exception as e:
            print(f"distrnn: warning: could not mark the sweep's run interrupted: {str(e).splitlines()[0][:300]}",
                  file=sys.stderr)

    interrupted, restore_sigint = _catch_interrupt(mark_interrupted)
    try:
        results = tuner.fit()
    finally:
        restore_sigint()
        if grouped:
            remove_train_runs(storage, sweep.name)
    client = mlflow.MlflowClient()
    if interrupted.is_set():  # Tune stopped every trial and saved its state for --resume
        _close_trial_runs(client, parent, results, interrupted=True)
        client.set_terminated(parent, "KILLED")
        print(f"distrnn: sweep '{sweep.name}' interrupted; continue it with the same command and --resume"
              f" (state in {path})", file=sys.stderr)
        sys.exit(130)
    _close_trial_runs(client, parent, results)
    errors = [r.error for r in results if r.error is not None]
    try:
        best = results.get_best_result(metric=metric, mode=sweep.mode, scope="all")
    except RuntimeError:
        best = None
    if best is None or metric not in (best.metrics or {}):
        client.set_terminated(parent, "FAILED")
        _fail(f"no trial reported {sweep.metric}; {len(errors)} of {len(results)} trials failed: "
              f"{str(errors[0]).splitlines()[0] if errors else ''}")
    best_config = {k: best.config[k] for k in sweep.search_space}
    value, checkpoint = _best_report(best, metric, sweep.mode)
    trial_run = _trial_run(sweep.experiment_name, parent, best.metrics.get("trial_id", ""))
    tags = {"best.trial_id": str(best.metrics.get("trial_id")), **({"best.run_id": trial_run} if trial_run else {}),
            **({"best.checkpoint": checkpoint} if checkpoint else {})}
    client.log_batch(parent, metrics=[mlflow.entities.Metric(f"best_{metric}", value, 0, 0)],
                     params=[mlflow.entities.Param(f"best.{k}", _cli_value(v)) for k, v in best_config.items()],
                     tags=[mlflow.entities.RunTag(k, v[:5000]) for k, v in tags.items()])
    client.log_text(parent, json.dumps(best_config, indent=2), "best_config.json")
    # the best trial's config as one command (paths relative to this folder), to train it further
    command = shlex.join(["distrnn", "fit", *args, *as_args(best_config)])
    client.log_text(parent, command + "\n", "best_command.txt")
    client.set_terminated(parent, "FINISHED" if not errors else "FAILED")
    print(f"distrnn: sweep '{sweep.name}': {len(results)} trials, {len(errors)} failed; best {sweep.metric} "
          f"{value:.4f} with {json.dumps(best_config)}")
    if checkpoint:
        print(f"distrnn: its checkpoint: {checkpoint}")
    print(f"distrnn: its config: {command}")
    print(f"distrnn: MLflow parent run {parent} in experiment '{sweep.experiment_name}'; the trials side by side:"
          f" distrnn runs compare --experiment {shlex.quote(sweep.experiment_name)} --sweep {shlex.quote(sweep.name)}"
          f" --sort {shlex.quote(sweep.metric)}{' --descending' if sweep.mode == 'max' else ''}")
    experiment = client.get_experiment_by_name(sweep.experiment_name)
    hint = experiment and ui_hint(env["MLFLOW_TRACKING_URI"], experiment.experiment_id, parent)
    if hint:
        print(f"  look at it with:  {hint}")
    return results


def _best_report(result: Any, metric: str, mode: str) -> tuple[float, Optional[str]]:
    """The best value of ``metric`` that the trial of ``result`` reported (Tune's scope "all": the
    trial is best by it, while ``result.metrics`` is its last report), and the checkpoint file of
    that report as ``--ckpt_path`` takes it: a local path, or a URI for remote storage. None when
    the report's checkpoint is no longer kept (``keep_checkpoints`` keeps the best ones)."""
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    history = result.metrics_dataframe
    values = [float(m[metric]) for _, m in kept]
    if history is not None and metric in history:
        values += [float(v) for v in history[metric].dropna()]
    values.append(float(result.metrics[metric]))
    value = min(values) if mode == "min" else max(values)
    for c, m in kept:
        if math.isclose(float(m[metric]), value, rel_tol=1e-9, abs_tol=1e-12):
            fs = c.filesystem.type_name
            return value, f"{c.path}/{CKPT_NAME}" if fs == "local" else f"{fs}://{c.path}/{CKPT_NAME}"
    return value, None


def _catch_interrupt(on_interrupt: Any = None) -> tuple[Any, Any]:
    """An event set by Ctrl-C (SIGINT) during ``Tuner.fit``, and a function that puts the previous
    SIGINT handling back. Tune's own SIGINT handler stops the
    sweep gracefully but marks the stopped trials TERMINATED, like finished ones, so the driver
    could not tell an interrupted sweep from a finished one. With TUNE_DISABLE_SIGINT_HANDLER this
    handler notes the interrupt, calls ``on_interrupt`` (the first time) and hands the interrupt
    to Tune as SIGUSR1, Tune's other stop signal."""
    import signal
    import threading

    event = threading.Event()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return event, lambda: None
    before = (signal.getsignal(signal.SIGINT), os.environ.get("TUNE_DISABLE_SIGINT_HANDLER"))
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def note(signum: int, frame: Any) -> None:
        first = not event.is_set()
        event.set()
        if first and on_interrupt is not None:
            on_interrupt()
        os.kill(os.getpid(), signal.SIGUSR1)

    def restore() -> None:  # for callers that go on in this process (tests, benchmarks)
        signal.signal(signal.SIGINT, before[0])
        if before[1] is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before[1]

    signal.signal(signal.SIGINT, note)
    return event, restore


def _ran_to_the_end(m: dict[str, Any]) -> bool:
    if m.get("max_steps", -1) > 0:
        return m.get("step", 0) >= m["max_steps"]
    return m.get("max_epochs", -1) > 0 and m.get("epoch", 0) >= m["max_epochs"] - 1


def _settled_trial_runs(client: Any, exp_id: str, parent: str, timeout_s: float) -> list:
    """The sweep's trial runs once none is RUNNING, or as they are after ``timeout_s``. Tune hands
    back its results without waiting for a stopped trial's training thread (``session.finish(
    timeout=0)``), which may still be closing its run: a status written before that would be
    overwritten by the trial's own (seen on a fast machine: stopped trials FAILED, not KILLED).
    A trial whose process was killed before it closed its run stays RUNNING: hence the timeout."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        if all(r.info.status != "RUNNING" for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.25)


def _close_trial_runs(client: Any, parent: str, results: Any, interrupted: bool = False, settle_s: float = 10.0) -> None:
    """A trial that the scheduler stopped ended mid-training without an error of its own: its run
    is marked KILLED and tagged ``distrnn.stopped_early``, not left RUNNING or FAILED. A trial that
    trained to its last step is FINISHED even where Tune stopped it while it was closing its run
    (its last report reached the scheduler's max_t). In an interrupted sweep every trial not run
    to its end was stopped by the interrupt (its worker saw the stop as an error, so its run may
    say FAILED): KILLED, untagged, for --resume to go on with."""
    ended = [r for r in results if r.error is None and r.metrics]
    stopped = {r.metrics.get("trial_id") for r in ended if not _ran_to_the_end(r.metrics)}
    finished = {r.metrics.get("trial_id") for r in ended if _ran_to_the_end(r.metrics)}
    exp_id = client.get_run(parent).info.experiment_id
    for run in _settled_trial_runs(client, exp_id, parent, settle_s):
        trial = run.data.tags.get("distrnn.trial_id")
        if trial in finished:
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "FINISHED")
        elif interrupted:
            if trial in stopped or run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
        elif trial in stopped:
            client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
            client.set_terminated(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
