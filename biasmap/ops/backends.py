"""Backend choice by capability (the xformers pattern).

Every backend declares, per op, whether it can run at all in this process and
whether it supports given inputs (device, dtype). `backend="auto"` takes the first
capable backend in the device's preference order; a forced backend that cannot run
raises an error listing every backend's reason.

On CUDA tensors "cuda" and "triton" compete: CUDA_AUTO_PREFERENCE says, per op and
problem size, which goes first (see there). On CPU tensors auto never picks "triton":
its CPU mode is the Triton interpreter, which exists for tests.
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
for _names in NATIVE_OPS.values():  # fill native.KERNELS now, outside any compiled region
    for _name in _names:
        for _key in ("CPU", "CUDA"):
            native.has_kernel(_name, _key)


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


@dataclass(frozen=True)
class TritonBackend(Backend):
    """The Triton kernels in biasmap.kernels.triton (ops in the biasmap_triton namespace).

    Runs on CUDA tensors with a GPU, or on CPU tensors under TRITON_INTERPRET=1 (the
    interpreter, for tests). Importing triton waits until a caller asks.
    """

    @property
    def device_type(self) -> str:
        from biasmap.kernels import triton as triton_kernels

        return triton_kernels.device_type()

    def unavailable(self, op):
        from biasmap.kernels import triton as triton_kernels

        return triton_kernels.unavailable_reason()

    def unsupported(self, op, device, dtype):
        reason = self.unavailable(op)
        if reason is not None:
            return reason
        if device.type != self.device_type:
            if self.device_type == "cpu":
                return f"under TRITON_INTERPRET=1 triton runs on cpu tensors, got {device.type}"
            return f"runs on cuda tensors, got {device.type}"
        if op not in ("mask_iou",) and dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not supported"
        return None


BACKENDS: dict[str, Backend] = {
    "cpu": NativeBackend("cpu", device_type="cpu"),
    "cuda": NativeBackend("cuda", device_type="cuda"),
    "triton": TritonBackend("triton"),
    "reference": ReferenceBackend("reference"),
}
# Fastest first; the reference path is always last. CUDA's order is per op and size (below).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# backend="auto" on CUDA tensors: which of "cuda" and "triton" goes first, per op, as a function
# of the problem size (`size` in select(): the element count of the op's main input, e.g. q for
# attention_slice, x for soft_topk, the output for resize_aggregate). Each entry lists
# (largest size, backend) pairs in increasing size; the first pair whose bound is >= size
# decides, None meaning no bound. An op that is missing, or a size past every bound, keeps
# "cuda" first. On an H100 (bench/results/bench_ops_nvidia-h100-80gb-hbm3.md) CUDA was faster
# than Triton in eager calls for every op and size measured, so the table is empty. (Replayed
# as CUDA graphs, Triton's resize_aggregate to 512 x 512 and soft_iou were 10-15% faster.)
# The other backend stays the fallback when the first cannot run.
# Example: {"attention_slice": ((1 << 20, "cuda"), (None, "triton"))}.
CUDA_AUTO_PREFERENCE: dict[str, tuple[tuple[int | None, str], ...]] = {}


def auto_order(op: str, device: torch.device, size: int | None = None) -> tuple[str, ...]:
    """Backends `backend="auto"` tries, in order, for `op` on `device` at problem `size`."""
    order = AUTO_ORDER.get(device.type, ("reference",))
    if device.type != "cuda" or size is None:
        return order
    first = "cuda"
    for bound, name in CUDA_AUTO_PREFERENCE.get(op, ()):
        if bound is None or size <= bound:
            first = name
            break
    return (first, *(name for name in order if name != first))


def select(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, size: int | None = None
) -> str:
    """Name of the backend that runs `op` for inputs on `device` with `dtype`.

    backend: "auto" or a name in BACKENDS; size: the problem size that CUDA_AUTO_PREFERENCE
    reads (None: unknown). Raises ValueError for an unknown name and RuntimeError, listing
    every backend's reason, when the requested one cannot run.
    """
    if backend == "auto":
        for name in auto_order(op, device, size):
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
