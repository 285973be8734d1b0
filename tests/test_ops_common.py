"""Every op on every backend: values and gradients against the reference at odd sizes,
float64 gradcheck of the hand-written backward passes, opcheck, invariants, backend
choice and input errors. Op-specific checks live in tests/test_<op>.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    assert_close_2x,
    backend_params,
    device_of,
    extension_expected,
    gradcheck_options,
)

from biasmap import ops
from biasmap.ops import backends, native, reference


@dataclass
class Case:
    """One op call: `make(dtype, gen)` builds the inputs, `run(backend, **inputs)` calls it."""

    op: str
    name: str
    make: Callable[[torch.dtype, torch.Generator], dict]
    run: Callable[..., torch.Tensor]
    differentiable: tuple[str, ...] = ()


def _attention_inputs(batch, n_query, heads, head_dim, n_keys, tokens, k_batch, masked):
    def make(dtype, gen):
        inputs = {
            "q": torch.randn(batch, n_query, heads * head_dim, generator=gen, dtype=dtype),
            "k": torch.randn(k_batch, n_keys, heads * head_dim, generator=gen, dtype=dtype),
            "token_index": torch.tensor(tokens),
            "num_heads": heads,
            "key_mask": None,
        }
        if masked:
            # Prompt-like masks: each row keeps a different prefix of the keys.
            lengths = torch.arange(k_batch) * 3 + max(tokens) + 2
            inputs["key_mask"] = torch.arange(n_keys)[None, :] < lengths[:, None]
        return inputs

    return make


def _run_attention(backend, q, k, token_index, num_heads, key_mask):
    return ops.attention_slice(
        q, k, token_index, num_heads=num_heads, key_mask=key_mask, backend=backend
    )


def _resize_inputs(batch, channels, shapes, size, per_map):
    def make(dtype, gen):
        maps = [torch.rand(batch, channels, h, w, generator=gen, dtype=dtype) for h, w in shapes]
        return {"maps": maps, "size": size, "per_map": per_map}

    return make


def _run_resize(backend, maps, size, per_map):
    return ops.resize_aggregate(maps, size, per_map=per_map, backend=backend)


def _topk_inputs(batch, n, k, tau, solver, normalize, scale=1.0):
    def make(dtype, gen):
        x = torch.rand(batch, n, generator=gen, dtype=torch.float64) * scale
        return {"x": x.to(dtype), "k": k, "tau": tau, "solver": solver, "normalize": normalize}

    return make


def _run_topk(backend, x, k, tau, solver, normalize):
    return ops.soft_topk(x, k, tau, solver=solver, normalize=normalize, backend=backend)


def _pair_inputs(batch, n):
    def make(dtype, gen):
        return {
            "a": torch.rand(batch, n, generator=gen, dtype=dtype),
            "b": torch.rand(batch, n, generator=gen, dtype=dtype),
        }

    return make


def _run_iou(backend, a, b):
    return ops.soft_iou(a, b, backend=backend)


def _run_energy(backend, a, b):
    return ops.entanglement_energy(a, b, k=a.shape[1] // 3, tau=0.05, backend=backend)


def _quantile_inputs(batch, n, q, inclusive, integer_valued):
    def make(dtype, gen):
        x = torch.rand(batch, n, generator=gen, dtype=torch.float64)
        if integer_valued:  # many ties at the threshold
            x = (x * 7).floor()
        return {"x": x.to(dtype), "q": q, "inclusive": inclusive}

    return make


def _run_quantile(backend, x, q, inclusive):
    return ops.quantile_mask(x, q, inclusive, backend=backend)


def _mask_inputs(batch, n):
    def make(dtype, gen):
        a = torch.rand(batch, n, generator=gen) < 0.3
        b = torch.rand(batch, n, generator=gen) < 0.4
        b[0] = False
        a[0] = False  # an empty union: IoU 0
        return {"a": a, "b": b}

    return make


def _run_mask_iou(backend, a, b):
    return ops.mask_iou(a, b, backend=backend)


# Sizes are odd on purpose (n = 4097, L = 77, N = 1000, T = 1 and 3, B = 1 and 3).
CASES = [
    Case(
        "attention_slice",
        "B1-T1-nomask-kbcast",
        _attention_inputs(1, 1000, 2, 8, 77, [5], 1, False),
        _run_attention,
        ("q", "k"),
    ),
    Case(
        "attention_slice",
        "B3-T3-mask",
        _attention_inputs(3, 1000, 3, 5, 77, [1, 4, 4], 3, True),
        _run_attention,
        ("q", "k"),
    ),
    Case(
        "attention_slice",
        "B3-T3-mask-kbcast",
        _attention_inputs(3, 257, 4, 6, 77, [0, 2, 9], 1, True),
        _run_attention,
        ("q", "k"),
    ),
    Case(
        "resize_aggregate",
        "sd15-to-64",
        _resize_inputs(1, 1, [(64, 64), (32, 32), (16, 16), (8, 8)], 64, False),
        _run_resize,
        ("maps",),
    ),
    Case(
        "resize_aggregate",
        "odd-nonsquare",
        _resize_inputs(3, 3, [(7, 5), (13, 9), (20, 11)], (20, 11), False),
        _run_resize,
        ("maps",),
    ),
    Case(
        "resize_aggregate",
        "down-per-map",
        _resize_inputs(3, 1, [(16, 16), (9, 4)], (5, 7), True),
        _run_resize,
        ("maps",),
    ),
    Case(
        "soft_topk",
        "exact-B1",
        _topk_inputs(1, 4097, 1229, 0.1, "exact", "minmax"),
        _run_topk,
        ("x",),
    ),
    Case(
        "soft_topk",
        "exact-B3-none",
        _topk_inputs(3, 4097, 1, 0.05, "exact", "none"),
        _run_topk,
        ("x",),
    ),
    Case(
        "soft_topk",
        "sinkhorn-B3",
        _topk_inputs(3, 4097, 1229, 0.1, "sinkhorn", "minmax"),
        _run_topk,
        ("x",),
    ),
    Case(
        "soft_topk",
        "sinkhorn-authors-raw",
        _topk_inputs(3, 4097, 4096, 0.01, "sinkhorn", "none", scale=3.0),
        _run_topk,
        ("x",),
    ),
    Case("soft_iou", "B3", _pair_inputs(3, 4097), _run_iou, ("a", "b")),
    Case("soft_iou", "B1", _pair_inputs(1, 4097), _run_iou, ("a", "b")),
    Case("entanglement_energy", "B3", _pair_inputs(3, 4097), _run_energy, ("a", "b")),
    Case("quantile_mask", "B3-incl", _quantile_inputs(3, 4097, 0.7, True, False), _run_quantile),
    Case(
        "quantile_mask", "B1-ties-excl", _quantile_inputs(1, 4097, 0.7, False, True), _run_quantile
    ),
    Case(
        "quantile_mask", "B3-ties-incl", _quantile_inputs(3, 1000, 0.3, True, True), _run_quantile
    ),
    Case("mask_iou", "B3", _mask_inputs(3, 4097), _run_mask_iou),
]


def _case_backend_params():
    for case in CASES:
        for param in backend_params(case.op):
            backend = param.values[0]
            yield pytest.param(
                case, backend, id=f"{case.op}-{case.name}-{backend}", marks=param.marks
            )


def _to(inputs: dict, dtype: torch.dtype | None, device: str, requires_grad=()):
    def move(name, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
            value = value.to(device).detach().requires_grad_(name in requires_grad)
        elif isinstance(value, list):
            return [move(name, v) for v in value]
        return value

    return {name: move(name, value) for name, value in inputs.items()}


def _leaves(inputs: dict, names) -> list[torch.Tensor]:
    out = []
    for name in names:
        value = inputs[name]
        out.extend(value if isinstance(value, list) else [value])
    return out


@pytest.mark.parametrize("case,backend", list(_case_backend_params()))
def test_values_match_reference(case, backend):
    device = device_of(backend)
    base = case.make(torch.float64, torch.Generator().manual_seed(0))
    expected = case.run("reference", **base)
    for dtype in (torch.float32, torch.float64):
        out = case.run(backend, **_to(base, dtype, device))
        same_dtype_ref = case.run("reference", **_to(base, dtype, "cpu"))
        if out.dtype == torch.bool:
            assert torch.equal(out.cpu(), same_dtype_ref), f"{dtype}: masks differ"
            continue
        assert out.dtype == same_dtype_ref.dtype and out.shape == same_dtype_ref.shape
        assert_close_2x(out, same_dtype_ref, expected, atol=1e-6, what=f"{case.name} {dtype}")


@pytest.mark.parametrize(
    "case,backend",
    [p for p in _case_backend_params() if p.values[0].differentiable],
)
def test_gradients_match_reference_autograd(case, backend):
    device = device_of(backend)
    base = case.make(torch.float64, torch.Generator().manual_seed(1))
    grads = {}
    for name in ("reference", backend):
        inputs = _to(base, None, device if name == backend else "cpu", case.differentiable)
        out = case.run(name, **inputs)
        upstream = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype
        )
        leaves = _leaves(inputs, case.differentiable)
        grads[name] = torch.autograd.grad(out, leaves, upstream.to(out.device))
    for got, want in zip(grads[backend], grads["reference"], strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-7, atol=1e-9)


def _small(case: Case) -> dict:
    """The case's inputs cut down so that float64 gradcheck stays quick."""
    inputs = case.make(torch.float64, torch.Generator().manual_seed(3))
    if case.op == "attention_slice":
        inputs["q"] = inputs["q"][:, :7].contiguous()
        inputs["k"] = inputs["k"][:, :13].contiguous()
        inputs["token_index"] = inputs["token_index"].clamp_max(4)
        if inputs["key_mask"] is not None:
            inputs["key_mask"] = inputs["key_mask"][:, :13].contiguous()
    elif case.op == "resize_aggregate":
        inputs["maps"] = [m[..., :6, :5].contiguous() for m in inputs["maps"]]
        inputs["size"] = (7, 4)
    elif case.op == "soft_topk":
        inputs["x"] = inputs["x"][:, :37].contiguous()
        inputs["k"] = min(inputs["k"], 36)
    elif case.op in ("soft_iou", "entanglement_energy"):
        inputs = {name: t[:, :41].contiguous() for name, t in inputs.items()}
    return inputs


