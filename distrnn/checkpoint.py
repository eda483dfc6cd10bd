"""Lightning's side of checkpoints: the checkpoint IO plugin (atomic writes, safe loads), when
files are written (:class:`Checkpoint`), and a checkpoint on SIGTERM. The files themselves (read,
write, verify, convert DeepSpeed directories) are :mod:`distrnn.checkpoint_files`.
"""

from __future__ import annotations

import os
import re
import string
import time
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from distrnn.checkpoint_files import load_checkpoint_file, remove_sidecar, save_checkpoint_file
from distrnn.data.loaders import to_device_queued


# The `checkpoint:` key's defaults (distrnn fit, benchmarks/learn.py): the best file by validation
# loss and last.ckpt.
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "monitor": "val/loss",
    "mode": "min",
    "save_top_k": 1,
    "save_last": True,
    "filename": "best-{step}",
    "auto_insert_metric_name": False,
    # a job resumed into its own folder continues last.ckpt, not last-v1.ckpt
    "enable_version_counter": False,
}


def deepspeed_strategy(trainer: Trainer) -> Optional[Any]:
    """The trainer's DeepSpeed strategy (Lightning's, or Ray's subclass), or None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return strategy if isinstance(strategy, DeepSpeedStrategy) else None


def ends_training(trainer: Trainer) -> bool:
    """Whether training stops after the batch that just ended: max_steps reached, or a stop asked
    for (max_time, EarlyStopping, any callback) that min_epochs and min_steps allow (Lightning's own
    test). Files written at the end of training are written then: by ``on_train_end`` Lightning has
    closed the epoch, and a resume from a file written there starts the next epoch, skipping the
    rest of this one."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    if not trainer.should_stop:
        return False
    loop = trainer.fit_loop
    return ((not loop.min_epochs or loop.epoch_progress.current.processed >= loop.min_epochs)
            and (not loop.min_steps or trainer.global_step >= loop.min_steps))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with write-then-rename saves and safe loads. ``on_load``, when
    set, edits the next training checkpoint loaded, before Lightning restores from it
    (``--reshard``)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_load: Optional[Callable[[dict[str, Any]], Any]] = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # object storage has no rename: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint_file(checkpoint, path)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            remove_sidecar(path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Lightning also moves plain state dicts through here (ddp_spawn returns rank 0's weights so).
        checkpoint = load_checkpoint_file(path, map_location if map_location is not None else "cpu", training=False)
        if self.on_load is not None and "loops" in checkpoint:  # not the weights ddp_spawn hands back
            on_load, self.on_load = self.on_load, None
            on_load(checkpoint)
        return checkpoint


