"""Bias mitigation: energy-guided sampling (paper Algorithm 1) and its combinations."""

from .fair_diffusion import AXIS_EDITS, FairDiffusion
from .presets import PRESETS, GuidanceSettings
from .sampler import GuidedOutput, alphabar, guided_generate

# Registers the SD3/Flux adapter in adapters.ADAPTERS (after the sampler, which it builds on).
from . import dit_adapter  # noqa: E402, F401  isort: skip

__all__ = [
    "AXIS_EDITS",
    "FairDiffusion",
    "GuidanceSettings",
    "GuidedOutput",
    "PRESETS",
    "alphabar",
    "guided_generate",
]
