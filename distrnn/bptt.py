"""Forward passes through time with their losses: the pure functions behind the TBPTT module.

``run_window`` is the one routine that every gradient mode uses: truncated BPTT calls it on a
window of k2 steps, full BPTT on the whole batch, checkpointed BPTT on the whole batch cut into
recomputed segments of k1 steps.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distrnn.config import TaskSpec
from distrnn.data.loaders import batch_generator
from distrnn.model import RecurrentModel
from distrnn.state import State, state_tensors

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


Span = Optional[tuple[int, int]]


def _piece(
    model: RecurrentModel, x: Tensor, y: Tensor, mask: Tensor, reset: Optional[Tensor], state: Optional[State], task: TaskSpec,
    span: Span = (0, -1), cuts: Optional[Tensor] = None,
) -> tuple[Tensor, State]:
    """The piece's summed loss and final state. ``span`` ``(a, b)``: the steps that carry a loss lie
    in ``[a, b)`` (b = -1: to the end), so the head and the loss run there only; None: no step
    does, the piece only moves the state on (a loss of 0). ``cuts``: see ``RecurrentModel.hidden``."""
    if span is None:
        _, state = model.hidden(x, state, reset, cuts, outputs=False)
        return x.new_zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32), state
    a, b = span
    if (a, b) == (0, -1):
        y_hat, state = model(x, state, reset, cuts)
        return loss_sum(y_hat, y, mask, task), state
    h, state = model.hidden(x, state, reset, cuts)
    return loss_sum(model.head(h[:, a:b]), y[:, a:b], mask[:, a:b], task), state


def loss_span(mask_host_BT: Optional[Tensor]) -> Span:
    """Where the steps with a loss lie in a piece, from its mask on the host (see :func:`_piece`)."""
    if mask_host_BT is None:
        return (0, -1)
    steps = torch.nonzero(mask_host_BT.any(dim=0)).flatten()
    if steps.numel() == 0:
        return None
    a, b = int(steps[0]), int(steps[-1]) + 1
    return (0, -1) if (a, b) == (0, mask_host_BT.shape[1]) else (a, b)


class _Replay:
    """What a segment's recomputation must share with its first pass so that it computes the
    same thing: the random-number streams (dropout) and the autocast settings.

    The generators are replayed only if the first pass drew from them: restoring them means
    forking every generator around the recomputation, and that, with the reading of the device
    states through ``torch.utils.checkpoint``'s pytree helpers, took ~290 us a segment (under
    cProfile; ~100 us now) of the host's ~1 ms per checkpointed segment (CPU, nil compute),
    where a GPU segment of a minGRU at B=64, H=1024, k=1024 is ~2 ms of work."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), "cpu")
        self.module = torch.get_device_module(self.device_type) if self.device_type != "cpu" else None
        self.devices = sorted({t.get_device() for t in tensors if t.device.type == self.device_type}) if self.module else []
        self.rng = self._generators()
        self.drew = True  # until the first pass has shown otherwise
        self.autocast = [
            (d, dict(enabled=torch.is_autocast_enabled(d), dtype=torch.get_autocast_dtype(d), cache_enabled=torch.is_autocast_cache_enabled()))
            for d in dict.fromkeys([self.device_type, "cpu"])
        ]

    def _generators(self) -> list[Tensor]:
        return [torch.get_rng_state(), *(self.module.get_rng_state(d) for d in self.devices)]

    def _moved(self) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(self._generators(), self.rng))

    def first_pass_done(self) -> None:
        self.drew = self._moved()

    def restore(self, stack: ExitStack) -> None:
        if self.drew:
            stack.enter_context(torch.random.fork_rng(devices=self.devices, device_type=self.device_type))
            torch.set_rng_state(self.rng[0])
            for d, state in zip(self.devices, self.rng[1:]):
                self.module.set_rng_state(state, d)
        for d, kw in self.autocast:
            stack.enter_context(torch.autocast(d, **kw))

    def check(self) -> None:
        """After a recomputation without the generators replayed: it must not have drawn either."""
        if not self.drew and self._moved():
            raise RuntimeError(
                "checkpointed BPTT: the model drew random numbers when a segment was recomputed with"
                " autograd but not in its first pass without autograd; draw them in both (dropout"
                " depends on module.training, not on grad mode) or use model.tbptt.mode full"
            )


