"""Shared benchmark utilities: timing, peak memory, device/version labels, tables and CSV.

Used by bench/bench_ops.py and meant to be reused by the end-to-end benchmarks
(bench_discovery.py, bench_guided.py), so that every benchmark reports the same
statistics (p50/p20/p80 in ms) and the same CSV columns (DESIGN.md section 4).

Timing
    CPU: torch.utils.benchmark.Timer.blocked_autorange with the process's thread
    count (the Timer defaults to one thread otherwise). GPU: triton.testing.do_bench
    with quantiles (falls back to torch.utils.benchmark, which synchronises CUDA,
    when triton is not importable).

Peak memory
    "Peak" always means the highest number of bytes live at once *during* the measured
    call, above what was live when it started (so the inputs are not counted, but
    outputs, saved activations, gradients and scratch tensors are).
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
    CPU: PyTorch has no peak counter for its CPU allocator, so `cpu_peak_bytes` runs
    the call under torch.profiler with profile_memory=True. The profiler records one
    event per allocation (+bytes) and per free (-bytes) made through c10's CPU
    allocator; ordering those events by time and taking the running sum gives the
    live-byte curve, whose maximum is the peak (frees of tensors allocated before the
    measurement are not reported, so they never offset it). This sees every tensor
    allocation,
    including at::empty calls inside C++ kernels and autograd buffers, but not raw
    malloc/new/std::vector scratch inside a kernel. tests/test_bench_smoke.py checks it
    against a known allocation pattern.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Column order of every benchmark CSV (DESIGN.md section 4). Timing rows use unit "ms"
# (eager calls) or "ms-cuda-graph" (replays of a captured CUDA graph);
# peak-memory rows put the peak in p50/p20/p80 with unit "MB".
CSV_COLUMNS = (
    *("kernel", "provider", "mode", "size"),
    *("p50", "p20", "p80", "unit"),
    *("device", "versions"),
)
QUANTILES = (0.5, 0.2, 0.8)
BYTES_PER_MB = 2**20


@dataclass(frozen=True)
class Timing:
    """Per-call wall time of one benchmarked callable, in milliseconds.

    runs: how many timed calls (CPU) or about how many (GPU, do_bench chooses) the
    quantiles come from; with blocks of several calls each sample is a block mean.
    """

    p50_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


@dataclass(frozen=True)
class TimingBudget:
    """How long to time one callable.

    repeats: the number of timed calls wanted. The CPU timer runs for
    repeats x (one call's time), clamped to [min_seconds, max_seconds]: fast callables
    still get enough blocks for stable quantiles, slow ones get fewer calls than
    `repeats` (down to one; the `runs` field says how many) so a full run stays
    within minutes.
    gpu_rep_ms: do_bench's measurement window on GPU.
    """

    repeats: int = 10
    min_seconds: float = 0.1
    max_seconds: float = 1.0
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0


def time_callable(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> Timing:
    """Time fn() on `device`'s tensors: torch.utils.benchmark on CPU, do_bench on CUDA."""
    if device.type == "cuda":
        return time_cuda(fn, budget)
    return time_cpu(fn, budget)


def time_cpu(fn: Callable[[], object], budget: TimingBudget) -> Timing:
    """p50/p20/p80 of fn() with torch.utils.benchmark.Timer.blocked_autorange.

    A first, short pass (min_seconds) warms up caches, the allocator and lazy
    initialisation in its untimed block-sizing calls, and estimates one call's cost.
    The measurement window is then repeats x (one call), clamped to
    [min_seconds, max_seconds]:
    * fast calls (blocks of several calls) are measured again over the whole window,
      because one-off costs in the first pass's sizing can pick a poor block size;
    * slow calls (one call per block) keep the first pass's samples and add a second
      pass for the rest of the window, if another call fits in it. Every pass costs
      one untimed sizing call, so the slowest calls are timed once, after one warm-up.
    """
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    first = timer.blocked_autorange(min_run_time=budget.min_seconds)
    per_call = first.median
    window = min(max(budget.repeats * per_call, budget.min_seconds), budget.max_seconds)
    if first.number_per_run > 1:
        second = timer.blocked_autorange(min_run_time=window)
        return _timing_from_seconds(second.times, len(second.times) * second.number_per_run)

    samples = list(first.times)
    remaining = window - sum(samples)
    if remaining >= per_call:
        second = timer.blocked_autorange(min_run_time=remaining)
        if second.number_per_run == 1:
            samples += second.times
        else:  # the first pass was slowed by one-off costs: use the well-sized pass
            return _timing_from_seconds(second.times, len(second.times) * second.number_per_run)
    return _timing_from_seconds(samples, len(samples))


def time_cuda(fn: Callable[[], object], budget: TimingBudget) -> Timing:
    """p50/p20/p80 of fn() on CUDA with triton.testing.do_bench (quantiles in ms)."""
    try:
        from triton.testing import do_bench
    except ImportError:  # a CUDA machine without triton: benchmark.Timer syncs CUDA itself
        return time_cpu(fn, budget)
    p50, p20, p80 = do_bench(
        fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms, quantiles=list(QUANTILES)
    )
    # do_bench picks its own repeat count, about rep / (one call's time).
    return Timing(p50, p20, p80, runs=max(1, int(budget.gpu_rep_ms / max(p50, 1e-6))))


def time_cuda_graph(fn: Callable[[], object], budget: TimingBudget) -> Timing | None:
    """Time replays of one CUDA graph of fn(): the GPU time without Python or launch
    overhead. None when fn cannot be captured (it syncs with the host, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return time_cuda(graph.replay, budget)


def _timing_from_seconds(samples: Sequence[float], runs: int) -> Timing:
    p50, p20, p80 = (float(v) * 1e3 for v in np.quantile(np.asarray(samples), QUANTILES))
    return Timing(p50, p20, p80, runs=runs)


# ----------------------------------------------------------------------------- memory


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes live during fn() above those live when it started (see module docstring)."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of torch.cuda.memory_allocated during fn(), minus its value before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return max(0, peak)


# Device types whose allocations the profiler attributes to host memory (as
# torch.autograd.profiler does when it sums cpu_memory_usage).
_HOST_DEVICE_TYPES = ("CPU", "MKLDNN", "IDEEP")


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU tensor bytes live during fn(), from the profiler's allocation events.

    Every allocation/free through c10's CPU allocator while the profiler runs becomes a
    "[memory]" event with signed nbytes. Sorted by timestamp (stable, so same-tick
    events keep their recording order), their running sum is the live-byte curve
    relative to the start, and the peak is its maximum (never below 0). What fn()
    returns is freed inside the profiled region, so it counts towards the peak.

    Frees of blocks allocated before profiling began are not reported (the profiler
    never learnt their size; c10 warns once), so freeing pre-existing tensors does not
    lower the curve: the result is the peak of fn()'s own allocations, which is exact
    for benchmark calls, since they keep their inputs alive.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto prints start/stop lines to stderr
        prof.start()
    try:
        result = fn()
        del result
    finally:
        with _native_stderr_silenced():
            prof.stop()
    # prof.profiler is torch.autograd.profiler.profile; kineto_results holds the raw
    # events, including memory events that are not inside any op.
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type().name in _HOST_DEVICE_TYPES
    ]
    events.sort(key=lambda event: event.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null, muting C++ writes that bypass sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# -------------------------------------------------------------------- bandwidth


@dataclass(frozen=True)
class Bandwidth:
    """A GPU's HBM bandwidth: the data-sheet peak (from the memory clock and bus width,
    when torch reports them) and a device-to-device copy measured in this run."""

    spec_gbps: float | None
    copy_gbps: float

    @property
    def peak_gbps(self) -> float:
        # The roofline is the data-sheet peak; a copy is the fallback when torch hides it.
        return self.spec_gbps or self.copy_gbps

    def describe(self) -> str:
        spec = f"{self.spec_gbps:.0f} GB/s data-sheet peak" if self.spec_gbps else None
        copy = f"a 1 GiB device copy measured {self.copy_gbps:.0f} GB/s in this run"
        return f"{spec} ({copy})" if spec else f"{copy} (no data-sheet figure from torch)"


def hbm_bandwidth(device: torch.device) -> Bandwidth:
    """Data-sheet HBM peak and a measured copy bandwidth (bytes read + written) of `device`."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    # Double data rate: two transfers per memory clock over the whole bus.
    spec = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_cuda(
        lambda: dst.copy_(src), TimingBudget(repeats=10, min_seconds=0.1, max_seconds=1.0)
    )
    copy = 2 * src.numel() * src.element_size() / (timing.p50_ms * 1e-3) / 1e9
    return Bandwidth(spec_gbps=spec, copy_gbps=copy)


