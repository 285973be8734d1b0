"""Energy-guided sampling on the tiny pipelines (CPU): exactness at lambda=0, the gradient,
presets, batch independence and errors.

Tests that take `family_pipe` / `family_pipe64` run on every UNet family: tiny SD1.x and
tiny SDXL (two text encoders, pooled embeddings, time ids)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from biasmap.discovery.tokens import ConceptNotFoundError
from biasmap.mitigation import PRESETS, guided_generate
from biasmap.mitigation.methods import plan
from biasmap.mitigation.sampler import _energy, step_energy
from biasmap.models import tiny_sd, tiny_sdxl
from biasmap.ops import reference

P = "A photo of the face of a firefighter"
A = P + " and gender"
CONCEPTS = ["gender", "firefighter"]


FAMILIES = {"sd": tiny_sd, "sdxl": tiny_sdxl}
# The first cross-attention block of each tiny UNet (latent 16x16).
FIRST_BLOCK = {"sd": "down-16", "sdxl": "down-8"}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd(0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pipe(request):
    return FAMILIES[request.param](0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pipe64(request):
    return FAMILIES[request.param](0).to(torch.float64)


def _family(pipe) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "scheduler_cls,kwargs",
    [
        (DDIMScheduler, {}),
        (PNDMScheduler, {"skip_prk_steps": True}),
        (EulerDiscreteScheduler, {}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        (DDIMScheduler, {"negative_prompt": "male, female"}),
    ],
    ids=["ddim", "pndm", "euler", "dpm++", "ddim-negative-prompt"],
)
def test_lambda_zero_is_bit_identical_to_diffusers(family_pipe, scheduler_cls, kwargs):
    pipe = family_pipe
    kwargs = dict(kwargs)
    negative_prompt = kwargs.pop("negative_prompt", None)
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config, **kwargs)
    try:
        ours = guided_generate(
            pipe,
            P,
            A,
            CONCEPTS,
            lambda_=0.0,
            guidance_scale=7.5,
            num_inference_steps=3,
            generator=_gen(3),
            negative_prompt=negative_prompt,
            output_type="np",
        )
        theirs = pipe(
            P,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=_gen(3),
            negative_prompt=negative_prompt,
            output_type="np",
        ).images
    finally:
        pipe.scheduler = original
    assert np.array_equal(ours.images, theirs)
    assert ours.grad_norms.abs().sum() == 0 and not ours.applied.any()


def test_fp16_sdxl_decodes_in_float32_as_diffusers_and_keeps_its_vae_fp16():
    """SDXL's fp16 VAE overflows, so the pipeline decodes in float32 (force_upcast); ours too."""
    from biasmap.models import load_pipeline

    pipe = load_pipeline("tiny-sdxl", "fp16")
    assert pipe.vae.config.force_upcast
    kwargs = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np")
    ours = guided_generate(pipe, P, A, CONCEPTS, lambda_=0.0, generator=_gen(3), **kwargs)
    theirs = pipe(P, generator=_gen(3), **kwargs).images
    assert np.array_equal(ours.images, theirs)
    assert pipe.vae.dtype == torch.float16


TAU = 0.2  # a soft top-k soft enough that the tiny models' gradients do not vanish


def _energy_at(pipe, latents, blocks="default", cut_graph=True):
    from biasmap.mitigation.adapters import adapter_for

    conditioning, _ = adapter_for(pipe).encode(P, 1, False, None, (128, 128))
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[3]
    return step_energy(
        pipe,
        latents,
        t,
        conditioning,
        A,
        CONCEPTS,
        blocks=blocks,
        cut_graph=cut_graph,
        preset=PRESETS["paper"].override(tau=TAU),
    )


def test_energy_gradient_equals_central_differences_float64(family_pipe64):
    z = torch.randn(1, 4, 16, 16, generator=_gen(5), dtype=torch.float64)
    energy, grad = _energy_at(family_pipe64, z)
    direction = torch.randn(z.shape, generator=_gen(6), dtype=torch.float64)
    h = 1e-5
    plus, _ = _energy_at(family_pipe64, z + h * direction)
    minus, _ = _energy_at(family_pipe64, z - h * direction)
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum()
    assert float(analytic.abs()) > 1e-6, "the gradient vanished; the test would prove nothing"
    torch.testing.assert_close(numeric[0], analytic, rtol=1e-4, atol=1e-9)


