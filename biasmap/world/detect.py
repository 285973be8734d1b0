"""Read the planted world's cues back from any image: which item, where, and which classes.

    found = detect(image)            # image: uint8 [32, 32, 3] or a PIL image
    found.profession, found.item_score, found.item_box, found.gender, found.race
    found.overlap["gender"]          # fraction of the item's box inside the detected hair

It works on rendered images and on generated ones (after the VAE), by colour: the
world's cue colours are far apart (spec.py), so a pixel is assigned to the nearest cue
colour within `COLOUR_TOLERANCE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .render import box_mask, ellipse_mask, region_masks
from .spec import AXES, HAIR_COLOURS, IMAGE_SIZE, ITEMS, SKIN_COLOURS

# Largest RGB distance at which a pixel still shows a cue colour. Half the smallest gap
# between an item colour and any other cue colour is about 60.
COLOUR_TOLERANCE = 60.0
# An item is present when at least this fraction of its drawn rows shows its colour.
ITEM_PRESENT = 0.5
# How far (pixels) a generated item may sit from its place and still count as that item.
ITEM_SLACK = 2

_AXIS_COLOURS = {"gender": HAIR_COLOURS, "race": SKIN_COLOURS}
_AXIS_REGION = {"gender": "hair", "race": "face"}


@dataclass(frozen=True)
class Detection:
    """What `detect` reads from one image.

    profession: the item with the highest score (None if no item reaches ITEM_PRESENT);
    item_scores: {profession: fraction of its drawn rows showing its colour};
    item_box: (row0, row1, col0, col1) of the detected item's pixels, or None;
    gender / race: the class whose colour the region's median pixel is nearest to (None
    when no class colour is within tolerance);
    regions: {"gender", "race"}: bool [32, 32] the axis's region as seen: the band spanned
    by hair-coloured pixels, the ellipse spanned by skin-coloured ones;
    overlap: {axis: fraction of item_box inside regions[axis]} (0 without an item).
    """

    profession: str | None
    item_scores: dict[str, float]
    item_box: tuple[int, int, int, int] | None
    gender: str | None
    race: str | None
    regions: dict[str, np.ndarray] = field(repr=False)
    overlap: dict[str, float]

    @property
    def item_score(self) -> float:
        return self.item_scores[self.profession] if self.profession else 0.0


def _as_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"detect takes a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image of the planted world, "
            f"got shape {array.shape}"
        )
    return array.astype(np.float32)


def _near(pixels: np.ndarray, colour) -> np.ndarray:
    return np.linalg.norm(pixels - np.asarray(colour, np.float32), axis=-1) <= COLOUR_TOLERANCE


def _trimmed_extent(mask: np.ndarray, min_count: int = 2) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the rows and columns holding at least `min_count` marked
    pixels: the box of a region, robust to a few stray pixels of a generated image."""
    rows = np.nonzero(mask.sum(1) >= min_count)[0]
    cols = np.nonzero(mask.sum(0) >= min_count)[0]
    if len(rows) == 0 or len(cols) == 0:
        return None
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _nearest_class(pixels: np.ndarray, colours: dict) -> str | None:
    if len(pixels) == 0:
        return None
    median = np.median(pixels, axis=0)
    names = list(colours)
    distances = [np.linalg.norm(median - np.asarray(colours[n], np.float32)) for n in names]
    best = int(np.argmin(distances))
    return names[best] if distances[best] <= COLOUR_TOLERANCE else None


def detect(image) -> Detection:
    """Detect the item, its position, the classes and the cue overlaps in one image.

    image: uint8 [32, 32, 3] (numpy) or a PIL image of that size.
    """
    pixels = _as_array(image)
    masks = region_masks()
    scores = {
        p: float(_near(pixels[masks[f"stripes:{p}"]], item["colour"]).mean())
        for p, item in ITEMS.items()
    }
    best = max(scores, key=scores.get)
    profession = best if scores[best] >= ITEM_PRESENT else None
    item_box = None
    item_pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    if profession is not None:
        # Only near the item's place: the eyes share the teacher's black book's colour.
        r0, r1, c0, c1 = ITEMS[profession]["box"]
        near_box = box_mask((r0 - ITEM_SLACK, r1 + ITEM_SLACK, c0 - ITEM_SLACK, c1 + ITEM_SLACK))
        item_pixels = _near(pixels, ITEMS[profession]["colour"]) & near_box
        rows, cols = np.nonzero(item_pixels)
        # The painted rows alternate with bare ones, so the box ends one row after the last.
        item_box = (
            int(rows.min()),
            min(int(rows.max()) + 2, IMAGE_SIZE),
            int(cols.min()),
            int(cols.max()) + 1,
        )
    classes, regions, overlap = {}, {}, {}
    for axis, colours in _AXIS_COLOURS.items():
        region = masks[_AXIS_REGION[axis]] & ~item_pixels & ~masks["eyes"]
        classes[axis] = _nearest_class(pixels[region], colours)
        shows_cue = np.zeros_like(item_pixels)
        for colour in colours.values():
            shows_cue |= _near(pixels, colour)
        extent = _trimmed_extent(shows_cue)
        regions[axis] = np.zeros_like(item_pixels)
        if extent is not None:
            # The world's hair is a band and its face an ellipse: their extent gives the
            # whole region, including the rows a see-through item paints over.
            regions[axis] = box_mask(extent) if axis == "gender" else ellipse_mask(extent)
        if item_box is None:
            overlap[axis] = 0.0
        else:
            r0, r1, c0, c1 = item_box
            overlap[axis] = float(regions[axis][r0:r1, c0:c1].mean())
    assert set(classes) == set(AXES)
    return Detection(
        profession, scores, item_box, classes["gender"], classes["race"], regions, overlap
    )
