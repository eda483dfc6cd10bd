"""Sequential and permuted MNIST: one label per sequence of 784 pixels, read from IDX files.

The standard files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are read
directly; torchvision is not needed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import DataSource, RecurrentDataModule, existing_path
from distrnn.data.loaders import TensorLoader, batch_generator

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or gzip): magic 0x0000 <dtype> <ndim>, big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(f"data.root: {path} is not an IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ConfigError(f"data.root: {path} is truncated ({len(body)} of {expected} data bytes)")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise ConfigError(f"data.root: {root / stem} (or .gz) not found")


class SequentialMNISTDataModule(RecurrentDataModule):
    """Pixel-by-pixel MNIST (T = 784, one feature per step); the label is due at the last step.

    Args:
        root: folder holding the four IDX files.
        permuted: apply one fixed random permutation of the pixels (from ``seed``).
        batch_size: sequences per batch and rank.
        val_size: training images held out for validation.
        seed: shuffling and permutation seed.
    """

    def __init__(self, root: str, permuted: bool = False, batch_size: int = 64, val_size: int = 5000, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.root = existing_path(root, "data.root")
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
            _find(self.root, stem)
        self.permuted = permuted
        self.val_size = val_size
        self.task = TaskSpec(kind="classification", output_dim=10, input_dim=1, seq_len=784)
        self._data: Optional[dict[str, Tensor]] = None

    def setup(self, stage: str) -> None:
        if self._data is not None:
            return
        images = read_idx(_find(self.root, "train-images-idx3-ubyte"))
        labels = read_idx(_find(self.root, "train-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ConfigError(f"data.root: images {images.shape} and labels {labels.shape} in {self.root} do not match")
        if self.val_size >= images.shape[0]:
            raise ConfigError(f"data.val_size: {self.val_size} leaves no training images of {images.shape[0]}")
        x = torch.from_numpy(images.reshape(images.shape[0], 784).copy())
        y = torch.from_numpy(labels.astype(np.int64))
        self.permutation = (
            torch.randperm(784, generator=batch_generator(self.seed, 0x5EED)) if self.permuted else torch.arange(784)
        )
        n_train = x.shape[0] - self.val_size
        self._data = {"train_x": x[:n_train], "train_y": y[:n_train], "val_x": x[n_train:], "val_y": y[n_train:]}
        test = self.root
        try:
            tx = read_idx(_find(test, "t10k-images-idx3-ubyte"))
            ty = read_idx(_find(test, "t10k-labels-idx1-ubyte"))
            self._data["test_x"] = torch.from_numpy(tx.reshape(tx.shape[0], 784).copy())
            self._data["test_y"] = torch.from_numpy(ty.astype(np.int64))
        except ConfigError:
            pass

    def _to_sequences(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x_BT = batch["x"][:, self.permutation].float().div_(255.0)
        B, T = x_BT.shape
        y_BT = batch["label"][:, None].expand(B, T).contiguous()
        mask_BT = torch.zeros(B, T, dtype=torch.bool)
        mask_BT[:, -1] = True
        return {"x": x_BT.unsqueeze(-1), "y": y_BT, "mask": mask_BT}

    def _loader(self, split: str, shuffle: bool) -> TensorLoader:
        if f"{split}_x" not in self._data:
            raise ConfigError(f"data.root: no t10k IDX files in {self.root} for the test split")
        fields = {"x": self._data[f"{split}_x"], "label": self._data[f"{split}_y"]}
        return self._bind(
            TensorLoader(fields, self.batch_size, shuffle, self.seed, drop_last=shuffle, rank=self.rank,
                         world_size=self.world_size, transform=self._to_sequences, uneven=not shuffle,
                         mask_same_every_row=True)  # the label at the last step of every row
        )

    def datasets(self) -> dict[str, DataSource]:
        name = "permuted-mnist" if self.permuted else "mnist"
        return {split: DataSource(name, str(self.root), [self._data[f"{split}_x"], self._data[f"{split}_y"], self.permutation],
                                  {"samples": self._data[f"{split}_y"].numel()})
                for split in ("train", "val") if self._data is not None}

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", shuffle=False)
