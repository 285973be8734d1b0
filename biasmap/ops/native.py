"""The compiled backend (CPU and CUDA kernels in biasmap._C).

Importing this module loads the extension once. A missing, disabled or ABI-broken
extension never makes `import biasmap` fail: it gives one warning and the ops fall
back to the reference path (LOAD_ERROR says why). When the extension loads, every
forward op gets a fake kernel (for torch.compile / meta tensors) and autograd that
calls its hand-written backward op (pytorch/extension-cpp's pattern).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _autograd

SKIP_ENV = "BIASMAP_SKIP_EXT"


def _load_extension() -> str | None:
    if os.environ.get(SKIP_ENV) == "1":
        return f"disabled by {SKIP_ENV}=1"
    try:
        importlib.import_module("biasmap._C")
    except (ImportError, OSError) as exc:
        warnings.warn(
            f"biasmap: the compiled extension biasmap._C could not be loaded ({exc}). "
            "Falling back to the reference PyTorch ops. Rebuild it with "
            "`pip install --no-build-isolation -e .` against torch "
            f"{torch.__version__}, or set {SKIP_ENV}=1 to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return f"biasmap._C failed to load: {exc}"
    return None


LOAD_ERROR: str | None = _load_extension()


# (op name, dispatch key) -> registered. The registrations happen once, when _C loads, so
# lookups are cached (~6 us each otherwise). backends.py fills the table for every op at
# import: torch.compile then reads a plain dict, where OpOverload's own lookup would be a
# graph break in every op call.
KERNELS: dict[tuple[str, str], bool] = {}


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether biasmap::<op_name> is registered with a kernel for `dispatch_key` ("CPU"/"CUDA")."""
    known = KERNELS.get((op_name, dispatch_key))
    if known is not None:
        return known
    found = False
    if LOAD_ERROR is None:
        packet = getattr(torch.ops.biasmap, op_name, None)
        found = packet is not None and packet.default.has_kernel_for_dispatch_key(dispatch_key)
    KERNELS[(op_name, dispatch_key)] = found
    return found


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # Upstream gradients may be stride-0 expanded views; raw-pointer kernels need dense memory.
    return t.contiguous()


def _register_fake_kernels() -> None:
    lib = "biasmap::"

    @torch.library.register_fake(lib + "attention_slice_fwd")
    def _(q, k, token_index, num_heads, scale, key_mask):
        batch, n_query, _ = q.shape
        out = q.new_empty(batch, token_index.shape[0], n_query)
        lse = q.new_empty(batch, num_heads, n_query, dtype=_accumulate_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake(lib + "attention_slice_bwd")
    def _(grad_out, q, k, token_index, num_heads, scale, key_mask, lse, need_grad_k=True):
        return torch.empty_like(q), torch.empty_like(k)

    @torch.library.register_fake(lib + "resize_aggregate_fwd")
    def _(maps, out_h, out_w, per_map):
        batch, channels = maps[0].shape[:2]
        if per_map:
            return maps[0].new_empty(batch, len(maps), channels, out_h, out_w)
        return maps[0].new_empty(batch, channels, out_h, out_w)

    @torch.library.register_fake(lib + "resize_aggregate_bwd")
    def _(grad, maps, out_h, out_w, per_map):
        return [torch.empty_like(m) for m in maps]

    @torch.library.register_fake(lib + "soft_topk_exact_fwd")
    def _(x, k, tau, minmax):
        return torch.empty_like(x), x.new_empty(x.shape[0], 3, dtype=torch.float64)

    @torch.library.register_fake(lib + "soft_topk_exact_bwd")
    def _(grad, x, mask, stats, k, tau, minmax):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "soft_topk_sinkhorn_fwd")
    def _(x, k, tau, iters, minmax):
        return torch.empty_like(x), x.new_empty(x.shape[0], 2 + 2 * iters, dtype=torch.float64)

    @torch.library.register_fake(lib + "soft_topk_sinkhorn_bwd")
    def _(grad, x, stats, k, tau, iters, minmax):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "soft_iou_fwd")
    def _(a, b, eps):
        return a.new_empty(a.shape[0]), a.new_empty(a.shape[0], 3, dtype=torch.float64)

    @torch.library.register_fake(lib + "soft_iou_bwd")
    def _(grad, a, b, sums, eps):
        return torch.empty_like(a), torch.empty_like(b)

    @torch.library.register_fake(lib + "quantile_mask")
    def _(x, q, inclusive):
        return torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake(lib + "mask_iou")
    def _(a, b):
        return a.new_empty(a.shape[0], dtype=torch.float32)


def _register_autograd() -> None:
    ops = torch.ops.biasmap

    _autograd.register_attention_slice("biasmap::attention_slice_fwd", ops.attention_slice_bwd)

    def resize_setup(ctx, inputs, output):
        maps, out_h, out_w, per_map = inputs
        # The backward op reads only the maps' shapes and dtype from them.
        ctx.save_for_backward(*maps)
        ctx.out_h, ctx.out_w, ctx.per_map = out_h, out_w, per_map

    def resize_backward(ctx, grad):
        grads = ops.resize_aggregate_bwd(
            _contiguous(grad), list(ctx.saved_tensors), ctx.out_h, ctx.out_w, ctx.per_map
        )
        return list(grads), None, None, None

    torch.library.register_autograd(
        "biasmap::resize_aggregate_fwd", resize_backward, setup_context=resize_setup
    )

    def exact_setup(ctx, inputs, output):
        x, k, tau, minmax = inputs
        mask, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(x, mask, stats)
        ctx.k, ctx.tau, ctx.minmax = k, tau, minmax

    def exact_backward(ctx, grad_mask, _grad_stats):
        x, mask, stats = ctx.saved_tensors
        grad_x = ops.soft_topk_exact_bwd(
            _contiguous(grad_mask), x, mask, stats, ctx.k, ctx.tau, ctx.minmax
        )
        return grad_x, None, None, None

    torch.library.register_autograd(
        "biasmap::soft_topk_exact_fwd", exact_backward, setup_context=exact_setup
    )

    def sinkhorn_setup(ctx, inputs, output):
        x, k, tau, iters, minmax = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1])
        ctx.k, ctx.tau, ctx.iters, ctx.minmax = k, tau, iters, minmax

    def sinkhorn_backward(ctx, grad_mask, _grad_stats):
        x, stats = ctx.saved_tensors
        grad_x = ops.soft_topk_sinkhorn_bwd(
            _contiguous(grad_mask), x, stats, ctx.k, ctx.tau, ctx.iters, ctx.minmax
        )
        return grad_x, None, None, None, None

    torch.library.register_autograd(
        "biasmap::soft_topk_sinkhorn_fwd", sinkhorn_backward, setup_context=sinkhorn_setup
    )

    def iou_setup(ctx, inputs, output):
        a, b, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(a, b, output[1])
        ctx.eps = eps

    def iou_backward(ctx, grad_iou, _grad_sums):
        a, b, sums = ctx.saved_tensors
        grad_a, grad_b = ops.soft_iou_bwd(_contiguous(grad_iou), a, b, sums, ctx.eps)
        return grad_a, grad_b, None

    torch.library.register_autograd("biasmap::soft_iou_fwd", iou_backward, setup_context=iou_setup)


if LOAD_ERROR is None:
    _register_fake_kernels()
    _register_autograd()