class CheckpointOnSigterm(Callback):
    """A preempted job (SIGTERM, what schedulers and spot instances send) leaves a checkpoint.

    Lightning's own SIGTERM handler runs a collective inside the signal handler (and forwards the
    signal to the other ranks, whose handlers do the same) while rank 0 also stops on its local flag
    at the end of the step: the ranks' collectives fall out of step and DDP hangs (seen with
    Lightning 2.6 on gloo). distrnn's handler only notes the signal. After every batch each rank
    starts an all-reduce of that note (any rank signalled: all stop; the same two integers carry rank
    0's request for a time-triggered checkpoint, see :class:`Checkpoint`) and reads the
    result of the previous batch's, which has long finished: the ranks agree at the same step
    boundary, within one batch of the signal, and raise Lightning's flag together
    (``SIGTERMException``). Nothing waits for the GPU: on CUDA the result comes back through pinned
    memory behind an event. (Reading it at once would be a host sync per batch, and so is the
    check Lightning itself runs before every batch, a broadcast from rank 0 read with
    ``.item()``: with this handler in place Lightning's flag is raised only here, on every rank at
    once, so that check is switched off.) This hook then writes ``preempted.ckpt`` beside the run's
    other checkpoints, every rank taking part (the hidden states are gathered), and the job exits
    non-zero so the scheduler knows it did not finish.
    """

    def __init__(self) -> None:
        self._signalled = False
        self.checkpoint_due = False  # agreed this batch: every rank saves (see Checkpoint)
        self._pending: Optional[tuple[Any, Tensor, Optional[Any]]] = None
        self._host: Optional[Tensor] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import signal
        import threading

        # Lightning's flag is raised only by this callback (in the main thread Lightning's handler
        # is replaced below; in another, a Ray Train worker's, neither can install one)
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):  # Lightning >= 2.5.2; see the class docstring
            epoch_loop._broadcast_sigterm_tensor = lambda: None
        if threading.current_thread() is not threading.main_thread():
            return

        def note(signum: int, frame: Any) -> None:
            self._signalled = True

        signal.signal(signal.SIGTERM, note)

    @staticmethod
    def _distributed(trainer: Trainer) -> bool:
        return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _start_agreement(self, trainer: Trainer, checkpoint_due: bool = False) -> None:
        # not torch.tensor(..., device=cuda): from pageable memory, a wait for the GPU per batch
        flag = to_device_queued(torch.tensor([int(self._signalled), int(checkpoint_due)]), trainer.strategy.root_device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        if flag.is_cuda:
            work.wait()  # NCCL: the current stream waits for the reduce; the host does not
            if self._host is None:  # reused: the previous batch's copy has been read by now
                self._host = torch.empty(2, dtype=flag.dtype, pin_memory=True)
            host = self._host
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (None, host, done)
        else:
            self._pending = (work, flag, None)

    def _agreed(self) -> tuple[bool, bool]:
        """The previous batch's agreement: (a rank was signalled, rank 0 asked for a time-triggered
        checkpoint); both False before the first."""
        if self._pending is None:
            return False, False
        work, flag, done = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if done is not None:
            done.synchronize()  # recorded a batch ago: the GPU is past it
        signalled, due = flag.tolist()  # on the host already: one read, not two tensor indexings
        return bool(signalled), bool(due)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._distributed(trainer):
            flag, self.checkpoint_due = self._agreed()
            # rank 0's clock alone decides a time-triggered checkpoint; it rides on this all-reduce
            ckpt = trainer.checkpoint_callback
            due = isinstance(ckpt, Checkpoint) and trainer.is_global_zero and ckpt.request_time_save()
            self._start_agreement(trainer, due)
        else:
            flag = self._signalled
        if flag:
            trainer._signal_connector.received_sigterm = True

    release_timeout_s = 10.0

    def _last_agreement(self, peers_may_be_gone: bool = False) -> None:
        """Read the last agreement, then wait (bounded) until gloo's worker thread has released
        its tensor: the rank may exit next.

        The worker drops its reference a moment after the reduce completes (still holding it
        right after ``wait()`` in about 1 of 4 batches here); releasing a tensor that has a Python
        object takes the GIL, and a thread that asks for it once the interpreter is shutting down
        aborts the whole process ("terminate called without an active exception"). Of 2-rank gloo
        jobs that exited right after their last agreement, about 1 in 5 aborted so; a finished DDP
        fit died with SIGABRT now and then, and so did 1 of 30 jobs whose ranks all raised an
        error. Sleeping here lets the worker take the GIL while that is still safe. (NCCL's
        watchdog releases the CUDA path's tensor: not covered.)

        ``peers_may_be_gone``: after an error, a peer may never join the last all-reduce (gloo
        would wait for it for 30 minutes): wait for it to complete only as long as for the release,
        and leave it unread if it does not."""
        pending = self._pending
        if pending is None:
            return
        work, deadline = pending[0], time.monotonic() + self.release_timeout_s
        if peers_may_be_gone:
            # the CUDA path's event is never reached without the peer; gloo's work can be polled
            while work is not None and not work.is_completed() and time.monotonic() < deadline:
                time.sleep(0.001)
            if work is None or not work.is_completed():
                self._pending = None
                return
        sent = weakref.ref(pending[1]) if work is not None else None  # gloo: wait for its release
        del pending, work  # only gloo's worker may hold the tensor now
        self._agreed()
        while sent is not None and sent() is not None and time.monotonic() < deadline:
            time.sleep(0.001)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_agreement()  # the last batch's all-reduce, which every rank started

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or ckpt is None or not trainer.training:
            self._last_agreement(peers_may_be_gone=True)  # this rank may exit next, as after fit
            return
        self._last_agreement()  # the one every rank started at the batch it stopped after
        dirpath = getattr(ckpt, "dirpath", None)
        if not dirpath:
            return
        path = os.path.join(dirpath, "preempted.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            print(f"distrnn: SIGTERM at step {trainer.global_step}: checkpoint written to {path}; "
                  f"resume with --ckpt_path {path}", flush=True)


class PassedMultiple:
    """Whether the batch that just ended passed a multiple of ``n`` updates: the one test behind
    every "every n steps" trigger of distrnn's callbacks.

    A TBPTT batch makes several updates (sequence length / k1), so ``global_step % n == 0`` at a
    batch's end, Lightning's test, holds only when a batch ends on a multiple (4 updates a batch,
    n = 10: every 20 updates). Each callback owns one, started at train start so that a resumed run
    counts from its checkpoint's step. ``n`` of ``None`` or 0: never.
    """

    def __init__(self, n: Optional[int]) -> None:
        self.n = n
        self._seen: Optional[int] = None  # global step at the previous batch's end

    def start(self, step: int) -> None:
        self._seen = step

    def __call__(self, step: int) -> bool:
        previous, self._seen = self._seen, step
        return bool(self.n) and self.n >= 1 and previous is not None and step // self.n > previous // self.n


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the ``checkpoint:`` key, same arguments) with its triggers
    made to work for a manually optimized module, which is what the TBPTT engine is. With Lightning
    2.6, under manual optimization:

    - ``every_n_train_steps`` with a validation metric as ``monitor`` (distrnn's default) saved
      nothing until the first validation had produced the metric: a job preempted before it lost
      every update (every_n_train_steps 100, validation every 1,000 updates: the first file at
      1,000);
    - ``train_time_interval`` was ignored (``last.ckpt`` only at the end);
    - at the end of training ``last.ckpt`` was written only if no checkpoint had been written
      before, so after max_steps 1,250 with saves every 100 it held step 1,200;
    - ``fast_dev_run`` wrote ``last.ckpt`` at its end although Lightning announces that it writes
      no checkpoints.

    Here ``last.ckpt`` (and, without a monitor, the step-named file) is written after each batch
    that passed a multiple of ``every_n_train_steps`` updates (Lightning tests for the batch ending
    on one, and a TBPTT batch makes several updates), and every ``train_time_interval``, whether
    or not validation has run; ``best-*`` files are chosen at the end of each validation from the metric it just
    produced (never a stale one); ``last.ckpt`` is written again after a new best, so that it knows
    the best file, after every validation when neither trigger is set (Lightning's
    ``every_n_epochs`` trigger, which Lightning then fires; without it a killed job lost every
    update since its last new best), and at the end of training. A save due just before a validation waits for it,
    so that the step is written once. Under DDP the time-triggered save is decided by rank 0's
    clock and agreed through :class:`CheckpointOnSigterm`'s per-batch all-reduce, read one batch
    later (Lightning broadcasts that decision from rank 0 before every batch, a host sync): every
    rank saves at the same step, as the gathered hidden states require.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except MisconfigurationException as e:
            # Lightning's words name its argument, not the config key ("Invalid value for
            # save_top_k=-2", "`mode` can be min, max")
            m = re.search(r"for (\w+)=|^`(\w+)`", str(e))
            raise ValueError(f"checkpoint.{m.group(1) or m.group(2)}: {e}" if m else f"checkpoint: {e}") from None
        if self.filename:
            try:  # Lightning formats it at the first save, after training up to it
                list(string.Formatter().parse(self.filename))
            except ValueError as e:
                raise ValueError(f"checkpoint.filename: {self.filename!r} is not a format string ({e})") from None
        self._due_at_validation = False
        self._time_requested = False
        self._passed = PassedMultiple(self._every_n_train_steps)
        self._agreement: Optional[CheckpointOnSigterm] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._agreement = next((c for c in trainer.callbacks if isinstance(c, CheckpointOnSigterm)), None)
        timed = bool(self._every_n_train_steps) or self._train_time_interval is not None
        if not pl_module.automatic_optimization and timed and self.monitor is not None and not self.save_last:
            from distrnn.config import ConfigError

            # best files come from validations only; the step and time triggers write last.ckpt
            raise ConfigError("checkpoint.save_last: false with a monitor would write nothing at"
                              " every_n_train_steps / train_time_interval, only best files after"
                              " validations: set save_last: true, or monitor: null for step-named files")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._passed.start(trainer.global_step)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class existed resume with their
        # best-file bookkeeping, and these resume under a plain ModelCheckpoint
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    @staticmethod
    def _off(trainer: Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _time_up(self) -> bool:
        interval = self._train_time_interval
        if interval is None or self._last_time_checked is None:
            return False
        return time.monotonic() - self._last_time_checked >= interval.total_seconds()

    def request_time_save(self) -> bool:
        """Rank 0 under DDP: whether to ask the other ranks for a time-triggered save (once per
        interval: the answer arrives a batch later)."""
        if self._time_requested or not self._time_up():
            return False
        self._time_requested = True
        return True

    def _time_due(self, trainer: Trainer) -> bool:
        if self._train_time_interval is None:
            return False
        if trainer.world_size == 1:
            return self._time_up()
        if self._agreement is None:
            raise ValueError("checkpoint.train_time_interval: with several ranks it needs distrnn's CheckpointOnSigterm "
                             "callback, which agrees on the step to save at")
        return self._agreement.checkpoint_due

    @staticmethod
    def _validates_next(trainer: Trainer) -> bool:
        """Whether Lightning runs validation right after this batch (its own test, private in 2.6)."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return not loop._skip_next_val and bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except (AttributeError, TypeError):
            return False

    def _save_last_now(self, trainer: Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, candidates)  # the step-named file
        self._write_last(trainer, candidates)
        self._last_time_checked = time.monotonic()
        self._time_requested = self._due_at_validation = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        ending = self.save_last and ends_training(trainer)  # the end-of-training file, here
        due = self._passed(step) or self._time_due(trainer) or self._due_at_validation
        if not (due or ending) or self._off(trainer):
            return
        if self._last_global_step_saved == step:  # written at this step already: the interval restarts
            self._last_time_checked = time.monotonic()
            self._time_requested = self._due_at_validation = False
            return
        if (self.monitor is not None or not due) and self._validates_next(trainer):
            self._due_at_validation = True  # written once, after the validation chose a best or not
            return
        if due:
            self._save_last_now(trainer)
        else:  # only the last file, as at the end of training
            self._write_last(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.automatic_optimization:
            return super().on_validation_end(trainer, pl_module)
        if self._off(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        before = (self._last_global_step_saved, self._last_checkpoint_saved)
        if self.monitor is not None:
            if self.monitor not in candidates:
                from distrnn.config import ConfigError

                logged = ", ".join(sorted(k for k in candidates if "/" in k))
                raise ConfigError(f"checkpoint.monitor: '{self.monitor}' is not a metric of this run (after a"
                                  f" validation it logs {logged})")
            self._save_topk_checkpoint(trainer, candidates)
        wrote_best = (self._last_global_step_saved, self._last_checkpoint_saved) != before
        # Lightning's trigger when no step or time trigger is given (every_n_epochs, default 1):
        # after every validation, so that a kill -9 loses at most one validation interval
        by_validation = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if self._due_at_validation or wrote_best or by_validation:
            self._save_last_now(trainer)
        elif self.save_last and ends_training(trainer) and self._last_global_step_saved != trainer.global_step:
            # stopped by this validation (EarlyStopping): the end-of-training file, before
            # Lightning closes the epoch (ends_training)
            self._write_last(trainer, candidates)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_end(trainer, pl_module)
        if self.save_last and not self._off(trainer) and self._last_global_step_saved != trainer.global_step:
            self._write_last(trainer, self._monitor_candidates(trainer))

    def _write_last(self, trainer: Trainer, candidates: dict[str, Any]) -> None:
        if self.save_last == "link" and self._last_global_step_saved != trainer.global_step:
            # nothing was written at this step for last.ckpt to link to (Lightning would link it
            # to an older file): here it becomes a file of its own
            self.save_last = True
            try:
                self._save_last_checkpoint(trainer, candidates)
            finally:
                self.save_last = "link"
        else:
            self._save_last_checkpoint(trainer, candidates)
