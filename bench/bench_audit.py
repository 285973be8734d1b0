"""Throughput of the audit engine (images per second), with the ratios measured in one run.

Cases:
  tiny-batch  the offline tiny pipeline, local executor, one BatchGenerator in this process:
              batch size 4 against batch size 1 (target: >= 2x). The two settings alternate
              over `repeats` rounds on one loaded pipeline, so a busy machine's drift hits both;
              the best round of each setting is the least disturbed by other processes. The
              bare UNet forward at 8 rows against 2 (the CFG batches of 4 and 1 images) is timed
              too: the ratio batching could reach if the engine cost nothing.
  ray-sd15    the SD1.5 architecture with random weights (`random-sd15`) at a 32x32 latent
              (256 px) and 2 steps on a local Ray cluster (num_cpus=4): 2 workers of one torch
              thread each against 1 worker of one thread (target: >= 1.6x). Timed from the
              moment every actor has loaded its pipeline to the last committed row.

  gpu-batch   guided (lambda 100) and plain images per second of guided_generate on the
              SD1.5 architecture (fp16, 64x64 latent, 10 steps) at batch 1, 4, 8 and 16
              (as memory allows), eager and compiled (torch.compile "reduce-overhead": CUDA
              graphs), with the allocator's peak memory; CUDA only. --quick (or no GPU
              with --cases gpu-batch) runs the same code on the tiny model on CPU, batch 1
              and 2, eager: a smoke run of the case, not a measurement.

Each setting runs the engine's own pieces: work batches from a config, BatchGenerator.run, and
the ResultSink that writes PNGs and Parquet parts into a temporary run folder. Beyond images/s,
the tables give the mean time a worker spent per image (the rows' `seconds`) and the engine's
overhead, wall time minus the workers' busy time divided by the worker count: if per-image time
grows with two workers while the overhead stays small, the cores, not the engine, set the limit.
The load average is printed because the benchmark machine is shared, and the ray case measures
the machine's parallel ceiling before and after it (two one-thread Ray tasks of fixed matmul work
against one doing both): the best 2-worker ratio the cores allowed at that moment.

    PYTHONPATH=. python bench/bench_audit.py                  # both cases (about 6 min on 2 cores)
    PYTHONPATH=. python bench/bench_audit.py --cases tiny-batch --repeats 5
    PYTHONPATH=. python bench/bench_audit.py --quick          # seconds; *_quick files (smoke)
    PYTHONPATH=. python bench/bench_audit.py --cases gpu-batch    # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from biasmap import models  # noqa: E402
from biasmap.audit import executors  # noqa: E402
from biasmap.audit.runner import BatchGenerator, ResultSink, work_batches  # noqa: E402
from biasmap.audit.store import ResultsStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("tiny-batch", "ray-sd15", "gpu-batch")
DEFAULT_CASES = ("tiny-batch", "ray-sd15")  # gpu-batch is asked for by name


def _commit_all(batches, run, folder: Path) -> tuple[float, list[dict]]:
    """Run every batch through `run` and a fresh store's sink; (wall seconds, rows)."""
    store = ResultsStore(folder)
    sink = ResultSink(folder, store, set())
    started = time.perf_counter()
    run(batches, sink)
    wall = time.perf_counter() - started
    return wall, store.read_table().to_pylist()


def _row(case, provider, size, values, unit, device):
    p50, p20, p80 = (float(v) for v in np.quantile(values, _common.QUANTILES))
    return {
        "kernel": case,
        "provider": provider,
        "mode": "throughput",
        "size": size,
        "p50": p50,
        "p20": p20,
        "p80": p80,
        "unit": unit,
        "device": device,
        "versions": _common.versions(),
    }


def _unet_batching_ratio(pipe, repeats: int) -> float:
    """Images/s of the bare UNet forward at the CFG batch of 4 images (8 rows) over that of 1
    image (2 rows), best of `repeats`: the most batching can give when the UNet dominates."""
    unet = pipe.unet
    side = unet.config.sample_size
    embeds = torch.randn(8, 77, unet.config.cross_attention_dim)
    sample = torch.randn(8, unet.config.in_channels, side, side)
    best = {}
    with torch.no_grad():
        for rows in (2, 8):
            times = []
            for _ in range(repeats + 1):  # the first call warms up
                started = time.perf_counter()
                for _ in range(5):
                    unet(sample[:rows], 500, encoder_hidden_states=embeds[:rows])
                times.append(time.perf_counter() - started)
            best[rows] = min(times[1:] or times)
    return (4 / best[8]) / (1 / best[2])


