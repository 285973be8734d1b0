"""Ground truth for an audit of the planted model: what biasmap measured against what was planted.

`audit_ground_truth(store_table, run_dir, per_profession)` reads an audit's rows and images
(the audit's own mIoU and CLIP-based RD, as the report shows them), runs the world's
detector on every image, and compares:

- mIoU of the `sd` images with the planted entanglement (Spearman per axis);
- RD from the world's CLIP (zero-shot, through the audit) and RD from the detector's labels
  with the planted skew (Spearman per axis);
- the Key Finding 2 pair of each axis;
- each method and lambda: mIoU, the true overlap of the cues in the images (detector) and
  how often the prompted profession's item is still there.

Professions that are not in the world (`SPEC`) are left out, with a note.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audit.metrics import GroupMetrics, Table, method_label, risk_difference
from .detect import detect
from .spec import AXES, KEY_FINDING_PAIRS, SPEC, planted_rd

# Validation targets from the issue that introduced the world.
SPEARMAN_TARGET = 0.8
ITEM_FOUND_TARGET = 0.9


@dataclass
class ImageFindings:
    """Detector read-out of one (axis, method, lambda_, profession) group's images."""

    n_images: int = 0
    item_found: int = 0
    overlaps: list[float] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def add(self, profession: str, axis: str, image) -> None:
        found = detect(image)
        self.n_images += 1
        self.item_found += found.profession == profession
        self.overlaps.append(found.overlap[axis])
        self.labels.append(found.gender if axis == "gender" else found.race)

    @property
    def item_rate(self) -> float:
        return self.item_found / self.n_images if self.n_images else math.nan

    @property
    def mean_overlap(self) -> float:
        return float(np.mean(self.overlaps)) if self.overlaps else math.nan

    def detector_rd(self, axis: str) -> float:
        labelled = [label for label in self.labels if label is not None]
        if not labelled:
            return math.nan
        return risk_difference([labelled.count(c) / len(labelled) for c in AXES[axis]])


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho (scipy), NaN with fewer than 3 finite pairs or a constant side."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan
    return float(spearmanr(*zip(*pairs, strict=True)).statistic)


@dataclass
class GroundTruth:
    """The report's "Ground truth" section: tables and the figures the bench records."""

    tables: list[Table]
    figures: dict
    notes: list[str]


def _read_images(store_table, run_dir: Path) -> dict[tuple, ImageFindings]:
    from PIL import Image

    findings: dict[tuple, ImageFindings] = defaultdict(ImageFindings)
    columns = store_table.select(["axis", "method", "lambda_", "profession", "image_path"])
    for axis, method, lambda_, profession, path in zip(
        *(columns.column(i).to_pylist() for i in range(5)), strict=True
    ):
        if profession not in SPEC or axis not in AXES or not path:
            continue
        file = run_dir / path
        if not file.is_file():
            continue
        with Image.open(file) as image:
            findings[(axis, method, float(lambda_), profession)].add(profession, axis, image)
    return findings


