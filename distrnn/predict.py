"""``distrnn predict``: the model's predictions for the data module's predict split, to one file."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class WritePredictions(BasePredictionWriter):
    """Writes ``torch.save({"task", "rank", "world_size", "batches"})`` to ``path`` when prediction
    ends: ``batches`` holds one dict per batch of the predict loader, in its order, each with
    ``prediction`` (regression: the values, in the data's own units when the data module
    standardized them; otherwise the most probable class and its ``probability``), ``target`` and
    ``mask`` (the steps that have a target). For a stream corpus batch ``i`` is chunk ``i`` of every
    stream (the state carried across batches, as in validation). With several ranks each writes
    its own share, ``NAME.rank{r}.pt``. Load it with ``torch.load(path, weights_only=True)``
    (``mmap=True``: without reading it all).

    Predictions over a long corpus may not fit in memory: each batch goes to disk as it comes (a
    folder beside ``path``, ``.NAME.parts-PID``), and the file is assembled at the end from those
    parts memory-mapped, so the process holds about one batch (the parts' pages are the page
    cache's, which the kernel reclaims). The file is written under a temporary name and renamed: a
    file that is there is whole; a prediction that fails leaves no parts behind.

    Args:
        path: the file to write.
    """

    def __init__(self, path: str = "predictions.pt") -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.written: Optional[Path] = None
        self._parts: Optional[Path] = None
        self._count = 0

    def _target(self, trainer: Trainer) -> Path:
        path = Path(self.path).expanduser()  # a quoted "~/p.pt" made a folder named "~"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._discard()
        path = self._target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._parts, self._count = path.with_name(f".{path.name}.parts-{os.getpid()}"), 0
        shutil.rmtree(self._parts, ignore_errors=True)  # a killed process's, whose pid this one reuses
        self._parts.mkdir()

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if isinstance(batch, dict) and batch.get("padding"):
            return  # a rank's stand-in for a batch it does not have (TensorLoader.pad_uneven)
        inverse = getattr(trainer.datamodule, "inverse_targets", None)
        if callable(inverse) and pl_module.task.kind == "regression":
            prediction = {**prediction, "prediction": inverse(prediction["prediction"]), "target": inverse(prediction["target"])}
        torch.save(prediction, self._parts / f"{self._count:09d}.pt")
        self._count += 1

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self._target(trainer)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            batches = [torch.load(self._parts / f"{i:09d}.pt", mmap=True, weights_only=True) for i in range(self._count)]
            torch.save({"task": pl_module.task.kind, "rank": trainer.global_rank, "world_size": trainer.world_size,
                        "batches": batches}, tmp)
            del batches
            os.replace(tmp, path)
        finally:
            self._discard()
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.written = path
        if trainer.is_global_zero:
            more = f" (and the other {trainer.world_size - 1} ranks' beside it)" if trainer.world_size > 1 else ""
            print(f"predictions: {path}{more}", flush=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._discard()

    def _discard(self) -> None:
        if self._parts is not None:
            shutil.rmtree(self._parts, ignore_errors=True)
            self._parts = None