class _Segment:
    """What recomputing one checkpointed segment takes: its closure, its replay, its input states
    and which of them need a gradient, and the device tensors it reads (marked for a side stream)."""

    __slots__ = ("run", "replay", "states", "needs", "inputs")

    def __init__(self, run: Callable, replay: _Replay, needs: list[bool], inputs: tuple[Tensor, ...]) -> None:
        self.run, self.replay, self.needs, self.inputs = run, replay, needs, inputs
        self.states: tuple[Tensor, ...] = ()

    def recompute(self, stream: Optional[Any]) -> tuple:
        """``(leaf states, part, state, stream)``: the segment rerun with autograd on ``stream``
        (None: the current one)."""
        leaves = tuple(s.detach().requires_grad_(n) for s, n in zip(self.states, self.needs))
        with ExitStack() as stack:
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(stream.device))
                for t in (*self.states, *self.inputs):
                    t.record_stream(stream)  # their memory is not reused while the stream reads it
                stack.enter_context(torch.cuda.stream(stream))
            self.replay.restore(stack)
            with torch.enable_grad():
                part, state = self.run(leaves)
        self.replay.check()
        return leaves, part, state, stream


class _Overlap:
    """``run_window(overlap=True)``: the checkpointed segments of one window, so that each
    segment's backward first issues the recomputation of the segment before it on a side stream
    (two, alternating): on a GPU it runs while this segment's backward does (a recurrence at a
    small batch is latency-bound step by step and leaves most of the GPU idle), at the memory of
    two segments' activations instead of one. Without CUDA, the same order one after the other."""

    def __init__(self, device: torch.device) -> None:
        self.streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)] if device.type == "cuda" else None
        self.segments: list[Optional[_Segment]] = []
        self.ahead: dict[int, tuple] = {}

    def add(self, segment: _Segment) -> int:
        self.segments.append(segment)
        return len(self.segments) - 1

    def prefetch(self, i: int) -> None:
        if i >= 0 and self.segments[i] is not None:
            segment, self.segments[i] = self.segments[i], None
            self.ahead[i] = segment.recompute(self.streams[i % 2] if self.streams else None)


class _RecomputedSegment(torch.autograd.Function):
    """One checkpointed segment whose first pass runs without autograd (for cuDNN: its inference
    forward, no reserve space) and whose backward recomputes it with autograd and hands the
    gradients of its input state and of the parameters back to the outer graph.

    The parameters are inputs of this Function, so each reaches its AccumulateGrad node through
    autograd once per backward, summed over all segments: DDP's and ZeRO's gradient hooks fire
    once per parameter, as for an uncheckpointed graph (a reentrant ``torch.utils.checkpoint``
    would accumulate into ``.grad`` once per segment inside its own backward). A segment
    recomputed ahead on a side stream (:class:`_Overlap`) runs its backward there; the current
    stream waits for it before the gradients are handed back."""

    @staticmethod
    def forward(ctx, run: Callable, box: list, n_state: int, overlap: Optional[_Overlap], inputs: tuple[Tensor, ...],
                *tensors: Tensor):
        states, params = tensors[:n_state], tensors[n_state:]
        ctx.params, ctx.overlap, ctx.index = params, overlap, None
        ctx.segment = _Segment(run, _Replay(tensors), [s.requires_grad for s in states], inputs)
        ctx.save_for_backward(*states)
        ctx.set_materialize_grads(False)
        part, state = run(states)
        ctx.segment.replay.first_pass_done()
        if overlap is not None:
            ctx.segment.states = states
            ctx.index = overlap.add(ctx.segment)
        box.append(isinstance(state, Tensor))
        return (part, *state_tensors(state))

    @staticmethod
    def backward(ctx, g_part: Optional[Tensor], *g_state: Optional[Tensor]):
        need = ctx.needs_input_grad[5:]
        overlap, segment = ctx.overlap, ctx.segment
        ctx.segment = None
        ahead = overlap.ahead.pop(ctx.index, None) if overlap is not None else None
        if ahead is None:
            segment.states = ctx.saved_tensors
            ahead = segment.recompute(None)
        if overlap is not None:
            overlap.prefetch(ctx.index - 1)  # before this backward, so that both run at once
        leaves, part, state, stream = ahead
        pairs = [(o, g) for o, g in zip((part, *state_tensors(state)), (g_part, *g_state)) if g is not None and o.requires_grad]
        wrt = [t for t, n in zip((*leaves, *ctx.params), need) if n]
        none = (None,) * 5
        if not (pairs and wrt):
            return (*none, *(None for _ in need))
        with ExitStack() as stack:
            if stream is not None:
                current = torch.cuda.current_stream(stream.device)
                stream.wait_stream(current)  # the incoming gradients
                for _, g in pairs:
                    g.record_stream(stream)
                stack.enter_context(torch.cuda.stream(stream))
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        if stream is not None:
            current.wait_stream(stream)
            for g in got:
                if g is not None:
                    g.record_stream(current)
        grads = iter(got)
        return (*none, *(next(grads) if n else None for n in need))


