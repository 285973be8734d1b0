"""What storing each image's attribution maps costs, and how fast the report re-thresholds them.

Cases:
  bytes     bytes per image of the stored float16 maps: measured on the tiny and planted models
            (one generated batch each) and computed for SD1.5 at 512 px from its UNet layout
            (default blocks, map side = the largest attention resolution).
  overhead  the tiny model through the engine's own pieces (BatchGenerator.run + ResultSink,
            batch 4, 10 steps, sd + biasmap): rounds with store_maps on and off alternate on one
            loaded pipeline. Reported: the median wall ratio (noisy on a shared machine) and,
            the cost measured where it is paid: the time in the maps code itself (packing to
            float16, measuring IoU / BIoU on it, encoding) plus the extra time the Parquet part
            writes took with the maps, over the wall time without storing; this does not
            depend on how busy the machine was between them. Also the part bytes per image.
  report    `python -m biasmap report RUN --q 0.5` on the demo run (configs/demo.yaml: planted
            model, 160 images) as a subprocess, and the plain report for comparison; wall time
            with the machine's 2 cores. The demo audit runs first when --demo-run has no store.

    PYTHONPATH=. python bench/bench_maps.py                    # all cases (minutes on 2 cores)
    PYTHONPATH=. python bench/bench_maps.py --cases report --demo-run runs/demo
    PYTHONPATH=. python bench/bench_maps.py --quick            # seconds; *_quick files (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from biasmap.audit import stored_maps  # noqa: E402
from biasmap.audit.runner import BatchGenerator, ResultSink, work_batches  # noqa: E402
from biasmap.audit.store import ResultsStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("bytes", "overhead", "report")


def _config(model: str, seeds: str, steps: int, *extra: str):
    return _common.audit_grid(model, seeds, "[sd,biasmap]", steps, "batch_size=4", *extra)


def sd15_bytes_per_image() -> tuple[int, list[str], int]:
    """(bytes, default block names, map side) of SD1.5 at 512 px, from its UNet layout."""
    from biasmap.discovery.trace import cross_attention_block_names
    from biasmap.models import unet_layout

    unet, scale = unet_layout("random-sd15")
    side = 512 // scale
    names = [n for n in cross_attention_block_names(unet, side, side) if not n.startswith("mid")]
    map_side = max(int(n.rsplit("-", 1)[1]) for n in names)
    shape = (1 + len(names), 2, map_side, map_side)  # aggregate + blocks, concept + profession
    return stored_maps.nbytes(shape), names, map_side


def bench_bytes() -> list[list[str]]:
    table = []
    for model in ("tiny", "planted"):
        config = _config(model, "0-1", 1, "methods=[sd]")
        generator = BatchGenerator(config, None)
        (batch,) = work_batches(config)
        row = generator.run(batch)[0].row
        table.append(
            [model, str(row["maps_shape"]), f"{len(row['maps']):,}", "measured (one batch)"]
        )
    sd15, names, side = sd15_bytes_per_image()
    table.append(
        [
            "SD1.5, 512 px",
            str([1 + len(names), 2, side, side]),
            f"{sd15:,}",
            f"computed: aggregate + {len(names)} blocks ({', '.join(names)}), float16",
        ]
    )
    return table


class _Timed:
    """Replaces a module function or a class's method by a wrapper that adds up the seconds
    spent in it (a plain function, so that it binds as a method on a class)."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name
        self.function = getattr(owner, name)
        self.seconds = 0.0
        function, timer = self.function, self

        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - started

        self.wrapper = timed

    def __enter__(self):
        setattr(self.owner, self.name, self.wrapper)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.function)


