"""Cost of biasmap.trace: traced against plain generation, time and memory.

Cases (DESIGN.md section 3 explains the sizes):
  tiny      tiny_sd, 16x16 latent (128 px), 5 steps, CPU fp32
  tiny-sd3, tiny-flux  the tiny MM-DiTs, 8x8 latent (64 px), 5 steps, CPU fp32 (for Flux,
            guidance_scale is its guidance embedding; it has no CFG batch)
  sd15-cpu  the full SD1.5 architecture, random weights, 32x32 latent (256 px), 2 steps, CPU fp32
  sd15-gpu  the same at a 64x64 latent (512 px), fp16, on CUDA (only when a GPU is present)
  mid-sd3, mid-flux  a width-256 random MM-DiT with the tiny text encoders (bench/dit_cases.py)
            at a 64x64 latent (512 px): 1024 image tokens against 333 (SD3) or 512 (Flux) text
            tokens, the ratio of real generations, 3 steps, CPU fp32
  sd35m-gpu, flux-dev-gpu  the released SD3.5-medium / Flux.1-dev transformers (random
            weights, bf16) at a 128x128 latent (1024 px), 28 steps, on CUDA only

On the MM-DiTs the attribution prompt differs from the generation prompt, so the trace runs
P' as a side stream through every block; "traced_in_prompt" traces the generation prompt
itself (concepts "face" and "firefighter": the in-prompt keys, no side stream), which
separates the side stream's cost from the rest of the trace's.

Every case uses CFG 7.5, batch 1 and output_type="latent" (no VAE decode, which would dilute the
overhead). "traced" times the whole `with biasmap.trace(...): pipe(...)` block plus `tr.maps()`:
encoding the attribution prompt, installing and restoring the processors, capture and resize.
Plain and traced runs alternate, so drift in machine load hits both alike; the ratio is the
median of the per-pair ratios. Memory: bytes of the captured running sums per image after 1 step
and after all steps (flat = independent of the number of steps), the AttributionMaps at S=64, and
peak memory (CUDA: max allocated; CPU: peak RSS, reset through /proc/self/clear_refs).
On CPU the process CPU time of each run is recorded too: on a shared machine it is a steadier
measure of the work than wall time.

Prints a markdown table and appends CSV rows (kernel, provider, mode, size, p50, p20, p80, unit,
device, versions) to bench/results/discovery.csv.

    PYTHONPATH=. python bench/bench_discovery.py --cases tiny,sd15-cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from dit_cases import dit_pipeline  # noqa: E402

import biasmap  # noqa: E402
from biasmap import models  # noqa: E402

PROMPT = "A photo of the face of a firefighter"
ATTRIBUTION = "A photo of the face of a firefighter and gender"
CONCEPTS = ["gender", "firefighter"]
IN_PROMPT_CONCEPTS = ["face", "firefighter"]  # words of PROMPT itself
RESULTS = Path(__file__).resolve().parent / "results" / "discovery.csv"

CASES = {
    # name: (builder, latent side, steps, dtype, device, default repeats)
    "tiny": (lambda dtype, device: models.tiny_sd(0).to(device), 16, 5, torch.float32, "cpu", 9),
    # MM-DiTs: 8x8 latent (64 px, a 4x4 token grid), T5 stream at the pipelines' default length.
    "tiny-sd3": (
        lambda dtype, device: models.tiny_sd3(0).to(device),
        8,
        5,
        torch.float32,
        "cpu",
        9,
    ),
    "tiny-flux": (
        lambda dtype, device: models.tiny_flux(0).to(device),
        8,
        5,
        torch.float32,
        "cpu",
        9,
    ),
    "sd15-cpu": (
        lambda dtype, device: models.random_sd15(0, dtype=dtype, device=device),
        32,
        2,
        torch.float32,
        "cpu",
        3,
    ),
    "mid-sd3": (
        lambda dtype, device: dit_pipeline("sd3", "mid", dtype, device),
        64,
        3,
        torch.float32,
        "cpu",
        5,
    ),
    "mid-flux": (
        lambda dtype, device: dit_pipeline("flux", "mid", dtype, device),
        64,
        3,
        torch.float32,
        "cpu",
        5,
    ),
    "sd35m-gpu": (
        lambda dtype, device: dit_pipeline("sd3", "full", dtype, device),
        128,
        28,
        torch.bfloat16,
        "cuda",
        5,
    ),
    "flux-dev-gpu": (
        lambda dtype, device: dit_pipeline("flux", "full", dtype, device),
        128,
        28,
        torch.bfloat16,
        "cuda",
        5,
    ),
    "sd15-gpu": (
        lambda dtype, device: models.random_sd15(0, dtype=dtype, device=device),
        64,
        50,
        torch.float16,
        "cuda",
        5,
    ),
}


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) with linear interpolation; a single value repeats."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")  # deciles p10..p90
    return statistics.median(values), cuts[1], cuts[7]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_case(name: str, repeats: int | None, steps: int | None) -> list[dict]:
    builder, latent, default_steps, dtype, device, default_repeats = CASES[name]
    steps = steps or default_steps
    repeats = repeats or default_repeats
    pipe = builder(dtype, device)
    side = latent * pipe.vae_scale_factor
    call = dict(
        num_inference_steps=steps, guidance_scale=7.5, height=side, width=side, output_type="latent"
    )

    def plain():
        generator = torch.Generator(device="cpu").manual_seed(0)
        return pipe(PROMPT, generator=generator, **call).images

    def traced(attribution=ATTRIBUTION, concepts=CONCEPTS, **trace_kwargs):
        generator = torch.Generator(device="cpu").manual_seed(0)
        with biasmap.trace(pipe, attribution, concepts, **trace_kwargs) as tr:
            latents = pipe(PROMPT, generator=generator, **call).images
        return latents, tr, tr.maps()

    def traced_in_prompt():
        return traced(PROMPT, IN_PROMPT_CONCEPTS)

    runners = [("plain", plain), ("traced", traced)]
    if hasattr(pipe, "transformer"):  # MM-DiTs: also without the side stream
        runners.append(("traced_in_prompt", traced_in_prompt))

    # Warm-up (lazy initialisations, allocator) and equality check.
    with torch.inference_mode():
        reference = plain()
        latents, tr, maps = traced()
    identical = bool(torch.equal(reference, latents))
    times = {label: [] for label, _ in runners}
    cpu_times = {label: [] for label, _ in runners}
    with torch.inference_mode():
        if len(runners) > 2:
            runners[2][1]()  # its warm-up
        for _ in range(repeats):
            for label, runner in runners:
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                runner()
                synchronize(device)
                times[label].append(time.perf_counter() - start)
                cpu_times[label].append(time.process_time() - start_cpu)
        reset_peak(device)
        plain()
        synchronize(device)
        plain_peak = peak_mib(device)
        reset_peak(device)
        _, tr, maps = traced()
        synchronize(device)
        traced_peak = peak_mib(device)
        one_step_bytes = traced(timesteps=[0])[1].captured_bytes
    series = []
    for suffix, values, unit in (("", times, "s"), ("_cpu_time", cpu_times, "cpu-s")):
        # CPU seconds of this process: on a shared machine they track the work done far
        # better than wall time, which other processes' load inflates at random.
        series.append((f"plain{suffix}", values["plain"], unit))
        for label, _ in runners[1:]:
            ratios = [t / p for p, t in zip(values["plain"], values[label], strict=True)]
            series.append((f"{label}{suffix}", values[label], unit))
            series.append((f"{label}/plain{suffix}", ratios, "ratio"))
    size = f"{name}:{latent}x{latent}:{steps}steps:b1:{str(dtype).replace('torch.', '')}"
    rows = []
    for provider, values, unit in series:
        p50, p20, p80 = quantiles(values)
        rows.append(
            dict(
                kernel="discovery_trace",
                provider=provider,
                mode="e2e",
                size=size,
                p50=p50,
                p20=p20,
                p80=p80,
                unit=unit,
            )
        )
    maps64 = maps.resize(64)
    for provider, value, unit in (
        ("captured_sums_1_step", one_step_bytes, "bytes/image"),
        ("captured_sums_all_steps", tr.captured_bytes, "bytes/image"),
        ("maps_S64", maps64.nbytes(), "bytes/image"),
        ("peak_plain", plain_peak, "MiB"),
        ("peak_traced", traced_peak, "MiB"),
    ):
        rows.append(
            dict(
                kernel="discovery_memory",
                provider=provider,
                mode="e2e",
                size=size,
                p50=value,
                p20=value,
                p80=value,
                unit=unit,
            )
        )
    print(f"[{name}] images bit-identical with and without trace: {identical}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_cases = "tiny,sd15-cpu" + (",sd15-gpu" if torch.cuda.is_available() else "")
    parser.add_argument(
        "--cases", default=default_cases, help=f"comma-separated, from {list(CASES)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed plain/traced pairs per case"
    )
    parser.add_argument("--steps", type=int, default=None, help="override each case's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    on_gpu = [c for c in cases if CASES[c][4] == "cuda"]
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"the case(s) {on_gpu} need CUDA")

    all_rows = []
    for case in cases:
        rows = run_case(case, args.repeats, args.steps)
        for row in rows:
            row.update(
                device=_common.device_name(torch.device(CASES[case][4])),
                versions=_common.versions(),
            )
        all_rows += rows

    print("| case | provider | p50 | p20 | p80 | unit |")
    print("|---|---|---|---|---|---|")
    for row in all_rows:
        fmt = (
            (lambda v: f"{v:.4g}")
            if row["unit"] in ("s", "cpu-s", "ratio", "MiB")
            else (lambda v: f"{int(v)}")
        )
        print(
            f"| {row['size']} | {row['provider']} | {fmt(row['p50'])} | {fmt(row['p20'])} | "
            f"{fmt(row['p80'])} | {row['unit']} |"
        )
    if not args.no_csv:
        _common.append_csv(RESULTS, all_rows)
        print(f"\nappended {len(all_rows)} rows to {os.path.relpath(RESULTS)}", file=sys.stderr)


if __name__ == "__main__":
    main()
