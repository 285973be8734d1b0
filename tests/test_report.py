"""The HTML report and `biasmap report`: every table is present, with the fixture's numbers."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from audit_fixtures import fixture_rows, tiny_feature_net, write_row_images, write_store

from biasmap.audit import metrics, stats
from biasmap.audit.fid import fid_scores
from biasmap.report import overlay_candidates, write_report


class _ReportParser(HTMLParser):
    """Collects every <table id=...>'s rows of cell texts, image sources and element ids."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.captions: dict[str, str] = {}
        self.images: list[str] = []
        self.ids: set[str] = set()
        self._table = self._row = self._cell = None
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
            self.captions[self._table] = ""
        elif tag == "caption":
            self._in_caption = True
        elif tag == "tr" and self._table:
            self._row = []
            self.tables[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "caption":
            self._in_caption = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None

    def handle_data(self, data):
        if self._in_caption and self._table:
            self.captions[self._table] += data
        elif self._cell is not None:
            self._cell += data


def _parse(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _row(table: list[list[str]], first: str) -> list[str]:
    (found,) = [row for row in table if row and row[0] == first]
    return found


EXPECTED_TABLES = {
    "table-summary-gender",
    "table-summary-race",
    "table-professions-gender",
    "table-professions-race",
    "table-lambda-miou-gender-biasmap",
    "table-lambda-mbiou-gender-biasmap",
    "table-lambda-rd-gender-biasmap",
    "table-lambda-fid-gender-biasmap",
    "table-fid",
    "table-blocks-gender",
    "table-blocks-race",
}


@pytest.fixture
def full_run(tmp_path):
    rows = fixture_rows()
    write_store(tmp_path, rows, parts=3)
    write_row_images(tmp_path, rows)
    return tmp_path


def test_report_has_every_table_with_the_fixture_numbers(full_run):
    feature = tiny_feature_net(gain=30.0)
    html = write_report(full_run, fid_feature=feature)
    assert html == full_run / "report" / "index.html"
    report = _parse(html)
    assert EXPECTED_TABLES | {"examples-gender", "examples-race"} == set(report.tables)
    assert "paper Tables 1-2" in report.captions["table-summary-gender"]
    assert "paper Table 6" in report.captions["table-lambda-miou-gender-biasmap"]
    assert "paper Table 7" in report.captions["table-lambda-fid-gender-biasmap"]

    # Tables 1-2: pooled sd gender = mean over nurse (RD 0.5, mIoU 0.35) and chef (1/3, 0.25),
    # each with its interval; the other methods with their paired difference with sd.
    table = metrics.read_store(full_run).table
    per_profession = metrics.profession_metrics(table)
    per_profession, pooled = stats.attach_statistics(
        table, per_profession, metrics.pooled_metrics(per_profession)
    )
    summary = report.tables["table-summary-gender"]
    assert summary[0] == ["method", "professions", "images", "RD", "mIoU", "mBIoU", "FID"]
    sd_row = _row(summary, "sd")
    assert sd_row[:3] == ["sd", "2", "8"] and sd_row[6] == "–"
    assert [cell.split(" [")[0] for cell in sd_row[3:6]] == ["0.417", "0.300", "0.300"]
    sd = next(g for g in pooled if (g.axis, g.method) == ("gender", "sd"))
    assert (
        sd_row[4]
        == f"0.300 [{sd.estimates['miou'].ci_low:.3f}, {sd.estimates['miou'].ci_high:.3f}]"
    )
    assert [cell.split(" [")[0] for cell in _row(summary, "fd")[3:6]] == ["0.250", "0.288", "0.275"]
    # Every seed of biasmap has IoU 0.1 below sd's: significant at FDR 0.05 (marked "*");
    # fd's differences are not.
    biasmap_miou = _row(summary, "biasmap (λ=100)")[4]
    assert biasmap_miou.startswith("0.200 [") and " Δ -0.100 [" in biasmap_miou
    assert biasmap_miou.endswith("*") and not _row(summary, "fd")[4].endswith("*")
    race_rd = _row(report.tables["table-summary-race"], "sd")[3]
    assert race_rd.startswith("0.875 [")
    assert "FID is given without an interval" in html.read_text()

    # FID: the numbers shown are the FID module's, for the pooled and per-profession groups.
    scores = fid_scores(full_run, metrics.read_store(full_run).table, feature=feature)
    fd_fid = scores.values[("gender", "fd", 0.0, None)]
    assert fd_fid > 0.01 and _row(summary, "fd")[6] == f"{fd_fid:.2f}"
    fid_rows = report.tables["table-fid"]
    nurse_fd = [r for r in fid_rows if r[1:3] == ["fd", "nurse"]][0]
    assert nurse_fd == [
        "gender",
        "fd",
        "nurse",
        "4",
        f"{scores.values[('gender', 'fd', 0.0, 'nurse')]:.2f}",
    ]

    # Tables 4-5: two header rows, then professions; nurse sd mIoU 0.35, RD 0.5.
    professions = report.tables["table-professions-gender"]
    assert professions[0] == ["", "mIoU", "mBIoU", "RD"]
    assert professions[1][:5] == ["profession", "sd", "biasmap (λ=100)", "biasmap (λ=200)", "fd"]
    nurse = _row(professions, "nurse")
    assert [nurse[i].split(" ")[0] for i in (1, 9, 12)] == ["0.350", "0.500", "0.000"]
    assert " Δ -0.500 [" in nurse[12]  # fd's RD minus sd's on the same seeds
    assert _row(report.tables["table-professions-race"], "nurse")[3].startswith("0.750 [")

    # Tables 6-7: mIoU vs lambda per profession and pooled.
    sweep = report.tables["table-lambda-miou-gender-biasmap"]
    assert sweep[0] == ["profession", "λ=100", "λ=200"]
    assert [cell.split(" ")[0] for cell in _row(sweep, "nurse")] == ["nurse", "0.250", "0.200"]
    # chef at λ=200: iou 0.1, 0.2, 0.3, 0.4 shifted by -0.15 and clamped at 0 -> 0.1125.
    assert [cell.split(" ")[0] for cell in _row(sweep, "all (mean)")] == [
        "all",
        "0.200",
        f"{(0.2 + 0.1125) / 2:.3f}",
    ]
    fid_sweep = report.tables["table-lambda-fid-gender-biasmap"]
    expected_fid = scores.values[("gender", "biasmap", 200.0, "chef")]
    assert _row(fid_sweep, "chef")[2] == f"{expected_fid:.2f}"

    # Per-block table (Figures 4-6 data): nurse sd blocks 0.45, 0.25, 0.2, 0.5.
    blocks = report.tables["table-blocks-gender"]
    assert blocks[0] == ["method", "profession", "down-16", "down-8", "up-8", "up-16", "mBIoU"]
    values = [[cell.split(" [")[0] for cell in row] for row in blocks]
    assert ["sd", "nurse", "0.450", "0.250", "0.200", "0.500", "0.350"] in values
    # ... and the mean over nurse and chef (0.35, 0.2, 0.15, 0.3) per block.
    assert ["sd", "all (mean)", "0.400", "0.225", "0.175", "0.400", "0.300"] in values
    nurse_sd = next(
        g for g in per_profession if (g.axis, g.method, g.profession) == ("gender", "sd", "nurse")
    )
    down16 = nurse_sd.block_estimates["down-16"]
    assert f"0.450 [{down16.ci_low:.3f}, {down16.ci_high:.3f}]" in blocks[1] + blocks[2]

    # Every table has its CSV, at full precision.
    for table_id in EXPECTED_TABLES:
        assert (full_run / "report" / "tables" / f"{table_id}.csv").is_file(), table_id
    with open(full_run / "report" / "tables" / "table-summary-gender.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["RD"]) == pytest.approx(5 / 12)
    assert float(rows[0]["RD_ci_low"]) == sd.estimates["rd"].ci_low
    with open(full_run / "report" / "tables" / "table-blocks-gender.csv") as handle:
        header = next(csv.reader(handle))
    for column in ("down-16", "mBIoU"):
        assert {f"{column}_ci_low", f"{column}_delta", f"{column}_p_bh"} <= set(header)

    # Figures (Figures 4-6, the lambda trade-off) and example images all resolve.
    assert {
        "fig-blocks-gender-sd",
        "fig-blocks-by-method-gender",
        "fig-lambda-gender-biasmap",
    } <= report.ids
    for source in report.images:
        assert (html.parent / source).is_file(), source
    assert "../images/gender/nurse/sd_l0_s0.png" in report.images
    # Random-weight model: the page says the numbers mean nothing about bias.
    assert "carry no meaning about" in html.read_text()


def test_report_without_fid_weights_says_why(tmp_path):
    write_store(tmp_path, fixture_rows(), parts=2)
    html = write_report(tmp_path).read_text()
    assert "FID unavailable: no FID Inception weights configured" in html
    summary = _parse(tmp_path / "report" / "index.html").tables["table-summary-gender"]
    assert [row[6] for row in summary[1:]] == ["–"] * 4  # no number is made up
    # fid_weights of the run's config (run.json, as biasmap audit records it) is used.
    record = {"config_hash": "h", "config": {"model": "tiny", "fid_weights": "/no/such.pth"}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    html = write_report(tmp_path).read_text()
    assert "FID unavailable: FID Inception weights &#39;/no/such.pth&#39; not found" in html


def test_report_with_one_lambda_skips_the_sweep(tmp_path):
    rows = [r for r in fixture_rows() if r["lambda_"] in (0.0, 100.0)]
    write_store(tmp_path, rows)
    report = _parse(write_report(tmp_path))
    assert not any(name.startswith("table-lambda") for name in report.tables)
    text = (tmp_path / "report" / "index.html").read_text()
    assert "Skipped: every method was run at a single λ" in text
    assert "No method was run at two or more λ values" in text


def test_report_prefers_an_overlay_and_lists_unreadable_parts(full_run):
    image = "images/gender/nurse/sd_l0_s0.png"
    overlay = overlay_candidates(image)[0]
    assert overlay == "images/gender/nurse/sd_l0_s0_overlay.png"
    (full_run / overlay).write_bytes((full_run / image).read_bytes())
    (full_run / "parts" / "part-broken.parquet").write_bytes(b"PAR1 truncated")
    html = write_report(full_run)
    report = _parse(html)
    assert "../" + overlay in report.images
    assert "../" + image not in report.images
    assert "part-broken.parquet" in html.read_text()


def test_cli_report_prints_the_html_path(full_run):
    from typer.testing import CliRunner

    from biasmap.cli import app

    result = CliRunner().invoke(app, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    printed = Path(result.stdout.strip().splitlines()[-1])
    assert printed == full_run / "report" / "index.html" and printed.is_file()

    missing = CliRunner().invoke(app, ["report", str(full_run / "nope")])
    assert missing.exit_code == 2
    assert "parts" in missing.output and "does not exist" in missing.output
