"""Triton resize-aggregate: sum (or stack) of bilinear resizes, align_corners=False, as
F.interpolate.

maps: M tensors [B, T, h_i, w_i] -> [B, T, S_h, S_w], or [B, M, T, S_h, S_w] with per_map.

Forward: one program per block of output pixels (of the flattened [B*T, S_h, S_w]) gathers the
four neighbours from every source map in one pass and writes each pixel once; the maps arrive
as separate pointer arguments (up to MAPS_PER_LAUNCH per launch, more maps take several
launches), so nothing is concatenated.

Backward: the adjoint, as a gather (deterministic, no atomics). For a tile of source pixels,
the output rows and columns that read them form a window; the gradient is A_tile^T G_window
B_tile, with A and B the per-axis interpolation weights rebuilt on the fly from the same
formula as the forward and contracted with tl.dot. A program takes one tile of one map for
PLANES of the B*T planes, the weights built once for all of them.

Source coordinates follow ATen's upsample_bilinear2d exactly: ratio = in/out in the compute
dtype, src = max(ratio * (o + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1),
l1 = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in - 1), l0 = 1 - l1; value =
l_y0 (l_x0 v00 + l_x1 v01) + l_y1 (l_x0 v10 + l_x1 v11).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, acc_dtype, device_fn, tl_acc

MAPS_PER_LAUNCH = 8

# Forward: output pixels per program. The interpreter runs programs one after another in Python,
# so it takes everything at once.
FWD_BLOCK = 65536 if INTERPRET else 1024
# Backward: source tile and the window chunk contracted per tl.dot (all >= 16 for tl.dot).
BWD_BLOCK_I = BWD_BLOCK_J = 64 if INTERPRET else 16
BWD_BLOCK_O = 128 if INTERPRET else 32
# B*T planes per backward program: one on a GPU (planes fill the grid); all of them in the
# interpreter, where every op costs the same whatever its size.
BWD_PLANES = 1 << 20 if INTERPRET else 1


@device_fn
def _axis(o, in_size, out_size, ACC: tl.constexpr):
    """Source indices i0, i1 and weights l0, l1 of output positions o along one axis."""
    ratio = (tl.cast(in_size, tl.float64) / tl.cast(out_size, tl.float64)).to(ACC)
    src = tl.maximum(ratio * (o.to(ACC) + 0.5) - 0.5, 0.0)
    # ATen floors with floorf even for double, so a double index a hair below an integer
    # rounds up first; src >= 0, so truncation is floor.
    i0 = tl.minimum(src.to(tl.float32).to(tl.int32), in_size - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    return i0, i1, 1.0 - l1, l1


@device_fn
def _resize_gather(src_ptr, h, w, plane, oy, ox, ok, out_h, out_w, ACC: tl.constexpr):
    """Bilinear values of output pixels (oy, ox) of B*T plane `plane` from one source map."""
    y0, y1, ly0, ly1 = _axis(oy, h, out_h, ACC)
    x0, x1, lx0, lx1 = _axis(ox, w, out_w, ACC)
    base = src_ptr + plane * h * w
    v00 = tl.load(base + y0 * w + x0, mask=ok, other=0.0).to(ACC)
    v01 = tl.load(base + y0 * w + x1, mask=ok, other=0.0).to(ACC)
    v10 = tl.load(base + y1 * w + x0, mask=ok, other=0.0).to(ACC)
    v11 = tl.load(base + y1 * w + x1, mask=ok, other=0.0).to(ACC)
    return (v00 * lx0 + v01 * lx1) * ly0 + (v10 * lx0 + v11 * lx1) * ly1


@device_fn
def _resize_slot(
    acc, out_ptr, slot, src_ptr, h, w, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT, m_first,
    PER_MAP: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    val = _resize_gather(src_ptr, h, w, plane, oy, ox, ok, out_h, out_w, ACC)
    if PER_MAP:
        dst = (((plane // T) * M_OUT + m_first + slot) * T + plane % T) * out_h * out_w
        tl.store(out_ptr + dst + pix, val, mask=ok)
    else:
        acc += val
    return acc


@triton.jit
def _resize_fwd_kernel(
    out_ptr,
    s0, s1, s2, s3, s4, s5, s6, s7,
    h0, h1, h2, h3, h4, h5, h6, h7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    total, T, out_h, out_w, M_OUT, m_first,
    NUM: tl.constexpr,
    PER_MAP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One element per output pixel of the flattened [B*T, out_h, out_w]: stores are coalesced
    # and the gathers of neighbouring pixels share cache lines.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    pix = idx % (out_h * out_w)
    plane = idx // (out_h * out_w)
    oy = (pix // out_w).to(tl.int32)
    ox = (pix % out_w).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=ACC)
    if ACCUMULATE:
        acc += tl.load(out_ptr + idx, mask=ok, other=0.0).to(ACC)
    # No tuple splats: spelled out for the compiler. Slots past NUM compile away.
    acc = _resize_slot(
        acc, out_ptr, 0, s0, h0, w0, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT, m_first,
        PER_MAP, ACC,
    )  # fmt: skip
    if NUM > 1:
        acc = _resize_slot(
            acc, out_ptr, 1, s1, h1, w1, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 2:
        acc = _resize_slot(
            acc, out_ptr, 2, s2, h2, w2, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 3:
        acc = _resize_slot(
            acc, out_ptr, 3, s3, h3, w3, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 4:
        acc = _resize_slot(
            acc, out_ptr, 4, s4, h4, w4, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 5:
        acc = _resize_slot(
            acc, out_ptr, 5, s5, h5, w5, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 6:
        acc = _resize_slot(
            acc, out_ptr, 6, s6, h6, w6, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if NUM > 7:
        acc = _resize_slot(
            acc, out_ptr, 7, s7, h7, w7, plane, oy, ox, ok, pix, out_h, out_w, T, M_OUT,
            m_first, PER_MAP, ACC,
        )  # fmt: skip
    if not PER_MAP:
        tl.store(out_ptr + idx, acc, mask=ok)


@device_fn
def _window(start, end, in_size, out_size):
    """Output positions [lo, hi) that read source positions [start, end): o reads i0(o) and
    i0(o) + 1, with i0 about (o + 0.5) in/out - 0.5. One position of slack either side absorbs
    rounding; the weights inside are exact, so extra positions only add zeros."""
    r = tl.cast(out_size, tl.float64) / tl.cast(in_size, tl.float64)
    lo = tl.floor((tl.cast(start, tl.float64) - 0.5) * r - 0.5).to(tl.int32) - 1
    hi = tl.ceil((tl.cast(end, tl.float64) + 0.5) * r - 0.5).to(tl.int32) + 2
    return tl.maximum(lo, 0), tl.minimum(hi, out_size)


@device_fn
def _resize_bwd_tile(
    g_ptr, dst_ptr, h, w, slot, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
    PER_MAP: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
):  # fmt: skip
    # (a + b - 1) // b rather than tl.cdiv, a jit function that the interpreter re-patches for.
    tiles_j = (w + BLOCK_J - 1) // BLOCK_J
    if tile < (h + BLOCK_I - 1) // BLOCK_I * tiles_j:
        i_start = (tile // tiles_j) * BLOCK_I
        j_start = (tile % tiles_j) * BLOCK_J
        offs_i = i_start + tl.arange(0, BLOCK_I)
        offs_j = j_start + tl.arange(0, BLOCK_J)
        ok = (offs_i < h)[:, None] & (offs_j < w)[None, :]
        o_lo, o_hi = _window(i_start, tl.minimum(i_start + BLOCK_I, h), h, out_h)
        p_lo, p_hi = _window(j_start, tl.minimum(j_start + BLOCK_J, w), w, out_w)
        # The weights depend on the tile only, so the planes loop innermost. A window wider
        # than one chunk (large upsampling) adds its chunks' parts up in the output.
        for o0 in range(o_lo, o_hi, BLOCK_O):
            orow = o0 + tl.arange(0, BLOCK_O)
            o_ok = orow < o_hi
            y0, y1, ly0, ly1 = _axis(orow, h, out_h, ACC)
            # a_y[i, o]: weight of source row i in output row o (both taps land on the last
            # row at the border, and add up there as in ATen's backward).
            a_y = tl.where(o_ok[None, :] & (y0[None, :] == offs_i[:, None]), ly0[None, :], 0.0)
            a_y += tl.where(o_ok[None, :] & (y1[None, :] == offs_i[:, None]), ly1[None, :], 0.0)
            a_y = a_y.to(ACC)
            for p0 in range(p_lo, p_hi, BLOCK_O):
                pcol = p0 + tl.arange(0, BLOCK_O)
                p_ok = pcol < p_hi
                x0, x1, lx0, lx1 = _axis(pcol, w, out_w, ACC)
                b_x = tl.where(p_ok[:, None] & (x0[:, None] == offs_j[None, :]), lx0[:, None], 0.0)
                b_x += tl.where(p_ok[:, None] & (x1[:, None] == offs_j[None, :]), lx1[:, None], 0.0)
                b_x = b_x.to(ACC)
                later = (o0 > o_lo) | (p0 > p_lo)
                for plane in range(plane_start, plane_end):
                    if PER_MAP:
                        g_plane = ((plane // T) * M_OUT + m_first + slot) * T + plane % T
                    else:
                        g_plane = plane
                    g = tl.load(
                        g_ptr + g_plane * out_h * out_w + orow[:, None] * out_w + pcol[None, :],
                        mask=o_ok[:, None] & p_ok[None, :],
                        other=0.0,
                    ).to(ACC)
                    part = tl.dot(
                        a_y, tl.dot(g, b_x, input_precision="ieee"), input_precision="ieee"
                    )
                    dst = dst_ptr + plane * h * w + offs_i[:, None] * w + offs_j[None, :]
                    # An earlier chunk's store may come from other threads of this program.
                    tl.debug_barrier()
                    part += tl.load(dst, mask=ok & later, other=0.0)
                    tl.store(dst, part, mask=ok)


@triton.jit
def _resize_bwd_kernel(
    g_ptr,
    d0, d1, d2, d3, d4, d5, d6, d7,
    h0, h1, h2, h3, h4, h5, h6, h7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    n_planes, T, out_h, out_w, M_OUT, m_first,
    NUM: tl.constexpr,
    PER_MAP: tl.constexpr,
    ACC: tl.constexpr,
    PLANES: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_O: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    slot = tl.program_id(1)
    plane_start = tl.program_id(2).to(tl.int64) * PLANES
    plane_end = tl.minimum(plane_start + PLANES, n_planes)
    if slot == 0:
        _resize_bwd_tile(
            g_ptr, d0, h0, w0, 0, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
            PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
        )  # fmt: skip
    if NUM > 1:
        if slot == 1:
            _resize_bwd_tile(
                g_ptr, d1, h1, w1, 1, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 2:
        if slot == 2:
            _resize_bwd_tile(
                g_ptr, d2, h2, w2, 2, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 3:
        if slot == 3:
            _resize_bwd_tile(
                g_ptr, d3, h3, w3, 3, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 4:
        if slot == 4:
            _resize_bwd_tile(
                g_ptr, d4, h4, w4, 4, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 5:
        if slot == 5:
            _resize_bwd_tile(
                g_ptr, d5, h5, w5, 5, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 6:
        if slot == 6:
            _resize_bwd_tile(
                g_ptr, d6, h6, w6, 6, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip
    if NUM > 7:
        if slot == 7:
            _resize_bwd_tile(
                g_ptr, d7, h7, w7, 7, tile, plane_start, plane_end, out_h, out_w, T, M_OUT, m_first,
                PER_MAP, ACC, BLOCK_I, BLOCK_J, BLOCK_O,
            )  # fmt: skip


def _slots(tensors: list[torch.Tensor]) -> tuple[list, list[int], list[int]]:
    """Pointer, height and width arguments for one launch, padded to MAPS_PER_LAUNCH (the
    padding is never read: NUM is a constexpr that compiles those slots away)."""
    pad = MAPS_PER_LAUNCH - len(tensors)
    ptrs = list(tensors) + [tensors[0]] * pad
    heights = [t.shape[2] for t in tensors] + [1] * pad
    widths = [t.shape[3] for t in tensors] + [1] * pad
    return ptrs, heights, widths


@triton_op("biasmap_triton::resize_aggregate_fwd", mutates_args=())
def resize_aggregate_fwd(
    maps: list[torch.Tensor], out_h: int, out_w: int, per_map: bool
) -> torch.Tensor:
    """maps: M tensors [B, T, h_i, w_i] -> [B, T, out_h, out_w] (their sum), or
    [B, M, T, out_h, out_w] with per_map."""
    maps = [m.contiguous() for m in maps]
    first = maps[0]
    batch, channels = first.shape[:2]
    n_maps = len(maps)
    chunked_sum = not per_map and n_maps > MAPS_PER_LAUNCH
    if per_map:
        out = first.new_empty(batch, n_maps, channels, out_h, out_w)
    else:
        # Several launches accumulate in the wide dtype and round once at the end.
        dtype = acc_dtype(first.dtype) if chunked_sum else first.dtype
        out = first.new_empty(batch, channels, out_h, out_w, dtype=dtype)
    total = batch * channels * out_h * out_w
    block = min(FWD_BLOCK, triton.next_power_of_2(total))
    for start in range(0, n_maps, MAPS_PER_LAUNCH):
        chunk = maps[start : start + MAPS_PER_LAUNCH]
        ptrs, heights, widths = _slots(chunk)
        wrap_triton(_resize_fwd_kernel)[(triton.cdiv(total, block),)](
            out,
            *ptrs,
            *heights,
            *widths,
            total,
            channels,
            out_h,
            out_w,
            n_maps,
            start,
            NUM=len(chunk),
            PER_MAP=per_map,
            ACCUMULATE=start > 0,
            ACC=tl_acc(first.dtype),
            BLOCK=block,
        )
    return out.to(first.dtype) if chunked_sum else out


@triton_op("biasmap_triton::resize_aggregate_bwd", mutates_args=())
def resize_aggregate_bwd(
    grad: torch.Tensor, maps: list[torch.Tensor], out_h: int, out_w: int, per_map: bool
) -> list[torch.Tensor]:
    """grad [B, T, out_h, out_w] (or [B, M, T, out_h, out_w]) -> one gradient per map, shaped
    like it. Only the maps' shapes and dtype are read."""
    grad = grad.contiguous()
    first = maps[0]
    batch, channels = first.shape[:2]
    n_planes = batch * channels
    # Windows wider than one chunk add up in the gradient buffer: half types get a float32 one.
    acc = acc_dtype(first.dtype)
    grads = [m.new_empty(m.shape, dtype=acc) for m in maps]
    planes = min(BWD_PLANES, n_planes)
    for start in range(0, len(maps), MAPS_PER_LAUNCH):
        chunk = grads[start : start + MAPS_PER_LAUNCH]
        ptrs, heights, widths = _slots(chunk)
        tiles = max(
            triton.cdiv(t.shape[2], BWD_BLOCK_I) * triton.cdiv(t.shape[3], BWD_BLOCK_J)
            for t in chunk
        )
        wrap_triton(_resize_bwd_kernel)[(tiles, len(chunk), triton.cdiv(n_planes, planes))](
            grad,
            *ptrs,
            *heights,
            *widths,
            n_planes,
            channels,
            out_h,
            out_w,
            len(maps),
            start,
            NUM=len(chunk),
            PER_MAP=per_map,
            ACC=tl_acc(first.dtype),
            PLANES=planes,
            BLOCK_I=BWD_BLOCK_I,
            BLOCK_J=BWD_BLOCK_J,
            BLOCK_O=BWD_BLOCK_O,
        )
    return [g.to(m.dtype) for g, m in zip(grads, maps, strict=True)]


def _setup(ctx, inputs, output):
    maps, out_h, out_w, per_map = inputs
    # The backward reads only the maps' shapes and dtype from them.
    ctx.save_for_backward(*maps)
    ctx.out_h, ctx.out_w, ctx.per_map = out_h, out_w, per_map


def _backward(ctx, grad):
    # Upstream gradients can be stride-0 expanded views (x.sum().backward()).
    grads = resize_aggregate_bwd(
        grad.contiguous(), list(ctx.saved_tensors), ctx.out_h, ctx.out_w, ctx.per_map
    )
    return list(grads), None, None, None


torch.library.register_autograd(
    "biasmap_triton::resize_aggregate_fwd", _backward, setup_context=_setup
)
