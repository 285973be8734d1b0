"""`biasmap.trace`: capture open-vocabulary attribution maps while a diffusers pipeline generates.

    with biasmap.trace(pipe, "A photo of the face of a firefighter and gender",
                       ["gender", "firefighter"]) as tr:
        images = pipe("A photo of the face of a firefighter", num_inference_steps=50).images
    maps = tr.maps()             # AttributionMaps: .aggregate [B, 2, 64, 64], .blocks, .iou(...)

How (DESIGN.md section 2): on entry the attribution prompt P' is encoded once with the
pipeline's own text encoder(s) and every attn2 layer gets a CapturingProcessor; each
UNet call (one per sampler step) updates the shared state: which CFG half's rows to
read, the maps' sizes for the current latent, whether the step is selected. On exit,
normal or by exception, the original processors and no hooks remain.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .maps import AttributionMaps
from .processors import BlockInfo, CaptureState, capturing_processor
from .tokens import ConceptTokens, concept_positions

CFG_HALVES = ("cond", "uncond")
SOFTMAX_DOMAINS = ("prompt", "padded")
_BLOCK_KEY = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.")


def _halved(size: int, times: int) -> int:
    """Side after `times` stride-2, padding-1 downsamplings (each gives ceil(size / 2))."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def _unet_blocks(unet) -> dict[str, BlockInfo]:
    """Every UNet stage, keyed "down_blocks.i" / "mid_block" / "up_blocks.i", with its depth."""
    blocks: dict[str, BlockInfo] = {}
    depth = 0
    for index, block in enumerate(unet.down_blocks):
        blocks[f"down_blocks.{index}"] = BlockInfo(f"down_blocks.{index}", "down", depth)
        depth += getattr(block, "downsamplers", None) is not None
    if getattr(unet, "mid_block", None) is not None:
        blocks["mid_block"] = BlockInfo("mid_block", "mid", depth)
    for index, block in enumerate(unet.up_blocks):
        blocks[f"up_blocks.{index}"] = BlockInfo(f"up_blocks.{index}", "up", depth)
        depth -= getattr(block, "upsamplers", None) is not None
    return blocks


def _cross_attention_layers(unet) -> list[tuple[str, object]]:
    """(block key, Attention module) of every attn2 (cross-attention) layer."""
    from diffusers.models.attention_processor import Attention

    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2":
            match = _BLOCK_KEY.match(name)
            if match is None:
                raise ValueError(
                    f"cross-attention layer {name!r} is outside down_blocks, mid_block and "
                    "up_blocks; "
                    "biasmap.trace supports UNet2DConditionModel pipelines (SD1.x, SD2.x, SDXL)"
                )
            layers.append((match.group(1), module))
    if not layers:
        raise ValueError(
            "the pipeline's UNet has no cross-attention (attn2) layers; biasmap.trace needs a "
            "text-conditioned UNet2DConditionModel (SD1.x, SD2.x, SDXL)"
        )
    return layers


def _block_names(blocks: Sequence[BlockInfo], height: int, width: int) -> dict[str, str]:
    """Display name per block key: stage and map resolution, e.g. "down-64", "up-32x48".

    Two stages with the same name (only in unusual UNets) get their block index added,
    "down1-32", so that block names stay unique.
    """
    names = {}
    for info in blocks:
        h, w = _halved(height, info.halvings), _halved(width, info.halvings)
        names[info.key] = f"{info.stage}-{h}" if h == w else f"{info.stage}-{h}x{w}"
    taken = list(names.values())
    for key, name in names.items():
        if taken.count(name) > 1:
            stage, resolution = name.split("-", 1)
            names[key] = f"{stage}{key.rsplit('.', 1)[-1] if '.' in key else ''}-{resolution}"
    return names


def cross_attention_block_names(
    unet_config: Mapping[str, Any], latent_height: int, latent_width: int
) -> list[str]:
    """The block names (as `blocks=` takes them) of a UNet2DConditionModel with this
    config.json at a latent of latent_height x latent_width, without building the UNet.

    Follows UNet2DConditionModel: every down block but the last halves the latent, every up
    block but the last doubles it, and the blocks whose type holds "CrossAttn" hold attn2.
    """
    down = list(unet_config.get("down_block_types", ()))
    up = list(unet_config.get("up_block_types", ()))
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    blocks, depth = [], 0
    for index, kind in enumerate(down):
        if "CrossAttn" in kind:
            blocks.append(BlockInfo(f"down_blocks.{index}", "down", depth))
        depth += index < len(down) - 1
    if mid and "CrossAttn" in mid:
        blocks.append(BlockInfo("mid_block", "mid", depth))
    for index, kind in enumerate(up):
        if "CrossAttn" in kind:
            blocks.append(BlockInfo(f"up_blocks.{index}", "up", depth))
        depth -= index < len(up) - 1
    return list(_block_names(blocks, latent_height, latent_width).values())