def test_small_step_along_minus_gradient_lowers_energy(family_pipe64):
    z = torch.randn(1, 4, 16, 16, generator=_gen(7), dtype=torch.float64)
    energy, grad = _energy_at(family_pipe64, z)
    lowered, _ = _energy_at(family_pipe64, z - 1e-3 * grad / grad.norm())
    assert float(lowered) < float(energy)


def test_block_targeting_cuts_the_graph_without_changing_the_gradient(family_pipe64):
    z = torch.randn(1, 4, 16, 16, generator=_gen(8), dtype=torch.float64)
    first = [FIRST_BLOCK[_family(family_pipe64)]]
    cut = _energy_at(family_pipe64, z, blocks=first)
    full = _energy_at(family_pipe64, z, blocks=first, cut_graph=False)
    torch.testing.assert_close(cut[0], full[0])
    torch.testing.assert_close(cut[1], full[1])


# <sot> a photo of the face of a firefighter and gender <eot>: positions read off by hand.
CONCEPT_POSITIONS = [10, 8]  # gender, firefighter
REAL_TOKENS = 12


def _independent_conditioning(pipe, prompt, image_side):
    """(text states [1, 77, D], extra UNet kwargs) written from the model card, not biasmap:
    SD1.x takes the text encoder's last states; SDXL both encoders' penultimate states,
    concatenated, plus the second encoder's pooled projection and the time ids
    (original size, crop top-left, target size). prompt None is the unconditional input:
    the empty prompt for SD, zeros for SDXL (force_zeros_for_empty_prompt)."""
    if _family(pipe) == "sd":
        ids = pipe.tokenizer(
            prompt or "", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0], {}
    states = []
    for tokenizer, encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        ids = tokenizer(prompt or "", padding="max_length", max_length=77, return_tensors="pt")
        output = encoder(ids.input_ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
    embeds, pooled = torch.cat(states, dim=-1), output.text_embeds
    if prompt is None:
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    time_ids = torch.tensor([[image_side, image_side, 0, 0, image_side, image_side]])
    extra = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}
    return embeds, {"added_cond_kwargs": extra}


