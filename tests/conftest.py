"""Shared test helpers: which backends to test, and tolerance rules."""

from __future__ import annotations

import os

import pytest
import torch

from biasmap.ops import backends

torch.set_num_threads(min(2, torch.get_num_threads()))


def runnable_backends(op: str, device: str = "cpu") -> list[str]:
    """Backends that can run `op` on `device` in this process (reference always can)."""
    return [
        name
        for name, backend in backends.BACKENDS.items()
        if backend.unsupported(op, torch.device(device), torch.float32) is None
    ]


def backend_params(op: str, *, cpu_tensors: bool = False) -> list:
    """pytest params over every backend; unavailable ones are skipped with their reason.

    cpu_tensors: the tests build CPU tensors only, so device backends are left out
    (tests/test_cuda_ops.py covers them on a GPU).
    """
    params = []
    for name, backend in backends.BACKENDS.items():
        if cpu_tensors and name == "cuda":
            continue
        device = "cuda" if name == "cuda" else "cpu"
        reason = backend.unsupported(op, torch.device(device), torch.float32)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def extension_expected() -> bool:
    """CI builds the extension; only an explicit opt-out makes its absence acceptable."""
    return os.environ.get("BIASMAP_SKIP_EXT") != "1"


def assert_close_2x(out, ref_lowp, ref_high, atol: float, what: str = "") -> None:
    """flash-attention's rule: out's error against a float64 reference is at most twice the
    error of a same-dtype PyTorch run, plus atol."""
    out, ref_lowp, ref_high = (t.detach().double().cpu() for t in (out, ref_lowp, ref_high))
    budget = 2 * (ref_lowp - ref_high).abs().max().item() + atol
    err = (out - ref_high).abs().max().item()
    assert err <= budget, (
        f"{what}: max error {err:.3e} exceeds 2x same-dtype error + atol = {budget:.3e}"
    )