def _selected_steps(timesteps, num_steps: int) -> set[int]:
    """Step indices (0 = first sampler step) chosen by the `timesteps` option."""
    all_steps = range(num_steps)
    if timesteps is None:
        chosen = list(all_steps)
    elif isinstance(timesteps, float):
        # First fraction of the steps, at least one.
        chosen = list(all_steps[: max(1, math.ceil(timesteps * num_steps - 1e-9))])
    elif (
        isinstance(timesteps, tuple)
        and len(timesteps) == 2
        and all(isinstance(t, float) for t in timesteps)
    ):
        start, stop = timesteps
        chosen = [i for i in all_steps if start * num_steps <= i < stop * num_steps]
    elif isinstance(timesteps, slice):
        chosen = list(all_steps[timesteps])
    else:
        chosen = []
        for step in timesteps:
            if not -num_steps <= step < num_steps:
                raise ValueError(
                    f"timesteps selects step {step}, but this generation has {num_steps} steps "
                    f"(valid indices: 0..{num_steps - 1}, or negative from the end)"
                )
            chosen.append(step % num_steps)
    if not chosen:
        raise ValueError(
            f"timesteps={timesteps!r} selects none of this generation's {num_steps} steps"
        )
    return set(chosen)


def _check_timesteps(timesteps) -> None:
    if timesteps is None or isinstance(timesteps, slice):
        return
    if isinstance(timesteps, float):
        if not 0.0 < timesteps <= 1.0:
            raise ValueError(
                f"a float timesteps is the fraction of first steps, in (0, 1]; got {timesteps}"
            )
        return
    if (
        isinstance(timesteps, tuple)
        and len(timesteps) == 2
        and all(isinstance(t, float) for t in timesteps)
    ):
        if not 0.0 <= timesteps[0] < timesteps[1] <= 1.0:
            raise ValueError(
                f"a (start, stop) fraction pair needs 0 <= start < stop <= 1; got {timesteps}"
            )
        return
    if isinstance(timesteps, Sequence | range) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in timesteps
    ):
        return
    raise TypeError(
        "timesteps must be None (all steps), a float in (0, 1] (that first fraction of the steps), "
        "a (start, stop) pair of fractions, a slice, a range or a list of step indices; "
        f"got {timesteps!r}"
    )


def _check_map_size(map_size) -> tuple[int, int] | None:
    if map_size is None:
        return None
    if isinstance(map_size, int) and not isinstance(map_size, bool) and map_size > 0:
        return (map_size, map_size)
    if (
        isinstance(map_size, Sequence)
        and len(map_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in map_size)
    ):
        return (int(map_size[0]), int(map_size[1]))
    raise ValueError(
        "map_size must be None (largest attention resolution), an int S or (S_h, S_w); "
        f"got {map_size!r}"
    )


