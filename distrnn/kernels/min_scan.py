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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


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
def _fwd_kernel(K, KI, C, H0, Hout, T, Hdim, stride_zb, stride_zt, stride_hb, stride_ht,
                LSTM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < Hdim
    rows = tl.arange(0, BLOCK_T)
    carry = tl.load(H0 + pid_b * Hdim + cols, mask=cmask, other=0.0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        m = (t < T)[:, None] & cmask[None, :]
        zoff = pid_b * stride_zb + t[:, None] * stride_zt + cols[None, :]
        k = tl.load(K + zoff, mask=m, other=0.0).to(tl.float32)
        ki = tl.load(KI + zoff, mask=m & LSTM, other=0.0).to(tl.float32)
        c = tl.load(C + zoff, mask=m, other=0.0).to(tl.float32)
        a, b, _ = _coeffs(k, ki, c, LSTM)
        a = tl.where(m, a, 1.0)  # steps past T leave the state as it is
        b = tl.where(m, b, 0.0)
        A, B = tl.associative_scan((a, b), 0, _compose)
        h = A * carry[None, :] + B
        tl.store(Hout + pid_b * stride_hb + t[:, None] * stride_ht + cols[None, :], h, mask=m)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)


@triton.jit
def _bwd_kernel(K, KI, C, H0, Hs, dH, dK, dKI, dC, dH0, T, Hdim, stride_zb, stride_zt, stride_hb, stride_ht,
                LSTM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < Hdim
    rows = tl.arange(0, BLOCK_T)
    h0 = tl.load(H0 + pid_b * Hdim + cols, mask=cmask, other=0.0)
    carry = tl.zeros([BLOCK_H], dtype=tl.float32)  # G just past the end of the tile
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        # tiles from the end, each read with time reversed so that a forward scan runs backwards
        t = (n_tiles - 1 - i) * BLOCK_T + (BLOCK_T - 1 - rows)
        valid = (t < T) & (t >= 0)
        m = valid[:, None] & cmask[None, :]
        zoff = pid_b * stride_zb + t[:, None] * stride_zt + cols[None, :]
        hoff = pid_b * stride_hb + t[:, None] * stride_ht + cols[None, :]
        # a_{t+1}: the coefficient that carries G_{t+1} back to step t (0 past the end)
        m_next = ((t + 1) < T)[:, None] & m
        k_next = tl.load(K + zoff + stride_zt, mask=m_next, other=0.0).to(tl.float32)
        ki_next = tl.load(KI + zoff + stride_zt, mask=m_next & LSTM, other=0.0).to(tl.float32)
        a_next, _, _ = _coeffs(k_next, ki_next, k_next, LSTM)
        a_next = tl.where(m_next, a_next, 0.0)
        dout = tl.load(dH + hoff, mask=m, other=0.0).to(tl.float32)
        a_next = tl.where(m, a_next, 1.0)
        A, Gs = tl.associative_scan((a_next, dout), 0, _compose)
        G = A * carry[None, :] + Gs
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, G, 0.0), axis=0)
        # gradients of the step's inputs
        k = tl.load(K + zoff, mask=m, other=0.0).to(tl.float32)
        ki = tl.load(KI + zoff, mask=m & LSTM, other=0.0).to(tl.float32)
        c = tl.load(C + zoff, mask=m, other=0.0).to(tl.float32)
        a, _, g = _coeffs(k, ki, c, LSTM)
        m_prev = ((t - 1) >= 0)[:, None] & m
        h_prev = tl.load(Hs + hoff - stride_ht, mask=m_prev, other=0.0)
        h_prev = tl.where(m_prev, h_prev, h0[None, :])
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
        # dL/dh0 = a_0 G_0: the row of step 0
        is0 = (t == 0)[:, None] & m
        tl.store(dH0 + pid_b * Hdim + cols[None, :] + 0 * t[:, None], a * G, mask=is0)


def _blocks(T: int, H: int) -> tuple[int, int]:
    return 32, min(64, triton.next_power_of_2(H))


class MinScan(torch.autograd.Function):
    """``z`` is read in its own dtype (float32, or bf16/fp16 from autocast) and converted in
    registers; the states and all arithmetic are float32, and ``dz`` is written in ``z``'s dtype.
    (A float32 copy of a bf16 ``z``, and a float32 ``dz`` cast back, would be extra passes over
    the step's largest tensor; by count of bytes, about 3 ms of a 14 ms minGRU step at B=64,
    T=4096, H=1024 on an H100 — an estimate, not yet measured.)"""

    @staticmethod
    def forward(ctx, z_BTG: Tensor, h0_BH: Tensor, lstm: bool) -> Tensor:
        B, T, G = z_BTG.shape
        n = 3 if lstm else 2
        H = G // n
        z_BTG = z_BTG.contiguous()
        h0 = h0_BH.float().contiguous()
        h_BTH = torch.empty(B, T, H, device=z_BTG.device, dtype=torch.float32)
        BT, BH = _blocks(T, H)
        k, ki, c = z_BTG, z_BTG[..., H:], z_BTG[..., (n - 1) * H:]
        _fwd_kernel[(B, triton.cdiv(H, BH))](k, ki, c, h0, h_BTH, T, H, z_BTG.stride(0), z_BTG.stride(1),
                                             h_BTH.stride(0), h_BTH.stride(1), LSTM=lstm, BLOCK_T=BT, BLOCK_H=BH)
        ctx.save_for_backward(z_BTG, h0, h_BTH)
        ctx.h0_dtype, ctx.lstm = h0_BH.dtype, lstm
        return h_BTH

    @staticmethod
    def backward(ctx, dh_BTH: Tensor):
        z_BTG, h0, h_BTH = ctx.saved_tensors
        B, T, G = z_BTG.shape
        lstm = ctx.lstm
        n = 3 if lstm else 2
        H = G // n
        dh_BTH = dh_BTH.contiguous()  # any float dtype: the kernel converts as it loads
        dz = torch.empty(B, T, G, device=z_BTG.device, dtype=z_BTG.dtype)
        dh0 = torch.zeros(B, H, device=z_BTG.device, dtype=torch.float32)
        BT, BH = _blocks(T, H)
        _bwd_kernel[(B, triton.cdiv(H, BH))](
            z_BTG, z_BTG[..., H:], z_BTG[..., (n - 1) * H:], h0, h_BTH, dh_BTH, dz, dz[..., H:], dz[..., (n - 1) * H:], dh0,
            T, H, z_BTG.stride(0), z_BTG.stride(1), h_BTH.stride(0), h_BTH.stride(1), LSTM=lstm, BLOCK_T=BT, BLOCK_H=BH)
        return dz, dh0.to(ctx.h0_dtype), None


def min_scan(z_BTG: Tensor, h0_BH: Tensor, lstm: bool) -> Tensor:
    """All states ``h_BTH`` (float32) of minGRU (``z = [k, c]``) or minLSTM (``z = [k_f, k_i, c]``);
    ``z`` float32, bf16 or fp16."""
    return MinScan.apply(z_BTG, h0_BH, lstm)
