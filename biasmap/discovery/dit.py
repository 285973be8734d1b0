"""Attribution maps for MM-DiT pipelines: SD3/SD3.5 (SD3Transformer2DModel) and Flux.1
(FluxTransformer2DModel), behind the same `biasmap.trace` / `AttributionMaps` API as UNets.

MM-DiTs have no cross-attention: in every block the image tokens and the text tokens go
through one joint attention, and the text tokens are transformed block by block. So the
keys of a block's map cannot come from the text encoder alone. Exact semantics:

- **Blocks.** SD3's blocks and Flux's double-stream blocks are named `joint-0` ...
  `joint-{n-1}`, Flux's single-stream blocks `single-0` ... `single-{m-1}`, in forward
  order. Every block has the image-token grid (latent / patch size for SD3; the packed
  2x2 latent grid, read from `img_ids`, for Flux). `blocks="default"` and `"all"` both
  take every block; a list of names takes those.
- **Image queries** of block i: the block's own `to_q` of its (AdaLN-modulated) image
  tokens, after the model's q norm and, for Flux, its rotary embedding, exactly as the
  joint attention uses them. Only the rows of the traced CFG half (SD3 batches
  [uncond, cond]; Flux has no CFG batch: its true CFG makes a second transformer call per
  step with the negative prompt, which is what `cfg_half="uncond"` reads).
- **Keys, in-prompt** (`keys="in-prompt"`; `"auto"` picks it when P''s text embeddings
  equal the generation's for the traced rows, within 1e-5 relative / 1e-6 absolute):
  the text keys of the same joint attention (`add_k_proj` in joint blocks, the text rows
  of `to_k` in single blocks), after the k norm and rotary embedding.
- **Keys, side stream** (`keys="side-stream"`; what `"auto"` picks when P' differs from
  the generation prompt): P' is encoded the way the pipeline encodes prompts (same
  encoders, same padded length) and projected by the transformer's `context_embedder`;
  that text stream then goes through every block's text-side path (its AdaLN modulation
  with the generation's conditioning vector temb, q/k/v projections and norms, rotary
  with the text positions, output projection, gate, residual and text feed-forward;
  single blocks: their shared projections, MLP and output projection). In the attention
  its queries attend to the block's image keys and values and to its own keys and
  values; the image never attends to it and the generation's text stream is untouched,
  so the generated images are bit-identical with and without the trace. The side
  stream's keys at block i give block i's map. With P' == P and the same rows, the side
  stream reproduces the generation's text stream (both attend to the same image and the
  same text), so its maps equal the in-prompt maps up to float rounding in every block;
  they differ only when the generation's text stream is not P's (another prompt per row,
  or the CFG half whose text is the negative prompt).
- **Token positions.** Concepts are looked up with the tokenizer of the text stream
  whose positions the keys hold (`text_stream`): T5 (`tokenizer_3` for SD3,
  `tokenizer_2` for Flux) or CLIP (SD3's `tokenizer`; its two CLIP encoders are
  concatenated channel-wise, so they share positions). SD3's joint text sequence is the
  77 CLIP positions followed by the T5 positions; Flux's is T5 only (its CLIP gives the
  pooled vector alone). Multi-token concepts average their sub-token columns.
- **Softmax** (`softmax_over`), per head, over:
  `"prompt"` (default, comparable with the UNet maps) the real tokens of the chosen
  stream's P' segment, from its first token through its end-of-text token, no padding;
  `"padded"` every text key of the joint sequence (both SD3 segments, padding included);
  `"joint"` the model's own joint softmax over image and text keys, sliced at the
  concept columns (for the side stream: over the image keys and P''s keys).
  The concept columns are summed over heads.
- **Accumulation.** Per block, summed over the selected steps at the grid resolution
  into [B, C, h, w] (the UNet path's `CaptureState`); nothing per step is kept, so the
  memory does not grow with the number of steps.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from .maps import AttributionMaps
from .processors import CaptureState
from .tokens import ConceptTokens, concept_positions
from .trace import CFG_HALVES, _check_map_size, _check_timesteps, _selected_steps

DIT_SOFTMAX_DOMAINS = ("prompt", "padded", "joint")
TEXT_STREAMS = ("auto", "t5", "clip")
KEY_SOURCES = ("auto", "in-prompt", "side-stream")
# P' counts as the generation prompt when its embeddings match the traced rows' this closely.
_SAME_PROMPT_RTOL, _SAME_PROMPT_ATOL = 1e-5, 1e-6
_PROJECTIONS = ("to_q", "to_k", "to_v", "add_k_proj")


def mmdit_family(pipe) -> str | None:
    """ "sd3" or "flux" when pipe.transformer is an SD3 / Flux MM-DiT, else None."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    return None


