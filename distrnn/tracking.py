"""MLflow tracking: one run per training job, the whole resolved config as params."""

from __future__ import annotations

import os
import random
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import mlflow
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distrnn.provenance import code_version, environment_tags
from distrnn.runs import STAGE_TAG

# Set on a stopped Ray Train job's run, or an interrupted sweep's parent run, until it is resumed.
INTERRUPTED_TAG = "distrnn.interrupted"


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger with MLflow's own default store.

    The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else MLflow's default (a SQLite file,
    ``mlflow.db``, in the working directory), never Lightning's file store. Checkpoints go to
    ``checkpoint_dir/<experiment id>/<run id>/checkpoints``; the best and last are logged to the
    run as artifacts when training ends. Loggers act on rank 0 only, so a job has one run.
    Metrics are logged asynchronously (``synchronous=False``): a training step only puts them on
    a queue that a background thread sends, the steps of each second in one request. If the
    tracking server stops answering, training goes on: a warning is printed once, the metrics that could not be sent are appended to
    ``checkpoint_dir/unsent-metrics-<run id>.jsonl`` (one JSON line per logging step; nothing is
    dropped), the server is tried again every ``retry_s`` seconds, and when the job ends the file
    is reported. A request gives up after ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default here 30 s) and
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default here 2) instead of MLflow's minutes.

    With ``log_plots`` (default), finalizing a run that ended normally draws its curves from the
    metrics MLflow holds, as PNG artifacts ``plots/{loss,bpb,bpt,accuracy}.png`` (training and validation overlaid,
    against the update step), so a run's curves are in its artifacts without opening the UI.

    Without ``run_name`` a run gets a fresh name in MLflow's style ("bright-owl-42"), different
    for each run of the same config and seed.

    Every ``system_metrics_s`` seconds the machine of rank 0 is sampled by MLflow's own system
    metric monitors and logged at the latest training step as ``system/...`` (the MLflow UI's
    system metrics tab; in a job on several nodes every node's, as ``system/node<i>/...``:
    :class:`SystemMetricsOfEveryNode`): CPU and memory use, disk, network, and with ``nvidia-ml-py`` installed
    (``distrnn[gpu]``) each GPU's utilization, memory and power. ``0``: none.
    """

    def __init__(
        self,
        experiment_name: str = "distrnn",
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        checkpoint_dir: str = "checkpoints",
        log_model: bool = True,
        synchronous: bool = False,
        retry_s: float = 30.0,
        log_plots: bool = True,
        system_metrics_s: float = 10.0,
    ) -> None:
        for key, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                           ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
            os.environ.setdefault(key, value)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        # the setting a user changes to point elsewhere, for messages about the store
        self.uri_key = "trainer.logger.init_args.tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI"
        self._default_name = None
        if run_name is None:
            run_name = self._default_name = unseeded_run_name()
        unwritable = _sqlite_folder_unwritable(uri)
        if unwritable:
            raise ValueError(f"{self.uri_key}: the MLflow store {uri} cannot be used: {unwritable}")
        # Every rank builds a client, and a client creates a new SQLite store's tables: ranks (or
        # Tune trials) starting together on a fresh file would race ("table already exists").
        try:
            with _store_lock(uri):
                super().__init__(
                    experiment_name=experiment_name,
                    run_name=run_name,
                    tracking_uri=uri,
                    tags=tags,
                    save_dir=checkpoint_dir,
                    log_model=log_model,
                    synchronous=True,  # each send waits for its answer; the waiting is in _Sender's thread
                    artifact_location=artifact_location(uri),
                )
        except OSError as e:  # a SQLite file whose folder cannot be made (after the check above: a race)
            raise ValueError(f"{self.uri_key}: the MLflow store {uri} cannot be used: {_store_error(e)}") from None
        self._checkpoint_dir = checkpoint_dir
        self._async, self._retry_s, self._log_plots = not synchronous, retry_s, log_plots
        if system_metrics_s < 0:
            raise ValueError(f"trainer.logger.init_args.system_metrics_s: must be >= 0, got {system_metrics_s}")
        self._system_metrics_s = system_metrics_s
        self._sender: Optional[_Sender] = None
        self._sampler: Optional[_SystemSampler] = None
        self._system_prefix = "system/"  # system/node0/ in a job on several nodes (SystemMetricsOfEveryNode)
        self._last_step: Optional[int] = None
        self.sender_stats: dict[str, float] = {}

    @property
    def save_dir(self) -> Optional[str]:
        # Lightning's ModelCheckpoint puts files under save_dir/<experiment id>/<run id>/checkpoints.
        return self._checkpoint_dir

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self._last_step = step  # on every rank: the step other nodes log their system metrics at
        if rank_zero_only.rank != 0:
            return
        if self._sampler is None and self._system_metrics_s > 0:
            _ = self.experiment  # create the run here, in the main thread
            try:
                self._sampler = _SystemSampler(self._put, lambda: self._last_step, self._system_metrics_s,
                                               self._system_prefix)
            except Exception as e:  # e.g. psutil missing: the run goes on without them
                self._system_metrics_s = 0
                print(f"distrnn: warning: no system metrics: {str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
        self._put(metrics, step)

    def _put(self, metrics: dict[str, float], step: Optional[int]) -> None:
        if not self._async:
            return MLFlowLogger.log_metrics(self, metrics, step)
        if self._sender is None:
            _ = self.experiment  # create the run here, in the main thread
            self._sender = _Sender(self)
        self._sender.put(dict(metrics), step)

    @rank_zero_only
    def _stopped_from_outside(self) -> bool:
        """The run, or its parent, carries INTERRUPTED_TAG: a driver that was stopped (a Ray Train
        job, a sweep) set it before its workers or trials went down. Such a run ended because it
        was stopped, although its training saw an error (a Tune trial's stopped session, a peer
        rank that was killed), at any moment around the driver's own closing of its runs."""
        if not self._initialized:  # no run in this process (a rank other than 0)
            return False
        ids = [i for i in (self._run_id, (self.tags or {}).get("mlflow.parentRunId")) if i]
        try:
            return any(self.experiment.get_run(i).data.tags.get(INTERRUPTED_TAG) == "true" for i in ids)
        except Exception:
            return False

    def finalize(self, status: str = "success") -> None:
        # Lightning says "failed" for every exception it handles, Ctrl-C and preemption included; it
        # calls this while handling it. A job stopped from outside is KILLED in MLflow's terms, as a
        # stopped sweep or trial is, not FAILED. Ray Tune stops a trial's training thread with
        # sys.exit(0) inside its report call (the scheduler's decision, or its max_t reached).
        exc = sys.exc_info()[1]
        if status == "failed" and (isinstance(exc, (KeyboardInterrupt, SIGTERMException))
                                   or isinstance(exc, SystemExit) and exc.code in (0, None)):
            status = "KILLED"
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.close()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
            self.sender_stats = {"cpu_s": sender.cpu_s, "requests": sender.requests, "unsent": sender.written}
            if sender.unreachable():
                print(f"distrnn: warning: the MLflow run {self.run_id} was not finalized (tracking server unreachable);"
                      f" {sender.written} logging steps are in {sender.path}; checkpoints are in {self._checkpoint_dir}",
                      file=sys.stderr, flush=True)
                return
        # Only a run that ended normally is plotted: a failed or interrupted one (a Tune trial being
        # stopped, a killed job) may be torn down while drawing.
        if self._log_plots and self._initialized and status in ("success", "finished", "FINISHED"):
            try:
                log_curve_plots(self.experiment, self.run_id)
            except Exception as e:
                print(f"distrnn: warning: plotting the curves of run {self.run_id} failed: {str(e).splitlines()[0][:300]}",
                      file=sys.stderr, flush=True)
        try:
            if status == "failed" and self._stopped_from_outside():  # asked only of a server that answers
                status = "KILLED"
            super().finalize(status)
        except Exception as e:
            print(f"distrnn: warning: finalizing the MLflow run {self.run_id} failed: {str(e).splitlines()[0][:300]};"
                  f" checkpoints are in {self._checkpoint_dir}", file=sys.stderr, flush=True)


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str, cwd: Optional[str] = None) -> Optional[str]:
    """How to open a run in the MLflow UI: its page on a tracking server, else the command that
    serves the UI over its store (``make mlflow-ui`` where that is the store it serves); None for
    a store this cannot tell (Databricks, a plugin's scheme)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0] if "://" in tracking_uri else "file"
    if scheme not in ("sqlite", "postgresql", "mysql", "mssql", "file"):
        return None
    cwd = cwd or os.getcwd()
    default = f"sqlite:///{os.path.join(cwd, 'mlflow.db')}"
    if tracking_uri in (default, "sqlite:///mlflow.db") and _has_mlflow_ui_target(os.path.join(cwd, "Makefile")):
        serve = "make mlflow-ui"
    else:
        serve = f"mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri {shlex.quote(tracking_uri)}"
    return f"{serve}   (then open http://127.0.0.1:5000/{page})"


def _has_mlflow_ui_target(makefile: str) -> bool:
    try:
        with open(makefile, encoding="utf-8", errors="replace") as f:
            return any(line.startswith("mlflow-ui:") for line in f)
    except OSError:
        return False


def where_run_is(tracking_uri: str, experiment: str, experiment_id: str, run_id: str) -> str:
    """The lines that end a command: the run, and how to open it."""
    hint = ui_hint(tracking_uri, experiment_id, run_id)
    return f"MLflow run {run_id} in experiment '{experiment}' at {tracking_uri}" + (f"\n  look at it with:  {hint}" if hint else "")


def unseeded_run_name() -> str:
    """A name in MLflow's style ("bright-owl-42") drawn from fresh entropy.

    MLflow draws a run's name from Python's global ``random``, which ``seed_everything`` has just
    seeded: every run of a config got the same name, and the draw moved the seeded stream. This
    draws from the OS instead and leaves the global state as it was."""
    state = random.getstate()
    try:
        random.seed()
        from mlflow.utils.name_utils import _generate_random_name  # private: the fallback below

        return _generate_random_name()
    except ImportError:
        return f"run-{os.urandom(4).hex()}"
    finally:
        random.setstate(state)


PLOTTED = ("loss", "bpb", "bpt", "accuracy")


def log_curve_plots(client: Any, run_id: str, stages: tuple[str, ...] = ("train", "val")) -> list[str]:
    """PNGs ``plots/{metric}.png`` of the run's ``{stage}/{metric}`` histories; returns their paths."""
    run = client.get_run(run_id)
    written = []
    for metric in PLOTTED:
        keys = [f"{stage}/{metric}" for stage in stages if f"{stage}/{metric}" in run.data.metrics]
        if not keys:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o" if len(hist) < 30 else None, label=key)
        ax.set_xlabel("update")
        ax.set_ylabel(metric)
        ax.set_title(f"{run.info.run_name or run_id}: {metric}")
        ax.legend()
        fig.tight_layout()
        path = f"plots/{metric}.png"
        client.log_figure(run_id, fig, path)
        plt.close(fig)
        written.append(path)
    return written


