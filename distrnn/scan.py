"""Parallel-scan recurrences: minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Their gates depend on the input only, so ``h_t = a_t * h_{t-1} + b_t`` over a whole sequence is a
linear recurrence computed by a scan in O(log T) depth. The scan runs in log space (Heinsen 2023):
with ``a*_t = sum_{s<=t} log a_s``,

    log h_t = a*_t + logcumsumexp_{s<=t}(log b_s - a*_s)      (the initial state enters as b_0)

which is stable because every h stays positive: the candidate goes through
``g(x) = x + 0.5 if x >= 0 else sigmoid(x)``. Each layer has

- ``scan_log``: the parallel form (the default for sequences), computed in float32 whatever the
  autocast dtype, in pieces of ``scan_chunk`` steps with the state carried between pieces so that
  the cumulative sums stay bounded and memory for the scan's intermediates does not grow with T;
- ``sequential``: the plain loop ``h = a * h + b``, the reference the tests check the scan against
  and the path of ``step`` (streaming generation);
- on CUDA, a fused Triton kernel (``distrnn/kernels/min_scan.py``: gates, scan and their
  gradients in one pass each, in linear space) chosen automatically; ``options: {backend: compile}``
  uses torch.compile of the log-space scan there instead, ``backend: eager`` plain PyTorch;
- on a CPU, ``linear_scan`` (``backend: loop``, the default there): the recurrence stepped in
  linear space without a graph per step, with its adjoint recurrence as a hand-written backward,
  all chunks of ~sqrt(T/2) steps at once (:func:`_scan_into`). Its depth is ~2 sqrt(2T), not
  log T, but a CPU has few cores to spread a scan over, and PyTorch's CPU
  ``logcumsumexp`` costs ~12 ns per element (62% of a 3-layer minGRU training step at B=32,
  T=1024, H=128): the loop's forward and backward are ~5-10x faster than the log-space scan's.
  ``backend: compile`` on a CPU keeps that loop and compiles the gates (``linear_coefficients``
  and their gradient, each one fused loop in C++ instead of a dozen passes over (B, T, H)
  tensors): 1.23-1.35x the training step on 2 cores with glibc's malloc as distrnn sets it, up to
  1.77x with glibc as it is (0.8x for small windows: the compiled call's fixed cost), for a few
  seconds of compilation and a C++ compiler (the log-space scan compiled was 3x slower than the
  loop there).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrnn.data.loaders import to_device_queued
from distrnn.kernels import scan_config_from_env
from distrnn.layers import Recurrence, register_recurrence
from distrnn.state import State

# A zero state has no logarithm; it enters the scan as this, whose contribution is far below
# float32 resolution. (The gradient with respect to an exactly-zero initial state is therefore 0.)
_TINY = 1e-30


_COMPILED: dict = {}


def _compiled(fn):
    """torch.compile of a layer's method, one per class for every shape: on CUDA the log-space scan
    (gates, logs and scan in a few kernels), on a CPU the gates of the loop."""
    key = fn.__func__ if hasattr(fn, "__func__") else fn
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(key, dynamic=True)
    return _COMPILED[key].__get__(fn.__self__) if hasattr(fn, "__self__") else _COMPILED[key]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    # asked at every forward on CUDA (which backend, and check_device): looked up once
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _cpp_compiler() -> Optional[str]:
    """The C++ compiler torch.compile would build CPU kernels with (``$CXX``, else g++ or clang++), if found."""
    import shutil

    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _scan_into(a_BNH: Tensor, b_BNH: Tensor, h0_BH: Tensor, out_BNH: Tensor, reverse: bool = False,
               chunk: Optional[int] = None) -> None:
    """``out_t = a_t out_{t-1} + b_t`` for t = 0..N-1 from ``out_{-1} = h0`` (``reverse``:
    ``out_t = a_t out_{t+1} + b_t`` from ``out_N = h0``), for coefficients in [0, 1].

    In chunks of L ~ sqrt(N / 2) steps, all chunks stepped at once: a first pass finds where each
    chunk ends from a zero state, a walk over the C chunk ends (joined by the products of their
    coefficients) gives the state each chunk starts from, and a second pass steps every chunk from
    its start, writing the states. That is 2L + C operations on (B, C, H) slices instead of N on
    (B, H) rows: stepped one at a time, a CPU spends microseconds a step dispatching an operation
    on a few thousand numbers, on one thread (H=128, T=4096: 1.9-2.5x faster chunked at B=16,
    8-12x at B=1; benchmarks/RESULTS.md). From B*H = 32768 on, PyTorch's grain size, one step's operation
    already spreads over the threads and the chunks' second reading of a and b costs more than it
    saves (0.8-0.9x at B=64, H=512): there every step goes alone. The chunks' products lose
    nothing a step at a time would keep: for coefficients in [0, 1] they only shrink, to 0 where
    the state is forgotten. ``chunk``: L (default as said; N or more: every step alone)."""
    B, N, H = b_BNH.shape
    L = chunk or (max(8, math.isqrt(N // 2)) if B * H < 32768 else N)
    C = N // L if N >= 2 * L else 0
    body = C * L  # the first C*L steps in the recurrence's order are chunked, the rest stepped
    if body:
        span = slice(N - body, N) if reverse else slice(0, body)
        a4, b4, out4 = (x[:, span].unflatten(1, (C, L)) for x in (a_BNH, b_BNH, out_BNH))
        steps = range(L - 1, -1, -1) if reverse else range(L)
        chunks = range(C - 1, -1, -1) if reverse else range(C)
        end_BCH = b4[:, :, steps[0]].clone()
        end_BCH[:, chunks[0]].addcmul_(a4[:, chunks[0], steps[0]], h0_BH)
        for l in steps[1:]:
            torch.addcmul(b4[:, :, l], a4[:, :, l], end_BCH, out=end_BCH)
        prod_BCH = torch.prod(a4, dim=2)
        start_BCH = torch.empty_like(end_BCH)
        start_BCH[:, chunks[0]] = h0_BH
        start_BCH[:, chunks[1]] = end_BCH[:, chunks[0]]  # the first chunk started from h0 already
        for prev, c in zip(chunks[1:], chunks[2:]):
            torch.addcmul(end_BCH[:, prev], prod_BCH[:, prev], start_BCH[:, prev], out=start_BCH[:, c])
        h = start_BCH
        for l in steps:
            h = torch.addcmul(b4[:, :, l], a4[:, :, l], h, out=out4[:, :, l])
    h = h0_BH if not body else out_BNH[:, N - body] if reverse else out_BNH[:, body - 1]
    for t in range(N - body - 1, -1, -1) if reverse else range(body, N):
        h = torch.addcmul(b_BNH[:, t], a_BNH[:, t], h, out=out_BNH[:, t])


class _LinearScan(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + b_t`` with no graph per step (:func:`_scan_into`); backward runs the
    adjoint ``G_t = dL/dh_t + a_{t+1} G_{t+1}`` the same way, backwards in time, then
    ``dL/da_t = G_t h_{t-1}``, ``dL/db_t = G_t``, ``dL/dh0 = a_0 G_0``. Batch-major: no (B, T, H)
    tensor is transposed into a copy (at B=32, T=1024, H=128 stepping time-major copies was slower)."""

    @staticmethod
    def forward(ctx, a_BTH: Tensor, b_BTH: Tensor, h0_BH: Tensor) -> Tensor:
        h_BTH = torch.empty_like(b_BTH, memory_format=torch.contiguous_format)
        _scan_into(a_BTH, b_BTH, h0_BH, h_BTH)
        ctx.save_for_backward(a_BTH, h0_BH, h_BTH)
        return h_BTH

    @staticmethod
    def backward(ctx, dh_BTH: Tensor):
        a_BTH, h0_BH, h_BTH = ctx.saved_tensors
        G_BTH = torch.empty_like(h_BTH)
        G_BTH[:, -1] = dh_BTH[:, -1]
        _scan_into(a_BTH[:, 1:], dh_BTH[:, :-1], G_BTH[:, -1], G_BTH[:, :-1], reverse=True)
        da = None
        if ctx.needs_input_grad[0]:
            da = torch.empty_like(G_BTH)
            torch.mul(G_BTH[:, 1:], h_BTH[:, :-1], out=da[:, 1:])
            torch.mul(G_BTH[:, 0], h0_BH, out=da[:, 0])
        dh0 = a_BTH[:, 0] * G_BTH[:, 0] if ctx.needs_input_grad[2] else None
        return da, G_BTH, dh0


