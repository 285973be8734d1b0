"""CUDA-specific checks of the compiled CUDA kernels (skipped without a GPU).

tests/test_ops_common.py already runs every op on the "cuda" backend against the
reference (float32/float64 values, float64 gradients, gradcheck). This file adds
what is specific to the GPU kernels:
  * float16 / bfloat16 inputs (float32 accumulation) against the reference;
  * the multi-block soft top-k paths: rows split over cooperating blocks
    (n = 262144 at 512 px, 16 maps) and rows too large for the device's shared
    memory (global-memory working set);
  * stream correctness: results on a non-default stream equal the default
    stream's, the ops can be captured in a CUDA graph (a launch on the legacy
    default stream would break the capture), and device guards (second GPU);
  * determinism (bitwise-equal reruns) and torch.library.opcheck on CUDA;
  * the soft top-k stats agree with the CPU kernel's where both are built.
"""

from __future__ import annotations

import pytest
import torch

from biasmap import ops
from biasmap.ops import backends, native
from biasmap.ops import reference as R


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    reasons = [r for r in (backends.BACKENDS["cuda"].unavailable(op) for op in backends.OPS) if r]
    return reasons[0] if reasons else None


REASON = _cuda_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=f"cuda: {REASON}")]

DEV = "cuda"


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _close_2x(out, ref_lowp, ref64, atol, what=""):
    out, ref_lowp, ref64 = (t.detach().double().cpu() for t in (out, ref_lowp, ref64))
    budget = 2 * (ref_lowp - ref64).abs().max().item() + atol
    err = (out - ref64).abs().max().item()
    assert err <= budget, f"{what}: error {err:.3e} > 2x same-dtype error + atol = {budget:.3e}"


# --- 16-bit inputs --------------------------------------------------------------

LOWP = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOWP)
def test_attention_slice_16bit(dtype):
    g = _gen(0)
    q = torch.randn(2, 4096, 320, generator=g).to(DEV)
    k = torch.randn(1, 77, 320, generator=g).to(DEV)
    tok = torch.tensor([5, 6], device=DEV)
    mask = (torch.arange(77) < 12)[None].to(DEV)
    ref64 = R.attention_slice(q.double(), k.double(), tok, 8, 40**-0.5, mask)
    ql, kl = q.to(dtype), k.to(dtype)
    out = ops.attention_slice(ql, kl, tok, num_heads=8, key_mask=mask, backend="cuda")
    assert out.dtype == dtype
    _close_2x(out, R.attention_slice(ql, kl, tok, 8, 40**-0.5, mask), ref64, 1e-3, str(dtype))
    # Gradients: against autograd of the reference at the same precision.
    qq, kk = ql.clone().requires_grad_(), kl.clone().requires_grad_()
    qr, kr = q.double().requires_grad_(), k.double().requires_grad_()
    up = torch.randn(out.shape, generator=g).to(DEV)
    got = torch.autograd.grad(
        ops.attention_slice(qq, kk, tok, num_heads=8, key_mask=mask, backend="cuda"),
        (qq, kk),
        up.to(dtype),
    )
    want = torch.autograd.grad(
        R.attention_slice(qr, kr, tok, 8, 40**-0.5, mask), (qr, kr), up.double()
    )
    ql2, kl2 = ql.clone().requires_grad_(), kl.clone().requires_grad_()
    lowp = torch.autograd.grad(
        R.attention_slice(ql2, kl2, tok, 8, 40**-0.5, mask), (ql2, kl2), up.to(dtype)
    )
    for a, b, c in zip(got, lowp, want, strict=True):
        _close_2x(a, b, c, 1e-3 * c.abs().max().item(), f"{dtype} grad")


@pytest.mark.parametrize("dtype", LOWP)
def test_resize_aggregate_16bit(dtype):
    g = _gen(1)
    maps = [torch.rand(2, 3, s, s, generator=g).to(DEV) for s in (64, 32, 16, 8)]
    ref64 = R.resize_aggregate([m.double() for m in maps], (64, 64))
    low = [m.to(dtype) for m in maps]
    out = ops.resize_aggregate(low, 64, backend="cuda")
    _close_2x(out, R.resize_aggregate(low, (64, 64)), ref64, 1e-3, str(dtype))


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_soft_topk_and_iou_16bit(dtype, solver):
    x = torch.rand(4, 4096, generator=_gen(2)).to(DEV)
    xl = x.to(dtype)
    ref = R.soft_topk(xl.double(), 1228, 0.05, solver)
    out = ops.soft_topk(xl, 1228, 0.05, solver=solver, backend="cuda")
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    iou = ops.soft_iou(out[:2], out[2:], backend="cuda")
    torch.testing.assert_close(
        iou.double(), R.soft_iou(out[:2].double(), out[2:].double()), rtol=tol, atol=tol
    )
    hard = ops.quantile_mask(xl, 0.7, backend="cuda")
    assert torch.equal(hard, R.quantile_mask(xl.float(), 0.7))