class _Sender:
    """Sends logged metrics from a background thread; what cannot be sent goes to a local JSONL file.

    Steps logged within ``batch_s`` of each other go in one ``log_batch`` request: with a SQLite
    store each request is a transaction whose Python side holds the GIL for milliseconds, and one
    per step cost the default experiment about 20% of its speed on 2 CPU cores (one per second,
    under 2%: ``benchmarks/bench_logging.py``).
    """

    MAX_METRICS = 1000  # MLflow's limit for one log_batch

    def __init__(self, logger: MLflowLogger, batch_s: float = 1.0) -> None:
        import queue
        import threading

        self.logger, self.batch_s = logger, batch_s
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.path = Path(logger._checkpoint_dir) / f"unsent-metrics-{logger.run_id}.jsonl"
        self.written = 0
        self.requests = 0
        self.cpu_s = 0.0  # CPU time of the sending thread (what logging takes from training)
        self.failed_at: Optional[float] = None
        self.thread = threading.Thread(target=self._run, name="distrnn-mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, metrics: dict[str, float], step: Optional[int]) -> None:
        self.queue.put((metrics, step, int(time.time() * 1000)))

    def unreachable(self) -> bool:
        return self.failed_at is not None

    def _next_batch(self) -> tuple[list[Any], bool]:
        """Items logged within batch_s of the first (blocking for the first); True at the end."""
        import queue

        first = self.queue.get()
        if first is None:
            return [], True
        items, n = [first], len(first[0])
        deadline = time.monotonic() + self.batch_s
        while n < self.MAX_METRICS:
            try:
                item = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
            n += len(item[0])
        return items, False

    def _run(self) -> None:
        while True:
            items, done = self._next_batch()
            if items:
                self._deliver(items)
                self.cpu_s = time.thread_time()
            if done:
                return

    def _deliver(self, items: list[Any]) -> None:
        if self.failed_at is not None and time.time() - self.failed_at < self.logger._retry_s:
            self._write(items)
            return
        try:
            self._send(items)
            if self.failed_at is not None:
                print(f"distrnn: MLflow answers again; logging to run {self.logger.run_id} resumed"
                      f" ({self.written} earlier logging steps are in {self.path})", file=sys.stderr, flush=True)
            self.failed_at = None
        except Exception as e:
            if self.failed_at is None:
                print(f"distrnn: warning: MLflow at {self.logger._tracking_uri} did not answer"
                      f" ({str(e).splitlines()[0][:200]}); training goes on, metrics are written to {self.path}",
                      file=sys.stderr, flush=True)
            self.failed_at = time.time()
            self._write(items)

    def _send(self, items: list[Any]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key=k, value=float(v), timestamp=ts, step=step or 0)
                   for m, step, ts in items for k, v in m.items() if not isinstance(v, str)]
        logger = self.logger
        for i in range(0, len(metrics), self.MAX_METRICS):
            logger.experiment.log_batch(run_id=logger.run_id, metrics=metrics[i : i + self.MAX_METRICS],
                                        **logger._log_batch_kwargs)
            self.requests += 1

    def _write(self, items: list[Any]) -> None:
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for metrics, step, ts in items:
                f.write(json.dumps({"run_id": self.logger.run_id, "step": step, "time": ts / 1000,
                                    "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")
        self.written += len(items)

    def close(self, timeout: float = 120.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


class _SystemSampler:
    """Samples MLflow's system metric monitors (CPU, memory, disk, network; an NVIDIA or AMD GPU
    monitor when its library and a device are there) every ``interval_s`` seconds in a thread and
    hands ``{"system/<name>": value}`` to ``put`` at the step ``step()`` gives. A monitor that
    fails stops the sampling, never the training."""

    def __init__(self, put: Callable[[dict[str, float], Optional[int]], None], step: Callable[[], Optional[int]],
                 interval_s: float, prefix: str = "system/") -> None:
        import threading

        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        for gpu in (GPUMonitor, ROCMMonitor):
            try:
                self.monitors.append(gpu())
                break
            except Exception:  # no library, or no device
                pass
        self.put, self.step, self.interval_s, self.prefix = put, step, interval_s, prefix
        self.sample()  # the CPU percentage counts from the previous call: start the clock
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distrnn-system-metrics", daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.put(self.sample(), self.step())
            except Exception as e:
                print(f"distrnn: warning: system metrics stopped: {str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
                return

    def close(self) -> None:
        """Stops the thread, then logs one last sample (a run shorter than the interval gets one)."""
        self._stop.set()
        self.thread.join(10)
        if not self.thread.is_alive():
            try:
                self.put(self.sample(), self.step())
            except Exception:
                pass


def artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns`` beside the
    database file. MLflow's default is ``mlruns`` in the working directory of the process that
    creates the experiment: for a job submitted to Ray that is the job's unpacked package in
    Ray's temporary folder, which goes away with the cluster. None for any other store (a
    tracking server has its own artifact root)."""
    if not uri.startswith("sqlite:///") or uri in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns")


def _store_lock(uri: str) -> Any:
    import contextlib

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(uri[len("sqlite:///"):]).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=120)


def _sqlite_folder_unwritable(uri: str) -> Optional[str]:
    """Why the folder of a ``sqlite:///`` store cannot take the store's files (a file where a
    folder must be, a folder that cannot be written), or None. The store's file lock took a lock
    file it could not create for one another process held and waited its 120 s; MLflow's SQLite
    store retries a file it cannot open for minutes."""
    if not uri.startswith("sqlite:///"):
        return None
    from distrnn.paths import unwritable_folder

    return unwritable_folder(str(Path(uri[len("sqlite:///"):]).parent))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


DIFF_LIMIT = 5_000_000  # characters of uncommitted changes logged as an artifact, at most


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the resolved config to the job's MLflow run: every key as a param (and the network's
    parameter count as ``model.num_params``), the YAML as
    ``config.yaml``, the code that trains (:func:`code_version`: version, git commit, branch,
    uncommitted changes as tags and ``code.diff``), the libraries and device it trains with
    (:func:`environment_tags`), and the data as MLflow datasets (:meth:`_log_datasets`).
    Runs after instantiation, so a bad config never creates a run."""

    @rank_zero_only
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        text = self.parser.dump(self.config, skip_none=False)
        import yaml

        params = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten(yaml.safe_load(text)).items()}
        params.pop("config", None)
        # the size of the network, for comparing runs (a sweep over hidden_size, layers, recurrence)
        params["model.num_params"] = str(sum(p.numel() for p in pl_module.parameters()))
        # A resumed job continues its run; MLflow params are immutable, so values changed for the
        # resume (max_steps, ckpt_path) are recorded as tags instead.
        run = logger.experiment.get_run(logger.run_id)
        logged = run.data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        logger.log_hyperparams({k: v for k, v in params.items() if k not in logged})
        for k, v in changed.items():
            logger.experiment.set_tag(logger.run_id, f"resumed.{k}"[:250], v[:5000])
        suffix = "" if not logged else time.strftime("-resumed-%Y%m%d-%H%M%S")
        logger.experiment.log_text(logger.run_id, text, f"config{suffix}.yaml")
        try:
            device = str(trainer.strategy.root_device)
        except (AttributeError, RuntimeError):
            device = None
        self._log_code(logger, resumed=bool(logged), suffix=suffix, before=run.data.tags, env=environment_tags(device))
        self._log_datasets(logger, trainer.datamodule, stage)

    # the splits a stage reads, and MLflow's name for their role
    CONTEXTS = {"fit": (("train", "training"), ("val", "validation")), "validate": (("val", "validation"),)}

    @classmethod
    def _log_datasets(cls, logger: MLFlowLogger, datamodule: Any, stage: str) -> None:
        """The run's inputs in MLflow's dataset tracking (the "Datasets" column and tab of the UI):
        per split its name, source, a digest of its content and a profile (tokens, documents,
        samples). Runs over the same data show the same digest. MLflow keeps an input once, so a
        resumed run adds nothing unless its data changed."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        from distrnn.data.base import content_digest

        sources = datamodule.datasets() if hasattr(datamodule, "datasets") else {}
        inputs = []
        for split, context in cls.CONTEXTS.get(stage, ()):
            d = sources.get(split)
            if d is None:
                continue
            local = d.source_type == "local"
            source = json.dumps({"uri": str(Path(d.uri).resolve())} if local else {"tags": {"mlflow.source.name": d.uri}})
            dataset = Dataset(d.name, content_digest(d.content), d.source_type, source, profile=json.dumps(d.profile))
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
        if not inputs:
            return
        try:
            logger.experiment.log_inputs(logger.run_id, inputs)
        except mlflow.exceptions.MlflowException as e:  # a tracking server from before MLflow 2.4 has no inputs API
            print(f"distrnn: warning: the MLflow store did not take the run's datasets ({str(e).splitlines()[0][:200]});"
                  " training goes on without them", file=sys.stderr, flush=True)

    @staticmethod
    def _log_code(logger: MLFlowLogger, resumed: bool, suffix: str, before: dict[str, str],
                  env: Optional[dict[str, str]] = None) -> None:
        # a resume may run other code (or under other libraries) than the start: its version
        # beside the first, as resumed.<tag>
        from mlflow.entities import RunTag

        tags, diff = code_version()
        tags = {**tags, **(env or {})}
        before = before if resumed else {}
        new = {k if k not in before else f"resumed.{k}": v for k, v in tags.items() if before.get(k) != v}
        logger.experiment.log_batch(logger.run_id, tags=[RunTag(k, v) for k, v in new.items()])
        if diff is not None:
            if len(diff) > DIFF_LIMIT:
                diff = diff[:DIFF_LIMIT] + f"\n[distrnn: cut at {DIFF_LIMIT} of {len(diff)} characters]\n"
            logger.experiment.log_text(logger.run_id, diff, f"code{suffix}.diff")


RUN_ID_KEY = "mlflow_run_id"


class MLflowRunInCheckpoint(Callback):
    """Writes the MLflow run id into every checkpoint, so that a job resumed from one logs into
    the same run (one run per training job, however often it was interrupted)."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if isinstance(trainer.logger, MLFlowLogger) and trainer.logger.run_id:
            checkpoint[RUN_ID_KEY] = trainer.logger.run_id


class SystemMetricsOfEveryNode(Callback):
    """In a training job on several nodes, the system metrics of every node, each from its first
    local rank, logged into the job's one run as ``system/node<i>/...`` (rank 0's logger samples
    node 0 under that name too); MLflow's UI shows them per node in the system metrics tab.

    At setup the ranks agree on the number of nodes and rank 0 hands out its run id (two
    collectives, once); the other nodes log through their own MLflow client, from a thread, at
    their current training step. A node whose sampling or logging fails warns and stops sampling;
    the training goes on. A job on one node is unchanged (rank 0's machine as ``system/...``)."""

    def __init__(self) -> None:
        self._sampler: Optional[_SystemSampler] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import torch

        logger = trainer.logger
        if stage != "fit" or trainer.world_size == 1 or not isinstance(logger, MLflowLogger) or logger._system_metrics_s <= 0:
            return
        node = trainer.strategy.cluster_environment.node_rank()
        nodes = 1 + int(trainer.strategy.reduce(torch.tensor(float(node), device=trainer.strategy.root_device), reduce_op="max"))
        if nodes == 1:
            return
        run_id = trainer.strategy.broadcast(logger.run_id if trainer.is_global_zero else None)
        if trainer.is_global_zero:
            logger._system_prefix = "system/node0/"
        elif trainer.local_rank == 0:
            from mlflow.entities import Metric

            client = logger._mlflow_client

            def put(metrics: dict[str, float], step: Optional[int]) -> None:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in metrics.items()], synchronous=True)

            try:
                self._sampler = _SystemSampler(put, lambda: logger._last_step, logger._system_metrics_s,
                                               f"system/node{node}/")
            except Exception as e:
                print(f"distrnn: warning: no system metrics of node {node}: {str(e).splitlines()[0][:200]}",
                      file=sys.stderr, flush=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.close()




def store_unreachable(logger: Any) -> Optional[str]:
    """Why the MLflow store of ``logger`` (one of distrnn's) cannot be used, naming the setting
    that points at it, or None. Lightning asks the store first inside fit (a traceback, after a
    request's retries)."""
    if not isinstance(logger, MLflowLogger):
        return None
    return unusable_store(logger._tracking_uri, logger.uri_key, logger._mlflow_client)


def unusable_store(uri: str, key: str = "MLFLOW_TRACKING_URI", client: Any = None) -> Optional[str]:
    """Why the MLflow store ``uri`` cannot be used through ``client`` (default: a new one) (a
    server that does not answer or refuses the credentials, a SQLite file in a folder that cannot be
    made or written), as one line naming ``key``, or None. A read: it creates nothing on a server."""
    unwritable = _sqlite_folder_unwritable(uri)
    if unwritable:
        return f"{key}: the MLflow store {uri} cannot be used: {unwritable}"
    try:
        (client or mlflow.MlflowClient(uri)).search_experiments(max_results=1)
    except Exception as e:
        return f"{key}: the MLflow store {uri} cannot be used: {_store_error(e)}"
    return None


def _store_error(e: Exception) -> str:
    """An OS error (connection refused, a missing folder: with its path), else an HTTP status,
    else the first line: MLflow's messages run to a paragraph."""
    text = str(e).strip()
    reason = re.search(r"\[Errno -?\d+\] ([^'\")\]:]+)(?:: '([^']*)')?", text)
    if reason:
        return reason.group(1).strip() + (f": {reason.group(2)}" if reason.group(2) else "")
    status = re.search(r"\b(401|403|404|5\d\d)\b[^.\n]*", text)
    return status.group(0).strip() if status else (text.splitlines() or [type(e).__name__])[0][:300]


def evaluation_run(logger: Any, stage: str, checkpoint: Optional[dict[str, Any]], ckpt_path: Optional[str]) -> Optional[str]:
    """Name and tag the run that ``validate``, ``test`` or ``predict`` opens, before it is created:
    tagged ``distrnn.stage``, and when the checkpoint names a training run of this store, nested
    under it (``mlflow.parentRunId``) as ``<that run's name>-<stage>``, so that evaluations sit
    with the run they evaluate instead of among the training runs. Returns the parent's id."""
    if not isinstance(logger, MLFlowLogger) or logger._initialized or logger._run_id:
        return None
    tags = {**(logger.tags or {}), STAGE_TAG: stage}
    if ckpt_path:
        tags["distrnn.checkpoint"] = str(ckpt_path)[:5000]
    parent = (checkpoint or {}).get(RUN_ID_KEY)
    try:
        name = logger._mlflow_client.get_run(parent).info.run_name if parent else None
    except Exception:  # a checkpoint from another store
        parent = name = None
    if parent:
        tags["mlflow.parentRunId"] = parent
        if logger._run_name is None or logger._run_name == getattr(logger, "_default_name", None):
            logger._run_name = f"{name or parent[:8]}-{stage}"
    logger.tags = tags
    return parent


def continue_run(logger: Any, checkpoint: dict[str, Any]) -> Optional[str]:
    """Point an MLflow logger that has not started a run at the run recorded in ``checkpoint``."""
    run_id = checkpoint.get(RUN_ID_KEY)
    if not run_id or not isinstance(logger, MLFlowLogger) or logger._initialized or logger._run_id:
        return None
    try:
        logger._mlflow_client.get_run(run_id)
    except Exception:  # a checkpoint from another tracking store: start a new run
        return None
    logger._run_id = run_id
    try:  # resumed: from here on a failure is a failure again
        if INTERRUPTED_TAG in logger._mlflow_client.get_run(run_id).data.tags:
            logger._mlflow_client.delete_tag(run_id, INTERRUPTED_TAG)
    except Exception:
        pass
    return run_id
