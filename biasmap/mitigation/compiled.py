"""How one sampler step's denoiser work runs: eager or under torch.compile, and whether the
CFG batch is split around the gradient or run as one batched forward with autograd.

`StepRunner` is the only place the guided sampler touches torch.compile. Its compiled
region is `_region`: the denoiser on the model input (the capture processors inside it)
and, from this call's captured block maps, the guidance energy. So the energy's ops
(registered with `register_fake`, the Triton ones as `triton_op`s) are traced into the
same graph as the UNet, and AOTAutograd compiles the backward of energy -> z_t. The
model-input scaling (`adapter.scale_input`, e.g. Euler's step-indexed sigma) stays eager,
so the compiled code sees no value that changes from step to step.

torch.compile fixes grad mode when a compiled function is entered, so the no-grad calls
(plain steps, the other CFG half) and the grad call (the guided half) are separate
graphs of the same function; state flags the processors read (capturing, rows) are
guarded the same way. On CUDA, `compile=True` means mode "reduce-overhead": inductor
captures each graph, forward and backward, as a CUDA graph (static shapes; the outputs
are copied out before the next replay overwrites them). That path is written for and has
not yet run on a GPU.

CFG batch (`cfg_batch`):
- "split": the other CFG half and any edit rows in one no-grad call, the guided half in a
  grad call. The backward covers only B rows. Measured faster on CPU, where the cost is
  proportional to the rows computed.
- "batched": one forward over the whole CFG batch with autograd (the processors slice the
  guided rows); the backward runs over all rows, but there is one denoiser launch sequence
  instead of two. Measured faster on an H100 at batch 1, where a step is launch-bound.
- "auto": "batched" on CUDA, "split" elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapters import Conditioning, DenoiserAdapter

CFG_BATCH_MODES = ("auto", "split", "batched")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_cfg_batch(cfg_batch: str, device: torch.device) -> str:
    """The CFG batch mode ("split" or "batched") that `cfg_batch` means on `device`."""
    if cfg_batch not in CFG_BATCH_MODES:
        raise ValueError(f"cfg_batch must be one of {list(CFG_BATCH_MODES)}, got {cfg_batch!r}")
    if cfg_batch == "auto":
        return "batched" if device.type == "cuda" else "split"
    return cfg_batch


def resolve_compile(compile: bool | str, device: torch.device) -> str | None:
    """The torch.compile mode for `compile` on `device`, or None for eager.

    compile: False (eager), True (on CUDA "reduce-overhead", i.e. CUDA graphs; elsewhere
    "default") or one of COMPILE_MODES.
    """
    if compile is False:
        return None
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    if compile not in COMPILE_MODES:
        raise ValueError(
            f"compile must be True, False or one of {list(COMPILE_MODES)}, got {compile!r}"
        )
    if "cudagraphs" not in compile and compile != "default" and device.type != "cuda":
        return "default"  # CUDA graphs need CUDA; max-autotune's GEMM search too
    return compile


# inductor's CPU kernel fusion (torch 2.13) miscompiles the backward of diffusers' UpBlock2D: the
# forward is exact, the gradient with respect to the block's input comes out zero
# (bench/inductor_upblock_gradient.py reproduces it; aot_eager and every sub-module compiled
# alone are exact). Without fusion the compiled guided step matches eager, so CPU compiles
# fuse nothing; CUDA keeps its mode until a GPU run says otherwise.
CPU_INDUCTOR_OPTIONS = {"max_fusion_size": 1}


def compile_for(fn: Callable, mode: str, device: torch.device) -> Callable:
    """fn under torch.compile with static shapes (a new batch shape recompiles): `mode` on
    CUDA; on CPU the default mode with CPU_INDUCTOR_OPTIONS (torch takes a mode or options,
    not both)."""
    if device.type == "cpu":
        return torch.compile(fn, dynamic=False, options=dict(CPU_INDUCTOR_OPTIONS))
    return torch.compile(fn, mode=mode, dynamic=False)


def compiled_forward(module: torch.nn.Module, mode: str = "default") -> Callable:
    """module.forward compiled for its parameters' device (see compile_for)."""
    device = next(module.parameters()).device
    return compile_for(module.forward, mode, device)


def _uses_cuda_graphs(mode: str | None) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