@pytest.mark.parametrize(
    "case,backend",
    [
        p
        for p in _case_backend_params()
        if p.values[0].differentiable and p.values[1] != "reference"
    ],
)
def test_gradcheck_float64(case, backend):
    inputs = _to(_small(case), None, device_of(backend), case.differentiable)
    leaves = _leaves(inputs, case.differentiable)

    def fn(*tensors):
        rebuilt, it = dict(inputs), iter(tensors)
        for name in case.differentiable:
            value = inputs[name]
            rebuilt[name] = [next(it) for _ in value] if isinstance(value, list) else next(it)
        return case.run(backend, **rebuilt)

    assert torch.autograd.gradcheck(
        fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, **gradcheck_options(backend)
    )


@pytest.mark.skipif(native.LOAD_ERROR is not None, reason="compiled extension not loaded")
def _attention_bwd_args(need_grad_k: bool):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 16, generator=gen)
    k = torch.randn(1, 9, 16, generator=gen)
    token_index = torch.tensor([2, 5])
    _, lse = torch.ops.biasmap.attention_slice_fwd(q, k, token_index, 2, 0.35, None)
    grad_out = torch.randn(2, 2, 40, generator=gen)
    return grad_out, q, k, token_index, 2, 0.35, None, lse, need_grad_k


