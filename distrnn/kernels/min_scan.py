"""A fused Triton kernel for the minGRU and minLSTM recurrences, forward and backward.

    minGRU:  a_t = 1 - sigmoid(k_t)                       h_t = a_t h_{t-1} + (1 - a_t) g(c_t)
    minLSTM: a_t = f_t / (f_t + i_t), f, i = sigmoid(k_f), sigmoid(k_i)

One program owns a (batch row, block of hidden units) and walks the sequence in tiles of
``BLOCK_T`` steps: inside a tile the affine maps ``h -> a h + b`` are composed by
``tl.associative_scan`` and applied to the state carried in from the previous tile. Since
``0 < a < 1`` the scan runs in linear space in float32 without the logs the PyTorch path needs
(products of ``a`` only shrink). The gates are computed in the kernel from the projected input,
so the forward pass reads ``k``, ``c`` and writes ``h``; the backward pass runs the adjoint
recurrence ``G_t = dL/dh_t + a_{t+1} G_{t+1}`` backwards in the same way and writes ``dk``, ``dc``
and ``dh0``. The reference is :meth:`distrnn.scan._MinRecurrence.sequential`; tests compare the two,
forward and backward (on CPU through Triton's interpreter, on a GPU natively).

One program walks a whole sequence per (row, block of units). With ``split`` (the layers'
``kernel_split``) the time axis is cut into chunks, each with programs of its own: a first pass
writes each chunk's map ``h -> A h + b`` (``STORE_A``, no states or dz), ``_chain`` joins the
maps (forward in order, backward from the end), a second pass runs each chunk from what enters it.

The tile shape, the number of warps and whether the next tile is loaded before this one is
scanned are chosen by Triton's autotuner on the first call for each hidden size, gate count,
dtype and size class of (B, T) (``CONFIGS``, ``shape_key``); ``FIXED_CONFIG`` or the ``config`` argument set one instead.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from distrnn.kernels import scan_config_from_env


@triton.jit
def _compose(a1, b1, a2, b2):
    # apply (a1, b1), then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _coeffs(k, ki, c, LSTM: tl.constexpr):
    """(a, b, g) of one step. minGRU: a = 1 - sigmoid(k); minLSTM: a = f / (f + i) with
    f = sigmoid(k), i = sigmoid(ki), computed as sigmoid(log f - log i); b = (1 - a) g(c)."""
    g = tl.where(c >= 0, c + 0.5, tl.sigmoid(c))
    if LSTM:
        # log sigmoid(x) = -softplus(-x), softplus(y) = max(y, 0) + log(1 + exp(-|y|))
        u = _softplus(-ki) - _softplus(-k)
        a = tl.sigmoid(u)
    else:
        a = 1.0 - tl.sigmoid(k)
    return a, (1.0 - a) * g, g


@triton.jit
def _softplus(y):
    return tl.maximum(y, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(y)))


@triton.jit
def _load_z(K, KI, C, zoff, m, LSTM: tl.constexpr):
    k = tl.load(K + zoff, mask=m, other=0.0).to(tl.float32)
    ki = tl.load(KI + zoff, mask=m & LSTM, other=0.0).to(tl.float32)
    c = tl.load(C + zoff, mask=m, other=0.0).to(tl.float32)
    return k, ki, c


@triton.jit(do_not_specialize=["shape_key"])
def _fwd_kernel(K, KI, C, H0, Hout, Hlast, Aprod, Keep, T, CHUNK, Hdim, stride_zb, stride_zt, stride_hb, stride_ht,
                shape_key, LSTM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, PREFETCH: tl.constexpr,
                HAS_KEEP: tl.constexpr = False, STORE_H: tl.constexpr = True, STORE_A: tl.constexpr = False):
    pid_b = tl.program_id(0).to(tl.int64)  # B*T*G can pass 2**31
    pid_h = tl.program_id(1)
    # program_id(2): which of the time chunks of CHUNK steps (CHUNK = T: one); H0, Hlast and
    # Aprod hold one (B, H) per chunk
    start = tl.program_id(2) * CHUNK
    end = tl.minimum(T, start + CHUNK)
    sbase = (tl.program_id(2) * tl.num_programs(0) + pid_b) * Hdim
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < Hdim
    rows = tl.arange(0, BLOCK_T)
    zbase = pid_b * stride_zb + cols[None, :]
    carry = tl.load(H0 + sbase + cols, mask=cmask, other=0.0)
    aprod = tl.full([BLOCK_H], 1.0, tl.float32)
    if PREFETCH:
        t = start + rows
        k_n, ki_n, c_n = _load_z(K, KI, C, zbase + t[:, None] * stride_zt, (t < end)[:, None] & cmask[None, :], LSTM)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + rows
        m = (t < end)[:, None] & cmask[None, :]
        if PREFETCH:
            # the next tile's loads go out before this tile's scan, so their latency is hidden
            k, ki, c = k_n, ki_n, c_n
            tn = t + BLOCK_T
            k_n, ki_n, c_n = _load_z(K, KI, C, zbase + tn[:, None] * stride_zt, (tn < end)[:, None] & cmask[None, :], LSTM)
        else:
            k, ki, c = _load_z(K, KI, C, zbase + t[:, None] * stride_zt, m, LSTM)
        a, b, _ = _coeffs(k, ki, c, LSTM)
        if HAS_KEEP:  # a reset: the state before the step is zeroed, b stays (h_t = a keep h_{t-1} + b)
            a = a * tl.load(Keep + pid_b * T + t, mask=t < end, other=1).to(tl.float32)[:, None]
        a = tl.where(m, a, 1.0)  # steps past the end leave the state as it is
        b = tl.where(m, b, 0.0)
        A, B = tl.associative_scan((a, b), 0, _compose)
        h = A * carry[None, :] + B
        if STORE_H:
            tl.store(Hout + pid_b * stride_hb + t[:, None] * stride_ht + cols[None, :], h, mask=m)
        last = rows[:, None] == BLOCK_T - 1
        carry = tl.sum(tl.where(last, h, 0.0), axis=0)
        if STORE_A:  # the chunk's map h -> aprod h + carry, for the pass that chains the chunks
            aprod = aprod * tl.sum(tl.where(last, A, 0.0), axis=0)
    # the final state in float32 whatever the dtype of Hout: it is what TBPTT carries
    tl.store(Hlast + sbase + cols, carry, mask=cmask)
    if STORE_A:
        tl.store(Aprod + sbase + cols, aprod, mask=cmask)


@triton.jit
def _bwd_loads(K, KI, C, Hs, dH, Keep, kbase, i, n_tiles, rows, cmask, zbase, hbase, start, end, stride_zt, stride_ht,
               LSTM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HAS_KEEP: tl.constexpr,
               HAS_DH: tl.constexpr):
    """Everything the backward reads for tile ``i`` counted from the end of the chunk ``[start,
    end)``, time reversed within it (without ``HAS_DH`` no gradient reaches the states of the
    steps: nothing read for them)."""
    t = start + (n_tiles - 1 - i) * BLOCK_T + (BLOCK_T - 1 - rows)
    valid = (t < end) & (t >= start)
    m = valid[:, None] & cmask[None, :]
    zoff = zbase + t[:, None] * stride_zt
    hoff = hbase + t[:, None] * stride_ht
    m_next = ((t + 1) < end)[:, None] & m
    k_next = tl.load(K + zoff + stride_zt, mask=m_next, other=0.0).to(tl.float32)
    ki_next = tl.load(KI + zoff + stride_zt, mask=m_next & LSTM, other=0.0).to(tl.float32)
    if HAS_DH:
        dout = tl.load(dH + hoff, mask=m, other=0.0).to(tl.float32)
    else:
        dout = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    k, ki, c = _load_z(K, KI, C, zoff, m, LSTM)
    m_prev = ((t - 1) >= 0)[:, None] & m
    h_prev = tl.load(Hs + hoff - stride_ht, mask=m_prev, other=0.0).to(tl.float32)
    if HAS_KEEP:  # this step's and the next's (1: no reset; past the end it does not matter)
        keep = tl.load(Keep + kbase + t, mask=valid, other=1).to(tl.float32)
        keep_next = tl.load(Keep + kbase + t + 1, mask=valid & ((t + 1) < end), other=1).to(tl.float32)
    else:
        keep = tl.full([BLOCK_T], 1.0, tl.float32)
        keep_next = keep
    return k_next, ki_next, dout, k, ki, c, h_prev, keep, keep_next


@triton.jit
def _mul(x, y):
    return x * y


@triton.jit(do_not_specialize=["shape_key"])
def _bwd_kernel(K, KI, C, H0, Hs, dH, dLast, dK, dKI, dC, dH0, Aprod, Keep, T, CHUNK, Hdim, stride_zb, stride_zt,
                stride_hb, stride_ht, shape_key, LSTM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                PREFETCH: tl.constexpr, HAS_KEEP: tl.constexpr = False, HAS_DH: tl.constexpr = True,
                STORE_DZ: tl.constexpr = True, STORE_A: tl.constexpr = False):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    # program_id(2): the time chunk [start, end) (CHUNK = T: one); dLast, dH0 and Aprod hold one
    # (B, H) per chunk: the gradient entering the chunk's last step from after it, the one its
    # first step hands back (a_s keep_s G_s), the product of its a keep
    start = tl.program_id(2) * CHUNK
    end = tl.minimum(T, start + CHUNK)
    sbase = (tl.program_id(2) * tl.num_programs(0) + pid_b) * Hdim
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < Hdim
    rows = tl.arange(0, BLOCK_T)
    zbase = pid_b * stride_zb + cols[None, :]
    hbase = pid_b * stride_hb + cols[None, :]
    kbase = pid_b * T
    h0 = tl.load(H0 + pid_b * Hdim + cols, mask=cmask, other=0.0)  # read at step 0 only
    # the gradient reaching the chunk's last state from outside (the next segment in checkpointed
    # BPTT, the chunks after it)
    dlast = tl.load(dLast + sbase + cols, mask=cmask, other=0.0)
    carry = tl.zeros([BLOCK_H], dtype=tl.float32)  # G just past the end of the tile
    aprod = tl.full([BLOCK_H], 1.0, tl.float32)
    n_tiles = tl.cdiv(end - start, BLOCK_T)
    if PREFETCH:
        nxt = _bwd_loads(K, KI, C, Hs, dH, Keep, kbase, 0, n_tiles, rows, cmask, zbase, hbase, start, end, stride_zt,
                         stride_ht, LSTM, BLOCK_T, BLOCK_H, HAS_KEEP, HAS_DH)
    for i in range(0, n_tiles):
        # tiles from the end, each read with time reversed so that a forward scan runs backwards
        t = start + (n_tiles - 1 - i) * BLOCK_T + (BLOCK_T - 1 - rows)
        valid = (t < end) & (t >= start)
        m = valid[:, None] & cmask[None, :]
        zoff = zbase + t[:, None] * stride_zt
        if PREFETCH:
            k_next, ki_next, dout, k, ki, c, h_prev, keep, keep_next = nxt
            nxt = _bwd_loads(K, KI, C, Hs, dH, Keep, kbase, i + 1, n_tiles, rows, cmask, zbase, hbase, start, end,
                             stride_zt, stride_ht, LSTM, BLOCK_T, BLOCK_H, HAS_KEEP, HAS_DH)
        else:
            k_next, ki_next, dout, k, ki, c, h_prev, keep, keep_next = _bwd_loads(
                K, KI, C, Hs, dH, Keep, kbase, i, n_tiles, rows, cmask, zbase, hbase, start, end, stride_zt, stride_ht,
                LSTM, BLOCK_T, BLOCK_H, HAS_KEEP, HAS_DH)
        dout = dout + tl.where((t == end - 1)[:, None], dlast[None, :], 0.0)
        # a_{t+1}: the coefficient that carries G_{t+1} back to step t (0 past the chunk's end:
        # what comes from after it is in dlast)
        m_next = ((t + 1) < end)[:, None] & m
        a_next, _, _ = _coeffs(k_next, ki_next, k_next, LSTM)
        if HAS_KEEP:  # a reset at t + 1 cuts the path from h_t forward
            a_next = a_next * keep_next[:, None]
        a_next = tl.where(m_next, a_next, 0.0)
        a_next = tl.where(m, a_next, 1.0)
        A, Gs = tl.associative_scan((a_next, dout), 0, _compose)
        G = A * carry[None, :] + Gs
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, G, 0.0), axis=0)
        # gradients of the step's inputs
        a, _, g = _coeffs(k, ki, c, LSTM)
        if HAS_KEEP:
            a_kept = a * keep[:, None]
        else:
            a_kept = a
        if STORE_DZ:
            h_prev = tl.where(((t - 1) >= 0)[:, None] & m, h_prev, h0[None, :])
            if HAS_KEEP:  # the state the step read: zero after a reset
                h_prev = h_prev * keep[:, None]
            # b = (1 - a) g, so dL/da = G h_prev - G g and dL/dg = G (1 - a)
            d_a = G * (h_prev - g)
            sc = tl.sigmoid(c)
            dc = G * (1.0 - a) * tl.where(c >= 0, 1.0, sc * (1.0 - sc))
            if LSTM:
                # a = sigmoid(u), u = log sigmoid(k) - log sigmoid(ki)
                du = d_a * a * (1.0 - a)
                tl.store(dK + zoff, du * (1.0 - tl.sigmoid(k)), mask=m)
                tl.store(dKI + zoff, -du * (1.0 - tl.sigmoid(ki)), mask=m)
            else:
                # a = 1 - sigmoid(k)
                z = 1.0 - a
                tl.store(dK + zoff, -d_a * z * (1.0 - z), mask=m)
            tl.store(dC + zoff, dc, mask=m)
        if STORE_A:
            aprod = aprod * tl.reduce(tl.where(m, a_kept, 1.0), 0, _mul)
        # dL/dh_{start-1} = a_s keep_s G_s: the row of the chunk's first step (step 0: dL/dh0)
        is0 = (t == start)[:, None] & m
        tl.store(dH0 + sbase + cols[None, :] + 0 * t[:, None], a_kept * G, mask=is0)
    if STORE_A:
        tl.store(Aprod + sbase + cols, aprod, mask=cmask)


@triton.jit
def _chain(Amap, Bmap, X, X0, Xlast, n, BH, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """The chunks of a split scan joined: x_0 = X0, x_{j+1} = Amap_j x_j + Bmap_j over the n chunks
    (in reverse order for the backward), X_j = x_j (what enters chunk j), Xlast the last x."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < BH
    x = tl.load(X0 + offs, mask=m, other=0.0)
    for s in range(0, n):
        if REVERSE:
            j = n - 1 - s
        else:
            j = s
        tl.store(X + j * BH + offs, x, mask=m)
        x = tl.load(Amap + j * BH + offs, mask=m, other=0.0) * x + tl.load(Bmap + j * BH + offs, mask=m, other=0.0)
    tl.store(Xlast + offs, x, mask=m)


