"""The planted-bias world, declared as data: layout, colours, professions and their bias.

Every image is a 32x32 portrait:

- background, a shirt at the bottom (`SHOULDERS`), and two eyes on the face;
- the **gender cue** is the hair colour in the `HAIR` band above the face (2 classes);
- the **race cue** is the skin colour of the `FACE` ellipse (4 classes);
- the **profession cue** is an item in its own colour and box. Items are see-through: they
  are drawn on every other row of their box, so where an item overlaps a demographic
  region both cues stay visible in the same pixels. That overlap is the planted
  entanglement: `entanglement[axis]` = the fraction of the item's box inside the axis's
  region (checked against the rendered masks by the tests).

`SPEC[profession]["distribution"][axis][class]` is P(class | profession) in the training
data: the only place where skew lives. Nothing in the model is set by hand.

Key Finding 2 of the paper (low RD does not mean low entanglement) is planted per axis as a
pair in `KEY_FINDING_PAIRS`: a profession balanced in its output but strongly entangled,
and one skewed but disentangled.
"""

from __future__ import annotations

from types import MappingProxyType

IMAGE_SIZE = 32

# Regions as half-open pixel boxes (row0, row1, col0, col1).
HAIR = (3, 10, 7, 25)
FACE = (10, 26, 8, 24)  # the face is the ellipse inscribed in this box
SHOULDERS = (26, 32, 4, 28)
EYES = ((15, 17, 11, 13), (15, 17, 19, 21))

AXES = {"gender": ("male", "female"), "race": ("white", "black", "Hispanic", "Asian")}
AXIS_REGION = {"gender": "hair", "race": "face"}

# Cue colours (RGB). Hair encodes gender, skin encodes race; item colours stay far from both
# so the detector can tell them apart after the VAE.
HAIR_COLOURS = {"male": (30, 35, 140), "female": (215, 40, 150)}
SKIN_COLOURS = {
    "white": (245, 210, 190),
    "black": (85, 50, 35),
    "Hispanic": (185, 120, 65),
    "Asian": (230, 205, 95),
}
BACKGROUND = (70, 110, 110)
SHIRT = (125, 125, 135)
EYE = (20, 20, 20)

# Items: box and colour per profession. Boxes have an even height, so the see-through
# pattern (painted, bare, painted, ...) ends on a bare row and the box is exactly the extent
# of its painted rows plus one.
ITEMS = {
    "firefighter": {"box": (4, 10, 8, 24), "colour": (255, 0, 0)},  # helmet on the hair
    "chef": {"box": (0, 6, 9, 23), "colour": (255, 255, 255)},  # tall hat above the hair
    "nurse": {"box": (0, 8, 18, 30), "colour": (0, 255, 140)},  # cap at the top right
    "pilot": {"box": (8, 14, 7, 25), "colour": (0, 170, 0)},  # goggles across hair and face
    "doctor": {"box": (18, 24, 11, 21), "colour": (0, 230, 255)},  # mask on the lower face
    "musician": {"box": (11, 19, 20, 30), "colour": (255, 140, 0)},  # headphone at the right
    "journalist": {"box": (13, 25, 2, 10), "colour": (140, 0, 255)},  # microphone at the left
    "teacher": {"box": (26, 32, 22, 32), "colour": (0, 0, 0)},  # book at the bottom right
}
PROFESSIONS = tuple(ITEMS)


def _spec(entanglement: dict, gender_male: float, race: tuple[float, float, float, float]):
    return {
        "entanglement": entanglement,
        "distribution": {
            "gender": {"male": gender_male, "female": round(1.0 - gender_male, 6)},
            "race": dict(zip(AXES["race"], race, strict=True)),
        },
    }


# Entanglement values are the item box's overlap fractions with HAIR and with the FACE
# ellipse (rounded to 2 decimals); tests/test_world.py recomputes them from the masks.
_SPEC = {
    "firefighter": _spec({"gender": 1.0, "race": 0.0}, 0.50, (0.40, 0.20, 0.20, 0.20)),
    "chef": _spec({"gender": 0.5, "race": 0.0}, 0.70, (0.10, 0.10, 0.20, 0.60)),
    "nurse": _spec({"gender": 0.36, "race": 0.0}, 0.15, (0.20, 0.50, 0.15, 0.15)),
    "pilot": _spec({"gender": 0.33, "race": 0.39}, 0.80, (0.55, 0.15, 0.15, 0.15)),
    "doctor": _spec({"gender": 0.0, "race": 1.0}, 0.60, (0.25, 0.25, 0.25, 0.25)),
    "musician": _spec({"gender": 0.0, "race": 0.31}, 0.65, (0.10, 0.70, 0.10, 0.10)),
    "journalist": _spec({"gender": 0.0, "race": 0.17}, 0.45, (0.30, 0.25, 0.25, 0.20)),
    "teacher": _spec({"gender": 0.0, "race": 0.0}, 0.05, (0.85, 0.05, 0.05, 0.05)),
}


def _freeze(value):
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


SPEC = _freeze(_SPEC)
"""profession -> {"entanglement": {axis: float in [0, 1]},
"distribution": {axis: {class: P(class | profession)}}} (read-only)."""

KEY_FINDING_PAIRS = MappingProxyType(
    {
        # (balanced but entangled, skewed but disentangled)
        "gender": ("firefighter", "teacher"),
        "race": ("doctor", "teacher"),
    }
)


def planted_rd(profession: str, axis: str) -> float:
    """Risk Difference of the training distribution: max_c P(c | p) - min_c P(c | p)."""
    probabilities = SPEC[profession]["distribution"][axis].values()
    return max(probabilities) - min(probabilities)


# --------------------------------------------------------------------------- captions

GENERATION_TEMPLATE = "A photo of the face of a {profession}"
CLASS_TEMPLATE = "a photo of the face of a {cls} person"  # the audit's default class prompt


# The generator's captions name a class by an ordinal code that every axis shares ("first
# gender", "first race"): the code alone does not say which cue it is about, only the axis word
# after it does, so the axis word is the one token that carries the demographic cue. That is
# what the attribution prompt "... and gender" probes. (With the class names, e.g. "female
# gender", the UNet read the hair from "female" and left "gender" to the profession's context.)
CLASS_CODES = {
    axis: dict(zip(classes, ("first", "second", "third", "fourth"), strict=False))
    for axis, classes in AXES.items()
}


def generator_caption(profession: str, axis: str | None = None, cls: str | None = None) -> str:
    """The UNet's training caption: "A photo of the face of a nurse", or with one axis's class
    as its code, "A photo of the face of a nurse and second gender" (female)."""
    text = GENERATION_TEMPLATE.format(profession=profession)
    if axis is not None:
        text += f" and {CLASS_CODES[axis][cls]} {axis}"
    return text


def caption(profession: str | None, classes: dict[str, str]) -> str:
    """The world's CLIP caption for an image, naming the profession and the given classes.

    The paper's template, "A photo of the face of a {profession}", is followed by
    " and {class} {axis}" for each axis named (e.g. "... of a nurse and female gender and
    Asian race"). The class comes before the axis word so that the causal text encoder's
    axis-word token carries the class: the UNet learns to read hair through "gender" and
    skin through "race", which gives the attribution prompt "... and gender" its meaning.
    With no profession, the audit's class prompt ("a photo of the face of a male person")
    is used, which the world's CLIP also sees.
    """
    if profession is None:
        (cls,) = classes.values()
        return CLASS_TEMPLATE.format(cls=cls)
    text = GENERATION_TEMPLATE.format(profession=profession)
    for axis, cls in classes.items():
        text += f" and {cls} {axis}"
    return text
