"""distrnn on a Ray cluster: one training job through Ray Train, and what Tune trials share with it.

The same YAML and the same :class:`~distrnn.engine.TBPTTModule` as ``distrnn fit``; Ray only adds
the placement (a ``ScalingConfig``), Lightning's Ray strategy and environment, and checkpoints
reported to Ray storage every ``report_every`` updates, mid-epoch, with the carried hidden state
and the stream position inside (a distrnn checkpoint is one unit). A restarted worker group
(``FailureConfig(max_failures)``) or a resubmitted job with the same ``name`` and ``storage_path``
continues from the latest of them, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from dataclasses import MISSING, dataclass, fields
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from distrnn.checkpoint import PassedMultiple
from distrnn.config import ConfigError
from distrnn.provenance import tracking_env

CKPT_NAME = "checkpoint.ckpt"
REPORT_DIR_PREFIX = "distrnn-ray-"
STRATEGIES = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload")


def metric_name(key: str) -> str:
    """Tune splits nested result keys at '/', so Lightning's ``val/loss`` is reported as ``val_loss``."""
    return key.replace("/", "_")


def _host_prefix() -> str:
    return f"{REPORT_DIR_PREFIX}{re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())}-"


def _report_dir_prefix() -> str:
    """``distrnn-ray-HOST-PID-``: a report folder names the host and process that made it, so that
    a later process tells a folder left by a killed worker (Ctrl-C or ``ray job stop`` kill the
    workers mid-report, skipping their clean-up) from one still being written."""
    return f"{_host_prefix()}{os.getpid()}-"


