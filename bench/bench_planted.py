"""Validate biasmap against the planted world's ground truth, on the shipped planted model.

Runs, in one go (about 25 min on 2 cores with the defaults):

1. a discovery audit (`sd` only, every profession of the world, both axes, `--seeds` seeds)
   through the audit's own code path: mIoU from the runs' maps, RD from zero-shot labels of
   the world's CLIP; the detector reads every image. Spearman of mIoU against the planted
   entanglement and of RD against the planted skew, the Key Finding 2 pairs, and how often
   the prompted item is in the image;
2. a guidance audit (`sd` and `biasmap` at each of `--lambdas`, `--sweep-seeds` seeds): mIoU,
   the true overlap of the cues (detector) and the item's survival against lambda;
3. localization (`--loc-seeds` seeds): each profession's map peak inside its item, the axis
   word's peak inside its region, each map's contrast (attribution inside its cue against
   the cue's area), and the paper's Appendix D coverage curve (q 0.1-0.9);
4. the paper's Appendix E: CLIP text cosine similarity with the axis word against mIoU with
   the axis word's map, for a few concept words;
5. `--fingerprint`: the small-seed figures tests/test_world.py recomputes (written next to the
   shipped weights).

    PYTHONPATH=. python bench/bench_planted.py                 # the committed results
    PYTHONPATH=. python bench/bench_planted.py --quick         # a smoke run: *_quick files

Results: bench/results/planted_validation[_quick].{json,md} and the Appendix D / E plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from biasmap.audit.config import AuditConfig  # noqa: E402
from biasmap.audit.metrics import profession_metrics, read_store  # noqa: E402
from biasmap.audit.runner import run_audit  # noqa: E402
from biasmap.report import write_report  # noqa: E402
from biasmap.world.ground_truth import (  # noqa: E402
    ITEM_FOUND_TARGET,
    SPEARMAN_TARGET,
    audit_ground_truth,
)
from biasmap.world.spec import AXES, PROFESSIONS, SPEC  # noqa: E402
from biasmap.world.validation import (  # noqa: E402
    LOCALIZATION_TARGET,
    appendix_d_summary,
    appendix_e,
    figures_without_curves,
    localization,
)

RESULTS = Path(__file__).resolve().parent / "results"
FINGERPRINT_SEEDS = (0, 1, 2, 3)
FINGERPRINT_STEPS = 10
APPENDIX_E_WORDS = {
    "race": ["skin", "face", "Asian", "black", "gender", "hair", "nurse", "quantum"],
    "gender": ["male", "female", "hair", "sex", "race", "skin", "nurse", "quantum"],
}


def audit(output: Path, seeds: int, methods: list[str], lambdas: list[float], steps: int):
    config = AuditConfig(
        model="planted",
        clip_model="planted",
        professions=list(PROFESSIONS),
        seeds=list(range(seeds)),
        methods=methods,
        lambdas=lambdas,
        steps=steps,
        output=str(output),
        batch_size=16,
        threads=torch.get_num_threads(),
    )
    summary = run_audit(config, progress=False)
    write_report(output)  # the report's "Ground truth" section shows the same figures
    store = read_store(output)
    truth = audit_ground_truth(store.table, output, profession_metrics(store.table))
    return truth, summary


def fingerprint(pipe) -> dict:
    """The small-seed figures a test can recompute in seconds (see tests/test_world.py)."""
    results = localization(pipe, PROFESSIONS, list(AXES), FINGERPRINT_SEEDS, FINGERPRINT_STEPS)
    return {
        "seeds": list(FINGERPRINT_SEEDS),
        "steps": FINGERPRINT_STEPS,
        "figures": figures_without_curves(results),
    }


def _plot_appendix_d(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, curve in curves.items():
        qs = [c[0] for c in curve]
        axes[0].plot(qs, [c[1] for c in curve], marker="o", label=name)
        axes[1].plot(qs, [c[2] for c in curve], marker="o", label=name)
    axes[0].set(title="coverage of the true cue region", xlabel="quantile q", ylabel="recall")
    axes[1].set(title="share of the mask inside the cue", xlabel="quantile q", ylabel="precision")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_appendix_e(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.5))
    for axis_plot, (anchor, words) in zip(list(axes), rows.items(), strict=True):
        axis_plot.scatter([w["cosine"] for w in words], [w["miou"] for w in words])
        for w in words:
            axis_plot.annotate(w["word"], (w["cosine"], w["miou"]), fontsize=8)
        axis_plot.set(title=f"anchor '{anchor}'", xlabel="CLIP text cosine", ylabel="mIoU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(record: dict, command: str) -> str:
    lines = [
        "# Planted-world validation",
        "",
        f"Command: `{command}` ({record['seconds']:.0f} s on {record['threads']} threads).",
        "",
        "## Targets",
        "",
        "| check | value | target | met |",
        "|---|---|---|---|",
    ]
    for check in record["targets"]:
        met = "yes" if check["met"] else "**no**"
        lines.append(f"| {check['check']} | {_fmt(check['value'])} | {check['target']} | {met} |")
    lines += ["", "## Per profession (sd images)", ""]
    for axis, figures in record["discovery"]["axes"].items():
        lines += [
            f"### {axis}",
            "",
            "| profession | planted entanglement | mIoU | planted RD | CLIP RD | detector RD "
            "| item found | map peak in item | axis peak in region |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        loc = record["localization"].get(axis, {})
        for p, r in figures["professions"].items():
            peak = loc.get(p, {})
            lines.append(
                f"| {p} | {_fmt(r['entanglement'])} | {_fmt(r['miou'])} | "
                f"{_fmt(r['planted_rd'])} | {_fmt(r['clip_rd'])} | {_fmt(r['detector_rd'])} | "
                f"{_fmt(r['item_found'])} | {_fmt(peak.get('profession_peak_in_item'))} | "
                f"{_fmt(peak.get('axis_peak_in_region'))} |"
            )
        lines.append("")
    lines += [
        "## Map contrast (why mIoU does not follow the planted entanglement)",
        "",
        "Contrast = the share of a map's attribution inside its true cue / the cue's share of "
        "the map (1 = flat). Mass in region = the share of the profession map's attribution "
        "inside the axis's true region: a diagnostic, not the paper's metric.",
        "",
        "| axis | profession | planted entanglement | profession map contrast (item) "
        "| axis map contrast (region) | profession mass in region |",
        "|---|---|---|---|---|---|",
    ]
    for axis, per_profession in record["localization"].items():
        for p, r in per_profession.items():
            lines.append(
                f"| {axis} | {p} | {_fmt(SPEC[p]['entanglement'][axis])} | "
                f"{_fmt(r['profession_contrast'])} | {_fmt(r['axis_contrast'])} | "
                f"{_fmt(r['profession_mass_in_region'])} |"
            )
    for axis, rho in record["mass_in_region_spearman"].items():
        lines.append(f"| {axis} | Spearman with entanglement | | | | {_fmt(rho)} |")
    lines += [
        "",
        "## Guidance (means over professions)",
        "",
        "| axis | method | lambda | mIoU | true cue overlap | item found |",
        "|---|---|---|---|---|---|",
    ]
    for m in record["guidance"].get("methods", []):
        lines.append(
            f"| {m['axis']} | {m['method']} | {m['lambda']:g} | {_fmt(m['miou'])} | "
            f"{_fmt(m['true_overlap'])} | {_fmt(m['item_found'])} |"
        )
    lines += [
        "",
        "## Appendix D (mean over professions)",
        "",
        "| concept | q | recall | precision |",
        "|---|---|---|---|",
    ]
    for name, curve in record["appendix_d"].items():
        for q, recall, precision in curve:
            lines.append(f"| {name} | {q:.1f} | {recall:.3f} | {precision:.3f} |")
    lines += ["", "## Appendix E", "", "| anchor | word | cosine | mIoU |", "|---|---|---|---|"]
    for anchor, rows in record["appendix_e"].items():
        for r in rows:
            lines.append(f"| {anchor} | {r['word']} | {r['cosine']:.3f} | {r['miou']:.3f} |")
        lines.append(f"| {anchor} | Spearman | | {_fmt(record['appendix_e_spearman'][anchor])} |")
    return "\n".join(lines) + "\n"


def _targets(discovery: dict, localized: dict) -> list[dict]:
    checks = []
    for axis, figures in discovery["axes"].items():
        rho = figures["spearman"]
        checks.append(
            {
                "check": f"{axis}: item found in sd images",
                "value": figures["item_found_rate"],
                "target": f">= {ITEM_FOUND_TARGET}",
                "met": figures["item_found_rate"] >= ITEM_FOUND_TARGET,
            }
        )
        checks.append(
            {
                "check": f"{axis}: Spearman mIoU vs planted entanglement",
                "value": rho["miou_vs_entanglement"],
                "target": f">= {SPEARMAN_TARGET}",
                "met": rho["miou_vs_entanglement"] >= SPEARMAN_TARGET,
            }
        )
        checks.append(
            {
                "check": f"{axis}: Spearman CLIP RD vs planted skew",
                "value": rho["clip_rd_vs_planted"],
                "target": f">= {SPEARMAN_TARGET}",
                "met": rho["clip_rd_vs_planted"] >= SPEARMAN_TARGET,
            }
        )
        pair = figures["key_finding_2"]
        checks.append(
            {
                "check": f"{axis}: Key Finding 2 pair {pair['balanced_entangled']} / "
                f"{pair['skewed_disentangled']}",
                "value": pair["holds"],
                "target": "low RD + high mIoU, and the reverse",
                "met": pair["holds"],
            }
        )
        for p, r in localized.get(axis, {}).items():
            checks.append(
                {
                    "check": f"{axis}: {p} map peak inside its item",
                    "value": r["profession_peak_in_item"],
                    "target": f">= {LOCALIZATION_TARGET}",
                    "met": r["profession_peak_in_item"] >= LOCALIZATION_TARGET,
                }
            )
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=64, help="seeds per profession, discovery")
    parser.add_argument("--sweep-seeds", type=int, default=16)
    parser.add_argument("--lambdas", default="30,100,300")
    parser.add_argument("--loc-seeds", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "planted-validation")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--fingerprint",
        action="store_true",
        help="also write the shipped model's small-seed fingerprint",
    )
    parser.add_argument("--quick", action="store_true", help="a few seeds and steps (smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.sweep_seeds, args.loc_seeds, args.steps = 2, 1, 2, 3
        args.lambdas = "100"
    torch.set_num_threads(args.threads)
    from biasmap.audit.clip import ClipClassifier
    from biasmap.models import PLANTED_FOLDER, load_pipeline

    started = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    lambdas = [float(v) for v in args.lambdas.split(",")]
    discovery, _ = audit(
        args.work_dir / f"discovery{suffix}", args.seeds, ["sd"], [100.0], args.steps
    )
    guidance, _ = audit(
        args.work_dir / f"guidance{suffix}",
        args.sweep_seeds,
        ["sd", "biasmap"],
        lambdas,
        args.steps,
    )
    pipe = load_pipeline("planted")
    localized = localization(pipe, PROFESSIONS, list(AXES), range(args.loc_seeds), args.steps)
    curves = appendix_d_summary(localized)
    classifier = ClipClassifier("planted")
    e_professions = ["firefighter", "doctor", "teacher"]
    e_seeds = range(max(2, args.loc_seeds // 2))
    appendix = {
        anchor: appendix_e(pipe, classifier, anchor, words, e_professions, e_seeds, args.steps)
        for anchor, words in APPENDIX_E_WORDS.items()
    }
    from biasmap.world.ground_truth import spearman

    record = {
        "seeds": args.seeds,
        "sweep_seeds": args.sweep_seeds,
        "lambdas": lambdas,
        "loc_seeds": args.loc_seeds,
        "steps": args.steps,
        "threads": args.threads,
        "discovery": discovery.figures,
        "guidance": guidance.figures,
        "localization": figures_without_curves(localized),
        "mass_in_region_spearman": {
            axis: spearman(
                [SPEC[p]["entanglement"][axis] for p in per],
                [r["profession_mass_in_region"] for r in per.values()],
            )
            for axis, per in localized.items()
        },
        "appendix_d": curves,
        "appendix_e": appendix,
        "appendix_e_spearman": {
            anchor: spearman([r["cosine"] for r in rows], [r["miou"] for r in rows])
            for anchor, rows in appendix.items()
        },
        "notes": discovery.notes + guidance.notes,
    }
    record["targets"] = _targets(discovery.figures, record["localization"])
    record["seconds"] = time.perf_counter() - started
    command = "PYTHONPATH=. python bench/bench_planted.py " + " ".join(argv or sys.argv[1:])
    record["command"] = command.strip()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"planted_validation{suffix}.json").write_text(
        json.dumps(record, indent=1, default=float)
    )
    markdown = _markdown(record, record["command"])
    (args.results_dir / f"planted_validation{suffix}.md").write_text(markdown)
    _plot_appendix_d(curves, args.results_dir / f"planted_appendix_d{suffix}.png")
    _plot_appendix_e(appendix, args.results_dir / f"planted_appendix_e{suffix}.png")
    if args.fingerprint:
        (PLANTED_FOLDER / "validation_fingerprint.json").write_text(
            json.dumps(fingerprint(pipe), indent=1)
        )
    print(markdown)
    return record


if __name__ == "__main__":
    main()
