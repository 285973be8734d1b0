"""The audit report: a static HTML page with the paper's tables and figures, plus CSVs.

`write_report(RUN_DIR)` reads only the results store (`RUN_DIR/parts/*.parquet`, the schema
of `biasmap.audit.schema`), the images it points to and, if present, `RUN_DIR/run.json`
(the run's config, for `fid_weights`), and writes into `RUN_DIR/report/`:

- `index.html`: Tables 1-2 (pooled RD / mIoU / mBIoU / FID per method and axis), Tables 4-5
  (per profession), Tables 6-7 (metrics and FID vs lambda, for methods run at several
  lambdas), the FID table (or why FID is unavailable), per-block BIoU tables and charts
  (Figures 4-6), the lambda trade-off plot and example images per profession and method;
- `tables/<table id>.csv`: every table at full precision;
- `figures/*.png`: the charts.

The threshold analysis (mIoU against the mask quantile q from 0.1 to 0.9, per method and axis)
is measured from the attribution maps the audit stores in each row. `write_report(RUN_DIR,
q=Q)` re-thresholds every IoU and BIoU at Q from those maps and writes `RUN_DIR/report-q<Q>/`
instead: for unguided methods that is exactly what a fresh audit at q = Q would give; guided
methods' images were generated with guidance at the run's own q, so theirs are the run's
images measured at Q. A run made before maps were stored reports as before, without the
threshold analysis, and refuses re-thresholding (biasmap.audit.stored_maps.MissingMapsError).

Images are linked relative to the report folder (`../images/...`), so keep the report inside
its run folder, or copy the images along.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from biasmap.audit import metrics as audit_metrics
from biasmap.audit import stats as audit_stats
from biasmap.audit import stored_maps
from biasmap.audit.metrics import GroupMetrics, Table, method_label
from biasmap.audit.runner import RUN_FILE, lambda_text, path_component
from biasmap.models import PLANTED, RANDOM_MODELS, model_family

REPORT_FOLDER = "report"


def report_folder(q: float | None) -> str:
    """The report's folder inside RUN_DIR: "report", or "report-q0.5" when re-thresholded."""
    return REPORT_FOLDER if q is None else f"{REPORT_FOLDER}-q{lambda_text(q)}"


@dataclass(frozen=True)
class Figure:
    """A chart written under report/figures, as referenced from the HTML."""

    id: str
    caption: str
    path: str  # relative to the report folder


@dataclass(frozen=True)
class Example:
    """One example image of a (profession, method) cell; path relative to the report folder."""

    profession: str
    label: str
    seed: int
    path: str | None
    kind: str  # "overlay" or "image"
    iou: float | None
    clip_label: str | None


# --------------------------------------------------------------------------- config


def configured_fid_weights(run_dir: Path) -> str | None:
    """The `fid_weights` of the config the run was made with (RUN_DIR/run.json, written by
    `biasmap audit`), or None."""
    record = run_dir / RUN_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("config", {}).get("fid_weights")


# --------------------------------------------------------------------------- figures


def _pyplot():
    from biasmap.viz import _pyplot as pyplot

    return pyplot()


def _blocks_of(groups: Sequence[GroupMetrics]) -> list[str]:
    return list(dict.fromkeys(block for g in groups for block in g.block_biou))


