"""The base of every distrnn data module: the task it describes, and rank-aware resumable loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.loaders import ResumableLoader


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

    def _bind(self, loader: ResumableLoader) -> ResumableLoader:
        if self.trainer is not None:
            trainer = self.trainer
            loader.bind_epoch(lambda: trainer.current_epoch)
        return loader


def existing_path(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: no such file or folder: {path}")
    return path
