"""Energy guidance on flow-matching MM-DiTs (tiny SD3 and Flux, CPU): the velocity form of
the eps-defined guidance term, bit-identity at lambda=0, the gradient, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from biasmap import models  # noqa: E402
from biasmap.mitigation import PRESETS, guided_generate  # noqa: E402
from biasmap.mitigation.adapters import adapter_for  # noqa: E402
from biasmap.mitigation.dit_adapter import flow_guidance_factor  # noqa: E402
from biasmap.mitigation.sampler import step_energy  # noqa: E402

P = "a photo of the face of a firefighter"
A = P + " and gender"
CONCEPTS = ["gender", "firefighter"]
TEXT_LENGTH = 16


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_guided_velocity_gives_the_euler_step_that_guided_eps_implies(step):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    sigma, sigma_next = float(scheduler.sigmas[step]), float(scheduler.sigmas[step + 1])
    x_t, velocity, grad = (
        torch.randn(1, 4, 8, 8, generator=_gen(s), dtype=torch.float64) for s in (1, 2, 3)
    )
    lambda_ = 3.0
    # In the noise parameterisation: x_t = (1 - s) x0 + s eps, v = eps - x0.
    eps = x_t + (1 - sigma) * velocity
    eps_guided = eps + lambda_ * sigma * grad
    x0_guided = (x_t - sigma * eps_guided) / (1 - sigma)  # x_t held fixed
    expected = (1 - sigma_next) * x0_guided + sigma_next * eps_guided
    # In the model's parameterisation, through the scheduler's own Euler step.
    scheduler._step_index = step
    guided_velocity = velocity + lambda_ * flow_guidance_factor(sigma) * grad
    actual = scheduler.step(guided_velocity, scheduler.timesteps[step], x_t).prev_sample
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_guidance_factor_is_zero_where_sigma_is_one():
    # x_t is pure noise there: eps = x_t whatever the model predicts.
    assert flow_guidance_factor(1.0) == 0.0
    assert flow_guidance_factor(0.25) == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lambda_zero_is_bit_identical_to_the_diffusers_pipeline(name, sd3, flux):
    pipe = {"sd3": sd3, "flux": flux}[name]
    # No guidance_scale given: SD3's preset CFG 7.5 against the pipeline at 7.5; Flux's
    # guidance embedding at FluxPipeline's default 3.5, no CFG batch.
    ours = guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        lambda_=0.0,
        num_inference_steps=3,
        generator=_gen(3),
        output_type="np",
    )
    kwargs = {"guidance_scale": 7.5} if name == "sd3" else {}
    theirs = pipe(P, num_inference_steps=3, generator=_gen(3), output_type="np", **kwargs).images
    assert np.array_equal(ours.images, theirs)
    assert ours.grad_norms.abs().sum() == 0 and not ours.applied.any()
    assert ours.settings.guidance_scale == (7.5 if name == "sd3" else 3.5)


def _energy_at(pipe, latents, attribution=A, concepts=CONCEPTS):
    adapter = adapter_for(pipe)
    adapter.max_sequence_length = TEXT_LENGTH
    conditioning, _ = adapter.encode(P, 1, False, None, (64, 64))
    timesteps = adapter.set_timesteps(4, (64, 64))
    return step_energy(
        pipe,
        latents,
        timesteps[1],
        conditioning,
        attribution,
        concepts,
        preset=PRESETS["paper"].override(tau=0.2),
    )


@pytest.fixture(scope="module")
def sd3_64():
    """Tiny SD3 in float64 throughout. diffusers' RMSNorm computes its variance in float32
    whatever the input, which would put ~1e-7 noise into every central difference; its
    float64 twin (same weights, same eps) keeps the check at float64 precision."""
    from diffusers.models.normalization import RMSNorm

    pipe = models.tiny_sd3(0).to(torch.float64)
    for module in list(pipe.transformer.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                twin = torch.nn.RMSNorm(child.weight.shape[0], eps=child.eps, dtype=torch.float64)
                twin.weight.data.copy_(child.weight.data)
                setattr(module, name, twin)
    return pipe


@pytest.mark.parametrize(
    "attribution,concepts",
    [(A, CONCEPTS), (P, ["face", "firefighter"])],
    ids=["side-stream", "in-prompt"],
)
def test_energy_gradient_equals_central_differences_float64(sd3_64, attribution, concepts):
    # The keys depend on z_t as well (text and side stream attend to the image in every
    # block), so this checks the full gradient, not just the queries' part.
    z = torch.randn(1, 16, 8, 8, generator=_gen(5), dtype=torch.float64)
    energy, grad = _energy_at(sd3_64, z, attribution, concepts)
    direction = torch.randn(z.shape, generator=_gen(6), dtype=torch.float64)
    h = 1e-5
    plus, _ = _energy_at(sd3_64, z + h * direction, attribution, concepts)
    minus, _ = _energy_at(sd3_64, z - h * direction, attribution, concepts)
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum()
    assert float(analytic.abs()) > 1e-6, "the gradient vanished; the test would prove nothing"
    torch.testing.assert_close(numeric[0], analytic, rtol=1e-6, atol=1e-12)


def test_small_step_along_minus_gradient_lowers_energy(sd3_64):
    z = torch.randn(1, 16, 8, 8, generator=_gen(7), dtype=torch.float64)
    energy, grad = _energy_at(sd3_64, z)
    lowered, _ = _energy_at(sd3_64, z - 1e-3 * grad / grad.norm())
    assert float(lowered) < float(energy)


def test_flux_energy_gradient_points_downhill(flux):
    z = torch.randn(1, 16, 64, generator=_gen(8))
    energy, grad = _energy_at(flux, z)
    assert grad.shape == z.shape and float(grad.norm()) > 0
    lowered, _ = _energy_at(flux, z - 1e-2 * grad / grad.norm())
    assert float(lowered) < float(energy)


def test_guidance_changes_the_run_except_at_sigma_one(flux):
    kwargs = dict(num_inference_steps=3, generator=None, output_type="np")
    plain = guided_generate(flux, P, A, CONCEPTS, lambda_=0.0, **{**kwargs, "generator": _gen(1)})
    guided = guided_generate(
        flux, P, A, CONCEPTS, lambda_=100.0, **{**kwargs, "generator": _gen(1)}
    )
    assert (guided.grad_norms > 0).all() and torch.isfinite(guided.energies).all()
    assert not np.array_equal(guided.images, plain.images)
    assert guided.maps is not None and list(guided.maps.blocks)[-1] == "single-1"
    # The first step is at sigma = 1, where the guidance factor is 0: guiding only it
    # leaves the images exactly as they were.
    first_only = guided_generate(
        flux,
        P,
        A,
        CONCEPTS,
        lambda_=100.0,
        guidance_steps=[0],
        **{**kwargs, "generator": _gen(1)},
    )
    assert first_only.grad_norms[0].item() > 0
    assert np.array_equal(first_only.images, plain.images)


def test_guided_batch_entries_are_independent(sd3):
    kwargs = dict(lambda_=100.0, num_inference_steps=2, output_type="np")
    pair = guided_generate(sd3, [P, P], A, CONCEPTS, generator=[_gen(0), _gen(1)], **kwargs)
    single = guided_generate(sd3, P, A, CONCEPTS, generator=_gen(1), **kwargs)
    np.testing.assert_allclose(pair.images[1], single.images[0], atol=1e-5)
    torch.testing.assert_close(pair.energies[:, 1], single.energies[:, 0], rtol=1e-4, atol=1e-7)


def test_flux_refuses_a_negative_prompt(flux):
    with pytest.raises(ValueError, match="Flux has no CFG batch"):
        guided_generate(flux, P, A, CONCEPTS, negative_prompt="blurry", num_inference_steps=2)
