"""Byte-level corpora: any local text file or folder, served as contiguous streams."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import Split, StreamCorpusDataModule, build_once, existing_path, map_file

BYTE_VOCAB = 256


LOCAL_CORPORA = {
    # The running interpreter's standard library: a few MB of real source code on every machine
    # with Python, so the default experiment trains offline on data nobody has to download.
    "python_stdlib": lambda: (Path(sysconfig.get_paths()["stdlib"]), "*.py"),
}


def read_bytes(path: Path, glob: str = "**/*", cache_dir: str | os.PathLike = "data_cache") -> tuple[Tensor, Tensor]:
    """The bytes of a file, or of every file below a folder matching ``glob`` in sorted order,
    memory-mapped; and the sorted positions where a file starts (the streams reset their state
    there).

    Nothing is read into memory: batches read the pages they touch, and the page cache serves every
    rank of a node from one copy, so a corpus larger than memory trains. A folder is first copied
    into one file under ``cache_dir`` (see :func:`concatenated`)."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"data.path: {path} holds no bytes")
        return map_file(path), torch.zeros(1, dtype=torch.long)
    copies = _copies(Path(cache_dir)).resolve()  # a folder holding the cache must not take in its own copies
    files = sorted(p for p in path.glob(glob)
                   if p.is_file() and not p.name.startswith(".") and not p.resolve().is_relative_to(copies))
    if not files:
        raise ConfigError(f"data.path: no files matching {glob!r} under {path}")
    data, starts = concatenated(path, glob, files, Path(cache_dir))
    return map_file(data), torch.from_numpy(np.load(starts))


def _copies(cache_dir: Path) -> Path:
    return cache_dir / "folders"


def concatenated(folder: Path, glob: str, files: list[Path], cache_dir: Path) -> tuple[Path, Path]:
    """The files' bytes in one file, and the positions where each non-empty file starts (``.npy``),
    under ``cache_dir/folders`` (:func:`~distrnn.data.base.build_once`: made once, by one process);
    named by the folder and glob, and by the files' names, sizes and modification times, so a
    changed folder is copied again and its older copy removed."""
    stats = [(f, f.stat()) for f in files]
    listing = json.dumps([(str(f.relative_to(folder)), st.st_size, st.st_mtime_ns) for f, st in stats])
    key = hashlib.sha256(f"{folder.resolve()}\0{glob}".encode()).hexdigest()[:12]
    prefix = f"{folder.name or 'root'}-{key}-"
    name = prefix + hashlib.sha256(listing.encode()).hexdigest()[:12]
    where = _copies(cache_dir)
    if sum(st.st_size for _, st in stats) == 0:  # checked before the cache is touched (no copy of nothing exists)
        raise ConfigError(f"data.path: {folder} holds no bytes")
    data, starts = build_once(where, name, prefix, (".bin", ".starts.npy"),
                              lambda data, starts: _copy(folder, [f for f, _ in stats], data, starts),
                              f"a copy of the folder {folder}")
    return data, starts


def _copy(folder: Path, files: list[Path], data: Path, starts: Path) -> None:
    offsets, offset = [], 0
    with open(data, "wb") as out:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            n = out.tell() - offset
            if n:
                offsets.append(offset)
                offset += n
    if not offsets:  # emptied since listed
        raise ConfigError(f"data.path: {folder} holds no bytes")
    with open(starts, "wb") as out:
        np.save(out, np.asarray(offsets, dtype=np.int64))


class ByteCorpusDataModule(StreamCorpusDataModule):
    """Byte-level language modelling on a local file or folder, or a public corpus by name.

    Args:
        path: a text file or a folder of them. Ignored when ``corpus`` is set.
        corpus: enwik8, text8 or tiny_shakespeare, fetched into ``cache_dir`` (SHA-256 checked); or
            python_stdlib, the running Python's standard library sources (no download).
        glob: which files of a folder to read.
        cache_dir: where downloaded corpora, and the one-file copies of folder corpora, are kept.
        batch_size: streams per rank (B).
        seq_len: steps per batch chunk; the TBPTT module cuts it into updates of k1 steps.
        val_fraction: the tail of the corpus held out for validation.
        seed: unused by streams (their order is fixed); kept for a uniform interface.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        corpus: Optional[str] = None,
        glob: str = "**/*",
        cache_dir: str = "data_cache",
        batch_size: int = 32,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seq_len, val_fraction, seed)
        if corpus is None and path is None:
            raise ConfigError("data.path: give a file or folder (or data.corpus)")
        self.glob = glob
        if corpus is None:
            self.path = existing_path(path, "data.path")
        elif corpus in LOCAL_CORPORA:
            self.path, self.glob = LOCAL_CORPORA[corpus]()
        else:
            from distrnn.data.download import CORPORA

            if corpus not in CORPORA:
                raise ConfigError(f"data.corpus: unknown corpus {corpus!r}; known: {sorted(CORPORA) + sorted(LOCAL_CORPORA)}")
            self.path = None
        self.corpus = corpus
        self.cache_dir = cache_dir
        self.task = TaskSpec(kind="language_model", output_dim=BYTE_VOCAB, vocab_size=BYTE_VOCAB, seq_len=seq_len)

    def prepare_data(self) -> None:
        if self.path is None:
            from distrnn.data.download import fetch_corpus

            fetch_corpus(self.corpus, self.cache_dir)

    def dataset_name(self) -> str:
        return self.corpus or self.path.name

    def read_splits(self) -> dict[str, Split]:
        path = self.path
        if path is None:
            from distrnn.data.download import fetch_corpus

            path = fetch_corpus(self.corpus, self.cache_dir)
        tokens, doc_starts = read_bytes(path, self.glob, self.cache_dir)
        return self.tail_split(tokens, doc_starts, f"data.path {path}")