class StepRunner:
    """Runs a guided sampler's denoiser calls, eager or compiled, split or batched CFG.

    capture: the sampler's _StepCapture (processors installed); energy_fn(step_maps) -> E [B]
    from one call's block maps {block key: [B, C, h, w]}; mode: a torch.compile mode or None
    (eager); cfg_batch: "split" or "batched" (see the module docstring).
    """

    def __init__(
        self,
        capture,
        adapter: DenoiserAdapter,
        energy_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        *,
        mode: str | None,
        cfg_batch: str,
    ):
        self.capture = capture
        self.adapter = adapter
        self.energy_fn = energy_fn
        self.mode = mode
        self.cfg_batch = cfg_batch
        self.cuda_graphs = _uses_cuda_graphs(mode) and adapter.device.type == "cuda"
        self._call = self._region
        if mode is not None:
            self._call = compile_for(self._region, mode, adapter.device)

    def _region(self, sample: torch.Tensor, timestep, conditioning: Conditioning):
        """(denoiser output [N, ...], E [B] or None, this call's block maps): the compiled unit."""
        grad_mode = torch.is_grad_enabled()
        output = self.adapter.denoise_scaled(sample, timestep, conditioning)
        # The block-targeting cutoff switched grad off after the last captured layer; the
        # energy needs it back.
        torch.set_grad_enabled(grad_mode)
        step_maps = self.capture._state.pop_step()
        energy = self.energy_fn(step_maps) if step_maps else None
        return output.detach(), energy, {key: m.detach() for key, m in step_maps.items()}

    def begin_step(self) -> None:
        """Call once per sampler step: CUDA-graph replays of the previous step may be reused."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def call(
        self,
        latents: torch.Tensor,
        timestep,
        conditioning: Conditioning,
        *,
        rows: slice,
        capture: bool,
        differentiable: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output [N, ...], E [B] of `rows` or None) for z_t [N, ...] and N rows of conditioning.

        The call's maps are added into the run's sums; E keeps its graph back to `latents`
        when `differentiable` (run under enable_grad).
        """
        state = self.capture._state
        state.capturing, state.rows, state.differentiable = capture, rows, differentiable
        grad_mode = torch.is_grad_enabled()
        try:
            sample = self.adapter.scale_input(latents, timestep)
            output, energy, step_maps = self._call(sample, timestep, conditioning)
        finally:
            # The block-targeting cutoff may have switched grad off inside the call.
            torch.set_grad_enabled(grad_mode)
            state.capturing, state.differentiable = False, False
        if self.cuda_graphs:
            # A CUDA-graph replay overwrites its outputs: keep copies that outlive the step
            # (multistep schedulers keep past outputs).
            output = output.clone()
            step_maps = {key: m.clone() for key, m in step_maps.items()}
        self.capture._state.commit_step(step_maps)
        return output, energy

    def plain(
        self,
        latents: torch.Tensor,
        timestep,
        all_rows: Conditioning,
        rows: slice,
        capture: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Diffusers' own step: one no-grad forward over the CFG batch [uncond, cond, edits].

        latents: z_t [B, ...]; all_rows: copies * B rows. Returns (the copies' outputs, each
        [B, ...], E [B] of the `rows` half, or None without `capture`).
        """
        copies = all_rows.rows // latents.shape[0]
        sample = torch.cat([latents] * copies) if copies > 1 else latents
        output, energy = self.call(sample, timestep, all_rows, rows=rows, capture=capture)
        if energy is not None and self.cuda_graphs:
            energy = energy.clone()
        return list(output.chunk(copies)), energy

    def guided(
        self,
        latents: torch.Tensor,
        timestep,
        cond: Conditioning,
        uncond: Conditioning | None,
        edits: list[Conditioning],
        cfg_half: str,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """A guided step's denoiser work: (outputs [uncond, cond, edits...] each [B, ...] (just
        [cond] without CFG), E [B], dE/dz_t [B, ...]), with autograd from z_t through the
        `cfg_half` rows' captured queries."""
        batch = latents.shape[0]
        use_cfg = uncond is not None
        self.capture.set_cutoff()
        z = latents.detach().requires_grad_(True)
        if not use_cfg or self.cfg_batch == "batched":
            parts = [uncond, cond, *edits] if use_cfg else [cond]
            rows = slice(None)
            if use_cfg:
                rows = slice(batch, 2 * batch) if cfg_half == "cond" else slice(0, batch)
            with torch.enable_grad():
                sample = torch.cat([z] * len(parts)) if len(parts) > 1 else z
                output, energy = self.call(
                    sample,
                    timestep,
                    Conditioning.cat(parts),
                    rows=rows,
                    capture=True,
                    differentiable=True,
                )
                (grad,) = torch.autograd.grad(energy.sum(), z)
            return list(output.chunk(len(parts))), energy.detach(), grad
        guided = cond if cfg_half == "cond" else uncond
        others = ([uncond] if cfg_half == "cond" else [cond]) + list(edits)
        out_others, _ = self.call(
            torch.cat([latents] * len(others)),
            timestep,
            Conditioning.cat(others),
            rows=slice(0, 0),
            capture=False,
        )
        out_others = list(out_others.chunk(len(others)))
        with torch.enable_grad():
            out_guided, energy = self.call(
                z, timestep, guided, rows=slice(None), capture=True, differentiable=True
            )
            (grad,) = torch.autograd.grad(energy.sum(), z)
        if cfg_half == "cond":
            outputs = [out_others[0], out_guided, *out_others[1:]]
        else:
            outputs = [out_guided, *out_others]
        return outputs, energy.detach(), grad
