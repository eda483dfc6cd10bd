"""Typed configuration of a training run.

Each dataclass is one block of the YAML config (``model.network``, ``model.tbptt``,
``model.optimizer``); jsonargparse reads the field docstrings into ``--help``. Validation happens
in ``__post_init__`` so that a bad value fails with the key's name before anything is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, TypeVar


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class NetworkConfig:
    """The recurrent network: input encoder, recurrent stack, task head."""

    recurrence: str = "lstm"
    """Registered recurrence name: elman, lstm, gru (cuDNN), mingru, minlstm (parallel scan), or any layer
    added with ``register_recurrence``."""
    hidden_size: int = 128
    """Hidden units per layer (H)."""
    num_layers: int = 1
    """Stacked recurrent layers."""
    dropout: float = 0.0
    """Dropout between stacked layers."""
    embedding_dim: Optional[int] = None
    """Embedding size for token inputs; None uses hidden_size. Ignored for real-valued inputs."""
    nonlinearity: Optional[Literal["tanh", "relu"]] = None
    """Elman RNN only: f in h_t = f(W x_t + U h_{t-1} + b); tanh when unset."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the recurrence, e.g. {norm: true, residual: true} for mingru/minlstm."""

    def __post_init__(self) -> None:
        _check(self.hidden_size > 0, "model.network.hidden_size", f"must be > 0, got {self.hidden_size}")
        _check(self.num_layers > 0, "model.network.num_layers", f"must be > 0, got {self.num_layers}")
        _check(0.0 <= self.dropout < 1.0, "model.network.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.embedding_dim is not None:
            _check(self.embedding_dim > 0, "model.network.embedding_dim", f"must be > 0, got {self.embedding_dim}")
        if self.nonlinearity is not None:
            _check(self.recurrence == "elman", "model.network.nonlinearity", "only the elman recurrence takes it")


@dataclass
class TBPTTConfig:
    """How gradients flow through time.

    ``tbptt``: truncated BPTT(k1, k2) after Williams & Peng: an optimizer update every k1 steps,
    gradients through the last k2 >= k1 steps, the hidden state carried forward and detached.
    ``full``: one update per batch, gradients through the whole batch.
    ``checkpointed``: the gradients of ``full`` with memory for T/k1 states and k1 steps of
    activations: segments of k1 steps are recomputed in the backward pass.
    """

    mode: Literal["tbptt", "full", "checkpointed"] = "tbptt"
    """Gradient mode: tbptt, full or checkpointed."""
    k1: int = 100
    """Steps between updates (tbptt) or segment length (checkpointed)."""
    k2: Optional[int] = None
    """Steps that gradients flow back through (tbptt); at least k1; None means k1."""
    randomize: bool = False
    """awd-lstm-lm variable chunk length: k1 (k1/2 with probability 0.05), then N(that, 5), at least 5;
    the learning rate is scaled by length/k1."""
    micro_batch_size: Optional[int] = None
    """Rows (streams) per forward and backward pass: each update's batch goes through in groups of
    this many rows, their gradients summed (under DDP all-reduced once, after the last group)
    before the one optimizer step. The update equals the whole batch's (dropout aside, whose draws
    differ) at the activation memory of one group. None: the whole batch at once. Not with DeepSpeed."""
    overlap_recompute: bool = False
    """checkpointed: each segment's backward first issues the recomputation of the segment before
    it, on a CUDA side stream, so that on a GPU the two run at once (a recurrence at a small batch
    leaves most of the GPU idle); the activations of two segments are held instead of one. The
    same gradients; on a CPU the same order, one after the other. Not under ZeRO-3."""

    def __post_init__(self) -> None:
        _check(self.k1 > 0, "model.tbptt.k1", f"must be > 0, got {self.k1}")
        if self.micro_batch_size is not None:
            _check(self.micro_batch_size > 0, "model.tbptt.micro_batch_size", f"must be > 0 or null, got {self.micro_batch_size}")
        if self.k2 is not None:
            _check(self.k2 >= self.k1, "model.tbptt.k2", f"must be >= k1 ({self.k1}), got {self.k2}")
            _check(self.mode == "tbptt", "model.tbptt.k2", f"only applies to mode 'tbptt', not {self.mode!r}")
        _check(not self.randomize or self.mode == "tbptt", "model.tbptt.randomize", "only applies to mode 'tbptt'")
        _check(not self.overlap_recompute or self.mode == "checkpointed", "model.tbptt.overlap_recompute",
               f"only applies to mode 'checkpointed', not {self.mode!r}")

    @property
    def window(self) -> int:
        return self.k2 if self.k2 is not None else self.k1


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    momentum: float = 0.0
    """SGD momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    clip_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value; None turns clipping off."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule over optimizer updates."""
    warmup_updates: int = 0
    """Linear warm-up updates."""
    min_lr_ratio: float = 0.1
    """cosine: final learning rate as a fraction of lr."""
    stop_on_nonfinite: bool = True
    """Stop with an error naming the step and rank when a loss or the gradients are NaN or infinite,
    with nothing of that update applied; under DDP every rank stops at the same update. The fused
    optimizer skips the update on the device and the host finds out one update later (no host
    sync per update; DeepSpeed and fp16 loss scaling: one, each update)."""
    min_loss_scale: float = 1.0
    """fp16 (``trainer.precision: 16-mixed``): an update whose gradients overflow is skipped and the
    loss scale halved; if the scale falls below this, the gradients overflow whatever the scale
    (a diverged run) and training stops with an error instead of skipping every update."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _check(self.min_loss_scale > 0, "model.optimizer.min_loss_scale", f"must be > 0, got {self.min_loss_scale}")
        _check(self.lr > 0, "model.optimizer.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "model.optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None:
            _check(self.clip_norm > 0, "model.optimizer.clip_norm", f"must be > 0 or null, got {self.clip_norm}")
        _check(self.warmup_updates >= 0, "model.optimizer.warmup_updates", "must be >= 0")
        # (torch refuses these too, but only when the optimizer is built: inside fit, the run open)
        _check(all(0 <= b < 1 for b in self.betas), "model.optimizer.betas", f"each must be in [0, 1), got {list(self.betas)}")
        _check(self.momentum >= 0, "model.optimizer.momentum", f"must be >= 0, got {self.momentum}")
        _check(0 <= self.min_lr_ratio <= 1, "model.optimizer.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TaskSpec:
    """What the data looks like to the model; every data module provides one (linked by the CLI)."""

    kind: Literal["language_model", "classification", "regression"]
    """language_model: next-token cross-entropy, bits per token; classification: cross-entropy and
    accuracy at the masked steps; regression: mean squared error at the masked steps."""
    output_dim: int
    """Classes (vocabulary) or regression targets."""
    vocab_size: Optional[int] = None
    """Token inputs with this vocabulary; None means real-valued inputs of input_dim features."""
    input_dim: int = 1
    """Features per step of real-valued inputs."""
    seq_len: Optional[int] = None
    """Steps per training batch: the sequence length T, or the chunk length a stream serves."""
    token_unit: Literal["byte", "token"] = "byte"
    """language_model: what a token is, which names the bits metric: ``bpb`` (bits per byte) for
    bytes, ``bpt`` (bits per token) for a tokenizer's ids."""

    def __post_init__(self) -> None:
        _check(self.output_dim > 0, "data.output_dim", f"must be > 0, got {self.output_dim}")

    @property
    def bits_metric(self) -> str:
        return "bpb" if self.token_unit == "byte" else "bpt"


C = TypeVar("C")


def coerce(cls: type[C], value: Any) -> C:
    """Accept a dataclass, a dict (from a checkpoint's hyperparameters) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**value)
    raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(value).__name__}")


def to_plain(cfg: Any) -> Any:
    """A dataclass as plain containers, so that checkpoints load with ``weights_only=True``."""
    if cfg is None:
        return None
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