# --- soft top-k multi-block paths ------------------------------------------------------


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_soft_topk_512px_maps_split_over_blocks(solver):
    """16 maps of n = 262144 (512 px): rows split over cooperating blocks."""
    n = 512 * 512
    k = int(0.3 * n)
    x = torch.rand(16, n, generator=_gen(3), dtype=torch.float64).to(DEV)
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype).requires_grad_()
        out = ops.soft_topk(xd, k, 0.05, solver=solver, backend="cuda")
        ref64 = R.soft_topk(x, k, 0.05, solver)
        _close_2x(out, R.soft_topk(x.to(dtype), k, 0.05, solver), ref64, 1e-6, f"{solver} {dtype}")
        if solver == "exact":
            torch.testing.assert_close(
                out.double().sum(-1),
                torch.full((16,), float(k), dtype=torch.float64, device=DEV),
                rtol=1e-5,
                atol=0,
            )
    xx = x.clone().requires_grad_()
    up = torch.randn(x.shape, generator=_gen(4), dtype=torch.float64).to(DEV)
    (got,) = torch.autograd.grad(ops.soft_topk(xx, k, 0.05, solver=solver, backend="cuda"), xx, up)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(R.soft_topk(xr, k, 0.05, solver), xr, up)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_soft_topk_rows_larger_than_shared_memory():
    """One float64 row of 2^23 entries: the backward's working set (3 x 64 MiB)
    exceeds every block's shared memory combined and lives in global memory."""
    n = 1 << 23
    k = n // 10
    x = torch.rand(1, n, generator=_gen(5), dtype=torch.float64).to(DEV)
    up = torch.randn(1, n, generator=_gen(6), dtype=torch.float64).to(DEV)
    for solver in ("exact", "sinkhorn"):
        xx = x.clone().requires_grad_()
        out = ops.soft_topk(xx, k, 0.1, solver=solver, iters=3, backend="cuda")
        (got,) = torch.autograd.grad(out, xx, up)
        xr = x.clone().requires_grad_()
        ref = R.soft_topk(xr, k, 0.1, solver, 3)
        (want,) = torch.autograd.grad(ref, xr, up)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_soft_topk_many_small_rows_authors_preset(solver):
    """The authors' row-wise scope: 64 rows of 64 per map, raw scores, tau 0.01."""
    x = (torch.rand(128, 64, generator=_gen(7), dtype=torch.float64) * 40).to(DEV)
    out = ops.soft_topk(x, 19, 0.01, solver=solver, normalize="none", backend="cuda")
    torch.testing.assert_close(out, R.soft_topk(x, 19, 0.01, solver, 20, "none"), rtol=0, atol=1e-9)


def test_soft_topk_stats_match_the_cpu_kernel():
    if backends.BACKENDS["cpu"].unavailable("soft_topk") is not None:
        pytest.skip("CPU backend not built")
    x = torch.rand(3, 4097, generator=_gen(8), dtype=torch.float64)
    for minmax in (True, False):
        _, s_cpu = torch.ops.biasmap.soft_topk_exact_fwd(x, 1229, 0.1, minmax)
        _, s_gpu = torch.ops.biasmap.soft_topk_exact_fwd(x.to(DEV), 1229, 0.1, minmax)
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-10, atol=1e-10)
        _, s_cpu = torch.ops.biasmap.soft_topk_sinkhorn_fwd(x, 1229, 0.1, 7, minmax)
        _, s_gpu = torch.ops.biasmap.soft_topk_sinkhorn_fwd(x.to(DEV), 1229, 0.1, 7, minmax)
        torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-9, atol=1e-8)


# --- streams, graphs, devices ------------------------------------------------------


def _all_ops(x, q, k, tok, maps):
    """Every op forward and backward; returns the tensors to compare."""
    xx = x.clone().requires_grad_()
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    mm = [m.clone().requires_grad_() for m in maps]
    ma = ops.soft_topk(xx[:2], 300, 0.05, backend="cuda")
    mb = ops.soft_topk(xx[2:], 300, 0.05, solver="sinkhorn", backend="cuda")
    e = ops.soft_iou(ma, mb, backend="cuda").sum()
    a = ops.attention_slice(qq, kk, tok, num_heads=4, backend="cuda")
    r = ops.resize_aggregate(mm, 24, backend="cuda")
    loss = e + a.square().sum() + r.square().sum()
    grads = torch.autograd.grad(loss, [xx, qq, kk, *mm])
    hard = ops.mask_iou(
        ops.quantile_mask(x[:2], 0.7, backend="cuda"), ops.quantile_mask(x[2:], 0.7, backend="cuda")
    )
    return [loss.detach(), hard, *grads]


def _inputs():
    g = _gen(9)
    x = torch.rand(4, 1000, generator=g).to(DEV)
    q = torch.randn(2, 300, 64, generator=g).to(DEV)
    k = torch.randn(1, 77, 64, generator=g).to(DEV)
    tok = torch.tensor([3, 9], device=DEV)
    maps = [torch.rand(2, 2, s, s, generator=g).to(DEV) for s in (24, 12, 6)]
    return x, q, k, tok, maps


