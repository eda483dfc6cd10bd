"""``distrnn fit|validate|test|predict --config X.yaml`` (LightningCLI) and ``distrnn generate``.

Bad input ends with one line on stderr naming the key or the file, and exit code 2, before any
MLflow run or checkpoint is created.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from types import SimpleNamespace
from typing import Any, Iterator, NoReturn, Optional

from jsonargparse import ArgumentParser, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.plugins.io import CheckpointIO

from distrnn.checkpoint import CHECKPOINT_DEFAULTS, AtomicCheckpointIO, Checkpoint, CheckpointOnSigterm, deepspeed_strategy
from distrnn.checkpoint_files import (
    TRUST_FLAG,
    CheckpointError,
    check_deepspeed_checkpoint,
    is_deepspeed_checkpoint,
    load_checkpoint_file,
)
from distrnn.commands import OWN_COMMANDS, fail, run_own_command
from distrnn.config import ConfigError
from distrnn.data import import_all as import_data_modules
from distrnn.data.base import RecurrentDataModule
from distrnn.data.download import DownloadError
from distrnn.data.loaders import layout_change
from distrnn.engine import TBPTTModule, check_carried_state, needs_reshard, reshard_checkpoint
from distrnn.denormals import denormals_choice, flush_denormals
from distrnn.host_memory import keep_freed_memory_on_cpu, malloc_choice
from distrnn.paths import unwritable_file, unwritable_folder
from distrnn.predict import WritePredictions
from distrnn.rendezvous import host_rendezvous_on_loopback
from distrnn.tracking import (
    LogConfigToMLflow,
    MLflowRunInCheckpoint,
    SystemMetricsOfEveryNode,
    continue_run,
    evaluation_run,
    store_unreachable,
    where_run_is,
)

# distrnn pulls its batches in training_step (dataloader_iter) on purpose: no prefetch, so the
# saved read position is exact. Lightning warns about that flavour on every run.
warnings.filterwarnings("ignore", message=".*dataloader_iter.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# Ray jobs and Tune trials pass their own args while sys.argv holds the driver's options.
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
# The TBPTT module checkpoints the state after each update, with the loader position that matches it.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
# Lightning 2.6 prints a tip for its hosted logger in every run that does not use it; distrnn's runs
# go to MLflow.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in str(record.msg))
# distrnn's loaders are not torch DataLoaders; the prediction writer does not use batch indices.
warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")


# `--data ByteCorpusDataModule` and `--data.help`: jsonargparse offers the subclasses imported
import_data_modules()

_KEY_LINE = re.compile(r"((?:model|data|trainer|checkpoint)\.[\w.]+: .*|MLFLOW_TRACKING_URI: .*)")


_UNION_ITEM = re.compile(r"^  - (.*)$")  # one subtype's error in jsonargparse's union message
_JSONARGPARSE_OWN = ("Not a valid subclass", "Expected a", "Does not validate", "Problem with given class_path")


def _key_line(message: str) -> str:
    """jsonargparse wraps an error raised while instantiating in lines about union subtypes;
    the line that names the key is the one a user needs. Where none names a key (a class of
    another library, such as a callback, refusing its arguments), the class and its own error:
    the union's first line ("Does not validate against any of the Union subtypes") says nothing."""
    lines = message.splitlines()
    for line in lines:
        m = _KEY_LINE.search(line)
        if m:
            return m.group(1).strip()
    causes = [m.group(1).strip() for m in map(_UNION_ITEM.match, lines) if m]
    cause = next((c for c in causes if not c.startswith(_JSONARGPARSE_OWN)), None)
    if cause:
        classes = list(dict.fromkeys(re.findall(r"class_path='([\w.]+)'", message)))  # the refused one among them
        return f"{classes[0] if len(classes) == 1 else 'one of ' + ', '.join(classes)}: {cause}" if classes else cause
    first = message.strip().splitlines()[0] if message.strip() else "invalid configuration"
    # Lightning's Trainer names its own argument (`max_steps` must be ..., invalid value -1 for
    # limit_val_batches, `Timer(duration='x')` ...): the key a user sets is trainer.<argument>
    m = _TRAINER_ARGUMENT.search(first)
    name = m and ("max_time" if m.group(3) else m.group(1) or m.group(2))
    return f"trainer.{name}: {first}" if name in _trainer_arguments() else first


