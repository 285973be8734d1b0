"""Smoke tests of the op benchmark: the CPU peak-memory counter on known allocation
patterns, the authors' soft top-k baseline against the reference, and a --quick run of
bench/bench_ops.py end to end into a temporary results folder."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import _common  # noqa: E402
from bench.authors_topk import authors_soft_topk, authors_topk_count  # noqa: E402

MIB = 2**20
FLOATS_PER_MIB = MIB // 4


@pytest.fixture(autouse=True)
def one_thread():
    """Everything here is tiny; with two threads on a busy 2-core box each intra-op
    parallel region (e.g. log_sigmoid's, even for 128 elements) can wait a whole
    scheduler slice, which makes these seconds-long checks slow and erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mib(count: float) -> torch.Tensor:
    return torch.empty(int(count * FLOATS_PER_MIB), dtype=torch.float32)


def test_cpu_peak_counts_live_bytes_in_allocation_order():
    def pattern():
        a, b, c = _mib(1), _mib(2), _mib(4)  # 7 MiB live: the peak
        del b  # 5 MiB
        d = _mib(1.5)  # 6.5 MiB
        return a, c, d  # freed after the call, inside the measured region

    assert _common.cpu_peak_bytes(pattern) == 7 * MIB


def test_cpu_peak_counts_only_what_the_call_allocates():
    """Frees of tensors allocated before the measurement are invisible to the profiler
    (it never learnt their size), so they do not offset the call's own allocations."""
    existing = [_mib(8)]

    def frees_then_allocates():
        existing.pop()  # unseen
        first = _mib(3)
        second = _mib(6)
        return first, second

    assert _common.cpu_peak_bytes(frees_then_allocates) == 9 * MIB


def test_cpu_peak_sees_autograd_and_op_internal_allocations():
    x = torch.randn(FLOATS_PER_MIB, requires_grad=True)  # 1 MiB, allocated before

    def forward_backward():
        # exp saves its output (1 MiB), the backward allocates the gradient (1 MiB).
        return torch.autograd.grad(x.exp().sum(), x)

    assert _common.cpu_peak_bytes(forward_backward) >= 2 * MIB


@pytest.mark.parametrize("tau,iters", [(0.01, 20), (0.1, 5)])
def test_authors_topk_equals_reference_sinkhorn(tau, iters):
    """The baseline computes what biasmap's Sinkhorn reference computes (normalize="none")."""
    from biasmap.ops import reference

    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    k = authors_topk_count(50)
    ours = reference.soft_topk(x, k, tau, solver="sinkhorn", iters=iters, normalize="none")
    theirs = authors_soft_topk(x, k, tau, iters)
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-11)


def test_authors_topk_keeps_shape_and_differentiates():
    x = torch.rand(4, 8, 8, requires_grad=True)
    mask = authors_soft_topk(x)
    assert mask.shape == x.shape
    (grad,) = torch.autograd.grad(mask.square().sum(), x)
    assert torch.isfinite(grad).all()