def test_results_on_a_side_stream_equal_the_default_streams():
    inputs = _inputs()
    torch.cuda.synchronize()
    expected = _all_ops(*inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Long work queued first on the side stream: a kernel that ran on another
        # stream would read inputs before this finishes overwriting them.
        busy = torch.randn(4096, 4096, device=DEV)
        for _ in range(8):
            busy = busy @ busy / 64
        x, q, k, tok, maps = (
            t.clone() if torch.is_tensor(t) else [m.clone() for m in t] for t in _inputs()
        )
        got = _all_ops(x, q, k, tok, maps)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_ops_capture_in_a_cuda_graph():
    """Graph capture fails on any launch or memset to the legacy default stream and on
    host synchronisation. The raw ops are captured: the public wrappers validate
    inputs with host syncs (NaN checks) first."""
    x, q, k, tok, _ = _inputs()
    bm = torch.ops.biasmap
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph (allocator, kernel attributes)
            bm.soft_topk_exact_fwd(x, 300, 0.05, True)
    torch.cuda.current_stream().wait_stream(side)

    def run():
        m1, _ = bm.soft_topk_exact_fwd(x, 300, 0.05, True)
        m2, _ = bm.soft_topk_sinkhorn_fwd(x, 300, 0.05, 20, True)
        iou, _ = bm.soft_iou_fwd(m1, m2, 1e-8)
        att, _ = bm.attention_slice_fwd(q, k, tok, 4, 0.25, None)
        hard = bm.quantile_mask(x, 0.7, True)
        return m1, iou, att, hard

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.copy_(torch.rand(4, 1000, generator=_gen(10)).to(DEV))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_tensors_device():
    inputs = _inputs()
    expected = [t.cpu() for t in _all_ops(*inputs)]
    moved = [t.to("cuda:1") if torch.is_tensor(t) else [m.to("cuda:1") for m in t] for t in inputs]
    with torch.cuda.device(0):
        got = _all_ops(*moved)
    for a, b in zip(got, expected, strict=True):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b)


# --- determinism and opcheck ------------------------------------------------------------


def test_reruns_are_bitwise_equal():
    inputs = _inputs()
    first = _all_ops(*inputs)
    second = _all_ops(*inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(native.LOAD_ERROR is not None, reason="compiled extension not loaded")
@pytest.mark.parametrize(
    "op_name,args",
    [
        (
            "attention_slice_fwd",
            lambda: (
                torch.randn(2, 9, 8, device=DEV, requires_grad=True),
                torch.randn(1, 5, 8, device=DEV, requires_grad=True),
                torch.tensor([1, 3], device=DEV),
                2,
                0.5,
                torch.tensor([[True, True, True, True, False]], device=DEV),
            ),
        ),
        (
            "resize_aggregate_fwd",
            lambda: (
                [
                    torch.rand(2, 3, 4, 4, device=DEV, requires_grad=True),
                    torch.rand(2, 3, 2, 3, device=DEV, requires_grad=True),
                ],
                5,
                6,
                False,
            ),
        ),
        (
            "soft_topk_exact_fwd",
            lambda: (torch.rand(2, 31, device=DEV, requires_grad=True), 9, 0.1, True),
        ),
        (
            "soft_topk_sinkhorn_fwd",
            lambda: (torch.rand(2, 31, device=DEV, requires_grad=True), 9, 0.1, 7, True),
        ),
        (
            "soft_iou_fwd",
            lambda: (
                torch.rand(2, 31, device=DEV, requires_grad=True),
                torch.rand(2, 31, device=DEV),
                1e-8,
            ),
        ),
        ("quantile_mask", lambda: (torch.rand(2, 31, device=DEV), 0.7, True)),
        (
            "mask_iou",
            lambda: (torch.rand(2, 31, device=DEV) > 0.5, torch.rand(2, 31, device=DEV) > 0.5),
        ),
    ],
)
def test_opcheck_cuda(op_name, args):
    op = getattr(torch.ops.biasmap, op_name)
    torch.library.opcheck(op.default, args())


def test_expanded_upstream_gradients():
    """Reductions hand the backward stride-0 expanded gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 500, generator=gen).to(DEV).requires_grad_()
    weights = torch.rand(500, generator=gen).to(DEV)
    # sum over the batch: grad_out[b, i] = weights[i], strides (0, 1).
    (ops.soft_topk(x, 100, 0.1, backend="cuda").sum(0) * weights).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (R.soft_topk(xr, 100, 0.1).sum(0) * weights).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    # .sum(): strides (0, 0). Every mask sums to k, so the exact gradient is zero and both
    # sides are rounding noise; compare against a bound, not each other.
    x.grad = None
    ops.soft_topk(x, 100, 0.1, backend="cuda").sum().backward()
    assert x.grad.abs().max().item() < 1e-3