@pytest.mark.parametrize(
    "op_name,args",
    [
        (
            "attention_slice_fwd",
            lambda: (
                torch.randn(2, 9, 8, requires_grad=True),
                torch.randn(1, 5, 8, requires_grad=True),
                torch.tensor([1, 3]),
                2,
                0.5,
                torch.tensor([[True, True, True, True, False]]),
            ),
        ),
        (
            # k without grad: the autograd formula asks the backward to skip grad_k.
            "attention_slice_fwd",
            lambda: (
                torch.randn(2, 9, 8, requires_grad=True),
                torch.randn(1, 5, 8),
                torch.tensor([1, 3]),
                2,
                0.5,
                None,
            ),
        ),
        ("attention_slice_bwd", lambda: _attention_bwd_args(need_grad_k=False)),
        (
            "resize_aggregate_fwd",
            lambda: (
                [
                    torch.rand(2, 3, 4, 4, requires_grad=True),
                    torch.rand(2, 3, 2, 3, requires_grad=True),
                ],
                5,
                6,
                False,
            ),
        ),
        ("soft_topk_exact_fwd", lambda: (torch.rand(2, 31, requires_grad=True), 9, 0.1, True)),
        (
            "soft_topk_sinkhorn_fwd",
            lambda: (torch.rand(2, 31, requires_grad=True), 9, 0.1, 7, True),
        ),
        ("soft_iou_fwd", lambda: (torch.rand(2, 31, requires_grad=True), torch.rand(2, 31), 1e-8)),
        ("quantile_mask", lambda: (torch.rand(2, 31), 0.7, True)),
        ("mask_iou", lambda: (torch.rand(2, 31) > 0.5, torch.rand(2, 31) > 0.5)),
    ],
)
def test_opcheck(op_name, args):
    op = getattr(torch.ops.biasmap, op_name)
    if not op.default.has_kernel_for_dispatch_key("CPU"):
        pytest.fail(f"biasmap::{op_name} has no CPU kernel in the built extension")
    torch.library.opcheck(op.default, args())


