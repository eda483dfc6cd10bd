"""The base of every distrnn data module: the task it describes, and rank-aware resumable loaders."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.loaders import ResumableLoader, StreamLoader


class RecurrentDataModule(L.LightningDataModule):
    """Subclasses set ``self.task`` in ``__init__`` (the CLI links it to ``model.task``) and build
    their loaders with :meth:`_loader`."""

    task: TaskSpec

    def __init__(self, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size: must be > 0, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    LOADERS = {"fit": ("train_dataloader", "val_dataloader"), "validate": ("val_dataloader",),
               "test": ("test_dataloader",), "predict": ("predict_dataloader",)}

    def check(self, stage: str) -> dict[str, Any]:
        """Read the input of ``stage`` and build its loaders once, so that a bad file or a size
        that does not fit fails (a ConfigError) before a run starts: inside ``trainer.fit`` it
        would come after the MLflow run was opened. ``setup`` keeps what it read. Returns the
        loaders by method name."""
        self.setup(stage)
        return {name: getattr(self, name)() for name in self.LOADERS[stage]}

    def predict_dataloader(self):
        return self.val_dataloader()

    def datasets(self) -> dict[str, "DataSource"]:
        """What each split (``train``, ``val``) holds, for MLflow's dataset tracking (the run's
        "Datasets" in the UI: name, source and a digest of the content, so runs over the same data
        show the same digest and a changed file another). After :meth:`check`. Empty: not tracked."""
        return {}

    def _bind(self, loader: ResumableLoader) -> ResumableLoader:
        if self.trainer is not None:
            trainer = self.trainer
            loader.bind_epoch(lambda: trainer.current_epoch)
            loader.pin_device = _cuda_device(trainer)
            loader.prefetch = loader.pin_device is not None
            if hasattr(loader, "pad_uneven"):
                loader.pad_uneven = forward_is_collective(trainer)
        return loader


def forward_is_collective(trainer: L.Trainer) -> bool:
    """Whether every rank must run every forward pass: ZeRO-3 gathers each module's parameters
    from all ranks at its call, so a rank with one evaluation batch fewer would leave the others
    waiting forever."""
    try:
        return bool(getattr(trainer.strategy, "zero_stage_3", False)) and trainer.world_size > 1
    except (AttributeError, RuntimeError):  # a strategy not set up yet (a config check)
        return False


def _cuda_device(trainer: L.Trainer) -> Optional[torch.device]:
    try:
        device = trainer.strategy.root_device
    except (AttributeError, RuntimeError):  # a strategy not set up yet (a config check)
        return None
    return device if device.type == "cuda" else None


@dataclass
class DataSource:
    """One split of a data module as MLflow's dataset tracking records it (:meth:`RecurrentDataModule.datasets`)."""

    name: str
    uri: str
    """A file or folder; for data made by code, the class and arguments that make it."""
    content: list[Any]
    """What the digest is taken of: tensors (sampled when large, :func:`content_digest`) and strings."""
    profile: dict[str, Any]
    source_type: str = "local"


