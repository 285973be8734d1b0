"""Benchmark every public biasmap op per provider, against the reference, in one run.

Providers are the reference (pure PyTorch) and every other backend in
biasmap.ops.backends.BACKENDS that can run the op on the benchmarked device here
(for example "cpu" once the C++ extension is built, "cuda"/"triton" on a GPU); for
soft_topk also "authors", a plain-PyTorch re-implementation of the authors' soft top-k
(bench/authors_topk.py). Each op is timed in modes fwd, bwd and fwd+bwd at Stable
Diffusion 1.5 sizes (DESIGN.md sections 2 and 4), with the peak memory of fwd+bwd.

Modes
    fwd      forward on inputs that do not require grad (no autograd graph is recorded);
    bwd      only the backward: the forward runs once outside the timed region and the
             timed call is torch.autograd.grad(out, inputs, grad_out, retain_graph=True);
    fwd+bwd  forward on grad-requiring inputs, then torch.autograd.grad with a fixed
             random upstream gradient.

Output: a markdown table per op on stdout and in bench/results/bench_ops_<device>.md,
and CSV rows appended to bench/results/bench_ops.csv. See bench/README.md.

    PYTHONPATH=. python bench/bench_ops.py            # full run (CPU: a few minutes)
    PYTHONPATH=. python bench/bench_ops.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script: make `bench` (and a source tree's biasmap) importable. Appended, so
# a biasmap on PYTHONPATH or installed takes precedence over this checkout's.
if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from bench import _common
from bench.authors_topk import AUTHORS_ITERS, AUTHORS_TAU, authors_soft_topk

with warnings.catch_warnings():
    # A missing extension warns once; the benchmark reports the backends that can run.
    warnings.simplefilter("ignore", RuntimeWarning)
    from biasmap import ops
    from biasmap.ops import backends

MODES = ("fwd", "bwd", "fwd+bwd")
FORWARD_ONLY = ("fwd",)
REFERENCE = "reference"
AUTHORS = "authors"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The paper's quantile: a soft top-k keeps k = floor(0.3 n) entries.
QUANTILE = 0.7
EXACT_TAU = 0.1


# ------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One op at one size.

    make_inputs(device) returns fresh keyword inputs, the same on every call (seeded);
    grad_inputs names the differentiable ones (a name may hold a list of tensors);
    call(provider, inputs) runs the op. authors_key ties soft-top-k-like cases of the
    same maps ([B, n]) to the `authors` timing, for the ratio against it.
    """

    op: str
    size: str
    make_inputs: Callable[[torch.device], dict[str, Any]]
    call: Callable[[str, dict[str, Any]], torch.Tensor]
    grad_inputs: tuple[str, ...] = ()
    extra_providers: tuple[str, ...] = ()
    authors_key: tuple[int, int] | None = None
    # Least bytes each mode must move through memory (float32), for the GB/s column.
    min_bytes: dict[str, int] | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.grad_inputs else FORWARD_ONLY


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def attention_case(
    batch, n_query, heads, head_dim, n_keys, n_tokens, prompt_len, grad_k=True
) -> Case:
    """attention_slice with prompt-length key masks (softmax_over="prompt", the default).

    grad_k=False differentiates through q only, as guidance does (the keys come from the
    text encoder): the backward then skips grad_k.
    """

    def make(device):
        gen = _generator(0)
        inner = heads * head_dim
        return {
            "q": torch.randn(batch, n_query, inner, generator=gen).to(device),
            "k": torch.randn(batch, n_keys, inner, generator=gen).to(device),
            # Concept tokens sit inside the prompt, as in "... {profession} and {concept}".
            "token_index": torch.arange(prompt_len - 1 - n_tokens, prompt_len - 1).to(device),
            # Dense, not an expanded view: a per-image mask as the attention processor builds.
            "key_mask": (torch.arange(n_keys) < prompt_len).repeat(batch, 1).to(device),
        }

    def call(provider, inputs):
        return ops.attention_slice(
            inputs["q"],
            inputs["k"],
            inputs["token_index"],
            num_heads=heads,
            key_mask=inputs["key_mask"],
            backend=provider,
            # As the attention processors call it: the host-syncing input checks run once
            # per generation, not per layer call, so they are not part of the op's cost.
            validate=False,
        )

    size = f"B={batch} N={n_query} H={heads} d={head_dim} L={n_keys} T={n_tokens}"
    if not grad_k:
        return Case("attention_slice", size + " grad q only", make, call, grad_inputs=("q",))
    return Case("attention_slice", size, make, call, grad_inputs=("q", "k"))


