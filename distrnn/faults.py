"""Fault injection for drills and tests: make a chosen rank fail at a chosen update.

Add it to any config to rehearse what a preemption or a crash does to a run::

    trainer:
      callbacks:
        - class_path: distrnn.faults.FailAt
          init_args: {step: 40, rank: 1, how: sigkill, marker: /shared/failed-once}

With ``marker`` the fault fires once per marker file (the file is created just before failing),
so the relaunched or restored run goes past the same step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch import Callback, LightningModule, Trainer


class InjectedFault(RuntimeError):
    """Raised by :class:`FailAt` with ``how: raise``."""


class FailAt(Callback):
    """Fail after update ``step`` (``trainer.global_step``) completes and before the next one.

    Args:
        step: the update after which the fault fires.
        rank: the global rank that fails; ``None`` for every rank.
        how: ``raise`` an exception, or send this process ``sigkill`` (no cleanup at all) or
            ``sigterm`` (a polite preemption notice), or send its whole process group ``sigint``
            (what Ctrl-C in a terminal does: every rank gets it).
        marker: fire only if this file does not exist yet, and create it first.
    """

    def __init__(self, step: int, rank: Optional[int] = None, how: Literal["raise", "sigkill", "sigterm", "sigint"] = "raise",
                 marker: Optional[str] = None) -> None:
        if step < 1:
            raise ValueError(f"FailAt.step: must be >= 1, got {step}")
        self.step, self.rank, self.how, self.marker = step, rank, how, marker

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step or (self.rank is not None and trainer.global_rank != self.rank):
            return
        if self.marker is not None:
            marker = Path(self.marker)
            if marker.exists():
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rank {trainer.global_rank} failed at step {self.step} ({self.how})\n")
        if self.how == "raise":
            raise InjectedFault(f"injected fault: rank {trainer.global_rank} at step {self.step}")
        if self.how == "sigint":
            os.killpg(os.getpgid(0), signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGKILL if self.how == "sigkill" else signal.SIGTERM)
