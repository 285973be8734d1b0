"""Triton-specific checks. The generic suite (test_ops_common.py) already runs every op on the
"triton" backend against the reference; this file covers what it cannot reach: opcheck of the
biasmap_triton ops, the multi-chunk / multi-row / split-reduction code paths (forced with
small block sizes), edge inputs, stride-0 upstream gradients, half precision, and backend
selection.

Without a GPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1), about
150x slower than torch, so shapes stay small.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import device_of, interpreted

from biasmap import ops
from biasmap.ops import backends, reference

REASON = backends.BACKENDS["triton"].unavailable("soft_topk")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton: {REASON}")

if REASON is None:
    from biasmap.kernels import triton as triton_kernels
    from biasmap.kernels.triton import _common, attention

    TOPS = triton_kernels.load()
DEVICE = device_of("triton")
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(fn, inputs: list[torch.Tensor], seed: int = 7):
    """fn(*inputs) and its gradients for a fixed random upstream gradient."""
    leaves = [t.detach().to(DEVICE).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype).to(out.device)
    return out.detach().cpu(), [g.cpu() for g in torch.autograd.grad(out, leaves, upstream)]


def _ref_grads(fn, inputs: list[torch.Tensor], seed: int = 7):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)
    return out.detach(), list(torch.autograd.grad(out, leaves, upstream))


def _assert_matches_reference(fn_triton, fn_ref, inputs, rtol=1e-7, atol=1e-9):
    out, grads = _grads(fn_triton, inputs)
    ref, ref_grads = _ref_grads(fn_ref, inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- opcheck


def _opcheck_utils():
    # Fake-tensor and AOT checks touch fake storage, which the interpreter cannot run on
    # (DESIGN.md section 3); a GPU runs the full opcheck.
    if interpreted("triton"):
        return ("test_schema", "test_autograd_registration")
    return (
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_dynamic",
    )


def _opcheck_cases():
    def t(*shape, grad=False, dtype=torch.float32):
        x = torch.rand(*shape, generator=_gen(sum(shape)), dtype=dtype).to(DEVICE)
        return x.requires_grad_(grad)

    tok = torch.tensor([1, 3], device=DEVICE)
    mask = torch.tensor([[True, True, True, True, False]], device=DEVICE)
    lse = torch.zeros(2, 2, 9, device=DEVICE)
    return [
        (
            "attention_slice_fwd",
            lambda: (t(2, 9, 8, grad=True), t(1, 5, 8, grad=True), tok, 2, 0.5, mask),
        ),
        (
            "attention_slice_bwd",
            lambda: (t(2, 2, 9), t(2, 9, 8), t(1, 5, 8), tok, 2, 0.5, None, lse),
        ),
        (
            "resize_aggregate_fwd",
            lambda: ([t(2, 3, 4, 4, grad=True), t(2, 3, 2, 3, grad=True)], 5, 6, False),
        ),
        (
            "resize_aggregate_bwd",
            lambda: (t(2, 2, 3, 5, 6), [t(2, 3, 4, 4), t(2, 3, 2, 3)], 5, 6, True),
        ),
        ("soft_topk_exact_fwd", lambda: (t(2, 31, grad=True), 9, 0.1, True)),
        ("soft_topk_exact_bwd", lambda: (t(2, 31), t(2, 31), t(2, 4, dtype=F64), 0.1, True)),
        ("soft_topk_sinkhorn_fwd", lambda: (t(2, 31, grad=True), 9, 0.1, 7, True)),
        (
            "soft_topk_sinkhorn_bwd",
            lambda: (t(2, 31), t(2, 31), t(2, 26, dtype=F64), 0.1, 7, False),
        ),
        ("soft_iou_fwd", lambda: (t(2, 31, grad=True), t(2, 31), 1e-8)),
        ("soft_iou_bwd", lambda: (t(2), t(2, 31), t(2, 31), t(2, 3, dtype=F64) + 1, 1e-8)),
        ("quantile_mask", lambda: (t(2, 31), 0.7, True)),
        ("mask_iou", lambda: (t(2, 31) > 0.5, t(2, 31) > 0.5)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(TOPS, name).default, args(), test_utils=_opcheck_utils())


# --------------------------------------------------------------------------- forced code paths


@pytest.fixture
def small_rows(monkeypatch):
    """Row kernels with 16-entry chunks and 2 rows per program: n = 37 takes 3 chunks with a
    ragged tail, B = 3 leaves the second program half empty."""
    monkeypatch.setattr(_common, "MAX_ROW_BLOCK", 16)
    monkeypatch.setattr(_common, "ROW_TILE", 32)


@pytest.mark.parametrize(
    "solver,normalize", [("exact", "minmax"), ("sinkhorn", "minmax"), ("sinkhorn", "none")]
)
def test_soft_topk_multi_chunk_multi_row(small_rows, solver, normalize):
    x = torch.rand(3, 37, generator=_gen(1), dtype=F64)
    x[0, 5] = x[0].max()  # tied maxima and minima split their gradients
    x[2, 7] = x[2].min()
    kwargs = dict(solver=solver, iters=6, normalize=normalize)
    _assert_matches_reference(
        lambda v: ops.soft_topk(v, 9, 0.05, backend="triton", **kwargs),
        lambda v: reference.soft_topk(v, 9, 0.05, solver, 6, normalize),
        [x],
    )


def test_iou_and_masks_multi_chunk_multi_row(small_rows):
    a = torch.rand(3, 37, generator=_gen(2), dtype=F64)
    b = torch.rand(3, 37, generator=_gen(3), dtype=F64)
    _assert_matches_reference(
        lambda u, v: ops.soft_iou(u, v, backend="triton"), reference.soft_iou, [a, b]
    )
    ties = (a * 5).floor()
    for x, q, inclusive in ((a, 0.7, True), (ties, 0.3, False), (a.float(), 0.7, False)):
        got = ops.quantile_mask(x.to(DEVICE), q, inclusive, backend="triton").cpu()
        assert torch.equal(got, reference.quantile_mask(x, q, inclusive)), (x.dtype, q)
    ma, mb = a > 0.6, b > 0.5
    ma[1] = False
    mb[1] = False
    got = ops.mask_iou(ma.to(DEVICE), mb.to(DEVICE), backend="triton").cpu()
    torch.testing.assert_close(got, reference.mask_iou(ma, mb), rtol=0, atol=0)


@pytest.mark.parametrize("k_batch,masked", [(1, True), (3, False)])
def test_attention_split_reduction_and_query_blocks(monkeypatch, k_batch, masked):
    """Small query blocks and three dk splits: the paths a GPU takes for large N."""
    for tuned in (attention._fwd, attention._bwd_dq, attention._bwd_dk):
        monkeypatch.setattr(tuned, "fixed", {"BLOCK_N": 16})
    monkeypatch.setattr(attention, "dk_splits", lambda *args: 3)
    q = torch.randn(3, 45, 2 * 6, generator=_gen(4), dtype=F64)
    k = torch.randn(k_batch, 20, 2 * 6, generator=_gen(5), dtype=F64)
    tokens = torch.tensor([2, 5, 5, 17])
    key_mask = None
    if masked:  # token 17 is masked out: its column must be 0, with zero gradient
        key_mask = torch.arange(20)[None, :] < torch.tensor([[12]])
    _assert_matches_reference(
        lambda a, b: ops.attention_slice(
            a, b, tokens, num_heads=2, key_mask=None if key_mask is None else key_mask.to(DEVICE),
            backend="triton",
        ),
        lambda a, b: reference.attention_slice(a, b, tokens, 2, 6**-0.5, key_mask),
        [q, k],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [F64, torch.float16])
def test_attention_single_head_writes_out_directly(dtype):
    """With one head the forward stores the probabilities straight into out (in q's dtype);
    with several it sums a per-head float workspace."""
    q = torch.randn(2, 50, 24, generator=_gen(19), dtype=F64)
    k = torch.randn(1, 77, 24, generator=_gen(20), dtype=F64)
    tokens = torch.tensor([4, 60])
    if dtype == F64:
        _assert_matches_reference(
            lambda a, b: ops.attention_slice(a, b, tokens, num_heads=1, backend="triton"),
            lambda a, b: reference.attention_slice(a, b, tokens, 1, 24**-0.5),
            [q, k],
        )
        return
    got = ops.attention_slice(
        q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), tokens, num_heads=1, backend="triton"
    )
    want = reference.attention_slice(q.to(dtype).float(), k.to(dtype).float(), tokens, 1)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-3)


def test_attention_many_keys_and_sd_head_dim():
    """L = 150 keys take two key blocks; d = 40 (SD1.5) pads to 64."""
    q = torch.randn(2, 33, 2 * 40, generator=_gen(6), dtype=F64)
    k = torch.randn(2, 150, 2 * 40, generator=_gen(7), dtype=F64)
    tokens = torch.tensor([3, 140])
    key_mask = torch.arange(150)[None, :] < torch.tensor([[145], [149]])
    _assert_matches_reference(
        lambda a, b: ops.attention_slice(
            a, b, tokens, num_heads=2, key_mask=key_mask.to(DEVICE), backend="triton"
        ),
        lambda a, b: reference.attention_slice(a, b, tokens, 2, 40**-0.5, key_mask),
        [q, k],
    )


@pytest.mark.parametrize(
    "shapes,size,per_map",
    [
        ([(3, 4), (5, 2)] * 5, (9, 7), False),  # 10 maps: two launches, float accumulation
        ([(3, 4), (5, 2)] * 5, (9, 7), True),
        ([(1, 1), (2, 1), (1, 3)], (4, 6), False),  # degenerate source maps
        ([(8, 8)], (200, 130), False),  # upsampling by 25: windows wider than one chunk
        ([(40, 33)], (5, 3), True),  # strong downsampling
    ],
)
def test_resize_aggregate_edge_shapes(shapes, size, per_map):
    maps = [torch.rand(1, 2, h, w, generator=_gen(h * w), dtype=F64) for h, w in shapes]
    _assert_matches_reference(
        lambda *m: ops.resize_aggregate(list(m), size, per_map=per_map, backend="triton"),
        lambda *m: reference.resize_aggregate(list(m), size, per_map),
        maps,
    )


# --------------------------------------------------------------------------- edge inputs


def _edge_rows() -> torch.Tensor:
    x = torch.rand(5, 33, generator=_gen(8), dtype=F64)
    x[1] = 0.25  # constant
    x[2] = 0.0  # all zero
    x[3] = x[3] * 1e30  # huge
    x[4] = x[4] * 1e-9  # tiny range, above MINMAX_EPS
    return x


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("tau", [1e-3, 0.1])
def test_soft_topk_edge_inputs_are_nan_free_and_match(solver, normalize, tau):
    x = _edge_rows()
    if normalize == "none":
        x = x[[0, 1, 2, 4]]  # raw 1e30 scores saturate the reference to 0/1: covered below
    out, grads = _grads(
        lambda v: ops.soft_topk(v, 10, tau, solver=solver, normalize=normalize, backend="triton"),
        [x],
    )
    assert torch.isfinite(out).all() and torch.isfinite(grads[0]).all()
    assert ((out >= 0) & (out <= 1)).all()
    ref, ref_grads = _ref_grads(
        lambda v: reference.soft_topk(v, 10, tau, solver, 20, normalize), [x]
    )
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    # The 1e-9-range row has d/dx = 1e9 d/dy: float64 round-off of either path shows at 1e-6.
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-9)
    if solver == "exact":
        torch.testing.assert_close(out.sum(-1), torch.full((x.shape[0],), 10.0, dtype=F64))


def test_soft_topk_huge_raw_scores_saturate_without_nan():
    x = torch.rand(2, 33, generator=_gen(9), dtype=F64) * 1e30
    for solver in ("exact", "sinkhorn"):
        out, grads = _grads(
            lambda v, s=solver: ops.soft_topk(
                v, 10, 1e-3, solver=s, normalize="none", backend="triton"
            ),
            [x],
        )
        assert torch.isfinite(out).all() and torch.isfinite(grads[0]).all()
        assert ((out >= 0) & (out <= 1)).all()


# Both order statistics +inf make torch's lerp inf - inf = nan (no entry kept), and numpy warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_quantile_mask_signed_zeros_infinities_and_extreme_q():
    x = torch.tensor(
        [
            [-0.0, 0.0, -1.5, 2.0, float("inf"), -float("inf"), 0.0, 3.0, -0.0],
            [1.0, -2.0, 1.0, 1.0, -2.0, 5e-39, -5e-39, 7.0, 1.0],
        ]
    )
    # The public op refuses infinite maps; the kernel's ordering of them is still checked with
    # the value checks skipped.
    with pytest.raises(ValueError, match="inf"):
        ops.quantile_mask(x.to(DEVICE), 0.5, backend="triton")
    for dtype in (torch.float32, F64):
        for q, inclusive in ((0.0, True), (0.3, False), (0.5, True), (0.7, False), (1.0, True)):
            xd = x.to(dtype)
            with ops.skip_value_checks():
                got = ops.quantile_mask(xd.to(DEVICE), q, inclusive, backend="triton").cpu()
            assert torch.equal(got, reference.quantile_mask(xd, q, inclusive)), (dtype, q)


def test_upstream_gradients_may_be_stride_zero():
    """x.sum().backward() hands every backward an expanded (stride-0) gradient."""
    x = torch.rand(2, 37, generator=_gen(10), dtype=F64)
    y = torch.rand(2, 37, generator=_gen(11), dtype=F64)
    q = torch.randn(2, 9, 8, generator=_gen(12), dtype=F64)
    k = torch.randn(1, 6, 8, generator=_gen(13), dtype=F64)
    maps = [torch.rand(2, 1, 4, 4, generator=_gen(14), dtype=F64)]
    calls = [
        (lambda a: ops.soft_topk(a, 5, 0.1, backend=b), reference.soft_topk_exact, [x], (5, 0.1)),
        (
            lambda a: ops.soft_topk(a, 5, 0.1, solver="sinkhorn", backend=b),
            lambda a, *r: reference.soft_topk_sinkhorn(a, 5, 0.1),
            [x],
            (),
        ),
        (lambda a, c: ops.soft_iou(a, c, backend=b), reference.soft_iou, [x, y], ()),
        (
            lambda a, c: ops.attention_slice(a, c, torch.tensor([1]), num_heads=2, backend=b),
            lambda a, c: reference.attention_slice(a, c, torch.tensor([1]), 2),
            [q, k],
            (),
        ),
        (
            lambda m: ops.resize_aggregate([m], 7, backend=b),
            lambda m: reference.resize_aggregate([m], (7, 7)),
            maps,
            (),
        ),
    ]
    b = "triton"
    for fn, ref_fn, inputs, extra in calls:
        leaves = [t.detach().clone().to(DEVICE).requires_grad_(True) for t in inputs]
        fn(*leaves).sum().backward()
        ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        ref_fn(*ref_leaves, *extra).sum().backward()
        for got, want in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Half inputs compute in float32 (attention, resize) or float64 (soft top-k, IoU)."""
    q = torch.randn(1, 40, 16, generator=_gen(15))
    k = torch.randn(1, 9, 16, generator=_gen(16))
    tok = torch.tensor([2])
    # The interpreter keeps bfloat16 as raw uint16 and its tl.dot multiplies the bits; a GPU
    # multiplies bfloat16 natively. Attention's score dot takes the input dtype as is.
    if not (dtype == torch.bfloat16 and interpreted("triton")):
        got = ops.attention_slice(
            q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), tok, num_heads=2, backend="triton"
        )
        want = reference.attention_slice(q.to(dtype).float(), k.to(dtype).float(), tok, 2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-3)
    x = torch.rand(2, 33, generator=_gen(17))
    got = ops.soft_topk(x.to(dtype).to(DEVICE), 10, 0.1, backend="triton")
    want = reference.soft_topk(x.to(dtype).double(), 10, 0.1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=4e-3)
    maps = [torch.rand(1, 1, 5, 5, generator=_gen(18))]
    got = ops.resize_aggregate([m.to(dtype).to(DEVICE) for m in maps], 8, backend="triton")
    want = reference.resize_aggregate([m.to(dtype).float() for m in maps], (8, 8))
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=4e-3)