# ----------------------------------------------------------------------- labels


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model with the thread count torch uses (it sets the speed)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'s' if threads != 1 else ''})"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3';
    on CPU with the thread count, which changes every number: 'amd-epyc-2t'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


@functools.cache
def versions() -> str:
    """'torch=...;triton=...;biasmap=...' with biasmap's git commit when it is known."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        import biasmap

        biasmap_version = biasmap.__version__
        commit = _git_commit(Path(biasmap.__file__).resolve().parent)
        if commit:
            biasmap_version += f"+g{commit}"
    except ImportError:
        biasmap_version = "none"
    return f"torch={torch.__version__};triton={triton_version};biasmap={biasmap_version}"


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ---------------------------------------------------------------------- reporting


def format_ms(value: float | None) -> str:
    """Milliseconds (or any positive amount) to about three significant digits, never
    in scientific notation."""
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def format_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else format_ms(nbytes / BYTES_PER_MB)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; cells are used as given."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Append rows (dicts keyed by CSV_COLUMNS) to `path`, writing the header if it is new.

    Refuses to append to a file whose header differs, rather than mixing layouts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if tuple(header or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(CSV_COLUMNS)}")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if is_new:
            writer.writeheader()
        writer.writerows(rows)


ONE_AXIS = "axes={gender: {concept: gender, classes: [male, female]}}"


def audit_grid(model: str, seeds: str, methods: str, steps: int, *extra: str):
    """An AuditConfig of one profession (doctor) and the gender axis, for the audit benches:
    one thread, no CLIP (the other half of the engine, not timed here); extra: more
    `key=value` overrides, applied last."""
    from biasmap.audit.config import load_config

    return load_config(
        None,
        [
            f"model={model}",
            "professions=[doctor]",
            ONE_AXIS,
            f"seeds={seeds}",
            f"methods={methods}",
            f"steps={steps}",
            "clip_model=null",
            "threads=1",
            *extra,
        ],
    )
