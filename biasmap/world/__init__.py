"""The planted-bias world: a synthetic portrait world whose bias is declared as data.

`SPEC` declares, per profession, how much its item overlaps each demographic cue's region
(the planted entanglement) and its class distribution per axis (the planted skew). A small
diffusers model trained on this world with the ordinary objective (`biasmap.world.train`)
is biasmap's offline default and ground truth: see `biasmap.world.spec` for the layout
and the captions.
"""

from .spec import AXES, KEY_FINDING_PAIRS, PROFESSIONS, SPEC, caption, planted_rd

__all__ = ["AXES", "KEY_FINDING_PAIRS", "PROFESSIONS", "SPEC", "caption", "planted_rd"]
