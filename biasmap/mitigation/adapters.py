"""Model-family adapters: what the guided sampler needs to know about one kind of pipeline.

`guided_generate` is one loop for every model family. What differs between families sits
behind a `DenoiserAdapter`:

- encoding prompts into the denoiser's conditioning (`Conditioning`: per-token text
  states plus any extra per-row tensors, e.g. SDXL's pooled embeddings and time ids);
- the timesteps, the initial latents and the scheduler's extra step arguments;
- one denoiser call on a batch of rows (model-input scaling included);
- the factor that expresses lambda * dE/dz_t in the denoiser output's parameterisation;
- decoding the final latents into images.

`UNetAdapter` serves UNet2DConditionModel pipelines: SD1.x/SD2.x (StableDiffusionPipeline).
A new family (e.g. the MM-DiTs) adds an adapter class
here and registers it in ADAPTERS; the sampler loop does not change.

Shapes: N is a number of denoiser rows (images x CFG/edit branches), B the number of images,
L the text length, D the text width, [C, h, w] the latent; a family whose latents are not
[N, C, h, w] (Flux packs them into [N, tokens, C]) keeps rows first and reports its spatial
grid through `latent_grid`.
"""

from __future__ import annotations

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

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def supports(cls, pipe) -> bool:
        """Whether this adapter can drive `pipe`."""
        raise NotImplementedError

    @property
    def family(self) -> str:
        """The model family in words, e.g. "SDXL (UNet)"; reports name it."""
        raise NotImplementedError

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network called at every step; its weights are frozen during guided sampling."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
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
        raise NotImplementedError

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
    """UNet2DConditionModel pipelines: StableDiffusionPipeline (SD1.x/2.x), with any
    DDPM-family scheduler. They condition on the text encoder's last hidden states
    [N, 77, D] and take no extra tensors.
    """

    pipeline_names = ("StableDiffusionPipeline",)

    def __init__(self, pipe):
        super().__init__(pipe)
        for component in ("unet", "vae", "scheduler", "tokenizer", "encode_prompt"):
            if getattr(pipe, component, None) is None:
                raise TypeError(
                    f"UNetAdapter needs a diffusers {' or '.join(self.pipeline_names)}; "
                    f"{type(pipe).__name__} has no {component!r}"
                )
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise NotImplementedError(
                "guided_generate supports SD1.x/2.x pipelines; SDXL's added conditioning is "
                "not wired into the guided loop yet (biasmap.trace works with SDXL)"
            )
        alphabar(pipe.scheduler, 0)  # raises for schedulers without a DDPM beta schedule

    @classmethod
    def supports(cls, pipe) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)

    @property
    def family(self) -> str:
        return "SD1.x/SD2.x (UNet)"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def check_attribution_prompt(self, attribution_prompt: str) -> None:
        tokenizer = self.pipe.tokenizer
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

    def encode(self, prompt, num_images_per_prompt, use_cfg, negative_prompt, image_size):
        with torch.no_grad():
            encoded = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=use_cfg,
                negative_prompt=negative_prompt,
            )
        embeds, negative = encoded
        return Conditioning(embeds), Conditioning(negative) if use_cfg else None

    def encode_edits(self, prompts, rows, image_size):
        edits = []
        for prompt in prompts:
            cond, _ = self.encode(prompt, 1, False, None, image_size)
            edits.append(cond.repeat_rows(rows))
        return edits

    def set_timesteps(self, num_inference_steps, image_size):
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
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

    def denoise(self, latents, timestep, conditioning):
        sample = self.pipe.scheduler.scale_model_input(latents, timestep)
        return self.pipe.unet(
            sample,
            timestep,
            encoder_hidden_states=conditioning.embeds,
            return_dict=False,
        )[0]

    def guidance_factor(self, timestep):
        return guidance_factor(self.pipe.scheduler, timestep)

    def decode(self, latents, generator, output_type):
        if output_type == "latent":
            return latents
        with torch.no_grad():
            return self._decode_sd(latents, generator, output_type)

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


# Tried in order; the first whose supports(pipe) is true drives the pipeline.
ADAPTERS: list[type[DenoiserAdapter]] = [UNetAdapter]


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