def bench_tiny(
    repeats: int, quick: bool, device: str, threads: int = 1
) -> tuple[list[dict], list[list[str]]]:
    """Local executor on the tiny model, batch size 4 against 1, on `threads` torch threads."""
    steps = 2 if quick else 10
    seeds = "0-3" if quick else "0-7"
    methods = "[sd,biasmap]"
    generator = BatchGenerator(
        _common.audit_grid("tiny", seeds, methods, steps), None, threads=threads
    )
    rates: dict[int, list[float]] = {1: [], 4: []}
    busy: dict[int, list[float]] = {1: [], 4: []}
    images = 0
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(repeats):
            for batch_size in (1, 4):
                config = _common.audit_grid(
                    "tiny", seeds, methods, steps, f"batch_size={batch_size}"
                )
                batches = work_batches(config)
                folder = Path(scratch) / f"b{batch_size}-{round_index}"

                def run(batches, sink):
                    for batch in batches:
                        sink.commit(generator.run(batch))

                wall, rows = _commit_all(batches, run, folder)
                images = len(rows)
                rates[batch_size].append(images / wall)
                busy[batch_size].append(statistics.mean(r["seconds"] for r in rows))
    unet_ratio = _unet_batching_ratio(generator.pipe, 1 if quick else 5)
    size = f"tiny, {images} img ({methods[1:-1]}), {steps} steps, {threads} thread(s)"
    rows = [_row("audit-local", f"batch {b}", size, rates[b], "img/s", device) for b in (1, 4)]
    median_ratio = statistics.median(rates[4]) / statistics.median(rates[1])
    best_ratio = max(rates[4]) / max(rates[1])
    table = [
        [
            size,
            f"local, batch {b}",
            f"{statistics.median(rates[b]):.2f}",
            f"{max(rates[b]):.2f}",
            f"{1e3 * statistics.median(busy[b]):.0f}",
            "" if b == 1 else f"{median_ratio:.2f}x / {best_ratio:.2f}x (target 2x)",
            "" if b == 1 else f"{unet_ratio:.2f}x",
        ]
        for b in (1, 4)
    ]
    return rows, table


def _fixed_work(repeats: int) -> float:
    """One thread of dense matmuls; returns its wall seconds."""
    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    started = time.perf_counter()
    for _ in range(repeats):
        a = torch.tanh(a @ a)
    return time.perf_counter() - started


def _hold(seconds: float) -> None:
    time.sleep(seconds)


def parallel_ceiling(repeats: int) -> float:
    """How much faster two one-thread Ray tasks finish a fixed amount of work than one task
    doing it twice: 2.0 on two idle cores, about 1.0 when other processes use the cores.
    The best 2-worker speedup this machine allows at the moment of the measurement."""
    import ray

    work = ray.remote(num_cpus=1)(_fixed_work)
    # Start two worker processes before timing (a process start, torch import included, would
    # otherwise count against the pair): two concurrent tasks that outlast a process start.
    hold = ray.remote(num_cpus=1)(_hold)
    ray.get([hold.remote(3), hold.remote(3)])
    ray.get([work.remote(1), work.remote(1)])
    started = time.perf_counter()
    ray.get(work.remote(2 * repeats))
    alone = time.perf_counter() - started
    started = time.perf_counter()
    ray.get([work.remote(repeats), work.remote(repeats)])
    together = time.perf_counter() - started
    return alone / together


