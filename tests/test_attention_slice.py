"""attention_slice: every backend against the pure-PyTorch reference (DESIGN.md section 2, Slice).

Odd sizes on purpose (N=1000, L=77 not a multiple of any vector width, head dims that
are not either), key-batch broadcast, key masks, repeated token indices, the float64
gradcheck of the hand-written backward, reduced precision, and the memory property
the fused kernel exists for (no [B, H, N, L] tensor).
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

import biasmap.ops as bops
from biasmap.ops import reference

BACKENDS = [
    name for name in ("reference", "cpu") if bops.availability()["attention_slice"][name] is None
]
COMPILED = [name for name in BACKENDS if name != "reference"]
needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="biasmap._C CPU kernels not built")

# (B, Bk, N, H, d, L, tokens, mask): mask None, "row" (one [1, L] row) or "batch" ([B, L]).
CASES = [
    (1, 1, 1000, 8, 40, 77, [5], None),
    (3, 3, 1000, 2, 24, 77, [0, 76, 30], "batch"),
    (3, 1, 1000, 4, 9, 77, [7, 7, 2], "row"),  # repeated token, key broadcast, odd d
    (2, 1, 37, 3, 17, 13, [12, 0, 12], "batch"),
    (1, 1, 5, 1, 1, 1, [0], None),  # one key: the slice is all ones
    (2, 2, 50, 2, 88, 200, [199, 0], "row"),  # several full key / head-dim tiles + a rest
]


def _inputs(case, dtype=torch.float32, seed=0):
    batch, k_batch, n, heads, d, keys, tokens, mask_kind = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, heads * d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(k_batch, keys, heads * d, generator=gen, dtype=torch.float64).to(dtype)
    token_index = torch.tensor(tokens, dtype=torch.long)
    mask = None
    if mask_kind is not None:
        rows = batch if mask_kind == "batch" else 1
        mask = torch.rand(rows, keys, generator=gen) < 0.6
        mask[:, token_index] = True  # keep the sliced columns alive in most rows
        mask[-1, token_index[0]] = False  # ... but also slice a masked key (value 0)
        mask[:, (int(token_index[0]) + 1) % keys] = True
    return q, k, token_index, heads, mask


def _run(backend, q, k, token_index, heads, mask, scale=None):
    return bops.attention_slice(
        q, k, token_index, num_heads=heads, scale=scale, key_mask=mask, backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[7]}")
def test_values_and_grads_match_reference(backend, case):
    q, k, token_index, heads, mask = _inputs(case)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = _run(backend, q, k, token_index, heads, mask)
    ref = reference.attention_slice(q, k, token_index, heads, None, mask)
    assert out.shape == ref.shape == (q.shape[0], len(token_index), q.shape[1])
    assert out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)

    grad = torch.randn_like(ref)
    gq, gk = torch.autograd.grad(out, (q, k), grad)
    gq_ref, gk_ref = torch.autograd.grad(ref, (q, k), grad)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants(backend):
    # All tokens, no mask: the T columns of a softmax summed over H heads add up to H.
    keys, heads = 11, 3
    q = torch.randn(2, 50, heads * 8)
    k = torch.randn(1, keys, heads * 8)
    out = _run(backend, q, k, torch.arange(keys), heads, None)
    torch.testing.assert_close(out.sum(dim=1), torch.full((2, 50), float(heads)))
    # A masked key gets exactly 0 probability, and its key gets exactly 0 gradient.
    mask = torch.ones(1, keys, dtype=torch.bool)
    mask[0, 4] = False
    k.requires_grad_(True)
    out = _run(backend, q, k, torch.tensor([4, 5]), heads, mask)
    assert bool((out[:, 0] == 0).all())
    out.sum().backward()
    assert bool((k.grad[0, 4] == 0).all())


@pytest.mark.parametrize("backend", COMPILED)
def test_gradcheck_float64(backend):
    q, k, token_index, heads, mask = _inputs((2, 1, 7, 2, 3, 9, [2, 2, 5], "batch"), torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)

    def fn(q, k):
        return _run(backend, q, k, token_index, heads, mask, scale=0.8)

    assert torch.autograd.gradcheck(fn, (q, k))
    q2, k2, tok2, heads2, _ = _inputs((2, 2, 6, 3, 4, 5, [4], None), torch.float64, seed=1)
    q2.requires_grad_(True)
    k2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _run(backend, a, b, tok2, heads2, None), (q2, k2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float32(backend, dtype):
    q32, k32, token_index, heads, mask = _inputs((2, 1, 300, 4, 20, 77, [3, 9], "row"))
    q32 = q32 * 0.5  # keep the scores in a range where half precision stays meaningful
    grad = torch.rand(2, 2, 300)

    def run(name, q, k):
        q = q.clone().requires_grad_(True)
        k = k.clone().requires_grad_(True)
        out = _run(name, q, k, token_index, heads, mask)
        out.backward(grad.to(out.dtype))
        return out.float(), q.grad.float(), k.grad.float()

    low = run(backend, q32.to(dtype), k32.to(dtype))
    ref_low = run("reference", q32.to(dtype), k32.to(dtype))
    # The float64 answer on the same (rounded) inputs; rounding the inputs is not
    # the kernel's error. Flash-attention's rule: at most twice the error of the
    # same-dtype PyTorch run, or one ulp of the largest value.
    exact = run("reference", q32.to(dtype).double(), k32.to(dtype).double())
    eps = torch.finfo(dtype).eps
    for got, ref, want in zip(low, ref_low, exact, strict=True):
        assert torch.isfinite(got).all()
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        ref_err = (ref - want).abs().max().item()
        assert err <= max(2 * ref_err, eps * scale), (err, ref_err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_long_sums_as_accurate_as_reference(backend):
    # grad_k sums over B*N query rows: it must not lose accuracy against float64
    # compared with the reference's (BLAS, blocked) float32 sums.
    q, k, token_index, heads, _ = _inputs((2, 1, 6000, 2, 16, 77, [5, 9], None), torch.float64)
    grad = torch.rand(2, 2, 6000, dtype=torch.float64)

    def grads(name, dtype):
        qq = q.to(dtype).detach().requires_grad_(True)
        kk = k.to(dtype).detach().requires_grad_(True)
        _run(name, qq, kk, token_index, heads, None).backward(grad.to(dtype))
        return qq.grad.double(), kk.grad.double()

    exact = grads("reference", torch.float64)
    ref = grads("reference", torch.float32)
    got = grads(backend, torch.float32)
    for g, r, e in zip(got, ref, exact, strict=True):
        err = ((g - e).norm() / e.norm()).item()
        ref_err = ((r - e).norm() / e.norm()).item()
        assert err <= max(2 * ref_err, 1e-7), (err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_stride0_grad(backend):
    q, k, token_index, heads, mask = _inputs((2, 1, 64, 2, 8, 77, [1, 3], "row"))
    q.requires_grad_(True)
    k.requires_grad_(True)
    _run(backend, q, k, token_index, heads, mask).sum().backward()  # grad is expand()ed
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    out = _run(backend, q, k, token_index, heads, mask)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(q.grad, gq, rtol=0, atol=0)
    torch.testing.assert_close(k.grad, gk, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    q, k, token_index, heads, mask = _inputs((2, 2, 33, 2, 6, 10, [0, 9], "batch"))
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    k_t = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_t.is_contiguous()
    out = _run(backend, q_t, k_t, token_index, heads, mask)
    torch.testing.assert_close(out, _run(backend, q, k, token_index, heads, mask))


@needs_cpu
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_cpu_instruction_set_paths(monkeypatch, isa):
    # The kernels are compiled for AVX-512, AVX2 and baseline; force the narrower ones.
    case = (2, 1, 45, 3, 40, 77, [5, 76], "batch")
    q, k, token_index, heads, mask = _inputs(case)
    q.requires_grad_(True)
    k.requires_grad_(True)
    monkeypatch.setenv("BIASMAP_CPU_ISA", isa)
    out = _run("cpu", q, k, token_index, heads, mask)
    gq, gk = torch.autograd.grad(out.sum() + out[:, 0].square().sum(), (q, k))
    ref = reference.attention_slice(q, k, token_index, heads, None, mask)
    gq_ref, gk_ref = torch.autograd.grad(ref.sum() + ref[:, 0].square().sum(), (q, k))
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-4, atol=5e-5)


@needs_cpu
def test_cpu_grad_k_is_deterministic_across_thread_counts():
    q, k, token_index, heads, mask = _inputs((3, 1, 700, 2, 16, 77, [4, 8], "row"))
    k.requires_grad_(True)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = _run("cpu", q, k, token_index, heads, mask)
            (gk,) = torch.autograd.grad(out, (k,), torch.ones_like(out))
            grads.append(gk)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@needs_cpu
def test_cpu_raw_op_checks():
    ops = torch.ops.biasmap
    q = torch.randn(2, 8, 12)
    k = torch.randn(1, 5, 12)
    with pytest.raises(RuntimeError, match="key_mask row 1 keeps no key"):
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1] = False
        ops.attention_slice_fwd(q, k, torch.tensor([0]), 3, 0.5, mask)
    with pytest.raises(RuntimeError, match=r"token_index\[1\] = 5 is out of range"):
        ops.attention_slice_fwd(q, k, torch.tensor([0, 5]), 3, 0.5, None)
    with pytest.raises(RuntimeError, match="not divisible by num_heads"):
        ops.attention_slice_fwd(q, k, torch.tensor([0]), 5, 0.5, None)
    with pytest.raises(RuntimeError, match="k's batch must be 1 or q's batch"):
        ops.attention_slice_fwd(q, torch.randn(3, 5, 12), torch.tensor([0]), 3, 0.5, None)
    out, lse = ops.attention_slice_fwd(q, k, torch.tensor([0]), 3, 0.5, None)
    assert lse.shape == (2, 3, 8) and lse.dtype == torch.float32
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.attention_slice_bwd(out, q, k, torch.tensor([0]), 3, 0.5, None, lse.double())


@needs_cpu
def test_cpu_lse_is_logsumexp_of_scaled_scores():
    q, k, token_index, heads, mask = _inputs((2, 2, 20, 2, 5, 9, [1], "batch"), torch.float64)
    _, lse = torch.ops.biasmap.attention_slice_fwd(q, k, token_index, heads, 0.3, mask)
    qh = q.reshape(2, 20, heads, 5).transpose(1, 2)
    kh = k.reshape(2, 9, heads, 5).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


@needs_cpu
def test_cpu_opcheck():
    q, k, token_index, heads, mask = _inputs((2, 1, 9, 2, 3, 6, [1, 1], "row"))
    q.requires_grad_(True)
    k.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.biasmap.attention_slice_fwd.default, (q, k, token_index, heads, 0.5, mask)
    )


def _peak_bytes(fn) -> int:
    """Peak of allocator bytes live during fn(), counted from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        if os.path.exists(path):
            os.remove(path)
    live = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


@needs_cpu
def test_cpu_never_materialises_probabilities():
    batch, n, heads, d, keys = 2, 2048, 8, 40, 77
    q = torch.randn(batch, n, heads * d, requires_grad=True)
    k = torch.randn(1, keys, heads * d, requires_grad=True)
    token_index = torch.tensor([5, 9])

    def step(backend):
        def run():
            _run(backend, q, k, token_index, heads, None).sum().backward()

        return run

    step("cpu")()  # warm up (first-call allocations)
    peak_cpu = _peak_bytes(step("cpu"))
    probs_bytes = batch * heads * n * keys * 4
    grad_q_bytes = q.numel() * 4
    # grad_q itself plus small packed keys and partial sums; far below one [B, H, N, L].
    assert peak_cpu < grad_q_bytes + probs_bytes // 4, (peak_cpu, probs_bytes)
    peak_ref = _peak_bytes(step("reference"))
    assert peak_cpu * 4 <= peak_ref, (peak_cpu, peak_ref)