def _maps(batch, n, device, seed=1):
    # Non-negative like attention maps; values in [0, 1] keep the authors' cost sane.
    return torch.rand(batch, n, generator=_generator(seed)).to(device)


def soft_topk_cases(batch, n) -> list[Case]:
    """The paper's exact solver and the authors' Sinkhorn settings on the same maps."""
    k = ops.topk_count(n, QUANTILE)

    def make(device):
        return {"x": _maps(batch, n, device)}

    def exact(provider, inputs):
        return ops.soft_topk(inputs["x"], k, EXACT_TAU, solver="exact", backend=provider)

    def sinkhorn(provider, inputs):
        if provider == AUTHORS:
            return authors_soft_topk(inputs["x"], k, AUTHORS_TAU, AUTHORS_ITERS)
        # normalize="none" as in the authors' code, so both compute the same thing.
        return ops.soft_topk(
            inputs["x"],
            k,
            AUTHORS_TAU,
            solver="sinkhorn",
            iters=AUTHORS_ITERS,
            normalize="none",
            backend=provider,
        )

    # Forward: read x, write the mask. Backward: read the mask and grad_out, write grad_x.
    plane = 4 * batch * n
    min_bytes = {"fwd": 2 * plane, "bwd": 3 * plane, "fwd+bwd": 5 * plane}
    shape = f"{batch}x{n} k={k}"
    return [
        Case(
            "soft_topk",
            f"{shape} exact tau={EXACT_TAU}",
            make,
            exact,
            grad_inputs=("x",),
            authors_key=(batch, n),
            min_bytes=min_bytes,
        ),
        Case(
            "soft_topk",
            f"{shape} sinkhorn T={AUTHORS_ITERS} tau={AUTHORS_TAU}",
            make,
            sinkhorn,
            grad_inputs=("x",),
            extra_providers=(AUTHORS,),
            authors_key=(batch, n),
        ),
    ]


def resize_case(batch, n_tokens, map_sides: Sequence[int], out_side: int) -> Case:
    """resize_aggregate of per-layer maps [B, T, h, h] to S x S, summed."""

    def make(device):
        gen = _generator(2)
        return {
            "maps": [
                torch.rand(batch, n_tokens, side, side, generator=gen).to(device)
                for side in map_sides
            ]
        }

    def call(provider, inputs):
        return ops.resize_aggregate(inputs["maps"], out_side, backend=provider)

    counts = {side: map_sides.count(side) for side in sorted(set(map_sides), reverse=True)}
    layout = " + ".join(f"{count}x{side}^2" for side, count in counts.items())
    size = f"B={batch} T={n_tokens} {layout} -> S={out_side}"
    return Case("resize_aggregate", size, make, call, grad_inputs=("maps",))


def soft_iou_case(batch, n) -> Case:
    def make(device):
        return {"a": _maps(batch, n, device, seed=3), "b": _maps(batch, n, device, seed=4)}

    def call(provider, inputs):
        return ops.soft_iou(inputs["a"], inputs["b"], backend=provider)

    return Case("soft_iou", f"{batch}x{n}", make, call, grad_inputs=("a", "b"))


def energy_case(batch, n) -> Case:
    """entanglement_energy: soft top-k of both maps (exact solver) and their SoftIoU."""
    k = ops.topk_count(n, QUANTILE)

    def make(device):
        return {"ma": _maps(batch, n, device, seed=5), "mb": _maps(batch, n, device, seed=6)}

    def call(provider, inputs):
        return ops.entanglement_energy(inputs["ma"], inputs["mb"], k, EXACT_TAU, backend=provider)

    return Case(
        "entanglement_energy",
        f"2 x {batch}x{n} k={k} exact tau={EXACT_TAU}",
        make,
        call,
        grad_inputs=("ma", "mb"),
    )


def quantile_mask_case(batch, n) -> Case:
    def make(device):
        return {"x": _maps(batch, n, device)}

    def call(provider, inputs):
        return ops.quantile_mask(inputs["x"], QUANTILE, backend=provider)

    return Case("quantile_mask", f"{batch}x{n} q={QUANTILE}", make, call)