def sweep_report_dirs(root: Optional[str] = None) -> list[str]:
    """Removes the report folders under ``root`` (the temporary directory) made on this host by
    processes that no longer run: each holds a whole checkpoint. Another host's folder (a
    DeepSpeed report's folder carries rank 0's host and process on every node) and a live
    process's are left alone. Returns the removed paths."""
    here = _host_prefix()
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{glob_escape(here)}*-*"):
        pid = path.name[len(here):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir() or path.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
        except PermissionError:
            pass  # alive, someone else's
    return removed


class ReportToRay(Callback):
    """Reports metrics and a full distrnn checkpoint to Ray Train (or Tune).

    Args:
        every_n_steps: report after each batch that passed a multiple of n updates (mid-epoch
            too); ``None``: never by steps.
        after_validation: report after every validation (what ASHA and PBT compare).
        tune: report with ``ray.tune.report`` (a Tune trial) instead of ``ray.train.report``.
    """

    def __init__(self, every_n_steps: Optional[int] = None, after_validation: bool = False, tune: bool = False) -> None:
        self.every_n_steps, self.after_validation, self.tune = every_n_steps, after_validation, tune
        self._last_step = -1
        self._passed = PassedMultiple(every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._passed.start(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        from distrnn.checkpoint import Checkpoint, ends_training

        # a TBPTT batch makes several updates: report when it passed a multiple of n; the last
        # report before Lightning closes the epoch (a job resubmitted for more steps goes on in
        # it), or from the validation that follows when that one reports anyway
        ending = ends_training(trainer) and not (self.after_validation and Checkpoint._validates_next(trainer))
        if self._passed(trainer.global_step) or ending:
            self._report(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from distrnn.checkpoint import ends_training

        if not trainer.sanity_checking and (self.after_validation or ends_training(trainer)):
            self._report(trainer, force=self.after_validation)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self._report(trainer)

    def _report(self, trainer: Trainer, force: bool = False) -> None:
        if trainer.global_step == self._last_step and not force:
            return
        self._last_step = trainer.global_step
        metrics = {metric_name(k): float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        # With these, a caller tells a run that ended by itself from one a scheduler stopped.
        metrics.update(step=trainer.global_step, epoch=trainer.current_epoch, max_steps=trainer.max_steps,
                       max_epochs=trainer.max_epochs if trainer.max_epochs is not None else -1)
        # Every rank takes part in the save (the checkpoint gathers every rank's hidden state).
        # Lightning writes a checkpoint file on rank 0, which alone hands it to Ray. DeepSpeed writes
        # a directory to which every rank adds its own shards, at rank 0's path (Lightning broadcasts
        # it), on each rank's node: there one rank per node hands the folder to Ray, which merges
        # the nodes' folders into one checkpoint in storage.
        from distrnn.checkpoint import deepspeed_strategy

        sharded = deepspeed_strategy(trainer) is not None
        tmp = None
        if trainer.is_global_zero or not sharded:
            sweep_report_dirs()
            tmp = tempfile.mkdtemp(prefix=_report_dir_prefix())
        if sharded:
            tmp = trainer.strategy.broadcast(tmp)
        hands_over = trainer.local_rank == 0 if sharded else trainer.is_global_zero
        try:
            trainer.save_checkpoint(os.path.join(tmp, CKPT_NAME), weights_only=False)
            if self.tune:
                from ray import tune

                ckpt = tune.Checkpoint.from_directory(tmp) if hands_over else None
                tune.report(metrics, checkpoint=ckpt)
            else:
                import ray.train

                ckpt = ray.train.Checkpoint.from_directory(tmp) if hands_over else None
                ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if sharded:
                trainer.strategy.barrier("distrnn-ray-report")  # the node's folder stays until it is uploaded
            if hands_over or not sharded:
                shutil.rmtree(tmp, ignore_errors=True)


JOB_TAG = "distrnn.ray_job"


class TagRun(Callback):
    """Tag the job's MLflow run (rank 0, at the start of training: a restored run is known by
    then) so that the driver finds it when the job ends without the workers finalizing it."""

    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = trainer.logger
        if trainer.is_global_zero and isinstance(logger, MLFlowLogger):
            logger.experiment.set_tag(logger.run_id, self.key, self.value)


class SignalsSeen:
    """The signals that reached this process while open, whoever handled them: Ray Train installs
    its own SIGINT handler during ``fit`` (it aborts the run, kills the workers, which never
    finalize their MLflow run, and fit then fails like any failure). The interpreter writes each
    signal's number to a wakeup fd before any handler runs. Main thread only (else sees nothing)."""

    def __enter__(self) -> "SignalsSeen":
        self.seen: set[int] = set()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        try:
            self._previous = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
            try:
                self.seen.update(self._r.recv(4096))
            except BlockingIOError:
                pass
        self._r.close()
        self._w.close()


def _close_job_runs(tracking_uri: str, job: str, status: str) -> list[str]:
    """Mark the job's MLflow runs that its workers left open as ``status``; a run a worker
    finalized as FAILED becomes KILLED when the job was stopped (its workers were killed). A
    stopped job's runs are tagged first: rank 0, still alive while this runs, may finalize its
    run later, when a peer's death fails its step; its logger then reads the tag and says KILLED."""
    import mlflow

    from distrnn.tracking import INTERRUPTED_TAG

    client = mlflow.MlflowClient(tracking_uri)
    closed = []
    for _, run in _job_runs(client, job):
        if run.info.status == "RUNNING" or (status == "KILLED" and run.info.status == "FAILED"):
            if status == "KILLED":
                client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
            client.set_terminated(run.info.run_id, status)
            closed.append(run.info.run_id)
    return closed


def _job_runs(client: Any, job: str) -> list[tuple[Any, Any]]:
    """(experiment, run) of every MLflow run that the workers of job ``job`` logged to."""
    return [(exp, run) for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id], f"tags.`{JOB_TAG}` = '{job}'")]


def _print_job_runs(tracking_uri: str, job: str) -> None:
    """The MLflow run of a finished job and how to open it, as `distrnn fit` ends."""
    import mlflow

    from distrnn.tracking import where_run_is

    try:
        runs = _job_runs(mlflow.MlflowClient(tracking_uri), job)
    except Exception as e:  # the training is done and checkpointed; a store that does not answer only costs this line
        print(f"distrnn: warning: could not look up the job's MLflow run: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return
    for exp, run in runs:
        print(where_run_is(tracking_uri, exp.name, exp.experiment_id, run.info.run_id))


def fit_from_ray_checkpoint(cli: Any, checkpoint: Any, same_run: bool = True) -> None:
    """``trainer.fit`` from a Ray checkpoint when there is one (restart, restore), else from scratch.
    ``same_run``: log into the MLflow run recorded in the checkpoint (a restarted job); False when
    the checkpoint may be another trial's (PBT), whose run is not this one's."""
    from distrnn.checkpoint_files import check_deepspeed_checkpoint, is_deepspeed_checkpoint, load_checkpoint_file
    from distrnn.tracking import continue_run

    if checkpoint is None:
        cli.trainer.fit(cli.model, cli.datamodule)
        return
    with checkpoint.as_directory() as d:
        path = os.path.join(d, CKPT_NAME)
        # A DeepSpeed directory that this run's workers reported to its own Ray storage: checked
        # for every rank's shard, opened as trusted (keep the storage path private: SECURITY.md).
        ckpt = check_deepspeed_checkpoint(path, trusted=True) if is_deepspeed_checkpoint(path) else load_checkpoint_file(path, mmap=True)
        if cli.trainer.is_global_zero:
            print(f"distrnn: resuming from Ray checkpoint {checkpoint.path} at step {ckpt['global_step']} (epoch {ckpt['epoch']})")
        if same_run:  # a job resubmitted with other data settings or workers: as distrnn fit takes it
            cli.check_data("fit")  # this rank's loaders, for the data's layout and batch count
            try:
                changed = cli.check_resume(path, ckpt)
            except ValueError as e:
                raise ConfigError(f"Ray checkpoint {checkpoint.path}: {e}") from None
            if changed:
                raise ConfigError(changed)
            continue_run(cli.trainer.logger, ckpt)
        del ckpt
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=path)


def _strategy(name: str) -> Any:
    from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy

    if name == "ddp":
        # the TBPTT module uses every parameter in every step; no unused-parameter search
        return RayDDPStrategy(find_unused_parameters=False)
    stage = int(name.split("_")[2])
    offload = name.endswith("offload")
    return RayDeepSpeedStrategy(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the distrnn CLI with Ray's strategy, environment and reporting."""
    import ray.train
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from distrnn.cli import DistrnnCLI

    # Ray starts workers in its own folders; relative paths in the config (corpus, checkpoints,
    # a SQLite store) mean what they mean for the driver. With `ray job submit --working-dir`
    # that folder is the job's package, at the same path on every node.
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    trial = config.get("trial")  # a Tune trial of several ranks (distrnn.tune.run_trial_group)
    if trial is None:
        callbacks = [ReportToRay(every_n_steps=config["report_every"]), TagRun(JOB_TAG, config["job"])]
    else:
        callbacks = [ReportToRay(after_validation=True)]
    cli = DistrnnCLI(
        args=config["args"],
        run=False,
        trainer_extra={
            "strategy": _strategy(config["strategy"]),
            "plugins": [RayLightningEnvironment()],
            "callbacks": callbacks,
            "devices": "auto",
            "accelerator": "gpu" if config["use_gpu"] else "cpu",
            "enable_progress_bar": False,
        },
    )
    prepare_trainer(cli.trainer)
    if trial is None:
        fit_from_ray_checkpoint(cli, ray.train.get_checkpoint())
    else:
        from distrnn.tune import join_trial_run

        join_trial_run(cli, trial)
        # the trial's Tune checkpoint (its own, restored, or the one PBT copied from another trial)
        fit_from_ray_checkpoint(cli, ray.train.get_checkpoint() or trial["checkpoint"], same_run=False)


def strategy_error(name: str) -> Optional[str]:
    """Why ``name`` cannot be a Ray run's strategy here, or None."""
    if name not in STRATEGIES:
        return f"strategy: '{name}' is not one of {', '.join(STRATEGIES)}"
    if name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return f"strategy: {name} needs DeepSpeed (pip install 'distrnn[deepspeed]')"
    return None


def check_config(args: list[str], world_size: int = 1, use_gpu: bool = False, device_setting: str = "use_gpu") -> None:
    """Build the model, data and trainer once on the driver and read the data, so that a bad config
    or file fails here with exit code 2 (one line naming the key) before any worker, trial or MLflow
    run exists. Workers on CPUs (``use_gpu`` false) run the layers as this check does, so layers
    that cannot run there (a Triton backend) are refused too, naming ``device_setting``; for GPU
    workers the module's configuration is checked for CUDA (cuDNN dropout under checkpointed
    BPTT), their layers are theirs to judge."""
    from distrnn.cli import DistrnnCLI

    # The logger is parsed (and so checked) with the config, then replaced: a check creates no store.
    cli = DistrnnCLI(args=[*args, "--trainer.logger=false"], run=False,
                     trainer_extra={"accelerator": "cpu", "devices": 1, "strategy": "auto"})
    cli.check_data("fit", world_size)  # the data too, as the workers will read it: not in every worker
    cli.check_layers(device_setting, gpu_workers=use_gpu, training=True)  # each worker group (and each restart) failed inside training


def help_of(cls: type) -> dict[str, str]:
    """Field docs from an ``Args:`` block of ``cls``'s docstring (one per field, litgpt style)."""
    out, key = {}, None
    for line in (cls.__doc__ or "").splitlines():
        s = line.strip()
        if ":" in s and s.split(":")[0].isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            key, text = s.split(":", 1)
            out[key] = text.strip()
        elif key and s:
            out[key] += " " + s
    return out


def parse_args(cls: type, argv: list[str], prog: str) -> tuple[Any, list[str]]:
    """Options of the dataclass ``cls`` (``--num-workers 2``, or ``--num_workers 2`` as distrnn's
    and the sweep's options are spelled); everything else goes to distrnn's CLI."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    docs = help_of(cls)
    for f in fields(cls):
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if f.type in ("bool", bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=docs.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            parser.add_argument(*flags, type=kind, default=default, help=docs.get(f.name))
    ns, rest = parser.parse_known_args(argv)
    return cls(**vars(ns)), rest


@dataclass
class RayTrainArgs:
    """Train one distrnn config on a Ray cluster (Ray Train's TorchTrainer).

    Args:
        num_workers: training processes (ranks); each owns its own streams and hidden state.
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per worker.
        strategy: ddp, or deepspeed_stage_1/2/3 (deepspeed_stage_3_offload: parameters and optimizer on CPU).
        max_failures: how often a failed worker group is restarted from the latest checkpoint.
        report_every: updates between checkpoints reported to Ray storage (mid-epoch).
        storage_path: where Ray keeps checkpoints: a folder shared by all nodes, or s3://, gs:// URIs.
        name: the run's name under storage_path; resubmitting a job with the same name resumes it.
        check_only: check the config and options, then exit (what `make submit-train` does before submitting).
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: str = "ddp"
    max_failures: int = 0
    report_every: int = 100
    storage_path: str = "~/ray_results"
    name: str = "distrnn"
    check_only: bool = False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _fail(message: str) -> None:
    print(f"distrnn: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_store(env: dict[str, str]) -> None:
    """The job's MLflow store, asked on the driver before Ray starts: a tracking server that does
    not answer would fail every worker group (and each of its restarts) inside training."""
    from distrnn.tracking import unusable_store

    why = unusable_store(env["MLFLOW_TRACKING_URI"])
    if why:
        _fail(why)


def keep_a_local_ray_on_loopback() -> None:
    """A Ray that this driver starts itself (no RAY_ADDRESS, not inside a Ray job) listens on
    127.0.0.1 only. On Linux Ray would put its servers on the machine's outward address or every
    interface, without authentication unless RAY_AUTH_MODE says otherwise: anyone on the network
    could run code here. Ray reads the variable when it is first imported: call this before."""
    if not os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(env: dict[str, str]) -> None:
    """Connect to the cluster (RAY_ADDRESS) or start a local one (never another cluster that happens
    to run on this machine). A driver that runs as a Ray job already has the job's runtime env,
    which Ray refuses to merge with another; its tasks inherit the driver's environment variables
    through it."""
    import ray

    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        if "MLFLOW_TRACKING_URI" not in os.environ:
            print(f"distrnn: warning: MLFLOW_TRACKING_URI is not set for this job; runs go to {env['MLFLOW_TRACKING_URI']}"
                  " on this node (pass --runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": ...}}')", file=sys.stderr)
        os.environ.update(env)
        ray.init(ignore_reinit_error=True)
    else:
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", runtime_env={"env_vars": env},
                 ignore_reinit_error=True)


def check_room_for_workers(workers: int, per_worker: dict[str, float],
                           key: Callable[[str], str] = lambda resource: "num_workers",
                           lower: str = "--num-workers or --cpus-per-worker") -> None:
    """Ray Train (and Tune) wait, silently and without end, for workers the cluster has no room
    for (Ctrl-C then needs pressing three times). A Ray this driver started itself never grows:
    refused in one line naming the setting (``key`` of the resource short) and what to ``lower``.
    A cluster may (an autoscaler): a warning, and the wait."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for resource, need in per_worker.items():
        total = sum(n.get(resource, 0.0) for n in nodes)
        largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        if need * workers <= total + 1e-9 and need <= largest + 1e-9:
            continue
        what = (f"{workers} workers x {need:g} {resource} need {need * workers:g} {resource} (each worker's on one node);"
                f" this Ray cluster has {total:g} {resource}" + (f", at most {largest:g} on one node" if len(nodes) > 1 else ""))
        if not os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            _fail(f"{key(resource)}: {what}: lower {lower}, or start a cluster (make cluster-up) and set RAY_ADDRESS")
        print(f"distrnn: warning: {what} now: Ray waits until the cluster has room for them (nodes an autoscaler adds);"
              " meanwhile Ctrl-C three times stops this driver", file=sys.stderr, flush=True)
        return


def storage_location(path: str) -> str:
    """Ray storage as given for a URI (``s3://``, ``gs://``), else the folder expanded and made
    absolute: Ray's workers and trials run in other folders. A folder that cannot be written is
    refused here, before Ray starts (Ray Train found out as it started the run, with a traceback)."""
    if "://" in path:
        return path
    from distrnn.paths import unwritable_folder

    folder = str(Path(path).expanduser().resolve())
    why = unwritable_folder(folder)
    if why:
        _fail(f"storage_path: {why} (Ray's storage would be {folder})")
    return folder


# Ray Train (2.60) turns a worker's print into a log record and, since Ray's worker replaces
# sys.stdout, prints it as well: every line a worker prints reached the driver twice. Off, a
# print goes to the worker's stdout, which Ray forwards once.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ray_trainer(loop_config: dict[str, Any], *, workers: int, resources_per_worker: dict[str, float], name: str,
                storage: str, env: dict[str, str], **run_options: Any) -> Any:
    """The Ray Train run of :func:`train_loop_per_worker` that a job (:func:`main`) and a Tune trial
    of several ranks (:func:`distrnn.tune.run_trial_group`) both start: ``workers`` workers on
    loopback-safe torch groups, each with the driver's tracking settings (``env``).
    ``run_options``: the rest of Ray's ``RunConfig`` (failure, checkpoint, callbacks)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distrnn.raybackend import LoopbackTorchConfig

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=loop_config["use_gpu"],
                                               resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, worker_runtime_env={"env_vars": {**env, **WORKER_ENV}},
                                       **run_options),
    )


def main(argv: Optional[list[str]] = None, on_result: Optional[Callable[[Any], None]] = None) -> Any:
    keep_a_local_ray_on_loopback()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, distrnn_args = parse_args(RayTrainArgs, argv, "jobs/train.py")
    problem = strategy_error(args.strategy)
    if problem:
        _fail(problem)
    if args.num_workers < 1:
        _fail(f"num_workers: must be >= 1, got {args.num_workers}")
    if args.max_failures < 0:
        _fail(f"max_failures: must be >= 0, got {args.max_failures}")
    if args.report_every < 1:
        _fail(f"report_every: must be >= 1, got {args.report_every}")
    if args.cpus_per_worker < 0 or (args.cpus_per_worker == 0 and not args.use_gpu):
        # (Ray's own refusal: "Bundles cannot be an empty dictionary", after the cluster started)
        _fail(f"cpus_per_worker: must be > 0 (or 0 with use_gpu: each worker then reserves a GPU only), got {args.cpus_per_worker}")
    check_config(distrnn_args, args.num_workers, args.use_gpu)
    if args.check_only:
        print("distrnn: config OK")
        return None

    from ray.train import CheckpointConfig, FailureConfig

    storage = storage_location(args.storage_path)
    env = tracking_env()
    check_store(env)
    init_ray(env)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})}
    check_room_for_workers(args.num_workers, resources)
    job = uuid.uuid4().hex
    trainer = ray_trainer(
        {"args": distrnn_args, "strategy": args.strategy, "report_every": args.report_every, "use_gpu": args.use_gpu,
         "cwd": os.getcwd(), "job": job},
        workers=args.num_workers, resources_per_worker=resources, name=args.name, storage=storage, env=env,
        failure_config=FailureConfig(max_failures=args.max_failures), checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    # `ray job stop` sends SIGTERM: end like Ctrl-C (the driver's exit takes the workers with it)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if _main_thread() else None
    try:
        with SignalsSeen() as signals:
            result = trainer.fit()
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt) or bool(signals.seen & {signal.SIGINT, signal.SIGTERM})
        try:
            closed = _close_job_runs(env["MLFLOW_TRACKING_URI"], job, "KILLED" if stopped else "FAILED")
        except Exception as tracking_error:  # the job's own outcome matters more than its run's status
            closed = []
            print(f"distrnn: warning: the job's MLflow run was not closed: {str(tracking_error).splitlines()[0][:300]}",
                  file=sys.stderr)
        if not stopped:
            raise
        print(f"distrnn: Ray Train run '{args.name}' interrupted; MLflow run {', '.join(closed) or '(none yet)'} marked"
              f" KILLED; the same command continues it from its latest checkpoint in {storage}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if signal.SIGTERM in signals.seen else signal.SIGINT))
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    print(f"distrnn: Ray Train run '{args.name}' finished at step {result.metrics.get('step')}; "
          f"latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    _print_job_runs(env["MLFLOW_TRACKING_URI"], job)
    if on_result is not None:
        on_result(result)
    return result