def test_cpu_backend_available_when_extension_built():
    if not extension_expected():
        pytest.skip("BIASMAP_SKIP_EXT=1: the compiled backend is off on purpose")
    table = backends.availability()
    missing = {op: reasons["cpu"] for op, reasons in table.items() if reasons["cpu"] is not None}
    assert not missing, f"the CPU backend is missing for: {missing}"


@pytest.mark.parametrize("backend", backend_params("soft_topk"))
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_soft_masks_in_unit_interval_and_iou_bounded(backend, solver):
    device = device_of(backend)
    x = torch.rand(3, 4097, generator=torch.Generator().manual_seed(4)).to(device)
    y = torch.rand(3, 4097, generator=torch.Generator().manual_seed(5)).to(device)
    ma = ops.soft_topk(x, 1229, 0.05, solver=solver, backend=backend)
    mb = ops.soft_topk(y, 1229, 0.05, solver=solver, backend=backend)
    assert ma.min() >= 0 and ma.max() <= 1
    if solver == "exact":
        torch.testing.assert_close(
            ma.sum(-1).double().cpu(),
            torch.full((3,), 1229.0, dtype=torch.float64),
            rtol=1e-4,
            atol=0,
        )
    iou = ops.soft_iou(ma, mb, backend=backend)
    assert ((iou >= 0) & (iou <= 1)).all()
    hard = ops.mask_iou(
        ops.quantile_mask(x, 0.7, backend=backend), ops.quantile_mask(y, 0.7, backend=backend)
    )
    assert ((hard >= 0) & (hard <= 1)).all()


def test_auto_prefers_the_compiled_cpu_backend():
    x = torch.rand(2, 10)
    expected = (
        "cpu"
        if backends.BACKENDS["cpu"].unsupported("soft_topk", x.device, x.dtype) is None
        else "reference"
    )
    assert backends.select("soft_topk", "auto", x.device, x.dtype) == expected


