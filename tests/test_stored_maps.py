"""Stored attribution maps: re-thresholding without regeneration (`biasmap report --q`), the
threshold analysis, and runs made before maps were stored (tiny pipeline, CPU, 2 steps)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("diffusers")

from audit_fixtures import fixture_rows, small_config, write_store, write_yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from biasmap.audit import stored_maps  # noqa: E402
from biasmap.audit.config import load_config  # noqa: E402
from biasmap.audit.runner import run_audit  # noqa: E402
from biasmap.audit.schema import ADDED_FIELDS, KEY_COLUMNS, SCHEMA  # noqa: E402
from biasmap.audit.store import ResultsStore  # noqa: E402
from biasmap.cli import app  # noqa: E402
from biasmap.report import write_report  # noqa: E402

TINY_BLOCKS = ["down-16", "down-8", "down-4", "up-4", "up-8", "up-16"]


def tiny_config(output: Path, **fields) -> dict:
    return small_config(output, **{"professions": ["doctor", "nurse"], "seeds": "0-2", **fields})


def audit(tmp_path: Path, name: str, **fields):
    path = write_yaml(tmp_path / f"{name}.yaml", tiny_config(tmp_path / name, **fields))
    config = load_config(path)
    run_audit(config, classifier_factory=None, progress=False)
    return config, ResultsStore(config.output).read_table()


def by_key(table: pa.Table) -> dict[tuple, dict]:
    return {tuple(row[n] for n in KEY_COLUMNS[:-1]): row for row in table.to_pylist()}


def reference_iou(maps: np.ndarray, q: float, view: int) -> float:
    """IoU of the two concepts' hard masks (map >= numpy's linear q-quantile), written from
    scratch: maps float16 [1 + N, 2, S, S]; view 0 is the aggregate, 1.. the blocks."""
    masks = []
    for concept in range(2):
        values = maps[view, concept].astype(np.float32).ravel()
        masks.append(values >= np.quantile(values, q))
    union = np.logical_or(*masks).sum()
    return float(np.logical_and(*masks).sum() / union) if union else 0.0


def decode_independently(row: dict) -> np.ndarray:
    return np.frombuffer(row["maps"], dtype="<f2").reshape(row["maps_shape"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run at q = 0.7 (sd and biasmap) and a fresh sd run at q = 0.5 of the same grid."""
    tmp_path = tmp_path_factory.mktemp("runs")
    first = audit(tmp_path, "q07")
    fresh = audit(tmp_path, "q05", q=0.5, methods=["sd"])
    return tmp_path, first, fresh


def test_rows_store_float16_maps_and_their_metrics(runs):
    _, (config, table), _ = runs
    assert table.num_rows == 12
    for row in table.to_pylist():
        assert row["maps_concepts"] == ["gender", row["profession"]]
        assert row["maps_shape"] == [1 + len(TINY_BLOCKS), 2, 16, 16]
        assert row["biou_blocks"] == TINY_BLOCKS
        assert len(row["maps"]) == stored_maps.nbytes(row["maps_shape"]) == 7168
        assert row["masks_inclusive"] is True
        maps = decode_independently(row)
        assert np.isfinite(maps).all() and maps.max() > 0
        # The stored metrics are those of the stored float16 maps, recomputed from scratch.
        assert row["iou"] == pytest.approx(reference_iou(maps, config.q, 0), abs=1e-7)
        expected = [reference_iou(maps, config.q, v) for v in range(1, 1 + len(TINY_BLOCKS))]
        np.testing.assert_allclose(row["biou_values"], expected, atol=1e-7)


def test_rethresholding_equals_a_fresh_run_for_sd_rows(runs):
    _, (_, first), (_, fresh) = runs
    again = by_key(stored_maps.rethresholded(first, 0.5))
    fresh_rows = by_key(fresh)
    assert len(fresh_rows) == 6
    changed = 0
    for key, row in fresh_rows.items():
        for column in ("iou", "biou_values", "biou_mean"):
            assert again[key][column] == row[column], (key, column)
        changed += again[key]["iou"] != by_key(first)[key]["iou"]
    assert changed > 0  # q = 0.5 is not q = 0.7 on these maps: the test can see a difference
    # At the run's own q, every row (guided ones too) gives back exactly what was stored.
    same = by_key(stored_maps.rethresholded(first, 0.7))
    for key, row in by_key(first).items():
        for column in ("iou", "biou_values", "biou_mean"):
            assert same[key][column] == row[column], (key, column)


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_report_q_rewrites_every_table_as_a_fresh_run_would(runs):
    tmp_path, (first_config, _), (fresh_config, _) = runs
    result = CliRunner().invoke(app, ["report", first_config.output, "--q", "0.5"])
    assert result.exit_code == 0, result.output
    html = Path(result.output.strip().splitlines()[-1])
    assert html == Path(first_config.output) / "report-q0.5" / "index.html"
    assert "re-thresholded at q = 0.5" in html.read_text()
    write_report(fresh_config.output)
    mine = _csv(html.parent / "tables" / "table-professions-gender.csv")
    theirs = _csv(Path(fresh_config.output) / "report" / "tables" / "table-professions-gender.csv")
    sd_columns = [name for name in theirs[0] if "/ sd" in name and "delta" not in name]
    assert any(name.startswith("mIoU / sd") for name in sd_columns)
    for row_a, row_b in zip(mine, theirs, strict=True):
        for name in sd_columns:
            if name.startswith(("mIoU", "mBIoU")):
                assert row_a[name] == row_b[name], name