class Trace:
    """Context manager returned by `biasmap.trace`; see that function."""

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
        compile: bool = False,
    ):
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if cfg_half not in CFG_HALVES:
            raise ValueError(f"cfg_half must be one of {list(CFG_HALVES)}, got {cfg_half!r}")
        if softmax_over not in SOFTMAX_DOMAINS:
            raise ValueError(
                f"softmax_over must be one of {list(SOFTMAX_DOMAINS)}, got {softmax_over!r}"
            )
        if isinstance(blocks, str) and blocks not in ("default", "all"):
            raise ValueError(
                f"blocks must be 'default' (all but mid), 'all', or a list of block names such as "
                f"['down-64', 'up-64']; got {blocks!r}"
            )
        if not isinstance(attribution_prompt, str):
            raise TypeError(
                f"attribution_prompt must be one string, got {type(attribution_prompt).__name__}"
            )
        for component in ("unet", "tokenizer", "encode_prompt"):
            if not hasattr(pipe, component):
                raise TypeError(
                    f"biasmap.trace needs a diffusers Stable Diffusion (1.x, 2.x, XL, 3) or Flux "
                    "pipeline; "
                    f"{type(pipe).__name__} has no {component!r}"
                )
        _check_timesteps(timesteps)
        self.pipe = pipe
        self.attribution_prompt = attribution_prompt
        self.cfg_half = cfg_half
        self.softmax_over = softmax_over
        self.blocks_option = blocks if isinstance(blocks, str) else list(blocks)
        self.map_size = _check_map_size(map_size)
        self.timesteps = timesteps
        self.tokens: ConceptTokens = concept_positions(pipe.tokenizer, attribution_prompt, concepts)
        self.concepts = list(self.tokens.concepts)
        self._layers = _cross_attention_layers(pipe.unet)
        all_blocks = _unet_blocks(pipe.unet)
        # Forward order (down, mid, up); named_modules lists mid_block after up_blocks.
        layer_blocks = {key for key, _ in self._layers}
        self._blocks = [info for key, info in all_blocks.items() if key in layer_blocks]
        self._state: CaptureState | None = None
        self._originals: list[tuple[object, object]] = []
        self._processors = []
        self._unet_hook = None
        self._unet_post_hook = None
        self._compile = compile
        self._device = None  # the execution device when the caller knows it (guided sampling)
        self._entered = False
        # Per generation: names of the captured blocks, step counter, steps captured.
        self._names: dict[str, str] = {}
        self._step = -1
        self._num_steps = 0
        self._selected: set[int] = set()
        self._batch_shape = None
        self._steps_captured = 0

    # ------------------------------------------------------------------ setup / teardown

    def _encode_attribution_prompt(self, device: torch.device) -> torch.Tensor:
        """P''s encoder hidden states [1, L, D], encoded as the pipeline encodes prompts.

        With softmax_over="prompt" only P''s real tokens (start- through end-of-text) take
        part in the softmax, and CLIP text encoders are causal: a position's hidden state
        never depends on the padding after it. So we encode just those L = num_real_tokens
        positions (the tokenizers pad to L for the duration of the call) and the keys have
        no padding to mask: the same maps, for a fraction of the text encoder's and the
        slice's cost. "padded" encodes all 77 positions.
        """
        length = (
            self.tokens.num_real_tokens if self.softmax_over == "prompt" else self.tokens.num_keys
        )
        tokenizers = [
            t
            for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))
            if t is not None
        ]
        saved = [t.model_max_length for t in tokenizers]
        try:
            for tokenizer in tokenizers:
                tokenizer.model_max_length = length
            with torch.no_grad():
                encoded = self.pipe.encode_prompt(
                    prompt=self.attribution_prompt,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )
        finally:
            for tokenizer, max_length in zip(tokenizers, saved, strict=True):
                tokenizer.model_max_length = max_length
        # SD returns (embeds, negative); SDXL (embeds, negative, pooled, negative pooled):
        # the per-token embeds are first in both and are SDXL's concatenated penultimate states.
        states = encoded[0]
        if states.shape[1] != length:
            raise ValueError(
                f"the text encoder returned {states.shape[1]} positions for the attribution "
                "prompt, "
                f"expected {length}"
            )
        return states

    def __enter__(self) -> Trace:
        if self._entered:
            raise RuntimeError(
                "this trace is already active; create a new biasmap.trace(...) per with-block"
            )
        # At most one read: diffusers' _execution_device walks every module's hooks (16 ms on
        # the tiny pipeline on this CPU, more on SD1.5).
        device = self._device if self._device is not None else self.pipe._execution_device
        mean_matrix = None
        if any(len(p) > 1 for p in self.tokens.positions):
            mean_matrix = self.tokens.mean_matrix(device=device)
        self._state = CaptureState(
            token_index=self.tokens.token_index(device),
            mean_matrix=mean_matrix,
            # The keys hold exactly the softmax domain (see _encode_attribution_prompt): no mask.
            key_mask=None,
            text_states=self._encode_attribution_prompt(device),
            layers_per_block=dict(Counter(key for key, _ in self._layers)),
        )
        self._entered = True
        try:
            for block_key, attn in self._layers:
                original = attn.processor
                processor = capturing_processor(original, attn, block_key, self._state)
                self._processors.append(processor)
                self._originals.append((attn, original))
                attn.set_processor(processor)
            self._unet_hook = self.pipe.unet.register_forward_pre_hook(
                self._on_unet_call, with_kwargs=True
            )
            self._unet_post_hook = self.pipe.unet.register_forward_hook(self._after_unet_call)
            if self._compile:
                # Only forward is compiled (an instance attribute, removed on exit): the
                # hooks above keep the step count and the running sums eagerly, so the
                # compiled code sees the same state at every step and compiles once per
                # capturing / non-capturing call.
                from ..mitigation.compiled import compiled_forward

                self.pipe.unet.forward = compiled_forward(self.pipe.unet)
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for attn, original in reversed(self._originals):
            attn.set_processor(original)
        for processor in self._processors:
            processor.remove_hook()
        if self._unet_hook is not None:
            self._unet_hook.remove()
        if self._unet_post_hook is not None:
            self._unet_post_hook.remove()
        if "forward" in vars(self.pipe.unet):  # the compiled forward of compile=True
            del self.pipe.unet.forward
        self._originals, self._processors, self._unet_hook = [], [], None
        self._unet_post_hook = None
        if self._state is not None:
            self._state.capturing = False
        self._entered = False

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False  # never swallow the caller's exception

    # ------------------------------------------------------------------ per UNet call

    def _uses_cfg(self) -> bool:
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        return float(getattr(self.pipe, "_guidance_scale", 1.0)) > 1.0

    def _start_generation(self, sample: torch.Tensor) -> None:
        state = self._state
        batch, _, height, width = sample.shape
        cfg = self._uses_cfg()
        if cfg:
            if batch % 2:
                raise RuntimeError(
                    f"classifier-free guidance is on but the UNet batch {batch} is odd"
                )
            num_images = batch // 2
            # diffusers batches the CFG halves as [unconditional, conditional].
            state.rows = (
                slice(num_images, batch) if self.cfg_half == "cond" else slice(0, num_images)
            )
        else:
            if self.cfg_half == "uncond":
                raise ValueError(
                    "cfg_half='uncond' needs classifier-free guidance (guidance_scale > 1), but "
                    "this generation runs without it, so there is no unconditional half; use "
                    "cfg_half='cond'"
                )
            num_images = batch
            state.rows = slice(None)
        state.num_images = num_images
        self._configure_blocks(height, width)
        state.sums = {}
        state.layer_calls = {}
        self._num_steps = int(
            getattr(self.pipe, "_num_timesteps", 0) or len(self.pipe.scheduler.timesteps)
        )
        self._selected = _selected_steps(self.timesteps, self._num_steps)
        self._batch_shape = tuple(sample.shape)
        self._steps_captured = 0
        self._step = -1

    def _configure_blocks(self, height: int, width: int) -> None:
        """Name the blocks for a latent of height x width and choose the captured ones."""
        state = self._state
        names = _block_names(self._blocks, height, width)
        if self.blocks_option == "all":
            wanted = list(names)
        elif self.blocks_option == "default":
            wanted = [key for key in names if not key.startswith("mid")]
        else:
            by_name = {name: key for key, name in names.items()}
            unknown = [name for name in self.blocks_option if name not in by_name]
            if unknown:
                raise ValueError(
                    f"unknown block name(s) {unknown}; at this latent size ({height}x{width}) the "
                    f"cross-attention blocks are {list(by_name)}"
                )
            wanted = [by_name[name] for name in self.blocks_option]
        if not wanted:
            raise ValueError(
                f"blocks={self.blocks_option!r} selects no cross-attention block of "
                f"{list(names.values())}"
            )
        state.capture_blocks = set(wanted)
        self._names = {key: names[key] for key in names if key in state.capture_blocks}
        state.block_sizes = {
            info.key: (_halved(height, info.halvings), _halved(width, info.halvings))
            for info in self._blocks
        }

    def _on_unet_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        # A new pipeline call starts when the previous one used up its steps, or when the
        # latent batch changes shape; maps() then describes the latest generation.
        if self._batch_shape != tuple(sample.shape) or self._step + 1 >= self._num_steps:
            self._start_generation(sample)
        self._step += 1
        self._state.capturing = self._step in self._selected
        self._steps_captured += self._state.capturing

    def _after_unet_call(self, module, args, output) -> None:
        """Add this call's captured block maps into the generation's running sums."""
        self._state.commit_step(self._state.pop_step())

    # ------------------------------------------------------------------ results

    @property
    def captured_bytes(self) -> int:
        """Bytes of the running block sums (the only per-image state that lives across steps)."""
        if self._state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._state.sums.values())

    def maps(
        self, size: tuple[int, int] | None = None, aggregation: str = "one-stage"
    ) -> AttributionMaps:
        """Attribution maps of the latest generation ([B, C, S_h, S_w] tensors).

        size: (S_h, S_w) of the maps; None takes map_size, else the largest captured block's
        resolution. aggregation: "one-stage" (paper Eq. 2) or "two-stage" (OVAM: the blocks are
        summed at the largest captured resolution, then that sum is resized to `size`); see
        `biasmap.discovery.maps.aggregate_blocks`. Block maps are always resized straight to
        `size`.
        """
        state = self._state
        if state is None or not state.sums:
            raise RuntimeError(
                "no maps were captured: call the pipeline inside the `with biasmap.trace(...)` "
                "block "
                "(and check that `timesteps` selects at least one step)"
            )
        keys = [key for key in self._names if key in state.sums]
        largest = max(keys, key=lambda key: state.block_sizes[key][0] * state.block_sizes[key][1])
        size = size or self.map_size or state.block_sizes[largest]
        return AttributionMaps.from_block_sums(
            {self._names[key]: state.sums[key] for key in keys},
            size,
            concepts=self.concepts,
            aggregation=aggregation,
            meta={
                "attribution_prompt": self.attribution_prompt,
                "prompt_tokens": [t.replace("</w>", "") for t in self.tokens.prompt_tokens],
                "concept_positions": [list(p) for p in self.tokens.positions],
                "cfg_half": self.cfg_half,
                "softmax_over": self.softmax_over,
                "steps": sorted(self._selected),
                "num_steps": self._num_steps,
                "steps_captured": self._steps_captured,
                "layers_per_block": {
                    self._names[key]: state.layer_calls.get(key, 0) for key in keys
                },
            },
        )


