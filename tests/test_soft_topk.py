"""soft_topk-specific checks (the generic value/gradient/gradcheck/opcheck checks against
the reference are in test_ops_common.py).

* solver="sinkhorn" equals an unrolled log-domain Sinkhorn over the full [B, n, 2] plan,
  written here independently of biasmap (values and gradients);
* the exact solver is the fixed point of that Sinkhorn loop;
* invariants: mask in [0, 1], sum(mask) = k for the exact solver;
* no NaN and finite gradients on degenerate inputs, down to tau = 1e-3;
* min-max ties: gradients split like torch.amin/amax;
* float16/bfloat16 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params, device_of

from biasmap import ops
from biasmap.ops import native

BACKENDS = backend_params("soft_topk")
TAUS = (1e-3, 1e-2, 0.1, 1.0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = span <= 1e-12
    return torch.where(flat, torch.zeros_like(x), (x - lo) / torch.where(flat, 1.0, span))


def full_plan_sinkhorn(x, k, tau, iters, normalize):
    """The two-anchor entropic OT top-k as the authors state it: an explicit cost matrix
    C [B, n, 2], log-kernel -C / tau, log-domain Sinkhorn on the full plan, and the mask
    n * P[:, :, 1]. Returns (mask, g) with g the last column potentials [B, 2]."""
    y = _minmax(x) if normalize == "minmax" else x
    b, n = y.shape
    anchors = torch.tensor([0.0, 1.0], dtype=y.dtype, device=y.device)
    cost = (y[:, :, None] - anchors[None, None, :]) ** 2  # [B, n, 2]
    log_kernel = -cost / tau
    log_mu = torch.full((b, n), -math.log(n), dtype=y.dtype, device=y.device)
    log_nu = torch.log(torch.tensor([(n - k) / n, k / n], dtype=y.dtype, device=y.device))
    f = torch.zeros(b, n, dtype=y.dtype, device=y.device)
    g = torch.zeros(b, 2, dtype=y.dtype, device=y.device)
    for _ in range(iters):
        g = log_nu[None, :] - torch.logsumexp(log_kernel + f[:, :, None], dim=1)
        f = log_mu - torch.logsumexp(log_kernel + g[:, None, :], dim=2)
    log_plan = log_kernel + f[:, :, None] + g[:, None, :]
    return n * log_plan.exp()[:, :, 1], g


def _inputs(kind: str, b: int, n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "rand":
        x = torch.rand(b, n, generator=gen, dtype=torch.float64)
    elif kind == "constant":
        x = torch.full((b, n), 0.37, dtype=torch.float64)
    elif kind == "zeros":
        x = torch.zeros(b, n, dtype=torch.float64)
    elif kind == "one-hot":
        x = torch.zeros(b, n, dtype=torch.float64)
        x[torch.arange(b), torch.arange(b) % n] = 1.0
    elif kind == "1e4":
        x = torch.rand(b, n, generator=gen, dtype=torch.float64) * 1e4
    elif kind == "ties":
        x = torch.randint(0, 4, (b, n), generator=gen).double()
    else:
        raise ValueError(kind)
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,k,tau,iters,normalize",
    [
        (37, 11, 0.1, 20, "minmax"),
        (37, 11, 0.01, 20, "none"),
        (101, 30, 0.3, 3, "minmax"),
        (5, 1, 0.05, 1, "minmax"),
        (64, 19, 0.01, 20, "none"),  # the authors' row-wise setting
    ],
)
def test_sinkhorn_equals_full_plan_loop(backend, n, k, tau, iters, normalize):
    device = device_of(backend)
    x = _inputs("rand", 3, n).to(device)
    if normalize == "none":
        x = x * 1.5 - 0.2  # raw scores outside [0, 1]
    weights = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = weights.to(device)

    x_ref = x.clone().requires_grad_()
    want, _ = full_plan_sinkhorn(x_ref, k, tau, iters, normalize)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x_ref)

    x_op = x.clone().requires_grad_()
    got = ops.soft_topk(
        x_op, k, tau, solver="sinkhorn", iters=iters, normalize=normalize, backend=backend
    )
    (got_grad,) = torch.autograd.grad((got * weights).sum(), x_op)

    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-8)


@pytest.mark.skipif(native.LOAD_ERROR is not None, reason="needs biasmap._C")
def test_sinkhorn_stats_hold_the_column_potentials():
    """The forward's stats are (min, range, g_1[0], g_1[1], ..., g_T[0], g_T[1])."""
    x = _inputs("rand", 2, 29) * 3 - 1
    iters = 4
    mask, stats = torch.ops.biasmap.soft_topk_sinkhorn_fwd(x, 8, 0.2, iters, True)
    assert stats.shape == (2, 2 + 2 * iters) and stats.dtype == torch.float64
    torch.testing.assert_close(stats[:, 0], x.amin(-1))
    torch.testing.assert_close(stats[:, 1], x.amax(-1) - x.amin(-1))
    for t in range(1, iters + 1):
        _, g_t = full_plan_sinkhorn(x, 8, 0.2, t, "minmax")
        torch.testing.assert_close(stats[:, 2 * t : 2 * t + 2], g_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_exact_is_the_sinkhorn_fixed_point(backend, normalize):
    device = device_of(backend)
    x = _inputs("rand", 2, 23, seed=5).to(device)
    exact = ops.soft_topk(x, 7, 0.1, solver="exact", normalize=normalize, backend=backend)
    # Two-column Sinkhorn contracts fast at this tau: 500 iterations reach roundoff.
    converged = ops.soft_topk(
        x, 7, 0.1, solver="sinkhorn", iters=500, normalize=normalize, backend=backend
    )
    torch.testing.assert_close(exact, converged, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,n,k", [(1, 4097, 1229), (3, 4097, 1229), (3, 50, 1), (1, 7, 6)])
@pytest.mark.parametrize("tau", [1e-3, 0.05, 1.0])
def test_exact_mask_invariants(backend, dtype, b, n, k, tau):
    x = _inputs("rand", b, n, dtype=dtype, seed=n).to(device_of(backend))
    mask = ops.soft_topk(x, k, tau, backend=backend)
    assert mask.shape == x.shape and mask.dtype == dtype
    assert bool(((mask >= 0) & (mask <= 1)).all())
    sums = mask.double().sum(-1)
    torch.testing.assert_close(sums, torch.full_like(sums, float(k)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("kind", ["constant", "zeros", "one-hot", "1e4", "ties"])
def test_degenerate_inputs_stay_finite(backend, solver, normalize, kind):
    device = device_of(backend)
    weights = torch.linspace(-1, 1, 33, dtype=torch.float64, device=device)
    for dtype in (torch.float32, torch.float64):
        for tau in TAUS:
            x = _inputs(kind, 3, 33, dtype=dtype).to(device).requires_grad_()
            mask = ops.soft_topk(x, 9, tau, solver=solver, normalize=normalize, backend=backend)
            what = f"{solver} {normalize} {kind} {dtype} tau={tau}"
            assert bool(torch.isfinite(mask).all()), what
            assert bool(((mask >= 0) & (mask <= 1 + 1e-6)).all()), what
            if solver == "exact":
                total = mask.double().sum(-1)
                torch.testing.assert_close(total, torch.full_like(total, 9.0), rtol=1e-4, atol=0)
            if dtype == torch.float32:
                # .sum().backward() hands the backward a stride-0 upstream gradient.
                mask.sum().backward()
            else:
                (mask * weights).sum().backward()
            assert bool(torch.isfinite(x.grad).all()), what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_minmax_ties_split_like_amin_amax(backend, solver):
    """Several entries share the row min and max; the reference's amin/amax backward splits
    their gradient evenly, the kernels must do the same."""
    from biasmap.ops import reference

    device = device_of(backend)
    x = torch.tensor(
        [
            [0.2, 0.9, 0.2, 0.5, 0.9, 0.9, 0.4, 0.2, 0.7],
            [3.0, 1.0, 2.0, 1.0, 3.0, 2.5, 1.5, 2.0, 1.0],
        ],
        dtype=torch.float64,
        device=device,
    )
    weights = torch.arange(9, dtype=torch.float64, device=device) - 3.5
    xa = x.clone().requires_grad_()
    want = reference.soft_topk(xa, 3, 0.2, solver=solver, iters=7)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), xa)
    xb = x.clone().requires_grad_()
    got = ops.soft_topk(xb, 3, 0.2, solver=solver, iters=7, backend=backend)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), xb)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float32(backend, solver, dtype):
    device = device_of(backend)
    x = _inputs("rand", 3, 257, dtype=dtype, seed=2).to(device)
    # The same values in float32, so only the computation's precision differs.
    x32 = x.float()
    low = ops.soft_topk(x, 77, 0.1, solver=solver, backend=backend)
    high = ops.soft_topk(x32, 77, 0.1, solver=solver, backend=backend)
    assert low.dtype == dtype
    # The compiled kernels compute in float32 and only round the output; the
    # reference computes in the input dtype.
    if backend == "reference":
        atol = 3e-2 if dtype == torch.float16 else 2e-1
    else:
        atol = 1e-3 if dtype == torch.float16 else 8e-3
    torch.testing.assert_close(low.float(), high, rtol=0, atol=atol)
    xg = x.clone().requires_grad_()
    ops.soft_topk(xg, 77, 0.1, solver=solver, backend=backend).sum().backward()
    assert xg.grad.dtype == dtype and bool(torch.isfinite(xg.grad).all())