# (BLOCK_T, BLOCK_H, num_warps, PREFETCH) the autotuner picks from on a GPU, per hidden size,
# gate count and dtypes. The first is the configuration of the 2026-11-26 GPU session
# (benchmarks/RESULTS.md): a tile's time axis spread over threads, so the scan and the carry
# cross warps through shared memory, and its backward needs 206 registers a thread (ptxas,
# sm_90a: two programs of 4 warps per SM). The others give each thread whole columns of a
# short tile (scan and carry in registers, no barriers; backward 64-197 registers), and with
# PREFETCH load the next tile before scanning this one.
CONFIGS = [(32, 64, 4, False), (4, 128, 4, True), (8, 128, 4, True), (16, 128, 4, False)]
# Triton's interpreter (CPU tests) runs one configuration, not the autotuner (None: the autotuner)
INTERPRETER_CONFIG = (4, 128, 4, True)


# One configuration for every call instead of the autotuned one: set by benchmarks, or by
# DISTRNN_SCAN_CONFIG for runs that must repeat bit for bit on other machines (configurations
# scan a tile in a different order, so their float32 results differ in the last bits; the
# autotuner's choice is cached on disk, so runs on one machine agree).
FIXED_CONFIG: Optional[tuple[int, int, int, bool]] = scan_config_from_env()


