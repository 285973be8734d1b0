"""The UNet work inside a guided step, without any attribution work: the floor of guided/plain.

A plain CFG step is one no-grad UNet forward on batch 2 (F2). A guided step runs the unguided
half without grad (F1), the guided half while recording autograd (F1g) and the backward of that
half to the latent (B), weights frozen. (F1 + F1g + B) / F2 is the least guided/plain can be
with exact gradients; (F2 + B) / F2 what it would be if splitting the batch cost nothing.

On CPU the passes run inside biasmap.mitigation.memory.retain_freed_memory(), as in
guided_generate (--malloc default measures glibc's default behaviour, where every pass
page-faults its buffers back in).

    PYTHONPATH=. python bench/unet_breakdown.py [--side 32] [--device cpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from biasmap import models
from biasmap.mitigation.memory import retain_freed_memory


def seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=32, help="latent side (32: 256 px)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--malloc", default="retain", choices=("retain", "default"))
    args = parser.parse_args()
    with retain_freed_memory(enabled=args.malloc == "retain" and args.device == "cpu"):
        measure(args)


def measure(args) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    unet = models.random_sd15(0, dtype=dtype, device=device).unet.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    latents = torch.randn(2, 4, args.side, args.side, generator=gen).to(device, dtype)
    timestep = torch.tensor(500, device=device)

    def forward(z, emb):
        return unet(z, timestep, encoder_hidden_states=emb).sample

    def forward_with_grad():
        z = latents[:1].clone().requires_grad_()
        return z, forward(z, embeds[:1])

    def forward_backward():
        z, out = forward_with_grad()
        return torch.autograd.grad(out.float().square().sum(), z)

    with torch.no_grad():
        f2 = seconds(lambda: forward(latents, embeds), args.repeats, device)
        f1 = seconds(lambda: forward(latents[:1], embeds[:1]), args.repeats, device)
    f1g = seconds(forward_with_grad, args.repeats, device)
    backward = seconds(forward_backward, args.repeats, device) - f1g
    where = f"{args.side}x{args.side} latent, {args.dtype}, {device}, malloc {args.malloc}"
    print(f"SD1.5 UNet, {where}:")
    print(f"  F2 (batch 2, no grad)      {f2:.3f} s")
    print(f"  F1 (batch 1, no grad)      {f1:.3f} s")
    print(f"  F1g (batch 1, autograd)    {f1g:.3f} s")
    print(f"  B (backward to the latent) {backward:.3f} s")
    print(f"  (F1 + F1g + B) / F2 = {(f1 + f1g + backward) / f2:.2f}")
    print(f"  (F2 + B) / F2       = {(f2 + backward) / f2:.2f}")


if __name__ == "__main__":
    main()
