"""Reproduce the CPU inductor gradient error behind tests/test_compiled_step.py's xfail.

inductor (torch 2.13, CPU) compiles diffusers' UpBlock2D (two ResnetBlock2D with a 1x1
shortcut, then Upsample2D) so that its forward is exact but the gradient with respect to
its input is wrong (zero at a 2x2 input, the tiny pipeline's lowest resolution). Every
piece compiled alone (GroupNorm, SiLU, the convolutions, the nearest upsampling, one
resnet, the upsampler) is exact, and the same block under AOTAutograd without inductor
("aot_eager") is exact: the error is in inductor's CPU code generation, not in biasmap.
The compiled guided step inherited it through the UNet's backward; biasmap's CPU compiles
therefore pass max_fusion_size=1 (biasmap.mitigation.compiled.CPU_INDUCTOR_OPTIONS), which
the last rows show exact.

    PYTHONPATH=. python bench/inductor_upblock_gradient.py \
        > bench/results/inductor_upblock_gradient_cpu.md    # about a minute on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from biasmap.models import tiny_sd  # noqa: E402


def gradient_norms(
    block, side: int, backend: str, options: dict | None = None
) -> tuple[float, float, float]:
    """(|forward difference|_max, eager |grad|, compiled |grad|) for a [1, C, side, side] input."""
    torch.manual_seed(0)
    channels = block.resnets[0].conv1.in_channels // 2
    skips = tuple(torch.randn(1, channels, side, side) for _ in block.resnets)
    temb = torch.randn(1, block.resnets[0].time_emb_proj.in_features)
    x = torch.randn(1, channels, side, side)

    def forward(h):
        return block(h, skips, temb)

    weights = torch.randn_like(forward(x))
    results = []
    for fn in (forward, torch.compile(forward, backend=backend, options=options)):
        torch._dynamo.reset()
        h = x.clone().requires_grad_(True)
        out = fn(h)
        (grad,) = torch.autograd.grad((out * weights).sum(), h)
        results.append((out.detach(), grad))
    (out_e, grad_e), (out_c, grad_c) = results
    return float((out_c - out_e).abs().max()), float(grad_e.norm()), float(grad_c.norm())


def main() -> None:
    block = tiny_sd(0).unet.up_blocks[0].requires_grad_(False)
    print(f"torch {torch.__version__}; diffusers UpBlock2D of biasmap.models.tiny_sd(0)")
    print("| backend | input side | max forward diff | eager grad norm | compiled grad norm |")
    print("|---|---|---|---|---|")
    from biasmap.mitigation.compiled import CPU_INDUCTOR_OPTIONS

    for backend, options in (
        ("aot_eager", None),
        ("inductor", None),
        ("inductor", CPU_INDUCTOR_OPTIONS),  # what biasmap's CPU compiles use
    ):
        name = backend + (f" {options}" if options else "")
        for side in (2, 4, 8):
            diff, eager, compiled = gradient_norms(block, side, backend, options)
            print(f"| {name} | {side} | {diff:.1e} | {eager:.4f} | {compiled:.4f} |")


if __name__ == "__main__":
    main()