# `max_steps` must be ..., invalid value -1 for limit_val_batches, ..., `Timer(duration='x')` (max_time)
_TRAINER_ARGUMENT = re.compile(r"^`(\w+)` must be|invalid value \S+ for (\w+),|^`(Timer)\(duration=")


@functools.lru_cache(maxsize=1)
def _trainer_arguments() -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(Trainer.__init__).parameters)


def _check_devices(trainer_cfg: dict[str, Any]) -> None:
    """Devices that do not exist, refused before anything starts with the key named (Lightning's
    own messages name neither the key nor, for a missing GPU, what to set). Lightning starts any
    number of CPU processes it is asked for; more than there are cores is a mistake too (each
    rank would fight for a core)."""
    devices, accelerator = trainer_cfg.get("devices"), str(trainer_cfg.get("accelerator") or "auto")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else None)
    cuda = _cuda_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        fail(f"trainer.accelerator: {accelerator}, but no CUDA device is visible on this machine;"
             " set trainer.accelerator to cpu or auto")
    if accelerator == "cpu" or (accelerator == "auto" and not cuda):
        cores = os.cpu_count() or 1
        if n is not None and n > cores:
            fail(f"trainer.devices: {n} CPU processes asked for, this machine has {cores} cores")
    elif accelerator in ("gpu", "cuda", "auto") and n is not None:
        import torch

        count = torch.cuda.device_count()
        if n > count:
            fail(f"trainer.devices: {n} GPUs asked for, this machine has {count}")


def _check_validation_schedule(trainer_cfg: dict[str, Any]) -> None:
    """Values Lightning accepts and then divides by, deep inside fit (ZeroDivisionError)."""
    interval, every = trainer_cfg.get("val_check_interval"), trainer_cfg.get("check_val_every_n_epoch")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval <= 0:
        fail(f"trainer.val_check_interval: {interval} batches; validate every N >= 1 training batches, or give a"
             " fraction of an epoch (0.25), or set trainer.limit_val_batches: 0 to skip validation")
    if every is not None and every < 1:
        fail(f"trainer.check_val_every_n_epoch: must be >= 1 or null (count val_check_interval across epochs), got {every}")


def _check_strategy(trainer_cfg: dict[str, Any]) -> None:
    """A strategy name Lightning does not know, refused naming the key and the names that train a
    distrnn module (Lightning's message named neither)."""
    strategy = trainer_cfg.get("strategy")
    if not isinstance(strategy, str) or strategy == "auto":
        return
    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry.available_strategies():
        fail(f"trainer.strategy: unknown strategy {strategy!r}; use auto, ddp, deepspeed_stage_1, deepspeed_stage_2,"
             " deepspeed_stage_3, deepspeed_stage_3_offload or another name in Lightning's StrategyRegistry")


def _check_manual_optimization(trainer_cfg: dict[str, Any]) -> None:
    """Trainer options that Lightning refuses for a manually optimized module (the TBPTT engine),
    with a traceback from inside fit: refused here, with what to set instead."""
    if trainer_cfg.get("gradient_clip_val") is not None:
        fail("trainer.gradient_clip_val: distrnn clips in its own update; set model.optimizer.clip_norm instead")
    if (trainer_cfg.get("accumulate_grad_batches") or 1) != 1:
        fail("trainer.accumulate_grad_batches: not supported: each batch continues the streams of the one before"
             " (one update per TBPTT chunk); for more sequences per update raise data.batch_size or add ranks, and"
             " set model.tbptt.micro_batch_size to pass them through in groups that fit in memory")


def _as_list(v: Any) -> list[Any]:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


DESCRIPTION = (
    "Train recurrent networks on long sequences (truncated BPTT on Lightning, tracked in MLflow):"
    " fit, validate, test, predict below. distrnn's own commands, each with --help: "
    + ", ".join(f"{name} ({what})" for name, (_, _, what) in OWN_COMMANDS.items()) + "."
)


# (`--optimizer X`, or an optimizer: key in a config file)
_LIGHTNING_OPTIMIZER_KEY = re.compile(r"(unrecognized arguments:.*--|does not accept option ')(optimizer|lr_scheduler)\b")


