"""Pre-tokenized corpora: flat binary files of token ids, memory-mapped, served as contiguous streams."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import Split, StreamCorpusDataModule, build_once, existing_path, map_file

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


def find_token(path: Path, dtype: str, token: int, chunk: int = 1 << 24) -> np.ndarray:
    """The sorted positions of ``token`` in a file of ids, read ``chunk`` ids at a time: a corpus
    may be larger than memory (plain reads, not a mapping, whose pages would all count as the
    process's memory until it ends)."""
    found, at = [np.zeros(0, np.int64)], 0
    with open(path, "rb") as f:
        while len(ids := np.fromfile(f, DTYPES[dtype], count=chunk)):
            found.append(np.flatnonzero(ids == token).astype(np.int64) + at)
            at += len(ids)
    return np.concatenate(found)


def document_starts(path: Path, dtype: str, eot_token: int, cache_dir: Path) -> Tensor:
    """Where the documents of a token file start: the positions of ``eot_token``, found by one scan
    of the file and kept under ``cache_dir/documents`` (:func:`~distrnn.data.base.build_once`),
    named by the file, dtype and token, and by the file's size and modification time."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{dtype}\0{eot_token}".encode()).hexdigest()[:12]
    prefix = f"{path.name}-{key}-"
    name = prefix + hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]

    def scan(out: Path) -> None:
        with open(out, "wb") as f:
            np.save(f, find_token(path, dtype, eot_token))

    (starts,) = build_once(cache_dir / "documents", name, prefix, (".starts.npy",), scan,
                           f"the document starts of {path}")
    starts_D = np.load(starts)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if not len(starts_D) and rank_zero_only.rank == 0:  # every rank reads the same file
        print(f"distrnn: warning: data.eot_token: id {eot_token} does not occur in {path}: it is read as one"
              " document", file=sys.stderr)
    return torch.from_numpy(starts_D)


class TokenFileDataModule(StreamCorpusDataModule):
    """Language modelling on a pre-tokenized corpus: flat binary files of token ids, as numpy's
    ``tofile`` writes them (nanoGPT's ``prepare.py`` writes GPT-2 ids to ``train.bin`` and
    ``val.bin`` as uint16). The files are memory-mapped, so a corpus larger than memory trains,
    and served as contiguous streams, like :class:`~distrnn.data.ByteCorpusDataModule`: every
    token once per epoch across the ranks, the hidden state carried from chunk to chunk. With
    ``eot_token``, each document is its own sequence: the state is zeroed before every
    end-of-text token, so the model reads it from a fresh state and predicts the next document's
    first token from it alone, as from a beginning-of-text token; the positions are found by one
    scan of each file, cached under ``cache_dir``. Without it the whole file is one sequence, the
    state carried across documents. Every batch's ids
    are checked against ``vocab_size``; the data check before a run reads the first and last
    batch of each split, so a file read with the wrong ``dtype`` fails before the run opens.

    Args:
        path: the training tokens.
        vocab_size: the number of token ids (the output layer's size); every id must be below it.
        dtype: the ids' type in the files.
        val_path: the validation tokens; without it, the tail ``val_fraction`` of ``path``.
        eot_token: the id that separates documents (GPT-2: 50256); the state resets at each one.
            None: the files are one sequence each.
        cache_dir: where the positions of ``eot_token`` in each file are kept.
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
        eot_token: Optional[int] = None,
        cache_dir: str = "data_cache",
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
        if eot_token is not None and not 0 <= eot_token < vocab_size:
            raise ConfigError(f"data.eot_token: must be an id below data.vocab_size {vocab_size}, got {eot_token}")
        self.eot_token, self.cache_dir = eot_token, cache_dir
        self.path = existing_path(path, "data.path")
        self.val_path = existing_path(val_path, "data.val_path") if val_path is not None else None
        self.vocab_size, self.dtype = vocab_size, dtype
        self.task = TaskSpec(kind="language_model", output_dim=vocab_size, vocab_size=vocab_size, seq_len=seq_len,
                             token_unit="token")

    def dataset_name(self) -> str:
        return self.path.name

    def read_splits(self) -> dict[str, Split]:
        tokens = map_tokens(self.path, self.dtype, "data.path")
        source = f"data.path {self.path}"
        if self.val_path is None:
            return self.tail_split(tokens, self._starts(self.path), source)
        val = map_tokens(self.val_path, self.dtype, "data.val_path")
        return {"train": Split(tokens, self._starts(self.path), source),
                "val": Split(val, self._starts(self.val_path), f"data.val_path {self.val_path}")}

    def _starts(self, path: Path) -> Optional[Tensor]:
        if self.eot_token is None:
            return None
        return document_starts(path, self.dtype, self.eot_token, Path(self.cache_dir))