def test_threshold_analysis_is_a_chart_and_a_csv(runs):
    _, (config, table), _ = runs
    html = write_report(config.output)
    text = html.read_text()
    assert 'id="fig-threshold-miou"' in text
    assert (html.parent / "figures" / "threshold-miou.png").stat().st_size > 1000
    rows = _csv(html.parent / "tables" / "table-threshold.csv")
    grid = [f"q={q:g}" for q in stored_maps.THRESHOLD_GRID]
    assert list(rows[0])[3:] == grid
    # The pooled sd curve at each q: the mean over professions of the mean IoU over seeds,
    # each IoU recomputed from scratch.
    (pooled,) = [r for r in rows if r["method"] == "sd" and r["profession"] == "all (mean)"]
    sd_rows = [r for r in table.to_pylist() if r["method"] == "sd"]
    for q, name in zip(stored_maps.THRESHOLD_GRID, grid, strict=True):
        per_profession = [
            np.mean(
                [
                    reference_iou(decode_independently(r), q, 0)
                    for r in sd_rows
                    if r["profession"] == p
                ]
            )
            for p in ("doctor", "nurse")
        ]
        assert float(pooled[name]) == pytest.approx(np.mean(per_profession), abs=1e-6)


def test_a_run_without_maps_still_reports_and_refuses_q_in_one_line(tmp_path):
    # A run written before maps were stored: its parts have the schema without ADDED_FIELDS.
    legacy_schema = pa.schema([f for f in SCHEMA if f.name not in ADDED_FIELDS])
    rows = [{k: v for k, v in row.items() if k in legacy_schema.names} for row in fixture_rows()]
    folder = tmp_path / "old" / "parts"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=legacy_schema), folder / "part-0.parquet")
    store = ResultsStore(tmp_path / "old")
    check = store.check()
    assert check.ok and check.keys == len(rows)  # old parts are valid, not corrupt
    assert store.read_table().column("maps").null_count == len(rows)

    result = CliRunner().invoke(app, ["report", str(tmp_path / "old")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "old" / "report" / "index.html").read_text()
    assert "No threshold analysis" in text and "no stored attribution maps" in text

    result = CliRunner().invoke(app, ["report", str(tmp_path / "old"), "--q", "0.5"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("error: --q:") and "no stored attribution maps" in lines[0]
    assert not (tmp_path / "old" / "report-q0.5").exists()


def test_a_store_with_maps_for_some_rows_only_refuses_q(tmp_path):
    rows = fixture_rows()
    write_store(tmp_path, rows)  # the fixture writer leaves the map columns null
    with pytest.raises(stored_maps.MissingMapsError, match=f"{len(rows)} of {len(rows)}"):
        write_report(tmp_path, q=0.5)


def test_threshold_metrics_rows_are_independent_and_scale_free():
    torch.manual_seed(0)
    maps = torch.rand(5, 3, 2, 8, 8).to(torch.float16)
    whole = stored_maps.threshold_metrics(maps, 0.6)
    for index in range(5):
        alone = stored_maps.threshold_metrics(maps[index : index + 1], 0.6)
        assert torch.equal(alone.iou, whole.iou[index : index + 1])
        assert torch.equal(alone.biou, whole.biou[index : index + 1])
    # Huge maps are scaled by a power of two into float16's range, with the same masks.
    big = torch.rand(2, 2, 8, 8) * 1e6
    packed = stored_maps.pack(big, [big * 0.5])
    assert torch.isfinite(packed.float()).all()
    small = stored_maps.pack(big / 2**6, [big / 2**7])
    assert torch.equal(
        stored_maps.threshold_metrics(packed, 0.7).iou,
        stored_maps.threshold_metrics(small, 0.7).iou,
    )
