"""Time per step and peak memory of energy-guided sampling against plain CFG sampling.

Providers, all on the same pipeline, latents and steps:
  diffusers    the pipeline's own __call__ (output_type="latent"): the floor for plain.
  plain        biasmap.guided_generate with lambda_=0, record_energies=False,
               return_maps=False: diffusers' own batched CFG step through our loop.
  plain+maps   lambda_=0 with every step's maps captured and its energy recorded (the
               default of guided_generate; what the H100 run's "plain" row timed).
  guided       biasmap.guided_generate (paper preset): the chosen half with autograd.
  guided@top   the same with blocks=[<top down block>] (down-64 at 512 px), the paper's
               block targeting: the backward stops after that block.
  guided:batched  the guided step as one batched CFG forward with autograd (the CUDA
               default of cfg_batch="auto"); "guided" is the split CFG batch on CPU.
  <p>:compiled  with --compile: the same under torch.compile (mode "default");
  <p>:graphed   with --compile on CUDA: mode "reduce-overhead" (CUDA graphs).
  naive        the authors' code structure, written here: hooks store every attn2 input
               of both CFG halves with autograd, OVAM-style maps are recomputed from
               them every step, a 20-iteration Sinkhorn over the full plan (row-wise),
               autograd through everything. Their flow also generates every seed a
               second time, plainly, for the "original" IoU: "naive per image" adds a
               plain generation to a naive one.

Cases: tiny (the offline tiny pipeline), sd15-cpu (SD1.5 architecture with random
weights, 32x32 latent, 2 steps, fp32) and sd15-gpu (64x64 latent, fp16, when CUDA is
present).

MM-DiT cases (bench/dit_cases.py builds the pipelines): tiny-sd3 and tiny-flux (64 px),
mid-sd3 and mid-flux (a width-256 transformer at 512 px: 1024 image tokens, the token
ratio of real generations), sd35m-gpu and flux-dev-gpu (the released SD3.5-medium and
Flux.1-dev transformers, random weights, bf16, CUDA only). Providers: pipeline (the
diffusers pipeline's own call), plain (guided_generate at lambda_=0: the same images,
plus the maps and energy of every step), guided (every block) and guided@joint-0 (the
first block only: the backward stops there); ratios are against pipeline. The authors'
code has no MM-DiT path, so there is no naive provider. SD3 runs CFG 7.5; Flux its
guidance embedding (3.5) without a CFG batch.

Time per step = wall time of a whole generation (output_type="latent", so no
VAE decode) / steps. Peak memory is measured over one generation with
bench/_common.peak_memory_bytes (CPU: profiler allocation events; CUDA: allocator
peak), above what was live before it, so the model weights are not counted; the
"total" column adds the weights back.

    python bench/bench_guided.py --cases tiny,sd15-cpu [--compile] [--threads N]

Compiled providers are timed after a warm-up generation that compiles them; the compile
time is reported in its own row (kernel "compile", unit s).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from authors_topk import authors_soft_topk  # noqa: E402

from biasmap import models  # noqa: E402
from biasmap.discovery.tokens import concept_positions  # noqa: E402
from biasmap.discovery.trace import _cross_attention_layers  # noqa: E402
from biasmap.mitigation import alphabar, guided_generate  # noqa: E402

PROMPT = "A photo of the face of a firefighter"
ATTRIBUTION = PROMPT + " and gender"
CONCEPTS = ("gender", "firefighter")
RESULTS = Path(__file__).resolve().parent / "results"

# name: (builder(dtype, device), latent side, steps, dtype, device, repeats)
CASES = {
    "tiny": (lambda dtype, device: models.tiny_sd(0), 16, 5, torch.float32, "cpu", 3),
    "sd15-cpu": (
        lambda dtype, device: models.random_sd15(0, dtype=dtype, device=device),
        32,
        2,
        torch.float32,
        "cpu",
        1,
    ),
    "sd15-gpu": (
        lambda dtype, device: models.random_sd15(0, dtype=dtype, device=device),
        64,
        10,
        torch.float16,
        "cuda",
        3,
    ),
}

# name: (family, size, image side in pixels, steps, dtype, device, repeats)
DIT_CASES = {
    "tiny-sd3": ("sd3", "tiny", 64, 5, torch.float32, "cpu", 5),
    "tiny-flux": ("flux", "tiny", 64, 5, torch.float32, "cpu", 5),
    "mid-sd3": ("sd3", "mid", 512, 2, torch.float32, "cpu", 3),
    "mid-flux": ("flux", "mid", 512, 2, torch.float32, "cpu", 3),
    "sd35m-gpu": ("sd3", "full", 1024, 10, torch.bfloat16, "cuda", 3),
    # Flux.1-dev's backward through all 57 blocks at 1024 px would not fit 80 GB.
    "flux-dev-gpu": ("flux", "full", 512, 10, torch.bfloat16, "cuda", 3),
}


class NaiveGuidance:
    """The authors' guided step: stored attn2 inputs, recomputed maps, full-plan Sinkhorn.

    Forward hooks keep every non-mid attn2 layer's input hidden states (both CFG halves,
    with their autograd graph); after the UNet call the unconditional half's maps are
    recomputed from them, OVAM-style (to_q, to_k of P', softmax over P''s real tokens,
    heads summed, bilinear upsampling to the map side, layers summed).
    """

    def __init__(self, pipe, map_side: int):
        self.pipe = pipe
        self.map_side = map_side
        self.layers = [
            attn for key, attn in _cross_attention_layers(pipe.unet) if not key.startswith("mid")
        ]
        tokens = concept_positions(pipe.tokenizer, ATTRIBUTION, CONCEPTS)
        self.columns = [positions[0] for positions in tokens.positions]
        self.real_tokens = tokens.num_real_tokens
        with torch.no_grad():
            self.text_states = pipe.encode_prompt(ATTRIBUTION, pipe.device, 1, False)[0]
        self.stored: list[torch.Tensor] = []
        self.hooks = []

    def __enter__(self):
        for attn in self.layers:
            self.hooks.append(
                attn.register_forward_hook(
                    lambda module, args, kwargs, out: self.stored.append(args[0]),
                    with_kwargs=True,
                )
            )
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def maps(self) -> torch.Tensor:
        """[C, S, S] maps of the unconditional half from the stored hidden states."""
        total = 0
        for attn, hidden in zip(self.layers, self.stored, strict=True):
            query = attn.to_q(hidden[:1])  # OVAM's default: the unconditional half
            keys = attn.to_k(self.text_states)
            heads = attn.heads
            q = query.view(1, -1, heads, query.shape[-1] // heads).transpose(1, 2)
            k = keys.view(1, -1, heads, keys.shape[-1] // heads).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            probs = scores[..., : self.real_tokens].softmax(-1).sum(1)[0]  # [N, L']
            side = int(math.isqrt(probs.shape[0]))
            columns = probs[:, self.columns].T.reshape(1, -1, side, side)
            total = total + torch.nn.functional.interpolate(
                columns, size=(self.map_side, self.map_side), mode="bilinear", align_corners=False
            )
        self.stored = []
        return total[0]

    def generate(self, steps: int, latents: torch.Tensor, lambda_: float = 100.0) -> torch.Tensor:
        pipe = self.pipe
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(PROMPT, pipe.device, 1, True)
        embeds = torch.cat([uncond, cond])
        pipe.scheduler.set_timesteps(steps, device=pipe.device)
        for t in pipe.scheduler.timesteps:
            z = latents.detach().requires_grad_(True)
            with torch.enable_grad(), self:
                sample = pipe.scheduler.scale_model_input(torch.cat([z, z]), t)
                eps = pipe.unet(sample, t, encoder_hidden_states=embeds).sample
                maps = self.maps()
                mask_a = authors_soft_topk(maps[0])  # each map row keeps its own top 30%
                mask_b = authors_soft_topk(maps[1])
                inter = (mask_a * mask_b).sum()
                energy = inter / (mask_a.sum() + mask_b.sum() - inter + 1e-8)
                (grad,) = torch.autograd.grad(energy, z)
            with torch.no_grad():
                eps_uncond, eps_cond = eps.detach().chunk(2)
                guided = eps_uncond + 7.0 * (eps_cond - eps_uncond)
                if grad.norm() < 1.0:
                    guided = guided + lambda_ * math.sqrt(1 - alphabar(pipe.scheduler, t)) * grad
                latents = pipe.scheduler.step(guided, t, latents).prev_sample
        return latents


def run_case(
    name: str, repeats: int | None, compile_modes: list[str], only: set[str] | None = None
) -> list[dict]:
    builder, latent_side, steps, dtype, device, default_repeats = CASES[name]
    repeats = repeats or default_repeats
    pipe = builder(dtype, device)
    side = latent_side * pipe.vae_scale_factor
    top_block = f"down-{latent_side}"
    naive = NaiveGuidance(pipe, latent_side)

    def fresh_latents():
        generator = torch.Generator(device="cpu").manual_seed(0)
        shape = (1, pipe.unet.config.in_channels, latent_side, latent_side)
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def ours(**kwargs):
        return guided_generate(
            pipe,
            PROMPT,
            ATTRIBUTION,
            list(CONCEPTS),
            num_inference_steps=steps,
            latents=fresh_latents(),
            height=side,
            width=side,
            output_type="latent",
            **kwargs,
        )

    def diffusers_call():
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            latents=fresh_latents(),
            height=side,
            width=side,
            guidance_scale=7.5,  # the paper preset's, as ours uses
            output_type="latent",
        ).images

    plain = dict(lambda_=0.0, return_maps=False, record_energies=False)
    providers = {
        "diffusers": diffusers_call,
        "plain": lambda: ours(**plain),
        "plain+maps": lambda: ours(lambda_=0.0),
        "guided": lambda: ours(lambda_=100.0, cfg_batch="split"),
        "guided:batched": lambda: ours(lambda_=100.0, cfg_batch="batched"),
        f"guided@{top_block}": lambda: ours(lambda_=100.0, blocks=[top_block]),
        "naive": lambda: naive.generate(steps, fresh_latents() * pipe.scheduler.init_noise_sigma),
    }
    for mode in compile_modes:
        suffix = "graphed" if mode == "reduce-overhead" else "compiled"
        providers[f"plain:{suffix}"] = lambda mode=mode: ours(**plain, compile=mode)
        providers[f"guided:{suffix}"] = lambda mode=mode: ours(lambda_=100.0, compile=mode)
    if only:
        providers = {k: v for k, v in providers.items() if k in only or k in ("plain", "guided")}
    compile_seconds: dict[str, float] = {}
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    seconds: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    for provider, call in providers.items():
        start = time.perf_counter()
        call()  # warm-up: lazy initialisation, allocator; compiled providers compile here
        if ":" in provider and not provider.endswith(":batched"):
            call()  # the second generation compiles whatever the first did not reach
            compile_seconds[provider] = time.perf_counter() - start
        seconds[provider] = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[provider].append((time.perf_counter() - start) / steps)
        peaks[provider] = _common.peak_memory_bytes(call, torch.device(device))
    size = f"{name}:{latent_side}x{latent_side}:{steps}steps:b1:{str(dtype).removeprefix('torch.')}"
    label, versions = _common.device_name(torch.device(device)), _common.versions()
    rows = []
    plain_p50 = _p(seconds["plain"], 0.5)
    for provider, values in seconds.items():
        p50, p20, p80 = (_p(values, q) * 1e3 for q in _common.QUANTILES)
        rows.append(
            _row("guided_step", provider, "step", size, p50, p20, p80, "ms", label, versions)
        )
        rows.append(
            _row(
                "guided_step",
                f"{provider}/plain",
                "step",
                size,
                *(3 * [p50 / 1e3 / plain_p50]),
                "ratio",
                label,
                versions,
            )
        )
        rows += _memory_rows(provider, peaks[provider], weights, size, label, versions)
    for provider, value in compile_seconds.items():
        rows.append(
            _row("compile", provider, "warm-up", size, *(3 * [value]), "s", label, versions)
        )
    if "naive" not in seconds:
        return rows
    naive_image = _p(seconds["naive"], 0.5) + plain_p50  # their flow adds a plain generation
    ratio_image = naive_image / _p(seconds["guided"], 0.5)
    rows.append(
        _row(
            "guided_image",
            "naive/guided",
            "per-image",
            size,
            ratio_image,
            ratio_image,
            ratio_image,
            "ratio",
            label,
            versions,
        )
    )
    return rows


def run_dit_case(name: str, repeats: int | None) -> list[dict]:
    """plain / guided / guided@joint-0 on an SD3 or Flux pipeline (DIT_CASES)."""
    from dit_cases import dit_pipeline

    family, size_name, side, steps, dtype, device, default_repeats = DIT_CASES[name]
    repeats = repeats or default_repeats
    pipe = dit_pipeline(family, size_name, dtype, device)

    def ours(**kwargs):
        return guided_generate(
            pipe,
            PROMPT,
            ATTRIBUTION,
            list(CONCEPTS),
            num_inference_steps=steps,
            generator=torch.Generator(device="cpu").manual_seed(0),
            height=side,
            width=side,
            output_type="latent",
            **kwargs,
        )

    cfg = {"guidance_scale": 7.5} if family == "sd3" else {}  # Flux: its default 3.5

    def pipeline():
        generator = torch.Generator(device="cpu").manual_seed(0)
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            generator=generator,
            height=side,
            width=side,
            output_type="latent",
            **cfg,
        ).images

    providers = {
        "pipeline": pipeline,
        "plain": lambda: ours(lambda_=0.0, return_maps=False),
        "guided": lambda: ours(lambda_=100.0),
        "guided@joint-0": lambda: ours(lambda_=100.0, blocks=["joint-0"]),
    }
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    seconds, cpu_seconds = _time_alternating(providers, repeats, steps, device)
    peaks = {
        provider: _common.peak_memory_bytes(call, torch.device(device))
        for provider, call in providers.items()
    }
    latent = side // pipe.vae_scale_factor
    size = f"{name}:{latent}x{latent}:{steps}steps:b1:{str(dtype).removeprefix('torch.')}"
    label, versions = _common.device_name(torch.device(device)), _common.versions()
    rows = []
    for provider in providers:
        for kernel, values, unit in (
            ("guided_step", seconds, "ms"),
            ("guided_step_cpu_time", cpu_seconds, "cpu-ms"),
        ):
            if kernel == "guided_step_cpu_time" and device == "cuda":
                continue
            p50, p20, p80 = (_p(values[provider], q) * 1e3 for q in _common.QUANTILES)
            rows.append(_row(kernel, provider, "step", size, p50, p20, p80, unit, label, versions))
            # The ratio of each alternating pair, so drift in machine load cancels out.
            ratios = [
                mine / base for mine, base in zip(values[provider], values["pipeline"], strict=True)
            ]
            r50, r20, r80 = (_p(ratios, q) for q in _common.QUANTILES)
            rows.append(
                _row(
                    kernel,
                    f"{provider}/pipeline",
                    "step",
                    size,
                    r50,
                    r20,
                    r80,
                    "ratio",
                    label,
                    versions,
                )
            )
        rows += _memory_rows(provider, peaks[provider], weights, size, label, versions)
    return rows


def _time_alternating(providers, repeats: int, steps: int, device: str):
    """Per-step wall and process-CPU seconds of each provider, the providers taking turns
    in every repeat (after one warm-up call each)."""
    for call in providers.values():
        call()
    seconds = {provider: [] for provider in providers}
    cpu_seconds = {provider: [] for provider in providers}
    for _ in range(repeats):
        for provider, call in providers.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[provider].append((time.perf_counter() - start) / steps)
            cpu_seconds[provider].append((time.process_time() - start_cpu) / steps)
    return seconds, cpu_seconds


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _row(kernel, provider, mode, size, p50, p20, p80, unit, device, versions) -> dict:
    return dict(
        kernel=kernel,
        provider=provider,
        mode=mode,
        size=size,
        p50=p50,
        p20=p20,
        p80=p80,
        unit=unit,
        device=device,
        versions=versions,
    )


def _memory_rows(provider, peak, weights, size, label, versions) -> list[dict]:
    """CSV rows of a provider's peak memory, above the live weights and with them, in MB."""
    rows = []
    for kind, nbytes in (("peak", peak), ("peak+weights", peak + weights)):
        mb = nbytes / _common.BYTES_PER_MB
        rows.append(
            _row(
                "guided_memory",
                f"{provider}:{kind}",
                "e2e",
                size,
                mb,
                mb,
                mb,
                "MB",
                label,
                versions,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default="tiny,sd15-cpu", help="comma list of " + ",".join([*CASES, *DIT_CASES])
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile providers (and CUDA-graph ones on CUDA)",
    )
    parser.add_argument(
        "--providers", default=None, help="comma list to run (plain and guided always run)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES and name not in DIT_CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {[*CASES, *DIT_CASES]}")
    for name in names:
        device = CASES[name][4] if name in CASES else DIT_CASES[name][5]
        if device == "cuda" and not torch.cuda.is_available():
            print(f"skipping {name}: no CUDA device", file=sys.stderr)
            continue
        modes = []
        if args.compile and name in CASES:
            modes = ["default"] + (["reduce-overhead"] if device == "cuda" else [])
        only = set(args.providers.split(",")) if args.providers else None
        if name in CASES:
            rows += run_case(name, args.repeats, modes, only)
        else:
            rows += run_dit_case(name, args.repeats)
    table = _common.markdown_table(
        ["size", "kernel", "provider", "p50", "p20", "p80", "unit"],
        [
            [
                r["size"],
                r["kernel"],
                r["provider"],
                _common.format_ms(r["p50"]),
                _common.format_ms(r["p20"]),
                _common.format_ms(r["p80"]),
                r["unit"],
            ]
            for r in rows
        ],
    )
    print(table)
    _common.append_csv(args.results_dir / "bench_guided.csv", rows)


if __name__ == "__main__":
    main()
