"""Pre-tokenized corpora: flat binary files of token ids, memory-mapped, served as contiguous streams."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import Split, StreamCorpusDataModule, existing_path, map_file

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64}


def map_tokens(path: Path, dtype: str, key: str) -> Tensor:
    """The token ids of a flat binary file, memory-mapped (nothing is read until a batch touches it)."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file of token ids")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size < 2 * itemsize:
        raise ConfigError(f"{key}: {path} holds {size // itemsize} tokens; a stream needs at least 2")
    if size % itemsize:
        raise ConfigError(f"{key}: {path} is {size} bytes, not a whole number of {dtype} tokens ({itemsize} bytes"
                          " each): is data.dtype the file's type?")
    return map_file(path, DTYPES[dtype])


class TokenFileDataModule(StreamCorpusDataModule):
    """Language modelling on a pre-tokenized corpus: flat binary files of token ids, as numpy's
    ``tofile`` writes them (nanoGPT's ``prepare.py`` writes GPT-2 ids to ``train.bin`` and
    ``val.bin`` as uint16). The files are memory-mapped, so a corpus larger than memory trains,
    and served as contiguous streams, like :class:`~distrnn.data.ByteCorpusDataModule`: every
    token once per epoch across the ranks, the hidden state carried from chunk to chunk (the
    whole file is one sequence: an end-of-text token is input like any other). Every batch's ids
    are checked against ``vocab_size``; the data check before a run reads the first and last
    batch of each split, so a file read with the wrong ``dtype`` fails before the run opens.

    Args:
        path: the training tokens.
        vocab_size: the number of token ids (the output layer's size); every id must be below it.
        dtype: the ids' type in the files.
        val_path: the validation tokens; without it, the tail ``val_fraction`` of ``path``.
        batch_size: streams per rank (B).
        seq_len: steps per batch chunk; the TBPTT module cuts it into updates of k1 steps.
        val_fraction: the tail of ``path`` held out for validation when ``val_path`` is not given.
        seed: unused by streams (their order is fixed); kept for a uniform interface.
    """

    def __init__(
        self,
        path: str,
        vocab_size: int,
        dtype: Literal["uint8", "uint16", "int32", "uint32", "int64"] = "uint16",
        val_path: Optional[str] = None,
        batch_size: int = 32,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seq_len, val_fraction if val_path is None else None, seed, vocab_size=vocab_size)
        if vocab_size < 2:
            raise ConfigError(f"data.vocab_size: must be >= 2, got {vocab_size}")
        if dtype not in DTYPES:
            raise ConfigError(f"data.dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
        if vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
            raise ConfigError(f"data.vocab_size: {vocab_size} ids do not fit data.dtype {dtype}")
        self.path = existing_path(path, "data.path")
        self.val_path = existing_path(val_path, "data.val_path") if val_path is not None else None
        self.vocab_size, self.dtype = vocab_size, dtype
        self.task = TaskSpec(kind="language_model", output_dim=vocab_size, vocab_size=vocab_size, seq_len=seq_len,
                             token_unit="token")

    def read_splits(self) -> dict[str, Split]:
        tokens = map_tokens(self.path, self.dtype, "data.path")
        source = f"data.path {self.path}"
        if self.val_path is None:
            return self.tail_split(tokens, None, source)
        val = map_tokens(self.val_path, self.dtype, "data.val_path")
        return {"train": Split(tokens, None, source), "val": Split(val, None, f"data.val_path {self.val_path}")}
