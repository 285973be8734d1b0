"""Triton soft top-k (two-anchor entropic OT), exact and Sinkhorn solvers, with backward passes.

x [B, n] -> mask [B, n]; each program takes ROWS maps (rows) and sweeps them in chunks of
BLOCK entries, [ROWS, BLOCK] at a time (many small maps share a program, a large map gets
one to itself). All arithmetic is in float64 whatever the input dtype: theta, and Sinkhorn's
potentials at tau = 1e-3, need it, and the maps are small next to the UNet (half-type maps are
widened to float32 on the host first, see _common.widen). y is x min-max
normalised per row (or x itself): y = (x - min) / range, 0 for rows with range <= MINMAX_EPS.

Exact: mask = sigmoid((2y - theta)/tau) with sum k. theta solves F(theta) = sum_i
sigmoid((2 y_i - theta)/tau) - k = 0 (F decreasing) by safeguarded Newton: Newton steps while
they stay inside a bracket [lo, hi] that every evaluation shrinks, bisection otherwise.
Stats [B, 4] = (min, range, max, theta). Backward with w = m (1 - m):
dL/dy = (2/tau) w (g - sum(w g)/sum(w)).

Sinkhorn: the scalar recursion of reference.soft_topk_sinkhorn on d = g_1 - g_0:
d_1 = logit(k/n) + lse0 - lse1 with lse0 = LSE(-y^2/tau), lse1 = LSE(-(y-1)^2/tau);
d_{t+1} = d_t + logit(k/n) - (A_t - B_t), A_t = LSE(logsigmoid(a + d_t)),
B_t = LSE(logsigmoid(-(a + d_t))), a = (2y - 1)/tau; mask = sigmoid(a + d_iters).
Stats [B, 5 + 3 iters] = (min, range, max, lse0, lse1, then (d_t, A_t, B_t) for t = 1..iters,
A and B of the last step unused); 'none' stores min 0 and range 1 (y = x). The backward runs
reverse mode through that recursion:
with s = sigmoid(z), p = exp(logsigmoid(z) - A), q = exp(logsigmoid(-z) - B) and
u = (1 - s) p + s q = d(A - B)/dz, a step gives dd_{t+1}/dd_t = 1 - sum(u), dd_{t+1}/da = -u.

Both backwards finish through the min-max normalisation; the gradients of min and max are
split evenly over ties, as torch.amin/amax's backward does.
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...ops.reference import EXACT_MAX_ITERS, MINMAX_EPS
from ._common import device_fn, row_tile, widen

# The exact solver stops when |sum(mask) - k| <= EXACT_TOL * k (float64 sums of n <= 1e6 terms
# are good to ~1e-10 absolute), or when the bracket is down to float64 resolution as the
# reference's bisection; one more Newton step is then taken when it stays in the bracket.
EXACT_TOL: tl.constexpr = tl.constexpr(1e-11)
# Stats row lengths: exact (lo, span, hi, theta); Sinkhorn (lo, span, hi, lse0, lse1) then
# (d_t, A_t, B_t) per iteration.
EXACT_STATS: tl.constexpr = tl.constexpr(4)
SINKHORN_HEAD: tl.constexpr = tl.constexpr(5)


@device_fn
def _normalisation(x_ptr, rows, row_ok, n, flat_eps, MINMAX: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """Per row (lo, span, hi, y_min, y_max), each [ROWS]. The kernels normalise with
    y = where(span <= flat_eps, 0, (x - lo) / span); 'none' is lo = 0, span = 1."""
    offs = tl.arange(0, BLOCK)
    lo = tl.full([ROWS, BLOCK], float("inf"), tl.float64)
    hi = tl.full([ROWS, BLOCK], float("-inf"), tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0).to(tl.float64)
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    # Padding rows (past the batch) get 0, so that nothing downstream computes inf - inf.
    lo = tl.where(row_ok, tl.min(lo, axis=1), 0.0)
    hi = tl.where(row_ok, tl.max(hi, axis=1), 0.0)
    # One return for both branches: the compiler types every return statement.
    if MINMAX:
        span = hi - lo
        y_min = tl.zeros([ROWS], tl.float64)
        y_max = tl.where(span <= flat_eps, y_min, y_min + 1.0)
    else:
        y_min = lo
        y_max = hi
        lo = tl.zeros([ROWS], tl.float64)
        span = lo + 1.0
    return lo, span, hi, y_min, y_max


@triton.jit
def _topk_exact_fwd_kernel(
    x_ptr,
    mask_ptr,
    stats_ptr,
    n_rows,
    n,
    k,
    tau: tl.float64,
    logit_kn: tl.float64,
    flat_eps: tl.float64,
    MAX_ITERS: tl.constexpr,
    MINMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    tau = tl.full([], tau, tl.float64)
    kf = tl.cast(k, tl.float64)
    flat_eps = tl.full([], flat_eps, tl.float64)
    lo, span, hi, y_min, y_max = _normalisation(
        x_ptr, rows, row_ok, n, flat_eps, MINMAX, ROWS, BLOCK
    )
    flat = span <= flat_eps
    safe = tl.where(flat, 1.0, span)
    # F(theta) = sum(mask) - k is decreasing; at 2 y_min - tau logit(k/n) every entry is
    # >= k/n and at 2 y_max - tau logit(k/n) every entry is <= k/n: a bracket.
    shift = tau * tl.full([], logit_kn, tl.float64)
    t_lo = 2.0 * y_min - shift
    t_hi = 2.0 * y_max - shift
    theta = 0.5 * (t_lo + t_hi)
    going = row_ok  # rows still iterating
    it = tl.full([], 0, tl.int32)
    while tl.max(going.to(tl.int32), axis=0) != 0:
        total = tl.zeros([ROWS, BLOCK], tl.float64)
        slope = tl.zeros([ROWS, BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
            y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
            z = (2.0 * y - theta[:, None]) / tau
            e = tl.exp(-tl.abs(z))
            inv = 1.0 / (1.0 + e)
            total += tl.where(ok, tl.where(z >= 0, inv, e * inv), 0.0)
            slope += tl.where(ok, e * inv * inv, 0.0)
        resid = tl.sum(total, axis=1) - kf
        sum_w = tl.sum(slope, axis=1)
        above = resid > 0  # mask too large: theta too small
        new_lo = tl.where(above, theta, t_lo)
        new_hi = tl.where(above, t_hi, theta)
        step = theta + tau * resid / tl.maximum(sum_w, 1e-300)
        newton = (sum_w > 0) & (step > new_lo) & (step < new_hi)
        nxt = tl.where(newton, step, 0.5 * (new_lo + new_hi))
        width_done = new_hi - new_lo <= 1e-15 * (1.0 + tl.abs(new_hi))
        done = (tl.abs(resid) <= kf * EXACT_TOL) | width_done
        # Converged rows take the last Newton step when it is safe, and then stay put.
        theta = tl.where(going & ~(done & ~newton), nxt, theta)
        t_lo = tl.where(going, new_lo, t_lo)
        t_hi = tl.where(going, new_hi, t_hi)
        it += 1
        going = going & ~done & (it < MAX_ITERS)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
        z = (2.0 * y - theta[:, None]) / tau
        e = tl.exp(-tl.abs(z))
        inv = 1.0 / (1.0 + e)
        tl.store(
            mask_ptr + rows[:, None] * n + cols[None, :], tl.where(z >= 0, inv, e * inv), mask=ok
        )
    stats = stats_ptr + rows * EXACT_STATS
    tl.store(stats, lo, mask=row_ok)
    tl.store(stats + 1, span, mask=row_ok)
    tl.store(stats + 2, hi, mask=row_ok)
    tl.store(stats + 3, theta, mask=row_ok)


@triton.jit
def _topk_exact_bwd_kernel(
    g_ptr,
    x_ptr,
    stats_ptr,
    dx_ptr,
    n_rows,
    n,
    tau: tl.float64,
    flat_eps: tl.float64,
    MINMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    tau = tl.full([], tau, tl.float64)
    stats = stats_ptr + rows * EXACT_STATS
    lo = tl.load(stats, mask=row_ok, other=0.0)
    span = tl.load(stats + 1, mask=row_ok, other=1.0)
    hi = tl.load(stats + 2, mask=row_ok, other=0.0)
    theta = tl.load(stats + 3, mask=row_ok, other=0.0)
    flat = span <= tl.full([], flat_eps, tl.float64)
    safe = tl.where(flat, 1.0, span)
    sum_w = tl.zeros([ROWS, BLOCK], tl.float64)
    sum_wg = tl.zeros([ROWS, BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float64)
        y = tl.where(flat[:, None], 0.0, (x - lo[:, None]) / safe[:, None])
        e = tl.exp(-tl.abs((2.0 * y - theta[:, None]) / tau))
        w = tl.where(ok, e / ((1.0 + e) * (1.0 + e)), 0.0)
        sum_w += w
        sum_wg += w * g
    # As the reference's clamp: all w = 0 (a saturated mask) gives a zero gradient, not 0/0.
    mean_g = tl.sum(sum_wg, axis=1) / tl.maximum(tl.sum(sum_w, axis=1), 1e-30)
    two_tau = 2.0 / tau
    g_lo = tl.zeros([ROWS], tl.float64)
    g_hi = tl.zeros([ROWS], tl.float64)
    if MINMAX:
        # dL/dmin = sum_j gy_j (y_j - 1)/range and dL/dmax = -sum_j gy_j y_j/range, each
        # split evenly over the tied minima / maxima.
        acc_lo = tl.zeros([ROWS, BLOCK], tl.float64)
        acc_hi = tl.zeros([ROWS, BLOCK], tl.float64)
        cnt_lo = tl.zeros([ROWS, BLOCK], tl.float64)
        cnt_hi = tl.zeros([ROWS, BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            at = rows[:, None] * n + cols[None, :]
            x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
            g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float64)
            y = tl.where(flat[:, None], 0.0, (x - lo[:, None]) / safe[:, None])
            e = tl.exp(-tl.abs((2.0 * y - theta[:, None]) / tau))
            gy = two_tau * (e / ((1.0 + e) * (1.0 + e))) * (g - mean_g[:, None])
            gy = tl.where(ok, gy, 0.0)
            acc_lo += gy * (y - 1.0)
            acc_hi += gy * y
            cnt_lo += tl.where(ok & (x == lo[:, None]), 1.0, 0.0)
            cnt_hi += tl.where(ok & (x == hi[:, None]), 1.0, 0.0)
        g_lo = tl.sum(acc_lo, axis=1) / (safe * tl.maximum(tl.sum(cnt_lo, axis=1), 1.0))
        g_hi = -tl.sum(acc_hi, axis=1) / (safe * tl.maximum(tl.sum(cnt_hi, axis=1), 1.0))
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float64)
        y = tl.where(flat[:, None], 0.0, (x - lo[:, None]) / safe[:, None])
        e = tl.exp(-tl.abs((2.0 * y - theta[:, None]) / tau))
        dx = two_tau * (e / ((1.0 + e) * (1.0 + e))) * (g - mean_g[:, None])
        if MINMAX:
            dx = dx / safe[:, None]
            dx += tl.where(x == lo[:, None], g_lo[:, None], 0.0)
            dx += tl.where(x == hi[:, None], g_hi[:, None], 0.0)
            dx = tl.where(flat[:, None], 0.0, dx)
        tl.store(dx_ptr + at, dx, mask=ok)


@triton.jit
def _topk_sinkhorn_fwd_kernel(
    x_ptr,
    mask_ptr,
    stats_ptr,
    n_rows,
    n,
    iters,
    tau: tl.float64,
    logit_kn: tl.float64,
    flat_eps: tl.float64,
    MINMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    tau = tl.full([], tau, tl.float64)
    logit_kn = tl.full([], logit_kn, tl.float64)
    stats = stats_ptr + rows * (3 * iters + SINKHORN_HEAD)
    flat_eps = tl.full([], flat_eps, tl.float64)
    lo, span, hi, y_min, y_max = _normalisation(
        x_ptr, rows, row_ok, n, flat_eps, MINMAX, ROWS, BLOCK
    )
    flat = span <= flat_eps
    safe = tl.where(flat, 1.0, span)
    # First iteration from f = 0: two log-sum-exps per row, kept per lane (running max and
    # sum) and merged at the end, so no scalar rescaling happens inside the loop.
    m0 = tl.full([ROWS, BLOCK], float("-inf"), tl.float64)
    s0 = tl.zeros([ROWS, BLOCK], tl.float64)
    m1 = tl.full([ROWS, BLOCK], float("-inf"), tl.float64)
    s1 = tl.zeros([ROWS, BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
        v0 = tl.where(ok, -(y * y) / tau, float("-inf"))
        v1 = tl.where(ok, -((y - 1.0) * (y - 1.0)) / tau, float("-inf"))
        n0 = tl.maximum(m0, v0)
        n1 = tl.maximum(m1, v1)
        # Lanes that have seen nothing keep -inf; shift them by 0 to avoid -inf - -inf.
        c0 = tl.where(n0 == float("-inf"), 0.0, n0)
        c1 = tl.where(n1 == float("-inf"), 0.0, n1)
        s0 = s0 * tl.exp(m0 - c0) + tl.exp(v0 - c0)
        s1 = s1 * tl.exp(m1 - c1) + tl.exp(v1 - c1)
        m0 = n0
        m1 = n1
    # Padding rows have no entries: shift them by 0 and give them 0 (they are never stored).
    top0 = tl.where(row_ok, tl.max(m0, axis=1), 0.0)
    top1 = tl.where(row_ok, tl.max(m1, axis=1), 0.0)
    lse0 = top0 + tl.log(tl.where(row_ok, tl.sum(s0 * tl.exp(m0 - top0[:, None]), axis=1), 1.0))
    lse1 = top1 + tl.log(tl.where(row_ok, tl.sum(s1 * tl.exp(m1 - top1[:, None]), axis=1), 1.0))
    d = logit_kn + (lse0 - lse1)
    tl.store(stats, lo, mask=row_ok)
    tl.store(stats + 1, span, mask=row_ok)
    tl.store(stats + 2, hi, mask=row_ok)
    tl.store(stats + 3, lse0, mask=row_ok)
    tl.store(stats + 4, lse1, mask=row_ok)
    for t in range(1, iters):
        # logit of the mean mask = LSE(logsigmoid(z)) - LSE(logsigmoid(-z)), z = a + d.
        ma = tl.full([ROWS, BLOCK], float("-inf"), tl.float64)
        sa = tl.zeros([ROWS, BLOCK], tl.float64)
        mb = tl.full([ROWS, BLOCK], float("-inf"), tl.float64)
        sb = tl.zeros([ROWS, BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
            y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
            z = (2.0 * y - 1.0) / tau + d[:, None]
            soft = tl.log(1.0 + tl.exp(-tl.abs(z)))
            ls = tl.where(ok, tl.minimum(z, 0.0) - soft, float("-inf"))
            lsn = tl.where(ok, tl.minimum(-z, 0.0) - soft, float("-inf"))
            na = tl.maximum(ma, ls)
            nb = tl.maximum(mb, lsn)
            ca = tl.where(na == float("-inf"), 0.0, na)
            cb = tl.where(nb == float("-inf"), 0.0, nb)
            sa = sa * tl.exp(ma - ca) + tl.exp(ls - ca)
            sb = sb * tl.exp(mb - cb) + tl.exp(lsn - cb)
            ma = na
            mb = nb
        top_a = tl.where(row_ok, tl.max(ma, axis=1), 0.0)
        top_b = tl.where(row_ok, tl.max(mb, axis=1), 0.0)
        sum_a = tl.where(row_ok, tl.sum(sa * tl.exp(ma - top_a[:, None]), axis=1), 1.0)
        sum_b = tl.where(row_ok, tl.sum(sb * tl.exp(mb - top_b[:, None]), axis=1), 1.0)
        lse_a = top_a + tl.log(sum_a)
        lse_b = top_b + tl.log(sum_b)
        step = stats + SINKHORN_HEAD + 3 * (t - 1)
        tl.store(step, d, mask=row_ok)
        tl.store(step + 1, lse_a, mask=row_ok)
        tl.store(step + 2, lse_b, mask=row_ok)
        d = d + logit_kn - (lse_a - lse_b)
    last = stats + SINKHORN_HEAD + 3 * (iters - 1)
    tl.store(last, d, mask=row_ok)
    tl.store(last + 1, tl.zeros([ROWS], tl.float64), mask=row_ok)
    tl.store(last + 2, tl.zeros([ROWS], tl.float64), mask=row_ok)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
        z = (2.0 * y - 1.0) / tau + d[:, None]
        e = tl.exp(-tl.abs(z))
        inv = 1.0 / (1.0 + e)
        tl.store(
            mask_ptr + rows[:, None] * n + cols[None, :], tl.where(z >= 0, inv, e * inv), mask=ok
        )


@triton.jit
def _topk_sinkhorn_bwd_kernel(
    g_ptr,
    x_ptr,
    stats_ptr,
    coef_ptr,
    gy_ptr,
    dx_ptr,
    n_rows,
    n,
    iters,
    tau: tl.float64,
    flat_eps: tl.float64,
    MINMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    offs = tl.arange(0, BLOCK)
    tau = tl.full([], tau, tl.float64)
    stats = stats_ptr + rows * (3 * iters + SINKHORN_HEAD)
    steps = stats + SINKHORN_HEAD  # (d_t, A_t, B_t) of step t at steps + 3 (t - 1)
    coef = coef_ptr + rows * iters
    lo = tl.load(stats, mask=row_ok, other=0.0)
    span = tl.load(stats + 1, mask=row_ok, other=1.0)
    hi = tl.load(stats + 2, mask=row_ok, other=0.0)
    lse0 = tl.load(stats + 3, mask=row_ok, other=0.0)
    lse1 = tl.load(stats + 4, mask=row_ok, other=0.0)
    flat = span <= tl.full([], flat_eps, tl.float64)
    safe = tl.where(flat, 1.0, span)
    d_last = tl.load(steps + 3 * (iters - 1), mask=row_ok, other=0.0)
    # Reverse sweep over the scalar recursion, gd = dL/dd_t, from the mask back to d_1;
    # coef[t] keeps dL/dd_{t+1}, the weight of step t's -u in dL/da.
    acc = tl.zeros([ROWS, BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float64)
        y = tl.where(flat[:, None], 0.0, (x - lo[:, None]) / safe[:, None])
        e = tl.exp(-tl.abs((2.0 * y - 1.0) / tau + d_last[:, None]))
        acc += tl.where(ok, g * e / ((1.0 + e) * (1.0 + e)), 0.0)
    gd = tl.sum(acc, axis=1)
    for j in range(0, iters - 1):
        t = iters - 1 - j
        d_t = tl.load(steps + 3 * (t - 1), mask=row_ok, other=0.0)
        lse_a = tl.load(steps + 3 * (t - 1) + 1, mask=row_ok, other=0.0)
        lse_b = tl.load(steps + 3 * (t - 1) + 2, mask=row_ok, other=0.0)
        tl.store(coef + t, gd, mask=row_ok)
        rho = tl.zeros([ROWS, BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
            y = tl.where(flat[:, None], 0.0, (x.to(tl.float64) - lo[:, None]) / safe[:, None])
            z = (2.0 * y - 1.0) / tau + d_t[:, None]
            e = tl.exp(-tl.abs(z))
            inv = 1.0 / (1.0 + e)
            s = tl.where(z >= 0, inv, e * inv)
            soft = tl.log(1.0 + e)
            # <= 0 on real entries (A, B are log-sum-exps over them); the clamp only keeps
            # padding lanes finite.
            p = tl.exp(tl.minimum(tl.minimum(z, 0.0) - soft - lse_a[:, None], 0.0))
            q = tl.exp(tl.minimum(tl.minimum(-z, 0.0) - soft - lse_b[:, None], 0.0))
            rho += tl.where(ok, (1.0 - s) * p + s * q, 0.0)
        gd = gd * (1.0 - tl.sum(rho, axis=1))
    # coef was written above by this program and is read back by all of its threads.
    tl.debug_barrier()
    two_tau = 2.0 / tau
    acc_lo = tl.zeros([ROWS, BLOCK], tl.float64)
    acc_hi = tl.zeros([ROWS, BLOCK], tl.float64)
    cnt_lo = tl.zeros([ROWS, BLOCK], tl.float64)
    cnt_hi = tl.zeros([ROWS, BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + offs
        ok = row_ok[:, None] & (cols < n)[None, :]
        at = rows[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float64)
        y = tl.where(flat[:, None], 0.0, (x - lo[:, None]) / safe[:, None])
        a = (2.0 * y - 1.0) / tau
        e = tl.exp(-tl.abs(a + d_last[:, None]))
        grad_a = g * e / ((1.0 + e) * (1.0 + e))
        for t in range(1, iters):
            d_t = tl.load(steps + 3 * (t - 1), mask=row_ok, other=0.0)
            lse_a = tl.load(steps + 3 * (t - 1) + 1, mask=row_ok, other=0.0)
            lse_b = tl.load(steps + 3 * (t - 1) + 2, mask=row_ok, other=0.0)
            c = tl.load(coef + t, mask=row_ok, other=0.0)
            z = a + d_t[:, None]
            e = tl.exp(-tl.abs(z))
            inv = 1.0 / (1.0 + e)
            s = tl.where(z >= 0, inv, e * inv)
            soft = tl.log(1.0 + e)
            p = tl.exp(tl.minimum(tl.minimum(z, 0.0) - soft - lse_a[:, None], 0.0))
            q = tl.exp(tl.minimum(tl.minimum(-z, 0.0) - soft - lse_b[:, None], 0.0))
            grad_a -= c[:, None] * ((1.0 - s) * p + s * q)
        # d_1 = logit(k/n) + LSE(-y^2/tau) - LSE(-(y-1)^2/tau).
        sm0 = tl.exp(tl.minimum(-(y * y) / tau - lse0[:, None], 0.0))
        sm1 = tl.exp(tl.minimum(-((y - 1.0) * (y - 1.0)) / tau - lse1[:, None], 0.0))
        gy = two_tau * grad_a + gd[:, None] * (
            sm0 * (-2.0 * y / tau) - sm1 * (-2.0 * (y - 1.0) / tau)
        )
        gy = tl.where(ok, gy, 0.0)
        if MINMAX:
            tl.store(gy_ptr + at, gy, mask=ok)
            acc_lo += gy * (y - 1.0)
            acc_hi += gy * y
            cnt_lo += tl.where(ok & (x == lo[:, None]), 1.0, 0.0)
            cnt_hi += tl.where(ok & (x == hi[:, None]), 1.0, 0.0)
        else:
            tl.store(dx_ptr + at, gy, mask=ok)
    if MINMAX:
        g_lo = tl.sum(acc_lo, axis=1) / (safe * tl.maximum(tl.sum(cnt_lo, axis=1), 1.0))
        g_hi = -tl.sum(acc_hi, axis=1) / (safe * tl.maximum(tl.sum(cnt_hi, axis=1), 1.0))
        tl.debug_barrier()
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = row_ok[:, None] & (cols < n)[None, :]
            at = rows[:, None] * n + cols[None, :]
            x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float64)
            gy = tl.load(gy_ptr + at, mask=ok, other=0.0)
            dx = gy / safe[:, None]
            dx += tl.where(x == lo[:, None], g_lo[:, None], 0.0)
            dx += tl.where(x == hi[:, None], g_hi[:, None], 0.0)
            tl.store(dx_ptr + at, tl.where(flat[:, None], 0.0, dx), mask=ok)


def _launch(x: torch.Tensor) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters: ROWS maps per program, each swept in chunks of BLOCK."""
    rows, block, warps = row_tile(*x.shape)
    return (triton.cdiv(x.shape[0], rows),), {"ROWS": rows, "BLOCK": block, "num_warps": warps}