def bench_overhead(repeats: int, quick: bool) -> tuple[list[list[str]], dict]:
    steps, seeds = (2, "0-3") if quick else (10, "0-7")
    generator = BatchGenerator(_config("tiny", seeds, steps), None, threads=1)
    walls: dict[bool, list[float]] = {True: [], False: []}
    writes: dict[bool, list[float]] = {True: [], False: []}
    maps_seconds, part_bytes, images = [], {}, 0
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(repeats):
            for store in (True, False):
                config = _config("tiny", seeds, steps, f"store_maps={str(store).lower()}")
                generator.config = config
                folder = Path(scratch) / f"{store}-{round_index}"
                results_store = ResultsStore(folder)
                sink = ResultSink(folder, results_store, set())
                timers = [
                    _Timed(stored_maps, name) for name in ("pack", "encode", "threshold_metrics")
                ]
                write = _Timed(ResultsStore, "_commit")  # Parquet part: write, fsync, rename
                started = time.perf_counter()
                with contextlib.ExitStack() as stack:
                    for timer in [*timers, write]:
                        stack.enter_context(timer)
                    for batch in work_batches(config):
                        sink.commit(generator.run(batch))
                walls[store].append(time.perf_counter() - started)
                writes[store].append(write.seconds)
                images = sink.images
                if store:
                    maps_seconds.append(sum(t.seconds for t in timers))
                part_bytes[store] = sum(p.stat().st_size for p in results_store.part_files())
    on, off = statistics.median(walls[True]), statistics.median(walls[False])
    # What storing adds, measured where it happens: the maps code (packing, IoU on float16,
    # encoding; an upper bound, since the IoU replaced the float32 IoU the audit computed
    # before) plus the extra time the part writes took with the maps in them.
    extra_write = statistics.median(writes[True]) - statistics.median(writes[False])
    share = (statistics.median(maps_seconds) + max(extra_write, 0.0)) / off
    size = f"tiny, {images} img (sd, biasmap), {steps} steps, batch 4, 1 thread"
    table = [
        [
            size,
            f"{on:.2f}",
            f"{off:.2f}",
            f"{100 * (on / off - 1):+.1f}%",
            f"{1e3 * statistics.median(maps_seconds) / images:.2f}",
            f"{1e3 * statistics.median(writes[True]) / images:.2f} / "
            f"{1e3 * statistics.median(writes[False]) / images:.2f}",
            f"{100 * share:.2f}%",
            f"{part_bytes[True] / images:,.0f} / {part_bytes[False] / images:,.0f}",
        ]
    ]
    return table, {"share": share, "ratio": on / off}


def _demo_run(path: Path) -> Path:
    if not ResultsStore(path).part_files():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "biasmap",
                "audit",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                f"output={path}",
                "--no-progress",
            ],
            check=True,
            env=_environment(),
        )
    return path


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def bench_report(run: Path, repeats: int) -> list[list[str]]:
    run = _demo_run(run)
    images = ResultsStore(run).read_table(with_maps=False).num_rows
    table = []
    for label, extra in (("report --q 0.5", ["--q", "0.5"]), ("report (run's q)", [])):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "biasmap", "report", str(run), *extra],
                check=True,
                env=_environment(),
                stdout=subprocess.DEVNULL,
            )
            times.append(time.perf_counter() - started)
        table.append(
            [
                f"demo run, {images} img",
                label,
                f"{statistics.median(times):.1f}",
                f"{min(times):.1f}",
                "20 s" if extra else "",
            ]
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of " + ",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="rounds per setting")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--demo-run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    torch.set_num_threads(1)
    device = _common.device_name(torch.device("cpu")).replace("(1 thread)", "").strip()
    repeats = 1 if args.quick else args.repeats
    load = os.getloadavg()
    sections = []
    if "bytes" in cases:
        sections.append(
            "## Stored maps, bytes per image\n\n"
            + _common.markdown_table(["model", "shape", "bytes", "how"], bench_bytes())
        )
    if "overhead" in cases:
        table, _ = bench_overhead(repeats, args.quick)
        sections.append(
            "## Audit time with and without storing the maps (target: at most 5%)\n\n"
            + _common.markdown_table(
                [
                    "case",
                    "wall s, maps stored (median)",
                    "wall s, not stored (median)",
                    "difference of medians (noisy)",
                    "maps code ms/img",
                    "part write ms/img on / off",
                    "storing's cost / wall not stored",
                    "Parquet bytes/img on / off",
                ],
                table,
            )
        )
    if "report" in cases:
        sections.append(
            "## `biasmap report` on the demo run (subprocess wall time, 2 cores; target 20 s)\n\n"
            + _common.markdown_table(
                ["run", "command", "s (median)", "s (best)", "target"],
                bench_report(args.demo_run, repeats),
            )
        )
    text = (
        f"# bench_maps on {device}\n\n"
        f"`PYTHONPATH=. python bench/bench_maps.py {' '.join(argv or sys.argv[1:])}`; load "
        f"average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} (shared machine).\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    suffix = "_quick" if args.quick else ""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    slug = _common.device_slug(torch.device("cpu")).replace("-1t", "")
    path = args.results_dir / f"bench_maps_{slug}{suffix}.md"
    path.write_text(text)
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
