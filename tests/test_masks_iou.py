"""SoftIoU, hard quantile masks and mask IoU on every backend.

soft_iou: values and gradients against the reference, the closed-form gradient of
DESIGN.md, bounds, float64 gradcheck and `.sum().backward()`.
quantile_mask: masks equal to ones computed by hand with numpy.percentile (numpy's linear
quantile, the authors' tool), with ties from integer-valued and constant rows.
mask_iou: IoU of explicit small masks counted by hand, and the empty-union case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_2x, backend_params

from biasmap import ops
from biasmap.ops import reference

IOU_BACKENDS = backend_params("soft_iou", cpu_tensors=True)
QUANTILE_BACKENDS = backend_params("quantile_mask", cpu_tensors=True)
MASK_IOU_BACKENDS = backend_params("mask_iou", cpu_tensors=True)


def _cpu_available(op: str) -> bool:
    return ops.BACKENDS["cpu"].unsupported(op, torch.device("cpu"), torch.float32) is None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _soft_masks(batch, n, dtype=torch.float64, seed=0, requires_grad=False):
    gen = _gen(seed)
    a = torch.sigmoid(4 * torch.randn(batch, n, generator=gen, dtype=torch.float64))
    b = torch.sigmoid(4 * torch.randn(batch, n, generator=gen, dtype=torch.float64))
    return a.to(dtype).requires_grad_(requires_grad), b.to(dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# soft_iou
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", IOU_BACKENDS)
@pytest.mark.parametrize("batch,n", [(1, 2), (3, 4097), (2, 64 * 64)])
@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_soft_iou_values_and_gradients_float64(backend, batch, n, eps):
    a, b = _soft_masks(batch, n, requires_grad=True)
    out = ops.soft_iou(a, b, eps, backend=backend)
    ref = reference.soft_iou(a, b, eps)
    assert out.shape == (batch,) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)

    grad_out = torch.randn(batch, generator=_gen(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (a, b), grad_out)
    ref_grads = torch.autograd.grad(ref, (a, b), grad_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)

    # DESIGN.md: dE/da_i = (b_i U - I (1 - b_i)) / U^2 with U = sum a + sum b - I + eps.
    inter = (a * b).sum(-1, keepdim=True)
    union = a.sum(-1, keepdim=True) + b.sum(-1, keepdim=True) - inter + eps
    closed_a = grad_out[:, None] * (b * union - inter * (1 - b)) / union**2
    closed_b = grad_out[:, None] * (a * union - inter * (1 - a)) / union**2
    torch.testing.assert_close(grads[0], closed_a.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[1], closed_b.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", IOU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_soft_iou_lower_precision(backend, dtype):
    a, b = _soft_masks(3, 4097, dtype, requires_grad=True)
    out = ops.soft_iou(a, b, backend=backend)
    assert out.dtype == dtype
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    high = reference.soft_iou(a64, b64)
    same_dtype = reference.soft_iou(a, b)
    assert_close_2x(out, same_dtype, high, atol=1e-6, what=f"{dtype} iou")

    grad_out = torch.rand(3, generator=_gen(2)).to(dtype)
    grads = torch.autograd.grad(out, (a, b), grad_out)
    same = torch.autograd.grad(same_dtype, (a, b), grad_out)
    highs = torch.autograd.grad(high, (a64, b64), grad_out.double())
    for g, s, h in zip(grads, same, highs, strict=True):
        assert g.dtype == dtype
        assert_close_2x(g, s, h, atol=1e-7, what=f"{dtype} grad")


@pytest.mark.parametrize("backend", IOU_BACKENDS)
def test_soft_iou_bounds_and_extremes(backend):
    n = 1000
    a, b = _soft_masks(4, n, torch.float32)
    iou = ops.soft_iou(a, b, backend=backend)
    assert bool(((iou >= 0) & (iou <= 1)).all())

    ones = torch.ones(2, n)
    zeros = torch.zeros(2, n)
    half = torch.zeros(2, n)
    half[:, : n // 2] = 1
    torch.testing.assert_close(ops.soft_iou(ones, ones, backend=backend), torch.ones(2))
    torch.testing.assert_close(ops.soft_iou(half, 1 - half, backend=backend), torch.zeros(2))
    torch.testing.assert_close(ops.soft_iou(half, ones, backend=backend), torch.full((2,), 0.5))
    # Both empty: 0 / (0 + eps) = 0, no NaN.
    torch.testing.assert_close(ops.soft_iou(zeros, zeros, backend=backend), torch.zeros(2))


@pytest.mark.parametrize("backend", IOU_BACKENDS)
@pytest.mark.parametrize("eps", [1e-8, 0.3])
def test_soft_iou_gradcheck(backend, eps):
    a, b = _soft_masks(3, 37, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.soft_iou(x, y, eps, backend=backend), (a, b))


@pytest.mark.parametrize("backend", IOU_BACKENDS)
def test_soft_iou_sum_backward(backend):
    """`.sum().backward()` gives the backward an expanded (stride-0) gradient."""
    a, b = _soft_masks(3, 4097, torch.float32, requires_grad=True)
    ops.soft_iou(a, b, backend=backend).sum().backward()
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    ops.soft_iou(a2, b2, backend=backend).backward(torch.ones(3))
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    a3, b3 = (t.detach().double().requires_grad_() for t in (a, b))
    reference.soft_iou(a3, b3).sum().backward()
    torch.testing.assert_close(a.grad.double(), a3.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(b.grad.double(), b3.grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------
# quantile_mask
# ---------------------------------------------------------------------------


def _numpy_mask(x: torch.Tensor, q: float, inclusive: bool) -> torch.Tensor:
    values = x.numpy()
    threshold = np.percentile(values, q * 100, axis=-1, keepdims=True)
    return torch.from_numpy(values >= threshold if inclusive else values > threshold)


def _rows(kind: str, batch: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = _gen(seed)
    if kind == "random":
        x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    elif kind == "integers":  # many ties at the threshold
        x = torch.randint(0, 6, (batch, n), generator=gen).double()
    elif kind == "constant":
        x = torch.full((batch, n), 0.25, dtype=torch.float64)
    else:  # a map-like row: a flat background plus a bump
        x = torch.zeros(batch, n, dtype=torch.float64)
        x[:, n // 3 : n // 2] = torch.rand(batch, n // 2 - n // 3, generator=gen, dtype=x.dtype)
    return x.to(dtype)


@pytest.mark.parametrize("backend", QUANTILE_BACKENDS)
@pytest.mark.parametrize("kind", ["random", "integers", "constant", "flat-bump"])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("inclusive", [True, False], ids=["ge", "gt"])
@pytest.mark.parametrize("n", [2, 11, 4097])
def test_quantile_mask_matches_numpy_percentile(backend, kind, q, inclusive, n):
    x = _rows(kind, 3, n, torch.float64, seed=n)
    mask = ops.quantile_mask(x, q, inclusive, backend=backend)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(mask, _numpy_mask(x, q, inclusive))


@pytest.mark.parametrize("backend", QUANTILE_BACKENDS)
@pytest.mark.parametrize("kind", ["random", "integers", "constant", "flat-bump"])
@pytest.mark.parametrize("q", [0.3, 0.7])
@pytest.mark.parametrize("inclusive", [True, False], ids=["ge", "gt"])
def test_quantile_mask_float32_matches_torch_quantile(backend, kind, q, inclusive):
    x = _rows(kind, 4, 64 * 64, torch.float32, seed=7)
    threshold = torch.quantile(x, q, dim=-1, keepdim=True, interpolation="linear")
    expected = x >= threshold if inclusive else x > threshold
    assert torch.equal(ops.quantile_mask(x, q, inclusive, backend=backend), expected)


@pytest.mark.parametrize("backend", QUANTILE_BACKENDS)
def test_quantile_mask_by_hand(backend):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    # q = 0.5: position 2 -> threshold 3.
    assert ops.quantile_mask(x, 0.5, True, backend=backend).tolist() == [
        [False, False, True, True, True],
        [True, True, True, False, False],
    ]
    assert ops.quantile_mask(x, 0.5, False, backend=backend).tolist() == [
        [False, False, False, True, True],
        [True, True, False, False, False],
    ]
    # q = 0.7 over 0..9: position 6.3 -> threshold 6.3 -> {7, 8, 9}.
    y = torch.arange(10.0)[None]
    assert ops.quantile_mask(y, 0.7, True, backend=backend)[0].nonzero().flatten().tolist() == [
        7,
        8,
        9,
    ]
    # Ties: [0, 1, 1, 1, 2] at q = 0.5 -> threshold 1; >= keeps the tied ones, > drops them.
    z = torch.tensor([[1.0, 0.0, 1.0, 2.0, 1.0]])
    assert ops.quantile_mask(z, 0.5, True, backend=backend).tolist() == [
        [True, False, True, True, True]
    ]
    assert ops.quantile_mask(z, 0.5, False, backend=backend).tolist() == [
        [False, False, False, True, False]
    ]
    # A constant row: everything is at the threshold.
    c = torch.full((1, 7), 3.5)
    assert bool(ops.quantile_mask(c, 0.7, True, backend=backend).all())
    assert not bool(ops.quantile_mask(c, 0.7, False, backend=backend).any())


@pytest.mark.skipif(not _cpu_available("quantile_mask"), reason="the CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_quantile_mask_low_precision_uses_float_values(dtype):
    """torch.quantile rejects fp16/bf16; the kernel treats them as their float32 values."""
    x = _rows("integers", 3, 1001, dtype, seed=3) + _rows("random", 3, 1001, dtype, seed=4)
    for inclusive in (True, False):
        out = ops.quantile_mask(x, 0.7, inclusive, backend="cpu")
        assert torch.equal(out, ops.quantile_mask(x.float(), 0.7, inclusive, backend="cpu"))


# ---------------------------------------------------------------------------
# mask_iou
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MASK_IOU_BACKENDS)
def test_mask_iou_by_hand(backend):
    a = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # vs [0, 1, 1, 0, 0]: 1 / 3
            [1, 1, 1, 1, 0],  # vs itself: 1
            [1, 0, 0, 0, 0],  # vs [0, 0, 0, 0, 1]: 0 (disjoint)
            [0, 0, 0, 0, 0],  # vs empty: union empty -> 0
            [1, 1, 1, 1, 1],  # vs [1, 0, 1, 0, 0]: 2 / 5
        ],
        dtype=torch.bool,
    )
    b = torch.tensor(
        [
            [0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    out = ops.mask_iou(a, b, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (5,)
    expected = torch.tensor([1 / 3, 1.0, 0.0, 0.0, 2 / 5], dtype=torch.float32)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", MASK_IOU_BACKENDS)
def test_mask_iou_random_matches_counts(backend):
    gen = _gen(5)
    a = torch.rand(6, 4097, generator=gen) < 0.3
    b = torch.rand(6, 4097, generator=gen) < 0.6
    a[0] = False
    b[0] = False
    out = ops.mask_iou(a, b, backend=backend)
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    expected = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
    assert torch.equal(out, expected)
    assert out[0].item() == 0.0
    # Non-contiguous inputs read the same entries.
    assert torch.equal(ops.mask_iou(a.t().contiguous().t(), b[:, :], backend=backend), out)


@pytest.mark.parametrize("backend", MASK_IOU_BACKENDS)
def test_quantile_masks_to_biou(backend):
    """The discovery metric end to end: two maps -> hard masks -> IoU, as the paper's Eq. 3-4."""
    gen = _gen(6)
    ma = torch.rand(2, 64 * 64, generator=gen)
    mb = 0.5 * ma + 0.5 * torch.rand(2, 64 * 64, generator=gen)
    masks_a = ops.quantile_mask(ma, 0.7, backend=backend)
    masks_b = ops.quantile_mask(mb, 0.7, backend=backend)
    iou = ops.mask_iou(masks_a, masks_b, backend=backend)
    expected = []
    for i in range(2):
        na = _numpy_mask(ma[i : i + 1], 0.7, True)
        nb = _numpy_mask(mb[i : i + 1], 0.7, True)
        expected.append(float((na & nb).sum()) / float((na | nb).sum()))
    torch.testing.assert_close(iou, torch.tensor(expected, dtype=torch.float32))