def test_forced_backend_that_cannot_run_lists_every_reason():
    with pytest.raises(RuntimeError, match=r"cuda.*All backends: cpu: .*; cuda: .*; reference: ok"):
        ops.soft_topk(torch.rand(2, 10), 3, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.soft_topk(torch.rand(2, 10), 3, 0.1, backend="tpu")


X = torch.rand(2, 10)


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: ops.soft_topk(X, 0, 0.1), ValueError, r"k must be in \[1, 9\], got 0"),
        (lambda: ops.soft_topk(X, 10, 0.1), ValueError, r"k must be in \[1, 9\], got 10"),
        (lambda: ops.soft_topk(X, 3, 0.0), ValueError, "tau must be a finite number > 0"),
        (lambda: ops.soft_topk(X, 3, -1.0), ValueError, "tau must be a finite number > 0"),
        (lambda: ops.soft_topk(X, 3, 0.1, solver="newton"), ValueError, "solver must be one of"),
        (lambda: ops.soft_topk(X, 3, 0.1, normalize="z"), ValueError, "normalize must be one of"),
        (lambda: ops.soft_topk(X.int(), 3, 0.1), TypeError, "x has unsupported dtype torch.int32"),
        (lambda: ops.soft_topk(X[0], 3, 0.1), ValueError, "x must have 2 dimensions"),
        (
            lambda: ops.soft_topk(torch.tensor([[0.1, float("nan"), 0.3]]), 1, 0.1),
            ValueError,
            "x contains NaN",
        ),
        (lambda: ops.soft_iou(X, X[:, :5]), ValueError, "a and b must have the same shape"),
        (lambda: ops.soft_iou(X, X.double()), TypeError, "a has dtype torch.float32 but b"),
        (lambda: ops.quantile_mask(X, 1.5), ValueError, r"q must be a quantile in \[0, 1\]"),
        (lambda: ops.mask_iou(X > 0.5, X), TypeError, "b must be a bool mask"),
        (
            lambda: ops.resize_aggregate([torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4)], 8),
            ValueError,
            r"maps\[1\] has \[1, 3\]",
        ),
        (lambda: ops.resize_aggregate([torch.rand(1, 2, 4, 4)], 0), ValueError, "size must be"),
        (lambda: ops.resize_aggregate([], 8), TypeError, "maps must be a non-empty list"),
    ],
)
def test_bad_input_errors_name_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


Q, K = torch.randn(2, 5, 8), torch.randn(1, 7, 8)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"token_index": torch.tensor([7])}, ValueError, r"token_index values must be in \[0, 6\]"),
        ({"token_index": torch.tensor([-1])}, ValueError, "token_index values must be in"),
        ({"token_index": torch.tensor([1.0])}, TypeError, "token_index must have dtype torch.long"),
        ({"num_heads": 3}, ValueError, "not divisible by num_heads=3"),
        ({"k": torch.randn(1, 7, 6)}, ValueError, "k's last dimension must equal q's"),
        ({"k": torch.randn(3, 7, 8)}, ValueError, "k's batch must be 1 or q's batch 2"),
        ({"k": K.double()}, TypeError, "q has dtype torch.float32 but k has dtype torch.float64"),
        ({"q": Q.half().int()}, TypeError, "q has unsupported dtype"),
        (
            {"key_mask": torch.tensor([[True] * 7, [False] * 7])},
            ValueError,
            r"key_mask rows \[1\] keep no key",
        ),
        ({"key_mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "key_mask must have shape"),
        ({"key_mask": torch.ones(2, 7)}, TypeError, "key_mask must be a bool tensor"),
        (
            {"q": torch.where(torch.rand(2, 5, 8) > 0.5, float("nan"), 0.0)},
            ValueError,
            "q contains NaN",
        ),
    ],
)
def test_attention_slice_errors(kwargs, error, pattern):
    args = {"q": Q, "k": K, "token_index": torch.tensor([1]), "num_heads": 2, **kwargs}
    with pytest.raises(error, match=pattern):
        ops.attention_slice(
            args["q"],
            args["k"],
            args["token_index"],
            num_heads=args["num_heads"],
            key_mask=args.get("key_mask"),
        )


