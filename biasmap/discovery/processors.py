"""Capturing attention processors for the cross-attention (attn2) layers.

A `CapturingProcessor` wraps the layer's existing processor. The original processor
still computes the layer output (SDPA and every diffusers feature stay intact, and the
output is bit-identical); the wrapper only reads the query that the original
processor computed, so `to_q` runs once per layer call:

- a forward hook on `attn.to_q`, armed only while the wrapped call runs, keeps a
  reference to its output [B_cfg, N, H*d] (no copy, nothing kept after the call);
- the rows of the chosen CFG half go through `biasmap.ops.attention_slice` against the
  attribution prompt's keys K' = to_k(text_encoder(P')), computed once per layer;
- the concept columns, averaged over each concept's sub-tokens, are added into the
  block's running sum [B, C, h, w] owned by the `CaptureState` (float32; float64
  pipelines keep float64).

Nothing per step or per query is stored, so the captured memory does not grow with
the number of steps.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

from .. import ops


@dataclass
class BlockInfo:
    """One UNet stage that holds cross-attention: its module key, stage and downsampling depth."""

    key: str  # "down_blocks.1", "mid_block", "up_blocks.2"
    stage: str  # "down", "mid", "up"
    halvings: int  # how many 2x downsamplings the latent has gone through at this stage


@dataclass
class CaptureState:
    """Everything the processors of one trace share; updated once per UNet call.

    rows: the CFG half's rows of the attention batch; block_sizes: (h, w) per block
    key for the current latent size; sums: per block key, [B, C, h, w] float32.
    """

    token_index: torch.Tensor  # long [T]
    mean_matrix: (
        torch.Tensor | None
    )  # [C, T] sub-token averaging; None when every concept is one token
    key_mask: torch.Tensor | None  # bool [1, L] or None
    text_states: torch.Tensor  # [1, L, D] the attribution prompt's encoder hidden states
    capture_blocks: set[str] = field(default_factory=set)  # block keys to capture
    capturing: bool = False  # whether the current UNet call is a selected step
    rows: slice = field(default_factory=lambda: slice(None))
    num_images: int = 0
    block_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_calls: dict[str, int] = field(default_factory=dict)  # per block key, this generation
    # Attn2 layers per block key: a call that captures a block adds this many layer maps.
    layers_per_block: dict[str, int] = field(default_factory=dict)
    # This denoiser call's maps per block, with their autograd graph when differentiable.
    # The processors only ever write here; `commit_step` adds them into `sums` after the
    # call. Keeping the running sums and the int counters out of the call is what lets the
    # denoiser run under torch.compile: the compiled code has no state that changes from
    # step to step (an int that does would make dynamo recompile at every step).
    differentiable: bool = False
    step_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    # The processor after whose slice no later layer needs a graph (block targeting).
    grad_cutoff: object | None = None

    def add(self, block_key: str, columns: torch.Tensor) -> None:
        """Add concept columns [B, C, N] of one layer call into this call's block map."""
        height, width = self.block_sizes[block_key]
        batch, num_concepts, num_queries = columns.shape
        if height * width != num_queries:
            raise RuntimeError(
                f"cross-attention in {block_key} has {num_queries} queries, but the latent size "
                f"predicts a {height}x{width} map; this UNet's downsampling is not the 2x "
                "stride-2 kind biasmap expects"
            )
        columns = columns.reshape(batch, num_concepts, height, width)
        if columns.dtype != torch.float64:  # float16/bfloat16 pipelines accumulate in float32
            columns = columns.float()
        previous = self.step_sums.get(block_key)
        self.step_sums[block_key] = columns if previous is None else previous + columns

    def pop_step(self) -> dict[str, torch.Tensor]:
        """This call's block maps {block key: [B, C, h, w]} (graph kept); empties them."""
        step, self.step_sums = self.step_sums, {}
        return step

    def commit_step(self, step_maps: dict[str, torch.Tensor]) -> None:
        """Add one call's block maps (from `pop_step`) into the generation's running sums."""
        for block_key, value in step_maps.items():
            value = value.detach()
            if block_key in self.sums:
                self.sums[block_key] += value
            else:
                self.sums[block_key] = value.clone()
            calls = self.layers_per_block.get(block_key, 1)
            self.layer_calls[block_key] = self.layer_calls.get(block_key, 0) + calls


