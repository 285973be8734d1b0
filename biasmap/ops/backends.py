"""Backend choice by capability (the xformers pattern).

Every backend declares, per op, whether it can run at all in this process and
whether it supports given inputs (device, dtype). `backend="auto"` takes the first
capable backend in the device's preference order; a forced backend that cannot run
raises an error listing every backend's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native
from ._checks import FLOAT_DTYPES

# Public op -> the compiled ops it needs.
NATIVE_OPS: dict[str, tuple[str, ...]] = {
    "attention_slice": ("attention_slice_fwd", "attention_slice_bwd"),
    "resize_aggregate": ("resize_aggregate_fwd", "resize_aggregate_bwd"),
    "soft_topk": (
        "soft_topk_exact_fwd",
        "soft_topk_exact_bwd",
        "soft_topk_sinkhorn_fwd",
        "soft_topk_sinkhorn_bwd",
    ),
    "soft_iou": ("soft_iou_fwd", "soft_iou_bwd"),
    "entanglement_energy": (
        "soft_topk_exact_fwd",
        "soft_topk_exact_bwd",
        "soft_topk_sinkhorn_fwd",
        "soft_topk_sinkhorn_bwd",
        "soft_iou_fwd",
        "soft_iou_bwd",
    ),
    "quantile_mask": ("quantile_mask",),
    "mask_iou": ("mask_iou",),
}
OPS = tuple(NATIVE_OPS)


@dataclass(frozen=True)
class Backend:
    """A way to run the ops; subclasses say what they can run."""

    name: str

    def unavailable(self, op: str) -> str | None:
        """Why this backend cannot run `op` in this process at all, or None."""
        return None

    def unsupported(self, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run `op` on inputs of this device and dtype, or None."""
        return self.unavailable(op)


@dataclass(frozen=True)
class ReferenceBackend(Backend):
    def unsupported(self, op, device, dtype):
        return None


@dataclass(frozen=True)
class NativeBackend(Backend):
    """The C++ (CPU) or CUDA kernels compiled into biasmap._C."""

    device_type: str = "cpu"

    @property
    def dispatch_key(self) -> str:
        return self.device_type.upper()

    def unavailable(self, op):
        if native.LOAD_ERROR is not None:
            return native.LOAD_ERROR
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        missing = [n for n in NATIVE_OPS[op] if not native.has_kernel(n, self.dispatch_key)]
        if missing:
            return f"biasmap._C has no {self.dispatch_key} kernel for {', '.join(missing)}"
        return None

    def unsupported(self, op, device, dtype):
        reason = self.unavailable(op)
        if reason is not None:
            return reason
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors, got {device.type}"
        if op not in ("mask_iou",) and dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not supported"
        return None


BACKENDS: dict[str, Backend] = {
    "cpu": NativeBackend("cpu", device_type="cpu"),
    "cuda": NativeBackend("cuda", device_type="cuda"),
    "reference": ReferenceBackend("reference"),
}
# Fastest first; the reference path is always last.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "reference"),
}


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the backend that runs `op` for inputs on `device` with `dtype`.

    backend: "auto" or a name in BACKENDS. Raises ValueError for an unknown name and
    RuntimeError, listing every backend's reason, when the requested one cannot run.
    """
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if BACKENDS[name].unsupported(op, device, dtype) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    reason = BACKENDS[backend].unsupported(op, device, dtype)
    if reason is None:
        return backend
    reasons = "; ".join(
        f"{name}: {BACKENDS[name].unsupported(op, device, dtype) or 'ok'}" for name in BACKENDS
    )
    raise RuntimeError(
        f"backend {backend!r} cannot run {op} on {device.type} {dtype}: {reason}. "
        f"All backends: {reasons}"
    )


def availability() -> dict[str, dict[str, str | None]]:
    """{op: {backend: None if it can run in this process, else the reason}}."""
    return {op: {name: b.unavailable(op) for name, b in BACKENDS.items()} for op in OPS}