@triton_op("biasmap_triton::soft_topk_exact_fwd", mutates_args=())
def soft_topk_exact_fwd(
    x: torch.Tensor, k: int, tau: float, minmax: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, n] -> (mask [B, n] in x's dtype, stats [B, 4] float64 = (min, range, max, theta);
    min 0 and range 1 for minmax=False)."""
    dtype, x = x.dtype, widen(x)
    batch, n = x.shape
    mask = torch.empty_like(x)
    stats = x.new_empty(batch, 4, dtype=torch.float64)
    grid, meta = _launch(x)
    wrap_triton(_topk_exact_fwd_kernel)[grid](
        x,
        mask,
        stats,
        batch,
        n,
        k,
        float(tau),
        math.log(k / (n - k)),
        MINMAX_EPS,
        MAX_ITERS=EXACT_MAX_ITERS,
        MINMAX=minmax,
        **meta,
    )
    return mask.to(dtype), stats


@triton_op("biasmap_triton::soft_topk_exact_bwd", mutates_args=())
def soft_topk_exact_bwd(
    grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, tau: float, minmax: bool
) -> torch.Tensor:
    """grad [B, n], x [B, n], stats [B, 4] from the forward -> grad_x [B, n] in x's dtype."""
    dtype, grad, x, stats = x.dtype, widen(grad), widen(x), stats.contiguous()
    grad_x = torch.empty_like(x)
    grid, meta = _launch(x)
    wrap_triton(_topk_exact_bwd_kernel)[grid](
        grad, x, stats, grad_x, *x.shape, float(tau), MINMAX_EPS, MINMAX=minmax, **meta
    )
    return grad_x.to(dtype)