def _query_like_attn_processor(attn, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
    """to_q of the attention's input, preprocessed the way AttnProcessor2_0 does.

    Used only when the wrapped processor did not call `attn.to_q` (so the hook saw no
    query); returns [B, N, H*d].
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return attn.to_q(hidden_states)


def _per_head_norm(norm, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a per-head norm (attn.norm_q / norm_k act on [B, H, N, d]) to x [B, N, H*d]."""
    batch, length, inner = x.shape
    heads_first = x.view(batch, length, heads, inner // heads).transpose(1, 2)
    return norm(heads_first).transpose(1, 2).reshape(batch, length, inner)


class CapturingProcessor:
    """Wraps an attn2 processor: same output, plus concept columns into the trace's block sums."""

    def __init__(self, original, attn, block_key: str, state: CaptureState):
        self.original = original
        self.block_key = block_key
        self.state = state
        self._armed = False
        self._query: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._hook = attn.to_q.register_forward_hook(self._keep_query)

    def _keep_query(self, module, inputs, output) -> None:
        if self._armed and self._query is None:
            self._query = output

    def remove_hook(self) -> None:
        self._hook.remove()

    def attribution_keys(self, attn, like: torch.Tensor) -> torch.Tensor:
        """K' [1, L, H*d] = to_k(P' states) for this layer, computed on first use, then cached."""
        if self._keys is None or self._keys.device != like.device or self._keys.dtype != like.dtype:
            text = self.state.text_states.to(device=like.device, dtype=attn.to_k.weight.dtype)
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            keys = attn.to_k(text)
            if attn.norm_k is not None:
                keys = _per_head_norm(attn.norm_k, keys, attn.heads)
            self._keys = keys.to(like.dtype)
        return self._keys

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if not state.capturing or self.block_key not in state.capture_blocks:
            return self.original(attn, hidden_states, *args, **kwargs)
        self._query = None
        self._armed = True
        try:
            output = self.original(attn, hidden_states, *args, **kwargs)
            query = self._query
        finally:
            self._armed = False
            self._query = None
        with contextlib.nullcontext() if state.differentiable else torch.no_grad():
            if query is None:
                query = _query_like_attn_processor(attn, hidden_states, kwargs.get("temb"))
            query = query[state.rows]
            if attn.norm_q is not None:
                query = _per_head_norm(attn.norm_q, query, attn.heads)
            keys = self.attribution_keys(attn, query)
            columns = ops.attention_slice(
                query,
                keys,
                state.token_index,
                num_heads=attn.heads,
                scale=attn.scale,
                key_mask=state.key_mask,
                validate=False,  # positions come from P''s own tokens; no per-layer GPU syncs
            )  # [B, T, N]
            if state.mean_matrix is not None:
                columns = torch.einsum("ct,btn->bcn", state.mean_matrix.to(columns), columns)
            state.add(self.block_key, columns)
        if state.differentiable and state.grad_cutoff is self:
            # Nothing after this layer feeds the energy: the rest of the UNet call runs
            # without recording a graph (the caller's enable_grad context restores it).
            torch.set_grad_enabled(False)
        return output


_WRAPPER_CLASSES: dict[type, type] = {}


def capturing_processor(original, attn, block_key: str, state: CaptureState) -> CapturingProcessor:
    """A CapturingProcessor whose __call__ advertises the original processor's signature.

    diffusers' Attention.forward drops (with a warning) every cross_attention_kwarg the
    processor's __call__ does not name, so the wrapper must name the same parameters as
    the processor it wraps to pass them through unchanged.
    """
    original_type = type(original)
    wrapper_type = _WRAPPER_CLASSES.get(original_type)
    if wrapper_type is None:

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return CapturingProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

        try:
            signature = inspect.signature(original_type.__call__)
            __call__.__signature__ = signature
        except (TypeError, ValueError):  # builtins without a signature keep the generic one
            pass
        wrapper_type = type(
            f"Capturing{original_type.__name__}", (CapturingProcessor,), {"__call__": __call__}
        )
        _WRAPPER_CLASSES[original_type] = wrapper_type
    return wrapper_type(original, attn, block_key, state)