def audit_ground_truth(
    store_table, run_dir: str | Path, per_profession: list[GroupMetrics]
) -> GroundTruth:
    """Compare an audit of the planted model with the world's declaration.

    store_table: the store's rows (pyarrow, as metrics.read_store gives); run_dir: the run
    folder (images are read from there); per_profession: metrics.profession_metrics(rows).
    """
    run_dir = Path(run_dir)
    findings = _read_images(store_table, run_dir)
    groups = {(g.axis, g.method, g.lambda_, g.profession): g for g in per_profession}
    notes = []
    outside = sorted({g.profession for g in per_profession} - set(SPEC))
    if outside:
        notes.append(f"Professions not in the planted world, left out here: {outside}.")

    rows, summary_rows, figures = [], [], {"axes": {}}
    for axis in [a for a in AXES if any(k[0] == a for k in groups)]:
        base = {
            p: (groups.get((axis, "sd", 0.0, p)), findings.get((axis, "sd", 0.0, p))) for p in SPEC
        }
        base = {p: v for p, v in base.items() if v[0] is not None}
        if not base:
            notes.append(f"{axis}: no sd rows, so nothing to compare with the planted bias.")
            continue
        per = {}
        for profession, (group, found) in base.items():
            found = found or ImageFindings()
            record = {
                "entanglement": SPEC[profession]["entanglement"][axis],
                "miou": group.miou if group.miou is not None else math.nan,
                "planted_rd": planted_rd(profession, axis),
                "clip_rd": group.rd if group.rd is not None else math.nan,
                "detector_rd": found.detector_rd(axis),
                "item_found": found.item_rate,
                "overlap": found.mean_overlap,
                "n_images": group.n_images,
            }
            per[profession] = record
            rows.append([axis, profession, *record.values()])
        column = {k: [r[k] for r in per.values()] for k in next(iter(per.values()))}
        rho = {
            "miou_vs_entanglement": spearman(column["entanglement"], column["miou"]),
            "clip_rd_vs_planted": spearman(column["planted_rd"], column["clip_rd"]),
            "detector_rd_vs_planted": spearman(column["planted_rd"], column["detector_rd"]),
        }
        entangled, skewed = KEY_FINDING_PAIRS[axis]
        pair = None
        if entangled in per and skewed in per:
            a, b = per[entangled], per[skewed]
            pair = {
                "balanced_entangled": entangled,
                "skewed_disentangled": skewed,
                "holds": bool(a["clip_rd"] < b["clip_rd"] and a["miou"] > b["miou"]),
                "rd": [a["clip_rd"], b["clip_rd"]],
                "miou": [a["miou"], b["miou"]],
            }
        found_all = [f for (ax, m, lam, _), f in findings.items() if ax == axis and m == "sd"]
        item_rate = sum(f.item_found for f in found_all) / max(
            1, sum(f.n_images for f in found_all)
        )
        figures["axes"][axis] = {
            "professions": per,
            "spearman": rho,
            "key_finding_2": pair,
            "item_found_rate": item_rate,
        }
        summary_rows.append(
            [
                axis,
                len(per),
                rho["miou_vs_entanglement"],
                rho["clip_rd_vs_planted"],
                rho["detector_rd_vs_planted"],
                item_rate,
                "–"
                if pair is None
                else (
                    f"{'holds' if pair['holds'] else 'fails'}: {entangled} RD "
                    f"{pair['rd'][0]:.2f} mIoU {pair['miou'][0]:.2f}; {skewed} RD "
                    f"{pair['rd'][1]:.2f} mIoU {pair['miou'][1]:.2f}"
                ),
            ]
        )

    guidance_rows = []
    sweep: dict[tuple, list[tuple]] = defaultdict(list)
    for (axis, method, lambda_, profession), found in findings.items():
        group = groups.get((axis, method, lambda_, profession))
        if group is not None and group.miou is not None:
            sweep[(axis, method, lambda_)].append((group.miou, found.mean_overlap, found.item_rate))
    for (axis, method, lambda_), values in sorted(sweep.items()):
        miou, overlap, item = (float(np.mean(v)) for v in zip(*values, strict=True))
        guidance_rows.append(
            [axis, method_label(method, lambda_), len(values), miou, overlap, item]
        )
        figures.setdefault("methods", []).append(
            {
                "axis": axis,
                "method": method,
                "lambda": lambda_,
                "professions": len(values),
                "miou": miou,
                "true_overlap": overlap,
                "item_found": item,
            }
        )

    tables = [
        Table(
            "ground-truth-summary",
            "Ground truth: does biasmap recover the planted bias? (sd images)",
            [
                "axis",
                "professions",
                "ρ mIoU vs planted entanglement",
                "ρ CLIP RD vs planted skew",
                "ρ detector RD vs planted skew",
                "item found",
                "Key Finding 2 pair",
            ],
            summary_rows,
            note=f"Spearman ρ over professions; the world's targets are ρ ≥ {SPEARMAN_TARGET} and "
            f"the prompted item found in ≥ {ITEM_FOUND_TARGET:.0%} of images.",
        ),
        Table(
            "ground-truth-professions",
            "Ground truth per profession (sd images): planted values beside measured ones",
            [
                "axis",
                "profession",
                "planted entanglement",
                "mIoU",
                "planted RD",
                "CLIP RD",
                "detector RD",
                "item found",
                "true cue overlap",
                "images",
            ],
            rows,
            note="planted entanglement: the fraction of the profession's item inside the axis's "
            "region; true cue overlap: the same, measured by the detector in each image.",
        ),
        Table(
            "ground-truth-guidance",
            "Ground truth per method: mIoU against the true overlap of the cues in the images",
            ["axis", "method", "professions", "mIoU", "true cue overlap", "item found"],
            guidance_rows,
            note="Means over professions. Guidance that lowers mIoU without lowering the true "
            "overlap has changed the maps, not the images' composition.",
        ),
    ]
    return GroundTruth(tables, figures, notes)