def test_append_csv_refuses_another_layout(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        _common.append_csv(path, [])


def test_quick_run_writes_tables_and_csv(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from bench import bench_ops

    # --threads 1 for the reason in one_thread (main sets its own thread count).
    results = bench_ops.main(["--quick", "--threads", "1", "--results-dir", str(tmp_path)])
    printed = capsys.readouterr().out

    failures = [f"{r.case.op}/{r.mode}/{r.provider}: {r.note}" for r in results if r.timing is None]
    assert not failures
    ops_timed = {r.case.op for r in results}
    assert {"attention_slice", "soft_topk", "resize_aggregate", "soft_iou"} <= ops_timed
    assert {r.mode for r in results} == {"fwd", "bwd", "fwd+bwd"}
    assert any(r.provider == "authors" for r in results)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    markdown = (tmp_path / f"bench_ops_{_common.device_slug(device)}_quick.md").read_text()
    assert markdown in printed
    base_columns = "| size | mode | provider | p50 ms | p20 | p80 | ratio vs ref |"
    # On a GPU: CUDA-graph replay times, and the soft_topk bandwidth against HBM.
    on_gpu = device.type == "cuda"
    graph = " graph p50 ms | graph vs ref |" if on_gpu else ""
    topk_gpu = " graph p50 ms | graph vs ref | graph vs authors | GB/s | % of HBM peak |"
    memory = " peak MB | mem ratio vs ref | runs |"
    assert f"### attention_slice\n\n{base_columns}{graph}{memory}" in markdown
    topk_columns = f"{base_columns} ratio vs authors |{topk_gpu if on_gpu else ''}{memory}"
    assert f"### soft_topk\n\n{topk_columns}" in markdown

    with (tmp_path / "bench_ops_quick.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == _common.CSV_COLUMNS
        rows = list(reader)
    timed = [row for row in rows if row["unit"] == "ms"]
    assert len(timed) == len(results)
    assert {row["unit"] for row in rows} == {"ms", "MB"} | ({"ms-cuda-graph"} if on_gpu else set())
    for row in timed:
        assert float(row["p20"]) <= float(row["p50"]) <= float(row["p80"])
        assert row["versions"].startswith("torch=")
        assert row["device"]

    # A second run appends under the same header.
    bench_ops.main(
        ["--quick", "--threads", "1", "--results-dir", str(tmp_path)]
        + ["--ops", "soft_iou", "--providers", "reference"]
    )
    with (tmp_path / "bench_ops_quick.csv").open(newline="") as handle:
        assert sum(1 for line in handle if line.startswith("kernel,")) == 1


def test_new_backends_are_picked_up_and_failures_reported(tmp_path, monkeypatch):
    """A backend added to BACKENDS is benchmarked without changes to bench_ops; one that
    raises becomes a note under the table, and an interpreted Triton one is left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from bench import bench_ops

    import biasmap.ops as biasmap_ops
    from biasmap.ops import backends

    # ReferenceBackend supports everything; under a non-reference name the op wrapper
    # sends it to the compiled ops, which are made to fail here like a broken kernel.
    registry = dict(backends.BACKENDS)
    registry["broken"] = backends.ReferenceBackend("broken")
    registry["triton"] = backends.ReferenceBackend("triton")
    monkeypatch.setattr(backends, "BACKENDS", registry)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    class ExplodingOps:
        def __getattr__(self, name):
            raise RuntimeError(f"kernel {name} exploded")

    monkeypatch.setattr(biasmap_ops, "_native", ExplodingOps)

    case = bench_ops.soft_iou_case(2, 64)
    compiled = ["cpu"] if backends.BACKENDS["cpu"].unavailable("soft_iou") is None else []
    assert bench_ops.providers_for(case, torch.device("cpu"), None) == [
        "reference",
        *compiled,
        "broken",
    ]

    results = bench_ops.main(
        ["--quick", "--threads", "1", "--results-dir", str(tmp_path), "--ops", "soft_iou"]
    )
    by_provider = {r.provider: r for r in results if r.mode == "fwd"}
    assert by_provider["reference"].timing is not None
    assert by_provider["broken"].timing is None
    assert by_provider["broken"].note.startswith("error: ")
    markdown = next(tmp_path.glob("bench_ops_*_quick.md")).read_text()
    note = 1 + len(compiled)  # the compiled cpu provider fails first, under the same ops
    assert f"| broken | - [{note}] |" in markdown
    assert f"[{note}] 2x64 / fwd / broken: error: " in markdown


def test_the_dit_guided_case_times_every_provider_against_the_pipeline(monkeypatch):
    from bench import bench_guided

    # tiny-sd3 at 32 px and 1 step, one timed round: the rows' layout, not the figures.
    case = ("sd3", "tiny", 32, 1, torch.float32, "cpu", 1)
    monkeypatch.setitem(bench_guided.DIT_CASES, "tiny-sd3", case)
    rows = bench_guided.run_dit_case("tiny-sd3", None)
    assert all(tuple(row) == _common.CSV_COLUMNS for row in rows)
    ratios = {row["provider"]: row for row in rows if row["kernel"] == "guided_step_cpu_time"}
    providers = ("pipeline", "plain", "guided", "guided@joint-0")
    assert set(ratios) == {*providers, *(f"{p}/pipeline" for p in providers)}
    assert ratios["pipeline/pipeline"]["p50"] == 1.0
    # Guided steps do a backward on top of the forward: process CPU time says so even on
    # a loaded machine.
    assert ratios["guided/pipeline"]["p50"] > 1.0
    memory = {row["provider"] for row in rows if row["kernel"] == "guided_memory"}
    assert memory == {f"{p}:{kind}" for p in providers for kind in ("peak", "peak+weights")}


@pytest.mark.parametrize(
    ("family", "blocks"),
    [
        ("sd3", ["joint-0", "joint-1", "joint-2", "joint-3"]),
        ("flux", ["joint-0", "joint-1", "single-0", "single-1", "single-2", "single-3"]),
    ],
)
def test_mid_size_dits_run_through_the_trace(family, blocks):
    import biasmap
    from bench.dit_cases import MID_HEAD_DIM, MID_WIDTH_HEADS, dit_pipeline

    pipe = dit_pipeline(family, "mid")
    assert pipe.transformer.inner_dim == MID_WIDTH_HEADS * MID_HEAD_DIM
    generator = torch.Generator().manual_seed(0)
    call = dict(num_inference_steps=1, height=128, width=128, output_type="latent")
    with biasmap.trace(pipe, "a photo of a doctor and gender", ["gender", "doctor"]) as tr:
        pipe("a photo of a doctor", generator=generator, **call)
    maps = tr.maps()
    assert list(maps.blocks) == blocks
    assert tuple(maps.aggregate.shape[-2:]) == (8, 8)  # 128 px: a 16x16 latent, 8x8 tokens
