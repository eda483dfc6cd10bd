"""Whether a command can write where it will write, asked before the work whose result goes
there (a checkpoint folder, a prediction or converted file, a SQLite store, token ids). Imports
nothing heavy: ``distrnn tokenize`` and the other own commands start without torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def unwritable_folder(folder: str) -> Optional[str]:
    """Why files could not be written under ``folder`` (missing folders included), or None.
    Creates nothing that stays: a file is made and removed in the deepest folder that exists
    (ranks starting together each make their own). A URL (``s3://``) is the store's to judge."""
    if "://" in str(folder):
        return None
    import tempfile

    at = Path(folder).expanduser().absolute()
    while not at.exists() and at.parent != at:
        at = at.parent
    cwd = Path.cwd()
    shown = at.relative_to(cwd) if at != cwd and at.is_relative_to(cwd) else at
    if not at.is_dir():
        return f"{shown} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=at, prefix=".distrnn-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into {shown} ({e.strerror or e})"
    return None


def unwritable_file(path: str, what: str, example: str) -> Optional[str]:
    """Why ``what`` could not be written to the file ``path`` (a folder is there; the folder above
    cannot be made or written), or None; asked before the work that makes it, not after."""
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{path} is a folder: name the file to write, e.g. {p / example}"
    why = unwritable_folder(str(p.parent))
    return f"{why} ({what} would go to {path})" if why else None
