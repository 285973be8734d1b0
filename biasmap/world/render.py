"""Procedural renderer of the planted world's portraits, with the ground-truth mask of every cue.

    image, masks = render("nurse", "female", "Asian", seed=0)
    image: uint8 [32, 32, 3]; masks: {"hair", "face", "item"} bool [32, 32]

`sample_batch` draws (profession, gender, race) from `SPEC`'s distributions and renders a
batch at once; it is what the trainer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .spec import (
    AXES,
    BACKGROUND,
    EYE,
    EYES,
    FACE,
    HAIR,
    HAIR_COLOURS,
    IMAGE_SIZE,
    ITEMS,
    PROFESSIONS,
    SHIRT,
    SHOULDERS,
    SKIN_COLOURS,
    SPEC,
)

# Per-image colour jitter of each region and per-pixel noise, in 0-255 units: enough that
# the model cannot memorise 64 exact pictures, small against the gaps between cue colours.
COLOUR_JITTER = 10
PIXEL_NOISE = 3.0


def box_mask(box) -> np.ndarray:
    """bool [32, 32] of a half-open box (row0, row1, col0, col1), clipped to the image."""
    r0, r1, c0, c1 = (max(0, v) for v in box)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def ellipse_mask(box) -> np.ndarray:
    """bool [32, 32] of the ellipse inscribed in a half-open box (the world's face shape)."""
    r0, r1, c0, c1 = box
    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    centre_r, centre_c = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
    radius_r, radius_c = (r1 - r0) / 2, (c1 - c0) / 2
    return ((rows - centre_r) / radius_r) ** 2 + ((cols - centre_c) / radius_c) ** 2 <= 1.0


@lru_cache(maxsize=1)
def region_masks() -> dict[str, np.ndarray]:
    """Fixed region masks, bool [32, 32] each: "hair", "face", "eyes", "shoulders", and
    "item:<profession>" (the item's whole box) and "stripes:<profession>" (its drawn rows)."""
    rows = np.arange(IMAGE_SIZE)[:, None]
    masks = {
        "hair": box_mask(HAIR),
        "face": ellipse_mask(FACE),
        "eyes": box_mask(EYES[0]) | box_mask(EYES[1]),
        "shoulders": box_mask(SHOULDERS),
    }
    for profession, item in ITEMS.items():
        box = box_mask(item["box"])
        masks[f"item:{profession}"] = box
        # See-through items: every other row, starting at the box's first row.
        masks[f"stripes:{profession}"] = box & ((rows - item["box"][0]) % 2 == 0)
    for mask in masks.values():
        mask.setflags(write=False)
    return masks


def cue_masks(profession: str) -> dict[str, np.ndarray]:
    """Ground-truth cue regions bool [32, 32]: "gender" (hair), "race" (face), "item"."""
    masks = region_masks()
    return {"gender": masks["hair"], "race": masks["face"], "item": masks[f"item:{profession}"]}


@dataclass(frozen=True)
class Batch:
    """images: uint8 [N, 32, 32, 3]; professions, genders, races: N labels each."""

    images: np.ndarray
    professions: list[str]
    genders: list[str]
    races: list[str]


def render_batch(
    professions: list[str], genders: list[str], races: list[str], rng: np.random.Generator
) -> np.ndarray:
    """Render N portraits: uint8 [N, 32, 32, 3] for the given labels (N each)."""
    n = len(professions)
    if not (len(genders) == len(races) == n):
        raise ValueError("professions, genders and races need one label per image")
    for name, values, allowed in (
        ("profession", professions, PROFESSIONS),
        ("gender", genders, AXES["gender"]),
        ("race", races, AXES["race"]),
    ):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; the world has {list(allowed)}")
    masks = region_masks()

    def jittered(colours) -> np.ndarray:
        base = np.asarray(colours, dtype=np.float32).reshape(n, 1, 1, 3)
        return base + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 1, 1, 3))

    canvas = np.broadcast_to(jittered([BACKGROUND] * n), (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()

    def paint(mask: np.ndarray, colour: np.ndarray, rows: np.ndarray | slice = slice(None)):
        selected = canvas[rows]
        selected[:, mask] = np.broadcast_to(colour[rows], selected.shape)[:, mask]
        canvas[rows] = selected

    paint(masks["shoulders"], jittered([SHIRT] * n))
    paint(masks["face"], jittered([SKIN_COLOURS[r] for r in races]))
    paint(masks["eyes"], jittered([EYE] * n))
    paint(masks["hair"], jittered([HAIR_COLOURS[g] for g in genders]))
    item_colours = jittered([ITEMS[p]["colour"] for p in professions])
    for profession in set(professions):
        rows = np.array([p == profession for p in professions])
        paint(masks[f"stripes:{profession}"], item_colours, rows)
    canvas += rng.normal(0.0, PIXEL_NOISE, canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render(
    profession: str, gender: str, race: str, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One portrait: (uint8 [32, 32, 3], cue_masks(profession))."""
    image = render_batch([profession], [gender], [race], np.random.default_rng(seed))[0]
    return image, cue_masks(profession)


def sample_labels(n: int, rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """N (profession, gender, race) triples: professions uniform, classes from SPEC."""
    professions = [PROFESSIONS[i] for i in rng.integers(0, len(PROFESSIONS), n)]
    labels = {}
    for axis, classes in AXES.items():
        labels[axis] = [
            classes[rng.choice(len(classes), p=[SPEC[p]["distribution"][axis][c] for c in classes])]
            for p in professions
        ]
    return professions, labels["gender"], labels["race"]


def sample_batch(n: int, rng: np.random.Generator) -> Batch:
    """N portraits with labels drawn from the world's distributions."""
    professions, genders, races = sample_labels(n, rng)
    return Batch(render_batch(professions, genders, races, rng), professions, genders, races)