def _autotuned(kernel, do_bench=None):
    configs = [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh, "PREFETCH": p}, num_warps=w) for bt, bh, w, p in CONFIGS]
    # The choice is kept in Triton's cache folder: later processes (a resumed run, the next
    # benchmark case) use it without timing again. So the key holds the shape's size class
    # (shape_key): a choice made for short inputs (a one-step streaming call on CUDA, a small
    # evaluation batch, a benchmark's T = 256) is not reused for training at B=64, T=4096.
    return triton.autotune(configs=configs, key=["Hdim", "LSTM", "shape_key"], do_bench=do_bench,
                           cache_results=do_bench is None)(kernel)


def shape_key(B: int, T: int) -> int:
    """The size class of a launch for the autotuner: powers of two of B (to 64) and of T (to
    2048), which the kernel does not read (a few classes, so uneven TBPTT chunks do not each tune)."""
    return min(B, 64).bit_length() * 16 + min(T, 2048).bit_length()


_fwd_tuned, _bwd_tuned = _autotuned(_fwd_kernel), _autotuned(_bwd_kernel)
# added to the size class of a split scan's first passes (each chunk's map alone: other memory
# traffic, so their own tuning); above every shape_key
SUMMARY_KEY = 1024


def _pass_key(B: int, parts: int, chunk: int, first: bool) -> int:
    """The autotuner's size class of one pass: ``parts`` chunks of ``chunk`` steps per row, the
    first pass of a split scan apart."""
    return shape_key(B * parts, chunk) + (SUMMARY_KEY if first else 0)


