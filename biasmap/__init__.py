"""biasmap: discover and mitigate social bias in Stable Diffusion via cross-attention maps.

`import biasmap` stays cheap: submodules (ops, and the diffusers integration) load
on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_MODULES = ("ops", "info")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"biasmap.{name}")
    raise AttributeError(f"module 'biasmap' has no attribute {name!r}")
