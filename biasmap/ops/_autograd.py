"""Autograd formulas shared by the kernel backends: the compiled biasmap:: ops and the Triton
biasmap_triton:: ops have the same forward and backward signatures."""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_attention_slice(fwd_name: str, bwd: Callable) -> None:
    """Register the backward of `fwd_name` (attention_slice_fwd's schema: q, k, token_index,
    num_heads, scale, key_mask -> out [B, T, N], lse [B, H, N]) through `bwd`
    (attention_slice_bwd's schema). grad_k is skipped when k needs no gradient, as in
    guidance, whose keys come from the text encoder."""

    def setup(ctx, inputs, output):
        q, k, token_index, num_heads, scale, key_mask = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, token_index, key_mask, output[1])
        ctx.num_heads, ctx.scale = num_heads, scale

    def backward(ctx, grad_out, _grad_lse):
        q, k, token_index, key_mask, lse = ctx.saved_tensors
        need_grad_k = ctx.needs_input_grad[1]
        # Upstream gradients can be stride-0 expanded views (x.sum().backward()).
        grad_q, grad_k = bwd(
            grad_out.contiguous(),
            q,
            k,
            token_index,
            ctx.num_heads,
            ctx.scale,
            key_mask,
            lse,
            need_grad_k,
        )
        return grad_q, grad_k if need_grad_k else None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup)
