"""A guided sampler step reads nothing back to the host.

Every `.item()`, `bool(tensor)`, `.cpu()` ... inside a step is a device synchronisation
on a GPU, which stalls the launch queue and cannot be captured in a CUDA graph. On CPU
the `HostReadGuard` below fails on every tensor-to-Python conversion while a step runs
(`biasmap.mitigation.sampler._step_output`: the denoiser calls, the energy, its gradient,
CFG, Fair Diffusion and the guidance term; the scheduler's own step is diffusers' and
not part of it). On CUDA, `torch.cuda.set_sync_debug_mode("error")` checks the same.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from biasmap.mitigation import guided_generate, sampler
from biasmap.models import tiny_sd

P = "A photo of the face of a firefighter"
A = P + " and gender"
CONCEPTS = ["gender", "firefighter"]

# Tensor -> Python conversions and data-dependent shapes: each is a host sync on a GPU.
HOST_READS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "nonzero",
    "masked_select",
    "unique",
}


class HostReadError(AssertionError):
    pass


class HostReadGuard(TorchFunctionMode):
    """Raise HostReadError on any tensor-to-Python conversion (or data-dependent shape)
    while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise HostReadError(f"host read inside a guided step: Tensor.{name}")
        if name == "__getitem__" and _has_bool_tensor_index(args[1:]):
            raise HostReadError("host read inside a guided step: boolean-mask indexing")
        if name == "to" and _names_cpu(args[1:], kwargs) and args[0].device.type != "cpu":
            raise HostReadError("host read inside a guided step: Tensor.to(cpu)")
        return func(*args, **kwargs)


def _has_bool_tensor_index(index) -> bool:
    items = index[0] if index and isinstance(index[0], tuple) else index
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _names_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str | torch.device) and torch.device(target).type == "cpu"


def _guard_steps(monkeypatch, make_guard, from_step: int = 0):
    """Run every `_step_output` from `from_step` on inside the guard; returns the list of
    guarded step indices."""
    original = sampler._step_output
    steps = []

    def guarded(run, step, t, latents):
        if step < from_step:
            return original(run, step, t, latents)
        with make_guard():
            output = original(run, step, t, latents)
        steps.append(step)
        return output

    monkeypatch.setattr(sampler, "_step_output", guarded)
    return steps


def test_the_guard_catches_each_kind_of_host_read():
    x = torch.ones(3)
    reads = [
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: float(x[0]),
        lambda: int(x[0]),
        lambda: x.tolist(),
        lambda: x.cpu(),
        lambda: x.numpy(),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: [1, 2, 3][x[0].long()],
    ]
    for read in reads:
        with HostReadGuard(), pytest.raises(HostReadError):
            read()
    with HostReadGuard():  # device-side work passes
        torch.where(x > 0, x * 2, torch.zeros_like(x)).norm()


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(preset="paper", cfg_batch="split"),
        dict(preset="paper", cfg_batch="batched"),
        # The authors' preset: unconditional half, Sinkhorn, and the ||grad|| < 1 gate.
        dict(preset="official", cfg_batch="split"),
        dict(preset="paper", guidance_scale=1.0),  # no CFG: one row set, with autograd
        dict(preset="paper", blocks=["down-16"]),  # block targeting: the graph cutoff
        dict(preset="paper", guidance_steps=[1]),  # an unguided step, then a guided one
    ],
    ids=["split", "batched", "official", "no-cfg", "targeted", "mixed"],
)
def test_a_guided_step_makes_no_host_reads(pipe, monkeypatch, kwargs):
    guarded = _guard_steps(monkeypatch, HostReadGuard)
    out = guided_generate(
        pipe, P, A, CONCEPTS, num_inference_steps=2, output_type="latent", lambda_=100.0, **kwargs
    )
    assert guarded == [0, 1]
    assert torch.isfinite(out.energies).all()


def test_the_official_gate_is_applied_on_the_device(pipe, monkeypatch):
    """The gate (guidance only where ||dE/dz_t|| < 1) decides per image without a host read:
    with the gate at 0 no image is guided, so the latents equal the lambda=0 run's (the
    batched CFG forward is the plain step's own batch, so bit for bit)."""
    from biasmap.mitigation import PRESETS

    _guard_steps(monkeypatch, HostReadGuard)
    closed = PRESETS["official"].override(grad_norm_gate=0.0)
    kwargs = dict(num_inference_steps=2, output_type="latent", generator=torch.Generator())
    gated = guided_generate(
        pipe, P, A, CONCEPTS, lambda_=100.0, preset=closed, cfg_batch="batched", **kwargs
    )
    kwargs["generator"] = torch.Generator()
    plain = guided_generate(pipe, P, A, CONCEPTS, lambda_=0.0, preset=closed, **kwargs)
    assert not gated.applied.any() and (gated.grad_norms > 0).all()
    assert torch.equal(gated.images, plain.images)
    kwargs["generator"] = torch.Generator()
    opened = PRESETS["official"].override(grad_norm_gate=float("inf"))
    guided = guided_generate(
        pipe, P, A, CONCEPTS, lambda_=100.0, preset=opened, cfg_batch="batched", **kwargs
    )
    assert guided.applied.all() and not torch.equal(guided.images, plain.images)


def test_nan_is_reported_once_at_the_end_naming_its_first_step(monkeypatch):
    """The NaN check reads the energies back every NAN_CHECK_EVERY steps and at the end,
    never inside a step, and names the first step whose energy is NaN."""
    broken = tiny_sd(0)
    _guard_steps(monkeypatch, HostReadGuard)
    calls = {"step": 0}
    original = sampler._step_output

    def nan_from_step_one(run, step, t, latents):
        if step == 1:
            with torch.no_grad():
                broken.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
        calls["step"] = step
        return original(run, step, t, latents)

    monkeypatch.setattr(sampler, "_step_output", nan_from_step_one)
    with pytest.raises(ValueError, match="guidance energy is NaN at step 1"):
        guided_generate(broken, P, A, CONCEPTS, num_inference_steps=3, output_type="latent")
    assert calls["step"] == 2  # the run went on to its end (3 < NAN_CHECK_EVERY steps)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg_batch", ["split", "batched"])
@pytest.mark.parametrize("preset", ["paper", "official"])
def test_a_guided_step_does_not_synchronise_the_gpu(monkeypatch, cfg_batch, preset):
    import contextlib

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    gpu_pipe = tiny_sd(0).to("cuda")
    # Step 0 warms up (lazy initialisation: cuBLAS handles, K' caches); steps 1-2 are checked.
    guarded = _guard_steps(monkeypatch, sync_errors, from_step=1)
    out = guided_generate(
        gpu_pipe,
        P,
        A,
        CONCEPTS,
        num_inference_steps=3,
        output_type="latent",
        preset=preset,
        cfg_batch=cfg_batch,
    )
    assert guarded == [1, 2] and torch.isfinite(out.energies).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_mmdit_guided_step_makes_no_host_reads(request, monkeypatch, family):
    """The same through DiTAdapter. Flux's first transformer call of a generation reads its
    token grid from img_ids once (the trace's layout), so its steps are guarded from step 1."""
    pipe = request.getfixturevalue(family)
    guarded = _guard_steps(monkeypatch, HostReadGuard, from_step=1 if family == "flux" else 0)
    out = guided_generate(pipe, P, A, CONCEPTS, num_inference_steps=3, output_type="latent")
    assert guarded == ([1, 2] if family == "flux" else [0, 1, 2])
    assert torch.isfinite(out.energies).all()