def _independent_energy(pipe, z, t, image_side):
    """(E [1], eps_cond) at z_t: every attn2 input recorded with its graph, the per-head key
    softmax over P''s real tokens, concept columns summed over heads, layers summed per
    block, blocks (all but mid) resized bilinearly to the largest and summed, then the
    reference exact soft top-k (k = floor(0.3 n), tau=TAU) and SoftIoU."""
    embeds, kwargs = _independent_conditioning(pipe, P, image_side)
    keys_text, _ = _independent_conditioning(pipe, A, image_side)
    records = []
    handles = [
        module.register_forward_pre_hook(
            lambda module, args, name=name: records.append((name, module, args[0]))
        )
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        sample = pipe.scheduler.scale_model_input(z, t)
        eps = pipe.unet(sample, t, encoder_hidden_states=embeds, **kwargs).sample
    finally:
        for handle in handles:
            handle.remove()
    blocks = {}
    for name, attn, hidden in records:
        if name.startswith("mid"):
            continue
        heads = attn.heads
        q = attn.to_q(hidden)
        k = attn.to_k(keys_text)[:, :REAL_TOKENS]
        d = q.shape[-1] // heads
        qh = q.view(1, -1, heads, d).transpose(1, 2)
        kh = k.view(1, -1, heads, d).transpose(1, 2)
        probs = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # [1, H, N, L]
        columns = probs[..., CONCEPT_POSITIONS].sum(1).transpose(1, 2)  # [1, 2, N]
        side = math.isqrt(columns.shape[-1])
        block = ".".join(name.split(".")[:2])
        blocks[block] = blocks.get(block, 0) + columns.view(1, 2, side, side)
    largest = max(block.shape[-1] for block in blocks.values())
    summed = sum(
        torch.nn.functional.interpolate(
            block, size=(largest, largest), mode="bilinear", align_corners=False
        )
        for block in blocks.values()
    )
    flat = summed.flatten(2)
    k = int(0.3 * flat.shape[-1])
    energy = reference.entanglement_energy(flat[:, 0], flat[:, 1], k, TAU)
    return energy, eps


def test_guided_step_equals_an_independent_autograd_step_float64(family_pipe64):
    """One guided DDIM step (trailing spacing: t = 999) against the step written out here:
    eps_u + 7.5 (eps_c - eps_u) + lambda sqrt(1 - alphabar_t) dE/dz_t, with E and its
    gradient from plain autograd through the UNet and the conditioning built by hand."""
    pipe = family_pipe64
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
    lam, scale, side = 50.0, 7.5, 128
    z = torch.randn(1, 4, 16, 16, generator=_gen(21), dtype=torch.float64)
    try:
        out = guided_generate(
            pipe,
            P,
            A,
            CONCEPTS,
            lambda_=lam,
            tau=TAU,
            guidance_scale=scale,
            num_inference_steps=1,
            latents=z.clone(),
            output_type="latent",
        )
        t = pipe.scheduler.timesteps[0]
        zg = z.clone().requires_grad_(True)
        with torch.enable_grad():
            energy, eps_cond = _independent_energy(pipe, zg, t, side)
            (grad,) = torch.autograd.grad(energy.sum(), zg)
        with torch.no_grad():
            embeds, kwargs = _independent_conditioning(pipe, None, side)
            eps_uncond = pipe.unet(z, t, encoder_hidden_states=embeds, **kwargs).sample
            alphabar_t = float(pipe.scheduler.alphas_cumprod[int(t)])
            eps = eps_uncond + scale * (eps_cond.detach() - eps_uncond)
            guided_eps = eps + lam * math.sqrt(1 - alphabar_t) * grad
            expected = pipe.scheduler.step(guided_eps, t, z).prev_sample
            plain = pipe.scheduler.step(eps, t, z).prev_sample
    finally:
        pipe.scheduler = original
    assert int(t) == 999
    torch.testing.assert_close(out.energies[0], energy.detach().float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.grad_norms[0], grad.norm().float().reshape(1), rtol=1e-5, atol=0)
    assert float((expected - plain).norm()) > 1e-2 * float(plain.norm()), (
        "guidance too weak to test"
    )
    torch.testing.assert_close(out.images, expected, rtol=1e-6, atol=1e-8)


def test_guidance_lowers_the_energy_and_changes_the_image(family_pipe):
    pipe = family_pipe
    kwargs = dict(num_inference_steps=4, output_type="np")
    plain = guided_generate(pipe, P, A, CONCEPTS, lambda_=0.0, generator=_gen(1), **kwargs)
    guided = guided_generate(pipe, P, A, CONCEPTS, lambda_=300.0, generator=_gen(1), **kwargs)
    assert guided.energies.shape == (4, 1) and guided.grad_norms.shape == (4, 1)
    assert (guided.grad_norms > 0).all() and guided.applied.all()
    assert guided.energies[1:].mean() < plain.energies[1:].mean()
    assert np.abs(guided.images - plain.images).max() > 1e-2
    assert guided.maps is not None and guided.iou().shape == (1,)


def test_guidance_steps_limit_where_guidance_is_added(pipe):
    out = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        num_inference_steps=4,
        guidance_steps=0.5,
        generator=_gen(2),
        output_type="np",
    )
    assert out.applied[:2].all() and not out.applied[2:].any()
    assert (out.grad_norms[2:] == 0).all()


