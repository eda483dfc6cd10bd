"""Fused GPU kernels (Triton). This module imports no Triton, so settings are checked anywhere."""

from __future__ import annotations

import os
from typing import Optional


def scan_config_from_env() -> Optional[tuple[int, int, int, bool]]:
    """The minGRU/minLSTM kernel configuration fixed by ``DISTRNN_SCAN_CONFIG``
    (``BLOCK_T,BLOCK_H,num_warps,PREFETCH``), None when unset; ValueError naming the variable."""
    value = os.environ.get("DISTRNN_SCAN_CONFIG", "").strip()
    if not value:
        return None
    try:
        bt, bh, w, p = (int(v) for v in value.split(","))
        if min(bt, bh, w) < 1 or any(v & (v - 1) for v in (bt, bh, w)) or p not in (0, 1):
            raise ValueError
    except ValueError:
        raise ValueError(f"DISTRNN_SCAN_CONFIG: '{value}' is not BLOCK_T,BLOCK_H,num_warps,PREFETCH "
                         "(powers of two, then 0 or 1), e.g. 4,128,4,1") from None
    return bt, bh, w, bool(p)