class _Parser(LightningArgumentParser):
    """Bad input: one line naming the key, exit code 2 (not argparse's usage block)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True):  # jsonargparse tries alternatives internally
            super().error(message, ex)
        if _LIGHTNING_OPTIMIZER_KEY.search(str(message)):
            fail("optimizer, lr_scheduler: LightningCLI's keys are off in distrnn; the optimizer and its schedule are"
                 " model.optimizer (name: adamw|adam|sgd, lr, weight_decay, schedule: constant|cosine, warmup_updates)")
        lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
        keys = [ln for ln in lines if ln.startswith("Parser key") or "not accepted" in ln or "Expected" in ln]
        fail(" ".join(keys[:3]) if keys else " ".join(lines[:2]))


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar, counting from where a resumed epoch stands. Resuming mid-epoch, Lightning
    skips ``on_train_epoch_start`` and starts ``batch_idx`` from 0 again, so its bar said
    "Training: 0/?" for the rest of that epoch; this one goes on from "Epoch 2: 836/1000"."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)
            bar, done = self.train_progress_bar, trainer.fit_loop.epoch_loop.batch_progress.current.processed
            bar.n = bar.initial = done  # tqdm's rate counts from `initial`: this run's batches only
            bar.refresh()

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of this epoch, this one included
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done - 1)


def _weights_misfit(model: Any, checkpoint: dict[str, Any]) -> Optional[str]:
    """Why ``checkpoint``'s weights do not fit ``model`` (another architecture), naming the model
    settings that differ, or None. A DeepSpeed directory's client state holds no ``state_dict``."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        return None
    mine = model.state_dict()
    odd = sorted(set(saved) ^ set(mine)) or [k for k in mine if tuple(mine[k].shape) != tuple(saved[k].shape)]
    if not odd:
        return None
    from distrnn.tracking import flatten

    before, now = flatten(checkpoint.get("hyper_parameters") or {}), flatten(dict(model.hparams))
    changed = [f"model.{k} {before[k]} -> {now[k]}" for k in sorted(before) if k in now and before[k] != now[k]]
    where = "differs" if odd[0] in saved and odd[0] in mine else "only in the checkpoint" if odd[0] in saved else "not in the checkpoint"
    return (f"its weights do not fit this model ({odd[0]} {where})"
            + (f"; changed: {', '.join(changed[:4])}" if changed else "")
            + "; a resumed run keeps its model: give the checkpoint's model settings, or start a new run")


