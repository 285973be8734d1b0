"""Where an eager op call's time goes on a GPU: host overhead against the kernels' own time.

For soft_topk (64 x 4096, exact), resize_aggregate (15 SD1.5 maps to 64 x 64) and
attention_slice (the 64 x 64 layer), each fwd+bwd is timed eagerly with and without
biasmap.ops.skip_value_checks() (the NaN checks are host syncs), then profiled with
torch.profiler: the top host-side entries and the top GPU kernels.

    PYTHONPATH=. python bench/gpu_overhead.py > bench/results/gpu_overhead_<gpu>.txt
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from biasmap import ops

SD15_MAP_SIDES = (64,) * 5 + (32,) * 5 + (16,) * 5


def cases(device: torch.device) -> dict[str, Callable[[], object]]:
    x = torch.rand(64, 4096, device=device, requires_grad=True)
    maps = [torch.rand(2, 2, s, s, device=device, requires_grad=True) for s in SD15_MAP_SIDES]
    q = torch.randn(2, 4096, 320, device=device, requires_grad=True)
    k = torch.randn(2, 77, 320, device=device, requires_grad=True)
    token_index = torch.tensor([9, 10], device=device)
    key_mask = (torch.arange(77, device=device) < 12).repeat(2, 1)

    def topk():
        out = ops.soft_topk(x, 1228, 0.1)
        return torch.autograd.grad(out, x, torch.ones_like(out))

    def resize():
        out = ops.resize_aggregate(maps, 64)
        return torch.autograd.grad(out, maps, torch.ones_like(out))

    def attention():
        out = ops.attention_slice(q, k, token_index, num_heads=8, key_mask=key_mask, validate=False)
        return torch.autograd.grad(out, (q, k), torch.ones_like(out))

    return {
        "soft_topk 64x4096 fwd+bwd": topk,
        "resize_aggregate 15 maps -> 64 fwd+bwd": resize,
        "attention_slice 64x64 layer fwd+bwd": attention,
    }


def eager_us(fn: Callable[[], object], calls: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_overhead.py needs a CUDA device")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    for name, fn in cases(device).items():
        checked = eager_us(fn)
        with ops.skip_value_checks():
            unchecked = eager_us(fn)
        print(f"{name}: eager {checked:.0f} us; without value checks {unchecked:.0f} us")
    for name, fn in cases(device).items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        print(f"\n## {name} (20 calls)\n")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        print(
            averages.table(sort_by="self_device_time_total", row_limit=6, max_name_column_width=60)
        )


if __name__ == "__main__":
    main()