def bench_ray(quick: bool, device: str) -> tuple[list[dict], list[list[str]]]:
    """Ray, 1 worker against 2 workers of one thread, on SD1.5 at a 32x32 latent."""
    import ray

    model, image, steps = ("tiny", 128, 2) if quick else ("random-sd15", 256, 2)
    seeds, methods = ("0-3", "[sd]") if quick else ("0-1", "[sd,biasmap]")
    results: dict[int, dict] = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ceilings = [parallel_ceiling(30 if quick else 300)]
        with tempfile.TemporaryDirectory() as scratch:
            for workers in (1, 2):
                config = _common.audit_grid(
                    model, seeds, methods, steps, f"image_size={image}", "batch_size=1",
                    "executor=ray", f"workers={workers}",
                )  # fmt: skip
                load_started = time.perf_counter()
                actors = executors.start_ray_workers(config, None)
                ray.get([actor.ready.remote() for actor in actors])
                load = time.perf_counter() - load_started
                batches = work_batches(config)
                bar = executors.progress_bar(batches, enabled=False)
                try:
                    wall, rows = _commit_all(
                        batches,
                        lambda batches, sink, a=actors, b=bar: executors.drain_ray(
                            a, batches, sink, b
                        ),
                        Path(scratch) / f"w{workers}",
                    )
                finally:
                    for actor in actors:
                        ray.kill(actor)
                busy = sum(r["seconds"] for r in rows)  # worker seconds per image
                results[workers] = {
                    "images": len(rows),
                    "wall": wall,
                    "rate": len(rows) / wall,
                    "per_image": busy / len(rows),
                    "overhead": wall - busy / workers,
                    "load": load,
                    "loadavg": os.getloadavg()[0],
                }
        ceilings.append(parallel_ceiling(30 if quick else 300))
    finally:
        ray.shutdown()
    size = f"{model}, {image} px ({image // 8}x{image // 8} latent), {steps} steps, " + (
        f"{results[1]['images']} img ({methods[1:-1]}), 1 thread/worker"
    )
    rows = [
        _row("audit-ray", f"{w} worker{'s' * (w > 1)}", size, [results[w]["rate"]], "img/s", device)
        for w in (1, 2)
    ]
    ratio = results[2]["rate"] / results[1]["rate"]
    table = [
        [
            size,
            f"ray, {w} worker{'s' * (w > 1)}",
            f"{results[w]['rate']:.4f}",
            f"{results[w]['wall']:.1f}",
            f"{results[w]['per_image']:.1f}",
            f"{results[w]['overhead']:.1f}",
            f"{results[w]['load']:.1f}",
            f"{results[w]['loadavg']:.1f}",
            "" if w == 1 else f"{ratio:.2f}x (target 1.6x)",
            "" if w == 1 else " / ".join(f"{c:.2f}x" for c in ceilings),
        ]
        for w in (1, 2)
    ]
    return rows, table


