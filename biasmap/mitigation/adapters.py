"""Model-family adapters: what the guided sampler needs to know about one kind of pipeline.

`guided_generate` is one loop for every model family. What differs between families sits
behind a `DenoiserAdapter`:

- encoding prompts into the denoiser's conditioning (`Conditioning`: per-token text
  states plus any extra per-row tensors, e.g. SDXL's pooled embeddings and time ids);
- the timesteps, the initial latents and the scheduler's extra step arguments;
- one denoiser call on a batch of rows (model-input scaling included);
- the factor that expresses lambda * dE/dz_t in the denoiser output's parameterisation;
- decoding the final latents into images.

`UNetAdapter` serves UNet2DConditionModel pipelines: SD1.x/SD2.x (StableDiffusionPipeline)
and SDXL (StableDiffusionXLPipeline). A new family (e.g. the MM-DiTs) adds an adapter class
here and registers it in ADAPTERS; the sampler loop does not change.

Shapes: N is a number of denoiser rows (images x CFG/edit branches), B the number of images,
L the text length, D the text width, [C, h, w] the latent; a family whose latents are not
[N, C, h, w] (Flux packs them into [N, tokens, C]) keeps rows first and reports its spatial
grid through `latent_grid`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """The denoiser's conditioning for N rows.

    embeds: [N, L, D] per-token text states (the UNet's encoder_hidden_states).
    extra: further per-row tensors the denoiser takes, each with N first; SDXL:
    {"text_embeds": [N, P] pooled text embedding, "time_ids": [N, 6] micro-conditioning
    (original size, crop top-left, target size)}; empty for SD1.x/2.x. Conditioning that
    is the same for every row (e.g. Flux's text position ids) belongs in the adapter.
    """

    embeds: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of `parts` stacked in order (the CFG batch [uncond, cond, edits...])."""
        keys = set(parts[0].extra)
        if any(set(part.extra) != keys for part in parts):
            raise ValueError("cannot stack conditionings with different extra tensors")
        return Conditioning(
            torch.cat([part.embeds for part in parts]),
            {key: torch.cat([part.extra[key] for part in parts]) for key in parts[0].extra},
        )

    def repeat_rows(self, rows: int) -> Conditioning:
        """A one-row conditioning repeated to `rows` rows (e.g. one edit prompt for B images)."""
        if self.rows != 1:
            raise ValueError(f"repeat_rows needs a one-row conditioning, this one has {self.rows}")
        return Conditioning(
            self.embeds.expand(rows, *self.embeds.shape[1:]),
            {key: value.expand(rows, *value.shape[1:]) for key, value in self.extra.items()},
        )


class DenoiserAdapter:
    """The family-specific half of guided sampling; subclasses implement every method.

    The sampler calls, in order: `check_attribution_prompt`, `default_size`, `encode`,
    `encode_edits`, `set_timesteps`, `prepare_latents`, `latent_grid`, `step_kwargs`; then per
    step `denoise` (once or twice) and `guidance_factor`; finally `decode`.
    """

    #: the pipeline classes this adapter serves, for error messages ("StableDiffusionPipeline")
    pipeline_names: tuple[str, ...] = ()
    # The sampler's per-step map capture for this family; None: the UNet one
    # (sampler._StepCapture), which this module cannot import without a cycle.
    step_capture_class: type | None = None

    def __init__(self, pipe):
        self.pipe = pipe

    def default_guidance_scale(self) -> float | None:
        """The guidance_scale used when the caller gives none; None keeps the preset's."""
        return None

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the guided loop batches an unconditional half (classifier-free guidance)."""
        return guidance_scale > 1.0

    @classmethod
    def supports(cls, pipe) -> bool:
        """Whether this adapter can drive `pipe`."""
        raise NotImplementedError

    @classmethod
    def has_true_cfg(cls, pipeline_class: str) -> bool:
        """Whether guided sampling of `pipeline_class` (one of pipeline_names) runs a real
        second branch beside the conditional one: an unconditional or negative prompt, and
        Fair Diffusion's edit prompts. Read without a pipeline, so that an audit config can
        refuse the methods that need it before any model loads."""
        return True

    @property
    def family(self) -> str:
        """The model family in words, e.g. "SDXL UNet"; reports name it."""
        raise NotImplementedError

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network called at every step; its weights are frozen during guided sampling."""
        raise NotImplementedError

    @functools.cached_property
    def device(self) -> torch.device:
        """The pipeline's execution device, read once per adapter (one generation): diffusers'
        _execution_device walks every module's hooks on each read (16 ms on the tiny pipeline,
        more on SD1.5, on this CPU), and the adapter's methods ask for it several times."""
        return self.pipe._execution_device

    def check_attribution_prompt(self, attribution_prompt: str) -> None:
        """Raise ValueError when P' does not fit the text encoder(s)."""
        raise NotImplementedError

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels when the caller gives none, as the pipeline defaults."""
        raise NotImplementedError

    def encode(
        self,
        prompt: str | Sequence[str],
        num_images_per_prompt: int,
        use_cfg: bool,
        negative_prompt: str | Sequence[str] | None,
        image_size: tuple[int, int],
    ) -> tuple[Conditioning, Conditioning | None]:
        """(conditional [B rows], unconditional [B rows] or None without CFG) for P.

        B = len(prompt) * num_images_per_prompt; image_size (height, width) in pixels.
        """
        raise NotImplementedError

    def encode_edits(
        self, prompts: Sequence[str], rows: int, image_size: tuple[int, int]
    ) -> list[Conditioning]:
        """One conditioning of `rows` rows per Fair Diffusion edit prompt (no CFG)."""
        edits = []
        for prompt in prompts:
            cond, _ = self.encode(prompt, 1, False, None, image_size)
            edits.append(cond.repeat_rows(rows))
        return edits

    def set_timesteps(self, num_inference_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        """Set the scheduler up for a generation and return its timesteps [steps]."""
        raise NotImplementedError

    def prepare_latents(
        self,
        rows: int,
        image_size: tuple[int, int],
        dtype: torch.dtype,
        generator,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The initial latents z_T [rows, ...] (drawn with `generator` unless given)."""
        raise NotImplementedError

    def latent_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        """The latent's spatial grid (h, w), from which the trace names blocks and sizes maps."""
        raise NotImplementedError

    def step_kwargs(self, generator) -> dict:
        """Extra keyword arguments of scheduler.step for this generation."""
        raise NotImplementedError

    def denoise(self, latents: torch.Tensor, timestep, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's output [N, ...] for latents z_t [N, ...] and N rows of conditioning.

        Takes unscaled z_t: any model-input scaling the scheduler asks for happens here, so
        autograd reaches z_t through it.
        """
        return self.denoise_scaled(self.scale_input(latents, timestep), timestep, conditioning)

    def scale_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The model input [N, ...] for z_t [N, ...] (the scheduler's scale_model_input).

        Kept apart from `denoise_scaled` so that the compiled step leaves it eager: some
        schedulers index their tables with a step counter that changes every step.
        """
        raise NotImplementedError

    def denoise_scaled(self, sample: torch.Tensor, timestep, conditioning: Conditioning):
        """The denoiser's output [N, ...] for a model input from `scale_input`: the part of a
        step that `StepRunner` compiles (no host syncs, no per-step Python state)."""
        raise NotImplementedError

    def guidance_factor(self, timestep) -> float:
        """The factor f with which output + lambda * f * dE/dz_t is Algorithm 1's step."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, generator, output_type: str):
        """Final latents -> images as the pipeline finishes ("latent" returns the latents)."""
        raise NotImplementedError


def alphabar(scheduler, timestep) -> float:
    """alphabar_t = scheduler.alphas_cumprod[t], linearly interpolated for fractional t.

    Works for every diffusers scheduler built on a DDPM beta schedule (DDIM, PNDM,
    Euler, DPM-Solver, ...); others raise a ValueError.
    """
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod, which energy guidance needs for "
            "its sqrt(1 - alphabar_t) scale; use a DDPM-family scheduler (DDIM, PNDM, Euler, "
            "DPM-Solver, ...)"
        )
    t = float(timestep)
    low = min(max(int(math.floor(t)), 0), len(table) - 1)
    high = min(low + 1, len(table) - 1)
    frac = t - low
    return float(table[low]) * (1 - frac) + float(table[high]) * frac


def guidance_factor(scheduler, timestep) -> float:
    """The factor that turns lambda * dE/dz_t into the model output's own parameterisation.

    Algorithm 1 adds lambda * sqrt(1 - alphabar_t) * dE/dz_t to the noise prediction eps.
    With z_t fixed, the other parameterisations are affine in eps, so the same step is
    (a = alphabar_t):
    - "epsilon": d eps = sqrt(1 - a) * lambda * grad;
    - "v_prediction": eps = sqrt(1 - a) z_t + sqrt(a) v, so d v = d eps / sqrt(a), and the
      factor is sqrt(1 - a) / sqrt(a);
    - "sample": x0 = (z_t - sqrt(1 - a) eps) / sqrt(a), so d x0 = -sqrt(1 - a) / sqrt(a) d eps,
      and the factor is -(1 - a) / sqrt(a).
    Each gives the scheduler the same x0 and eps it would get from eps + d eps.
    """
    a = alphabar(scheduler, timestep)
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return math.sqrt(1.0 - a)
    if kind == "v_prediction":
        return math.sqrt(1.0 - a) / math.sqrt(a)
    if kind == "sample":
        return -(1.0 - a) / math.sqrt(a)
    raise ValueError(
        f"energy guidance supports prediction_type 'epsilon', 'v_prediction' or 'sample', "
        f"got {kind!r}"
    )


class UNetAdapter(DenoiserAdapter):
    """UNet2DConditionModel pipelines: StableDiffusionPipeline (SD1.x/2.x) and
    StableDiffusionXLPipeline (SDXL), with any DDPM-family scheduler.

    SD1.x/2.x condition on the text encoder's last hidden states [N, 77, D]. SDXL conditions
    on both encoders' penultimate hidden states concatenated, [N, 77, D1 + D2], and adds
    the second encoder's pooled projection (text_embeds [N, P]) and the micro-conditioning
    time ids [N, 6] = (original height, width, crop top, left, target height, width), which
    are, as diffusers' defaults, (H, W, 0, 0, H, W) for an H x W image. Without a negative
    prompt SDXL's unconditional rows are zeros when the pipeline says
    force_zeros_for_empty_prompt (as diffusers), else the empty prompt's encoding.
    """

    pipeline_names = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

    def __init__(self, pipe):
        super().__init__(pipe)
        for component in ("unet", "vae", "scheduler", "tokenizer", "encode_prompt"):
            if getattr(pipe, component, None) is None:
                raise TypeError(
                    f"UNetAdapter needs a diffusers {' or '.join(self.pipeline_names)}; "
                    f"{type(pipe).__name__} has no {component!r}"
                )
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        alphabar(pipe.scheduler, 0)  # raises for schedulers without a DDPM beta schedule

    @classmethod
    def supports(cls, pipe) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)

    @property
    def family(self) -> str:
        from ..models import pipeline_family

        return pipeline_family(
            "StableDiffusionXLPipeline" if self.sdxl else "StableDiffusionPipeline"
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def _tokenizers(self) -> list:
        return [
            t
            for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None))
            if t is not None
        ]

    def check_attribution_prompt(self, attribution_prompt: str) -> None:
        for tokenizer in self._tokenizers():
            limit = tokenizer.model_max_length
            length = len(tokenizer(attribution_prompt).input_ids)
            if length > limit:
                raise ValueError(
                    f"the attribution prompt has {length} tokens, more than the text encoder's "
                    f"{limit}; shorten it (it is P plus ' and <concept>')"
                )

    def default_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def _time_ids(self, rows: int, image_size: tuple[int, int], dtype) -> torch.Tensor:
        """SDXL's micro-conditioning [rows, 6]: original size, crop top-left (0, 0), target size."""
        values = [*image_size, 0, 0, *image_size]
        unet = self.pipe.unet
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * len(values)
        given += self.pipe.text_encoder_2.config.projection_dim
        if given != expected:
            raise ValueError(
                f"this SDXL UNet's added embedding takes {expected} features, but "
                f"{len(values)} time ids and text_encoder_2's projection give {given}; the "
                "pipeline's UNet and second text encoder do not belong together"
            )
        ids = torch.tensor([values], dtype=dtype, device=self.device)
        return ids.expand(rows, -1)

    def _conditioning(self, embeds, pooled, image_size) -> Conditioning:
        if not self.sdxl:
            return Conditioning(embeds)
        return Conditioning(
            embeds,
            {
                "text_embeds": pooled.to(self.device),
                "time_ids": self._time_ids(embeds.shape[0], image_size, embeds.dtype),
            },
        )

    def encode(self, prompt, num_images_per_prompt, use_cfg, negative_prompt, image_size):
        with torch.no_grad():
            encoded = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=use_cfg,
                negative_prompt=negative_prompt,
            )
        if self.sdxl:
            embeds, negative, pooled, negative_pooled = encoded
        else:
            (embeds, negative), pooled, negative_pooled = encoded, None, None
        cond = self._conditioning(embeds, pooled, image_size)
        uncond = self._conditioning(negative, negative_pooled, image_size) if use_cfg else None
        return cond, uncond

    def set_timesteps(self, num_inference_steps, image_size):
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        if self.sdxl and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline (SD's pipeline does not)
        return scheduler.timesteps

    def prepare_latents(self, rows, image_size, dtype, generator, latents):
        height, width = image_size
        return self.pipe.prepare_latents(
            rows,
            self.pipe.unet.config.in_channels,
            height,
            width,
            dtype,
            self.device,
            generator,
            latents,
        )

    def latent_grid(self, latents):
        return tuple(latents.shape[-2:])

    def step_kwargs(self, generator):
        return self.pipe.prepare_extra_step_kwargs(generator, 0.0)

    def scale_input(self, latents, timestep):
        return self.pipe.scheduler.scale_model_input(latents, timestep)

    def denoise_scaled(self, sample, timestep, conditioning):
        if self.sdxl and set(conditioning.extra) != {"text_embeds", "time_ids"}:
            raise ValueError(
                "an SDXL UNet needs conditioning with extra text_embeds (pooled) and time_ids; "
                f"got {sorted(conditioning.extra)} (build it with UNetAdapter(pipe).encode)"
            )
        return self.pipe.unet(
            sample,
            timestep,
            encoder_hidden_states=conditioning.embeds,
            added_cond_kwargs=conditioning.extra if self.sdxl else None,
            return_dict=False,
        )[0]

    def guidance_factor(self, timestep):
        return guidance_factor(self.pipe.scheduler, timestep)

    def decode(self, latents, generator, output_type):
        if output_type == "latent":
            return latents
        with torch.no_grad():
            return (
                self._decode_sdxl(latents, output_type)
                if self.sdxl
                else self._decode_sd(latents, generator, output_type)
            )

    def _decode_sd(self, latents, generator, output_type):
        """As StableDiffusionPipeline finishes: VAE, safety checker, denormalisation."""
        pipe = self.pipe
        image = pipe.vae.decode(
            latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator
        )[0]
        image, nsfw = pipe.run_safety_checker(image, self.device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=denormalize
        )

    def _decode_sdxl(self, latents, output_type):
        """As StableDiffusionXLPipeline finishes: an fp16 VAE that asks for it decodes in
        float32 (it overflows in fp16), latents are un-normalised with the VAE's mean and std
        when it has them, and the invisible watermark is applied when the pipeline has one."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
            latents = latents.to(torch.float32)
        try:
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        watermark = getattr(self.pipe, "watermark", None)
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


# Tried in order; the first whose supports(pipe) is true drives the pipeline.
ADAPTERS: list[type[DenoiserAdapter]] = [UNetAdapter]


def adapter_class(pipeline_class: str) -> type[DenoiserAdapter] | None:
    """The adapter class serving the diffusers pipeline class named `pipeline_class`
    ("FluxPipeline"), or None when no adapter lists it."""
    for adapter in ADAPTERS:
        if pipeline_class in adapter.pipeline_names:
            return adapter
    return None


def adapter_for(pipe) -> DenoiserAdapter:
    """The adapter that drives `pipe`; TypeError naming the supported pipelines otherwise."""
    for adapter in ADAPTERS:
        if adapter.supports(pipe):
            return adapter(pipe)
    supported = [name for adapter in ADAPTERS for name in adapter.pipeline_names]
    raise TypeError(
        f"guided_generate supports diffusers {', '.join(supported)}; got "
        f"{type(pipe).__name__}, whose denoiser has no adapter"
    )