def trace(
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
    compile: bool = False,
):
    """Capture concept attribution maps while `pipe` generates inside a `with` block.

    pipe: a diffusers StableDiffusionPipeline (SD1.x, SD2.x), StableDiffusionXLPipeline,
    StableDiffusion3Pipeline (SD3, SD3.5) or FluxPipeline (Flux.1).
    attribution_prompt: P', e.g. "A photo of the face of a firefighter and gender"; its
    keys K'_i = to_k_i(text_encoder(P')) are computed once per cross-attention layer.
    concepts: words or phrases of P' (C of them); a multi-token concept is the mean of its
    sub-token columns; one that P' lacks raises ConceptNotFoundError listing P''s tokens.
    cfg_half: "cond" (default) or "uncond": which CFG half's queries to read. Without CFG
    (guidance_scale <= 1) only "cond" exists and "uncond" raises ValueError.
    softmax_over: "prompt" (start- through end-of-text tokens, OVAM's token_softmax) or
    "padded" (all 77 positions).
    blocks: "default" (every cross-attention block but mid), "all", or names like
    ["down-64", "up-64"] (stage-resolution; non-square latents give "down-64x96").
    map_size: None (largest cross-attention resolution, (S_h, S_w) for non-square images),
    an int S (S x S) or (S_h, S_w).
    timesteps: which sampler steps (UNet calls; 0 = first) to accumulate: None (all), a
    float f in (0, 1] (the first ceil(f * n) steps), a (start, stop) pair of fractions, a
    slice, a range, or a list of indices.

    Per block the maps are summed over layers, heads and selected steps at the block's own
    resolution; `maps()` resizes them bilinearly to the map size (bilinear resizing is
    linear, so this equals resizing every layer's map first) and sums blocks into
    `.aggregate`. Memory: at most blocks x C x S_h x S_w floats per image, for any number
    of steps. The images are bit-identical to an untraced run.

    MM-DiT pipelines (SD3/SD3.5, Flux.1) get a `biasmap.discovery.dit.DiTTrace` with the
    same API; its docstring gives the exact semantics (blocks `joint-i` / `single-i`,
    in-prompt keys or a side stream for P', the text stream's tokenizer). For them
    softmax_over also takes "joint" (the model's joint softmax, sliced), and:
    text_stream: "auto" (T5 when the pipeline has a T5 encoder, else CLIP), "t5" or "clip"
    (SD3 only): whose positions the keys hold and whose tokenizer finds the concepts.
    keys: "auto" (in-prompt when P' encodes to the generation's text, else side stream),
    "in-prompt" or "side-stream". UNet pipelines accept only "auto" for both.

    compile: run the UNet's forward under torch.compile (capture processors included) for
    the duration of the block; the first call of each kind (capturing or not) compiles.

    Returns a context manager; use `with biasmap.trace(...) as tr: pipe(...)`, then `tr.maps()`.
    """
    from .dit import DiTTrace, mmdit_family

    options = dict(
        cfg_half=cfg_half,
        softmax_over=softmax_over,
        blocks=blocks,
        map_size=map_size,
        timesteps=timesteps,
    )
    if mmdit_family(pipe) is not None:
        if compile:
            raise ValueError(
                "compile=True is implemented for UNet pipelines; MM-DiT traces run eager"
            )
        return DiTTrace(
            pipe, attribution_prompt, concepts, **options, text_stream=text_stream, keys=keys
        )
    for name, value in (("text_stream", text_stream), ("keys", keys)):
        if value != "auto":
            raise ValueError(
                f"{name}={value!r} applies to MM-DiT pipelines (SD3, Flux) only; a UNet "
                f"pipeline's keys come from its one text encoder: leave {name}='auto'"
            )
    return Trace(pipe, attribution_prompt, concepts, **options, compile=compile)
