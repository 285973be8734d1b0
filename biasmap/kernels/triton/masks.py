"""Triton SoftIoU (with backward), hard quantile masks and mask IoU.

soft_iou: a, b [B, n] -> iou [B] = I / (S_a + S_b - I + eps), I = sum(a b); one program per
row sums in float64; sums [B, 3] = (I, S_a, S_b) are kept for the backward, which is
elementwise over a 2-D grid: dE/da_i = g (b_i U - I (1 - b_i)) / U^2, U = S_a + S_b - I + eps.

quantile_mask: x [B, n] -> bool [B, n], x >= quantile_q(x) (or >), torch.quantile's 'linear'
rule: rank = q (n - 1) in x's dtype, v_lo and v_hi the order statistics at floor and ceil of
the rank, threshold = lerp(v_lo, v_hi, rank - floor(rank)) as ATen's lerp. The order
statistics come from a radix select over the float's bits mapped to monotone unsigned keys
(4-bit digits: 8 histogram passes for float32, 16 for float64): exact, any n, no sort.

mask_iou: bool a, b [B, n] -> float32 [B], |a & b| / |a | b|, 0 for an empty union.
"""

import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, row_tile, widen

ELEMENTWISE_BLOCK = 1024
# Radix select: digits of DIGIT_BITS bits, so 8 passes for float32 and 16 for float64.
DIGIT_BITS: tl.constexpr = tl.constexpr(4)
RADIX: tl.constexpr = tl.constexpr(16)
ROW_TILE_RADIX = 32768 if INTERPRET else 128


