"""biasmap: discover and mitigate social bias in Stable Diffusion via cross-attention maps.

`import biasmap` stays cheap: submodules (ops, and the diffusers integration) load
on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_MODULES = ("ops", "info", "models", "discovery", "mitigation", "viz")
# Public names that live in submodules, loaded on first access (diffusers stays unimported
# until a trace actually starts).
_LAZY_ATTRS = {
    "trace": "biasmap.discovery",
    "AttributionMaps": "biasmap.discovery",
    "guided_generate": "biasmap.mitigation",
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"biasmap.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'biasmap' has no attribute {name!r}")
