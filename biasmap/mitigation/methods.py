"""The mitigation methods compared in the paper (Tables 1-3), as generation settings.

A method is a base (sd, fd, hard, negative) optionally combined with BiasMap's energy
guidance ("+biasmap"); "biasmap" alone is sd + guidance, and "biasmap@down-64+up-64"
restricts the guidance to those blocks (Table 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from .fair_diffusion import FairDiffusion

PROMPT = "A photo of the face of a {profession}"
HARD_PROMPT = "A photo of the face of a diverse {profession}"
# Negative prompting suppresses the demographic groups themselves (paper Table 3).
NEGATIVE_PROMPTS = {"gender": "male, female", "race": "white, black, hispanic, asian"}
BASES = ("sd", "fd", "hard", "negative")
METHODS = (
    "sd",
    "biasmap",
    "fd",
    "fd+biasmap",
    "hard",
    "hard+biasmap",
    "negative",
    "negative+biasmap",
    "biasmap@down-64+up-64",
)

# Bases that need a real second CFG branch: negative prompting replaces the unconditional
# prompt, Fair Diffusion adds its edit prompts' branches to the CFG batch.
TRUE_CFG_BASES = {"fd": "Fair Diffusion", "negative": "negative prompting"}


def method_base(method: str) -> str:
    """The base a method builds on: "fd" for "fd+biasmap", "sd" for "biasmap" and
    "biasmap@<blocks>"."""
    base = method.partition("@")[0].partition("+")[0]
    return "sd" if base == "biasmap" else base


def needs_true_cfg(method: str) -> bool:
    """Whether `method` needs a second CFG branch (see TRUE_CFG_BASES)."""
    return method_base(method) in TRUE_CFG_BASES


@dataclass(frozen=True)
class MethodPlan:
    """What to generate for one (method, profession, axis, seed)."""

    method: str
    prompt: str
    attribution_prompt: str
    concepts: tuple[str, ...]  # (demographic a, ..., semantic b): the semantic concept last
    guided: bool
    blocks: str | tuple[str, ...]
    negative_prompt: str | None
    editing_prompt: FairDiffusion | None


def plan(method: str, profession: str, axis: str, seed: int) -> MethodPlan:
    """Generation settings of `method` for a profession, a demographic axis and a seed.

    method: one of METHODS. The attribution prompt appends " and {axis}" to the generation
    prompt, so the axis word is the demographic concept and the profession the semantic one.
    """
    base, _, extra = method.partition("+")
    blocks: str | tuple[str, ...] = "default"
    if "@" in method:
        name, _, block_list = method.partition("@")
        if name != "biasmap" or not block_list:
            raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
        base, extra, blocks = "sd", "biasmap", tuple(block_list.split("+"))
    elif base == "biasmap" and not extra:
        base, extra = "sd", "biasmap"
    if base not in BASES or extra not in ("", "biasmap"):
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    parts = axis.split("+")  # an intersection such as "gender+race"
    if any(part not in NEGATIVE_PROMPTS for part in parts):
        raise ValueError(
            f"unknown axis {axis!r}; known: {list(NEGATIVE_PROMPTS)} or their intersections "
            "joined with '+'"
        )
    if base == "fd" and len(parts) > 1:
        raise ValueError(
            f"Fair Diffusion edits one axis at a time; {axis!r} is an intersection of {parts}"
        )
    prompt = (HARD_PROMPT if base == "hard" else PROMPT).format(profession=profession)
    return MethodPlan(
        method=method,
        prompt=prompt,
        attribution_prompt=f"{prompt} and {axis}",
        concepts=(axis, profession),
        guided=extra == "biasmap",
        blocks=blocks,
        # An intersection suppresses every group of every axis it joins.
        negative_prompt=(
            ", ".join(NEGATIVE_PROMPTS[part] for part in parts) if base == "negative" else None
        ),
        editing_prompt=FairDiffusion.for_seed(axis, seed) if base == "fd" else None,
    )
