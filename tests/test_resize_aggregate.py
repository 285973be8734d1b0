"""resize_aggregate on every backend: values against F.interpolate at the SD1.5 layer shapes
and at odd, non-square up- and down-sampling sizes, gradients against autograd, float64
gradcheck, fp16/bf16 against float32, and the CPU kernel's bit-identity with F.interpolate.

Output sizes cover both of ATen's bilinear formulas: out_h + out_w <= 128 (its four-tap
"channels-last" loop, e.g. S = 64) and larger (its separable loop, e.g. (96, 72), 512)."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_2x, backend_params

from biasmap import ops
from biasmap.ops import reference

# SD1.5 at 512 px: down-64 x2, down-32 x2, down-16 x2, mid-8, up-16 x3, up-32 x3, up-64 x3.
SD15 = [(64, 64)] * 2 + [(32, 32)] * 2 + [(16, 16)] * 2 + [(8, 8)] + [(16, 16)] * 3
SD15 += [(32, 32)] * 3 + [(64, 64)] * 3
# Odd, non-square, 1-pixel, and larger than some outputs (down-sampling).
ODD = [(13, 7), (5, 9), (1, 1), (1, 4), (30, 17), (64, 48)]
SHAPES = {"sd15": SD15, "odd": ODD}
# 64: four-tap path; (48, 80): four-tap, non-square; (96, 72): separable path.
SIZES = [64, (48, 80), (96, 72)]
BACKENDS = backend_params("resize_aggregate", cpu_tensors=True)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _maps(shapes, batch, channels, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.rand(batch, channels, h, w, generator=gen, dtype=torch.float64)
        .to(dtype)
        .requires_grad_(requires_grad)
        for h, w in shapes
    ]


def _interpolate_sum(maps, size, per_map):
    """The spec, evaluated in float64."""
    resized = [
        F.interpolate(m.detach().double(), size=_pair(size), mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.stack(resized, dim=1) if per_map else torch.stack(resized).sum(0)


def _x86_aten() -> bool:
    # The kernel mirrors ATen's x86 builds (FMA on AVX2/AVX512, none on DEFAULT); other
    # architectures are not verified.
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpu_available() -> bool:
    cpu = ops.BACKENDS["cpu"]
    return cpu.unsupported("resize_aggregate", torch.device("cpu"), torch.float32) is None


needs_cpu = pytest.mark.skipif(not _cpu_available(), reason="the CPU kernels are not built")
needs_x86 = pytest.mark.skipif(
    not _x86_aten(), reason="bit-identity is verified for ATen's x86 kernels only"
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("per_map", [False, True], ids=["sum", "per_map"])
@pytest.mark.parametrize("batch,channels", [(1, 1), (3, 3), (1, 3), (3, 1)])
def test_values_match_interpolate(backend, shapes, size, per_map, batch, channels):
    maps = _maps(SHAPES[shapes], batch, channels)
    out = ops.resize_aggregate(maps, size, per_map=per_map, backend=backend)
    expected = _interpolate_sum(maps, size, per_map)
    lead = (batch, len(maps), channels) if per_map else (batch, channels)
    shape = (*lead, *_pair(size))
    assert out.shape == shape and out.dtype == torch.float32
    same_dtype = reference.resize_aggregate(maps, _pair(size), per_map)
    assert_close_2x(out, same_dtype, expected, atol=1e-6, what="float32 values")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_map", [False, True], ids=["sum", "per_map"])
def test_sd15_to_image_size(backend, per_map):
    """S = 512, OVAM's expand_size: values and the backward of a sum of maps."""
    maps = _maps(SD15, 1, 1, torch.float64, requires_grad=True)
    out = ops.resize_aggregate(maps, 512, per_map=per_map, backend=backend)
    torch.testing.assert_close(out, _interpolate_sum(maps, 512, per_map), rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, maps, grad_out)
    ref = reference.resize_aggregate(maps, (512, 512), per_map)
    ref_grads = torch.autograd.grad(ref, maps, grad_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("per_map", [False, True], ids=["sum", "per_map"])
@pytest.mark.parametrize("batch,channels", [(1, 1), (3, 3)])
def test_gradients_match_autograd(backend, shapes, size, per_map, batch, channels):
    maps = _maps(SHAPES[shapes], batch, channels, torch.float64, requires_grad=True)
    out = ops.resize_aggregate(maps, size, per_map=per_map, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad(out, maps, grad_out)
    ref = reference.resize_aggregate(maps, _pair(size), per_map)
    ref_grads = torch.autograd.grad(ref, maps, grad_out)
    for g, r, m in zip(grads, ref_grads, maps, strict=True):
        assert g.shape == m.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_sum_backward_float32(backend, size):
    """`.sum().backward()` hands the backward a stride-0 gradient."""
    maps = _maps(SD15, 3, 3, requires_grad=True)
    ops.resize_aggregate(maps, size, backend=backend).sum().backward()
    ref_maps = [m.detach().double().requires_grad_() for m in maps]
    reference.resize_aggregate(ref_maps, _pair(size)).sum().backward()
    for m, r in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(m.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
# (3, 126): out_h + out_w > 128 takes the separable path with few outputs.
@pytest.mark.parametrize("size", [(5, 7), (3, 126)], ids=["four-tap", "separable"])
@pytest.mark.parametrize("per_map", [False, True], ids=["sum", "per_map"])
@pytest.mark.parametrize("batch,channels", [(1, 1), (2, 3)])
def test_gradcheck_float64(backend, size, per_map, batch, channels):
    shapes = [(3, 5), (4, 4), (1, 2), (9, 3), (4, 4)]  # up and down, a repeated shape
    maps = _maps(shapes, batch, channels, torch.float64, requires_grad=True)

    def fn(*ms):
        return ops.resize_aggregate(list(ms), size, per_map=per_map, backend=backend)

    # The full Jacobian costs one backward per output; random projections suffice for batches.
    assert torch.autograd.gradcheck(fn, maps, fast_mode=batch * channels > 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("size", [64, (96, 72)], ids=str)
@pytest.mark.parametrize("per_map", [False, True], ids=["sum", "per_map"])
def test_low_precision_close_to_float32(backend, dtype, shapes, size, per_map):
    maps = _maps(SHAPES[shapes], 2, 3, dtype, requires_grad=True)
    out = ops.resize_aggregate(maps, size, per_map=per_map, backend=backend)
    assert out.dtype == dtype
    high_maps = [m.detach().double().requires_grad_() for m in maps]
    high = reference.resize_aggregate(high_maps, _pair(size), per_map)
    same_dtype = reference.resize_aggregate(maps, _pair(size), per_map)
    assert_close_2x(out, same_dtype, high, atol=1e-3, what=f"{dtype} values")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad(out, maps, grad_out)
    high_grads = torch.autograd.grad(high, high_maps, grad_out.double())
    same_grads = torch.autograd.grad(same_dtype, maps, grad_out)
    for i, (g, s, h) in enumerate(zip(grads, same_grads, high_grads, strict=True)):
        assert g.dtype == dtype
        # Gradients sum up to (S/h)^2 products: allow one low-precision ulp of their size.
        atol = 2 * torch.finfo(dtype).eps * max(1.0, h.abs().max().item())
        assert_close_2x(g, s, h, atol=atol, what=f"{dtype} grad of map {i}")


# ---------------------------------------------------------------------------
# The CPU kernel's exactness, determinism and argument checks
# ---------------------------------------------------------------------------


@needs_cpu
@needs_x86
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("size", [*SIZES, (17, 23), 512], ids=str)
def test_cpu_per_map_is_bit_identical_to_interpolate(dtype, shapes, size):
    maps = _maps(SHAPES[shapes], 1, 3, dtype)
    out = ops.resize_aggregate(maps, size, per_map=True, backend="cpu")
    for i, m in enumerate(maps):
        expected = F.interpolate(m, size=_pair(size), mode="bilinear", align_corners=False)
        diff = (out[:, i] != expected).sum().item()
        assert diff == 0, f"map {i} {tuple(m.shape)}: {diff} entries differ from F.interpolate"


@needs_cpu
@needs_x86
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [*SIZES, (17, 23)], ids=str)
@pytest.mark.parametrize("channels", [8, 17])
def test_cpu_per_map_bit_identical_with_many_channels(dtype, size, channels):
    """ATen sums the first T - T % vector_width channels in its vector loop, in another order."""
    maps = _maps(ODD, 1, channels, dtype)
    out = ops.resize_aggregate(maps, size, per_map=True, backend="cpu")
    for i, m in enumerate(maps):
        expected = F.interpolate(m, size=_pair(size), mode="bilinear", align_corners=False)
        assert torch.equal(out[:, i], expected), f"map {i} {tuple(m.shape)}"


@needs_cpu
@needs_x86
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_channels_last_maps_follow_atens_formula(dtype):
    """Channels-last inputs with T > 3 take ATen's four-tap loop at every output size."""
    maps = [m.contiguous(memory_format=torch.channels_last) for m in _maps(ODD, 2, 5, dtype)]
    out = ops.resize_aggregate(maps, (96, 72), per_map=True, backend="cpu")
    for i, m in enumerate(maps):
        expected = F.interpolate(m, size=(96, 72), mode="bilinear", align_corners=False)
        assert torch.equal(out[:, i], expected), f"map {i} {tuple(m.shape)}"


@needs_cpu
@needs_x86
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [*SIZES, (17, 23)], ids=str)
def test_cpu_sum_is_bit_identical_to_summing_interpolates_in_order(dtype, size):
    maps = _maps(ODD + SD15, 2, 3, dtype)
    out = ops.resize_aggregate(maps, size, backend="cpu")
    acc = torch.zeros_like(out)
    for m in maps:
        acc = acc + F.interpolate(m, size=_pair(size), mode="bilinear", align_corners=False)
    assert torch.equal(out, acc)


@needs_cpu
@needs_x86
def test_cpu_follows_atens_single_thread_path_choice():
    """With one thread and T = 3 ATen uses its four-tap loop even for large outputs."""
    maps = _maps(ODD, 2, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = ops.resize_aggregate(maps, (96, 72), per_map=True, backend="cpu")
        for i, m in enumerate(maps):
            expected = F.interpolate(m, size=(96, 72), mode="bilinear", align_corners=False)
            assert torch.equal(out[:, i], expected)
    finally:
        torch.set_num_threads(threads)


@needs_cpu
@pytest.mark.parametrize("size", [64, (96, 72)], ids=str)
def test_cpu_deterministic_and_layout_independent(size):
    maps = _maps(SD15, 2, 3, requires_grad=True)
    out = ops.resize_aggregate(maps, size, backend="cpu")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    first = torch.autograd.grad(out, maps, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, maps, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    # Transposed and broadcast (stride-0) views give the same values as dense maps.
    views = [m.detach().transpose(2, 3).contiguous().transpose(2, 3) for m in maps]
    views[0] = maps[0].detach()[:1].expand(2, -1, -1, -1)
    dense = [v.contiguous() for v in views]
    assert torch.equal(
        ops.resize_aggregate(views, size, backend="cpu"),
        ops.resize_aggregate(dense, size, backend="cpu"),
    )


@needs_cpu
def test_cpu_identity_size_copies_the_map():
    maps = _maps([(64, 64)], 2, 3)
    assert torch.equal(ops.resize_aggregate(maps, 64, backend="cpu"), maps[0])


@needs_cpu
def test_raw_op_rejects_inconsistent_arguments():
    op = torch.ops.biasmap
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"maps\[1\]"):
        op.resize_aggregate_fwd([a, b], 16, 16, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op.resize_aggregate_fwd([a, b.double().expand(2, 3, 4, 4)], 16, 16, False)
    with pytest.raises(RuntimeError, match="out_h"):
        op.resize_aggregate_fwd([a], 0, 16, False)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        op.resize_aggregate_bwd(torch.rand(2, 3, 16, 16), [a], 16, 16, True)