@dataclass
class DiTBlock:
    """One MM-DiT block as the trace sees it."""

    name: str  # "joint-3", "single-0"
    index: int  # forward order over all blocks
    module: torch.nn.Module
    single: bool  # Flux single-stream: text and image share every projection
    text_continues: bool  # False for SD3's last block (context_pre_only): no text output


def dit_blocks(transformer, family: str) -> list[DiTBlock]:
    """Every block of an SD3 / Flux transformer, named and in forward order."""
    blocks = [
        DiTBlock(f"joint-{i}", i, block, False, not getattr(block, "context_pre_only", False))
        for i, block in enumerate(transformer.transformer_blocks)
    ]
    if family == "flux":
        offset = len(blocks)
        blocks += [
            DiTBlock(f"single-{i}", offset + i, block, True, True)
            for i, block in enumerate(transformer.single_transformer_blocks)
        ]
    return blocks


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[R, S, H*d] -> [R, S, H, d]."""
    return x.unflatten(-1, (heads, -1))


def _rotate(x: torch.Tensor, rotary, positions: slice) -> torch.Tensor:
    """Flux's rotary embedding of x [R, S, H, d] at the joint-sequence rows `positions`."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[positions], sin[positions]), sequence_dim=1)


def _normed(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _bound_arguments(module, args, kwargs) -> dict:
    """A hooked forward call's arguments by parameter name (positional ones included)."""
    forward = module.forward
    function = getattr(forward, "__func__", None)
    if function is None:  # a plain function set on the instance: no self to drop
        signature = inspect.signature(forward)
    else:
        signature = _method_signature(function)
    return dict(signature.bind_partial(*args, **kwargs).arguments)


@functools.lru_cache(maxsize=64)
def _method_signature(function) -> inspect.Signature:
    # inspect.signature costs ~50 us a call, and the hooks bind every block call's
    # arguments; a forward method's signature without its self parameter never changes.
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return inspect.Signature(parameters)


class DiTTrace:
    """Context manager returned by `biasmap.trace` for SD3 / Flux pipelines (see dit.py)."""

    def __init__(
        self,
        pipe,
        attribution_prompt: str,
        concepts: Sequence[str],
        *,
        cfg_half: str = "cond",
        softmax_over: str = "prompt",
        blocks: str | Sequence[str] = "default",
        map_size: int | tuple[int, int] | None = None,
        timesteps=None,
        text_stream: str = "auto",
        keys: str = "auto",
    ):
        family = mmdit_family(pipe)
        if family is None:
            raise TypeError(
                "DiTTrace needs a diffusers SD3/SD3.5 or Flux.1 pipeline (its transformer an "
                f"SD3Transformer2DModel or FluxTransformer2DModel); got {type(pipe).__name__}"
            )
        for name, value, accepted in (
            ("cfg_half", cfg_half, CFG_HALVES),
            ("softmax_over", softmax_over, DIT_SOFTMAX_DOMAINS),
            ("text_stream", text_stream, TEXT_STREAMS),
            ("keys", keys, KEY_SOURCES),
        ):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")
        if not isinstance(attribution_prompt, str):
            raise TypeError(
                f"attribution_prompt must be one string, got {type(attribution_prompt).__name__}"
            )
        _check_timesteps(timesteps)
        self.pipe = pipe
        self.family = family
        self.attribution_prompt = attribution_prompt
        self.cfg_half = cfg_half
        self.softmax_over = softmax_over
        self.timesteps = timesteps
        self.map_size = _check_map_size(map_size)
        self.keys_option = keys
        self.text_stream = self._resolve_stream(text_stream)
        self._blocks = dit_blocks(pipe.transformer, family)
        names = [b.name for b in self._blocks]
        if isinstance(blocks, str):
            if blocks not in ("default", "all"):
                raise ValueError(
                    "blocks must be 'default' (every block), 'all', or a list of block names "
                    f"such as ['joint-0', 'single-1']; got {blocks!r}"
                )
            wanted = names
        else:
            wanted = list(blocks)
            unknown = [n for n in wanted if n not in names]
            if unknown or not wanted:
                raise ValueError(
                    f"unknown block name(s) {unknown or wanted}; this transformer's blocks are "
                    f"{names}"
                )
        self.blocks_option = blocks if isinstance(blocks, str) else list(blocks)
        self._selected_names = [n for n in names if n in wanted]  # forward order
        # The side stream is needed up to this block, and only for its keys there.
        self._last_selected = max(b.index for b in self._blocks if b.name in wanted)
        # Checked now, so that a missing concept fails before any generation; the stream's
        # length is known only at the first transformer call (_start_generation re-checks).
        self.tokens: ConceptTokens = concept_positions(
            self._tokenizer, attribution_prompt, concepts
        )
        self.concepts = list(self.tokens.concepts)
        self._state: CaptureState | None = None
        self._handles: list = []
        self._entered = False
        self._encoded: dict[int, torch.Tensor] = {}  # P''s encoder states per text length
        self._reset_generation()

    # ------------------------------------------------------------------ configuration

    def _resolve_stream(self, text_stream: str) -> str:
        pipe = self.pipe
        if self.family == "flux":
            if text_stream == "clip":
                raise ValueError(
                    "Flux's CLIP encoder gives only the pooled vector; its token stream is T5: "
                    "use text_stream='t5' (or 'auto')"
                )
            return "t5"
        has_t5 = getattr(pipe, "text_encoder_3", None) is not None
        if text_stream == "t5" and not has_t5:
            raise ValueError(
                "this SD3 pipeline has no T5 encoder (text_encoder_3 is None; its T5 positions "
                "are zeros): use text_stream='clip' (or 'auto')"
            )
        if text_stream == "auto":
            return "t5" if has_t5 else "clip"
        return text_stream

    @property
    def _tokenizer(self):
        """The tokenizer of the traced text stream, as the pipeline holds it."""
        if self.family == "flux":
            return self.pipe.tokenizer_2
        return self.pipe.tokenizer_3 if self.text_stream == "t5" else self.pipe.tokenizer

    def _segment(self, text_length: int) -> tuple[int, int]:
        """(first position, length) of the traced stream inside the joint text sequence."""
        if self.family == "flux":
            return 0, text_length
        clip_length = int(self.pipe.tokenizer_max_length)
        if self.text_stream == "clip":
            return 0, clip_length
        return clip_length, text_length - clip_length

    # ------------------------------------------------------------------ setup / teardown

    def __enter__(self) -> DiTTrace:
        if self._entered:
            raise RuntimeError(
                "this trace is already active; create a new biasmap.trace(...) per with-block"
            )
        self._entered = True
        try:
            transformer = self.pipe.transformer
            self._handles.append(
                transformer.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True)
            )
            self._handles.append(transformer.register_forward_hook(self._after_transformer_call))
            for block in self._blocks:
                module = block.module
                self._handles.append(
                    module.register_forward_pre_hook(
                        functools.partial(self._before_block, block), with_kwargs=True
                    )
                )
                self._handles.append(
                    module.register_forward_hook(
                        functools.partial(self._after_block, block), with_kwargs=True
                    )
                )
                for name in _PROJECTIONS:
                    projection = getattr(module.attn, name, None)
                    if projection is not None:
                        self._handles.append(
                            projection.register_forward_hook(
                                functools.partial(self._keep_projection, block, name)
                            )
                        )
        except BaseException:
            self._restore()
            raise
        return self

    def _after_transformer_call(self, module, args, output) -> None:
        """Add this call's captured block maps into the generation's running sums (the
        blocks' hooks write each call's maps apart: biasmap.discovery.processors)."""
        if self._state is not None:
            self._state.commit_step(self._state.pop_step())

    def _restore(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
        self._capturing = False
        self._entered = False

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False

    # ------------------------------------------------------------------ per transformer call

    def _reset_generation(self) -> None:
        self._shape = None
        self._num_steps = 0
        self._step = -1
        self._call = 0
        self._last_timestep = None
        self._selected: set[int] = set()
        self._steps_captured = 0
        self._capturing = False
        self._mode: str | None = None  # "in-prompt" / "side-stream", fixed per generation
        self._rows = slice(None)
        self._wanted_call = 0
        self._grid = (0, 0)
        self._side0: torch.Tensor | None = None
        self._side: torch.Tensor | None = None
        self._armed: DiTBlock | None = None
        self._projections: dict[str, torch.Tensor] = {}
        self._block_inputs: dict = {}

    def _encode_attribution_prompt(self, text_length: int) -> torch.Tensor:
        """P''s encoder states [1, L, joint_dim], encoded as the pipeline encodes prompts,
        padded to the generation's text length L (T5 is bidirectional: padding matters)."""
        if text_length in self._encoded:
            return self._encoded[text_length]
        pipe, prompt = self.pipe, self.attribution_prompt
        device = pipe._execution_device
        with torch.no_grad():
            if self.family == "sd3":
                t5_length = text_length - int(pipe.tokenizer_max_length)
                states = pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt,
                    prompt_3=prompt,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                    max_sequence_length=t5_length,
                )[0]
            else:
                states = pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt,
                    device=device,
                    num_images_per_prompt=1,
                    max_sequence_length=text_length,
                )[0]
        if states.shape[1] != text_length:
            raise ValueError(
                f"the pipeline encoded the attribution prompt to {states.shape[1]} positions, "
                f"but the generation's text stream has {text_length}"
            )
        self._encoded[text_length] = states
        return states

    def _uses_cfg_batch(self) -> bool:
        if self.family == "flux":
            return False
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        return float(getattr(self.pipe, "_guidance_scale", 1.0)) > 1.0

    def _start_generation(self, hidden, text, arguments) -> None:
        self._reset_generation()
        self._state = None
        batch = hidden.shape[0]
        self._shape = (tuple(hidden.shape), tuple(text.shape))
        if self.family == "sd3":
            if self._uses_cfg_batch():
                if batch % 2:
                    raise RuntimeError(
                        f"classifier-free guidance is on but the transformer batch {batch} is odd"
                    )
                half = batch // 2
                # SD3 batches the CFG halves as [unconditional, conditional].
                self._rows = slice(half, batch) if self.cfg_half == "cond" else slice(0, half)
            elif self.cfg_half == "uncond":
                raise ValueError(
                    "cfg_half='uncond' needs classifier-free guidance (guidance_scale > 1), but "
                    "this generation runs without it; use cfg_half='cond'"
                )
        else:
            # Flux's true CFG calls the transformer a second time per step, with the negative
            # prompt: that call is the unconditional "half".
            self._wanted_call = 0 if self.cfg_half == "cond" else 1
        self._configure_layout(hidden, text, arguments)
        self._num_steps = int(
            getattr(self.pipe, "_num_timesteps", 0) or len(self.pipe.scheduler.timesteps)
        )
        self._selected = _selected_steps(self.timesteps, self._num_steps)

    def _configure_layout(self, hidden, text, arguments) -> None:
        """Grid, concept positions and softmax domain for this call's shapes, into the
        capture state (created here on a generation's first call)."""
        if self.family == "sd3":
            patch = int(self.pipe.transformer.config.patch_size)
            self._grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        else:
            image_ids = arguments.get("img_ids")
            if image_ids is None:
                raise RuntimeError("the Flux transformer was called without img_ids")
            image_ids = image_ids.reshape(-1, image_ids.shape[-1])
            self._grid = (int(image_ids[:, 1].max()) + 1, int(image_ids[:, 2].max()) + 1)
            if self._grid[0] * self._grid[1] != hidden.shape[1]:
                raise RuntimeError(
                    f"img_ids describe a {self._grid[0]}x{self._grid[1]} grid but the "
                    f"transformer got {hidden.shape[1]} image tokens"
                )
        text_length = text.shape[1]
        start, length = self._segment(text_length)
        tokens = concept_positions(
            self._tokenizer, self.attribution_prompt, self.concepts, max_length=length
        )
        self.tokens = tokens
        device = hidden.device
        token_index = tokens.token_index(device) + start
        key_mask = None
        if self.softmax_over == "prompt":
            key_mask = torch.zeros(1, text_length, dtype=torch.bool, device=device)
            key_mask[:, start : start + tokens.num_real_tokens] = True
        mean_matrix = None
        if any(len(p) > 1 for p in tokens.positions):
            mean_matrix = tokens.mean_matrix(device=device)
        block_sizes = {block.name: self._grid for block in self._blocks}
        if self._state is None:
            self._state = CaptureState(
                token_index=token_index,
                mean_matrix=mean_matrix,
                key_mask=key_mask,
                text_states=text.new_zeros(0),
                capture_blocks=set(self._selected_names),
                block_sizes=block_sizes,
            )
        else:
            state = self._state
            state.token_index, state.mean_matrix = token_index, mean_matrix
            state.key_mask, state.block_sizes = key_mask, block_sizes

    def _choose_mode(self, text_rows: torch.Tensor) -> None:
        """In-prompt or side stream for this generation (see the module docstring)."""
        if self.keys_option == "side-stream":
            self._mode = "side-stream"
        else:
            encoded = self._encode_attribution_prompt(text_rows.shape[1]).to(text_rows)
            same = torch.allclose(
                text_rows, encoded.expand_as(text_rows), _SAME_PROMPT_RTOL, _SAME_PROMPT_ATOL
            )
            if self.keys_option == "in-prompt" and not same:
                raise ValueError(
                    "keys='in-prompt' reads the generation's own text keys, so the attribution "
                    f"prompt {self.attribution_prompt!r} must be the generation prompt of the "
                    f"traced {self.cfg_half} rows, and it is not; use keys='side-stream' or "
                    "'auto' for an attribution prompt that differs"
                )
            self._mode = "in-prompt" if same else "side-stream"
        if self._mode == "side-stream":
            encoded = self._encode_attribution_prompt(text_rows.shape[1])
            transformer = self.pipe.transformer
            with torch.no_grad():
                weight = transformer.context_embedder.weight
                self._side0 = transformer.context_embedder(
                    encoded.to(device=weight.device, dtype=weight.dtype)
                )

    def _on_transformer_call(self, module, args, kwargs) -> None:
        arguments = _bound_arguments(module, args, kwargs)
        hidden = arguments["hidden_states"]
        text = arguments["encoder_hidden_states"]
        timestep = arguments["timestep"]
        # One sampler step may call the transformer more than once (Flux's true CFG, SD3's
        # skip-layer guidance); a step starts where the timestep changes.
        value = float(timestep.reshape(-1)[0])
        new_step = value != self._last_timestep
        shape = (tuple(hidden.shape), tuple(text.shape))
        if shape != self._shape or (new_step and self._step + 1 >= self._num_steps):
            self._start_generation(hidden, text, arguments)
            new_step = True
        if new_step:
            self._step += 1
            self._call = 0
        else:
            self._call += 1
        self._last_timestep = value
        self._capturing = self._step in self._selected and self._call == self._wanted_call
        if not self._capturing:
            return
        if self._mode is None:
            self._choose_mode(text[self._rows])
        self._steps_captured += 1
        if self._mode == "side-stream":
            rows = hidden[self._rows].shape[0]
            self._side = self._side0.expand(rows, -1, -1)

    # ------------------------------------------------------------------ per block

    def _needs(self, block: DiTBlock) -> bool:
        """Whether this block takes part in the current call: it is captured, or the side
        stream must pass through it to reach a captured block."""
        if not self._capturing:
            return False
        if block.name in self._state.capture_blocks:
            return True
        if self._mode != "side-stream":
            return False
        return block.index < self._last_selected

    def _keep_projection(self, block: DiTBlock, name: str, module, inputs, output) -> None:
        if self._armed is block:
            self._projections[name] = output

    def _before_block(self, block: DiTBlock, module, args, kwargs) -> None:
        if not self._needs(block):
            return
        arguments = _bound_arguments(module, args, kwargs)
        self._block_inputs = {
            "temb": arguments["temb"],
            "rotary": arguments.get("image_rotary_emb"),
            "text_length": arguments["encoder_hidden_states"].shape[1],
        }
        self._projections = {}
        self._armed = block

    def _after_block(self, block: DiTBlock, module, args, kwargs, output) -> None:
        if self._armed is not block:
            return
        self._armed = None
        projections, self._projections = self._projections, {}
        if "to_q" not in projections:
            raise RuntimeError(
                f"{block.name}'s attention did not call its separate q/k/v projections; fused "
                "projections are not supported: call transformer.unfuse_qkv_projections()"
            )
        state = self._state
        inputs = self._block_inputs
        attn = module.attn
        rows = self._rows
        text_length = inputs["text_length"]
        rotary = inputs["rotary"]
        text_rows, image_rows = slice(0, text_length), slice(text_length, None)

        def image_part(name: str) -> torch.Tensor:
            x = projections[name][rows]
            return x[:, text_length:] if block.single else x

        # Guided sampling differentiates E(z_t) exactly: the keys depend on z_t too (the
        # text stream, and the side stream, attend to the image in every earlier block).
        grad = contextlib.nullcontext() if state.differentiable else torch.no_grad()
        with grad:
            image_keys = _rotate(
                _normed(attn.norm_k, _heads(image_part("to_k"), attn.heads)), rotary, image_rows
            )
            side_keys = None
            if self._mode == "side-stream":
                side_keys = self._advance_side(block, module, image_keys, image_part, inputs)
        if block.name not in state.capture_blocks:
            return
        with grad:
            queries = _rotate(
                _normed(attn.norm_q, _heads(image_part("to_q"), attn.heads)), rotary, image_rows
            ).flatten(2)
            if side_keys is not None:
                text_keys = side_keys
            elif block.single:
                text_keys = _rotate(
                    _normed(
                        attn.norm_k, _heads(projections["to_k"][rows][:, :text_length], attn.heads)
                    ),
                    rotary,
                    text_rows,
                )
            else:
                text_keys = _rotate(
                    _normed(attn.norm_added_k, _heads(projections["add_k_proj"][rows], attn.heads)),
                    rotary,
                    text_rows,
                )
            token_index, key_mask = state.token_index, state.key_mask
            if self.softmax_over == "joint":
                text_keys = torch.cat([image_keys, text_keys], dim=1)
                token_index = token_index + image_keys.shape[1]
                key_mask = None
            text_keys = text_keys.flatten(2).to(queries.dtype)
            columns = ops.attention_slice(
                queries,
                text_keys,
                token_index,
                num_heads=attn.heads,
                # The joint attention runs SDPA with its default scale, 1/sqrt(head_dim).
                scale=(queries.shape[-1] // attn.heads) ** -0.5,
                key_mask=key_mask,
                validate=False,
            )  # [R, T, N]
            if state.mean_matrix is not None:
                columns = torch.einsum("ct,btn->bcn", state.mean_matrix.to(columns), columns)
            state.add(block.name, columns)
        if state.differentiable and block.name == self._selected_names[-1]:
            # No later block feeds the energy: the rest of the call records no graph (the
            # caller restores grad mode afterwards).
            torch.set_grad_enabled(False)

    def _advance_side(self, block, module, image_keys, image_part, inputs) -> torch.Tensor:
        """This block's keys of the side stream [R, L, H, d]; moves the stream past the block.

        The side stream's queries attend to the block's image keys/values and to its own;
        nothing of it enters the generation's tensors.
        """
        attn = module.attn
        side = self._side
        temb = inputs["temb"][self._rows]
        rotary = inputs["rotary"]
        text_rows = slice(0, side.shape[1])
        if block.single:
            normed, gate = module.norm(side, emb=temb)
            q_proj, k_proj, v_proj = attn.to_q, attn.to_k, attn.to_v
            q_norm, k_norm = attn.norm_q, attn.norm_k
        else:
            if block.text_continues:
                normed, gate, shift_mlp, scale_mlp, gate_mlp = module.norm1_context(side, emb=temb)
            else:
                normed = module.norm1_context(side, temb)
            q_proj, k_proj, v_proj = attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            q_norm, k_norm = attn.norm_added_q, attn.norm_added_k
        keys = _rotate(_normed(k_norm, _heads(k_proj(normed), attn.heads)), rotary, text_rows)
        if not block.text_continues or block.index == self._last_selected:
            # No later block reads the stream: its keys here are all that is needed.
            self._side = None
            return keys
        queries = _rotate(_normed(q_norm, _heads(q_proj(normed), attn.heads)), rotary, text_rows)
        values = _heads(v_proj(normed), attn.heads)
        image_values = _heads(image_part("to_v"), attn.heads)
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            torch.cat([image_keys, keys], dim=1).transpose(1, 2),
            torch.cat([image_values, values], dim=1).transpose(1, 2),
        )
        attended = attended.transpose(1, 2).flatten(2).to(side.dtype)  # [R, L, H*d]
        if block.single:
            mlp = module.act_mlp(module.proj_mlp(normed))
            side = side + gate.unsqueeze(1) * module.proj_out(torch.cat([attended, mlp], dim=2))
        else:
            side = side + gate.unsqueeze(1) * attn.to_add_out(attended)
            normed = module.norm2_context(side) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            side = side + gate_mlp.unsqueeze(1) * module.ff_context(normed)
        if side.dtype == torch.float16:  # as the blocks do for their own streams
            side = side.clip(-65504, 65504)
        self._side = side
        return keys

    # ------------------------------------------------------------------ results

    @property
    def captured_bytes(self) -> int:
        """Bytes of the running block sums (the only per-image state that lives across steps)."""
        if self._state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._state.sums.values())

    @property
    def block_names(self) -> list[str]:
        """Every block's name in forward order (`joint-*`, then Flux's `single-*`)."""
        return [b.name for b in self._blocks]

    def maps(
        self, size: tuple[int, int] | None = None, aggregation: str = "one-stage"
    ) -> AttributionMaps:
        """Attribution maps of the latest generation ([B, C, S_h, S_w] tensors).

        size: (S_h, S_w); None takes map_size, else the image-token grid (h, w) itself, at
        which the block maps are the raw sums. aggregation: as `Trace.maps`.
        """
        state = self._state
        if state is None or not state.sums:
            hint = ""
            if self.family == "flux" and self.cfg_half == "uncond":
                hint = (
                    "; on Flux cfg_half='uncond' reads the negative-prompt call of true CFG "
                    "(true_cfg_scale > 1 with a negative_prompt)"
                )
            raise RuntimeError(
                "no maps were captured: call the pipeline inside the `with biasmap.trace(...)` "
                f"block (and check that `timesteps` selects at least one step){hint}"
            )
        names = [n for n in self._selected_names if n in state.sums]
        size = size or self.map_size or self._grid
        return AttributionMaps.from_block_sums(
            {name: state.sums[name] for name in names},
            size,
            concepts=self.concepts,
            aggregation=aggregation,
            meta={
                "architecture": self.family,
                "attribution_prompt": self.attribution_prompt,
                "text_stream": self.text_stream,
                "keys": self._mode,
                "prompt_tokens": [t.replace("</w>", "") for t in self.tokens.prompt_tokens],
                "concept_positions": [list(p) for p in self.tokens.positions],
                "cfg_half": self.cfg_half,
                "softmax_over": self.softmax_over,
                "grid": list(self._grid),
                "steps": sorted(self._selected),
                "num_steps": self._num_steps,
                "steps_captured": self._steps_captured,
                "layers_per_block": {name: state.layer_calls.get(name, 0) for name in names},
            },
        )