class DistrnnCLI(LightningCLI):
    """The ``distrnn`` command. Ray workers and Tune trials build it with ``run=False`` and the same
    YAML, adding what their environment needs through ``trainer_extra`` (strategy, plugins,
    callbacks), so a config trains the same way on a laptop and on a cluster."""

    def __init__(self, args: Optional[list[str]] = None, trainer_extra: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.trainer_extra = dict(trainer_extra or {})
        try:
            malloc_choice()  # before anything is read or written
            denormals_choice()
        except ValueError as e:
            fail(str(e))
        flush_denormals()  # before PyTorch starts its CPU threads, which take the setting with them
        super().__init__(
            TBPTTModule,
            RecurrentDataModule,
            subclass_mode_data=True,
            parser_class=_Parser,
            save_config_callback=LogConfigToMLflow,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"default_env": False, "description": DESCRIPTION},
            # the optimizer and schedule are model.optimizer, applied in the TBPTT module's own
            # update: LightningCLI's top-level optimizer/lr_scheduler keys replaced the module's
            # configure_optimizers (an SGD without the schedule crashed; a scheduler was ignored)
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        # Always one ModelCheckpoint, configured under the top-level `checkpoint:` key (distrnn's
        # subclass: Lightning's triggers do not fire as documented under manual optimization)
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.set_defaults({"trainer.logger": {"class_path": "distrnn.tracking.MLflowLogger"}})
        # the data decides what the model reads and predicts
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.add_argument("--trust_deepspeed_checkpoint", type=bool, default=False,
                            help="allow --ckpt_path to name a DeepSpeed checkpoint directory, which DeepSpeed"
                                 " loads with pickle: only for directories your own jobs wrote")
        parser.add_argument("--reshard", type=bool, default=False,
                            help="fit: let --ckpt_path resume on another number of devices or nodes, or with other"
                                 " data settings: weights, optimizer, schedule, step and MLflow run go on; the same"
                                 " global batch continues exactly, any other goes on at the same fraction of the"
                                 " epoch from a zero hidden state (README: Resuming elsewhere)")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config["trainer"]
        extra = dict(self.trainer_extra)
        callbacks = _as_list(trainer_cfg.get("callbacks")) + _as_list(extra.pop("callbacks", None))
        plugins = _as_list(trainer_cfg.get("plugins")) + _as_list(extra.pop("plugins", None))
        for key, value in extra.items():
            trainer_cfg[key] = value
        _check_devices(trainer_cfg)
        _check_strategy(trainer_cfg)
        _check_validation_schedule(trainer_cfg)
        _check_manual_optimization(trainer_cfg)
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(EpochProgressBar())
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(WritePredictions())
        trainer_cfg["callbacks"] = [*callbacks, MLflowRunInCheckpoint(), SystemMetricsOfEveryNode(), CheckpointOnSigterm()]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer_cfg["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        try:
            host_rendezvous_on_loopback(trainer)
        except OSError as e:
            fail(str(e))
        keep_freed_memory_on_cpu(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        if config.get("enable_checkpointing") is False:
            # the `checkpoint:` key's callback is always built; Lightning refused the run ("found
            # ModelCheckpoint in callbacks") where the user asked for no checkpoints at all
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def check_data(self, stage: str, world_size: Optional[int] = None) -> None:
        """The data module reads and checks its input for ``stage``, with the trainer's rank and
        world size (or rank 0 of ``world_size`` ranks that do not exist yet: a Ray driver checking
        for its workers), before the trainer opens the MLflow run; bad data fails with one line,
        exit 2."""
        dm = self.datamodule
        if not isinstance(dm, RecurrentDataModule):
            return
        trainer = self.trainer
        ranks = trainer if world_size is None else SimpleNamespace(global_rank=0, world_size=world_size, current_epoch=0)
        attached, dm.trainer = dm.trainer, ranks
        try:
            loaders = self._checked_loaders = dm.check(stage)
        except ConfigError as e:
            fail(_key_line(str(e)))
        except DownloadError as e:  # a public corpus that could not be fetched or verified
            fail(f"data.corpus: {e}")
        finally:
            dm.trainer = attached
        vci, train = trainer.val_check_interval, loaders.get("train_dataloader")
        if isinstance(vci, int) and trainer.check_val_every_n_epoch is not None and hasattr(train, "__len__"):
            # Lightning refuses this too, from inside fit (a traceback, and the run already open)
            n, limit = len(train), trainer.limit_train_batches
            n = min(n, limit) if isinstance(limit, int) else int(n * limit)
            if vci > n:
                fail(f"trainer.val_check_interval: {vci} batches, but an epoch of this data has {n} training batches"
                     " per rank; lower it, or set trainer.check_val_every_n_epoch: null to count across epochs")

    def _evaluation_run(self, stage: str) -> None:
        # the evaluation's run has its own checkpoint folder; Lightning warns that the training
        # run's checkpoint bookkeeping, which nothing here uses, is not reloaded
        warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
        ckpt_path = self.config_init[stage].get("ckpt_path")
        if ckpt_path in ("last", "best"):
            ckpt_path = self.config_init[stage]["ckpt_path"] = self._resolve_alias(stage)
        if self.config_init[stage].get("reshard"):
            fail(f"--reshard: only fit resumes a run; {stage} reads a checkpoint's weights on any devices and data")
        checkpoint = None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not str(ckpt_path).startswith("registry"):
            try:
                if is_deepspeed_checkpoint(ckpt_path):
                    checkpoint = self._open_deepspeed_checkpoint(stage, ckpt_path)
                else:
                    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
            except CheckpointError as e:
                fail(str(e))
        self.check_store()
        evaluation_run(self.trainer.logger, stage, checkpoint, ckpt_path)

    def _open_deepspeed_checkpoint(self, stage: str, ckpt_path: str) -> dict[str, Any]:
        """A DeepSpeed checkpoint directory's client state, opened only when the user vouches for
        it (DeepSpeed unpickles it) and only for a DeepSpeed strategy, the one that can load it
        (any other failed with a traceback from torch.load on a directory)."""
        trusted = bool(self.config_init[stage].get("trust_deepspeed_checkpoint"))
        if trusted and deepspeed_strategy(self.trainer) is None:
            raise CheckpointError(
                f"checkpoint {ckpt_path}: a DeepSpeed checkpoint directory, which only a DeepSpeed trainer.strategy loads;"
                f" or convert it into one file: distrnn convert-checkpoint {ckpt_path} model.ckpt {TRUST_FLAG}")
        return check_deepspeed_checkpoint(ckpt_path, trusted)

    def check_layers(self, device_setting: str = "trainer.accelerator", gpu_workers: bool = False,
                     training: bool = False) -> None:
        """Layers that cannot run on this trainer's device (a Triton backend on a CPU), and, for
        ``training``, a configuration that cannot train correctly there (the module's
        ``check_training_device``), refused before a run opens; a Ray driver asks it on its CPU
        for its workers, naming its own ``device_setting``: with ``gpu_workers`` only the module's
        training check, for CUDA (the layers on a GPU are the workers' to judge: the driver may
        lack Triton)."""
        device = "cuda" if gpu_workers else self.trainer.strategy.root_device.type
        check_training = getattr(self.model, "check_training_device", None)
        if training and callable(check_training):
            try:
                check_training(device, device_setting)
            except ValueError as e:
                fail(_key_line(str(e)))
        if gpu_workers:
            return
        for layer in self.model.modules():
            check = getattr(layer, "check_device", None)
            if callable(check):
                try:
                    check(device, device_setting)
                except ValueError as e:
                    fail(_key_line(str(e)))

    def before_validate(self) -> None:
        self.check_layers()
        self.check_data("validate")
        self._evaluation_run("validate")

    def before_test(self) -> None:
        self.check_layers()
        self.check_data("test")
        self._evaluation_run("test")

    def before_predict(self) -> None:
        self.check_layers()
        self.check_data("predict")
        self.check_prediction_files()
        self._evaluation_run("predict")
        if self.config_init["predict"].get("return_predictions") is None:
            self.config_init["predict"]["return_predictions"] = False  # the writer has them; not kept twice

    def _resolve_alias(self, stage: str) -> Optional[str]:
        """``--ckpt_path last|best``, as a path. ``last``: the newest ``last.ckpt`` or
        ``preempted.ckpt`` of the run's checkpoint folder, or with MLflow of any run of the
        experiment (each run checkpoints into its own folder, where Lightning's lookup, the new
        run's empty folder, found nothing and silently started a new run). ``best``: the best file
        that checkpoint names (a new process does not know it: Lightning failed with a traceback).
        None when there is nothing to resume: fit starts afresh, as Lightning does; the other
        stages fail, exit 2."""
        from pathlib import Path

        from lightning.pytorch.loggers import MLFlowLogger

        alias = self.config_init[stage].get("ckpt_path")
        logger, ckpt = self.trainer.logger, self.trainer.checkpoint_callback
        if getattr(ckpt, "dirpath", None):
            folders, where = [Path(ckpt.dirpath)], str(ckpt.dirpath)
        elif isinstance(logger, MLFlowLogger):
            experiment = logger._mlflow_client.get_experiment_by_name(logger._experiment_name)
            root = Path(logger.save_dir or "checkpoints")
            folders = [] if experiment is None else list((root / experiment.experiment_id).glob("*/checkpoints"))
            where = f"experiment '{logger._experiment_name}' under {root}"
        else:
            folders = [Path(self.trainer.default_root_dir) / "checkpoints"]
            where = str(folders[0])
        found = [f / name for f in folders for name in ("last.ckpt", "preempted.ckpt") if (f / name).is_file()]
        if not found:
            if stage != "fit":
                fail(f"ckpt_path: {alias}: no checkpoint in {where} to {stage}")
            if alias == "best":
                fail(f"ckpt_path: best: no checkpoint in {where}")
            if self.trainer.is_global_zero:
                print(f"distrnn: --ckpt_path last: no checkpoint in {where}: starting a new run", file=sys.stderr, flush=True)
            return None
        path = str(max(found, key=lambda p: p.stat().st_mtime))
        if alias == "best":
            try:
                states = load_checkpoint_file(path, mmap=True).get("callbacks") or {}
            except CheckpointError as e:
                fail(str(e))
            best = next((v["best_model_path"] for v in states.values() if isinstance(v, dict) and v.get("best_model_path")), None)
            if not best or not Path(best).is_file():
                fail(f"ckpt_path: best: {path}, the newest checkpoint in {where}, names no best checkpoint"
                     + (f" that exists ({best})" if best else " (no validation yet, or checkpoint.monitor: null)"))
            path = best
        if self.trainer.is_global_zero:
            print(f"distrnn: --ckpt_path {alias}: {'resuming' if stage == 'fit' else stage + ':'} {path}", file=sys.stderr, flush=True)
        return path

    def check_checkpoint_folder(self) -> None:
        """A checkpoint folder that cannot be written, refused before training (Lightning found
        out at the first save, after training up to it, with a traceback)."""
        from lightning.pytorch.loggers import MLFlowLogger

        ckpt, logger = self.trainer.checkpoint_callback, self.trainer.logger
        if not isinstance(ckpt, Checkpoint):
            return  # trainer.enable_checkpointing: false
        if ckpt.dirpath:
            key, folder = "checkpoint.dirpath", ckpt.dirpath
        elif isinstance(logger, MLFlowLogger) and logger.save_dir:
            key, folder = "trainer.logger.init_args.checkpoint_dir", logger.save_dir
        else:
            key, folder = "trainer.default_root_dir", self.trainer.default_root_dir
        why = unwritable_folder(folder)
        if why:
            fail(f"{key}: {why} (checkpoints would go to {folder})")

    def check_prediction_files(self) -> None:
        """A prediction file that cannot be written, refused before predicting (its folder failed
        with a traceback when prediction started; a path that is a folder, after predicting
        everything, when the finished file was moved there)."""
        for cb in self.trainer.callbacks:
            why = unwritable_file(cb.path, "predictions", "predictions.pt") if isinstance(cb, WritePredictions) else None
            if why:
                fail(f"trainer.callbacks.path: {why}")

    def check_store(self) -> None:
        why = store_unreachable(self.trainer.logger)
        if why:
            fail(why)

    def before_fit(self) -> None:
        self.check_layers(training=True)
        self.check_data("fit")
        self.check_checkpoint_folder()
        self.check_store()
        if self.config_init["fit"].get("ckpt_path") in ("last", "best"):
            self.config_init["fit"]["ckpt_path"] = self._resolve_alias("fit")
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not str(ckpt_path).startswith("registry"):
            try:
                if is_deepspeed_checkpoint(ckpt_path):
                    checkpoint = self._open_deepspeed_checkpoint("fit", ckpt_path)
                else:
                    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
                changed = self.check_resume(ckpt_path, checkpoint)
            except CheckpointError as e:
                fail(str(e))
            except ValueError as e:  # a rank's state missing, another world size: before any run starts
                fail(f"checkpoint {ckpt_path}: {e}")
            if changed:
                fail(changed)
            if continue_run(self.trainer.logger, checkpoint):
                # the run goes on in its own checkpoint folder, which holds its earlier checkpoints;
                # Lightning warns of a non-empty folder on every resume
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def _parse_ckpt_path(self) -> None:
        # Lightning builds the model from the hyperparameters saved in the checkpoint, over the
        # config and the command line: `fit --ckpt_path X --model.optimizer.lr 1e-4` trained on
        # with X's lr, silently. A resumed fit takes the values given (those changed are tagged
        # resumed.* on its run; a model whose weights no longer fit is refused in check_resume);
        # validate, test and predict build the model the checkpoint holds, as Lightning does.
        subcommand = self.config.get("subcommand")
        if subcommand in (None, "fit"):
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and os.path.isfile(ckpt_path):
            try:  # Lightning's own read of a file that is not a checkpoint was a traceback
                load_checkpoint_file(ckpt_path, training=False, mmap=True)
            except CheckpointError as e:
                fail(str(e))
        super()._parse_ckpt_path()

    def check_resume(self, ckpt_path: str, checkpoint: dict[str, Any]) -> Optional[str]:
        """Whether this run can resume ``checkpoint``, before any run opens (``distrnn fit``, a Ray
        worker restoring): the model's weights and optimizer fit it, ``--reshard`` applied, every rank's carried
        state there for this world size (else ValueError, one line). Returns why the data cannot go
        on at the saved read position (:func:`layout_change`), or None. Needs :meth:`check_data` first."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        loader = getattr(self, "_checked_loaders", {}).get("train_dataloader")
        if config.get("reshard"):
            self._reshard(ckpt_path, checkpoint, loader)
        check_carried_state(checkpoint, self.trainer.world_size)
        misfit = _weights_misfit(self.model, checkpoint)
        if misfit:
            raise ValueError(misfit)
        saved = ((checkpoint.get("hyper_parameters") or {}).get("optimizer") or {}).get("name")
        name = getattr(getattr(self.model, "optim_cfg", None), "name", saved)
        if saved != name and checkpoint.get("optimizer_states"):  # Lightning would load one's state into the other
            raise ValueError(f"model.optimizer.name {saved} -> {name}: the checkpoint holds the state of {saved}; resume"
                             f" with {saved}, or start a new run from its weights (--model.init_weights)")
        return layout_change(checkpoint, loader)

    def _reshard(self, ckpt_path: str, checkpoint: dict[str, Any], loader: Any) -> None:
        """``--reshard``: the checkpoint as this run will read it (checked here, before any run
        opens), and the same rewrite set to happen to the copy Lightning loads."""
        world = self.trainer.world_size
        io = self.trainer.strategy.checkpoint_io
        if not needs_reshard(checkpoint, world, loader):
            return  # the plain exact resume
        if is_deepspeed_checkpoint(ckpt_path):
            raise ValueError("--reshard: a DeepSpeed checkpoint holds optimizer shards of its own world size; convert it"
                             " (distrnn convert-checkpoint, which keeps ZeRO's optimizer state) and resume from the file"
                             " without DeepSpeed, or start a new run from its weights (--model.init_weights)")
        if not isinstance(io, AtomicCheckpointIO):
            raise ValueError(f"--reshard: needs distrnn's checkpoint IO, not {type(io).__name__}")
        changed = reshard_checkpoint(checkpoint, world, loader)
        io.on_load = functools.partial(reshard_checkpoint, world=world, loader=loader)
        if self.trainer.is_global_zero:
            print(f"distrnn: --reshard: {changed}", file=sys.stderr, flush=True)

    def instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        init_weights = cfg.get("model.init_weights") if cfg.get("ckpt_path") else None
        if init_weights:
            # the checkpoint holds the weights: resuming a fine-tuning run does not need the file
            # it started from (the logged config keeps it)
            cfg["model.init_weights"] = None
        if cfg.get("trainer.fast_dev_run") and cfg.get("trainer.logger"):
            # Lightning suppresses logging under fast_dev_run once the logger exists, and building
            # it made the MLflow store (a new mlflow.db) for a run that never comes
            cfg["trainer.logger"] = False
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, CheckpointError, MisconfigurationException, ImportError) as e:
            fail(_key_line(str(e)))
        finally:
            if init_weights:
                cfg["model.init_weights"] = init_weights


def asks_for_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


@contextlib.contextmanager
def field_docs_in_help(argv: list[str]) -> Iterator[None]:
    """The config dataclasses document each field in a docstring below it (litgpt's style), which
    jsonargparse puts into ``--help`` only with this setting. It costs ~2 s per parser (it reads
    the source of every class in the config, Lightning's Trainer's too), so it is on for the
    parsers built inside this block when ``argv`` asks for help, and only for them."""
    asked = asks_for_help(argv)
    if asked:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        if asked:
            set_parsing_settings(docstring_parse_attribute_docstrings=False)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        fail(f"a command is needed: fit, validate, test, predict, {', '.join(OWN_COMMANDS)} (distrnn --help)")
    if argv[0] in OWN_COMMANDS:  # (`python -m distrnn.cli generate ...`)
        run_own_command(argv)
    try:
        with field_docs_in_help(argv):
            cli = DistrnnCLI(args=argv if argv != sys.argv[1:] else None)
    except (ConfigError, CheckpointError) as e:
        fail(_key_line(str(e)))
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with code 0; a preempted job did not finish
        sys.exit(128 + 15)
    except SystemExit as e:
        # Lightning ends a Ctrl-C with exit code 1, raised while handling the KeyboardInterrupt;
        # shells and make expect 130 (128 + SIGINT) from an interrupted command
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):
            sys.exit(128 + 2)
        raise
    if cli.trainer.is_global_zero:
        _print_where(cli)


def _print_where(cli: DistrnnCLI) -> None:
    """After a command ends: the MLflow run it logged to (fit, validate, test and predict each
    have one) and, after fit, its checkpoints."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = cli.trainer.logger
    ckpt = cli.trainer.checkpoint_callback
    lines = []
    if isinstance(logger, MLFlowLogger) and logger.run_id:
        lines.append(where_run_is(logger._tracking_uri, logger._experiment_name, logger.experiment_id, logger.run_id))
    if cli.subcommand == "fit" and ckpt is not None and ckpt.last_model_path:
        lines.append(f"checkpoints: {ckpt.dirpath}  (last: {ckpt.last_model_path})")
    if lines:  # (nothing at all with --trainer.logger false and no checkpoint)
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