def test_batch_entries_are_independent(family_pipe64):
    """In float64, so that batched convolutions' rounding (amplified by 1/tau in the
    gradient) does not hide a real coupling between the rows."""
    pipe = family_pipe64
    alone = guided_generate(
        pipe, [P], A, CONCEPTS, num_inference_steps=3, generator=[_gen(4)], output_type="latent"
    )
    together = guided_generate(
        pipe,
        [P, "A photo of the face of a nurse"],
        A,
        CONCEPTS,
        num_inference_steps=3,
        generator=[_gen(4), _gen(9)],
        output_type="latent",
    )
    assert alone.applied.all() and together.applied.all()
    torch.testing.assert_close(alone.images[0], together.images[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(alone.energies[:, 0], together.energies[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.grad_norms[:, 0], together.grad_norms[:, 0], rtol=1e-5, atol=0)


def _authors_topk(matrix, percentile=0.3, gamma=0.01, iters=20):
    """The authors' row-wise log-Sinkhorn top-k over a full [rows, n, 2] plan (their loop)."""
    rows, n = matrix.shape
    k = int(n * percentile)
    anchors = torch.tensor([0.0, 1.0], dtype=matrix.dtype)
    scores = -((matrix[:, :, None] - anchors) ** 2) / gamma
    f = torch.zeros(rows, n, dtype=matrix.dtype)
    g = torch.zeros(rows, 2, dtype=matrix.dtype)
    log_u = math.log(1 / n)
    log_v = torch.log(torch.tensor([n - k, k], dtype=matrix.dtype) / n)
    for _ in range(iters):
        g = log_v - torch.logsumexp(scores + f[:, :, None], dim=1)
        f = log_u - torch.logsumexp(scores + g[:, None, :], dim=2)
    return torch.exp(scores + f[:, :, None] + g[:, None, :])[:, :, 1] * n


def test_official_energy_is_the_authors_rowwise_sinkhorn_on_raw_maps():
    gen = _gen(11)
    step_maps = {
        "down-16": torch.rand(2, 2, 16, 16, generator=gen, dtype=torch.float64) * 3,
        "up-8": torch.rand(2, 2, 8, 8, generator=gen, dtype=torch.float64) * 3,
    }
    energy = _energy(step_maps, (16, 16), PRESETS["official"], 0.7)
    summed = reference.resize_aggregate(list(step_maps.values()), (16, 16))
    expected = []
    for i in range(2):
        ma = _authors_topk(summed[i, 0])  # the [16, 16] map as 16 rows: row-wise top-k
        mb = _authors_topk(summed[i, 1])
        inter = (ma * mb).sum()
        expected.append(inter / (ma.sum() + mb.sum() - inter + 1e-8))
    torch.testing.assert_close(energy, torch.stack(expected))


def _bilinear(maps, size):
    return torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _two_stage(blocks, size):
    """OVAM's aggregation, written out: every block to the largest block's resolution, summed,
    then that sum to `size`."""
    largest = max((tuple(b.shape[-2:]) for b in blocks), key=lambda hw: hw[0] * hw[1])
    return _bilinear(sum(_bilinear(b, largest) for b in blocks), size)


def _authors_energy(maps):
    """The authors' SoftIoU [B] of maps [B, 2, S, S]: row-wise Sinkhorn top-k on raw sums."""
    energies = []
    for image in maps:
        ma, mb = _authors_topk(image[0]), _authors_topk(image[1])
        inter = (ma * mb).sum()
        energies.append(inter / (ma.sum() + mb.sum() - inter + 1e-8))
    return torch.stack(energies)


def test_official_energy_aggregates_in_two_stages_then_expands_to_64():
    gen = _gen(12)
    step_maps = {
        "down-16": torch.rand(2, 2, 16, 16, generator=gen, dtype=torch.float64) * 3,
        "up-8": torch.rand(2, 2, 8, 8, generator=gen, dtype=torch.float64) * 3,
    }
    settings = PRESETS["official"]
    assert (settings.aggregation, settings.guidance_map_size) == ("two-stage", 64)
    energy = _energy(step_maps, (64, 64), settings, 0.7)
    expected = _authors_energy(_two_stage(list(step_maps.values()), (64, 64)))
    torch.testing.assert_close(energy, expected)
    one_stage = _energy(step_maps, (64, 64), settings.override(aggregation="one-stage"), 0.7)
    assert (one_stage - expected).abs().max() > 1e-3  # the test tells the two apart


def test_official_run_matches_the_authors_two_stage_maps_per_step_and_at_the_end(pipe):
    """Tiny pipeline, lambda=0 (so the trajectory is plain CFG 7.0): the first step's energy is
    the authors' on the two-stage 64x64 maps, and the final maps are the two-stage sum expanded
    to the image size, against maps traced independently with biasmap.trace."""
    import biasmap

    out = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=0.0,
        preset="official",
        num_inference_steps=2,
        generator=_gen(5),
        output_type="np",
    )
    image_size = tuple(out.images.shape[1:3])
    traced = {}
    for steps in ([0], None):
        with biasmap.trace(pipe, A, CONCEPTS, cfg_half="uncond", timesteps=steps) as tr:
            pipe(P, num_inference_steps=2, guidance_scale=7.0, generator=_gen(5), output_type="np")
        traced[steps is None] = tr._state.sums, dict(tr._names)  # raw block sums [B, C, h, w]

    def raw_blocks(everything):
        sums, names = traced[everything]
        return {names[key]: value.double() for key, value in sums.items()}

    first = list(raw_blocks(False).values())
    assert len({tuple(b.shape[-2:]) for b in first}) > 1  # blocks of several resolutions
    expected_energy = _authors_energy(_two_stage(first, (64, 64))).float()
    torch.testing.assert_close(out.energies[0], expected_energy, atol=1e-4, rtol=0)
    one_stage = _authors_energy(sum(_bilinear(b, (64, 64)) for b in first)).float()
    assert (one_stage - expected_energy).abs().max() > 1e-3

    blocks = raw_blocks(True)
    assert out.maps.size == image_size
    expected_aggregate = _two_stage(list(blocks.values()), image_size).float()
    torch.testing.assert_close(out.maps.aggregate, expected_aggregate, atol=1e-4, rtol=1e-4)
    for name, block in blocks.items():  # BIoU: each block resized straight to the image size
        torch.testing.assert_close(
            out.maps.blocks[name], _bilinear(block, image_size).float(), atol=1e-4, rtol=1e-4
        )


def test_official_preset_uses_the_uncond_half_gate_and_strict_masks(pipe):
    import biasmap

    settings = PRESETS["official"]
    assert (settings.cfg_half, settings.normalize, settings.solver) == (
        "uncond",
        "none",
        "sinkhorn",
    )
    assert (settings.topk_scope, settings.grad_norm_gate, settings.inclusive_masks) == (
        "row",
        1.0,
        False,
    )
    out = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=0.0,
        preset="official",
        num_inference_steps=2,
        generator=_gen(5),
        output_type="np",
        map_size=16,
    )
    with biasmap.trace(pipe, A, CONCEPTS, cfg_half="uncond") as tr:
        pipe(P, num_inference_steps=2, guidance_scale=7.0, generator=_gen(5), output_type="np")
    torch.testing.assert_close(out.maps.aggregate, tr.maps().aggregate)
    # Masks with ">" (np.percentile), as the authors' get_binary_mask.
    expected = []
    for a_map, b_map in zip(
        out.maps.concept("gender"), out.maps.concept("firefighter"), strict=True
    ):
        ma = a_map.numpy() > np.percentile(a_map.numpy(), 70)
        mb = b_map.numpy() > np.percentile(b_map.numpy(), 70)
        expected.append((ma & mb).sum() / (ma | mb).sum())
    np.testing.assert_allclose(out.iou().numpy(), expected, rtol=1e-6)


def test_official_gate_applies_guidance_only_below_unit_gradient_norm(pipe):
    out = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=100.0,
        preset="official",
        num_inference_steps=3,
        generator=_gen(6),
        output_type="np",
    )
    assert torch.equal(out.applied, out.grad_norms < 1.0)
    blocked = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=100.0,
        num_inference_steps=3,
        generator=_gen(6),
        output_type="np",
        preset=PRESETS["official"].override(grad_norm_gate=1e-30),
    )
    plain = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=0.0,
        preset="official",
        num_inference_steps=3,
        generator=_gen(6),
        output_type="np",
    )
    assert not blocked.applied.any()
    np.testing.assert_allclose(blocked.images, plain.images, atol=1e-4)