def _launch(kernel, tuned, B: int, H: int, args: list, lstm: bool, config, has_keep: bool = False, n: int = 1,
            **flags) -> None:
    config = config or FIXED_CONFIG
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = INTERPRETER_CONFIG
    if config is None:
        tuned[lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]), n)](*args, LSTM=lstm, HAS_KEEP=has_keep, **flags)
        return
    bt, bh, w, p = config
    kernel[(B, triton.cdiv(H, bh), n)](*args, LSTM=lstm, BLOCK_T=bt, BLOCK_H=bh, PREFETCH=p, num_warps=w, HAS_KEEP=has_keep,
                                       **flags)


# a split scan's chunks are a multiple of this many steps: whole tiles of every configuration
# (tests set 1: chunks that end inside a tile)
SPLIT_STEP = 32


def _chunks(T: int, split: int) -> tuple[int, int]:
    """``(chunk, n)``: the time axis in about ``split`` chunks of a multiple of ``SPLIT_STEP``
    steps (n = 1: one chunk of T)."""
    if split <= 1 or T <= SPLIT_STEP:
        return max(T, 1), 1
    chunk = triton.cdiv(triton.cdiv(T, split), SPLIT_STEP) * SPLIT_STEP
    return chunk, triton.cdiv(T, chunk)