def bench_gpu_batch(quick: bool, batches: list[int], compiled_batches: list[int] | None = None):
    """(csv rows, table rows, device): images/s of plain and guided generation per batch size.

    On CUDA: random SD1.5 weights, fp16, 64x64 latent (512 px), 10 steps; eager and compiled
    ("reduce-overhead"). Without CUDA, or with quick: the tiny model on CPU, 2 steps, batch
    1 and 2, eager only (smoke). A batch that runs out of memory ends the sweep for its
    provider and is reported as "OOM". Compiled runs use `compiled_batches` (default: the
    largest of `batches`): every batch shape compiles its own graphs (a minute or more each).
    """
    from biasmap.mitigation import guided_generate

    cuda = torch.cuda.is_available() and not quick
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        pipe = models.random_sd15(0, dtype=torch.float16, device="cuda")
        side, steps, modes = 512, 10, [False, True]
    else:
        pipe = models.tiny_sd(0)
        side, steps, modes, batches = None, 2, [False], [b for b in batches if b <= 2] or [1]
    size = f"gpu-batch:{'sd15-512px-fp16' if cuda else 'tiny-cpu'}:{steps}steps"
    prompt = "A photo of the face of a firefighter"
    rows, table = [], []
    for compile_mode in modes:
        for lambda_, kind in ((0.0, "plain"), (100.0, "guided")):
            provider = f"{kind}:{'compiled' if compile_mode else 'eager'}"
            sizes = batches
            if compile_mode:
                sizes = compiled_batches or [max(batches)]
            for batch in sizes:

                def generate(batch=batch, lambda_=lambda_, compile_mode=compile_mode):
                    return guided_generate(
                        pipe,
                        [prompt] * batch,
                        prompt + " and gender",
                        ["gender", "firefighter"],
                        lambda_=lambda_,
                        num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(0),
                        height=side,
                        width=side,
                        output_type="latent",
                        compile=compile_mode,
                        return_maps=lambda_ > 0,
                        record_energies=lambda_ > 0,
                    )

                try:
                    start = time.perf_counter()
                    generate()  # warm-up (compiles)
                    generate()
                    warm = time.perf_counter() - start
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    generate()
                    if cuda:
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    peak = _common.peak_memory_bytes(generate, device) / _common.BYTES_PER_MB
                except torch.cuda.OutOfMemoryError:
                    table.append([size, batch, provider, "OOM", "", "", ""])
                    torch.cuda.empty_cache()
                    break
                images_per_s = batch / seconds
                ms_image_step = seconds / (batch * steps) * 1e3
                compile_s = warm - 2 * seconds if compile_mode else 0.0
                label = _common.device_name(device)
                rows.append(
                    _row("gpu-batch", f"{provider}:b{batch}", size, [images_per_s], "img/s", label)
                )
                rows.append(
                    _row("gpu-batch", f"{provider}:b{batch}:peak", size, [peak], "MB", label)
                )
                table.append(
                    [
                        size,
                        batch,
                        provider,
                        f"{images_per_s:.3g}",
                        f"{ms_image_step:.3g}",
                        f"{peak:.0f}",
                        f"{compile_s:.0f}" if compile_mode else "",
                    ]
                )
    return rows, table, device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help="comma list of " + ",".join(CASES)
    )
    parser.add_argument(
        "--batches", default="1,4,8,16", help="gpu-batch: comma list of batch sizes"
    )
    parser.add_argument(
        "--compiled-batches",
        default=None,
        help="gpu-batch: batch sizes compiled (default: largest)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="tiny-batch rounds")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="tiny-batch torch threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    label = _common.device_name(device).replace("(1 thread)", "").strip()
    suffix = "_quick" if args.quick else ""
    started_load = os.getloadavg()
    rows, sections, case_devices = [], {}, {}
    if "tiny-batch" in cases:
        case_rows, table = bench_tiny(
            1 if args.quick else args.repeats, args.quick, label, args.threads
        )
        rows += case_rows
        sections["tiny-batch"] = (
            "## Local executor, batch size 4 vs 1 (tiny model)\n\n"
            + _common.markdown_table(
                [
                    "case",
                    "setting",
                    "img/s (median)",
                    "img/s (best)",
                    "worker ms/img",
                    "ratio of medians / of bests",
                    "UNet-only ratio (best)",
                ],
                table,
            )
        )
    if "ray-sd15" in cases:
        case_rows, table = bench_ray(args.quick, label)
        rows += case_rows
        sections["ray-sd15"] = (
            "## Ray, 2 workers vs 1 (1 torch thread each)\n\n"
            + _common.markdown_table(
                [
                    "case",
                    "setting",
                    "img/s",
                    "wall s",
                    "worker s/img",
                    "engine overhead s",
                    "actor start s",
                    "load avg",
                    "ratio",
                    "machine ceiling before / after",
                ],
                table,
            )
        )
    if "gpu-batch" in cases:
        batches = [int(b) for b in args.batches.split(",")]
        compiled = (
            [int(b) for b in args.compiled_batches.split(",")] if args.compiled_batches else None
        )
        case_rows, table, gpu_device = bench_gpu_batch(args.quick, batches, compiled)
        rows += case_rows
        case_devices["gpu-batch"] = gpu_device
        sections["gpu-batch"] = (
            "## guided_generate throughput by batch size, eager and compiled\n\n"
            + _common.markdown_table(
                [
                    "case",
                    "batch",
                    "provider",
                    "img/s",
                    "ms per image-step",
                    "peak MB",
                    "compile s",
                ],
                table,
            )
        )
    header = (
        f"{label}, {os.cpu_count()} cores; {_common.versions()}\n"
        f"Load average at start (1/5/15 min): "
        f"{' / '.join(f'{v:.1f}' for v in started_load)} (shared machine).\n"
        f"Command: `PYTHONPATH=. python bench/bench_audit.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for case, section in sections.items():  # one file per case: rerunning one keeps the other
        text = f"# bench_audit {case}{suffix}\n\n{header}\n{section}\n"
        print(text)
        slug = _common.device_slug(case_devices.get(case, device))
        name = f"bench_audit_{case}_{slug}{suffix}.md"
        (args.results_dir / name).write_text(text)
    _common.append_csv(args.results_dir / f"bench_audit{suffix}.csv", rows)


if __name__ == "__main__":
    main()
