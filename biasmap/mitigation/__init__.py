"""Bias mitigation: energy-guided sampling (paper Algorithm 1) and its combinations."""

from .fair_diffusion import AXIS_EDITS, FairDiffusion
from .presets import PRESETS, GuidanceSettings
from .sampler import GuidedOutput, alphabar, guided_generate

__all__ = [
    "AXIS_EDITS",
    "FairDiffusion",
    "GuidanceSettings",
    "GuidedOutput",
    "PRESETS",
    "alphabar",
    "guided_generate",
]
