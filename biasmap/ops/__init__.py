"""Public biasmap ops: attention slice, resize-aggregate, soft top-k, SoftIoU and hard masks.

Every op validates its inputs, then runs on the backend chosen by `backend`:
"auto" (the fastest capable one), "reference" (pure PyTorch, biasmap.ops.reference),
"cpu" (C++ kernels), "cuda" (CUDA kernels) or "triton" (Triton kernels: CUDA tensors, or
CPU tensors under TRITON_INTERPRET=1). `biasmap info` lists what is available.
Differentiable ops have hand-written backward passes on the compiled and Triton backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _checks, reference
from ._checks import skip_value_checks
from .backends import BACKENDS, availability, select

__all__ = [
    "attention_slice",
    "resize_aggregate",
    "soft_topk",
    "soft_iou",
    "entanglement_energy",
    "quantile_mask",
    "mask_iou",
    "topk_count",
    "availability",
    "skip_value_checks",
    "BACKENDS",
]


def _native():
    return torch.ops.biasmap


def _kernels(backend: str):
    """The op namespace of a kernel backend: _native() for cpu/cuda (one set of schemas), the
    biasmap_triton ops for triton (the same forward signatures)."""
    if backend == "triton":
        from biasmap.kernels import triton as triton_kernels

        return triton_kernels.load()
    return _native()


def attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    token_index: torch.Tensor,
    *,
    num_heads: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Concept columns of cross-attention, summed over heads, without the full attention matrix.

    q: [B, N, H*d] queries; k: [B or 1, L, H*d] keys; token_index: long [T] key
    positions; key_mask: bool [B or 1, L], True where a key takes part in the softmax
    (None: all keys). Returns [B, T, N] = sum_h softmax_l(q_h k_h^T * scale)[..., token_index],
    scale defaulting to d**-0.5. Differentiable in q and k.
    validate=False skips the checks that read data back to the host (token_index range,
    empty key_mask rows, NaN), which stall a GPU once per call; callers that call it per
    layer per step with inputs they checked once (the attention processors) turn it off.
    """
    _checks.attention_slice_args(q, k, token_index, num_heads, scale, key_mask, validate)
    if scale is None:
        scale = (q.shape[-1] // num_heads) ** -0.5
    name = select("attention_slice", backend, q.device, q.dtype, q.numel())
    if name == "reference":
        return reference.attention_slice(q, k, token_index, num_heads, scale, key_mask)
    out, _ = _kernels(name).attention_slice_fwd(
        q, k, token_index.to(q.device), num_heads, float(scale), key_mask
    )
    return out


def resize_aggregate(
    maps: Sequence[torch.Tensor],
    size: int | tuple[int, int],
    *,
    per_map: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of every map to `size`, summed over maps.

    maps: M tensors [B, T, h_i, w_i]; size: S or (S_h, S_w). Returns [B, T, S_h, S_w],
    or [B, M, T, S_h, S_w] with per_map=True. Differentiable (the backward is the adjoint).
    """
    out_h, out_w = _checks.resize_aggregate_args(maps, size)
    first = maps[0]
    size_out = first.shape[0] * first.shape[1] * out_h * out_w * (len(maps) if per_map else 1)
    name = select("resize_aggregate", backend, first.device, first.dtype, size_out)
    if name == "reference":
        return reference.resize_aggregate(maps, (out_h, out_w), per_map)
    return _kernels(name).resize_aggregate_fwd(list(maps), out_h, out_w, per_map)


def soft_topk(
    x: torch.Tensor,
    k: int,
    tau: float,
    *,
    solver: str = "exact",
    iters: int = 20,
    normalize: str = "minmax",
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable top-k mask by two-anchor entropic optimal transport.

    x: [B, n] scores (one map per row); k: entries kept, in [1, n-1]; tau > 0: the
    entropic regulariser. solver "exact" gives the converged mask
    sigmoid((2y - theta)/tau) with sum k; "sinkhorn" runs exactly `iters` log-domain
    Sinkhorn iterations (the authors' loop). normalize "minmax" rescales each row to
    [0, 1] first (y), "none" uses x as is. Returns [B, n] in [0, 1].
    """
    _checks.soft_topk_args(x, k, tau, solver, iters, normalize)
    name = select("soft_topk", backend, x.device, x.dtype, x.numel())
    if name == "reference":
        return reference.soft_topk(x, k, tau, solver, iters, normalize)
    minmax = normalize == "minmax"
    if solver == "exact":
        return _kernels(name).soft_topk_exact_fwd(x, k, float(tau), minmax)[0]
    return _kernels(name).soft_topk_sinkhorn_fwd(x, k, float(tau), iters, minmax)[0]


def soft_iou(
    a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8, *, backend: str = "auto"
) -> torch.Tensor:
    """SoftIoU of soft masks a, b [B, n] -> [B]: sum(ab) / (sum a + sum b - sum(ab) + eps)."""
    _checks.soft_iou_args(a, b, eps)
    name = select("soft_iou", backend, a.device, a.dtype, a.numel())
    if name == "reference":
        return reference.soft_iou(a, b, eps)
    return _kernels(name).soft_iou_fwd(a, b, float(eps))[0]


def entanglement_energy(
    ma: torch.Tensor,
    mb: torch.Tensor,
    k: int,
    tau: float,
    *,
    solver: str = "exact",
    iters: int = 20,
    normalize: str = "minmax",
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """BiasMap's energy E = SoftIoU(soft_topk(ma), soft_topk(mb)) for maps ma, mb [B, n] -> [B].

    Both maps go through one batched soft top-k call ([2B, n]), so the energy costs two
    kernel launches forward and two backward.
    """
    _checks.soft_iou_args(ma, mb, eps)
    masks = soft_topk(
        torch.cat([ma, mb]),
        k,
        tau,
        solver=solver,
        iters=iters,
        normalize=normalize,
        backend=backend,
    )
    mask_a, mask_b = masks.split(ma.shape[0])
    return soft_iou(mask_a, mask_b, eps, backend=backend)


def quantile_mask(
    x: torch.Tensor, q: float, inclusive: bool = True, *, backend: str = "auto"
) -> torch.Tensor:
    """Hard mask of maps x [B, n] -> bool [B, n]: x >= quantile_q(x) per row (> if not inclusive).

    The quantile is numpy's default linear interpolation; the authors' code uses
    np.percentile with `>` (inclusive=False). No gradient.
    """
    _checks.quantile_mask_args(x, q)
    name = select("quantile_mask", backend, x.device, x.dtype, x.numel())
    if name == "reference":
        return reference.quantile_mask(x, q, inclusive)
    return _kernels(name).quantile_mask(x, float(q), bool(inclusive))


def mask_iou(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """IoU of bool masks a, b [B, n] -> float32 [B]; 0 where both masks are empty."""
    _checks.mask_iou_args(a, b)
    name = select("mask_iou", backend, a.device, torch.float32, a.numel())
    if name == "reference":
        return reference.mask_iou(a, b)
    return _kernels(name).mask_iou(a, b)


def topk_count(n: int, q: float) -> int:
    """Entries a soft top-k keeps for quantile q over n scores: floor((1 - q) * n), at least 1.

    The tiny epsilon absorbs binary round-off: q=0.9, n=10 gives 1, where (1 - 0.9) * 10 is
    0.9999999999999998 in floating point.
    """
    return max(1, min(n - 1, math.floor((1.0 - q) * n + 1e-9)))
