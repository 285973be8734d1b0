"""Energy guidance on flow-matching MM-DiTs: SD3/SD3.5 and Flux.1 behind the sampler's
DenoiserAdapter interface.

**Flow matching in the noise parameterisation.** FlowMatchEulerDiscreteScheduler models

    x_t = (1 - sigma) x0 + sigma eps,        v = eps - x0  (what the transformer predicts),

so at a fixed x_t the velocity determines both: x0 = x_t - sigma v and
eps = x_t + (1 - sigma) v. Algorithm 1's guidance is defined on the noise prediction,
with sigma_t in place of sqrt(1 - alphabar_t):

    eps_final = eps_cfg + lambda * sigma_t * dE/dx_t.

At fixed x_t, d eps = (1 - sigma) d v, so the same step in the model's parameterisation is

    v_final = v_cfg + lambda * sigma_t / (1 - sigma_t) * dE/dx_t

(`flow_guidance_factor`). The Euler step x_next = x_t + (sigma_next - sigma) v equals
(1 - sigma_next) x0 + sigma_next eps for the (x0, eps) that v implies, so v_final gives the
scheduler exactly the step that eps_final implies, with x0 moved by
-sigma / (1 - sigma) d eps to keep x_t fixed (the DDIM reading of Algorithm 1).

At sigma_t = 1 (the first step of SD3's and Flux's default schedules) x_t is pure noise:
eps = x_t whatever the model says, and the map d eps -> d v is singular (factor 1/0). That
step gets no guidance (factor 0), as the noise prediction cannot be changed there.

**Bit-identity at lambda_=0.** The adapters encode prompts, set the timesteps (Flux: its
linear sigmas and resolution-dependent shift mu; SD3: mu only with dynamic shifting), draw
and pack latents and call the transformer exactly as StableDiffusion3Pipeline / FluxPipeline
do. On Flux `guidance_scale` is the distilled guidance embedding's value (FluxPipeline's
default 3.5 when not given), there is no CFG batch, and true CFG (a negative prompt with
true_cfg_scale) is not wired into the guided loop.

**Maps and gradient.** The step's maps are biasmap.trace's MM-DiT maps (in-prompt keys
when P' is the generation prompt, else the side stream; biasmap/discovery/dit.py). Unlike
a UNet's keys, these keys depend on z_t (the text stream and the side stream attend to the
image in every block), so dE/dz_t is the full gradient: through the image queries, the
text keys and the side stream, up to the last selected block (the graph stops there).
"""

from __future__ import annotations

import numpy as np
import torch

from ..discovery.dit import DiTTrace, _bound_arguments, mmdit_family
from ..discovery.processors import CaptureState
from .adapters import ADAPTERS, Conditioning, DenoiserAdapter
from .sampler import _StepCapture

# FluxPipeline's default distilled guidance value.
FLUX_DEFAULT_GUIDANCE = 3.5
# The T5 sequence lengths the pipelines pad prompts to by default.
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


def flow_sigma(scheduler, timestep) -> float:
    """sigma_t of a FlowMatchEulerDiscreteScheduler at `timestep` (one of its timesteps)."""
    index = scheduler.step_index
    if index is None:
        index = scheduler.index_for_timestep(timestep)
    return float(scheduler.sigmas[index])


def flow_guidance_factor(sigma: float) -> float:
    """f with v + lambda * f * grad == the velocity implied by eps + lambda * sigma * grad.

    sigma / (1 - sigma) (see the module docstring); 0 at sigma >= 1, where x_t = eps fixes
    the noise prediction and the map is singular.
    """
    if sigma >= 1.0:
        return 0.0
    return sigma / (1.0 - sigma)