def test_skip_value_checks_drops_only_the_data_dependent_checks():
    nan_q = Q.clone()
    nan_q[1, 2, 3] = float("nan")
    with ops.skip_value_checks():
        out = ops.attention_slice(nan_q, K, torch.tensor([1]), num_heads=2, backend="reference")
        # Shape checks stay, also with validate=False.
        with pytest.raises(ValueError, match="key_mask must have shape"):
            ops.attention_slice(
                Q, K, torch.tensor([1]), num_heads=2, key_mask=torch.ones(2, 6, dtype=torch.bool)
            )
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    # Restored on exit, also after an exception inside the block.
    with pytest.raises(RuntimeError), ops.skip_value_checks():
        raise RuntimeError
    with pytest.raises(ValueError, match="q contains NaN"):
        ops.attention_slice(nan_q, K, torch.tensor([1]), num_heads=2)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        ops.attention_slice(
            Q,
            K,
            torch.tensor([1]),
            num_heads=2,
            key_mask=torch.ones(2, 6, dtype=torch.bool),
            validate=False,
        )


def test_non_finite_check_names_nan_and_inf_but_not_a_sum_overflow():
    x = torch.rand(2, 64)
    x[0, :2] = torch.tensor([float("inf"), float("-inf")])  # sums to NaN, but holds no NaN
    with pytest.raises(ValueError, match="x contains inf"):
        ops.quantile_mask(x, 0.3)
    x[0, 1] = 1.0  # +inf alone: the sum is inf, not NaN
    with pytest.raises(ValueError, match="x contains inf"):
        ops.soft_topk(x, 3, 0.1)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        ops.quantile_mask(x, 0.3)
    # Finite entries whose fp16 sum overflows are fine.
    ops.quantile_mask(torch.full((1, 64), 60000.0, dtype=torch.float16), 0.3)


def test_import_survives_a_broken_extension_with_one_warning():
    script = textwrap.dedent(
        """
        import importlib, warnings
        real = importlib.import_module
        def broken(name, *a, **k):
            if name == "biasmap._C":
                raise ImportError("undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
            return real(name, *a, **k)
        importlib.import_module = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import biasmap.ops as ops
            import biasmap.ops.native
            out = ops.soft_topk(torch.rand(2, 9), 3, 0.1)
        ours = [w for w in caught if "biasmap._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "undefined symbol" in str(ours[0].message)
        assert ops.backends.select("soft_topk", "auto", out.device, out.dtype) == "reference"
        print("ok")
        """
    )
    env = {**os.environ, "BIASMAP_SKIP_EXT": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "backend", [p for p in backend_params("attention_slice") if p.id != "reference"]
)
def test_attention_backward_skips_grad_k_when_k_needs_none(backend):
    device = device_of(backend)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 40, 16, generator=gen, dtype=torch.float64).to(device)
    k = torch.randn(1, 9, 16, generator=gen, dtype=torch.float64).to(device)
    token_index = torch.tensor([2, 5], device=device)
    grad = torch.randn(2, 2, 40, generator=gen, dtype=torch.float64).to(device)
    kernels = ops._kernels(backend)
    _, lse = kernels.attention_slice_fwd(q, k, token_index, 2, 0.35, None)
    both = kernels.attention_slice_bwd(grad, q, k, token_index, 2, 0.35, None, lse)
    q_only = kernels.attention_slice_bwd(grad, q, k, token_index, 2, 0.35, None, lse, False)
    assert torch.equal(q_only[0], both[0])
    assert torch.equal(q_only[1], torch.zeros_like(k))
    # Through autograd, with k not requiring grad: grad_q still equals the reference's.
    qq = q.clone().requires_grad_()
    out = ops.attention_slice(qq, k, token_index, num_heads=2, scale=0.35, backend=backend)
    (got,) = torch.autograd.grad(out, qq, grad)
    qr = q.detach().cpu().requires_grad_()
    ref = reference.attention_slice(qr, k.cpu(), token_index.cpu(), 2, 0.35, None)
    (want,) = torch.autograd.grad(ref, qr, grad.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