def linear_scan(a_BTH: Tensor, b_BTH: Tensor, h0_BH: Tensor) -> Tensor:
    """All h_t of ``h_t = a_t h_{t-1} + b_t``, stepped in a loop with a hand-written backward
    (``backend: loop``, the CPU default)."""
    return _LinearScan.apply(a_BTH, b_BTH, h0_BH)


def scan_log(log_a_BTH: Tensor, log_b_BTH: Tensor, h0_BH: Tensor) -> Tensor:
    """All h_t of ``h_t = a_t h_{t-1} + b_t`` from logs of a and b and a positive h0 (float32 or float64)."""
    a_star = torch.cumsum(log_a_BTH, dim=1)
    log_h0 = torch.log(h0_BH.clamp_min(_TINY)).unsqueeze(1)
    log_h = a_star + torch.logcumsumexp(torch.cat([log_h0, log_b_BTH - a_star], dim=1), dim=1)[:, 1:]
    return torch.exp(log_h)


class _MinRecurrence(Recurrence):
    """A stack of min-RNN layers: each ``[norm] -> cell -> [+ residual]``, as in the paper's blocks.

    State: ``h_LBH`` (positive). ``parallel: false`` runs every layer through ``sequential``, the
    reference loop with autograd at every step, instead of the backend's scan.

    ``norm`` puts a LayerNorm before every layer but the first: the first reads the model's input
    itself, and a LayerNorm over a few raw features destroys them (the adding problem's two inputs,
    a value and a marker, would be reduced to the sign of their difference).

    ``chrono`` (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?") initializes the
    gate biases so that each unit's retention ``a = 1 - z`` (minGRU) or ``f'`` (minLSTM) starts at
    ``u / (1 + u)``, u uniform in [1, chrono - 1]: the units' memory spans start spread up to
    ``chrono`` steps. With PyTorch's initialization every gate starts near 0.5, a state halves
    each step and nothing reaches the loss from more than a few dozen steps back, so tasks with
    dependencies over hundreds of steps never start learning (the adding problem at T = 1000).
    Set it to the longest dependency the task has.

    ``kernel_split`` (the Triton kernel only): the time axis in that many chunks, each scanned by
    programs of its own and joined by a second, short pass (``auto``: as many as fill the GPU,
    :func:`distrnn.kernels.min_scan.auto_split`). The kernel gives one program a whole sequence
    for each row and block of units, so at a small batch and width (B=64, H=128) it keeps fewer
    programs busy than a GPU has multiprocessors; a split reads the input twice to use them all.
    """

    gates: int  # linear maps of x per layer: the candidate and the gates

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm: bool = False,
        residual: bool = False,
        scan_chunk: int = 2048,
        parallel: bool = True,
        backend: Optional[Literal["triton", "compile", "eager", "loop"]] = None,
        compile: Optional[bool] = None,
        chrono: Optional[float] = None,
        kernel_split: int | Literal["auto"] = 1,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, dropout)
        if kernel_split != "auto" and (isinstance(kernel_split, bool) or not isinstance(kernel_split, int) or kernel_split < 1):
            raise ValueError("model.network.options.kernel_split: must be auto or an integer >= 1 (chunks of the time"
                             f" axis), got {kernel_split!r}")
        self.kernel_split = kernel_split
        if isinstance(scan_chunk, bool) or not isinstance(scan_chunk, int) or scan_chunk < 1:
            # (only the GPU paths cut the scan: a CPU run would not find it out)
            raise ValueError(f"model.network.options.scan_chunk: must be an integer >= 1 (steps), got {scan_chunk!r}")
        self.residual, self.scan_chunk, self.parallel = residual, scan_chunk, parallel
        if backend is None and compile is not None:  # the older spelling of the option
            backend = "compile" if compile else "eager"
        if backend not in (None, "triton", "compile", "eager", "loop"):
            raise ValueError(f"model.network.options.backend: '{backend}' is not one of triton, compile, eager, loop")
        # None: the fused Triton kernel on CUDA (the plain log-space scan if Triton is missing:
        # torch.compile generates its GPU code with Triton too), the loop with its hand-written
        # backward elsewhere
        self.backend = backend
        if backend in (None, "triton"):
            # checked here, before a run starts, not at the kernel's import on the first CUDA forward
            scan_config_from_env()
        dims = [input_size] + [hidden_size] * num_layers
        self.proj = nn.ModuleList(nn.Linear(dims[i], self.gates * hidden_size) for i in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dims[i]) if norm and i > 0 else nn.Identity()
                                   for i in range(num_layers))
        self.drop = nn.Dropout(dropout)
        if chrono is not None:
            if isinstance(chrono, bool) or not isinstance(chrono, (int, float)) or not chrono > 2:
                raise ValueError(f"model.network.options.chrono: {chrono} must be a number > 2 (the longest memory span in steps)")
            with torch.no_grad():
                for p in self.proj:
                    log_u_H = torch.empty(hidden_size).uniform_(1, chrono - 1).log_()
                    self.chrono_biases(p.bias, log_u_H)

    def chrono_biases(self, bias_G: Tensor, log_u_H: Tensor) -> None:
        """Set the gate biases in ``bias_G`` so that the retention starts at ``u / (1 + u)``."""
        raise NotImplementedError

    def log_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        """(log a, log b) of the recurrence from the projected input, for the log-space scan."""
        raise NotImplementedError

    def linear_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) computed directly, not as exponentials of the logs, for the loops: on a CPU the
        log-space gates (softplus, log, exp and their gradients) took ~60% of a training step."""
        raise NotImplementedError

    def takes_resets(self, x_BTD: Tensor) -> bool:
        """Whether ``forward`` takes a reset mask for this input: the loops and the Triton kernel
        zero a row's state inside the scan (``h_t = a_t keep_t h_{t-1} + b_t``), so a window with
        resets is one call per layer; the log-space scans (``eager``, ``compile`` on CUDA) need the
        input cut at the resets (:meth:`distrnn.model.RecurrentModel.hidden` does it)."""
        return (self._backend(x_BTD) if self.parallel else "sequential") in ("triton", "loop", "compiled_loop", "sequential")

    # forward(..., outputs=False) is understood (see RecurrentModel.hidden)
    skips_outputs = True

    def forward(self, x_BTD: Tensor, state: Optional[State] = None,
                reset_BT: Optional[Tensor] = None, outputs: bool = True) -> tuple[Optional[Tensor], Tensor]:
        """``reset_BT[b, t]`` True zeroes row b's state before step t, in every layer (only where
        :meth:`takes_resets`); it may live on the host. ``outputs=False`` (the caller reads the
        final state alone) may return None for the outputs: outside autograd, the Triton kernel
        then writes no states for the last layer."""
        B, T = x_BTD.shape[:2]
        h0_LBH = state if state is not None else x_BTD.new_zeros(self.num_layers, B, self.hidden_size)
        keep_BT = None
        if reset_BT is not None:
            if not self.takes_resets(x_BTD):
                raise ValueError(f"{type(self).__name__}: backend {self._backend(x_BTD)} takes no reset mask:"
                                 " cut the input at the resets")
            keep_BT = to_device_queued(~reset_BT, x_BTD.device)
        out, finals = x_BTD, []
        for layer in range(self.num_layers):
            inp = out
            z = self.proj[layer](self.norms[layer](inp))
            states = outputs or layer < self.num_layers - 1 or torch.is_grad_enabled()
            h_BTH, last_BH = self._layer(z, h0_LBH[layer], keep_BT, states)
            finals.append(last_BH)
            if h_BTH is None:
                return None, torch.stack(finals)
            # the states stay in z's dtype (bf16 under autocast, as cuDNN's outputs): the next
            # layer or the head would cast them to it anyway
            out = inp + h_BTH if self.residual and inp.shape[-1] == self.hidden_size else h_BTH
            if layer < self.num_layers - 1:
                out = self.drop(out)
        return out, torch.stack(finals)

    def probe(self, x_BTD: Tensor, state: Optional[State] = None) -> dict[str, tuple[Tensor, str]]:
        B = x_BTD.shape[0]
        h0_LBH = state if state is not None else x_BTD.new_zeros(self.num_layers, B, self.hidden_size)
        out: dict[str, tuple[Tensor, str]] = {}
        inp = x_BTD
        for layer in range(self.num_layers):
            z = self.proj[layer](self.norms[layer](inp))
            for name, gate in self.gate_values(z).items():
                out[f"l{layer}.{name}"] = (gate, "sigmoid")
            h_BTH = self.sequential(z, h0_LBH[layer])
            out[f"l{layer}.h"] = (h_BTH, "linear")
            inp = inp + h_BTH if self.residual and inp.shape[-1] == self.hidden_size else h_BTH
        return out

    def gate_values(self, z_BTG: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _layer(self, z_BTG: Tensor, h0_BH: Tensor, keep_BT: Optional[Tensor] = None,
               states: bool = True) -> tuple[Optional[Tensor], Tensor]:
        """``(h_BTH, last_BH)``: the states in ``z``'s dtype and the final state in float32
        (float64 stays float64), which TBPTT carries. The scan itself is computed in float32
        whatever autocast chose. ``keep_BT`` (bool, on z's device): False where a row's state is
        zeroed before the step (the loops and the kernel only, see :meth:`takes_resets`).
        ``states=False``: the Triton kernel returns the final state alone (h_BTH None)."""
        backend = self._backend(z_BTG) if self.parallel else "sequential"
        if backend == "triton":
            from distrnn.kernels.min_scan import min_scan, min_scan_final

            split = self._split(z_BTG)
            if not states:
                return None, min_scan_final(z_BTG, h0_BH.float(), lstm=self.gates == 3, keep_BT=keep_BT, split=split)
            # no pieces needed: the kernel keeps nothing per step but the states it returns; it
            # reads a bf16/fp16 z as it is (converting in registers) and writes states in its dtype
            return min_scan(z_BTG, h0_BH.float(), lstm=self.gates == 3, keep_BT=keep_BT, split=split)
        out_dtype = z_BTG.dtype
        dtype = torch.float64 if z_BTG.dtype == torch.float64 else torch.float32
        z_BTG, h = z_BTG.to(dtype), h0_BH.to(dtype)
        if backend == "sequential":
            h_BTH = self.sequential(z_BTG, h, keep_BT)
        elif backend in ("loop", "compiled_loop"):
            # a batch or window of one would compile once more (dynamo specializes sizes 0 and 1,
            # 3-4 s each): its gates are a handful of small ops, eager costs nothing there
            compiled = backend == "compiled_loop" and min(z_BTG.shape[:2]) > 1
            a, b = (_compiled(self.linear_coefficients) if compiled else self.linear_coefficients)(z_BTG)
            h_BTH = linear_scan(a if keep_BT is None else a * keep_BT.unsqueeze(-1), b, h)
        else:
            assert keep_BT is None, "the log-space scan takes no reset mask"
            piece_fn = _compiled(self._piece) if backend == "compile" else self._piece
            pieces = []
            for s in range(0, z_BTG.shape[1], self.scan_chunk):
                h_BtH = piece_fn(z_BTG[:, s : s + self.scan_chunk], h)
                pieces.append(h_BtH)
                h = h_BtH[:, -1]
            h_BTH = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return h_BTH.to(out_dtype), h_BTH[:, -1]

    def _split(self, z_BTG: Tensor) -> int:
        """The Triton kernel's chunks of the time axis (``kernel_split``; auto: by the GPU's size)."""
        if self.kernel_split != "auto":
            return self.kernel_split
        from distrnn.kernels.min_scan import auto_split

        B, T, G = z_BTG.shape
        return auto_split(B, G // self.gates, T, _multiprocessors(z_BTG.device) if z_BTG.is_cuda else 1)

    def _backend(self, z_BTG: Tensor) -> str:
        if self.backend == "compile" and not z_BTG.is_cuda:
            return "compiled_loop"  # the loop with its gates compiled, in z's dtype (float64 too)
        if z_BTG.dtype == torch.float64:
            # the references and float64 tests: the kernel computes in float32
            return "loop" if self.backend == "loop" else "eager"
        if self.backend == "triton":
            self.check_device(z_BTG.device.type)
            return "triton"
        if self.backend is not None:
            return self.backend
        if not z_BTG.is_cuda:
            return "loop"
        return "triton" if _triton_available() else "eager"

    def check_device(self, device_type: str, device_setting: str = "trainer.accelerator") -> None:
        """ValueError naming the option when the layer cannot run on ``device_type``, chosen by
        ``device_setting`` (the CLI asks before a run opens; a forward would fail inside training)."""
        if self.backend == "compile" and device_type == "cpu" and not _cpp_compiler():
            raise ValueError(f"model.network.options.backend: compile on a CPU ({device_setting}) needs a C++ compiler"
                             f" for torch.compile, and none was found ({os.environ.get('CXX') or 'g++, clang++'});"
                             " install one or leave backend unset")
        if self.backend == "compile" and device_type == "cuda" and not _triton_available():
            raise ValueError(f"model.network.options.backend: compile on CUDA ({device_setting}) needs Triton, torch.compile's"
                             " GPU code generator, and it is not installed (pip install triton); or leave backend unset")
        if self.backend != "triton":
            return
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"model.network.options.backend: triton needs a CUDA device, and this run is on {device_type}"
                             f" ({device_setting}); leave backend unset to have the layer choose")
        if not _triton_available():
            raise ValueError("model.network.options.backend: triton is not installed (pip install triton);"
                             " leave backend unset for the plain PyTorch scan")

    def _piece(self, z_BTG: Tensor, h0_BH: Tensor) -> Tensor:
        return scan_log(*self.log_coefficients(z_BTG), h0_BH)

    def sequential(self, z_BTG: Tensor, h0_BH: Tensor, keep_BT: Optional[Tensor] = None) -> Tensor:
        """The reference loop ``h = a * h + b`` (``h = a * keep * h + b`` with a reset mask)."""
        a, b = self.linear_coefficients(z_BTG)
        h, hs = h0_BH, []
        for t in range(z_BTG.shape[1]):
            if keep_BT is not None:
                h = h * keep_BT[:, t, None]
            h = a[:, t] * h + b[:, t]
            hs.append(h)
        return torch.stack(hs, dim=1)

    def step(self, x_BD: Tensor, state: Optional[State] = None) -> tuple[Tensor, Tensor]:
        parallel, self.parallel = self.parallel, False
        try:
            y, state = self.forward(x_BD.unsqueeze(1), state)
        finally:
            self.parallel = parallel
        return y.squeeze(1), state


@register_recurrence("mingru")
class MinGRU(_MinRecurrence):
    """``h_t = (1 - z_t) h_{t-1} + z_t g(h~_t)``, ``z_t = sigmoid(W_z x_t)``, ``h~_t = W_h x_t``."""

    gates = 2

    def log_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        k, cand = z_BTG.chunk(2, dim=-1)
        return -F.softplus(k), -F.softplus(-k) + log_g(cand)  # log(1 - z), log(z g(h~))

    def linear_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        k, cand = z_BTG.chunk(2, dim=-1)
        return torch.sigmoid(-k), torch.sigmoid(k) * g(cand)

    def gate_values(self, z_BTG: Tensor) -> dict[str, Tensor]:
        return {"z": torch.sigmoid(z_BTG.chunk(2, dim=-1)[0])}

    def chrono_biases(self, bias_G: Tensor, log_u_H: Tensor) -> None:
        bias_G[: self.hidden_size] = -log_u_H  # 1 - z = sigmoid(-k) = u / (1 + u)


@register_recurrence("minlstm")
class MinLSTM(_MinRecurrence):
    """``h_t = f'_t h_{t-1} + i'_t g(h~_t)`` with ``f' = f / (f + i)``, ``i' = i / (f + i)``."""

    gates = 3

    def log_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        kf, ki, cand = z_BTG.chunk(3, dim=-1)
        diff = F.softplus(-kf) - F.softplus(-ki)  # log(i / f)
        return -F.softplus(diff), -F.softplus(-diff) + log_g(cand)

    def linear_coefficients(self, z_BTG: Tensor) -> tuple[Tensor, Tensor]:
        kf, ki, cand = z_BTG.chunk(3, dim=-1)
        # f / (f + i) as sigmoid(log f - log i): the plain ratio is 0 / 0 once both gates underflow
        diff = F.softplus(-kf) - F.softplus(-ki)
        return torch.sigmoid(-diff), torch.sigmoid(diff) * g(cand)

    def gate_values(self, z_BTG: Tensor) -> dict[str, Tensor]:
        f, _ = self.linear_coefficients(z_BTG)
        return {"f": f, "i": 1 - f}  # the normalized gates f' and i' = 1 - f'

    def chrono_biases(self, bias_G: Tensor, log_u_H: Tensor) -> None:
        H = self.hidden_size
        bias_G[:H], bias_G[H : 2 * H] = log_u_H, -log_u_H  # f = u / (1 + u), i = 1 - f, so f' = f
