"""distrnn's data modules and loaders. Imported on first use (the data modules import Lightning,
~3 s), so that ``distrnn download`` and ``distrnn tokenize``, which live in this package, start
without it; ``from distrnn.data import ByteCorpusDataModule`` and class paths in configs work as ever."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "ByteCorpusDataModule": "distrnn.data.text",
    "GeneratedLoader": "distrnn.data.loaders",
    "RecurrentDataModule": "distrnn.data.base",
    "ResumableLoader": "distrnn.data.loaders",
    "SequentialMNISTDataModule": "distrnn.data.mnist",
    "StreamLoader": "distrnn.data.loaders",
    "SyntheticDataModule": "distrnn.data.synthetic",
    "TensorLoader": "distrnn.data.loaders",
    "TimeSeriesDataModule": "distrnn.data.timeseries",
    "TokenFileDataModule": "distrnn.data.tokens",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'distrnn.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))


def import_all() -> None:
    """Every data module imported: jsonargparse offers the subclasses it can see (short class
    names such as ``--data ByteCorpusDataModule``, and ``--data.help``)."""
    for name in _MODULES:
        __getattr__(name)
