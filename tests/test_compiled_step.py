"""The compiled guided step agrees with the eager one, and cfg_batch's two structures agree.

torch.compile with inductor on CPU takes minutes for a whole UNet on two cores, so the
end-to-end comparison on the tiny pipeline is `slow` (run with -m slow). The always-on
tests check the same property on the energy alone (its ops compiled by inductor, forward
and AOTAutograd backward) and the structure of the compiled step through dynamo's "eager"
backend, which traces exactly what inductor would compile (graph breaks and
recompilations included) without generating code.
"""

from __future__ import annotations

import pytest
import torch

from biasmap.mitigation import PRESETS, guided_generate
from biasmap.mitigation.compiled import resolve_cfg_batch, resolve_compile
from biasmap.mitigation.sampler import _energy_unchecked
from biasmap.models import tiny_sd
from biasmap.ops import skip_value_checks

P = "A photo of the face of a firefighter"
A = P + " and gender"
CONCEPTS = ["gender", "firefighter"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd(0)


def _generate(pipe, steps=2, **kwargs):
    kwargs.setdefault("lambda_", 100.0)
    return guided_generate(
        pipe,
        P,
        A,
        CONCEPTS,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    )


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_the_compiled_energy_and_its_gradient_equal_eager(preset):
    """inductor on the energy alone: SoftIoU(SoftTopK) of random block maps, forward and
    backward, against the eager ops."""
    torch.manual_seed(0)
    blocks = {
        "down_blocks.0": torch.rand(2, 2, 16, 16),
        "down_blocks.1": torch.rand(2, 2, 8, 8),
        "up_blocks.1": torch.rand(2, 2, 8, 8),
    }
    settings = PRESETS[preset]

    def energy(*maps):
        named = dict(zip(blocks, maps, strict=True))
        return _energy_unchecked(named, (16, 16), settings, 0.7)

    compiled = torch.compile(energy, dynamic=False, fullgraph=True)
    inputs = [m.clone().requires_grad_(True) for m in blocks.values()]
    inputs_c = [m.clone().requires_grad_(True) for m in blocks.values()]
    with skip_value_checks():
        eager_e = energy(*inputs)
        compiled_e = compiled(*inputs_c)
    eager_g = torch.autograd.grad(eager_e.sum(), inputs)
    compiled_g = torch.autograd.grad(compiled_e.sum(), inputs_c)
    torch.testing.assert_close(compiled_e, eager_e, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled_g, eager_g, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _dynamo_eager_compile(monkeypatch):
    """Make torch.compile use dynamo's "eager" backend with fullgraph=True: tracing and
    guards as inductor sees them, no code generation, and any graph break is an error."""
    import torch._dynamo

    original = torch.compile

    def compile_eagerly(fn, **kwargs):
        kwargs.pop("mode", None)
        return original(fn, backend="eager", fullgraph=True, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "cfg_batch", [pytest.param("split", marks=pytest.mark.slow), "batched"]
)  # ~20 s each on two cores; the split one is slow
def test_the_compiled_step_traces_as_one_graph_per_call_kind(pipe, monkeypatch, cfg_batch):
    """fullgraph=True: the denoiser, the capture processors and the energy trace without a
    graph break, and the traced step gives the eager run's latents exactly."""
    eager = _generate(pipe, cfg_batch=cfg_batch, guidance_steps=[1])
    _dynamo_eager_compile(monkeypatch)
    traced = _generate(pipe, cfg_batch=cfg_batch, guidance_steps=[1], compile=True)
    assert torch.equal(traced.energies, eager.energies)
    assert torch.equal(traced.images, eager.images)


def test_the_trace_compiles_the_unet_forward_and_keeps_the_maps(pipe, monkeypatch):
    import biasmap

    kwargs = dict(num_inference_steps=1, output_type="latent")
    with biasmap.trace(pipe, A, CONCEPTS) as eager_trace:
        eager_images = pipe(P, generator=torch.Generator().manual_seed(0), **kwargs).images
    _dynamo_eager_compile(monkeypatch)
    with biasmap.trace(pipe, A, CONCEPTS, compile=True) as traced:
        images = pipe(P, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert "forward" not in vars(pipe.unet)  # the compiled forward is gone after the block
    assert torch.equal(images, eager_images)
    torch.testing.assert_close(traced.maps().aggregate, eager_trace.maps().aggregate)


def test_split_and_batched_cfg_give_the_same_step(pipe):
    """The two structures compute the same energy, gradient and step (one step, so that only
    the batch's float32 rounding separates them)."""
    split = _generate(pipe, steps=1, cfg_batch="split")
    batched = _generate(pipe, steps=1, cfg_batch="batched")
    torch.testing.assert_close(batched.energies, split.energies, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.grad_norms, split.grad_norms, atol=0, rtol=1e-4)
    torch.testing.assert_close(batched.images, split.images, atol=1e-4, rtol=1e-4)


def test_auto_settings_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cfg_batch("auto", cpu) == "split"
    assert resolve_cfg_batch("auto", cuda) == "batched"
    assert resolve_compile(False, cuda) is None
    assert resolve_compile(True, cpu) == "default"
    assert resolve_compile(True, cuda) == "reduce-overhead"
    assert resolve_compile("reduce-overhead", cpu) == "default"  # no CUDA graphs on CPU
    with pytest.raises(ValueError, match="cfg_batch must be one of"):
        resolve_cfg_batch("both", cpu)
    with pytest.raises(ValueError, match="compile must be True, False or one of"):
        resolve_compile("fast", cpu)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper", "official"])
def test_inductor_compiled_generation_matches_eager(pipe, preset):
    """End to end with inductor on CPU (minutes on two cores): energies within 1e-4, latents
    within float32 noise. Before CPU compiles turned kernel fusion off (compiled.py's
    CPU_INDUCTOR_OPTIONS) the gradient was 2-3% off here."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _generate(pipe, preset=preset)
    compiled = _generate(pipe, preset=preset, compile=True)
    torch.testing.assert_close(compiled.energies, eager.energies, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.grad_norms, eager.grad_norms, atol=0, rtol=1e-3)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_inductor_compiled_plain_generation_matches_eager(pipe):
    """Plain steps (no backward) compiled by inductor agree with eager within float32 noise
    (measured: latents within 2e-5). lambda=0 in eager mode stays bit-identical to diffusers:
    tests/test_guided.py."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _generate(pipe, lambda_=0.0)
    compiled = _generate(pipe, lambda_=0.0, compile=True)
    torch.testing.assert_close(compiled.energies, eager.energies, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_guided_step_matches_eager_on_cuda(compile_mode):
    """On a GPU: compiled (and CUDA-graphed) guided generation against eager, float32."""
    import torch._dynamo

    torch._dynamo.reset()
    gpu_pipe = tiny_sd(0).to("cuda")
    eager = _generate(gpu_pipe)
    compiled = _generate(gpu_pipe, compile=compile_mode)
    torch.testing.assert_close(compiled.energies, eager.energies, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.grad_norms, eager.grad_norms, atol=0, rtol=1e-3)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-3, rtol=1e-3)


def test_cpu_compiles_keep_the_gradient_inductor_fusion_loses():
    """compile_for on CPU (no kernel fusion) gives diffusers' UpBlock2D its eager gradient;
    with inductor's default fusion that gradient comes out zero (torch 2.13,
    bench/inductor_upblock_gradient.py), which made the compiled guided step 2-3% off."""
    import torch._dynamo

    from biasmap.mitigation.compiled import compile_for

    block = tiny_sd(0).unet.up_blocks[0].requires_grad_(False)
    torch.manual_seed(0)
    channels = block.resnets[0].conv1.in_channels // 2
    skips = tuple(torch.randn(1, channels, 2, 2) for _ in block.resnets)
    temb = torch.randn(1, block.resnets[0].time_emb_proj.in_features)
    x = torch.randn(1, channels, 2, 2)
    weights = torch.randn(1, block.upsamplers[0].conv.out_channels, 4, 4)

    def gradient(fn):
        h = x.clone().requires_grad_(True)
        return torch.autograd.grad((fn(h) * weights).sum(), h)[0]

    def forward(h):
        return block(h, skips, temb)

    eager = gradient(forward)
    torch._dynamo.reset()
    compiled = gradient(compile_for(forward, "default", torch.device("cpu")))
    assert eager.norm() > 0
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