def content_digest(parts: list[Any], whole_up_to: int = 64 << 20, spans: int = 256, span: int = 64 << 10) -> str:
    """SHA-256 of the parts (their shapes and dtypes too), first 16 hex digits. A tensor of up to
    ``whole_up_to`` bytes is read whole; a larger one (a corpus of gigabytes, memory-mapped) as
    ``spans`` spans of ``span`` bytes spread evenly from its first byte to its last, so the digest
    costs ~16 MiB of reading whatever the size: a change between two spans goes unseen."""
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        if not isinstance(part, Tensor):
            h.update(f"str:{part}".encode())
            continue
        h.update(f"tensor:{part.dtype}:{tuple(part.shape)}".encode())
        flat = part.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        n = raw.numel()
        if n <= whole_up_to:
            h.update(raw.numpy().tobytes())
        else:
            for i in range(spans):
                at = (n - span) * i // (spans - 1)
                h.update(raw[at : at + span].numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Split:
    """One split of a token corpus: its ids, the positions where its documents start (the state
    resets there), and how errors name it (the config key and file)."""

    tokens_N: Tensor
    doc_starts_D: Optional[Tensor]
    source: str


class StreamCorpusDataModule(RecurrentDataModule):
    """A token corpus served as B contiguous streams per rank (:class:`StreamLoader`): the one
    place where corpus modules build their loaders. Subclasses read their splits in
    :meth:`read_splits`; :meth:`tail_split` holds out the end of one corpus for validation."""

    def __init__(self, batch_size: int, seq_len: int, val_fraction: Optional[float], seed: int = 0,
                 vocab_size: Optional[int] = None) -> None:
        """``val_fraction``: None when validation has its own data (no :meth:`tail_split`)."""
        super().__init__(batch_size, seed)
        if seq_len <= 0:
            raise ConfigError(f"data.seq_len: must be > 0, got {seq_len}")
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
        self.seq_len, self.val_fraction, self._vocab_check = seq_len, val_fraction, vocab_size
        self.splits: Optional[dict[str, Split]] = None

    def read_splits(self) -> dict[str, Split]:
        """``{"train": Split, "val": Split}``."""
        raise NotImplementedError

    def tail_split(self, tokens_N: Tensor, doc_starts_D: Optional[Tensor], source: str) -> dict[str, Split]:
        n = tokens_N.numel()
        at = n - max(2, int(n * self.val_fraction))

        def starts(a: int, b: int) -> Optional[Tensor]:
            return None if doc_starts_D is None else doc_starts_D[(doc_starts_D >= a) & (doc_starts_D < b)] - a

        return {"train": Split(tokens_N[:at], starts(0, at), source), "val": Split(tokens_N[at:], starts(at, n), source)}

    def setup(self, stage: str) -> None:
        if self.splits is None:
            self.splits = self.read_splits()

    def _streams(self, split: str, batch_size: int) -> StreamLoader:
        s = self.splits[split]
        try:
            loader = StreamLoader(s.tokens_N, batch_size, self.seq_len, s.doc_starts_D, self.rank, self.world_size,
                                  self._vocab_check, s.source)
        except ValueError as e:
            raise ConfigError(f"data.batch_size: {e}") from None
        return self._bind(loader)

    def train_dataloader(self) -> StreamLoader:
        return self._streams("train", self.batch_size)

    def val_dataloader(self) -> StreamLoader:
        n = self.splits["val"].tokens_N.numel()
        return self._streams("val", max(1, min(self.batch_size, (n - 1) // self.seq_len)))

    def test_dataloader(self) -> StreamLoader:
        return self.val_dataloader()

    def datasets(self) -> dict[str, DataSource]:
        out = {}
        for split, s in (self.splits or {}).items():
            uri = s.source.partition(" ")[2]  # "<config key> <path>"
            docs = [] if s.doc_starts_D is None else [s.doc_starts_D]
            profile = {"tokens": s.tokens_N.numel(), **({"documents": s.doc_starts_D.numel()} if docs else {})}
            out[split] = DataSource(self.dataset_name(), uri, [s.tokens_N, *docs], profile)
        return out

    def dataset_name(self) -> str:
        return type(self).__name__

    def check(self, stage: str) -> dict[str, Any]:
        loaders = super().check(stage)
        for loader in loaders.values():  # the ends of each split: ids from a wrong dtype show at once
            loader.make_batch(0, 0)
            loader.make_batch(0, loader.num_batches() - 1)
        return loaders


def map_file(path: Path, dtype: Any = np.uint8) -> Tensor:
    """A file of ``dtype`` values as a tensor over a memory mapping: nothing is read until a batch
    touches it. Copy-on-write, so the tensor is writable without the file being writable; nothing
    writes to it."""
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c"))


def existing_path(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: no such file or folder: {path}")
    return path


def build_once(where: Path, name: str, prefix: str, suffixes: tuple[str, ...], build: Callable[..., None],
               what: str) -> tuple[Path, ...]:
    """The cached files ``where/{name}{suffix}``, made by ``build(*paths)`` when one is missing.

    ``name`` holds a digest of everything the files are made from, so changed inputs make new
    files; those of an older name that starts with ``prefix`` (the same inputs, changed since) are
    removed. One process builds while the others wait on a lock (ranks started together:
    torchrun), then find the files. They are written to temporary paths and renamed, so a file
    there is whole, and a run still reading an older one keeps it (unlinked) until it ends."""
    outs = tuple(where / f"{name}{suffix}" for suffix in suffixes)
    if all(p.exists() for p in outs):
        return outs
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write {what} into {where}: {e}") from None
    from filelock import FileLock

    with FileLock(str(where / f".{name}.lock")):
        if not all(p.exists() for p in outs):
            tmps = tuple(where / f".{p.name}.{os.getpid()}.tmp" for p in outs)
            # a large corpus takes a while, once: say so, rather than a silent pause before the run
            print(f"distrnn: writing {what} into {where} (once: later runs reuse it)", file=sys.stderr, flush=True)
            try:
                build(*tmps)
                for tmp, out in zip(tmps, outs):
                    os.replace(tmp, out)
            except OSError as e:
                raise ConfigError(f"data.cache_dir: cannot write {what} into {where}: {e}") from None
            finally:
                for tmp in tmps:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
    for old in [*where.glob(glob_escape(prefix) + "*"), *where.glob("." + glob_escape(prefix) + "*.lock")]:
        if not old.name.lstrip(".").startswith(name + "."):
            with contextlib.suppress(OSError):
                old.unlink()
    return outs