class DiTStepCapture(DiTTrace):
    """The MM-DiT maps driven by the sampler, with `_StepCapture`'s sampler interface.

    The sampler sets the rows, capture and differentiable flags of every call on the state;
    the transformer pre-hook only lays out the call (grid, positions, side stream).
    """

    # The sampler-facing methods are family-agnostic; only the hooks underneath differ.
    call_denoiser = _StepCapture.call_denoiser
    energy_and_grad = _StepCapture.energy_and_grad

    def begin(self, num_steps: int, latent_size: tuple[int, int]) -> None:
        """Start a guided generation of num_steps steps. The positions, softmax domain and
        grid are laid out from the first transformer call's shapes."""
        self._reset_generation()
        self._state = CaptureState(
            token_index=torch.empty(0, dtype=torch.long),
            mean_matrix=None,
            key_mask=None,
            text_states=torch.empty(0),
            capture_blocks=set(self._selected_names),
        )
        self._grid = tuple(latent_size)
        self._layout_key = None
        self._num_steps, self._selected = num_steps, set(range(num_steps))
        self._steps_captured = num_steps

    def _on_transformer_call(self, module, args, kwargs) -> None:
        arguments = _bound_arguments(module, args, kwargs)
        hidden, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        layout = (tuple(hidden.shape[1:]), tuple(text.shape[1:]))
        if layout != self._layout_key:
            self._configure_layout(hidden, text, arguments)
            self._layout_key = layout
        state = self._state
        self._rows = state.rows
        self._capturing = state.capturing
        if not self._capturing:
            return
        if self._mode is None:
            self._choose_mode(text[self._rows])
        if self._mode == "side-stream":
            self._side = self._side0.expand(hidden[self._rows].shape[0], -1, -1)

    def set_cutoff(self) -> None:
        """The graph stops after the last selected block (done in the block hook)."""

    def map_side(self, preset_side: int | None = None) -> tuple[int, int]:
        """The guidance maps' size: map_size, else the preset's side, else the token grid."""
        if self.map_size is not None:
            return self.map_size
        if preset_side is not None:
            return (preset_side, preset_side)
        return self._grid

    def _after_transformer_call(self, module, args, output) -> None:
        """The sampler takes each call's maps itself (take_step_maps)."""

    def take_step_maps(self) -> dict[str, torch.Tensor]:
        """This call's block sums {name: [B, C, h, w]} (graph kept if differentiable), also
        added into the run's running sums."""
        state = self._state
        step = state.pop_step()
        state.commit_step(step)
        return {name: step[name] for name in self._selected_names if name in step}


