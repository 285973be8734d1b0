"""Triton kernels for every biasmap op, registered as torch ops in the `biasmap_triton` namespace.

Each op is a `torch.library.triton_op` (forward and backward are separate ops, the backward
wired in with `register_autograd`), so torch.compile can see and fuse the kernels. Importing
this package imports nothing heavy; `load()` imports triton and registers the ops once.

Where the kernels can run:
- on CUDA tensors when a CUDA device is present;
- on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`, set before triton is
  imported). That is how CI without a GPU checks every kernel against the reference; it is about
  150x slower than torch, so it is for tests, never for `backend="auto"`.

`python -m biasmap.kernels.triton.compile_check` compiles every kernel for sm_80 and sm_90
without a GPU (the interpreter cannot catch what only the compiler rejects).
"""

from __future__ import annotations

import functools
import importlib
import os

NAMESPACE = "biasmap_triton"
_MODULES = ("attention", "resize", "topk", "masks")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Triton backend cannot run in this process, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton==3.7.1, the version torch 2.13 pins)"
    import torch

    if not interpreting() and not torch.cuda.is_available():
        return "triton needs a CUDA device or TRITON_INTERPRET=1 (CPU interpreter, for tests)"
    try:
        load()
    except Exception as exc:  # a triton/torch API mismatch must not break `import biasmap`
        return f"biasmap's triton kernels failed to load: {type(exc).__name__}: {exc}"
    return None


def device_type() -> str:
    """The device whose tensors the Triton backend takes: cpu under the interpreter, else cuda."""
    return "cpu" if interpreting() else "cuda"


@functools.cache
def load():
    """Import the kernel modules, registering the biasmap_triton ops once; return the namespace."""
    import torch

    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return getattr(torch.ops, NAMESPACE)
