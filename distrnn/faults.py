"""Fault injection for drills and tests: make a chosen rank fail at a chosen update.

Add it to any config to rehearse what a preemption or a crash does to a run::

    trainer:
      callbacks:
        - class_path: distrnn.faults.FailAt
          init_args: {step: 40, rank: 1, how: sigkill, marker: /shared/failed-once}

With ``marker`` the fault fires once per marker file (the file is created just before failing),
so the relaunched or restored run goes past the same step. :class:`HoldAt` instead pauses a run at
a chosen update until a file appears: a run (or every trial of a sweep) stopped at a known point,
to rehearse what an interruption there does with nothing racing it.
"""

from __future__ import annotations

import os
import signal
import time
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


class HoldAt(Callback):
    """Pause after the batch that reaches update ``step`` until the file ``until`` exists, then
    go on (once: a restored run that reaches the step again with the file there passes it).

    Args:
        step: pause at the end of the first batch whose ``trainer.global_step`` is >= this.
        until: the file whose creation releases the run.
        rank: the global rank that pauses (its peers then wait in their next collective); ``None``
            for every rank.
        timeout_s: raise :class:`InjectedFault` if the file has not appeared after this long.
    """

    def __init__(self, step: int, until: str, rank: Optional[int] = None, timeout_s: float = 600.0) -> None:
        if step < 1:
            raise ValueError(f"HoldAt.step: must be >= 1, got {step}")
        if timeout_s <= 0:
            raise ValueError(f"HoldAt.timeout_s: must be > 0, got {timeout_s}")
        self.step, self.until, self.rank, self.timeout_s = step, Path(until), rank, timeout_s
        self._passed = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._passed or trainer.global_step < self.step or (self.rank is not None and trainer.global_rank != self.rank):
            return
        deadline = time.monotonic() + self.timeout_s
        while not self.until.exists():
            if time.monotonic() > deadline:
                raise InjectedFault(f"HoldAt: {self.until} did not appear within {self.timeout_s:g} s"
                                    f" (rank {trainer.global_rank} held at step {trainer.global_step})")
            time.sleep(0.05)
        self._passed = True
