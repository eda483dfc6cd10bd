"""Subnormal floats flushed to zero on the CPU in distrnn's processes.

An x86 core computes with a subnormal float (below 1.2e-38 in float32) through a microcode assist
that costs about a hundred cycles, against one for a normal number. A recurrence makes them as it
learns: a trained minGRU's gates saturate (``sigmoid`` of a pre-activation below about -87 is
subnormal), and the products and gradients that pass through such a gate along the time axis
shrink into the same range. On the selective-copy model at T = 4096 from its weights at update
36,500 (B=16), one training step took 1.06 s with subnormals and 0.61 s flushed (the same loss to
4 digits; RESULTS.md, session 43). A value that small is below the rounding of any value of ordinary
size it is added to: flushing it (FTZ) and reading such inputs as zero (DAZ),
``torch.set_flush_denormal(True)``, changes no such sum.

The setting lives in each thread's floating-point control register, and a thread starts with its
creator's: the OpenMP threads that run PyTorch's CPU kernels (and torch.compile's) must be started
after it. ``DistrnnCLI`` therefore flushes before it reads its arguments; from then on the calling
thread and the threads it starts flush (a forked rank too). The GPU's own arithmetic is not
touched. ``DISTRNN_DENORMALS=keep`` leaves the CPU as it is.
"""

from __future__ import annotations

import os

import torch

ENV = "DISTRNN_DENORMALS"
CHOICES = ("flush", "keep")


def denormals_choice() -> str:
    """``DISTRNN_DENORMALS`` (default flush); ValueError naming it when it is neither flush nor keep."""
    choice = os.environ.get(ENV, "flush")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}: must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def flush_denormals() -> str:
    """Flush subnormals to zero in this thread and the threads it starts from now on (see the
    module); returns ``flush`` when set, else why not (``keep: ...``)."""
    if denormals_choice() == "keep":
        return f"keep: {ENV}=keep"
    if not torch.set_flush_denormal(True):
        return "keep: this CPU cannot flush them"  # PyTorch sets it on x86 with SSE3 and on ARM64
    return "flush"


def subnormals() -> str:
    """How PyTorch's CPU arithmetic in this thread and its OpenMP threads treats subnormal floats:
    ``flushed``, ``computed``, or ``flushed in some threads`` (set after some had started).
    Recorded with a run's environment: it decides the last bits of a CPU run's numbers."""
    x = subnormal_floats(65536 * max(1, torch.get_num_threads()))
    # multiplied by 1 over enough elements that every thread computes a part (ATen's grain:
    # 32,768), a subnormal stays so where it is computed
    kept = int(torch.count_nonzero(x.mul(1.0)))
    return "flushed" if kept == 0 else "computed" if kept == x.numel() else "flushed in some threads"


def subnormal_floats(n: int) -> torch.Tensor:
    """``n`` float32 subnormals (2**-127), written as bits: a float fill would convert the value
    with this thread's arithmetic, which flushes it to zero once flushing is on."""
    return torch.full((n,), 1 << 22, dtype=torch.int32).view(torch.float32)