@triton_op("biasmap_triton::soft_topk_sinkhorn_fwd", mutates_args=())
def soft_topk_sinkhorn_fwd(
    x: torch.Tensor, k: int, tau: float, iters: int, minmax: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, n] -> (mask [B, n] in x's dtype, stats [B, 5 + 3 iters] float64: min, range, max,
    the first step's two log-sum-exps, then (d_t, A_t, B_t) for t = 1..iters)."""
    dtype, x = x.dtype, widen(x)
    batch, n = x.shape
    mask = torch.empty_like(x)
    stats = x.new_empty(batch, 5 + 3 * iters, dtype=torch.float64)
    grid, meta = _launch(x)
    wrap_triton(_topk_sinkhorn_fwd_kernel)[grid](
        x,
        mask,
        stats,
        batch,
        n,
        iters,
        float(tau),
        math.log(k / (n - k)),
        MINMAX_EPS,
        MINMAX=minmax,
        **meta,
    )
    return mask.to(dtype), stats


@triton_op("biasmap_triton::soft_topk_sinkhorn_bwd", mutates_args=())
def soft_topk_sinkhorn_bwd(
    grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, tau: float, iters: int, minmax: bool
) -> torch.Tensor:
    """grad [B, n], x [B, n], stats from the forward -> grad_x [B, n] in x's dtype."""
    dtype, grad, x, stats = x.dtype, widen(grad), widen(x), stats.contiguous()
    batch, n = x.shape
    grad_x = torch.empty_like(x)
    # Per-row scratch: the reverse sweep's dL/dd_{t+1} per step, and dL/dy before the min-max
    # backward (which needs two row sums of it first).
    coef = x.new_empty(batch, iters, dtype=torch.float64)
    grad_y = x.new_empty(batch, n if minmax else 1, dtype=torch.float64)
    grid, meta = _launch(x)
    wrap_triton(_topk_sinkhorn_bwd_kernel)[grid](
        grad, x, stats, coef, grad_y, grad_x, batch, n, iters, float(tau), MINMAX_EPS,
        MINMAX=minmax, **meta,
    )  # fmt: skip
    return grad_x.to(dtype)


def _exact_setup(ctx, inputs, output):
    x, k, tau, minmax = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1])
    ctx.tau, ctx.minmax = tau, minmax


def _exact_backward(ctx, grad_mask, _grad_stats):
    x, stats = ctx.saved_tensors
    # Upstream gradients can be stride-0 expanded views (x.sum().backward()).
    return (
        soft_topk_exact_bwd(grad_mask.contiguous(), x, stats, ctx.tau, ctx.minmax),
        None,
        None,
        None,
    )


def _sinkhorn_setup(ctx, inputs, output):
    x, k, tau, iters, minmax = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1])
    ctx.tau, ctx.iters, ctx.minmax = tau, iters, minmax


def _sinkhorn_backward(ctx, grad_mask, _grad_stats):
    x, stats = ctx.saved_tensors
    grad_x = soft_topk_sinkhorn_bwd(
        grad_mask.contiguous(), x, stats, ctx.tau, ctx.iters, ctx.minmax
    )
    return grad_x, None, None, None, None


torch.library.register_autograd(
    "biasmap_triton::soft_topk_exact_fwd", _exact_backward, setup_context=_exact_setup
)
torch.library.register_autograd(
    "biasmap_triton::soft_topk_sinkhorn_fwd", _sinkhorn_backward, setup_context=_sinkhorn_setup
)
