"""Forecasting windows from a CSV or Parquet table."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import DataSource, RecurrentDataModule, existing_path
from distrnn.data.loaders import TensorLoader


def read_table(path, features: list[str], targets: list[str]):
    import pandas as pd

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt", ".gz"):
            frame = pd.read_csv(path)
        else:
            raise ConfigError(f"data.path: {path}: expected .csv or .parquet")
    except ConfigError:
        raise
    except Exception as e:  # a parse error names the file, not a pandas traceback
        raise ConfigError(f"data.path: cannot read {path}: {e}") from None
    for key, columns in (("data.features", features), ("data.targets", targets)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ConfigError(f"{key}: columns {missing} not in {path} (has {list(frame.columns)})")
    columns = list(dict.fromkeys(features + targets))
    for c in columns:
        if not pd.api.types.is_numeric_dtype(frame[c]):
            key = "data.features" if c in features else "data.targets"
            raise ConfigError(f"{key}: column {c!r} of {path} is not numeric"
                              f" ({frame[c].dtype}, e.g. {frame[c].iloc[0]!r})")
    for c in columns:
        bad = ~np.isfinite(frame[c].to_numpy(dtype="float64"))
        if bad.any():
            # a NaN would only surface as a non-finite loss, steps later, naming neither
            raise ConfigError(f"data.path: column {c!r} of {path} has {int(bad.sum())} missing or non-finite"
                              f" values (the first at row index {int(bad.argmax())}, from 0); fill or drop them first")
    return frame


class TimeSeriesDataModule(RecurrentDataModule):
    """Windows of ``window`` rows; at every step predict the targets ``horizon`` rows ahead.

    The table is split in time (the last ``val_fraction`` of rows for validation), and features
    and targets are standardized with the training split's mean and deviation.

    Args:
        path: a .csv or .parquet file, one row per time step, in time order.
        features: input columns.
        targets: columns to forecast; None forecasts the features.
        window: steps per window (T).
        horizon: how many rows ahead each step forecasts.
        stride: rows between window starts.
        batch_size: windows per batch and rank.
        val_fraction: the tail of the table held out for validation.
        seed: shuffling seed.
    """

    def __init__(
        self,
        path: str,
        features: list[str],
        targets: Optional[list[str]] = None,
        window: int = 64,
        horizon: int = 1,
        stride: int = 1,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        self.path = existing_path(path, "data.path")
        if not features:
            raise ConfigError("data.features: give at least one column")
        for key, v in (("window", window), ("horizon", horizon), ("stride", stride)):
            if v <= 0:
                raise ConfigError(f"data.{key}: must be > 0, got {v}")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
        self.features = list(features)
        self.targets = list(targets) if targets else list(features)
        self.window, self.horizon, self.stride = window, horizon, stride
        self.val_fraction = val_fraction
        self.task = TaskSpec(kind="regression", output_dim=len(self.targets), input_dim=len(self.features), seq_len=window)
        self._series: Optional[dict[str, Tensor]] = None

    def setup(self, stage: str) -> None:
        if self._series is not None:
            return
        frame = read_table(self.path, self.features, self.targets)
        x = torch.tensor(frame[self.features].to_numpy(dtype="float32"))
        y = torch.tensor(frame[self.targets].to_numpy(dtype="float32"))
        n = x.shape[0]
        split = int(n * (1 - self.val_fraction))
        span = self.window + self.horizon
        if split < span or n - split < span:
            raise ConfigError(
                f"data.window: {self.window} + horizon {self.horizon} does not fit the {split} training"
                f" and {n - split} validation rows of {self.path}"
            )
        mx, sx = x[:split].mean(0), x[:split].std(0).clamp_min(1e-8)
        my, sy = y[:split].mean(0), y[:split].std(0).clamp_min(1e-8)
        self._series = {"x": (x - mx) / sx, "y": (y - my) / sy}
        self._target_scale = (my, sy)
        self._starts = {
            "train": torch.arange(0, split - span + 1, self.stride),
            "val": torch.arange(split, n - span + 1, self.stride),
        }

    def inverse_targets(self, y: Tensor) -> Tensor:
        """Standardized targets (or forecasts of them) back in the table's units."""
        mean, std = self._target_scale
        return y * std.to(y) + mean.to(y)

    def _windows(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        t_BT = batch["x"][:, None] + torch.arange(self.window)[None, :]
        return {"x": self._series["x"][t_BT], "y": self._series["y"][t_BT + self.horizon]}

    def _loader(self, split: str, shuffle: bool) -> TensorLoader:
        return self._bind(
            TensorLoader({"x": self._starts[split]}, self.batch_size, shuffle, self.seed, rank=self.rank,
                         world_size=self.world_size, transform=self._windows, uneven=not shuffle)
        )

    def datasets(self) -> dict[str, DataSource]:
        if self._series is None:
            return {}
        # the table's columns as the windows read them (standardized), and how they are cut
        content = [self._series["x"], self._series["y"], repr((self.features, self.targets, self.window, self.horizon))]
        return {split: DataSource(self.path.name, str(self.path), [*content, self._starts[split]],
                                  {"windows": self._starts[split].numel(), "rows": self._series["x"].shape[0]})
                for split in ("train", "val")}

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("val", shuffle=False)