# --------------------------------------------------------------------------- backend choice


def test_auto_never_picks_triton_on_cpu():
    for op in backends.OPS:
        assert backends.select(op, "auto", torch.device("cpu"), torch.float32, 10**6) != "triton"


def test_cuda_preference_table_orders_cuda_and_triton(monkeypatch):
    cuda = torch.device("cuda")
    assert backends.auto_order("soft_topk", cuda, 4096)[0] == "cuda"  # unmeasured: CUDA first
    monkeypatch.setitem(
        backends.CUDA_AUTO_PREFERENCE, "soft_topk", ((1000, "triton"), (None, "cuda"))
    )
    assert backends.auto_order("soft_topk", cuda, 999) == ("triton", "cuda", "reference")
    assert backends.auto_order("soft_topk", cuda, 5000) == ("cuda", "triton", "reference")
    assert backends.auto_order("soft_topk", cuda, None)[0] == "cuda"
    assert backends.auto_order("soft_topk", torch.device("cpu"), 999) == ("cpu", "reference")


@pytest.fixture
def fresh_reason(monkeypatch):
    """unavailable_reason() recomputed under the test's patches, and cached again after."""
    triton_kernels.unavailable_reason.cache_clear()
    yield triton_kernels.unavailable_reason
    triton_kernels.unavailable_reason.cache_clear()