def test_methods_combine_fair_diffusion_hard_and_negative_prompting(family_pipe):
    for method in ("fd+biasmap", "hard+biasmap", "negative+biasmap"):
        settings = plan(method, "firefighter", "gender", seed=1)
        out = guided_generate(
            family_pipe,
            settings.prompt,
            settings.attribution_prompt,
            settings.concepts,
            negative_prompt=settings.negative_prompt,
            editing_prompt=settings.editing_prompt,
            num_inference_steps=2,
            generator=_gen(1),
            output_type="np",
        )
        assert out.applied.all() and np.isfinite(out.images).all(), method
    assert plan("fd", "nurse", "gender", 1).editing_prompt.prompts == ("a female", "a male")
    assert plan("fd", "nurse", "gender", 2).editing_prompt.prompts == ("a male", "a female")
    assert plan("hard", "nurse", "race", 0).prompt == "A photo of the face of a diverse nurse"


def test_fair_diffusion_edit_rows_steer_the_image_only_through_their_term(family_pipe):
    """The edit prompts' rows (SDXL: with their own pooled embeddings and time ids) change the
    image through SEGA's term, and with that term at scale 0 the CFG rows are untouched."""
    from biasmap.mitigation import FairDiffusion

    kwargs = dict(lambda_=0.0, num_inference_steps=3, output_type="np")
    plain = guided_generate(family_pipe, P, A, CONCEPTS, generator=_gen(2), **kwargs).images
    images = {}
    for edit_scale in (0.0, 4.0):
        edits = FairDiffusion(warmup_steps=0, guidance_scale=edit_scale)
        images[edit_scale] = guided_generate(
            family_pipe, P, A, CONCEPTS, editing_prompt=edits, generator=_gen(2), **kwargs
        ).images
    np.testing.assert_allclose(images[0.0], plain, atol=1e-5)
    assert np.abs(images[4.0] - plain).max() > 1e-2


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"concepts": ["gender", "astronaut"]}, ConceptNotFoundError, "astronaut"),
        ({"lambda_": -1.0}, ValueError, "lambda_ must be a number >= 0"),
        ({"attribution_prompt": P + " and" + " gender" * 80}, ValueError, "more than the text"),
        ({"preset": "fast"}, ValueError, "preset must be one of"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be >= 1, got 0"),
    ],
)
def test_clear_errors(pipe, kwargs, error, pattern):
    args = {"prompt": P, "attribution_prompt": A, "concepts": CONCEPTS, **kwargs}
    with pytest.raises(error, match=pattern):
        guided_generate(
            pipe,
            args.pop("prompt"),
            args.pop("attribution_prompt"),
            args.pop("concepts"),
            num_inference_steps=args.pop("num_inference_steps", 1),
            **args,
        )