def auto_split(B: int, H: int, T: int, sms: int) -> int:
    """How many chunks of the time axis give a GPU of ``sms`` multiprocessors work for all of them:
    one program walks the whole sequence for each (row, block of up to 128 units), so at a small
    B x H (B=64, H=128: 64 programs on an H100's 132 SMs) most of the GPU idles while each program
    waits on its loads step after step. Split into chunks of at least 256 steps until there are
    about two programs per SM; 1 where there already are as many programs as SMs. A split scan
    reads the projected input twice, so it is for that case only."""
    programs = B * triton.cdiv(H, 128)
    if programs >= sms or T < 512:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), T // 256))


def _join(amap: Tensor, bmap: Tensor, x0: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """``(X, last)`` of :func:`_chain`: what enters each chunk, and what leaves the last."""
    n, B, H = amap.shape
    X, last = torch.empty_like(amap), torch.empty(B, H, device=amap.device, dtype=torch.float32)
    block = 1024
    _chain[(triton.cdiv(B * H, block),)](amap, bmap, X, x0, last, n, B * H, REVERSE=reverse, BLOCK=block)
    return X, last


def tuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose last, forward and backward (for benchmark reports)."""
    return {name: str(getattr(t, "best_config", None)) for name, t in (("forward", _fwd_tuned), ("backward", _bwd_tuned))}


class MinScan(torch.autograd.Function):
    """``z`` is read in its own dtype (float32, or bf16/fp16 from autocast) and converted in
    registers; the arithmetic is float32. The states come out in ``z``'s dtype, as cuDNN's do
    under autocast (a float32 copy would be cast to bf16 by the next layer or the head anyway,
    and read back in float32 by the backward: at B=64, T=4096, H=1024 about 4.5 GB of traffic
    per step), except the final state, which the kernel writes in float32 from its carry:
    TBPTT carries it to the next chunk. ``dz`` is written in ``z``'s dtype. ``keep_BT`` (bool):
    False where a row's state is zeroed before the step (a reset), read as one byte per step."""

    @staticmethod
    def forward(ctx, z_BTG: Tensor, h0_BH: Tensor, lstm: bool, config=None, keep_BT: Optional[Tensor] = None,
                split: int = 1) -> tuple[Tensor, Tensor]:
        z_BTG, h0, h_BTH, last_BH, keep = _forward(z_BTG, h0_BH, lstm, config, keep_BT, states=True, split=split)
        ctx.save_for_backward(z_BTG, h0, h_BTH, h0 if keep is None else keep)
        ctx.has_keep = keep is not None
        ctx.h0_dtype, ctx.lstm, ctx.config, ctx.split = h0_BH.dtype, lstm, config, split
        # an output nobody read gets None, not zeros: where only the final state is read (the
        # recomputation of a checkpointed segment without a loss) the kernel reads no gradient
        # of the states, and no (B, T, H) of zeros is written for it first
        ctx.set_materialize_grads(False)
        return h_BTH, last_BH

    @staticmethod
    def backward(ctx, dh_BTH: Optional[Tensor], dlast_BH: Optional[Tensor]):
        z_BTG, h0, h_BTH, keep = ctx.saved_tensors
        B, T, G = z_BTG.shape
        lstm = ctx.lstm
        n = 3 if lstm else 2
        H = G // n
        if dh_BTH is None and dlast_BH is None:
            return None, None, None, None, None, None
        # any float dtype: the kernel converts as it loads; without it h stands in for the pointer
        dh = h_BTH if dh_BTH is None else dh_BTH.contiguous()
        dlast_BH = torch.zeros_like(h0) if dlast_BH is None else dlast_BH.float().contiguous()
        dz = torch.empty(B, T, G, device=z_BTG.device, dtype=z_BTG.dtype)
        chunk, parts = _chunks(T, ctx.split)
        flags = {} if dh_BTH is not None else {"HAS_DH": False}

        def run(dlast, dH0, aprod, **more):
            key = _pass_key(B, parts, chunk, first=bool(more))  # (the chunks' first pass writes no dz)
            args = [z_BTG, z_BTG[..., H:], z_BTG[..., (n - 1) * H:], h0, h_BTH, dh, dlast, dz, dz[..., H:],
                    dz[..., (n - 1) * H:], dH0, aprod, keep, T, chunk, H, z_BTG.stride(0), z_BTG.stride(1),
                    h_BTH.stride(0), h_BTH.stride(1), key]
            _launch(_bwd_kernel, _bwd_tuned, B, H, args, lstm, ctx.config, ctx.has_keep, parts, **flags, **more)

        if parts == 1:
            dh0 = torch.zeros(B, H, device=z_BTG.device, dtype=torch.float32)
            run(dlast_BH, dh0, dh0)
        else:
            # each chunk's gradient handed back past its first step from nothing entering it, and
            # the product of its coefficients; joined from the last chunk back; then each chunk
            # with what enters it from after it
            handed, aprod = (torch.empty(parts, B, H, device=z_BTG.device, dtype=torch.float32) for _ in range(2))
            run(torch.zeros_like(handed), handed, aprod, STORE_DZ=False, STORE_A=True)
            entering, dh0 = _join(aprod, handed, dlast_BH, reverse=True)
            run(entering, handed, aprod)
        return dz, dh0.to(ctx.h0_dtype), None, None, None, None


def _forward(z_BTG: Tensor, h0_BH: Tensor, lstm: bool, config, keep_BT: Optional[Tensor], states: bool, split: int = 1):
    B, T, G = z_BTG.shape
    n = 3 if lstm else 2
    H = G // n
    z_BTG = z_BTG.contiguous()
    h0 = h0_BH.float().contiguous()
    # without the states the kernel writes none: a (B, 1, H) stand-in gives it a valid pointer
    h_BTH = torch.empty(B, T if states else 1, H, device=z_BTG.device, dtype=z_BTG.dtype)
    last_BH = torch.empty(B, H, device=z_BTG.device, dtype=torch.float32)
    k, ki, c = z_BTG, z_BTG[..., H:], z_BTG[..., (n - 1) * H:]
    keep = _keep_bytes(keep_BT, z_BTG)
    chunk, parts = _chunks(T, split)

    def run(h_in, h_out, aprod, **flags):
        # without a mask the kernel reads none: h0 stands in for the pointer (a valid one)
        key = _pass_key(B, parts, chunk, first=bool(flags.get("STORE_A")))
        _launch(_fwd_kernel, _fwd_tuned, B, H, [k, ki, c, h_in, h_BTH, h_out, aprod, h0 if keep is None else keep, T, chunk,
                                                H, z_BTG.stride(0), z_BTG.stride(1), h_BTH.stride(0), h_BTH.stride(1), key],
                lstm, config, keep_BT is not None, parts, **flags)

    if parts == 1:
        run(h0, last_BH, h0, **({} if states else {"STORE_H": False}))
    else:
        # each chunk from a zero state, its final state and the product of its coefficients (the
        # chunk's map h -> aprod h + final); joined in order into the state entering each chunk;
        # then, for the states, each chunk again from the state entering it
        ends, aprod = (torch.empty(parts, B, H, device=z_BTG.device, dtype=torch.float32) for _ in range(2))
        run(torch.zeros_like(ends), ends, aprod, STORE_H=False, STORE_A=True)
        # (the final state from the join, with or without the states: min_scan_final's equals
        # min_scan's; h_BTH[:, -1] may differ from it in the last bits)
        entering, last_BH = _join(aprod, ends, h0, reverse=False)
        if states:
            run(entering, ends, aprod)
    return z_BTG, h0, (h_BTH if states else None), last_BH, keep


def _keep_bytes(keep_BT: Optional[Tensor], z_BTG: Tensor) -> Optional[Tensor]:
    """The reset mask as contiguous bytes on z's device."""
    if keep_BT is None:
        return None
    B, T = z_BTG.shape[:2]
    if tuple(keep_BT.shape) != (B, T):
        raise ValueError(f"min_scan: keep_BT has shape {tuple(keep_BT.shape)}, z has (B, T) = ({B}, {T})")
    return keep_BT.to(device=z_BTG.device, dtype=torch.uint8).contiguous()


def min_scan(z_BTG: Tensor, h0_BH: Tensor, lstm: bool, config=None, keep_BT: Optional[Tensor] = None, split: int = 1
             ) -> tuple[Tensor, Tensor]:
    """``(h_BTH, last_BH)``: all states of minGRU (``z = [k, c]``) or minLSTM (``z = [k_f, k_i,
    c]``) in ``z``'s dtype (float32, bf16 or fp16), and the final state in float32. ``config``
    (BLOCK_T, BLOCK_H, num_warps, PREFETCH) bypasses the autotuner. ``keep_BT`` (bool, (B, T)):
    False zeroes a row's state before that step (``h_t = a_t keep_t h_{t-1} + b_t``).
    ``split``: the time axis in that many chunks, each its own programs (:func:`auto_split`)."""
    return MinScan.apply(z_BTG, h0_BH, lstm, config, keep_BT, split)


def min_scan_final(z_BTG: Tensor, h0_BH: Tensor, lstm: bool, config=None, keep_BT: Optional[Tensor] = None,
                   split: int = 1) -> Tensor:
    """The final state alone (float32, equal to :func:`min_scan`'s), the states of the steps not
    written: for a piece whose outputs nobody reads (the first pass of a checkpointed segment
    without a loss, a TBPTT window that only moves the state on), a third of the kernel's
    memory traffic less (it reads ``z`` and writes nothing per step). No autograd."""
    if torch.is_grad_enabled() and (z_BTG.requires_grad or h0_BH.requires_grad):
        raise RuntimeError("min_scan_final has no backward: use min_scan where gradients are needed")
    return _forward(z_BTG, h0_BH, lstm, config, keep_BT, states=False, split=split)[3]