def _resolution_shift(config, tokens: int, default_max_shift: float) -> float:
    """The schedule shift mu for `tokens` image tokens, as FluxPipeline and SD3's dynamic
    shifting compute it from the scheduler config (the two pipelines' max_shift defaults
    differ: 1.15 Flux, 1.16 SD3)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


class DiTAdapter(DenoiserAdapter):
    """SD3/SD3.5 (StableDiffusion3Pipeline) and Flux.1 (FluxPipeline) with the flow-matching
    Euler scheduler. Conditioning: the joint text states [N, L, D] and
    extra {"pooled_projections": [N, P]}; Flux's text/image position ids and its guidance
    embedding value are the same for every row and live here.
    """

    pipeline_names = ("StableDiffusion3Pipeline", "FluxPipeline")
    step_capture_class = DiTStepCapture

    def __init__(self, pipe, max_sequence_length: int | None = None):
        super().__init__(pipe)
        self.kind = mmdit_family(pipe)
        if self.kind is None:
            raise TypeError(
                f"DiTAdapter needs a diffusers {' or '.join(self.pipeline_names)}; got "
                f"{type(pipe).__name__}"
            )
        scheduler = pipe.scheduler
        if not hasattr(scheduler, "sigmas") or type(scheduler).__name__ != (
            "FlowMatchEulerDiscreteScheduler"
        ):
            raise ValueError(
                "energy guidance on SD3/Flux needs the FlowMatchEulerDiscreteScheduler (its "
                f"sigma_t replaces sqrt(1 - alphabar_t)); got {type(scheduler).__name__}"
            )
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[self.kind]
        self.text_ids = None
        self.image_ids = None
        self.guidance_value = FLUX_DEFAULT_GUIDANCE

    @classmethod
    def supports(cls, pipe) -> bool:
        return mmdit_family(pipe) is not None

    @classmethod
    def has_true_cfg(cls, pipeline_class: str) -> bool:
        """SD3 batches CFG halves; Flux.1 is guidance-distilled (its scale is an embedding)
        and its true CFG is not wired into the guided loop, so `encode` refuses negative
        prompts and the sampler refuses Fair Diffusion's edit prompts."""
        return pipeline_class != "FluxPipeline"

    @property
    def family(self) -> str:
        from ..models import pipeline_family

        return pipeline_family(type(self.pipe).__name__)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def default_guidance_scale(self) -> float | None:
        """Flux's distilled guidance value when the caller gives none (the preset's CFG scale
        means nothing to it); None keeps the preset's scale (SD3 runs real CFG)."""
        return FLUX_DEFAULT_GUIDANCE if self.kind == "flux" else None

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the guided loop batches CFG halves: SD3 as its pipeline (scale > 1); Flux
        never (guidance_scale is its guidance embedding's value)."""
        if self.kind == "flux":
            self.guidance_value = float(guidance_scale)
            return False
        return guidance_scale > 1.0

    def check_attribution_prompt(self, attribution_prompt: str) -> None:
        """Nothing to check here: P' is encoded and padded like any prompt, and the trace
        raises when a concept is cut off by the stream's length."""

    def default_size(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def encode(self, prompt, num_images_per_prompt, use_cfg, negative_prompt, image_size):
        pipe = self.pipe
        with torch.no_grad():
            if self.kind == "sd3":
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    num_images_per_prompt=num_images_per_prompt,
                    do_classifier_free_guidance=use_cfg,
                    negative_prompt=negative_prompt,
                    max_sequence_length=self.max_sequence_length,
                )
                cond = Conditioning(embeds, {"pooled_projections": pooled})
                uncond = None
                if use_cfg:
                    uncond = Conditioning(negative, {"pooled_projections": negative_pooled})
                return cond, uncond
            if negative_prompt is not None:
                raise ValueError(
                    "Flux has no CFG batch; true CFG with a negative prompt is not supported by "
                    "guided_generate (drop negative_prompt)"
                )
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=self.max_sequence_length,
            )
        self.text_ids = text_ids
        return Conditioning(embeds, {"pooled_projections": pooled}), None

    def set_timesteps(self, num_inference_steps, image_size):
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        pipe, scheduler = self.pipe, self.pipe.scheduler
        config = scheduler.config
        height, width = image_size
        kwargs = {}
        if self.kind == "flux":
            # FluxPipeline: linear sigmas, shifted by mu for the packed token count.
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            if getattr(config, "use_flow_sigmas", False):
                sigmas = None
            tokens = (2 * (height // (pipe.vae_scale_factor * 2)) // 2) * (
                2 * (width // (pipe.vae_scale_factor * 2)) // 2
            )
            kwargs["mu"] = _resolution_shift(config, tokens, default_max_shift=1.15)
            timesteps, _ = retrieve_timesteps(
                scheduler, num_inference_steps, self.device, sigmas=sigmas, **kwargs
            )
            scheduler.set_begin_index(0)
            return timesteps
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            tokens = (height // pipe.vae_scale_factor // patch) * (
                width // pipe.vae_scale_factor // patch
            )
            kwargs["mu"] = _resolution_shift(config, tokens, default_max_shift=1.16)
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, **kwargs)
        return timesteps

    def prepare_latents(self, rows, image_size, dtype, generator, latents):
        pipe = self.pipe
        height, width = image_size
        channels = pipe.transformer.config.in_channels
        if self.kind == "sd3":
            return pipe.prepare_latents(
                rows, channels, height, width, dtype, self.device, generator, latents
            )
        latents, self.image_ids = pipe.prepare_latents(
            rows, channels // 4, height, width, dtype, self.device, generator, latents
        )
        return latents

    def latent_grid(self, latents):
        if self.kind == "sd3":
            patch = self.pipe.transformer.config.patch_size
            return latents.shape[-2] // patch, latents.shape[-1] // patch
        if self.image_ids is None:  # not drawn by prepare_latents: a square token grid
            side = int(round(latents.shape[1] ** 0.5))
            return side, latents.shape[1] // side
        height = int(self.image_ids[:, 1].max()) + 1
        return height, latents.shape[1] // height

    def step_kwargs(self, generator):
        return {}

    def scale_input(self, latents, timestep):
        return latents  # the flow-matching Euler scheduler feeds z_t unscaled

    def denoise_scaled(self, latents, timestep, conditioning):
        transformer = self.pipe.transformer
        rows = latents.shape[0]
        if self.kind == "sd3":
            return transformer(
                hidden_states=latents,
                timestep=timestep.expand(rows),
                encoder_hidden_states=conditioning.embeds,
                pooled_projections=conditioning.extra["pooled_projections"],
                return_dict=False,
            )[0]
        text_ids, image_ids = self.text_ids, self.image_ids
        if text_ids is None:  # called without encode(): FluxPipeline's text ids are zeros
            text_ids = latents.new_zeros(conditioning.embeds.shape[1], 3)
        if image_ids is None:  # called without prepare_latents(): a square token grid
            side = int(round(latents.shape[1] ** 0.5))
            if side * side != latents.shape[1]:
                raise ValueError(
                    f"{latents.shape[1]} packed Flux tokens are no square grid; call "
                    "prepare_latents first so that the image ids are known"
                )
            image_ids = self.pipe._prepare_latent_image_ids(
                rows, side, side, latents.device, latents.dtype
            )
            self.image_ids = image_ids
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full(
                [1], self.guidance_value, device=latents.device, dtype=torch.float32
            ).expand(rows)
        return transformer(
            hidden_states=latents,
            timestep=timestep.expand(rows).to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning.extra["pooled_projections"],
            encoder_hidden_states=conditioning.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    def guidance_factor(self, timestep):
        return flow_guidance_factor(flow_sigma(self.pipe.scheduler, timestep))

    def decode(self, latents, generator, output_type):
        if output_type == "latent":
            return latents
        pipe = self.pipe
        with torch.no_grad():
            if self.kind == "flux":
                height = 2 * int(self.image_ids[:, 1].max() + 1) * pipe.vae_scale_factor
                width = 2 * int(self.image_ids[:, 2].max() + 1) * pipe.vae_scale_factor
                latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type=output_type)


if DiTAdapter not in ADAPTERS:
    ADAPTERS.append(DiTAdapter)
