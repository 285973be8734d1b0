"""Aggregate an audit's results store into the paper's metrics and tables.

The store is a folder of Parquet part files, `RUN_DIR/parts/*.parquet`, one row per image
with the columns of `biasmap.audit.schema.SCHEMA`. This module depends only on that schema.

Definitions (paper Section 4, DESIGN.md section 2):

- **mIoU / mBIoU** of a (axis, method, lambda, profession) group: the mean over its images of
  `iou` / `biou_mean`. Per-block mBIoU: the mean of each block's BIoU (`biou_values` paired
  with `biou_blocks`).
- **RD** of a group: p_g is the fraction of the group's images whose CLIP label (`clip_label`,
  the argmax class) is class g, over all the axis's classes (`clip_classes`, so a class no
  image received counts as p_g = 0); RD = max_g p_g - min_g p_g, which is |p_1 - p_2| for two
  groups. The paper defines RD(a1, a2) = |Pr(a1) - Pr(a2)| over classified samples, and its
  per-profession RDs are multiples of 1/50: frequencies of hard labels, not mean probabilities.
- **Pooled** (Tables 1-2) values are the unweighted means over professions of the
  per-profession values. That is how the paper's tables relate: the mean of Table 5's gender
  RD column (0.591) and FD mIoU column (0.393) are Table 1's 0.59 and 0.393. RD is not
  recomputed from pooled labels, which would let opposite biases of two professions cancel.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .schema import KEY_COLUMNS, SCHEMA
from .stats import Estimate
from .store import ResultsStore

AXIS_ORDER = ("gender", "race")


# --------------------------------------------------------------------------- reading the store


@dataclass(frozen=True)
class StoreRows:
    """The rows of a results store, one per key, and what was left out while reading it."""

    table: pa.Table  # SCHEMA columns, one row per (profession, axis, seed, method, lambda_)
    part_files: int  # part files found
    skipped_parts: list[tuple[str, str]]  # (file name, why it was not read)
    duplicates_dropped: int  # rows left out because a newer row had the same key
    config_hashes: dict[str, int]  # rows per config_hash, before deduplication

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def read_store(
    run_dir: str | Path, *, config_hash: str | None = None, with_maps: bool = False
) -> StoreRows:
    """Read `RUN_DIR/parts/*.parquet` into one table with one row per image.

    The parts are read and validated by `biasmap.audit.store.ResultsStore`: one that cannot be
    read or breaks the schema is skipped and listed in `skipped_parts` (the runner recomputes
    such keys; a report still renders); temporary files of parts being written are ignored.

    Keys: a row is identified by KEY_COLUMNS. Rows are deduplicated on the key without
    config_hash, keeping the newest (`created_at`): when a store holds rows of several config
    hashes (the config changed between runs into the same folder), each image slot is counted
    once, with its newest result, and `config_hashes` reports the mix. Pass `config_hash` to
    keep only that hash's rows. with_maps: also read the stored attribution maps (the `maps`
    column is null otherwise, and in rows of runs made before maps were stored).

    Raises FileNotFoundError when RUN_DIR/parts does not exist and ValueError when no part
    file could be read or no row matches `config_hash`.
    """
    import duckdb

    store = ResultsStore(run_dir)
    if not store.parts_dir.is_dir():
        raise FileNotFoundError(
            f"{store.parts_dir} does not exist: RUN_DIR must be an audit output folder holding "
            "parts/*.parquet (written by `biasmap audit`)"
        )
    parts, problems = store.scan(with_maps)
    skipped = [(problem.path.name, problem.reason.splitlines()[0]) for problem in problems]
    if not parts:
        detail = f"; unreadable: {skipped}" if skipped else ""
        raise ValueError(f"no readable part files in {store.parts_dir}{detail}")
    tables = [table for _, table in parts]
    rows = pa.concat_tables(tables)
    hashes = Counter(rows.column("config_hash").to_pylist())
    if config_hash is not None:
        if config_hash not in hashes:
            raise ValueError(
                f"config_hash {config_hash!r} is not in the store; it holds {sorted(hashes)}"
            )
        rows = rows.filter(pc.equal(rows.column("config_hash"), config_hash))
    slot = ", ".join(name for name in KEY_COLUMNS if name != "config_hash")
    con = duckdb.connect()
    con.register("raw_rows", rows)
    unique = con.sql(
        f"""
        SELECT * FROM raw_rows
        QUALIFY row_number() OVER (
            PARTITION BY {slot} ORDER BY created_at DESC NULLS LAST, config_hash DESC) = 1
        ORDER BY axis, method, lambda_, profession, seed
        """
    ).to_arrow_table()
    con.close()
    unique = unique.select(SCHEMA.names).cast(SCHEMA)
    return StoreRows(
        table=unique,
        part_files=len(parts) + len(problems),
        skipped_parts=skipped,
        duplicates_dropped=rows.num_rows - unique.num_rows,
        config_hashes=dict(hashes),
    )


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class GroupMetrics:
    """Metrics of one (axis, method, lambda_, profession) group of images.

    profession is None for the pooled group (the mean over professions, Tables 1-2).
    Values are None where the store has nothing to compute them from (e.g. no CLIP labels).
    estimates / block_estimates: the metrics ("miou", "mbiou", "rd") and the per-block BIoU
    with their intervals and comparison with sd, once biasmap.audit.stats.attach_statistics
    has filled them in (empty before).
    """

    axis: str
    method: str
    lambda_: float
    profession: str | None
    n_images: int
    miou: float | None
    mbiou: float | None
    rd: float | None
    class_frequencies: dict[str, float] = field(default_factory=dict)  # label frequency p_g
    block_biou: dict[str, float] = field(default_factory=dict)  # mean BIoU per block, UNet order
    n_professions: int = 1
    estimates: dict[str, Estimate] = field(default_factory=dict)
    block_estimates: dict[str, Estimate] = field(default_factory=dict)

    def estimate(self, metric: str) -> Estimate:
        """The Estimate of "miou", "mbiou" or "rd" (the bare value when none is attached)."""
        return self.estimates.get(metric) or Estimate(getattr(self, metric))

    def block_estimate(self, block: str) -> Estimate:
        """The Estimate of one block's mean BIoU (the bare value, or None, when none is
        attached)."""
        return self.block_estimates.get(block) or Estimate(self.block_biou.get(block))


def risk_difference(frequencies: Sequence[float]) -> float:
    """RD = max_g p_g - min_g p_g over the groups' label frequencies (|p1 - p2| for two)."""
    if not frequencies:
        raise ValueError("risk_difference needs the frequency of at least one class")
    return float(max(frequencies) - min(frequencies))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def profession_metrics(rows: pa.Table) -> list[GroupMetrics]:
    """mIoU, mBIoU, per-block mBIoU, class frequencies and RD per group.

    A group is one (axis, method, lambda_, profession).

    rows: a table with the store's columns (StoreRows.table), one row per image.
    Returns the groups sorted by axis, method, lambda_ and profession.
    Raises ValueError when a clip_label is not one of its row's clip_classes.
    """
    import duckdb

    con = duckdb.connect()
    con.register("store_rows", rows)
    group = "axis, method, lambda_, profession"
    scalars = con.execute(
        f"""
        SELECT {group}, count(*) AS n_images, avg(iou) AS miou, avg(biou_mean) AS mbiou,
               count(clip_label) AS n_labelled
        FROM store_rows GROUP BY {group}
        """
    ).fetchall()
    # Blocks keep the UNet order in which the rows list them (first position seen).
    blocks = con.execute(
        f"""
        SELECT {group}, block, avg(value) AS mean_biou, min(position) AS position
        FROM (
            SELECT {group}, unnest(biou_blocks) AS block, unnest(biou_values) AS value,
                   generate_subscripts(biou_blocks, 1) AS position
            FROM store_rows
        )
        GROUP BY {group}, block
        ORDER BY position, block
        """
    ).fetchall()
    classes = con.execute(
        f"""
        SELECT {group}, class, min(position) AS position
        FROM (
            SELECT {group}, unnest(clip_classes) AS class,
                   generate_subscripts(clip_classes, 1) AS position
            FROM store_rows
        )
        GROUP BY {group}, class
        ORDER BY position, class
        """
    ).fetchall()
    labels = con.execute(
        f"""
        SELECT {group}, clip_label, count(*) FROM store_rows
        WHERE clip_label IS NOT NULL GROUP BY {group}, clip_label
        """
    ).fetchall()
    con.close()

    block_biou: dict[tuple, dict[str, float]] = defaultdict(dict)
    for *key, block, mean_biou, _ in blocks:
        block_biou[tuple(key)][block] = _number(mean_biou)
    class_names: dict[tuple, list[str]] = defaultdict(list)
    for *key, name, _ in classes:
        class_names[tuple(key)].append(name)
    label_counts: dict[tuple, dict[str, int]] = defaultdict(dict)
    for *key, label, count in labels:
        label_counts[tuple(key)][label] = count

    results = []
    for axis, method, lambda_, profession, n_images, miou, mbiou, n_labelled in scalars:
        key = (axis, method, lambda_, profession)
        names = class_names.get(key, [])
        unknown = sorted(set(label_counts.get(key, {})) - set(names))
        if unknown:
            where = dict(zip(("axis", "method", "lambda_", "profession"), key, strict=True))
            raise ValueError(
                f"group {where} has "
                f"clip_label values {unknown} that are not among its clip_classes {names}"
            )
        frequencies, rd = {}, None
        if n_labelled and names:
            frequencies = {g: label_counts[key].get(g, 0) / n_labelled for g in names}
            rd = risk_difference(list(frequencies.values()))
        results.append(
            GroupMetrics(
                axis=axis,
                method=method,
                lambda_=float(lambda_),
                profession=profession,
                n_images=int(n_images),
                miou=_number(miou),
                mbiou=_number(mbiou),
                rd=rd,
                class_frequencies=frequencies,
                block_biou=dict(block_biou.get(key, {})),
            )
        )
    return sorted(results, key=_group_sort_key)


def mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pooled_metrics(per_profession: Sequence[GroupMetrics]) -> list[GroupMetrics]:
    """Tables 1-2: per (axis, method, lambda_), the unweighted mean over professions.

    mIoU, mBIoU, RD, class frequencies and each block's mBIoU are means of the professions'
    values (professions missing a value are left out of that mean); n_images is the total.
    """
    by_method: dict[tuple, list[GroupMetrics]] = defaultdict(list)
    for metrics in per_profession:
        by_method[(metrics.axis, metrics.method, metrics.lambda_)].append(metrics)
    pooled = []
    for (axis, method, lambda_), groups in by_method.items():
        blocks = list(dict.fromkeys(b for g in groups for b in g.block_biou))
        classes = list(dict.fromkeys(c for g in groups for c in g.class_frequencies))
        pooled.append(
            GroupMetrics(
                axis=axis,
                method=method,
                lambda_=lambda_,
                profession=None,
                n_images=sum(g.n_images for g in groups),
                miou=mean_of(g.miou for g in groups),
                mbiou=mean_of(g.mbiou for g in groups),
                rd=mean_of(g.rd for g in groups),
                class_frequencies={
                    c: mean_of(g.class_frequencies.get(c) for g in groups) for c in classes
                },
                block_biou={b: mean_of(g.block_biou.get(b) for g in groups) for b in blocks},
                n_professions=len(groups),
            )
        )
    return sorted(pooled, key=_group_sort_key)