def _checkpointed_piece(
    model: RecurrentModel, x: Tensor, y: Tensor, mask: Tensor, reset: Optional[Tensor], state: Optional[State], task: TaskSpec,
    params: Optional[list[Tensor]], span: Span, cuts: Optional[Tensor] = None, overlap: Optional[_Overlap] = None,
) -> tuple[Tensor, State]:
    if params is None:  # partitioned parameters: the gradients' shapes would not match theirs
        return checkpoint(_piece, model, x, y, mask, reset, state, task, span, cuts, use_reentrant=False)
    was_tensor = isinstance(state, Tensor)

    def run(states: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        s = None if not states else states[0] if was_tensor else states
        return _piece(model, x, y, mask, reset, s, task, span, cuts)

    box: list = []
    part, *out = _RecomputedSegment.apply(run, box, len(state_tensors(state)), overlap, (x, y, mask),
                                          *state_tensors(state), *params)
    return part, out[0] if box[0] else tuple(out)


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
    partitioned: bool = False,
    mask_host: Optional[Tensor] = None,
    cuts_T: Optional[Tensor] = None,
    overlap: bool = False,
) -> WindowResult:
    """Run ``x`` from ``state``; return the summed loss, the final state, and the state after
    ``capture_at`` steps (where the next truncation window starts).

    With ``segment``, the window runs in segments of that many steps under activation
    checkpointing: only the states between segments are kept, and each segment is recomputed in
    the backward pass, so the gradients are exact at O(T/segment) states of memory plus one
    segment of activations (Gruslys et al. 2016 with the simplest policy). The first pass runs
    without autograd (``_RecomputedSegment``), so a segment costs one inference forward more
    than in full BPTT, not one training forward more; the last segment runs under plain autograd
    (the backward would rebuild its activations first thing, so keeping them adds no peak). With
    ``partitioned`` (ZeRO-3: a parameter is gathered only during its module's forward and is an
    empty tensor outside it) the segments go through ``torch.utils.checkpoint`` instead, whose
    first pass is a training forward.
    ``reset`` stays on the host: its boundaries are read without a device sync. So may a copy of
    ``mask`` (``mask_host``): then the head and the loss run only over the steps of each piece
    that carry a loss, and not at all in a piece without one (a label at the end of a long
    sequence: the segments before it only carry the state; the head's and the loss's calls are
    about half of such a segment's, on the host as on the device). ``cuts_T`` (host bools): other
    processes' reset steps, see ``RecurrentModel.hidden``. ``overlap`` (with ``segment``): each
    segment's recomputation is issued, on a side stream, before the backward of the segment after
    it (:class:`_Overlap`): two segments' activations at once.
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
    recompute = bool(segment) and torch.is_grad_enabled()
    params = [p for p in model.parameters() if p.requires_grad] if recompute and not partitioned else None
    chain = _Overlap(x.device) if overlap and params is not None else None
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = None if reset is None else reset[:, a:b]
        c = None if cuts_T is None else cuts_T[a:b]
        span = loss_span(None if mask_host is None else mask_host[:, a:b])
        if recompute and b < T:  # the last segment keeps its activations: its backward comes first
            part, state = _checkpointed_piece(model, x[:, a:b], y[:, a:b], mask[:, a:b], r, state, task, params, span, c,
                                              chain)
        else:
            part, state = _piece(model, x[:, a:b], y[:, a:b], mask[:, a:b], r, state, task, span, c)
        if span is not None:
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
