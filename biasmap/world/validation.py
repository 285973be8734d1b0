"""Checks of the planted model's attribution maps against the world's true cue regions.

- `localization`: for each profession and axis, whether each concept's map peaks inside its
  true cue (the item for the profession word, the hair for "gender", the face for "race"),
  the IoU of the two concepts' masks, and the paper's Appendix D curve: how much of the true
  region the map's quantile-q mask covers (and how much of the mask lies in it) for q from
  0.1 to 0.9.
- `appendix_e`: the paper's Appendix E check: for a few concept words, the world's CLIP
  text cosine similarity with the axis word against the mIoU of the word's map with the
  axis word's map.

Both generate with `guided_generate(lambda_=0)`, which is plain diffusers sampling that
also returns the maps of the run; maps are at the largest attention resolution (16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import ops
from .render import cue_masks
from .spec import AXIS_REGION, GENERATION_TEMPLATE

APPENDIX_D_QS = tuple(round(0.1 * i, 1) for i in range(1, 10))
# A profession's map must peak inside its item in at least this share of seeds before its
# mIoU is read: a map that never finds its cue reads as a false entanglement.
LOCALIZATION_TARGET = 0.8


def truth_at(mask: np.ndarray, side: int) -> torch.Tensor:
    """A 32x32 bool region -> bool [side, side]: cells at least half inside the region."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(mask.astype(np.float32))[None, None], side
    )[0, 0]
    return pooled >= 0.5


def generate_with_maps(pipe, profession: str, concept: str, seeds: Sequence[int], steps: int):
    """Images and AttributionMaps [B, 2, S, S] of concepts (concept, profession), plain sampling."""
    from ..mitigation import guided_generate

    prompt = GENERATION_TEMPLATE.format(profession=profession)
    output = guided_generate(
        pipe,
        prompt,
        f"{prompt} and {concept}",
        [concept, profession],
        lambda_=0.0,
        num_inference_steps=steps,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
    )
    return output.images, output.maps


def _coverage(maps: torch.Tensor, truth: torch.Tensor, q: float) -> tuple[float, float]:
    """Mean (recall of the true region, precision of the mask) of q-masks of maps [B, S, S]."""
    masks = ops.quantile_mask(maps.flatten(1), q).view(maps.shape)
    inside = (masks & truth).flatten(1).sum(1).float()
    recall = inside / truth.sum().clamp(min=1)
    precision = inside / masks.flatten(1).sum(1).clamp(min=1).float()
    return float(recall.mean()), float(precision.mean())


def _peak_inside(maps: torch.Tensor, truth: torch.Tensor) -> float:
    peaks = maps.flatten(1).argmax(1)
    return float(truth.flatten()[peaks].float().mean())


def mass_inside(maps: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each map's total attribution [B, S, S] that falls inside truth [S, S]."""
    flat = maps.flatten(1).double()
    return float((flat[:, truth.flatten()].sum(1) / flat.sum(1)).mean())


def contrast(maps: torch.Tensor, truth: torch.Tensor) -> float:
    """mass_inside / the region's share of the map: 1 for a flat map, 1 / area for a map that
    lies wholly inside the region. Quantile masks read only ranks, so a low contrast means the
    q-mask's cells outside the cue decide the IoU."""
    return mass_inside(maps, truth) / float(truth.float().mean())


def localization(
    pipe, professions: Sequence[str], axes: Sequence[str], seeds: Sequence[int], steps: int
) -> dict:
    """Per axis and profession: peak-in-cue rates, mIoU, and Appendix D coverage curves.

    Returns {axis: {profession: {"profession_peak_in_item", "axis_peak_in_region", "miou",
    "profession_contrast", "axis_contrast" (see `contrast`), "profession_mass_in_region"
    (share of the profession map's attribution inside the axis's true region),
    "curve": {"axis": [[q, recall, precision], ...], "profession": [...]}}}}.
    """
    results: dict = {}
    for axis in axes:
        results[axis] = {}
        for profession in professions:
            _, maps = generate_with_maps(pipe, profession, axis, seeds, steps)
            side = maps.aggregate.shape[-1]
            truth = cue_masks(profession)
            axis_truth = truth_at(truth[axis], side)
            item_truth = truth_at(truth["item"], side)
            axis_maps = maps.concept(axis)
            item_maps = maps.concept(profession)
            results[axis][profession] = {
                "profession_peak_in_item": _peak_inside(item_maps, item_truth),
                "axis_peak_in_region": _peak_inside(axis_maps, axis_truth),
                "miou": float(maps.iou(axis, profession).mean()),
                "profession_contrast": contrast(item_maps, item_truth),
                "axis_contrast": contrast(axis_maps, axis_truth),
                "profession_mass_in_region": mass_inside(item_maps, axis_truth),
                "curve": {
                    "axis": [[q, *_coverage(axis_maps, axis_truth, q)] for q in APPENDIX_D_QS],
                    "profession": [
                        [q, *_coverage(item_maps, item_truth, q)] for q in APPENDIX_D_QS
                    ],
                },
            }
    return results


def figures_without_curves(results: dict) -> dict:
    """`localization`'s results without the Appendix D curves: the per-profession figures."""
    return {
        axis: {p: {k: v for k, v in r.items() if k != "curve"} for p, r in per.items()}
        for axis, per in results.items()
    }


def appendix_d_summary(results: dict) -> dict:
    """Mean Appendix D curves over professions: {"gender (hair)": [[q, recall, precision]],
    "race (face)": ..., "profession (item)": ...}."""
    curves: dict[str, list] = {}
    for axis, per_profession in results.items():
        runs = list(per_profession.values())
        curves[f"{axis} ({AXIS_REGION[axis]})"] = np.mean(
            [r["curve"]["axis"] for r in runs], axis=0
        ).tolist()
        curves.setdefault("profession (item)", []).extend(r["curve"]["profession"] for r in runs)
    curves["profession (item)"] = np.mean(curves["profession (item)"], axis=0).tolist()
    return curves


def appendix_e(
    pipe,
    classifier,
    anchor: str,
    words: Sequence[str],
    professions: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    q: float = 0.7,
) -> list[dict]:
    """For each word: cosine similarity with `anchor` (the CLIP's text embeddings of the bare
    words) and the mIoU of the word's map with the anchor's map over the same images.

    classifier: a biasmap.audit.clip.ClipClassifier (its text_embeddings are used).
    """
    embeddings = classifier.text_embeddings([anchor, *words])
    anchor_maps = {
        p: generate_with_maps(pipe, p, anchor, seeds, steps)[1].concept(anchor) for p in professions
    }
    rows = []
    for index, word in enumerate(words, start=1):
        ious = []
        for profession in professions:
            maps = generate_with_maps(pipe, profession, word, seeds, steps)[1].concept(word)
            a = ops.quantile_mask(maps.flatten(1), q)
            b = ops.quantile_mask(anchor_maps[profession].flatten(1), q)
            ious.append(ops.mask_iou(a, b))
        rows.append(
            {
                "word": word,
                "cosine": float(embeddings[index] @ embeddings[0]),
                "miou": float(torch.cat(ious).mean()),
            }
        )
    return rows
