"""Checkpoint files: written atomically, read with ``weights_only=True``.

A checkpoint is one file holding everything resume needs (weights, optimizer, scheduler, loop
and data position from Lightning; carried hidden state and RNG from the TBPTT module). It is
written to a temporary file beside the target, flushed to disk, then renamed over it, so a
process killed mid-save leaves the previous checkpoint intact. Loading never unpickles
arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, torn or not one of ours; the message names the file."""


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", training: bool = True) -> dict[str, Any]:
    """Load safely; with ``training``, also insist on a Lightning training checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p}: no such file")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {p}: cannot be loaded safely: {first}") from None
    if training and (not isinstance(ckpt, dict) or "state_dict" not in ckpt):
        raise CheckpointError(f"checkpoint {p}: not a distrnn/Lightning checkpoint (no state_dict)")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with write-then-rename saves and safe loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # object storage has no rename: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Lightning also moves plain state dicts through here (ddp_spawn returns rank 0's weights so).
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu", training=False)