def test_sdxl_conditioning_without_pooled_embeddings_and_time_ids_is_rejected():
    pipe = tiny_sdxl(0)
    embeds = torch.zeros(1, 77, 48)
    with pytest.raises(ValueError, match="SDXL UNet needs conditioning with extra text_embeds"):
        step_energy(pipe, torch.zeros(1, 4, 16, 16), 500, embeds, A, CONCEPTS)


def test_nan_maps_raise_a_clear_error():
    broken = tiny_sd(0)
    with torch.no_grad():
        broken.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="guidance energy is NaN at step 0"):
        guided_generate(broken, P, A, CONCEPTS, num_inference_steps=2)


def test_scheduler_without_alphas_cumprod_is_rejected(pipe):
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    try:
        with pytest.raises(ValueError, match="has no alphas_cumprod"):
            guided_generate(pipe, P, A, CONCEPTS, num_inference_steps=1)
    finally:
        pipe.scheduler = original


def test_retain_freed_memory_is_scoped_nestable_and_can_be_switched_off(monkeypatch):
    from biasmap.mitigation import memory

    if memory._glibc() is None:
        pytest.skip("not glibc: retain_freed_memory is a no-op here")
    with memory.retain_freed_memory() as outer:
        assert outer and memory._depth == 1
        with memory.retain_freed_memory() as inner:
            assert inner and memory._depth == 2
        assert memory._depth == 1
    assert memory._depth == 0
    with memory.retain_freed_memory(enabled=False) as on:
        assert not on and memory._depth == 0
    monkeypatch.setenv(memory.ENV_VAR, "0")
    assert not memory.available()
    with memory.retain_freed_memory() as on:
        assert not on and memory._depth == 0