def mask_iou_case(batch, n) -> Case:
    def make(device):
        a, b = _maps(batch, n, device, seed=3), _maps(batch, n, device, seed=4)
        return {"a": a > QUANTILE, "b": b > QUANTILE}

    def call(provider, inputs):
        return ops.mask_iou(inputs["a"], inputs["b"], backend=provider)

    return Case("mask_iou", f"{batch}x{n}", make, call)


# SD1.5 at 512 px, per image: cross-attention maps of the six non-mid blocks
# (down: 2 layers at 64, 32, 16; up: 3 layers at 16, 32, 64).
SD15_MAP_SIDES = [64] * 2 + [32] * 2 + [16] * 2 + [16] * 3 + [32] * 3 + [64] * 3
# (query tokens N, heads * head_dim) of SD1.5's attn2 layers at 64, 32 and 16 latents.
SD15_ATTENTION_LAYERS = ((4096, 320), (1024, 640), (256, 1280))
SD15_HEADS = 8
CLIP_KEYS = 77
PROMPT_TOKENS = 12  # "<sot> a photo of the face of a doctor and gender <eot>" is about this


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    """The benchmark sizes: SD1.5-like by default, tiny with quick (for CI)."""
    if quick:
        maps = [(2, 64)]
        cases = [attention_case(1, 64, 2, 8, 16, 2, prompt_len=8)]
        for batch, n in maps:
            cases += soft_topk_cases(batch, n)
        cases.append(resize_case(1, 2, [8, 8, 4], 8))
        cases += [soft_iou_case(b, n) for b, n in maps]
        cases += [energy_case(b, n) for b, n in maps]
        cases += [quantile_mask_case(b, n) for b, n in maps]
        cases += [mask_iou_case(b, n) for b, n in maps]
        return cases

    layers = SD15_ATTENTION_LAYERS if device.type == "cuda" else SD15_ATTENTION_LAYERS[:1]
    cases = [
        attention_case(2, n_query, SD15_HEADS, inner // SD15_HEADS, CLIP_KEYS, 2, PROMPT_TOKENS)
        for n_query, inner in layers
    ]
    # The top layer as guidance differentiates it: through the queries only.
    n_query, inner = SD15_ATTENTION_LAYERS[0]
    cases.append(
        attention_case(
            2, n_query, SD15_HEADS, inner // SD15_HEADS, CLIP_KEYS, 2, PROMPT_TOKENS, grad_k=False
        )
    )
    maps = [(2, 4096), (8, 4096), (64, 4096), (2, 262144)]
    # 16 maps at 512 px: the soft top-k bandwidth target (too slow for the CPU reference).
    topk_maps = [*maps, (16, 262144)] if device.type == "cuda" else maps
    for batch, n in topk_maps:
        cases += soft_topk_cases(batch, n)
    cases += [resize_case(2, 2, SD15_MAP_SIDES, side) for side in (64, 512)]
    cases += [soft_iou_case(b, n) for b, n in maps]
    # The energy is soft_topk + soft_iou, both timed above; its two SD sizes (S=64
    # and S=512 maps, one pair per image) are enough to see the composition's cost.
    cases += [energy_case(b, n) for b, n in ((2, 4096), (2, 262144))]
    cases += [quantile_mask_case(b, n) for b, n in maps]
    cases += [mask_iou_case(b, n) for b, n in maps]
    return cases


# -------------------------------------------------------------------- providers


def runnable_backends(op: str, device: torch.device) -> dict[str, str | None]:
    """{backend name: None if it can run `op` on float32 `device` tensors, else why not}."""
    reasons = {}
    for name, backend in backends.BACKENDS.items():
        reason = backend.unsupported(op, device, torch.float32)
        if reason is None and device.type == "cpu" and _interpreted(name):
            reason = (
                "runs under TRITON_INTERPRET=1 (about 150x slower); ask for it with --providers"
            )
        reasons[name] = reason
    return reasons


def _interpreted(backend_name: str) -> bool:
    # A Triton backend can claim CPU tensors under the interpreter; that is a test
    # mode, not something to benchmark unless asked for.
    return "triton" in backend_name and os.environ.get("TRITON_INTERPRET") == "1"


def providers_for(case: Case, device: torch.device, wanted: Sequence[str] | None) -> list[str]:
    """Providers to time for `case`: the reference, then runnable backends, then extras."""
    reasons = runnable_backends(case.op, device)
    ordered = [REFERENCE] + [n for n in reasons if n != REFERENCE]
    if wanted is None:
        names = [n for n in ordered if reasons[n] is None]
    else:
        # An explicitly requested backend runs even under the interpreter, if it can at all.
        names = [
            n
            for n in ordered
            if n in wanted
            and backends.BACKENDS[n].unsupported(case.op, device, torch.float32) is None
        ]
    names += [p for p in case.extra_providers if wanted is None or p in wanted]
    return names


def backends_not_run(cases: Sequence[Case], device: torch.device) -> dict[str, str]:
    """{backend: why} for backends that run none of `cases` (their first case's reason)."""
    reasons: dict[str, str] = {}
    runs_something: set[str] = set()
    for case in cases:
        for name, reason in runnable_backends(case.op, device).items():
            if reason is None:
                runs_something.add(name)
            else:
                reasons.setdefault(name, reason)
    return {name: why for name, why in reasons.items() if name not in runs_something}


# ------------------------------------------------------------------ measurement


@dataclass
class Result:
    """One (case, mode, provider) measurement, or why there is none."""

    case: Case
    mode: str
    provider: str
    timing: _common.Timing | None = None
    # CUDA only: replaying one captured CUDA graph of the call (GPU time, no host overhead).
    graph_timing: _common.Timing | None = None
    peak_bytes: int | None = None
    note: str = ""


def _leaves(inputs: dict[str, Any], names: Sequence[str]) -> list[torch.Tensor]:
    """Make the named inputs require grad and return them as a flat list."""
    leaves = []
    for name in names:
        value = inputs[name]
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for tensor in tensors:
            tensor.requires_grad_(True)
            leaves.append(tensor)
    return leaves


def build_callable(case: Case, provider: str, mode: str, device: torch.device):
    """The zero-argument callable that `mode` times, with its inputs already built."""
    inputs = case.make_inputs(device)
    if mode == "fwd":
        return lambda: case.call(provider, inputs)

    leaves = _leaves(inputs, case.grad_inputs)
    out = case.call(provider, inputs)
    # A fixed, dense, random upstream gradient: every entry matters, as in real use.
    grad_out = torch.randn(out.shape, generator=_generator(7), dtype=out.dtype).to(device)
    if mode == "bwd":
        graph_output = out  # keeps the recorded graph alive for repeated backwards
        return lambda: torch.autograd.grad(graph_output, leaves, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(case.call(provider, inputs), leaves, grad_out)


def measure(
    case: Case,
    provider: str,
    mode: str,
    device: torch.device,
    budget: _common.TimingBudget,
    with_memory: bool,
) -> Result:
    """Time one (case, provider, mode); with_memory also records fwd+bwd's peak bytes."""
    result = Result(case, mode, provider)
    try:
        fn = build_callable(case, provider, mode, device)
        result.timing = _common.time_callable(fn, device, budget)
        if device.type == "cuda":
            # The host-syncing input checks cannot be captured; the kernels are the same.
            try:
                with ops.skip_value_checks():
                    result.graph_timing = _common.time_cuda_graph(fn, budget)
            except Exception as exc:  # keep the eager timing
                result.note = f"no CUDA graph: {type(exc).__name__}: {str(exc)[:120]}"
        if with_memory and mode == "fwd+bwd":
            result.peak_bytes = _common.peak_memory_bytes(fn, device)
    except Exception as exc:  # a broken kernel must not hide the other providers' numbers
        result.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return result


# ------------------------------------------------------------------------ report


def _p50(result: Result | None) -> float | None:
    return result.timing.p50_ms if result is not None and result.timing is not None else None


def _graph_p50(result: Result | None) -> float | None:
    if result is None or result.graph_timing is None:
        return None
    return result.graph_timing.p50_ms


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _gb_per_s(result: Result) -> float | None:
    """Effective bandwidth: the case's least bytes for this mode over the p50 time (of the
    CUDA graph replay where there is one: the GPU's own time)."""
    p50 = _graph_p50(result) or _p50(result)
    if not result.case.min_bytes or p50 is None or p50 <= 0:
        return None
    return result.case.min_bytes[result.mode] / (p50 * 1e-3) / 1e9


def op_table(
    op: str,
    results: Sequence[Result],
    all_results: Sequence[Result],
    hbm_bandwidth: _common.Bandwidth | None = None,
) -> str:
    """Markdown table of one op: times, ratio to the reference (and to the authors for
    soft_topk), effective GB/s against the GPU's HBM peak (where hbm_bandwidth is given and
    the case states its least bytes moved), peak memory of fwd+bwd and its ratio."""
    by_key = {(r.case.size, r.mode, r.provider): r for r in results}
    authors = {
        (r.case.authors_key, r.mode): r
        for r in all_results
        if r.provider == AUTHORS and r.case.authors_key is not None
    }
    show_authors = any(r.case.authors_key is not None for r in results) and bool(authors)
    show_memory = any(r.peak_bytes is not None for r in results)
    show_graph = any(r.graph_timing is not None for r in results)
    hbm = hbm_bandwidth if any(r.case.min_bytes for r in results) else None

    headers = ["size", "mode", "provider", "p50 ms", "p20", "p80", "ratio vs ref"]
    if show_authors:
        headers.append("ratio vs authors")
    if show_graph:
        headers += ["graph p50 ms", "graph vs ref"] + (["graph vs authors"] if show_authors else [])
    if hbm:
        headers += ["GB/s", "% of HBM peak"]
    if show_memory:
        headers += ["peak MB", "mem ratio vs ref"]
    headers.append("runs")

    rows, notes = [], []
    for r in results:
        reference = by_key.get((r.case.size, r.mode, REFERENCE))
        timing = r.timing
        row = [
            r.case.size,
            r.mode,
            r.provider,
            _common.format_ms(timing.p50_ms if timing else None),
            _common.format_ms(timing.p20_ms if timing else None),
            _common.format_ms(timing.p80_ms if timing else None),
            _common.format_ratio(_ratio(_p50(reference), _p50(r))),
        ]
        if show_authors:
            theirs = authors.get((r.case.authors_key, r.mode))
            row.append(_common.format_ratio(_ratio(_p50(theirs), _p50(r))))
        if show_graph:
            row += [
                _common.format_ms(_graph_p50(r)),
                _common.format_ratio(_ratio(_graph_p50(reference), _graph_p50(r))),
            ]
            if show_authors:
                row.append(_common.format_ratio(_ratio(_graph_p50(theirs), _graph_p50(r))))
        if hbm:
            gbps = _gb_per_s(r)
            row += [
                f"{gbps:.0f}" if gbps else "-",
                f"{100 * gbps / hbm.peak_gbps:.0f}%" if gbps and hbm.peak_gbps else "-",
            ]
        if show_memory:
            ref_peak = reference.peak_bytes if reference else None
            row += [
                _common.format_mb(r.peak_bytes),
                _common.format_ratio(_ratio(ref_peak, r.peak_bytes)),
            ]
        row.append(str(timing.runs) if timing else "-")
        if r.note:
            notes.append(f"{r.case.size} / {r.mode} / {r.provider}: {r.note}")
            row[3] = f"{row[3] if timing else '-'} [{len(notes)}]"
        rows.append(row)

    text = f"### {op}\n\n" + _common.markdown_table(headers, rows)
    if notes:
        text += "\n\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, 1))
    return text


def report(
    results: Sequence[Result],
    device: torch.device,
    header: str,
    hbm_bandwidth: _common.Bandwidth | None = None,
) -> str:
    ops_in_order = list(dict.fromkeys(r.case.op for r in results))
    tables = [
        op_table(op, [r for r in results if r.case.op == op], results, hbm_bandwidth)
        for op in ops_in_order
    ]
    return header + "\n\n" + "\n\n".join(tables) + "\n"


def csv_rows(results: Sequence[Result], device: torch.device) -> list[dict[str, object]]:
    """One "ms" row per timing, one "ms-cuda-graph" row per graph timing and one "MB" row
    per peak-memory measurement."""
    device_label, versions = _common.device_name(device), _common.versions()
    rows = []
    for r in results:
        base = {
            "kernel": r.case.op,
            "provider": r.provider,
            "mode": r.mode,
            "size": r.case.size,
            "device": device_label,
            "versions": versions,
        }
        for timing, unit in ((r.timing, "ms"), (r.graph_timing, "ms-cuda-graph")):
            if timing is not None:
                quantiles = {"p50": timing.p50_ms, "p20": timing.p20_ms, "p80": timing.p80_ms}
                rows.append(base | {k: f"{v:.6g}" for k, v in quantiles.items()} | {"unit": unit})
        if r.peak_bytes is not None:
            mb = f"{r.peak_bytes / _common.BYTES_PER_MB:.6g}"
            rows.append(base | {"p50": mb, "p20": mb, "p80": mb, "unit": "MB"})
    return rows


# -------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats (CI smoke)"
    )
    parser.add_argument("--ops", nargs="+", metavar="OP", help="benchmark only these ops")
    parser.add_argument(
        "--providers",
        nargs="+",
        metavar="NAME",
        help=f"only these providers ({', '.join([*backends.BACKENDS, AUTHORS])})",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed calls wanted per measurement (default 10, quick 3)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="cap on one CPU measurement's timed window (default 1.0, quick 0.02)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="tensors' device; auto is cuda when available, else cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's, usually the core count)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="where the CSV and markdown go",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Run the benchmark, print and save the tables, append the CSV; returns the results."""
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device) -> list[Result]:
    repeats = args.repeats or (3 if args.quick else 10)
    budget = _common.TimingBudget(
        repeats=repeats,
        min_seconds=0.002 if args.quick else 0.1,
        max_seconds=args.max_seconds or (0.02 if args.quick else 1.0),
        gpu_warmup_ms=5 if args.quick else 25,
        gpu_rep_ms=10 if args.quick else 100,
    )

    cases = default_cases(device, args.quick)
    if args.ops:
        unknown = set(args.ops) - {c.op for c in cases}
        if unknown:
            known = sorted({c.op for c in cases})
            raise SystemExit(f"--ops: unknown op(s) {sorted(unknown)}; known: {known}")
        cases = [c for c in cases if c.op in args.ops]

    not_run = backends_not_run(cases, device)
    hbm = _common.hbm_bandwidth(device) if device.type == "cuda" else None
    started = time.perf_counter()
    results: list[Result] = []
    for case in cases:
        for mode in case.modes:
            for provider in providers_for(case, device, args.providers):
                result = measure(case, provider, mode, device, budget, not args.no_memory)
                results.append(result)
                shown = _common.format_ms(_p50(result)) if result.timing else result.note
                print(
                    f"  {case.op} | {case.size} | {mode} | {provider}: {shown}",
                    file=sys.stderr,
                    flush=True,
                )
    elapsed = time.perf_counter() - started

    runs_rule = (
        f"fewer than --repeats={budget.repeats} when a call is slow: one CPU measurement "
        f"times at most {budget.max_seconds:g} s, after a warm-up call"
        if device.type == "cpu"
        else "about how many calls triton.testing.do_bench timed"
    )
    header = "\n".join(
        [
            f"## bench_ops on {_common.device_name(device)}{' (quick)' if args.quick else ''}",
            "",
            f"versions: {_common.versions()}; float32; all rows measured in this run "
            f"({elapsed:.0f} s).",
            "",
            "- ratio vs ref = reference p50 / provider p50 (> 1: faster than the reference).",
            "- ratio vs authors = p50 of the authors' soft top-k (full [B, n, 2] plan, 20 "
            "log-Sinkhorn iterations, tau=0.01, autograd; bench/authors_topk.py) on the same "
            "maps and mode / provider p50.",
            "- peak MB = most bytes live at once during one fwd+bwd call, above those live "
            "before it (inputs excluded); mem ratio vs ref = reference peak / provider peak.",
            f"- runs = timed calls behind p20/p50/p80; {runs_rule}.",
        ]
        + (
            [
                "- p50/p20/p80 time eager calls from Python, input checks included (each NaN "
                "check is a host sync). graph p50 ms replays one CUDA graph of the same call "
                "captured with biasmap.ops.skip_value_checks(): the GPU's time without host "
                "overhead; '-' where the provider cannot be captured (it syncs)."
            ]
            if device.type == "cuda"
            else []
        )
        + (
            [
                "- GB/s = least bytes the mode must move (soft_topk fwd: read x, write the "
                "mask; bwd: read mask and grad_out, write grad_x) / p50; % of HBM peak "
                f"uses {hbm.describe()}."
            ]
            if hbm
            else []
        )
        + [f"- not run here: {name} ({why})." for name, why in not_run.items()]
    )
    text = report(results, device, header, hbm)
    print(text)

    suffix = "_quick" if args.quick else ""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"bench_ops_{_common.device_slug(device)}{suffix}.md").write_text(text)
    _common.append_csv(args.results_dir / f"bench_ops{suffix}.csv", csv_rows(results, device))
    return results


if __name__ == "__main__":
    main()
