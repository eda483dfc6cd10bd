"""``distrnn predict``: the model's predictions for the data module's predict split, to one file."""

from __future__ import annotations

import os
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
    its own share, ``NAME.rank{r}.pt``. Written to a temporary file and renamed: a file that is
    there is whole. Load it with ``torch.load(path, weights_only=True)``.

    Args:
        path: the file to write.
    """

    def __init__(self, path: str = "predictions.pt") -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._batches: list[dict[str, Any]] = []
        self.written: Optional[Path] = None

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        inverse = getattr(trainer.datamodule, "inverse_targets", None)
        if callable(inverse) and pl_module.task.kind == "regression":
            prediction = {**prediction, "prediction": inverse(prediction["prediction"]), "target": inverse(prediction["target"])}
        self._batches.append(prediction)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.path)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"task": pl_module.task.kind, "rank": trainer.global_rank, "world_size": trainer.world_size,
                    "batches": self._batches}, tmp)
        os.replace(tmp, path)
        self.written, self._batches = path, []
        if trainer.is_global_zero:
            more = f" (and the other {trainer.world_size - 1} ranks' beside it)" if trainer.world_size > 1 else ""
            print(f"predictions: {path}{more}", flush=True)