@triton.jit
def _soft_iou_fwd_kernel(
    a_ptr, b_ptr, iou_ptr, sums_ptr, n_rows, n, eps: tl.float64, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    inter = tl.zeros([ROWS, BLOCK], tl.float64)
    sum_a = tl.zeros([ROWS, BLOCK], tl.float64)
    sum_b = tl.zeros([ROWS, BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + at, mask=ok, other=0.0).to(tl.float64)
        inter += a * b
        sum_a += a
        sum_b += b
    i = tl.sum(inter, axis=1)
    sa = tl.sum(sum_a, axis=1)
    sb = tl.sum(sum_b, axis=1)
    union = sa + sb - i + tl.full([], eps, tl.float64)
    tl.store(iou_ptr + rows, i / tl.where(row_ok, union, 1.0), mask=row_ok)
    tl.store(sums_ptr + rows * 3, i, mask=row_ok)
    tl.store(sums_ptr + rows * 3 + 1, sa, mask=row_ok)
    tl.store(sums_ptr + rows * 3 + 2, sb, mask=row_ok)


@triton.jit
def _soft_iou_bwd_kernel(
    g_ptr, a_ptr, b_ptr, sums_ptr, da_ptr, db_ptr, n, eps: tl.float64, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    i = tl.load(sums_ptr + row * 3)
    sum_a = tl.load(sums_ptr + row * 3 + 1)
    sum_b = tl.load(sums_ptr + row * 3 + 2)
    union = sum_a + sum_b - i + tl.full([], eps, tl.float64)
    scale = tl.load(g_ptr + row).to(tl.float64) / (union * union)
    a = tl.load(a_ptr + row * n + offs, mask=ok, other=0.0).to(tl.float64)
    b = tl.load(b_ptr + row * n + offs, mask=ok, other=0.0).to(tl.float64)
    tl.store(da_ptr + row * n + offs, scale * (b * union - i * (1.0 - b)), mask=ok)
    tl.store(db_ptr + row * n + offs, scale * (a * union - i * (1.0 - a)), mask=ok)


@triton.jit
def _quantile_mask_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    n,
    below,
    above,
    weight: tl.float64,
    INCLUSIVE: tl.constexpr,
    FLOAT: tl.constexpr,
    UKEY: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    sign = tl.full([], 1, UKEY) << (BITS - 1)
    ones = tl.full([], (1 << BITS) - 1, UKEY)
    bins = tl.arange(0, RADIX)
    # Radix select, most significant digit first, on unsigned keys ordered as the floats:
    # set the sign bit of positives, flip every bit of negatives (-0.0 lands just below +0.0).
    # Each pass histograms the next 4-bit digit among each row's entries that share the digits
    # chosen so far, and picks the digit holding the wanted rank.
    prefix = tl.zeros([ROWS], UKEY)
    rank = tl.zeros([ROWS], tl.int32) + below
    for step in tl.static_range(BITS // DIGIT_BITS):
        shift = BITS - DIGIT_BITS * (step + 1)  # a constexpr: step is one in static_range
        hist = tl.zeros([ROWS, RADIX], tl.int32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
            bits = x.to(FLOAT).to(UKEY, bitcast=True)
            key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
            digits = ((key >> shift) & (RADIX - 1)).to(tl.int32)
            if step == 0:
                match = ok
            else:
                match = ok & ((key >> (shift + DIGIT_BITS)) == prefix[:, None])
            hits = match[:, :, None] & (digits[:, :, None] == bins[None, None, :])
            hist += tl.sum(hits.to(tl.int32), axis=1)
        digit = tl.sum((tl.cumsum(hist, axis=1) <= rank[:, None]).to(tl.int32), axis=1)
        rank -= tl.sum(tl.where(bins[None, :] < digit[:, None], hist, 0), axis=1)
        prefix = (prefix << DIGIT_BITS) | digit.to(UKEY)
    # The entry at `above` (below or below + 1): the same value when enough entries tie with
    # it, else the smallest entry above it.
    count = tl.zeros([ROWS, BLOCK], tl.int32)
    nxt = tl.zeros([ROWS, BLOCK], UKEY) + ones
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        bits = x.to(FLOAT).to(UKEY, bitcast=True)
        key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
        count += (ok & (key <= prefix[:, None])).to(tl.int32)
        nxt = tl.where(ok & (key > prefix[:, None]), tl.minimum(nxt, key), nxt)
    key_hi = tl.where(tl.sum(count, axis=1) >= above + 1, prefix, tl.min(nxt, axis=1))
    v_lo = tl.where((prefix & sign) != 0, prefix ^ sign, prefix ^ ones).to(FLOAT, bitcast=True)
    v_hi = tl.where((key_hi & sign) != 0, key_hi ^ sign, key_hi ^ ones).to(FLOAT, bitcast=True)
    w = tl.full([], weight, tl.float64).to(FLOAT)
    # ATen's lerp: start + w (end - start) for w < 0.5, end - (end - start)(1 - w) otherwise.
    diff = v_hi - v_lo
    threshold = tl.where(w < 0.5, v_lo + w * diff, v_hi - diff * (1.0 - w))
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0).to(FLOAT)
        if INCLUSIVE:
            keep = x >= threshold[:, None]
        else:
            keep = x > threshold[:, None]
        tl.store(out_ptr + rows[:, None] * n + cols[None, :], keep, mask=ok)


@triton.jit
def _mask_iou_kernel(a_ptr, b_ptr, out_ptr, n_rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    inter = tl.zeros([ROWS, BLOCK], tl.int32)
    union = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        a = tl.load(a_ptr + at, mask=ok, other=0) != 0
        b = tl.load(b_ptr + at, mask=ok, other=0) != 0
        inter += (a & b).to(tl.int32)
        union += (a | b).to(tl.int32)
    i = tl.sum(inter, axis=1).to(tl.float32)
    u = tl.sum(union, axis=1).to(tl.float32)
    # Round-to-nearest division, as torch's; triton's default float32 `/` is approximate.
    iou = tl.math.div_rn(i, tl.maximum(u, 1.0))
    tl.store(out_ptr + rows, tl.where(u > 0, iou, 0.0), mask=row_ok)


def _launch(x: torch.Tensor, max_tile: int | None = None) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters: ROWS rows per program, each swept in chunks of BLOCK."""
    rows, block, warps = row_tile(*x.shape, max_tile)
    return (triton.cdiv(x.shape[0], rows),), {"ROWS": rows, "BLOCK": block, "num_warps": warps}


@triton_op("biasmap_triton::soft_iou_fwd", mutates_args=())
def soft_iou_fwd(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [B, n] -> (iou [B] in a's dtype, sums [B, 3] float64 = (sum ab, sum a, sum b))."""
    dtype, a, b = a.dtype, widen(a), widen(b)
    batch, n = a.shape
    iou = a.new_empty(batch)
    sums = a.new_empty(batch, 3, dtype=torch.float64)
    grid, meta = _launch(a)
    wrap_triton(_soft_iou_fwd_kernel)[grid](a, b, iou, sums, batch, n, float(eps), **meta)
    return iou.to(dtype), sums


@triton_op("biasmap_triton::soft_iou_bwd", mutates_args=())
def soft_iou_bwd(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sums: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B], a, b [B, n], sums from the forward -> (grad_a, grad_b) [B, n]."""
    dtype, grad, a, b, sums = a.dtype, widen(grad), widen(a), widen(b), sums.contiguous()
    batch, n = a.shape
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    block = min(ELEMENTWISE_BLOCK, triton.next_power_of_2(n))
    wrap_triton(_soft_iou_bwd_kernel)[(batch, triton.cdiv(n, block))](
        grad, a, b, sums, grad_a, grad_b, n, float(eps), BLOCK=block
    )
    return grad_a.to(dtype), grad_b.to(dtype)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def quantile_rank(q: float, n: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """(below, above, weight) of torch.quantile's linear rule, rounded as it rounds: q and
    q * (n - 1) in x's dtype (float32 for the half types, which the kernel widens)."""
    if dtype == torch.float64:
        rank = q * (n - 1)
    else:
        # Both factors are float32 values and the exact product fits a double, so one
        # rounding to float32 gives float32's product.
        rank = _float32(_float32(q) * (n - 1))
    below = int(rank)
    above = min(math.ceil(rank), n - 1)
    return below, above, rank - below


@triton_op("biasmap_triton::quantile_mask", mutates_args=())
def quantile_mask(x: torch.Tensor, q: float, inclusive: bool) -> torch.Tensor:
    """x [B, n] -> bool [B, n]: x >= quantile_q(x) per row (x > it when not inclusive)."""
    x = x.contiguous()
    batch, n = x.shape
    out = torch.empty_like(x, dtype=torch.bool)
    below, above, weight = quantile_rank(float(q), n, x.dtype)
    wide = x.dtype == torch.float64
    # The radix histogram is a [ROWS, BLOCK, 16] tile: a 16x smaller tile keeps it in registers.
    grid, meta = _launch(x, max_tile=ROW_TILE_RADIX)
    wrap_triton(_quantile_mask_kernel)[grid](
        x,
        out,
        batch,
        n,
        below,
        above,
        weight,
        INCLUSIVE=inclusive,
        FLOAT=tl.float64 if wide else tl.float32,
        UKEY=tl.uint64 if wide else tl.uint32,
        BITS=64 if wide else 32,
        **meta,
    )
    return out


@triton_op("biasmap_triton::mask_iou", mutates_args=())
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool a, b [B, n] -> float32 [B]; 0 where the union is empty."""
    a, b = a.contiguous(), b.contiguous()
    batch, n = a.shape
    out = torch.empty(batch, dtype=torch.float32, device=a.device)
    grid, meta = _launch(a)
    wrap_triton(_mask_iou_kernel)[grid](a, b, out, batch, n, **meta)
    return out


def _iou_setup(ctx, inputs, output):
    a, b, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(a, b, output[1])
    ctx.eps = eps


def _iou_backward(ctx, grad_iou, _grad_sums):
    a, b, sums = ctx.saved_tensors
    # Upstream gradients can be stride-0 expanded views (x.sum().backward()).
    grad_a, grad_b = soft_iou_bwd(grad_iou.contiguous(), a, b, sums, ctx.eps)
    return grad_a, grad_b, None


torch.library.register_autograd(
    "biasmap_triton::soft_iou_fwd", _iou_backward, setup_context=_iou_setup
)