# --------------------------------------------------------------------------- ordering, labels


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the paper's method order (biasmap.mitigation.methods.METHODS), then by name."""
    from biasmap.mitigation.methods import METHODS

    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def axis_rank(axis: str) -> tuple[int, str]:
    """Sort key: gender, race, then other axes by name."""
    return (AXIS_ORDER.index(axis) if axis in AXIS_ORDER else len(AXIS_ORDER), axis)


def _group_sort_key(metrics: GroupMetrics) -> tuple:
    return (
        axis_rank(metrics.axis),
        method_rank(metrics.method),
        metrics.lambda_,
        metrics.profession or "",
    )


def method_label(method: str, lambda_: float) -> str:
    """Row / column name of a (method, lambda_): "biasmap (λ=100)", or "sd" when lambda_ is 0."""
    return method if lambda_ == 0 else f"{method} (λ={lambda_:g})"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A report table: plain values (None: no value), rendered to HTML and written as CSV.

    header_groups: an optional first header row of (label, column span) pairs, as in the
    paper's Tables 4-5 (mIoU | mBIoU | RD over the methods); spans cover `columns`.
    note: a sentence shown under the table (e.g. why FID is unavailable).
    """

    id: str
    caption: str
    columns: list[str]
    rows: list[list[Any]]
    header_groups: list[tuple[str, int]] | None = None
    note: str | None = None
    digits: dict[str, int] = field(default_factory=dict)  # per column; default 3

    def estimate_columns(self) -> set[int]:
        """Positions of the columns that hold Estimates (a value with its statistics)."""
        return {i for row in self.rows for i, v in enumerate(row) if isinstance(v, Estimate)}

    def csv_header(self) -> list[str]:
        """Column names, prefixed by their header group ("mIoU / sd") where there is one.

        A column M of Estimates is followed by M_ci_low, M_ci_high, M_delta, M_delta_ci_low,
        M_delta_ci_high, M_p and M_p_bh (empty on rows not compared with sd).
        """
        names, column = list(self.columns), 0
        if self.header_groups:
            names = []
            for label, span in self.header_groups:
                for name in self.columns[column : column + span]:
                    names.append(f"{label} / {name}" if label else name)
                column += span
        estimated = self.estimate_columns()
        header = []
        for position, name in enumerate(names):
            header.append(name)
            if position in estimated:
                header.extend(f"{name}_{suffix}" for suffix in Estimate.CSV_SUFFIXES)
        return header

    def write_csv(self, path: str | Path) -> Path:
        """Full-precision values; an empty cell where there is no value."""
        path = Path(path)
        estimated = self.estimate_columns()
        blank = [None] * len(Estimate.CSV_SUFFIXES)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_header())
            for row in self.rows:
                cells = []
                for position, value in enumerate(row):
                    if isinstance(value, Estimate):
                        cells.extend(value.csv_values())
                    elif position in estimated:
                        cells.extend([value, *blank])
                    else:
                        cells.append(value)
                writer.writerow(["" if v is None else v for v in cells])
        return path

    def formatted(self, row: Sequence[Any]) -> list[str]:
        """Cells as shown in the HTML: floats rounded (3 digits unless `digits` says), None "–",
        Estimates as "0.215 [0.201, 0.229]" (and "Δ ... *" when compared with sd)."""
        cells = []
        for name, value in zip(self.columns, row, strict=True):
            if value is None:
                cells.append("–")
            elif isinstance(value, Estimate):
                cells.append(value.text(self.digits.get(name, 3)))
            elif isinstance(value, float):
                digits = self.digits.get(name, 3)
                cells.append("nan" if math.isnan(value) else f"{value:.{digits}f}")
            else:
                cells.append(str(value))
        return cells


FidLookup = dict[tuple[str, str, float, str | None], float]
"""FID per (axis, method, lambda_, profession or None for pooled), from biasmap.audit.fid."""

FID_WITHOUT_INTERVAL = (
    "FID is given without an interval or test: a bootstrap over seeds would recompute the "
    "feature covariances and a matrix square root (2048 x 2048 for Inception) per resample, "
    "and a handful of images per profession gives no stable FID to resample."
)


def _axes(groups: Iterable[GroupMetrics]) -> list[str]:
    return sorted({g.axis for g in groups}, key=axis_rank)


def summary_tables(
    pooled: Sequence[GroupMetrics],
    fid: FidLookup | None = None,
    fid_note: str | None = None,
) -> list[Table]:
    """Paper Tables 1-2: per axis, one row per (method, lambda) with RD, mIoU, mBIoU and FID.

    fid: FID values (absent keys show "–"; the sd reference itself has none); fid_note:
    shown under the table, e.g. why FID is unavailable.
    """
    tables = []
    for axis in _axes(pooled):
        rows = [
            [
                method_label(g.method, g.lambda_),
                g.n_professions,
                g.n_images,
                g.estimate("rd"),
                g.estimate("miou"),
                g.estimate("mbiou"),
                (fid or {}).get((axis, g.method, g.lambda_, None)),
            ]
            for g in pooled
            if g.axis == axis
        ]
        tables.append(
            Table(
                id=f"table-summary-{axis}",
                caption=f"Quantitative results on {axis} bias, pooled over professions "
                "(paper Tables 1-2). Lower is better.",
                columns=["method", "professions", "images", "RD", "mIoU", "mBIoU", "FID"],
                rows=rows,
                note=fid_note or FID_WITHOUT_INTERVAL,
                digits={"FID": 2},
            )
        )
    return tables


def _method_columns(groups: Iterable[GroupMetrics]) -> list[tuple[str, float]]:
    keys = {(g.method, g.lambda_) for g in groups}
    return sorted(keys, key=lambda key: (method_rank(key[0]), key[1]))


def profession_tables(per_profession: Sequence[GroupMetrics]) -> list[Table]:
    """Paper Tables 4-5: per axis, one row per profession; mIoU, mBIoU and RD per method."""
    tables = []
    for axis in _axes(per_profession):
        groups = [g for g in per_profession if g.axis == axis]
        methods = _method_columns(groups)
        cell = {(g.profession, g.method, g.lambda_): g for g in groups}
        professions = sorted({g.profession for g in groups})
        rows = []
        for profession in professions:
            row: list[Any] = [profession]
            for metric in ("miou", "mbiou", "rd"):
                for method, lambda_ in methods:
                    found = cell.get((profession, method, lambda_))
                    row.append(found.estimate(metric) if found else None)
            rows.append(row)
        labels = [method_label(m, lam) for m, lam in methods]
        tables.append(
            Table(
                id=f"table-professions-{axis}",
                caption=f"{axis.capitalize()} metrics per profession (paper Tables 4-5). "
                "Lower is better.",
                columns=["profession", *labels * 3],
                rows=rows,
                header_groups=[
                    ("", 1),
                    ("mIoU", len(labels)),
                    ("mBIoU", len(labels)),
                    ("RD", len(labels)),
                ],
            )
        )
    return tables


def swept_methods(groups: Iterable[GroupMetrics]) -> dict[tuple[str, str], list[float]]:
    """(axis, method) -> its lambdas, for methods the store holds at two or more lambdas."""
    lambdas: dict[tuple[str, str], set[float]] = defaultdict(set)
    for g in groups:
        lambdas[(g.axis, g.method)].add(g.lambda_)
    return {key: sorted(values) for key, values in lambdas.items() if len(values) > 1}


def lambda_tables(
    per_profession: Sequence[GroupMetrics],
    pooled: Sequence[GroupMetrics],
    fid: FidLookup | None = None,
    fid_note: str | None = None,
) -> list[Table]:
    """Paper Tables 6-7: for each method swept over lambda, one row per profession (and a
    pooled "all" row), one column per lambda; one table each for mIoU, mBIoU, RD and FID.

    Returns no table when no method was run at two or more lambdas.
    """
    tables = []
    metrics = (
        ("miou", "mIoU", "6"),
        ("mbiou", "mBIoU", "6"),
        ("rd", "RD", "6"),
        ("fid", "FID", "7"),
    )
    for (axis, method), lambdas in sorted(
        swept_methods(per_profession).items(),
        key=lambda item: (axis_rank(item[0][0]), method_rank(item[0][1])),
    ):
        groups = [g for g in [*per_profession, *pooled] if g.axis == axis and g.method == method]
        professions = sorted({g.profession for g in groups if g.profession is not None})
        for attribute, name, paper_table in metrics:
            rows = []
            for profession in [*professions, None]:
                # FID is not a mean over professions: the pooled row compares all images.
                pooled_name = "all (pooled)" if attribute == "fid" else "all (mean)"
                row: list[Any] = [profession or pooled_name]
                for lambda_ in lambdas:
                    if attribute == "fid":
                        row.append((fid or {}).get((axis, method, lambda_, profession)))
                    else:
                        found = next(
                            (
                                g
                                for g in groups
                                if g.profession == profession and g.lambda_ == lambda_
                            ),
                            None,
                        )
                        row.append(found.estimate(attribute) if found else None)
                rows.append(row)
            tables.append(
                Table(
                    id=f"table-lambda-{attribute}-{axis}-{slug(method)}",
                    caption=f"{name} vs λ for {method} on {axis} (paper Table {paper_table}).",
                    columns=["profession", *[f"λ={lam:g}" for lam in lambdas]],
                    rows=rows,
                    note=(fid_note or FID_WITHOUT_INTERVAL) if attribute == "fid" else None,
                    digits={f"λ={lam:g}": 2 for lam in lambdas} if attribute == "fid" else {},
                )
            )
    return tables


def slug(text: str) -> str:
    """ASCII letters, digits and dashes, for ids and file names."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in text).strip("-")


