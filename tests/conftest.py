"""Shared test helpers: which backends to test, and tolerance rules."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in triton's CPU interpreter, so that the one test command
# covers them. Triton reads the variable when it is imported (and when kernels are decorated),
# hence before anything imports biasmap's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from biasmap.ops import backends  # noqa: E402

INTERPRETED_OPT_IN = "BIASMAP_TEST_INTERPRETED"

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

    cpu_tensors: the tests build CPU tensors only, so backends that take GPU tensors are left
    out (tests/test_cuda_ops.py covers them on a GPU). So is an interpreted triton, unless
    BIASMAP_TEST_INTERPRETED=1: such files size their cases for the C++ kernels, and the
    interpreter runs them at ~150x torch's cost (test_resize_aggregate.py alone takes ~15 min);
    test_ops_common.py and test_triton_ops.py cover triton at interpreter-sized shapes.
    """
    params = []
    for name, backend in backends.BACKENDS.items():
        device = device_of(name)
        if cpu_tensors and device != "cpu":
            continue
        if cpu_tensors and interpreted(name) and os.environ.get(INTERPRETED_OPT_IN) != "1":
            continue
        reason = backend.unsupported(op, torch.device(device), torch.float32)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def device_of(backend: str) -> str:
    """Where a backend's test tensors live: cuda for "cuda", and for "triton" unless it runs in
    the interpreter (TRITON_INTERPRET=1, CPU tensors); cpu otherwise."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cpu" if interpreted("triton") else "cuda"
    return "cpu"


def interpreted(backend: str) -> bool:
    """Whether `backend` runs in the Triton interpreter here (about 150x slower than torch)."""
    if backend != "triton":
        return False
    from biasmap.kernels import triton as triton_kernels

    return triton_kernels.interpreting()


def gradcheck_options(backend: str) -> dict:
    """Extra torch.autograd.gradcheck arguments per backend. An interpreted backend checks one
    random projection of the Jacobian (fast_mode): the full numerical Jacobian costs two
    interpreted forwards per input element, minutes per case. Its full gradients are still
    compared with the reference's autograd in test_gradients_match_reference_autograd."""
    return {"fast_mode": True} if interpreted(backend) else {}


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


# Each test module gets its own tiny MM-DiT pipelines (module scope): tests install hooks and
# set schedulers on them, which must not leak into another module.
@pytest.fixture(scope="module")
def sd3():
    from biasmap import models

    return models.tiny_sd3(0)


@pytest.fixture(scope="module")
def flux():
    from biasmap import models

    return models.tiny_flux(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only when -m names slow (pyproject's marker says CI does not run
    them by default); others skip themselves the same way (test_cuda_compile.py)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