def test_guided_images_do_not_depend_on_the_memory_setting(pipe, monkeypatch):
    kwargs = dict(lambda_=100.0, num_inference_steps=3, generator=_gen(1), output_type="latent")
    retained = guided_generate(pipe, P, A, CONCEPTS, **kwargs)
    monkeypatch.setenv("BIASMAP_RETAIN_FREED_MEMORY", "0")
    kwargs["generator"] = _gen(1)
    default = guided_generate(pipe, P, A, CONCEPTS, **kwargs)
    assert torch.equal(retained.images, default.images)
    assert torch.equal(retained.energies, default.energies)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_guidance_factor_gives_the_same_step_as_eps_guidance(prediction_type):
    """Guidance added in a v- or x0-prediction model's output moves the DDIM step exactly as
    lambda * sqrt(1 - alphabar_t) * grad added to eps does (Algorithm 1)."""
    from biasmap.mitigation.sampler import alphabar, guidance_factor

    config = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    eps_scheduler = DDIMScheduler(**config, prediction_type="epsilon")
    other = DDIMScheduler(**config, prediction_type=prediction_type)
    for scheduler in (eps_scheduler, other):
        scheduler.set_timesteps(20)
    t = eps_scheduler.timesteps[5]
    generator = torch.Generator().manual_seed(0)
    z_t, eps, grad = (
        torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    a = torch.tensor(alphabar(eps_scheduler, t), dtype=torch.float64)
    if prediction_type == "v_prediction":
        output = (eps - (1 - a).sqrt() * z_t) / a.sqrt()  # eps = sqrt(1-a) z_t + sqrt(a) v
    else:
        output = (z_t - (1 - a).sqrt() * eps) / a.sqrt()  # x0
    lam = 50.0
    expected = eps_scheduler.step(eps + lam * math.sqrt(1 - a) * grad, t, z_t).prev_sample
    ours = other.step(output + lam * guidance_factor(other, t) * grad, t, z_t).prev_sample
    # alphas_cumprod is float32 inside the scheduler, so agreement is to float32 precision.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_sampler_drives_the_pipeline_through_the_registered_adapter(pipe, monkeypatch):
    """The loop is family-agnostic: a new adapter registered in ADAPTERS receives every
    denoiser call, with the CFG rows as Conditioning, and nothing else touches the UNet."""
    from biasmap.mitigation import adapters

    calls = []

    class RecordingAdapter(adapters.UNetAdapter):
        def denoise_scaled(self, sample, timestep, conditioning):
            calls.append((sample.shape[0], conditioning.rows, torch.is_grad_enabled()))
            return super().denoise_scaled(sample, timestep, conditioning)

    kwargs = dict(num_inference_steps=2, generator=_gen(1), output_type="latent")
    expected = guided_generate(pipe, P, A, CONCEPTS, guidance_steps=[1], **kwargs)
    monkeypatch.setattr(adapters, "ADAPTERS", [RecordingAdapter])
    kwargs["generator"] = _gen(1)
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    try:
        ours = guided_generate(pipe, P, A, CONCEPTS, guidance_steps=[1], **kwargs)
    finally:
        hook.remove()
    assert len(unet_calls) == len(calls)
    assert torch.equal(ours.images, expected.images)
    # Step 0 unguided: one CFG batch of 2 rows. Step 1 guided: the unconditional row without
    # grad, then the conditional row with autograd.
    assert calls == [(2, 2, False), (1, 1, False), (1, 1, True)]


def test_a_pipeline_without_an_adapter_is_rejected_by_name():
    class NotAPipeline:
        pass

    with pytest.raises(TypeError, match="supports diffusers StableDiffusionPipeline.*NotAPipeline"):
        guided_generate(NotAPipeline(), P, A, CONCEPTS, num_inference_steps=1)