def intersection_tables(rows: pa.Table) -> list[Table]:
    """For each intersectional axis (several demographic concept words traced together): per
    (method, lambda) and profession, and pooled over professions ("all (mean)"), the mIoU of
    each concept's own mask with the profession's (`concept_ious`) and of the intersection of
    the demographic masks with the profession's (`iou`), each with its 95% bootstrap interval
    over seeds (biasmap.audit.stats.bootstrap_interval).

    rows: store rows (SCHEMA). Axes with one concept, and rows without stored per-concept IoUs
    (runs made before they were stored), give no table.
    """
    import numpy as np

    from .stats import bootstrap_interval, mean_statistic

    columns = ("axis", "method", "lambda_", "profession", "seed", "iou", "concept_ious")
    columns += ("maps_concepts",)
    values: dict[str, dict[tuple, dict[str, list[list[float]]]]] = defaultdict(dict)
    concepts_of: dict[str, list[str]] = {}
    for axis, method, lambda_, profession, _, iou, pairwise, concepts in zip(
        *(rows.column(name).to_pylist() for name in columns), strict=True
    ):
        if not pairwise or len(pairwise) < 2 or not concepts:
            continue
        concepts_of.setdefault(axis, concepts[:-1])
        cell = values[axis].setdefault((method, lambda_), {})
        cell.setdefault(profession, []).append([*pairwise, iou])
    tables = []
    for axis in sorted(values, key=axis_rank):
        concepts = concepts_of[axis]
        names = [f"IoU({c}, profession)" for c in concepts]
        names.append(f"IoU({' ∩ '.join(concepts)}, profession)")
        table_rows = []
        for (method, lambda_), professions in sorted(
            values[axis].items(), key=lambda item: (method_rank(item[0][0]), item[0][1])
        ):
            samples = {p: np.asarray(v, dtype=np.float64).T for p, v in professions.items()}
            for profession in [*sorted(samples), None]:
                chosen = [samples[profession]] if profession else list(samples.values())
                cells: list[Any] = []
                for index in range(len(names)):
                    per_profession = [sample[index] for sample in chosen]
                    value = float(np.mean([sample.mean() for sample in per_profession]))
                    low, high = bootstrap_interval(per_profession, mean_statistic)
                    cells.append(Estimate(value, low, high))
                label = profession or "all (mean)"
                table_rows.append([method_label(method, lambda_), label, *cells])
        tables.append(
            Table(
                id=f"table-intersection-{slug(axis)}",
                caption=f"Intersectional axis {axis}: mIoU of each demographic concept's mask "
                "with the profession's, and of their intersection (AND) with the profession's, "
                "all from one trace per image.",
                columns=["method", "profession", *names],
                rows=table_rows,
            )
        )
    return tables
