"""Helpers on recurrent state.

Every recurrence in distrnn keeps its state as a tensor or a tuple of tensors shaped
``(num_layers, B, H)``: the batch sits in dim 1 for all of them (the cuDNN convention), so
detaching, masking and gathering need no per-layer code.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from distrnn.data.loaders import to_device_queued

State = Union[Tensor, tuple[Tensor, ...]]


def map_state(fn: Callable[[Tensor], Tensor], state: Optional[State]) -> Optional[State]:
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    return tuple(fn(s) for s in state)


def detach_state(state: Optional[State]) -> Optional[State]:
    return map_state(lambda s: s.detach(), state)


def mask_state(state: Optional[State], keep_B: Tensor) -> Optional[State]:
    """Zero the rows of ``state`` where ``keep_B`` is False (their sequence has ended).

    ``keep_B`` may live on the host (reset masks do, so that their boundaries are read without a
    device sync). If no row is kept the state is None (the layers start from zeros): a batch of
    new sequences touches no device. Otherwise the mask goes to the state's device from pinned
    memory, queued behind the GPU's work: from pageable memory the copy waited for all of it (a
    sync per reset step, per batch for full BPTT over batches of new sequences)."""
    if state is None:
        return None
    if keep_B.device.type == "cpu" and not bool(keep_B.any()):
        return None
    keep = to_device_queued(keep_B, state_tensors(state)[0].device).view(1, -1, 1)
    return map_state(lambda s: s * keep.to(device=s.device, dtype=s.dtype), state)


def state_tensors(state: Optional[State]) -> tuple[Tensor, ...]:
    if state is None:
        return ()
    return (state,) if isinstance(state, Tensor) else tuple(state)


def slice_state(state: Optional[State], rows: slice) -> Optional[State]:
    """The state of a range of rows, contiguous: cuDNN refuses a view of a multi-layer state's rows
    ("rnn: hx is not contiguous")."""
    return map_state(lambda s: s[:, rows].contiguous(), state)


def cat_states(states: list[State]) -> State:
    """The states of groups of rows joined into one, in order (the inverse of :func:`slice_state`)."""
    if isinstance(states[0], Tensor):
        return torch.cat(states, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*states))
