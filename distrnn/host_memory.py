"""glibc's malloc set for training on a CPU: freed memory kept for the next step, not handed back.

A training step on a CPU allocates and frees the same large buffers every step (activations, gates,
their gradients). glibc serves an allocation above its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh ``mmap`` that ``free`` hands back to the kernel, and trims the heap's top
above twice that threshold: every step faults its memory in and has the kernel zero it again, page
by page. With ``mmap`` off and the heap trimmed only above 2 GiB, the next step reuses the pages.
Measured side by side (``benchmarks/bench_host_memory.py``, RESULTS.md): ``make train``'s LSTM and
the selective-copy minGRU at T=4096 train markedly faster, at a higher resident peak (the heap keeps
what the largest step freed, fragmented).

``DISTRNN_MALLOC=system`` leaves glibc as it is; so does any ``MALLOC_*_`` variable or
``glibc.malloc`` tunable of the user's own, an allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc), or
a C library other than glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os

ENV = "DISTRNN_MALLOC"
CHOICES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return None
    return ctypes.CDLL(None) if version.startswith("glibc") else None


def malloc_choice() -> str:
    """``DISTRNN_MALLOC`` (default keep); ValueError naming it when it is neither keep nor system."""
    choice = os.environ.get(ENV, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}: must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def keep_freed_memory() -> str:
    """Set glibc's malloc for training (see the module); returns ``keep`` when set, else why not
    (``system: ...``)."""
    if malloc_choice() == "system":
        return f"system: {ENV}=system"
    own = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    if own:
        return f"system: the environment sets {', '.join(own)}"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "system: LD_PRELOAD brings another allocator"
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return "system: not glibc"
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) != 1:
        return "system: mallopt refused"
    return "keep"


def keep_freed_memory_on_cpu(trainer) -> str:
    """:func:`keep_freed_memory` when ``trainer`` runs on a CPU. Not beside a GPU: there the host's
    large buffers are rare (checkpoint copies, mostly), and the memory they freed would stay with
    the process."""
    from lightning.pytorch.accelerators import CPUAccelerator

    if not isinstance(trainer.accelerator, CPUAccelerator):
        return "system: not a CPU run"
    return keep_freed_memory()


def mmapped_bytes() -> int | None:
    """Bytes glibc holds in ``mmap``-ed chunks now (``mallinfo2``'s hblkhd); None without glibc 2.33+."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)
