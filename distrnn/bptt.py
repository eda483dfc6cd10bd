"""Forward passes through time with their losses: the pure functions behind the TBPTT module.

``run_window`` is the one routine that every gradient mode uses: truncated BPTT calls it on a
window of k2 steps, full BPTT on the whole batch, checkpointed BPTT on the whole batch cut into
recomputed segments of k1 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distrnn.config import TaskSpec
from distrnn.data.loaders import batch_generator
from distrnn.model import RecurrentModel
from distrnn.state import State

LN2 = math.log(2.0)


def loss_sum(y_hat: Tensor, y: Tensor, mask_BT: Tensor, task: TaskSpec) -> Tensor:
    """Sum of the per-step losses at the masked steps (masked by product: no host sync)."""
    m = mask_BT.to(torch.float32 if y_hat.dtype != torch.float64 else torch.float64)
    if task.kind == "regression":
        per_step = (y_hat.to(m.dtype) - y.to(m.dtype)).pow(2).mean(dim=-1)
    else:
        per_step = F.cross_entropy(
            y_hat.flatten(0, 1).to(m.dtype), y.flatten(), reduction="none"
        ).view_as(m)
    return (per_step * m).sum()


def _piece(
    model: RecurrentModel, x: Tensor, y: Tensor, mask: Tensor, reset: Optional[Tensor], state: Optional[State], task: TaskSpec
) -> tuple[Tensor, State]:
    y_hat, state = model(x, state, reset)
    return loss_sum(y_hat, y, mask, task), state


@dataclass
class WindowResult:
    loss_sum: Tensor
    state: State
    captured: Optional[State]


def run_window(
    model: RecurrentModel,
    task: TaskSpec,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    reset: Optional[Tensor],
    state: Optional[State],
    capture_at: Optional[int] = None,
    segment: Optional[int] = None,
) -> WindowResult:
    """Run ``x`` from ``state``; return the summed loss, the final state, and the state after
    ``capture_at`` steps (where the next truncation window starts).

    With ``segment``, the window runs in segments of that many steps under activation
    checkpointing: only the states between segments are kept, and each segment is recomputed in
    the backward pass, so the gradients are exact at O(T/segment) states of memory plus one
    segment of activations (Gruslys et al. 2016 with the simplest policy).
    ``reset`` stays on the host: its boundaries are read without a device sync.
    """
    T = x.shape[1]
    cuts = {0, T}
    if capture_at is not None and 0 < capture_at < T:
        cuts.add(capture_at)
    if segment:
        cuts.update(range(0, T, segment))
    bounds = sorted(cuts)
    total = x.new_zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    captured = state if capture_at == 0 else None
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = None if reset is None else reset[:, a:b]
        if segment and torch.is_grad_enabled():
            part, state = checkpoint(
                _piece, model, x[:, a:b], y[:, a:b], mask[:, a:b], r, state, task, use_reentrant=False
            )
        else:
            part, state = _piece(model, x[:, a:b], y[:, a:b], mask[:, a:b], r, state, task)
        total = total + part
        if b == capture_at:
            captured = state
    return WindowResult(total, state, captured)


def chunk_bounds(T: int, k1: int, randomize: bool = False, seed: int = 0, epoch: int = 0, index: int = 0) -> list[tuple[int, int]]:
    """Where the updates of one batch fall. With ``randomize``, lengths follow awd-lstm-lm:
    k1 (k1/2 with probability 0.05), then drawn from N(that, 5), at least 5 steps; the draws come
    from (seed, epoch, index) so that a resumed run cuts the batch as the original did."""
    if not randomize:
        return [(a, min(a + k1, T)) for a in range(0, T, k1)]
    g = batch_generator(seed, epoch, index, 0x7B77)
    bounds, a = [], 0
    while a < T:
        base = k1 if torch.rand((), generator=g).item() >= 0.05 else k1 / 2
        length = max(5, int(round(base + 5.0 * torch.randn((), generator=g).item())))
        b = min(T, a + length)
        bounds.append((a, b))
        a = b
    return bounds