def _block_chart_per_profession(groups: Sequence[GroupMetrics], title: str, path: Path) -> None:
    """Figures 4-5: mean BIoU per UNet block, one line per profession and their mean."""
    plt = _pyplot()
    blocks = _blocks_of(groups)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.0 * len(blocks) + 3), 3.8))
    positions = range(len(blocks))
    for group in groups:
        values = [group.block_biou.get(b, float("nan")) for b in blocks]
        axis.plot(positions, values, marker="o", linewidth=1, alpha=0.8, label=group.profession)
    mean = [audit_metrics.mean_of(g.block_biou.get(b) for g in groups) for b in blocks]
    axis.plot(
        positions,
        [float("nan") if v is None else v for v in mean],
        color="black",
        linewidth=2.5,
        linestyle="--",
        label="mean",
    )
    axis.set_xticks(list(positions), blocks)
    axis.set_ylabel("mean BIoU")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(
        fontsize=7, ncol=2 if len(groups) > 8 else 1, bbox_to_anchor=(1.01, 1), loc="upper left"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _block_chart_per_method(groups: Sequence[GroupMetrics], title: str, path: Path) -> None:
    """Figure 6 for every profession at once: per-block BIoU, one line per method."""
    plt = _pyplot()
    professions = sorted({g.profession for g in groups})
    blocks = _blocks_of(groups)
    columns = min(4, len(professions))
    rows = -(-len(professions) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False, sharey=True
    )
    labels = list(dict.fromkeys(method_label(g.method, g.lambda_) for g in groups))
    for index, profession in enumerate(professions):
        axis = axes[index // columns][index % columns]
        for label in labels:
            found = [
                g
                for g in groups
                if g.profession == profession and method_label(g.method, g.lambda_) == label
            ]
            if found:
                values = [found[0].block_biou.get(b, float("nan")) for b in blocks]
                axis.plot(range(len(blocks)), values, marker="o", linewidth=1, label=label)
        axis.set_title(profession, fontsize=9)
        axis.set_xticks(range(len(blocks)), blocks, rotation=45, fontsize=7)
        axis.set_ylim(0, 1)
    for index in range(len(professions), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].set_ylabel("BIoU")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="center right", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.85, 0.95))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _lambda_chart(
    groups: Sequence[GroupMetrics],
    fid: dict,
    axis_name: str,
    method: str,
    path: Path,
) -> str:
    """The trade-off: mIoU and mBIoU vs lambda, and mIoU vs FID (or vs RD without FID),
    pooled over professions. Returns what the second panel plots."""
    plt = _pyplot()
    groups = sorted(groups, key=lambda g: g.lambda_)
    lambdas = [g.lambda_ for g in groups]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for attribute, name in (("miou", "mIoU"), ("mbiou", "mBIoU"), ("rd", "RD")):
        values = [getattr(g, attribute) for g in groups]
        if any(v is not None for v in values):
            left.plot(
                lambdas, [float("nan") if v is None else v for v in values], marker="o", label=name
            )
    left.set_xlabel("λ")
    left.set_ylabel("value (lower is better)")
    left.legend(fontsize=8)
    left.set_title(f"{method} on {axis_name}: metrics vs λ", fontsize=10)
    fids = [fid.get((axis_name, method, g.lambda_, None)) for g in groups]
    if all(v is not None for v in fids):
        x_values, x_name = fids, "FID vs sd (lower is better)"
    else:
        x_values, x_name = [g.rd for g in groups], "RD (FID unavailable)"
    points = [
        (x, g.miou, g.lambda_)
        for x, g in zip(x_values, groups, strict=True)
        if x is not None and g.miou is not None
    ]
    right.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#aa3333")
    for x, y, lam in points:
        right.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    right.set_xlabel(x_name)
    right.set_ylabel("mIoU")
    right.set_title("trade-off", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return x_name


# --------------------------------------------------------------------------- examples


def overlay_candidates(image_path: str) -> list[str]:
    """Where an overlay of `image_path` may be stored, in the order tried (paths relative to
    RUN_DIR): the same name with "image" replaced by "overlay", `<stem>_overlay.png`, and the
    same relative path under `overlays/` instead of `images/`."""
    path = Path(image_path)
    candidates = []
    if "image" in path.name:
        candidates.append(str(path.with_name(path.name.replace("image", "overlay", 1))))
    candidates.append(str(path.with_name(f"{path.stem}_overlay{path.suffix}")))
    if path.parts and path.parts[0] == "images":
        candidates.append(str(Path("overlays", *path.parts[1:])))
    return candidates


def _examples(
    rows, run_dir: Path, report_dir: Path
) -> dict[str, tuple[list[str], list[str], dict[tuple[str, str], Example]]]:
    """Per axis: (professions, method labels, the lowest seed's image of each cell)."""
    chosen: dict[tuple[str, str, str], dict] = {}
    for row in rows.select(
        ["profession", "axis", "seed", "method", "lambda_", "image_path", "iou", "clip_label"]
    ).to_pylist():
        key = (row["axis"], row["profession"], method_label(row["method"], row["lambda_"]))
        if key not in chosen or row["seed"] < chosen[key]["seed"]:
            chosen[key] = row
    per_axis: dict[str, Any] = {}
    for (axis, profession, label), row in chosen.items():
        path, kind = None, "image"
        for relative, candidate_kind in [
            *((c, "overlay") for c in overlay_candidates(row["image_path"] or "")),
            (row["image_path"], "image"),
        ]:
            if relative and (run_dir / relative).is_file():
                path = Path(os.path.relpath(run_dir / relative, report_dir)).as_posix()
                kind = candidate_kind
                break
        cells = per_axis.setdefault(axis, ({}, {}, {}))
        cells[0][profession] = None
        cells[1][(row["method"], row["lambda_"])] = label
        cells[2][(profession, label)] = Example(
            profession, label, row["seed"], path, kind, row["iou"], row["clip_label"]
        )
    result = {}
    for axis, (professions, methods, cells) in per_axis.items():
        ordered = sorted(methods, key=lambda k: (audit_metrics.method_rank(k[0]), k[1]))
        result[axis] = (sorted(professions), [methods[k] for k in ordered], cells)
    return dict(sorted(result.items(), key=lambda item: audit_metrics.axis_rank(item[0])))


# --------------------------------------------------------------------------- tables


def _block_tables(
    per_profession: Sequence[GroupMetrics], pooled: Sequence[GroupMetrics]
) -> list[Table]:
    """Per axis: mean BIoU per block for each (method, profession) and the mean over
    professions ("all (mean)"), the data of Figures 4-6."""
    tables = []
    by_axis: dict[str, list[GroupMetrics]] = defaultdict(list)
    for group in [*per_profession, *pooled]:
        by_axis[group.axis].append(group)
    for axis in sorted(by_axis, key=audit_metrics.axis_rank):
        groups = by_axis[axis]
        blocks = _blocks_of(groups)
        rows = [
            [
                method_label(g.method, g.lambda_),
                g.profession or "all (mean)",
                *[g.block_estimate(b) for b in blocks],
                g.estimate("mbiou"),
            ]
            for g in sorted(
                groups,
                key=lambda g: (
                    audit_metrics.method_rank(g.method),
                    g.lambda_,
                    g.profession is None,
                    g.profession or "",
                ),
            )
        ]
        tables.append(
            Table(
                id=f"table-blocks-{axis}",
                caption=f"{axis.capitalize()}: mean BIoU per UNet block, per method and "
                "profession (the data of Figures 4-6).",
                columns=["method", "profession", *blocks, "mBIoU"],
                rows=rows,
            )
        )
    return tables


def _fid_table(fid_scores) -> Table:
    rows = [
        [
            axis,
            method_label(method, lambda_),
            profession or "all (pooled)",
            fid_scores.pairs[(axis, method, lambda_, profession)],
            value,
        ]
        for (axis, method, lambda_, profession), value in sorted(
            fid_scores.values.items(),
            key=lambda item: (
                audit_metrics.axis_rank(item[0][0]),
                audit_metrics.method_rank(item[0][1]),
                item[0][2],
                item[0][3] is None,
                item[0][3] or "",
            ),
        )
    ]
    if fid_scores.unavailable:
        note = f"FID unavailable: {fid_scores.unavailable}"
    else:
        note = "; ".join([*fid_scores.notes, audit_metrics.FID_WITHOUT_INTERVAL])
    return Table(
        id="table-fid",
        caption="FID of each method against the sd images of the same profession, axis and "
        f"seeds (feature network: {fid_scores.extractor or 'none'}).",
        columns=["axis", "method", "profession", "image pairs", "FID"],
        rows=rows,
        note=note,
        digits={"FID": 2},
    )


# --------------------------------------------------------------------------- threshold analysis


def threshold_curves(
    rows, stored: stored_maps.StoredMaps, grid: Sequence[float] = stored_maps.THRESHOLD_GRID
) -> dict[tuple[str, str, float, str | None], list[float]]:
    """mIoU at each q of `grid`, per (axis, method, lambda_, profession) and pooled (profession
    None: the mean over professions, as the paper's tables pool).

    rows: the store table whose maps `stored` decoded (same row order).
    """
    names = ("axis", "method", "lambda_", "profession")
    keys = list(zip(*(rows.column(n).to_pylist() for n in names), strict=True))
    curves: dict[tuple, list[float]] = {}
    for q in grid:
        sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
        for key, iou in zip(keys, stored.metrics(q)["iou"], strict=True):
            sums[key][0] += iou
            sums[key][1] += 1
        per_profession = {key: total / count for key, (total, count) in sums.items()}
        pooled: dict[tuple, list[float]] = defaultdict(list)
        for (axis, method, lambda_, _), value in per_profession.items():
            pooled[(axis, method, lambda_, None)].append(value)
        for key, value in per_profession.items():
            curves.setdefault(key, []).append(value)
        for key, values in pooled.items():
            curves.setdefault(key, []).append(sum(values) / len(values))
    return curves


def _threshold_table(curves: dict, grid: Sequence[float]) -> Table:
    def order(key):
        axis, method, lambda_, profession = key
        return (
            audit_metrics.axis_rank(axis),
            audit_metrics.method_rank(method),
            lambda_,
            profession is not None,
            profession or "",
        )

    rows = [
        [axis, method_label(method, lambda_), profession or "all (mean)", *values]
        for (axis, method, lambda_, profession), values in sorted(
            curves.items(), key=lambda item: order(item[0])
        )
    ]
    return Table(
        id="table-threshold",
        caption="Threshold analysis: mIoU against the mask quantile q, per method and axis "
        "(pooled: the mean over professions), measured from the stored attribution maps.",
        columns=["axis", "method", "profession", *[f"q={q:g}" for q in grid]],
        rows=rows,
    )


def _threshold_chart(
    curves: dict, grid: Sequence[float], marks: dict[str, float], path: Path
) -> None:
    """One panel per axis: pooled mIoU against q, one line per method; vertical lines at the
    quantiles in `marks` (label -> q)."""
    plt = _pyplot()
    axes_names = sorted({key[0] for key in curves}, key=audit_metrics.axis_rank)
    figure, panels = plt.subplots(
        1, len(axes_names), figsize=(4.6 * len(axes_names), 3.6), squeeze=False, sharey=True
    )
    for panel, axis_name in zip(panels[0], axes_names, strict=True):
        pooled = sorted(
            (key for key in curves if key[0] == axis_name and key[3] is None),
            key=lambda key: (audit_metrics.method_rank(key[1]), key[2]),
        )
        for key in pooled:
            panel.plot(grid, curves[key], marker="o", label=method_label(key[1], key[2]))
        for index, (label, q) in enumerate(marks.items()):
            panel.axvline(
                q, color="grey", linestyle=("--", ":")[index % 2], linewidth=1, label=label
            )
        panel.set_title(axis_name, fontsize=10)
        panel.set_xlabel("mask quantile q")
        panel.set_ylim(0, 1)
    panels[0][0].set_ylabel("mIoU (pooled over professions)")
    panels[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# --------------------------------------------------------------------------- HTML

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>BiasMap audit report: {{ run_name }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th { background: #eef; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
.note { color: #844; font-size: 0.85em; margin: 0 0 1em; }
.legend { font-size: 0.85em; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.examples td { text-align: center; vertical-align: top; font-size: 0.75em; }
.examples img { width: 128px; height: auto; display: block; margin: auto; }
.scroll { overflow-x: auto; }
</style>
</head>
<body>
<h1>BiasMap audit report</h1>
<p>Run folder <code>{{ run_dir }}</code>: {{ num_rows }} images from {{ part_files }} part
files{% if models %}, model {{ model_labels | join(", ") }}{% endif %}.
Lower is better for every metric. RD is max<sub>g</sub> p<sub>g</sub> &minus;
min<sub>g</sub> p<sub>g</sub> over the CLIP label frequencies of a profession's images;
pooled values are means over professions; FID compares each method with the sd images of the
same prompts and seeds.</p>
{% if random_weights %}<p class="warning">The model has random weights
({{ models | join(", ") }}): these numbers exercise the pipeline and carry no meaning about
bias.</p>{% endif %}
{% for message in store_notes %}<p class="note">{{ message }}</p>{% endfor %}
{% if rethreshold_note %}<p class="warning">{{ rethreshold_note }}</p>{% endif %}

{% macro render(table) -%}
<div class="scroll"><table id="{{ table.id }}">
<caption>{{ table.caption }}</caption>
<thead>
{% if table.header_groups %}<tr>{% for label, span in table.header_groups %}
<th colspan="{{ span }}">{{ label }}</th>{% endfor %}</tr>{% endif %}
<tr>{% for name in table.columns %}<th>{{ name }}</th>{% endfor %}</tr>
</thead>
<tbody>
{% for row in table.rows %}<tr>
{%- for cell in table.formatted(row) %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table></div>
{% if table.note %}<p class="note">{{ table.note }}</p>{% endif %}
<p class="note"><a href="tables/{{ table.id }}.csv">{{ table.id }}.csv</a></p>
{%- endmacro %}

{% if ground_truth %}
<h2>Ground truth (planted model)</h2>
<p>The model is biasmap's planted world (<code>biasmap.world</code>): its entanglement and
skew were declared as data and learnt from the training images, so the measured numbers can
be checked against what was planted. The world's detector reads each image's item and
classes back.</p>
{% for message in ground_truth.notes %}<p class="note">{{ message }}</p>{% endfor %}
{% for table in ground_truth.tables %}{{ render(table) }}{% endfor %}
{% endif %}

<p class="legend">Cells read <em>value [95% interval]</em>: a percentile bootstrap over
seeds ({{ n_resamples }} resamples, seed {{ random_seed }}), within each profession; pooled values
resample every profession's seeds jointly and average. Methods other than sd also show
<em>Δ difference [95% interval]</em> with sd on the same seeds and professions (paired
bootstrap), and <strong>*</strong> where that difference is significant at a false discovery
rate of {{ fdr }}: a paired permutation test (method and sd swapped within seeds; for RD too),
Benjamini-Hochberg adjusted across professions (and blocks for per-block BIoU), or across
methods for pooled rows. p-values and adjusted p-values are in the CSVs
(<code>M_p</code>, <code>M_p_bh</code>). Fewer than 2 seeds: no interval. FID has no
interval.</p>

<h2>Summary (paper Tables 1-2)</h2>
{% for table in summary_tables %}{{ render(table) }}{% endfor %}

<h2>Per profession (paper Tables 4-5)</h2>
{% for table in profession_tables %}{{ render(table) }}{% endfor %}

<h2>λ sweeps (paper Tables 6-7)</h2>
{% if lambda_tables %}{% for table in lambda_tables %}{{ render(table) }}{% endfor %}
{% else %}<p class="note">No method was run at two or more λ values, so there is no sweep.</p>
{% endif %}

{% if intersection_tables %}<h2>Intersectional axes</h2>
{% for table in intersection_tables %}{{ render(table) }}{% endfor %}{% endif %}

<h2>FID</h2>
{{ render(fid_table) }}

<h2>Per-block BIoU (paper Figures 4-6)</h2>
{% for table in block_tables %}<details><summary>{{ table.caption }}</summary>
{{ render(table) }}</details>{% endfor %}
{% for figure in block_figures %}<figure id="{{ figure.id }}"><img src="{{ figure.path }}"
alt="{{ figure.caption }}"><figcaption>{{ figure.caption }}</figcaption></figure>
{% endfor %}

<h2>λ trade-off</h2>
{% if lambda_figures %}{% for figure in lambda_figures %}<figure id="{{ figure.id }}">
<img src="{{ figure.path }}" alt="{{ figure.caption }}"><figcaption>{{ figure.caption }}
</figcaption></figure>{% endfor %}
{% else %}<p class="note">Skipped: every method was run at a single λ.</p>{% endif %}

<h2>Threshold analysis: mIoU against q</h2>
{% if threshold_figure %}<figure id="{{ threshold_figure.id }}">
<img src="{{ threshold_figure.path }}" alt="{{ threshold_figure.caption }}">
<figcaption>{{ threshold_figure.caption }}</figcaption></figure>
<details><summary>{{ threshold_table.caption }}</summary>{{ render(threshold_table) }}</details>
{% else %}<p class="note">{{ threshold_note }}</p>{% endif %}

<h2>Examples (lowest seed per profession and method)</h2>
{% for axis, (professions, labels, cells) in examples.items() %}
<div class="scroll"><table class="examples" id="examples-{{ axis }}">
<caption>{{ axis }}</caption>
<tr><th>profession</th>{% for label in labels %}<th>{{ label }}</th>{% endfor %}</tr>
{% for profession in professions %}<tr><td>{{ profession }}</td>
{% for label in labels %}{% set cell = cells.get((profession, label)) %}<td>
{% if cell and cell.path %}<img loading="lazy" src="{{ cell.path }}"
alt="{{ profession }} {{ label }} seed {{ cell.seed }}">{% elif cell %}(image missing){% endif %}
{% if cell %}seed {{ cell.seed }}
{%- if cell.iou is not none %}, IoU {{ "%.3f" | format(cell.iou) }}{% endif %}
{%- if cell.clip_label %}, {{ cell.clip_label }}{% endif %}{% endif %}
</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% endfor %}
</body>
</html>
"""


def _model_label(model: str) -> str:
    """The model as the report names it: "tiny-sdxl (SDXL UNet)"; a model whose family
    nothing here tells (a hub id not in this machine's cache) by its name alone."""
    family = model_family(model)
    return f"{model} ({family})" if family else model


def write_report(
    run_dir: str | Path,
    *,
    fid_weights: str | Path | None = None,
    fid_feature=None,
    device: str = "cpu",
    config_hash: str | None = None,
    progress: Callable[[str], None] | None = None,
    q: float | None = None,
) -> Path:
    """Write RUN_DIR/report/index.html, its CSVs and charts; return the HTML path.

    q: re-threshold every IoU and BIoU at this quantile from the stored attribution maps, and
    write RUN_DIR/report-q<q>/ instead (raises stored_maps.MissingMapsError, a ValueError,
    when some image has no stored maps, before writing anything).

    fid_weights: FID Inception weights (see biasmap.audit.fid.load_fid_inception); default:
    `fid_weights` of the run's config (RUN_DIR/run.json). fid_feature: a feature network to
    use instead (tests pass a tiny one). Without either, the FID table says FID is
    unavailable and why.
    config_hash: report only that hash's rows (default: all, newest row per image slot).
    Raises FileNotFoundError / ValueError (from metrics.read_store) when the store is missing
    or unreadable.
    """
    import jinja2

    from biasmap.audit.fid import fid_scores

    run_dir = Path(run_dir)
    store = audit_metrics.read_store(run_dir, config_hash=config_hash, with_maps=True)
    rows = store.table
    stored, threshold_note = None, None
    try:
        stored = stored_maps.StoredMaps(rows)
    except stored_maps.MissingMapsError as error:
        if q is not None:
            raise stored_maps.MissingMapsError(
                f"cannot re-threshold {run_dir} at q={q:g}: {error}; `biasmap report "
                f"{run_dir}` without --q reports the IoU the run measured"
            ) from None
        threshold_note = f"No threshold analysis: {error}."
    run_qs = sorted({value for value in rows.column("q").to_pylist() if value is not None})
    rethreshold_note = None
    if q is not None:
        rows = stored_maps.rethresholded(rows, q, stored)
        guided = sorted(
            {
                m
                for m, lam in zip(
                    rows.column("method").to_pylist(),
                    rows.column("lambda_").to_pylist(),
                    strict=True,
                )
                if lam > 0
            }
        )
        rethreshold_note = (
            f"IoU and BIoU re-thresholded at q = {q:g} from the stored maps (the run used "
            f"q = {', '.join(f'{v:g}' for v in run_qs)}). Unguided methods' values are what a "
            f"fresh run at q = {q:g} gives."
            + (
                f" Guided methods ({', '.join(guided)}) generated their images with guidance at "
                "the run's q, so theirs are those images measured at the new q; their RD and "
                "FID are the run's."
                if guided
                else ""
            )
        )
    # Everything below measures the rows with their metrics at q; the maps are done with.
    rows = rows.set_column(
        rows.schema.get_field_index("maps"),
        rows.schema.field("maps"),
        pa.nulls(rows.num_rows, rows.schema.field("maps").type),
    )
    report_dir = run_dir / report_folder(q)
    (report_dir / "tables").mkdir(parents=True, exist_ok=True)
    (report_dir / "figures").mkdir(parents=True, exist_ok=True)

    per_profession = audit_metrics.profession_metrics(rows)
    pooled = audit_metrics.pooled_metrics(per_profession)
    per_profession, pooled = audit_stats.attach_statistics(rows, per_profession, pooled)
    if fid_weights is None and fid_feature is None:
        fid_weights = configured_fid_weights(run_dir)
    fid = fid_scores(
        run_dir,
        rows,
        feature=fid_feature,
        weights=fid_weights,
        device=device,
        progress=progress,
    )
    fid_note = f"FID unavailable: {fid.unavailable}" if fid.unavailable else None

    summary_tables = audit_metrics.summary_tables(pooled, fid.values, fid_note)
    profession_tables = audit_metrics.profession_tables(per_profession)
    lambda_tables = audit_metrics.lambda_tables(per_profession, pooled, fid.values, fid_note)
    fid_table = _fid_table(fid)
    block_tables = _block_tables(per_profession, pooled)
    intersection_tables = audit_metrics.intersection_tables(rows)
    models = sorted({m for m in rows.column("model").to_pylist() if m})
    ground_truth = None
    if PLANTED in models:
        from biasmap.world.ground_truth import audit_ground_truth

        planted_rows = rows.filter(pc.equal(rows.column("model"), PLANTED))
        ground_truth = audit_ground_truth(planted_rows, run_dir, per_profession)
    extra = ground_truth.tables if ground_truth else []
    for table in [
        *summary_tables,
        *profession_tables,
        *lambda_tables,
        fid_table,
        *block_tables,
        *intersection_tables,
        *extra,
    ]:
        table.write_csv(report_dir / "tables" / f"{table.id}.csv")

    block_figures = []
    by_axis_method: dict[tuple[str, str], list[GroupMetrics]] = defaultdict(list)
    for group in per_profession:
        by_axis_method[(group.axis, method_label(group.method, group.lambda_))].append(group)
    for (axis, label), groups in by_axis_method.items():
        if not _blocks_of(groups):
            continue
        lambda_ = groups[0].lambda_
        # The lambda keeps its exact, injective text (":g" and slug() merged 1e-7 with
        # 1.00000001e-7, and 1e+20 with 1e-20), so two lambdas never share a figure.
        slug = audit_metrics.slug(f"{axis}-{groups[0].method}") + (
            f"-lambda-{path_component(lambda_text(lambda_))}" if lambda_ else ""
        )
        name = f"figures/blocks-{slug}.png"
        _block_chart_per_profession(groups, f"{axis}: per-block BIoU, {label}", report_dir / name)
        block_figures.append(
            Figure(
                f"fig-blocks-{slug}",
                f"Profession-{axis} entanglement "
                f"(mean BIoU) across UNet blocks, {label} (Figures 4-5).",
                name,
            )
        )
    for axis in sorted({g.axis for g in per_profession}, key=audit_metrics.axis_rank):
        groups = [g for g in per_profession if g.axis == axis]
        if not _blocks_of(groups):
            continue
        name = f"figures/blocks-by-method-{axis}.png"
        _block_chart_per_method(groups, f"{axis}: per-block BIoU by method", report_dir / name)
        block_figures.append(
            Figure(
                f"fig-blocks-by-method-{axis}",
                f"Profession-{axis} BIoU across UNet blocks per profession, by method (Figure 6).",
                name,
            )
        )

    lambda_figures = []
    for (axis, method), _ in audit_metrics.swept_methods(per_profession).items():
        groups = [g for g in pooled if g.axis == axis and g.method == method]
        slug = audit_metrics.slug(f"{axis}-{method}")
        name = f"figures/lambda-{slug}.png"
        against = _lambda_chart(groups, fid.values, axis, method, report_dir / name)
        lambda_figures.append(
            Figure(
                f"fig-lambda-{slug}",
                f"{method} on {axis}: mIoU, mBIoU "
                f"and RD vs λ, and mIoU vs {against}, pooled over "
                "professions.",
                name,
            )
        )

    threshold_figure, threshold_table = None, None
    if stored is not None:
        grid = stored_maps.THRESHOLD_GRID
        curves = threshold_curves(rows, stored, grid)
        threshold_table = _threshold_table(curves, grid)
        threshold_table.write_csv(report_dir / "tables" / f"{threshold_table.id}.csv")
        marks = {f"run's q = {v:g}": v for v in run_qs}
        if q is not None and q not in run_qs:
            marks[f"re-thresholded at q = {q:g}"] = q
        name = "figures/threshold-miou.png"
        _threshold_chart(curves, grid, marks, report_dir / name)
        threshold_figure = Figure(
            "fig-threshold-miou",
            "Threshold analysis: mIoU (pooled over professions) against the mask quantile q, "
            "per method and axis, from the stored attribution maps. Guided methods' images "
            "were generated at the run's q.",
            name,
        )

    store_notes = []
    if store.skipped_parts:
        store_notes.append(
            f"{len(store.skipped_parts)} part files could not be read and are left out: "
            + "; ".join(f"{name} ({why})" for name, why in store.skipped_parts)
        )
    if store.duplicates_dropped:
        store_notes.append(
            f"{store.duplicates_dropped} duplicate rows (same image slot) were "
            "left out; the newest row of each slot is used."
        )
    if len(store.config_hashes) > 1:
        counts = ", ".join(f"{h}: {n} rows" for h, n in sorted(store.config_hashes.items()))
        store_notes.append(
            f"The store holds several config hashes ({counts}); each image slot "
            "counts once, with its newest row."
        )
    if fid.notes and not fid.unavailable:
        store_notes.extend(f"FID: {note}" for note in fid.notes[:5])

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = environment.from_string(TEMPLATE).render(
        run_name=run_dir.name,
        run_dir=str(run_dir),
        num_rows=store.num_rows,
        part_files=store.part_files,
        models=models,
        model_labels=[_model_label(model) for model in models],
        random_weights=bool(models) and all(m in RANDOM_MODELS for m in models),
        store_notes=store_notes,
        ground_truth=ground_truth,
        summary_tables=summary_tables,
        profession_tables=profession_tables,
        lambda_tables=lambda_tables,
        fid_table=fid_table,
        block_tables=block_tables,
        block_figures=block_figures,
        lambda_figures=lambda_figures,
        examples=_examples(rows, run_dir, report_dir),
        rethreshold_note=rethreshold_note,
        intersection_tables=intersection_tables,
        threshold_figure=threshold_figure,
        threshold_table=threshold_table,
        threshold_note=threshold_note,
        n_resamples=audit_stats.N_RESAMPLES,
        random_seed=audit_stats.SEED,
        fdr=audit_stats.FDR,
    )
    path = report_dir / "index.html"
    path.write_text(html, encoding="utf-8")
    return path
