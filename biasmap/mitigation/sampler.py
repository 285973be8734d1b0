"""Energy-guided sampling (paper Algorithm 1) as a slim loop over a diffusers pipeline's parts.

    out = biasmap.guided_generate(pipe, "A photo of the face of a firefighter",
                                  "A photo of the face of a firefighter and gender",
                                  ["gender", "firefighter"], lambda_=100.0)
    out.images, out.energies [steps, B], out.grad_norms [steps, B]
    out.maps.iou("gender", "firefighter")  # [B], from the guided run's own maps

Each guided step runs the denoiser once over the CFG batch, split in two calls: the
rows that need no gradient (the other CFG half and any Fair Diffusion edit prompts)
under no_grad, and the chosen half with autograd from z_t through its queries. The
capture processors of `biasmap.trace` turn that half's cross-attention into this
step's concept maps; E = SoftIoU(SoftTopK(M_a), SoftTopK(M_b)) is differentiated
back to z_t, and eps_final = eps_cfg + lambda * sqrt(1 - alphabar_t) * dE/dz_t goes to
the scheduler (in the model's own parameterisation for v- and x0-prediction models:
`guidance_factor`). Steps without guidance run the batched forward exactly as the
diffusers pipeline does, so lambda_=0 reproduces its images bit for bit. The maps of
every step are also summed into the run's AttributionMaps, so the final IoU needs no
second generation.

The loop is the same for every model family: encoding prompts into conditioning, the
denoiser call, the guidance factor and decoding sit behind a DenoiserAdapter
(biasmap.mitigation.adapters; UNetAdapter serves SD1.x/2.x and SDXL).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..discovery.maps import AGGREGATIONS, AttributionMaps, aggregate_blocks
from ..discovery.trace import Trace, _selected_steps
from .adapters import Conditioning, DenoiserAdapter, adapter_for, alphabar, guidance_factor
from .compiled import StepRunner, resolve_cfg_batch, resolve_compile
from .fair_diffusion import FairDiffusion, SemanticGuidance
from .memory import retain_freed_memory
from .presets import PRESETS, GuidanceSettings

# alphabar and guidance_factor live with the UNet adapter; they stay importable from here.
__all__ = ["GuidedOutput", "alphabar", "guidance_factor", "guided_generate", "step_energy"]


@dataclass
class GuidedOutput:
    """Result of `guided_generate`.

    images: PIL images (or the `output_type` diffusers gives); energies: [steps, B]
    float32 SoftIoU of each step's maps (NaN where record_energies=False skipped it);
    grad_norms: [steps, B] ||dE/dz_t||_2 (0 on unguided steps); applied: bool [steps, B],
    whether guidance was added; maps: AttributionMaps summed over all steps of the chosen
    half (None if return_maps=False); settings: the resolved GuidanceSettings.
    """

    images: list
    energies: torch.Tensor
    grad_norms: torch.Tensor
    applied: torch.Tensor
    maps: AttributionMaps | None
    settings: GuidanceSettings
    concepts: tuple[str, ...]  # demographic concept(s), then the semantic one
    q: float

    def iou(self) -> torch.Tensor:
        """Final IoU [B] of the semantic concept's q-mask with the demographic one's (the AND
        of the demographic ones' with several), with the preset's mask comparison."""
        return self._maps().iou(
            self._demographic(), self.concepts[-1], self.q, inclusive=self.settings.inclusive_masks
        )

    def biou(self) -> dict[str, torch.Tensor]:
        """Final block IoU {block: [B], "mean": [B]} with the preset's mask comparison."""
        return self._maps().biou(
            self._demographic(), self.concepts[-1], self.q, inclusive=self.settings.inclusive_masks
        )

    def _demographic(self) -> str | list[str]:
        demographic = list(self.concepts[:-1])
        return demographic[0] if len(demographic) == 1 else demographic

    def _maps(self) -> AttributionMaps:
        if self.maps is None:
            raise ValueError("this run was made with return_maps=False, so it has no maps")
        return self.maps


class _StepCapture(Trace):
    """Trace processors driven by the sampler: it sets the rows and the mode of every UNet call."""

    def _on_unet_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        if self._batch_shape != tuple(sample.shape[-2:]):
            self._configure_blocks(*sample.shape[-2:])
            self._batch_shape = tuple(sample.shape[-2:])

    def begin(self, num_steps: int, latent_size: tuple[int, int]) -> None:
        """Start a generation of num_steps UNet steps on latents of latent_size (h, w)."""
        self._configure_blocks(*latent_size)
        self._batch_shape = tuple(latent_size)
        state = self._state
        state.sums, state.layer_calls, state.step_sums = {}, {}, {}
        self._num_steps, self._selected = num_steps, set(range(num_steps))
        self._steps_captured = num_steps

    def _after_unet_call(self, module, args, output) -> None:
        """The sampler takes each call's maps itself (StepRunner, take_step_maps)."""

    def call_denoiser(
        self,
        adapter: DenoiserAdapter,
        latents: torch.Tensor,
        timestep,
        conditioning: Conditioning,
        *,
        rows: slice,
        capture: bool,
        differentiable: bool = False,
    ) -> torch.Tensor:
        """adapter.denoise(latents [N, ...], timestep, conditioning [N rows]) -> output [N, ...];
        `rows` of the batch are the chosen half's images when `capture`."""
        state = self._state
        state.capturing, state.rows, state.differentiable = capture, rows, differentiable
        grad_mode = torch.is_grad_enabled()
        try:
            return adapter.denoise(latents, timestep, conditioning)
        finally:
            # The block-targeting cutoff may have switched grad off inside the call.
            torch.set_grad_enabled(grad_mode)
            state.capturing, state.differentiable = False, False

    def set_cutoff(self) -> None:
        """Mark the last captured layer in forward order: later layers need no graph."""
        captured = [p for p in self._processors if p.block_key in self._state.capture_blocks]
        order = [info.key for info in self._blocks]
        captured.sort(key=lambda p: order.index(p.block_key))  # stable: layer order kept
        self._state.grad_cutoff = captured[-1] if captured else None

    def energy_and_grad(
        self,
        adapter: DenoiserAdapter,
        latents: torch.Tensor,
        timestep,
        conditioning: Conditioning,
        settings: GuidanceSettings,
        q: float,
        cut_graph: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E [B], dE/dz_t [B, ...], this half's output [B, ...]) for latents z_t [B, ...] and
        B rows of conditioning, with autograd from z_t through the captured queries."""
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            if cut_graph:
                self.set_cutoff()
            output = self.call_denoiser(
                adapter,
                z,
                timestep,
                conditioning,
                rows=slice(None),
                capture=True,
                differentiable=True,
            )
            size = self.map_side(settings.guidance_map_size)
            energy = _energy(self.take_step_maps(), size, settings, q)
            (grad,) = torch.autograd.grad(energy.sum(), z)
        return energy.detach(), grad, output.detach()

    def map_side(self, preset_side: int | None = None) -> tuple[int, int]:
        """The guidance maps' size: map_size, else the preset's side (S x S), else the
        largest captured block's resolution."""
        if self.map_size is not None:
            return self.map_size
        if preset_side is not None:
            return (preset_side, preset_side)
        sizes = [self._state.block_sizes[key] for key in self._names]
        return max(sizes, key=lambda hw: hw[0] * hw[1])

    def take_step_maps(self) -> dict[str, torch.Tensor]:
        """This call's block sums {name: [B, C, h, w]} (graph kept if differentiable), also
        added into the run's running sums."""
        state = self._state
        step = state.pop_step()
        state.commit_step(step)
        return {self._names[key]: value for key, value in step.items()}


def _energy(
    step_maps: dict[str, torch.Tensor], size, settings: GuidanceSettings, q: float
) -> torch.Tensor:
    """E [B] = SoftIoU(SoftTopK(M_a), SoftTopK(M_b)) of one step's block maps, where b is the
    last concept (the semantic one) and a the first; with several demographic concepts (an
    intersectional audit axis: gender, race, profession) E is the mean over them of each one's
    SoftIoU with b, which lowers every pairwise entanglement and so bounds the intersection's.

    step_maps: {block: [B, C, h_i, w_i]}, aggregated to `size` as settings.aggregation says.

    The ops' per-call NaN checks are skipped (on a GPU each is a host sync, about twenty per
    step); callers check the energy once instead (_require_finite).
    """
    with ops.skip_value_checks():
        return _energy_unchecked(step_maps, size, settings, q)


def _energy_unchecked(step_maps, size, settings, q) -> torch.Tensor:
    """_energy without entering skip_value_checks (the caller has, or runs it compiled)."""
    maps = aggregate_blocks(list(step_maps.values()), size, settings.aggregation)
    batch, concepts, height, width = maps.shape
    # [C * B, S_h, S_w]: the demographic concepts' maps, then the semantic one's.
    stacked = torch.cat([maps[:, index] for index in range(concepts)])
    if settings.topk_scope == "row":
        rows = stacked.reshape(concepts * batch * height, width)
        k = ops.topk_count(width, q)
    else:
        rows = stacked.reshape(concepts * batch, height * width)
        k = ops.topk_count(height * width, q)
    masks = ops.soft_topk(
        rows,
        k,
        settings.tau,
        solver=settings.solver,
        iters=settings.iters,
        normalize=settings.normalize,
    ).reshape(concepts * batch, height * width)
    semantic = masks[(concepts - 1) * batch :]
    energies = [
        ops.soft_iou(masks[index * batch : (index + 1) * batch], semantic, settings.eps)
        for index in range(concepts - 1)
    ]
    if len(energies) == 1:
        return energies[0]
    return torch.stack(energies).mean(dim=0)


def _require_finite(energies: torch.Tensor, steps: list[int] | None = None) -> None:
    """Raise naming the first of `steps` (default all) whose energy is NaN; energies:
    [steps, B] (one host sync).

    A NaN energy means NaN attribution maps (soft top-k and SoftIoU stay finite on any
    finite maps), so the denoiser produced NaN."""
    if steps is not None:
        steps = [step for step in steps if step < energies.shape[0]]
        if not steps:
            return
        energies = energies[steps]
    bad = torch.isnan(energies).flatten(1).any(dim=1)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        step = steps[step] if steps is not None else step
        raise ValueError(
            f"the guidance energy is NaN at step {step}: the attribution maps contain NaN, so "
            "the denoiser produced NaN (in float16, try float32 or a smaller lambda_)"
        )


def _check_arguments(lambda_, q, preset, num_inference_steps) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(
            f"num_inference_steps must be an int >= 1, got {type(num_inference_steps).__name__}"
        )
    if num_inference_steps < 1:
        # The scheduler would divide by it (ZeroDivisionError) or return no timesteps.
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if isinstance(lambda_, bool) or not isinstance(lambda_, int | float) or not lambda_ >= 0:
        raise ValueError(f"lambda_ must be a number >= 0 (0 turns guidance off), got {lambda_!r}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be a quantile in (0, 1), got {q!r}")
    if not isinstance(preset, GuidanceSettings) and preset not in PRESETS:
        raise ValueError(
            f"preset must be one of {list(PRESETS)} or a GuidanceSettings, got {preset!r}"
        )


def _retaining_freed_memory_on_cpu(function):
    """Run `function(pipe, ...)` inside retain_freed_memory() when the pipeline's denoiser is
    on CPU.

    Each guided step makes three denoiser passes (no-grad half, grad half, backward) against
    a plain step's one, and on CPU glibc otherwise returns every pass's freed buffers to the
    system, so each pass page-faults its memory back in (see biasmap.mitigation.memory).
    """

    @functools.wraps(function)
    def wrapper(pipe, *args, **kwargs):
        denoiser = getattr(pipe, "unet", None)
        if denoiser is None:
            denoiser = getattr(pipe, "transformer", None)
        device = getattr(denoiser, "device", None)
        with retain_freed_memory(enabled=getattr(device, "type", None) == "cpu"):
            return function(pipe, *args, **kwargs)

    return wrapper


@_retaining_freed_memory_on_cpu
def guided_generate(
    pipe,
    prompt: str | Sequence[str],
    attribution_prompt: str,
    concepts: Sequence[str],
    *,
    lambda_: float = 100.0,
    q: float = 0.7,
    tau: float | None = None,
    solver: str | None = None,
    normalize: str | None = None,
    cfg_half: str | None = None,
    blocks: str | Sequence[str] = "default",
    guidance_scale: float | None = None,
    num_inference_steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    editing_prompt: Sequence[str] | FairDiffusion | None = None,
    guidance_steps=None,
    preset: str | GuidanceSettings = "paper",
    map_size: int | tuple[int, int] | None = None,
    return_maps: bool = True,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    topk_scope: str | None = None,
    output_type: str = "pil",
    compile: bool | str = False,
    cfg_batch: str = "auto",
    record_energies: bool = True,
) -> GuidedOutput:
    """Generate with BiasMap's energy guidance (Algorithm 1) and record the run's maps.

    pipe: a diffusers pipeline that biasmap.mitigation.adapters.ADAPTERS serves:
    StableDiffusionPipeline (SD1.x/2.x) or StableDiffusionXLPipeline (SDXL: both text
    encoders, pooled embeddings and time ids), with any DDPM-family scheduler;
    StableDiffusion3Pipeline and FluxPipeline with their flow-matching Euler scheduler
    (biasmap.mitigation.dit_adapter: the guidance term in velocity form; on Flux
    guidance_scale is the guidance embedding's value, default 3.5, and there is no CFG).
    prompt: P (one string or a list: B = len * num_images_per_prompt images).
    attribution_prompt: P', e.g. "A photo of the face of a firefighter and gender"; its keys
    come from the pipeline's own text encoding (SDXL: both encoders' states, concatenated).
    concepts: (a, b): the demographic concept a and the semantic concept b of P'; or
    (a_1, ..., a_m, b), several demographic concepts traced together (an intersection),
    whose energy is the mean of each a_i's with b.
    lambda_: energy guidance strength (0: plain sampling, bit-identical to diffusers).
    q: quantile of the hard masks; the soft top-k keeps k = floor((1 - q) n).
    tau, solver, normalize, cfg_half, guidance_scale, topk_scope: override the preset
    ("paper" or "official", see biasmap.mitigation.PRESETS); None keeps the preset's.
    blocks: "default" (all but mid), "all", or names like ["down-64", "up-64"]: the maps
    and the energy use only these blocks, and the backward stops at the last of them.
    guidance_steps: steps that get guidance: None (all), a fraction f (the first f of
    the steps), a (start, stop) pair of fractions, a slice, a range or step indices.
    negative_prompt: as diffusers. editing_prompt: Fair Diffusion edit prompts (a list
    or a FairDiffusion with its SEGA settings).
    map_size: side of the guidance maps and of the final maps (default: the preset's
    guidance_map_size and final_map_size, else the largest attention resolution).
    compile: run each denoiser call, with the energy, under torch.compile (True: on CUDA mode
    "reduce-overhead", i.e. CUDA graphs; elsewhere "default"; or a torch.compile mode name).
    The first steps compile (seconds to minutes); see biasmap.mitigation.compiled.
    cfg_batch: "auto" ("batched" on CUDA, "split" elsewhere), "split" (the guided CFG half
    alone with autograd) or "batched" (one forward over the whole CFG batch with autograd).
    record_energies: False lets unguided steps skip the map capture and the energy when
    return_maps is False too (their energies are then NaN): exactly diffusers' step, for
    plain sampling at diffusers' speed.
    Returns GuidedOutput: images, energies [steps, B], grad_norms [steps, B], maps.
    """
    _check_arguments(lambda_, q, preset, num_inference_steps)
    adapter = adapter_for(pipe)
    adapter.check_attribution_prompt(attribution_prompt)
    if guidance_scale is None:
        guidance_scale = adapter.default_guidance_scale()  # Flux: its guidance embedding's
    settings = _resolve_settings(
        preset,
        tau=tau,
        solver=solver,
        normalize=normalize,
        cfg_half=cfg_half,
        guidance_scale=guidance_scale,
        topk_scope=topk_scope,
    )
    fair = FairDiffusion.coerce(editing_prompt)
    scheduler = pipe.scheduler
    use_cfg = adapter.uses_cfg(settings.guidance_scale)  # Flux: never, its scale is embedded
    if settings.cfg_half == "uncond" and not use_cfg:
        raise ValueError(
            "cfg_half='uncond' needs classifier-free guidance (guidance_scale > 1); there is no "
            "unconditional half at guidance_scale <= 1"
        )
    if fair is not None and not use_cfg:
        raise ValueError("Fair Diffusion (editing_prompt) needs guidance_scale > 1")
    default_height, default_width = adapter.default_size()
    image_size = (height or default_height, width or default_width)

    capture = (adapter.step_capture_class or _StepCapture)(
        pipe,
        attribution_prompt,
        concepts,
        cfg_half=settings.cfg_half,
        blocks=blocks,
        map_size=map_size,
    )
    capture._device = adapter.device  # the adapter has read it already
    if len(capture.concepts) < 2:
        raise ValueError(
            "concepts must be at least two words of the attribution prompt (demographic, "
            f"..., semantic), got {list(concepts)}"
        )
    with torch.no_grad():
        cond, uncond = adapter.encode(
            prompt, num_images_per_prompt, use_cfg, negative_prompt, image_size
        )
        batch = cond.rows
        edits = adapter.encode_edits(fair.prompts, batch, image_size) if fair is not None else []
        timesteps = adapter.set_timesteps(num_inference_steps, image_size)
        latents = adapter.prepare_latents(batch, image_size, cond.embeds.dtype, generator, latents)
        step_kwargs = adapter.step_kwargs(generator)
    # Diffusers' CFG batch: [unconditional, conditional, edit prompts...].
    all_rows = Conditioning.cat([uncond, cond, *edits]) if use_cfg else cond

    num_steps = len(timesteps)
    guided = _selected_steps(guidance_steps, num_steps) if lambda_ > 0 else set()
    device = latents.device
    sega = SemanticGuidance(fair) if fair is not None else None
    denoiser = adapter.denoiser
    denoiser_requires_grad = [p.requires_grad for p in denoiser.parameters()]
    denoiser.requires_grad_(False)  # frozen weights: the backward computes no weight gradients
    try:
        # The ops' NaN checks would be a host sync each; the lazy check below covers them.
        with capture, torch.no_grad(), ops.skip_value_checks():
            capture.begin(num_steps, adapter.latent_grid(latents))
            energy_side = capture.map_side(settings.guidance_map_size)
            runner = StepRunner(
                capture,
                adapter,
                functools.partial(_energy_unchecked, size=energy_side, settings=settings, q=q),
                mode=resolve_compile(compile, device),
                cfg_batch=resolve_cfg_batch(cfg_batch, device),
            )
            run = _Run(
                runner=runner,
                settings=settings,
                cond=cond,
                uncond=uncond,
                edits=edits,
                all_rows=all_rows,
                sega=sega,
                guided=guided,
                capture_plain=record_energies or return_maps,
                # Host-side constants, read before the loop so that no step reads a tensor back.
                scales=[lambda_ * adapter.guidance_factor(t) for t in timesteps.cpu()]
                if guided
                else [],
                energies=torch.full((num_steps, batch), float("nan"), device=device),
                grad_norms=torch.zeros(num_steps, batch, device=device),
                applied=torch.zeros(num_steps, batch, dtype=torch.bool, device=device),
            )
            for step, t in enumerate(timesteps):
                runner.begin_step()
                output = _step_output(run, step, t, latents)
                latents = scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
                if (step + 1) % NAN_CHECK_EVERY == 0:
                    _require_finite(run.energies[: step + 1], run.recorded_steps)
            _require_finite(run.energies, run.recorded_steps)
            maps = None
            if return_maps:
                final_size = None  # map_size, else the largest attention resolution
                if settings.final_map_size == "image" and map_size is None:
                    final_size = image_size
                maps = capture.maps(final_size, settings.aggregation)
    finally:
        for parameter, flag in zip(denoiser.parameters(), denoiser_requires_grad, strict=True):
            parameter.requires_grad_(flag)
    images = adapter.decode(latents, generator, output_type)
    return GuidedOutput(
        images,
        run.energies.cpu(),
        run.grad_norms.cpu(),
        run.applied.cpu(),
        maps,
        settings,
        tuple(capture.concepts),
        q,
    )


# How often (in steps) guided_generate reads the energies back to check them for NaN: one
# host sync per check, none inside a step.
NAN_CHECK_EVERY = 10


@dataclass
class _Run:
    """What every step of one guided_generate call shares (records live on the device)."""

    runner: StepRunner
    settings: GuidanceSettings
    cond: Conditioning
    uncond: Conditioning | None
    edits: list[Conditioning]
    all_rows: Conditioning
    sega: SemanticGuidance | None
    guided: set[int]
    capture_plain: bool  # whether unguided steps capture maps and record their energy
    scales: list[float]  # lambda * guidance factor, per step
    energies: torch.Tensor  # [steps, B] float32, NaN where not recorded

    @property
    def recorded_steps(self) -> list[int]:
        steps = range(self.energies.shape[0])
        return [step for step in steps if self.capture_plain or step in self.guided]

    grad_norms: torch.Tensor  # [steps, B] float32
    applied: torch.Tensor  # [steps, B] bool


def _step_output(run: _Run, step: int, t, latents: torch.Tensor) -> torch.Tensor:
    """The output handed to scheduler.step at `step` for z_t [B, ...]: CFG, Fair Diffusion
    and, on guided steps, lambda * f_t * dE/dz_t.

    No host syncs: the energy, gradient norm and gate are written into the run's device
    records, and the official preset's norm gate is a torch.where, not a Python branch.
    """
    settings = run.settings
    use_cfg = run.uncond is not None
    batch = latents.shape[0]
    grad = None
    if step not in run.guided:
        # Exactly diffusers' step: one batched forward over [uncond, cond, edits].
        rows = slice(None)
        if use_cfg:
            rows = slice(batch, 2 * batch) if settings.cfg_half == "cond" else slice(0, batch)
        outputs, energy = run.runner.plain(
            latents, t, run.all_rows, rows, capture=run.capture_plain
        )
    else:
        outputs, energy, grad = run.runner.guided(
            latents, t, run.cond, run.uncond, run.edits, settings.cfg_half
        )
    if energy is not None:
        run.energies[step] = energy.detach().float()
    if use_cfg:
        out_uncond, out_cond, out_edits = outputs[0], outputs[1], outputs[2:]
        guidance = settings.guidance_scale * (out_cond - out_uncond)
        if run.sega is not None:
            edit = run.sega(step, out_uncond, out_edits)
            if edit is not None:
                guidance = guidance + edit
        output = out_uncond + guidance
    else:
        output = outputs[0]
    if grad is not None:
        norms = grad.flatten(1).norm(dim=1).float()
        run.grad_norms[step] = norms
        use = torch.ones_like(norms, dtype=torch.bool)
        if settings.grad_norm_gate is not None:
            use = norms < settings.grad_norm_gate
        run.applied[step] = use
        term = (run.scales[step] * grad).to(output.dtype)
        gate = use.view(-1, *([1] * (grad.dim() - 1)))
        output = output + torch.where(gate, term, torch.zeros_like(term))
    return output


def _resolve_settings(preset, **overrides) -> GuidanceSettings:
    base = preset if isinstance(preset, GuidanceSettings) else PRESETS[preset]
    settings = base.override(**overrides)
    ops._checks.choice("topk_scope", settings.topk_scope, ("map", "row"))
    ops._checks.choice("solver", settings.solver, ops._checks.SOLVERS)
    ops._checks.choice("normalize", settings.normalize, ops._checks.NORMALIZATIONS)
    ops._checks.choice("cfg_half", settings.cfg_half, ("cond", "uncond"))
    ops._checks.choice("aggregation", settings.aggregation, AGGREGATIONS)
    ops._checks.positive_number("tau", settings.tau)
    return settings


@_retaining_freed_memory_on_cpu
def step_energy(
    pipe,
    latents: torch.Tensor,
    timestep,
    conditioning: torch.Tensor | Conditioning,
    attribution_prompt: str,
    concepts: Sequence[str],
    *,
    q: float = 0.7,
    blocks: str | Sequence[str] = "default",
    map_size: int | tuple[int, int] | None = None,
    preset: str | GuidanceSettings = "paper",
    cut_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E(z_t) and dE/dz_t for one denoiser call: ([B], [B, C, h, w]).

    latents: z_t [B, C, h, w]; conditioning: the guided half's conditioning for B rows (P's
    for cfg_half="cond", the negative prompt's for "uncond"): a Conditioning from
    `adapter_for(pipe).encode(...)`, or for SD1.x/2.x just its text states [B, L, D]. This is
    the quantity `guided_generate` differentiates at every guided step (for analysis and
    tests). cut_graph=False records the graph through the whole denoiser instead of stopping
    after the last targeted layer (same gradient, more work).
    """
    settings = _resolve_settings(preset)
    adapter = adapter_for(pipe)
    if isinstance(conditioning, torch.Tensor):
        conditioning = Conditioning(conditioning)
    capture = (adapter.step_capture_class or _StepCapture)(
        pipe, attribution_prompt, concepts, cfg_half="cond", blocks=blocks, map_size=map_size
    )
    capture._device = adapter.device
    with capture, torch.no_grad():
        capture.begin(1, adapter.latent_grid(latents))
        energy, grad, _ = capture.energy_and_grad(
            adapter, latents, timestep, conditioning, settings, q, cut_graph
        )
    _require_finite(energy[None])
    return energy, grad
