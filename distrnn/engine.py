"""The TBPTT engine: one LightningModule with manual optimization for every recurrence and task.

What it owns, and saves as one unit in every checkpoint (``checkpoint["distrnn"]``):
the carried hidden state (and, for k2 > k1, the last k2 - k1 inputs that the next window
re-runs) and the RNG states. Weights, optimizer, scheduler and the data loader's read position are
saved by Lightning beside it, so a resumed run continues exactly where the original stopped.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from typing import Any, Iterator, Optional

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
from torch import Tensor

from distrnn.bptt import LN2, WindowResult, chunk_bounds, loss_sum, run_window
from distrnn.checkpoint import deepspeed_strategy
from distrnn.checkpoint_files import CheckpointError, load_checkpoint_file
from distrnn.config import (
    ConfigError,
    NetworkConfig,
    OptimizerConfig,
    TaskSpec,
    TBPTTConfig,
    coerce,
    to_plain,
)
from distrnn.data.base import forward_is_collective
from distrnn.data.loaders import to_device_queued
from distrnn.layers import _CudnnRecurrence
from distrnn.model import RecurrentModel
from distrnn.rendezvous import release_process_group_at_exit
from distrnn.state import State, cat_states, detach_state, map_state, slice_state, state_tensors

CHECKPOINT_KEY = "distrnn"
CHECKPOINT_FORMAT = 2


def check_carried_state(checkpoint: dict[str, Any], world: int) -> None:
    """ValueError unless ``checkpoint`` holds the carried state of every rank of a run of ``world``
    ranks (a checkpoint without distrnn's state, for weights only, passes)."""
    d = checkpoint.get(CHECKPOINT_KEY)
    if d is None:
        return
    if d.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {d.get('format')} is not {CHECKPOINT_FORMAT}")
    if d["world_size"] != world:
        raise ValueError(
            f"checkpoint was written by {d['world_size']} ranks and this run has {world}: every rank's"
            " streams and hidden state belong to one world size; resume with the same number of devices, or pass"
            " --reshard true"
        )
    ranks = d.get("ranks") or []
    present = sum(isinstance(r, dict) and "carry" in r and "rng" in r for r in ranks)
    if len(ranks) != d["world_size"] or present != len(ranks):
        raise ValueError(
            f"checkpoint is incomplete: it holds the carried state of {present} of its {d['world_size']} ranks;"
            " resuming would start some ranks' streams from a wrong state"
        )


def _rows(carries: list[dict[str, Any]], split: int) -> list[dict[str, Any]]:
    """Every rank's carried state and replay history cut into ``split`` ranks' rows: the ranks'
    rows are consecutive global streams, so joined in rank order they are the global batch."""
    def cut(parts: list[Optional[Tensor]], dim: int) -> list[Optional[Tensor]]:
        if any(p is None for p in parts):
            return [None] * split
        return list(torch.cat(parts, dim).chunk(split, dim))

    states = [state_tensors(c.get("state")) for c in carries]
    state: list[Any] = [None] * split
    if all(states) and len({len(t) for t in states}) == 1:
        columns = [cut([t[i] for t in states], 1) for i in range(len(states[0]))]
        whole = isinstance(carries[0]["state"], Tensor)
        state = [columns[0][r] if whole else tuple(c[r] for c in columns) for r in range(split)]
    histories = [c.get("history") for c in carries]
    history: list[Any] = [None] * split
    if all(h is not None for h in histories):
        columns = {k: cut([h[k] for h in histories], 0) for k in histories[0]}
        history = [{k: v[r] for k, v in columns.items()} for r in range(split)]
    return [{"state": state[r], "history": history[r]} for r in range(split)]


def needs_reshard(checkpoint: dict[str, Any], world: int, loader: Any) -> bool:
    """Whether a run of ``world`` ranks reading ``loader`` would resume ``checkpoint`` other than
    exactly as saved: another number of ranks, or data settings the checkpoint records otherwise
    (:func:`distrnn.data.loaders.layout_change`). False also for a checkpoint that records neither
    (an older distrnn's, a foreign one): nothing to compare is nothing to reshard."""
    from distrnn.data.loaders import layout_change

    saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("world_size")
    return saved not in (None, world) or layout_change(checkpoint, loader) is not None


def reshard_checkpoint(checkpoint: dict[str, Any], world: int, loader: Any) -> Optional[str]:
    """Rewrites, in place, a training checkpoint written by another number of ranks or with
    other data settings, so that a run of ``world`` ranks reading ``loader`` (this rank's
    training loader) resumes from it: weights, optimizer, schedule, step, callbacks and MLflow run
    as saved. Returns one line saying what changed, or None when nothing did (an exact resume).

    When the ranks together read the same data at every index as before (the same global batch,
    e.g. 4 ranks x 8 streams resumed on 2 x 16; ``loader.global_layout``), the resume is exact:
    the same read position, and every stream's carried hidden state moved to the rank that now
    reads it. Otherwise each rank goes on at the same fraction of the epoch (rounded down to a
    batch, at least one batch on once one was read) with a zero hidden state, as at the start of a
    stream; tokens between the old and the new positions are read twice or not at all this epoch.
    Ranks take the RNG of the old rank ``rank % old world size``. ValueError (one line) when the
    checkpoint cannot be resharded."""
    from distrnn.data.loaders import ResumableLoader

    d = checkpoint.get(CHECKPOINT_KEY)
    if d is None or not isinstance(loader, ResumableLoader):
        raise ValueError("only a distrnn training checkpoint, read by one of distrnn's data modules, can be resharded")
    old_world = d["world_size"]
    check_carried_state(checkpoint, old_world)
    if not needs_reshard(checkpoint, world, loader):
        return None
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    saved = (fit_loop.get("state_dict") or {}).get("combined_loader") or []
    before, now = (saved[0].get("layout") if len(saved) == 1 and isinstance(saved[0], dict) else None), loader.layout()
    if before is None or "num_batches" not in saved[0]:
        raise ValueError("the checkpoint records no batch count for its training data (written by an older distrnn):"
                         " resume it without --reshard on the same devices and data settings, or start from"
                         " --model.init_weights")
    old_n, new_n, index, epoch = int(saved[0]["num_batches"]), loader.num_batches(), int(saved[0]["next_index"]), int(saved[0]["epoch"])
    g = loader.global_layout(before, old_world)
    exact = g is not None and g == loader.global_layout(now, world) and old_n == new_n
    if exact:
        new_index, carries = index, _rows([r["carry"] for r in d["ranks"]], world)
    else:
        new_index = index * new_n // old_n
        if index > 0:
            new_index = max(new_index, 1)
        carries = [{"state": None, "history": None}] * world
    d["ranks"] = [{"carry": carries[r], "rng": d["ranks"][r % old_world]["rng"]} for r in range(world)]
    d["world_size"] = world
    # Lightning's batch counters follow the read position, kept as far from it as saved (a save
    # after a batch's end has one batch processed and not yet completed)
    progress = fit_loop["epoch_loop.batch_progress"]
    for part in ("current", "total"):
        progress[part] = {k: max(0, v + new_index - index) for k, v in progress[part].items()}
    saved[0] = {**saved[0], "next_index": new_index, "layout": now, "num_batches": new_n}
    what = f"{old_world} rank(s) x data.batch_size {before.get('data.batch_size')} -> {world} x {now.get('data.batch_size')}"
    if exact:
        return f"{what}: the same global batches; read position and hidden states carried over exactly"
    return (f"{what}: epoch {epoch} goes on at batch {new_index} of {new_n} per rank (was {index} of {old_n}),"
            " every stream from a zero hidden state")


class Carry:
    """What truncated BPTT carries from one update to the next."""

    def __init__(self, state: Optional[State] = None, history: Optional[dict[str, Tensor]] = None) -> None:
        self.state = state
        self.history = history  # x, y, reset of the steps the next window re-runs (k2 > k1)

    def batch_size(self) -> Optional[int]:
        tensors = state_tensors(self.state)
        return tensors[0].shape[1] if tensors else None

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "Carry":
        """On ``device``; with ``dtype``, the floating state and history too (a state saved by a
        run of another precision: an LSTM outside autocast refuses one of another dtype)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        history = self.history
        if history is not None:  # the reset mask stays on the host
            history = {k: v if k == "reset" else move(v) for k, v in history.items()}
        return Carry(map_state(move, self.state), history)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": map_state(lambda s: s.detach().cpu(), self.state),
            "history": None if self.history is None else {k: v.cpu() for k, v in self.history.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Carry":
        return cls(d.get("state"), d.get("history"))


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }


def restore_rng(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def log_against_updates(trainer: L.Trainer) -> None:
    """Has ``trainer`` log metrics at the index of the last update made, not of the batch.

    Lightning gives the metrics it logs the number of batches trained before (with one update a
    batch, the index of the batch's update). A TBPTT batch makes ``seq_len / k1`` updates, and
    everything else that counts steps counts updates: ``max_steps``, ``every_n_train_steps``,
    checkpoint names, Ray's reports, :class:`distrnn.diagnostics.Diagnostics`. Batch-indexed
    curves would end at half of ``max_steps`` with k1 = seq_len / 2 and put runs of another k1 on
    other axes. Metrics logged with an explicit step, or a ``step`` metric, keep theirs."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or getattr(connector, "_distrnn_update_steps", False):
        return
    log_metrics = connector.log_metrics

    def log_at_last_update(metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if step is None and "step" not in metrics:
            # Lightning adds the epoch only where it picks the step itself
            metrics = {"epoch": trainer.current_epoch, **metrics}
            step = max(trainer.global_step - 1, 0)
        log_metrics(metrics, step)

    connector.log_metrics = log_at_last_update
    connector._distrnn_update_steps = True


def _nonfinite_error(loss: Tensor, grad_norm: Optional[Tensor], step: int, rank: int) -> FloatingPointError:
    loss_v = loss.item()
    what = (f"loss ({loss_v})" if not math.isfinite(loss_v)
            else f"gradients (norm {grad_norm.item()}; the loss is finite on this rank)")
    return FloatingPointError(
        f"non-finite {what} at step {step} on rank {rank}: the update was not applied; the last checkpoint is from before it"
    )


def _on_host(number: float) -> Tensor:
    """A number to log, as a host tensor (``self.log`` makes a device tensor of a number, which on
    CUDA waits for the GPU, and so does Lightning's reading of it after every batch)."""
    return torch.tensor(float(number), dtype=torch.float64)


class _PendingCheck:
    """What the host learns of an update one update late: whether its loss and gradients were
    finite and, under fp16 loss scaling, the scale it left. Each is copied to the host behind that
    update's work on the GPU and read (waiting for those copies alone) by the next update or before
    a checkpoint is written. One pinned buffer and one event serve every update: each check is read
    before the next is made."""

    def __init__(self) -> None:
        self.host: Optional[Tensor] = None
        self.event: Optional[Any] = None
        self.copied = False
        self.flag: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None

    def put(self, step: int, rank: int, loss: Tensor, grad_norm: Tensor, flag: Tensor) -> None:
        self.step, self.rank, self.loss, self.grad_norm = step, rank, loss, grad_norm
        self.flag = self._behind(flag, 0)

    def put_scale(self, step: int, rank: int, scale: Tensor, minimum: float) -> None:
        self.scale_step, self.scale_rank, self.minimum = step, rank, minimum
        self.scale = self._behind(scale, 1)

    def _behind(self, t: Tensor, slot: int) -> Tensor:
        if t.device.type != "cuda":
            return t.detach().clone()  # on the host already: computed when it was queued
        if self.host is None:
            self.host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            self.event = torch.cuda.Event()
        out = self.host[slot]
        out.copy_(t.detach().reshape(()), non_blocking=True)
        self.event.record()
        self.copied = True
        return out

    def raise_if_nonfinite(self) -> None:
        flag, scale, copied = self.flag, self.scale, self.copied
        self.flag = self.scale = None
        self.copied = False
        if copied:
            self.event.synchronize()
        if flag is not None and flag.item():
            raise _nonfinite_error(self.loss, self.grad_norm, self.step, self.rank)
        if scale is not None and scale.item() < self.minimum:
            raise FloatingPointError(
                f"fp16 gradients overflow at every loss scale: the scale fell to {scale.item():g} (below"
                f" model.optimizer.min_loss_scale={self.minimum:g}) at step {self.scale_step} on rank"
                f" {self.scale_rank}; the overflowing updates were skipped, the last checkpoint is intact"
            )


class TBPTTModule(L.LightningModule):
    """Trains a :class:`RecurrentModel` by truncated, full or checkpointed BPTT.

    Args:
        network: the recurrent network.
        tbptt: the gradient mode and truncation lengths.
        optimizer: optimizer, schedule, clipping.
        task: set from the data module by the CLI (``data.task``).
        seed: seeds the randomized chunk lengths.
        init_weights: start from the weights of this checkpoint file (a distrnn checkpoint, or what
            ``distrnn convert-checkpoint`` writes), in a new run: optimizer, schedule, data position,
            hidden state and MLflow run start afresh. ``--ckpt_path`` resumes a run instead.
    """

    def __init__(
        self,
        network: NetworkConfig = NetworkConfig(),
        tbptt: TBPTTConfig = TBPTTConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        task: Optional[TaskSpec] = None,
        seed: int = 0,
        init_weights: Optional[str] = None,
    ) -> None:
        super().__init__()
        if task is None:
            raise ConfigError("model.task: not set; the data module provides it (data.task)")
        self.network_cfg = coerce(NetworkConfig, network)
        self.tbptt_cfg = coerce(TBPTTConfig, tbptt)
        self.optim_cfg = coerce(OptimizerConfig, optimizer)
        self.task = coerce(TaskSpec, task)
        self.seed = seed
        if self.task.seq_len is not None and self.tbptt_cfg.k1 > self.task.seq_len:
            raise ConfigError(
                f"model.tbptt.k1: {self.tbptt_cfg.k1} is longer than the data's sequences (data.seq_len {self.task.seq_len})"
            )
        self.save_hyperparameters(
            {
                "network": to_plain(self.network_cfg),
                "tbptt": to_plain(self.tbptt_cfg),
                "optimizer": to_plain(self.optim_cfg),
                "task": to_plain(self.task),
                "seed": seed,
            },
            logger=False,
        )
        # init_weights stays out of the hyperparameters: a checkpoint of this run holds the weights
        # themselves, and loading it (generate, resume) must not need the file it started from.
        self.model = RecurrentModel(self.network_cfg, self.task)
        if init_weights:
            self._load_weights(str(init_weights))
        self.automatic_optimization = False
        self._carry = Carry()
        self._carry_restored = False
        self._val_state: Optional[State] = None
        self._eval_sums: Optional[Tensor] = None  # an evaluation epoch's summed loss and correct answers
        self._eval_count = 0  # and its labelled steps
        self._pending_rng: Optional[dict[str, Any]] = None
        self._grad_norm: Optional[Tensor] = None
        self._unchecked_loss: Optional[Tensor] = None  # stop_on_nonfinite: checked after the backward pass
        self._pending = _PendingCheck()  # the last update's finiteness, on its way to the host
        self._lr_scale = 1.0
        self._t_last: Optional[float] = None
        self._tokens_since_log = 0

    def _load_weights(self, path: str) -> None:
        try:
            weights = load_checkpoint_file(path)["state_dict"]
        except CheckpointError as e:
            raise ConfigError(f"model.init_weights: {e}") from None
        mine = self.state_dict()
        wrong = sorted(set(mine) ^ set(weights)) or [k for k in mine if tuple(weights[k].shape) != tuple(mine[k].shape)]
        if wrong:
            k = wrong[0]
            what = (f"{k} is {tuple(weights[k].shape)} there, {tuple(mine[k].shape)} here" if k in mine and k in weights
                    else f"{k} only {'here' if k in mine else 'there'}")
            raise ConfigError(
                f"model.init_weights: checkpoint {path} does not fit model.network ({len(wrong)} tensors differ; {what})"
            )
        self.load_state_dict(weights)

    # ---------------------------------------------------------------- optimization

    def _deepspeed(self) -> Optional[Any]:
        """The trainer's DeepSpeed strategy, or None."""
        return deepspeed_strategy(self.trainer) if self._trainer is not None else None

    def check_training_device(self, device_type: str, device_setting: str = "trainer.accelerator") -> None:
        """ValueError naming the keys when this configuration cannot train correctly on
        ``device_type`` (``fit``: the CLI asks before a run opens, ``setup`` again; evaluation
        recomputes nothing and is not refused). On a GPU, cuDNN draws
        the dropout between the layers of its multi-layer RNN from a state of its own, which
        neither a recomputation nor torch's generators can rewind: checkpointed BPTT would
        recompute its segments with other masks than their first pass, and take the gradients
        of neither."""
        net = self.network_cfg
        if (device_type == "cuda" and self.tbptt_cfg.mode == "checkpointed" and net.dropout > 0 and net.num_layers > 1
                and isinstance(self.model.recurrence, _CudnnRecurrence)):
            raise ValueError(
                f"model.network.dropout: {net.dropout:g} between the layers of the cuDNN {net.recurrence} cannot be"
                " replayed when checkpointed BPTT recomputes a segment on a GPU (cuDNN draws it from its own state);"
                f" use model.tbptt.mode full or tbptt, dropout 0, or a min* recurrence ({device_setting}: {device_type})"
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_training_device(self.trainer.strategy.root_device.type)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            release_process_group_at_exit()
        if self._trainer is not None:
            log_against_updates(self._trainer)
        ds = self._deepspeed()
        if ds is None or stage != "fit":
            return
        if any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            # DeepSpeed writes the engine's weights and drops the checkpoint's state_dict, where
            # WeightAveraging puts the average: best files would hold the trained weights, and a
            # resume could not restore the average.
            raise ConfigError(
                "trainer.callbacks: weight averaging (EMAWeightAveraging, WeightAveraging) does not work with a"
                " DeepSpeed strategy, whose checkpoints keep the engine's weights only: use ddp, or drop the callback"
            )
        # ZeRO keeps the gradients in DeepSpeed's partitioned buffers, not in p.grad, so clipping
        # must be DeepSpeed's: set before Lightning builds the engine (strategy.setup follows this hook).
        clip = float(self.optim_cfg.clip_norm or 0.0)
        given = ds.config.get("gradient_clipping")
        if given is not None and float(given) != clip:
            raise ConfigError(
                f"model.optimizer.clip_norm ({self.optim_cfg.clip_norm}) and the DeepSpeed config's gradient_clipping"
                f" ({given}) disagree: distrnn clips through DeepSpeed, set clip_norm only"
            )
        ds.config["gradient_clipping"] = clip
        # fp16 under DeepSpeed: its own loss scaler skips overflowing updates and stops the run
        # when the scale is at its minimum; that minimum is distrnn's min_loss_scale. (Lightning
        # writes the strategy's min_loss_scale into the config's fp16 section in strategy.setup,
        # which follows this hook; a config given with an fp16 section keeps its own.)
        if ds.precision_plugin.precision in ("16-mixed", "16-true"):
            mine = self.optim_cfg.min_loss_scale
            fp16 = ds.config.get("fp16")
            if isinstance(fp16, dict):
                theirs = fp16.get("min_loss_scale")
            else:  # the strategy's argument, unless left at Lightning's default of 1
                theirs = ds.min_loss_scale if ds.min_loss_scale != 1 else None
            if theirs is not None and float(theirs) != mine:
                raise ConfigError(
                    f"model.optimizer.min_loss_scale ({mine:g}) and DeepSpeed's fp16 min_loss_scale ({theirs})"
                    " disagree: set model.optimizer.min_loss_scale only"
                )
            ds.min_loss_scale = mine
            if isinstance(fp16, dict):
                fp16["min_loss_scale"] = mine

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.optim_cfg
        params = self.model.parameters()
        # fused: one kernel for all parameters, and it skips an update on the device when told to
        # (found_inf), which lets stop_on_nonfinite run without a host sync per update
        fused = {"fused": True} if self._skips_on_device() else {}
        if c.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, **fused)
        elif c.name == "adam":
            opt = torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, **fused)
        else:
            opt = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, **fused)
        total: list[int] = []

        def factor(update: int) -> float:
            # The total is read lazily: asking the trainer for it while optimizers are configured
            # builds the train loader before a resumed checkpoint restores its read position.
            if not total and update > 0:
                total.append(max(1, self._total_updates()))
            if c.warmup_updates and update < c.warmup_updates:
                return (update + 1) / c.warmup_updates
            if c.schedule == "cosine":
                p = min(1.0, (update - c.warmup_updates) / max(1, (total[0] if total else 1) - c.warmup_updates))
                return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_updates(self) -> int:
        if self.trainer.max_steps != -1:  # global steps count optimizer updates
            return self.trainer.max_steps
        try:
            batches = int(self.trainer.estimated_stepping_batches)  # batches: max_epochs x len(loader)
        except Exception:
            return 1
        if self.tbptt_cfg.mode == "tbptt" and self.task.seq_len:
            return batches * math.ceil(self.task.seq_len / self.tbptt_cfg.k1)
        return batches

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called after fp16 unscaling and before the step (Lightning forbids the Trainer's
        # gradient_clip_val with manual optimization, so clipping lives here).
        if self._deepspeed() is not None:
            self._grad_norm = None  # DeepSpeed's engine clips and reports the norm after its step
            return
        self._check_finite()  # the last update's verdict and loss scale, read behind this update's backward
        scaler = self._loss_scaler()
        clip = self.optim_cfg.clip_norm
        self._grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip is not None else float("inf"), foreach=True
        )
        if self._unchecked_loss is not None:
            loss, self._unchecked_loss = self._unchecked_loss, None
            if optimizer.defaults.get("fused"):
                self._skip_if_nonfinite(optimizer, loss, self._grad_norm, hand_over=scaler is None)
            else:
                self._stop_if_nonfinite(loss, self._grad_norm)

    def _skips_on_device(self) -> bool:
        """Whether stop_on_nonfinite can skip a non-finite update on the device and find out one
        update later (:meth:`_skip_if_nonfinite`): a fused optimizer on CUDA or a CPU, not under
        DeepSpeed (its engine steps)."""
        return self.optim_cfg.stop_on_nonfinite and self.device.type in ("cuda", "cpu") and self._deepspeed() is None

    def _skip_if_nonfinite(self, optimizer: torch.optim.Optimizer, loss: Tensor, grad_norm: Tensor, hand_over: bool) -> None:
        """stop_on_nonfinite without a host sync per update. Whether this update's loss and
        gradients are finite is computed on the device and handed to the fused optimizer
        (``hand_over``), which skips the update there if not, as GradScaler has it skip an
        overflowing fp16 update. (Under fp16 loss scaling the scaler hands over its own flag, the
        gradients' overflow, which a non-finite loss raises too: here only the loss is checked.)
        The host reads the flag one update later, before that update's step (waiting only for the
        last update's gradients, not for the work queued since), or before a checkpoint is
        written, validation or the end of training, and raises naming the step: no update runs
        after a non-finite one. So the GPU is never left idle while the host reads a result, nothing of a
        non-finite update is applied and no checkpoint is written after it. Under DDP the
        gradients, and so the flags, are the same on every rank: every rank stops at the same
        update."""
        flag = self._nonfinite(loss, grad_norm).to(torch.float32)
        if hand_over:
            optimizer.found_inf = flag
        self._pending.put(self.global_step, self.global_rank, loss, grad_norm, flag)

    def _check_finite(self) -> None:
        """Raise for the last update if it was not finite (see :meth:`_skip_if_nonfinite`)."""
        self._pending.raise_if_nonfinite()

    def _stop_if_nonfinite(self, loss: Tensor, grad_norm: Optional[Tensor] = None) -> None:
        """FloatingPointError before the update is applied when the loss, or the gradients (DDP:
        after their all-reduce), are not finite; one host sync for both. Where the update cannot
        be skipped on the device (:meth:`_skips_on_device`): DeepSpeed (the loss, before its
        backward), devices other than CUDA and CPUs.

        Checked after the backward pass, not before it: a sync right after the forward would leave
        the GPU idle while the host queues the backward pass, kernel by kernel. Under DDP a NaN
        loss on one rank reaches every rank's gradients through the all-reduce, so every rank
        stops at the same update (a rank that stopped before its backward would leave the others
        waiting in the all-reduce). With fp16 loss scaling the gradients may overflow by design
        (the scaler skips that update): the loss alone is checked."""
        if self._nonfinite(loss, grad_norm).item():
            raise _nonfinite_error(loss, grad_norm, self.global_step, self.global_rank)

    def _nonfinite(self, loss: Tensor, grad_norm: Optional[Tensor]) -> Tensor:
        """True, on the device, when the loss or the gradients' norm is NaN or infinite (the
        norm is left out under fp16 loss scaling, whose overflows the scaler skips by design)."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None and self._loss_scaler() is None:
            bad = bad | ~torch.isfinite(grad_norm.to(loss.device))
        return bad

    def _update(self, x: Tensor, y: Tensor, mask: Tensor, reset: Tensor, mask_cpu: Tensor, n_loss: int, n_total: int,
                lr_scale: float) -> Optional[Tensor]:
        """One optimizer update over the window that ends with this chunk; returns this rank's mean
        loss (None if its rows have no loss step here). ``mask_cpu``: the chunk's loss mask on the
        host (where the head needs to run); ``n_loss``: its loss steps, ``n_total``: those of
        every rank's rows (:meth:`_loss_totals`)."""
        cfg = self.tbptt_cfg
        carry = self._carry
        if carry.history is not None:
            h = carry.history
            x = torch.cat([h["x"], x], dim=1)
            y = torch.cat([h["y"], y], dim=1)
            no_loss = torch.zeros(x.shape[0], h["x"].shape[1], dtype=torch.bool, device=mask.device)
            mask = torch.cat([no_loss, mask], dim=1)
            mask_cpu = torch.cat([torch.zeros(no_loss.shape, dtype=torch.bool), mask_cpu], dim=1)
            reset = torch.cat([h["reset"], reset], dim=1)
        cuts = self._resets_of_every_rank(reset)
        T_win = x.shape[1]
        keep = min(cfg.window - cfg.k1, T_win) if cfg.mode == "tbptt" else 0
        capture_at = T_win - keep if keep > 0 else None
        segment = cfg.k1 if cfg.mode == "checkpointed" else None

        if n_total == 0:
            # No loss in this chunk on any rank (e.g. a label at the end of a long sequence): move the state on.
            with torch.no_grad():
                res = run_window(self.model, self.task, x, y, mask, reset, carry.state, capture_at, mask_host=mask_cpu,
                                 cuts_T=cuts)
            self._advance_carry(res, x, y, reset, keep)
            return None

        opt = self.optimizers()
        sched = self.lr_schedulers()
        ds = self._deepspeed()
        # the mean over every rank's loss steps: DDP averages the ranks' gradients, so each rank
        # divides its sum by the total over the ranks' count (one process: its own count)
        per_rank = n_total / self.trainer.world_size
        opt.zero_grad(set_to_none=True)
        res = self._forward_backward(x, y, mask, reset, mask_cpu, carry.state, capture_at, segment, per_rank, ds, cuts)
        if self.optim_cfg.stop_on_nonfinite and ds is None:
            self._unchecked_loss = res.loss_sum / per_rank  # on_before_optimizer_step checks it
        scaler = self._loss_scaler()
        if scaler is not None and getattr(opt.optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves a fused optimizer's gradients scaled (its step could unscale them):
            # unscaled here, before the optimizer-step hooks (callbacks measure them, this module
            # clips them); the scaler then hands the step its overflow flag
            scaler.unscale_(opt.optimizer)
        scheduled = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:  # randomized chunk lengths: lr * length / k1 for this update only
            g["lr"] *= lr_scale
        step = self.global_step  # this update's index, as errors name it (the count before it)
        opt.step()  # with fp16 loss scaling, skipped if the gradients overflowed
        for g, lr in zip(opt.param_groups, scheduled):
            g["lr"] = lr
        if ds is not None:
            # before clipping, as clip_grad_norm_ returns; kept as a tensor: no host sync per update
            norm = ds.deepspeed_engine.get_global_grad_norm()
            self._grad_norm = None if norm is None else norm.detach() if isinstance(norm, Tensor) else torch.as_tensor(norm)
        if scaler is not None:  # read with the next update's verdict: no host sync here
            self._pending.put_scale(step, self.global_rank, scaler._get_scale_async(), self.optim_cfg.min_loss_scale)
        sched.step()
        self._advance_carry(res, x, y, reset, keep)
        return res.loss_sum / n_loss if n_loss else None

    def _row_groups(self, B: int) -> list[slice]:
        """The batch's rows in groups of ``model.tbptt.micro_batch_size`` (one group: the whole batch)."""
        m = self.tbptt_cfg.micro_batch_size
        if m is None or m >= B:
            return [slice(None)]
        return [slice(a, min(a + m, B)) for a in range(0, B, m)]

    def _forward_backward(self, x: Tensor, y: Tensor, mask: Tensor, reset: Tensor, mask_cpu: Tensor,
                          state: Optional[State], capture_at: Optional[int], segment: Optional[int], per_rank: float,
                          ds: Optional[Any], cuts: Optional[Tensor] = None) -> WindowResult:
        """The window's forward and backward passes; returns the detached loss sum and states.

        With ``model.tbptt.micro_batch_size`` the rows go through in groups, each from its rows of
        the carried state (rows are independent sequences), the gradients summing up in ``.grad``
        to the whole batch's; a group without a loss step in the window only moves its state on,
        without autograd. DDP all-reduces once, in the last backward: the others run under the
        strategy's ``block_backward_sync`` (DDP's ``no_sync``), where the gradients only
        accumulate.

        A rank whose rows have no loss step in the window while another rank's do still runs a
        backward (the last group's, of a zero loss): every rank must join each update's gradient
        all-reduce, or the ranks wait for each other forever (or pair one update's all-reduce with
        another's). Under DeepSpeed every group runs a backward (ZeRO reduces in each), and under
        ZeRO-3 every rank calls the same modules (``cuts``: every rank's reset steps)."""
        groups = self._row_groups(x.shape[0])
        with_loss = [bool(mask_cpu[rows].any()) for rows in groups]
        ds_groups = ds is not None and len(groups) > 1
        if ds_groups:
            # ZeRO-2/3 reduce (a collective) in every backward, boundary or not: every rank runs
            # one per group, a group without a loss step a zero loss
            with_loss = [has or None for has in with_loss]
        if not any(with_loss):
            with_loss[-1] = None  # a zero loss, with a graph through every parameter
        last = max(i for i, has in enumerate(with_loss) if has is not False)
        # (DeepSpeed's engine answers Lightning's no_sync but refuses it under ZeRO-2/3)
        parallel = isinstance(self.trainer.strategy, ParallelStrategy) and ds is None
        zero3 = ds is not None and ds.zero_stage_3
        parts = []
        for i, rows in enumerate(groups):
            def part(t: Tensor) -> Tensor:
                return t if rows == slice(None) else t[rows]

            args = (self.model, self.task, part(x), part(y), part(mask), part(reset), state if rows == slice(None)
                    else slice_state(state, rows), capture_at)
            if with_loss[i] is False:  # these rows only move their state on, as a window without a loss does
                with torch.no_grad():
                    res = run_window(*args, mask_host=part(mask_cpu), cuts_T=cuts)
            else:
                block = self.trainer.strategy.block_backward_sync() if parallel and i != last else nullcontext()
                if ds_groups:
                    self._deepspeed_micro_step(ds.deepspeed_engine, boundary=i == last)
                with block:
                    # mask_host None: the head and the (zero) loss over every step, so every
                    # parameter has a gradient for the all-reduce. Under ZeRO-3 always: each
                    # module call gathers its parameters (a collective), so every rank must call
                    # the same modules, whatever steps its own rows have losses at
                    res = run_window(*args, segment, partitioned=zero3,
                                     mask_host=None if with_loss[i] is None or zero3 else part(mask_cpu), cuts_T=cuts,
                                     overlap=self.tbptt_cfg.overlap_recompute)
                    loss = res.loss_sum / per_rank
                    if ds is not None and self.optim_cfg.stop_on_nonfinite:
                        # DeepSpeed's engine clips inside its step: no gradient norm before the step
                        # for the ranks to agree on, so the loss is checked before the backward pass
                        self._stop_if_nonfinite(loss.detach())
                    self.manual_backward(loss)
            # nothing of the group's graph outlives its backward
            parts.append(WindowResult(res.loss_sum.detach(), detach_state(res.state), detach_state(res.captured)))
        if len(parts) == 1:
            return parts[0]
        return WindowResult(
            torch.stack([p.loss_sum for p in parts]).sum(),
            cat_states([p.state for p in parts]),
            None if parts[0].captured is None else cat_states([p.captured for p in parts]),
        )

    def _resets_of_every_rank(self, reset: Tensor) -> Optional[Tensor]:
        """Under ZeRO-3 on several processes, the steps where any process's rows reset (host bools,
        for ``RecurrentModel.hidden``'s cuts): each layer call gathers the layer's parameters, a
        collective, so every process must call the layers equally often, and cuDNN layers are
        cut at resets. One all-reduce per window; under NCCL the host waits for it, just after
        ZeRO-3's step, which reads its overflow flag on the host every update (DeepSpeed 0.19), has
        drained the queue. None elsewhere."""
        if not forward_is_collective(self.trainer):
            return None
        return self._all_reduce_to_host(reset.any(dim=0).to(torch.int32), torch.distributed.ReduceOp.MAX).bool()

    def _all_reduce_to_host(self, t: Tensor, op: Any = torch.distributed.ReduceOp.SUM) -> Tensor:
        """All-reduce a small host tensor over the ranks; back on the host. Gloo reduces it there;
        NCCL takes a device tensor, whose result the host then waits for."""
        on_host = torch.distributed.get_backend() == "gloo"
        t = t if on_host else t.to(self.device)
        torch.distributed.all_reduce(t, op=op)
        return t.cpu()

    @staticmethod
    def _deepspeed_micro_step(engine: Any, boundary: bool) -> None:
        """Before a group's forward: what DeepSpeed's engine does at each micro-batch of its own
        gradient accumulation, which Lightning leaves at one micro-batch per step. The boundary,
        set by hand, says whether this backward ends the update (reduce, then ``step``); the
        optimizer's new-micro-step hook (the engine's ``forward`` calls it, and Lightning calls that
        once per batch) makes ZeRO-3 add this group's gradient partitions to the last group's instead
        of overwriting them."""
        engine.set_gradient_accumulation_boundary(boundary)
        if hasattr(engine.optimizer, "clear_backward_seen_flag"):
            engine.optimizer.clear_backward_seen_flag()

    def _loss_totals(self, batch: dict[str, Any], bounds: list[tuple[int, int]], counts: list[int]) -> list[int]:
        """The loss steps of each update window of this batch over every rank's rows. Under DDP
        the ranks must agree on which windows are updates (see :meth:`_forward_backward`) and on
        the count the mean divides by: from the loader's ``mask_total`` (the count at each step
        over all ranks' rows, which a stream loader knows from its streams' lengths), else one
        all-reduce of the counts per batch."""
        if self.trainer.world_size == 1:
            return counts
        total_T = batch.get("mask_total")
        if total_T is not None:
            total_T = total_T.cpu()
            return [int(total_T[a:b].sum()) for a, b in bounds]
        # on the host under gloo; NCCL takes a device tensor, whose result the host then waits for
        # (once per batch: a stream loader's and the synthetic tasks' batches carry their totals)
        return self._all_reduce_to_host(torch.tensor(counts, dtype=torch.int64)).tolist()

    def _loss_scaler(self) -> Optional[torch.amp.GradScaler]:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _advance_carry(self, res: Any, x: Tensor, y: Tensor, reset: Tensor, keep: int) -> None:
        if keep > 0:
            start = x.shape[1] - keep
            self._carry = Carry(
                detach_state(res.captured),
                {"x": x[:, start:].detach(), "y": y[:, start:].detach(), "reset": reset[:, start:]},
            )
        else:
            self._carry = Carry(detach_state(res.state), None)

    # ---------------------------------------------------------------- steps

    def _unpack(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Move x, y, mask to the device; the reset mask and a copy of the loss mask stay on the
        host, where their boundaries and counts are read without a device sync."""
        # (distrnn's loaders pin in their prefetch thread when the run is on CUDA; others' here)
        x = to_device_queued(batch["x"], self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = to_device_queued(batch["y"], self.device)
        if y.is_floating_point():
            y = y.to(self.dtype)
        mask_cpu = batch["mask"].cpu()
        return x, y, to_device_queued(mask_cpu, self.device), batch["reset"].cpu(), mask_cpu

    def training_step(self, dataloader_iter: Iterator) -> None:
        batch, _, _ = next(dataloader_iter)  # StopIteration ends the epoch
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None
        if self._t_last is None:
            self._t_last = time.perf_counter()
        x, y, mask, reset, mask_cpu = self._unpack(batch)
        B, T = x.shape[0], x.shape[1]
        if self._carry.batch_size() not in (None, B):
            self._carry = Carry()  # a smaller last batch: its rows all start new sequences
        dtype = None
        if self._carry_restored:
            # a restored state takes this run's weights' dtype (under autocast either is cast the
            # same way; DeepSpeed casts the weights itself, so Lightning's self.dtype may not say it)
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
            self._carry_restored = False
        self._carry = self._carry.to(self.device, dtype)
        cfg = self.tbptt_cfg
        if cfg.mode == "tbptt":
            bounds = chunk_bounds(T, cfg.k1, cfg.randomize, self.seed, batch["epoch"], batch["index"])
        else:
            bounds = [(0, T)]
        counts = [int(mask_cpu[:, a:b].sum()) for a, b in bounds]
        totals = self._loss_totals(batch, bounds, counts)
        losses, weights = [], []
        for (a, b), n, total in zip(bounds, counts, totals):
            scale = (b - a) / cfg.k1 if cfg.randomize else 1.0
            loss = self._update(x[:, a:b], y[:, a:b], mask[:, a:b], reset[:, a:b], mask_cpu[:, a:b], n, total, scale)
            if loss is not None:
                losses.append(loss * n)
                weights.append(n)
        self._tokens_since_log += B * T
        if not weights or not self._should_log():
            return
        # Logging costs ~1 ms a call in Lightning; metrics reach the logger only every
        # log_every_n_steps anyway, so the other steps skip it.
        mean = torch.stack(losses).sum() / sum(weights)
        on_device = [mean] if self._grad_norm is None else [mean, self._grad_norm.to(mean.device)]
        # Every value is logged as a host tensor, the device's in one copy here. Lightning keeps
        # the last logged values and reads the progress bar's with .item() after every batch
        # (its logger connector, bar or no bar, and the bar) until the next log: a CUDA tensor
        # there made each batch wait for the GPU to finish all the work queued (and Lightning
        # turns a logged number into a device tensor, a wait per call). Now: one per log step.
        host = torch.stack([v.detach().to(mean.dtype) for v in on_device]).cpu()
        self.log("train/loss", host[0], prog_bar=True, batch_size=sum(weights))
        if self.task.kind == "language_model":
            self.log(f"train/{self.task.bits_metric}", host[0] / LN2, batch_size=sum(weights))
        if self._grad_norm is not None:
            self.log("train/grad_norm", host[1], batch_size=B)
        self.log("train/lr", _on_host(self.optimizers().param_groups[0]["lr"]), batch_size=B)
        scaler = self._loss_scaler()
        if scaler is not None:
            self.log("train/loss_scale", _on_host(scaler.get_scale()), batch_size=B)
        now = time.perf_counter()
        self.log("train/tokens_per_s", _on_host(self._tokens_since_log / max(now - self._t_last, 1e-9)), batch_size=B)
        self._t_last, self._tokens_since_log = now, 0

    def _should_log(self) -> bool:
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_start(self) -> None:
        # If anything built the train loader before Lightning restored the checkpoint (a callback
        # asking for estimated_stepping_batches early), Lightning keeps the read position pending
        # and never applies it; apply it here, before the first batch is read.
        fit_loop = self.trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None) and fit_loop._combined_loader is not None:
            fit_loop._combined_loader._load_state_dicts(fit_loop._combined_loader_states_to_load)
            fit_loop._combined_loader_states_to_load = []
        self._apply_configured_optimizer()
        self._pending = _PendingCheck()

    def _apply_configured_optimizer(self) -> None:
        """A resumed run restores the optimizer's and the schedule's state with the settings of the
        run that saved them: the configured ones win (a resume with a lower lr or another weight
        decay, a PBT trial restarted from another trial's checkpoint with a perturbed lr), the
        schedule's factor at the restored step applied to the configured lr. A no-op on a new run."""
        c = self.optim_cfg
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                continue
            sched.base_lrs = [c.lr for _ in sched.base_lrs]
            for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
                group["initial_lr"] = c.lr
                group["lr"] = c.lr * factor(sched.last_epoch)
                group["weight_decay"] = c.weight_decay
                if "betas" in group:
                    group["betas"] = c.betas
                if "momentum" in group:
                    group["momentum"] = c.momentum
        if self._deepspeed() is not None:
            return
        for opt in self.trainer.optimizers:
            if "fused" not in getattr(opt, "defaults", {}):
                continue
            fused = opt.defaults["fused"]
            for group in opt.param_groups:
                # a checkpoint from before the fused optimizer, or from an fp16 run: this run's choice
                group["fused"] = fused
                for p in group["params"]:
                    st = opt.state.get(p)
                    if st and isinstance(st.get("step"), Tensor):
                        # fused optimizers count steps on the parameter's device, the others on the host
                        st["step"] = st["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)

    def on_train_end(self) -> None:
        self._check_finite()  # the last update's

    def on_train_epoch_start(self) -> None:
        self._t_last, self._tokens_since_log = None, 0

    def on_validation_epoch_start(self) -> None:
        self._check_finite()  # validation and the checkpoints it triggers see only finite updates
        self._val_state = None
        self._eval_sums, self._eval_count = None, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_start(self) -> None:
        self._val_state = None
        self._eval_sums, self._eval_count = None, 0

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_predict_epoch_start(self) -> None:
        self._val_state = None

    def _eval_forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The model over one evaluation batch, the state carried from the batch before: a
        stream corpus serves each stream's next chunk in the same row (other loaders reset every
        row at its first step)."""
        x, y, mask, reset, mask_cpu = self._unpack(batch)
        state = self._val_state
        if state is not None and state_tensors(state)[0].shape[1] != x.shape[0]:
            state = None
        y_hat, state = self.model(x, state, reset, self._resets_of_every_rank(reset))
        self._val_state = detach_state(state)
        return y_hat, y, mask, mask_cpu

    def _eval_step(self, batch: dict[str, Any]) -> None:
        """Adds the batch's summed loss (and correct answers) over its labelled steps to the
        epoch's sums, on the device; :meth:`_log_eval` reduces them once at the epoch's end."""
        y_hat, y, mask, mask_cpu = self._eval_forward(batch)
        n = int(mask_cpu.sum())
        if n == 0:
            return
        dtype = torch.float32 if y_hat.device.type == "mps" else torch.float64
        correct = ((y_hat.argmax(-1) == y) & mask).sum() if self.task.kind == "classification" else y_hat.new_zeros(())
        sums = torch.stack([loss_sum(y_hat, y, mask, self.task).to(dtype), correct.to(dtype)])
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums
        self._eval_count += n

    def _log_eval(self, stage: str) -> None:
        """The epoch's metrics over every labelled step of every rank: the sums all-reduced once
        (every rank calls this, whatever it evaluated), the means taken over the total count, so
        they equal one process's; nothing is logged when no rank had a labelled step (one process
        logs nothing then either; a mean over ranks of per-rank means would be 0/0)."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        sums = self._eval_sums if self._eval_sums is not None else torch.zeros(2, dtype=dtype, device=self.device)
        totals = torch.cat([sums.to(self.device, dtype), torch.tensor([float(self._eval_count)], dtype=dtype, device=self.device)])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_total, correct, n = totals.tolist()
        self._eval_sums, self._eval_count = None, 0
        if n == 0:
            return
        # the same numbers on every rank: sync_dist only keeps Lightning from warning about an
        # epoch-level value logged without it (its mean over ranks is the value itself)
        loss = loss_total / n
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        if self.task.kind == "language_model":
            self.log(f"{stage}/{self.task.bits_metric}", loss / LN2, sync_dist=True)
        elif self.task.kind == "classification":
            self.log(f"{stage}/accuracy", correct / n, prog_bar=True, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """On the host: ``prediction`` (regression: the values; otherwise the most probable class,
        with its ``probability``), ``target`` and ``mask`` (the steps that have a target)."""
        y_hat, y, _, mask_cpu = self._eval_forward(batch)
        if self.task.kind == "regression":
            out = {"prediction": y_hat.float().cpu()}
        else:
            p, k = torch.softmax(y_hat.float(), dim=-1).max(dim=-1)
            out = {"prediction": k.cpu(), "probability": p.cpu()}
        return {**out, "target": y.cpu(), "mask": mask_cpu}

    # ---------------------------------------------------------------- checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite()  # before anything is written: no checkpoint holds a skipped update's step
        # Lightning writes the file from rank 0 only, but every rank carries its own hidden state
        # and RNG: gather them (every rank runs this hook) so the checkpoint holds all of them.
        mine = {"carry": self._carry.to_dict(), "rng": capture_rng()}
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * world
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "world_size": len(ranks), "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        d = checkpoint.get(CHECKPOINT_KEY)
        if d is None:
            return  # weights-only use (generate, fine-tuning from a foreign file)
        world, rank = 1, 0
        if self._trainer is not None:
            if self.trainer.state.fn != TrainerFn.FITTING:
                return  # validate, test, predict: the weights only; training's streams are not read
            world, rank = self.trainer.world_size, self.trainer.global_rank
        check_carried_state(checkpoint, world)
        mine = d["ranks"][rank]
        self._carry = Carry.from_dict(mine["carry"])
        self._carry_restored = True
        # Applied at the first training step, after Lightning's own start-up (sanity validation),
        # so the resumed run continues with the generator the original had after its last step.
        self._pending_rng = mine["rng"]