def test_reason_without_gpu_or_interpreter(monkeypatch, fresh_reason):
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fresh_reason() == (
        "triton needs a CUDA device or TRITON_INTERPRET=1 (CPU interpreter, for tests)"
    )


def test_reason_without_triton(monkeypatch, fresh_reason):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert fresh_reason().startswith("triton is not installed")
    assert "triton is not installed" in backends.availability()["soft_iou"]["triton"]


def test_forced_backend_error_lists_triton():
    with pytest.raises(
        RuntimeError, match=r"All backends: cpu: .*; cuda: .*; triton: .*; reference: ok"
    ):
        ops.soft_topk(torch.rand(2, 10), 3, 0.1, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of triton ops needs a GPU")
def test_compiled_graph_calls_the_triton_kernels():
    x = torch.rand(4, 4096, device="cuda", requires_grad=True)

    @torch.compile(fullgraph=True)
    def energy(v):
        masks = TOPS.soft_topk_exact_fwd(v, 1228, 0.1, True)[0]
        return TOPS.soft_iou_fwd(masks[:2], masks[2:], 1e-8)[0].sum()

    value = energy(x)
    value.backward()
    ref = reference.entanglement_energy(x.detach()[:2], x.detach()[2:], 1228, 0.1).sum()
    torch.testing.assert_close(value.detach(), ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(x.grad).all()
