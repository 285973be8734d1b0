"""The CUDA kernels without a GPU.

* nvcc compiles every kernel header (csrc/cuda/*.cuh) for sm_80 and sm_90, with
  every launcher instantiated for float, double, half and bfloat16
  (scripts/nvcc_check.sh; skipped without nvcc).
* Every op schema of csrc/ops.cpp has a CUDA registration in csrc/cuda/*.cu.
* The kernels themselves run on the CPU under csrc/cuda/host_emu (each CUDA thread
  a fiber, warp shuffles and barriers emulated, scheduling order reshuffled from a
  seed) and are compared with biasmap.ops.reference: values, hand-written
  backward passes against autograd of the reference, the multi-block, multi-round
  and global-memory paths of soft top-k (forced through the emulated device's
  size), edge inputs, and 16-bit inputs. Skipped without a C++20 compiler or the
  CUDA headers.

What this cannot cover (GPU-only): see tests/test_cuda_ops.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from biasmap.ops import reference as R

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
BUILD = ROOT / "build"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_include() -> Path | None:
    candidates = []
    nvcc = _nvcc()
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parents[1] / "include")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_runtime_api.h").exists() and (c / "cuda_fp16.h").exists():
            return c
    return None


def _digest(paths, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# nvcc


def test_nvcc_compiles_every_kernel_header():
    """scripts/nvcc_check.sh for sm_80 and sm_90. A success is remembered under
    build/ for the exact header contents and nvcc version, so reruns are instant;
    BIASMAP_NVCC_CHECK_FORCE=1 recompiles anyway."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): the CUDA headers cannot be compile-checked")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    script = ROOT / "scripts" / "nvcc_check.sh"
    key = _digest([*CUDA_SRC.glob("*.cuh"), script], version)
    stamp = BUILD / "nvcc_check" / f"ok-{key}"
    if stamp.exists() and os.environ.get("BIASMAP_NVCC_CHECK_FORCE") != "1":
        return
    result = subprocess.run(
        ["bash", str(script), "-j", "2", "80", "90"],
        capture_output=True,
        text=True,
        env={**os.environ, "NVCC": nvcc},
    )
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(result.stdout)


def test_every_op_has_a_cuda_registration():
    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text()))
    assert schemas, "no schemas found in csrc/ops.cpp"
    registered = set()
    for cu in CUDA_SRC.glob("*.cu"):
        text = cu.read_text()
        assert "TORCH_LIBRARY_IMPL(biasmap, CUDA, m)" in text, f"{cu.name} registers nothing"
        registered |= set(re.findall(r'm\.impl\(\s*"(\w+)"', text))
    assert schemas - registered == set(), f"ops without a CUDA kernel: {schemas - registered}"
    assert registered - schemas == set(), f"CUDA kernels for unknown ops: {registered - schemas}"


def test_kernels_use_only_dynamic_shared_memory_and_the_current_stream():
    """The host emulation relies on these rules (common.cuh), and the wrappers must
    launch on torch's current stream, never on the legacy default stream."""
    for h in CUDA_SRC.glob("*.cuh"):
        code = re.sub(r"//[^\n]*", "", h.read_text())
        shared = re.findall(r"__shared__[^;]*;", code)
        allowed = [s for s in shared if "bm_dyn_smem_" in s]
        assert shared == allowed, f"{h.name}: static __shared__ memory: {shared}"
        assert "<<<" not in code, f"{h.name}: launch through launch_kernel(), not <<<>>>"
    for cu in CUDA_SRC.glob("*.cu"):
        code = cu.read_text()
        assert "<<<" not in code and "cudaStreamLegacy" not in code
        assert "CUDAGuard guard" in code, f"{cu.name} does not set the device"
        assert code.count("glue::current_stream()") >= 1


# ---------------------------------------------------------------------------
# host emulation

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
I64 = ctypes.c_int64
DBL = ctypes.c_double


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


@pytest.fixture(scope="module")
def emu():
    inc = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if inc is None or cxx is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_runtime_api.h, cuda_fp16.h)")
    flags = [
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-unknown-pragmas",
        f"-I{ROOT / 'csrc'}",
        f"-I{inc}",
        "-DBIASMAP_TOPK_SMALL_THREADS=64",
        "-DBIASMAP_TOPK_LARGE_THREADS=128",
    ]
    sources = [*CUDA_SRC.glob("*.cuh"), *(CUDA_SRC / "host_emu").glob("*")]
    lib = BUILD / "cuda_emu" / f"libbm_emu-{_digest(sources, ' '.join([cxx, *flags]))}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, str(CUDA_SRC / "host_emu" / "harness.cpp"), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"building the emulation failed:\n{result.stderr}"
        tmp.rename(lib)
    return Emu(ctypes.CDLL(str(lib)))


class Emu:
    """ctypes front end of csrc/cuda/host_emu/harness.cpp (host tensors)."""

    def __init__(self, lib):
        self.lib = lib
        self.device(4, 2, 227 * 1024)

    def device(self, sms, blocks_per_sm, smem):
        self.lib.bm_emu_set_device(sms, blocks_per_sm, smem)

    @staticmethod
    def _ok(code, what):
        assert code == 0, f"{what}: emulated launch returned error {code}"

    def soft_iou(self, a, b, eps=1e-8):
        rows, n = a.shape
        sums = torch.empty(rows, 3, dtype=torch.float64)
        iou = torch.empty(rows, dtype=a.dtype)
        self._ok(
            self.lib.bm_iou_fwd(
                DT[a.dtype], _ptr(a), _ptr(b), I64(rows), I64(n), DBL(eps), _ptr(sums), _ptr(iou)
            ),
            "soft_iou_fwd",
        )
        return iou, sums

    def soft_iou_bwd(self, grad, a, b, sums, eps=1e-8):
        rows, n = a.shape
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        self._ok(
            self.lib.bm_iou_bwd(
                DT[a.dtype],
                _ptr(grad),
                _ptr(a),
                _ptr(b),
                _ptr(sums),
                I64(rows),
                I64(n),
                DBL(eps),
                _ptr(ga),
                _ptr(gb),
            ),
            "soft_iou_bwd",
        )
        return ga, gb

    def mask_iou(self, a, b):
        out = torch.empty(a.shape[0], dtype=torch.float32)
        self._ok(
            self.lib.bm_mask_iou(_ptr(a), _ptr(b), I64(a.shape[0]), I64(a.shape[1]), _ptr(out)),
            "mask_iou",
        )
        return out

    def quantile_mask(self, x, q, inclusive):
        out = torch.empty(x.shape, dtype=torch.bool)
        self._ok(
            self.lib.bm_quantile_mask(
                DT[x.dtype],
                _ptr(x),
                I64(x.shape[0]),
                I64(x.shape[1]),
                DBL(q),
                int(inclusive),
                _ptr(out),
            ),
            "quantile_mask",
        )
        return out

    def _maps_args(self, maps):
        m = len(maps)
        h = (ctypes.c_int * m)(*[t.shape[2] for t in maps])
        w = (ctypes.c_int * m)(*[t.shape[3] for t in maps])
        return m, h, w

    def resize(self, maps, size, per_map):
        m, h, w = self._maps_args(maps)
        b, t = maps[0].shape[:2]
        out = torch.empty((b, m, t, *size) if per_map else (b, t, *size), dtype=maps[0].dtype)
        src = (ctypes.c_void_p * m)(*[x.data_ptr() for x in maps])
        self._ok(
            self.lib.bm_resize_fwd(
                DT[maps[0].dtype],
                src,
                h,
                w,
                m,
                I64(b),
                I64(t),
                size[0],
                size[1],
                int(per_map),
                _ptr(out),
            ),
            "resize_fwd",
        )
        return out

    def resize_bwd(self, grad, maps, size, per_map):
        m, h, w = self._maps_args(maps)
        b, t = maps[0].shape[:2]
        grads = [torch.empty_like(x) for x in maps]
        dst = (ctypes.c_void_p * m)(*[x.data_ptr() for x in grads])
        self._ok(
            self.lib.bm_resize_bwd(
                DT[maps[0].dtype],
                _ptr(grad),
                h,
                w,
                m,
                I64(b),
                I64(t),
                size[0],
                size[1],
                int(per_map),
                dst,
            ),
            "resize_bwd",
        )
        return grads

    def _attn_dims(self, q, k, token_index, heads, key_mask):
        b, n, inner = q.shape
        mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
        dims = [
            I64(b),
            I64(n),
            I64(k.shape[0]),
            I64(k.shape[1]),
            I64(0 if mask is None else mask.shape[0]),
            heads,
            inner // heads,
            token_index.numel(),
        ]
        return mask, dims

    def attention(self, q, k, token_index, heads, scale, key_mask=None):
        mask, dims = self._attn_dims(q, k, token_index, heads, key_mask)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty(q.shape[0], token_index.numel(), q.shape[1], dtype=q.dtype)
        lse = torch.empty(q.shape[0], heads, q.shape[1], dtype=acc)
        self._ok(
            self.lib.bm_attention_fwd(
                DT[q.dtype],
                _ptr(q),
                _ptr(k),
                _ptr(token_index),
                _ptr(mask),
                *dims,
                DBL(scale),
                _ptr(out),
                _ptr(lse),
            ),
            "attention_fwd",
        )
        return out, lse

    def attention_bwd(
        self, grad_out, q, k, token_index, heads, scale, key_mask, lse, need_grad_k=True
    ):
        """(grad_q, grad_k); grad_k is None with need_grad_k=False (a null pointer)."""
        mask, dims = self._attn_dims(q, k, token_index, heads, key_mask)
        gq, gk = torch.empty_like(q), torch.empty_like(k) if need_grad_k else None
        self._ok(
            self.lib.bm_attention_bwd(
                DT[q.dtype],
                _ptr(grad_out),
                _ptr(q),
                _ptr(k),
                _ptr(token_index),
                _ptr(mask),
                _ptr(lse),
                *dims,
                DBL(scale),
                _ptr(gq),
                _ptr(gk),
            ),
            "attention_bwd",
        )
        return gq, gk

    def topk(self, kind, x, k, tau, iters, minmax, grad=None, mask=None, stats=None):
        rows, n = x.shape
        out = torch.empty_like(x)
        if stats is None:
            width = 3 if kind in (0, 1) else 2 + 2 * iters
            stats = torch.empty(rows, width, dtype=torch.float64)
        self._ok(
            self.lib.bm_topk(
                DT[x.dtype],
                kind,
                _ptr(x),
                _ptr(grad),
                _ptr(mask),
                _ptr(out),
                _ptr(stats),
                I64(rows),
                I64(n),
                I64(k),
                DBL(tau),
                iters,
                int(minmax),
            ),
            f"soft_topk kernel {kind}",
        )
        return out, stats

    def topk_plan(self, kind, dtype, rows, n, iters=1):
        out = (ctypes.c_int64 * 6)()
        self.lib.bm_topk_plan(DT[dtype], kind, I64(rows), I64(n), iters, out)
        p = list(out)
        return {"P": p[0], "groups": p[1], "chunk": p[2], "smem": bool(p[3]), "threads": p[4]}


def _close_2x(out, ref_lowp, ref64, atol, what=""):
    out, ref_lowp, ref64 = (t.detach().double() for t in (out, ref_lowp, ref64))
    budget = 2 * (ref_lowp - ref64).abs().max().item() + atol
    err = (out - ref64).abs().max().item()
    assert err <= budget, f"{what}: error {err:.3e} > 2x same-dtype error + atol = {budget:.3e}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- soft_iou, mask_iou --------------------------------------------------------


@pytest.mark.parametrize("rows,n", [(3, 4097), (1, 50000)])
def test_emulated_soft_iou(emu, rows, n):
    g = _gen(0)
    a = torch.rand(rows, n, generator=g, dtype=torch.float64)
    b = torch.rand(rows, n, generator=g, dtype=torch.float64)
    iou, sums = emu.soft_iou(a, b)
    torch.testing.assert_close(iou, R.soft_iou(a, b), rtol=1e-12, atol=0)
    torch.testing.assert_close(sums[:, 1], a.sum(-1), rtol=1e-12, atol=0)
    grad = torch.randn(rows, generator=g, dtype=torch.float64)
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.autograd.grad(R.soft_iou(aa, bb), (aa, bb), grad)
    got = emu.soft_iou_bwd(grad, a, b, sums)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    a32, b32 = a.float(), b.float()
    _close_2x(emu.soft_iou(a32, b32)[0], R.soft_iou(a32, b32), R.soft_iou(a, b), 1e-6, "float32")


def test_emulated_mask_iou_matches_exactly(emu):
    g = _gen(1)
    a = torch.rand(4, 3001, generator=g) < 0.3
    b = torch.rand(4, 3001, generator=g) < 0.4
    a[0] = b[0] = False  # empty union
    a[1] = b[1] = True
    assert torch.equal(emu.mask_iou(a, b), R.mask_iou(a, b))


# --- quantile_mask -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_quantile_mask_is_bit_exact(emu, dtype):
    for trial in range(12):
        g = _gen(100 + trial)
        n = int(torch.randint(2, 3000, (1,), generator=g))
        x = torch.randn(2, n, generator=g, dtype=torch.float64) * 10
        if trial % 3 == 0:
            x = x.floor()  # ties at the threshold
        x = x.to(dtype)
        q = [0.0, 1.0, 0.7, 0.3][trial % 4] if trial < 4 else float(torch.rand(1, generator=g))
        for inclusive in (True, False):
            got = emu.quantile_mask(x, q, inclusive)
            assert torch.equal(got, R.quantile_mask(x, q, inclusive)), (trial, n, q, inclusive)


def test_emulated_quantile_mask_16bit(emu):
    x = torch.randn(3, 1000, generator=_gen(2))
    for dtype in (torch.float16, torch.bfloat16):
        xl = x.to(dtype)
        assert torch.equal(emu.quantile_mask(xl, 0.7, True), R.quantile_mask(xl.float(), 0.7, True))


# --- resize_aggregate --------------------------------------------------------------

RESIZE_CASES = [
    ([(64, 64), (32, 32), (16, 16), (8, 8)], (64, 64), False),
    ([(7, 5), (13, 9), (20, 11)], (20, 11), False),
    ([(16, 16), (9, 4)], (5, 7), True),
    ([(1, 1), (3, 2)], (6, 9), False),
]


@pytest.mark.parametrize("shapes,size,per_map", RESIZE_CASES)
def test_emulated_resize_aggregate(emu, shapes, size, per_map):
    g = _gen(3)
    maps = [torch.rand(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in shapes]
    out = emu.resize(maps, size, per_map)
    torch.testing.assert_close(out, R.resize_aggregate(maps, size, per_map), rtol=1e-12, atol=1e-14)
    leaves = [m.clone().requires_grad_() for m in maps]
    ref = R.resize_aggregate(leaves, size, per_map)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, leaves, grad)
    got = emu.resize_bwd(grad, maps, size, per_map)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    m32 = [m.float() for m in maps]
    _close_2x(emu.resize(m32, size, per_map), R.resize_aggregate(m32, size, per_map), out, 1e-6)


def test_emulated_resize_many_maps_take_several_launches(emu):
    maps = [
        torch.rand(1, 2, 3 + i % 5, 4 + i % 3, generator=_gen(i), dtype=torch.float64)
        for i in range(37)
    ]
    torch.testing.assert_close(
        emu.resize(maps, (9, 8), False), R.resize_aggregate(maps, (9, 8)), rtol=1e-12, atol=1e-12
    )


# --- attention_slice ---------------------------------------------------------------

ATTN_CASES = [
    # batch, queries, heads, head_dim, keys, tokens, key batch, masked
    (1, 100, 2, 8, 77, [5], 1, False),
    (3, 70, 3, 5, 77, [1, 4, 4], 3, True),
    (3, 57, 4, 6, 77, [0, 2, 9], 1, True),
    (2, 33, 1, 40, 40, [39, 0], 2, False),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-H{c[2]}-d{c[3]}")
def test_emulated_attention_slice(emu, case):
    batch, nq, heads, d, nk, tokens, kb, masked = case
    g = _gen(4)
    q = torch.randn(batch, nq, heads * d, generator=g, dtype=torch.float64)
    k = torch.randn(kb, nk, heads * d, generator=g, dtype=torch.float64)
    tok = torch.tensor(tokens)
    mask = None
    if masked:
        lengths = torch.arange(kb) * 3 + max(tokens) + 2
        mask = torch.arange(nk)[None, :] < lengths[:, None]
    scale = d**-0.5
    out, lse = emu.attention(q, k, tok, heads, scale, mask)
    torch.testing.assert_close(
        out, R.attention_slice(q, k, tok, heads, scale, mask), rtol=1e-12, atol=1e-14
    )
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = R.attention_slice(qq, kk, tok, heads, scale, mask)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, (qq, kk), grad)
    got = emu.attention_bwd(grad, q, k, tok, heads, scale, mask, lse)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)
    q32, k32 = q.float(), k.float()
    _close_2x(
        emu.attention(q32, k32, tok, heads, scale, mask)[0],
        R.attention_slice(q32, k32, tok, heads, scale, mask),
        out,
        1e-6,
    )


def test_emulated_attention_dk_row_chunks_are_deterministic(emu):
    """More SMs -> more row chunks for grad_k (partials + ordered reduction)."""
    g = _gen(5)
    q = torch.randn(2, 130, 2 * 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 20, 2 * 8, generator=g, dtype=torch.float64)
    tok = torch.tensor([3, 7])
    out, lse = emu.attention(q, k, tok, 2, 0.3)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    results = []
    for sms in (1, 16):
        emu.device(sms, 2, 227 * 1024)
        results.append(emu.attention_bwd(grad, q, k, tok, 2, 0.3, None, lse))
    emu.device(4, 2, 227 * 1024)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = torch.autograd.grad(R.attention_slice(qq, kk, tok, 2, 0.3), (qq, kk), grad)
    for got in results:
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_emulated_attention_backward_without_grad_k(emu):
    """A null grad_k runs only the dq kernel; grad_q is unchanged, bit for bit."""
    g = _gen(7)
    q = torch.randn(2, 70, 3 * 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 20, 3 * 8, generator=g, dtype=torch.float64)
    tok = torch.tensor([3, 7])
    out, lse = emu.attention(q, k, tok, 3, 0.3)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    both = emu.attention_bwd(grad, q, k, tok, 3, 0.3, None, lse)
    grad_q, grad_k = emu.attention_bwd(grad, q, k, tok, 3, 0.3, None, lse, need_grad_k=False)
    assert grad_k is None and torch.equal(grad_q, both[0])


def test_emulated_attention_16bit(emu):
    g = _gen(6)
    q = torch.randn(2, 40, 2 * 16, generator=g)
    k = torch.randn(1, 77, 2 * 16, generator=g)
    tok = torch.tensor([2, 5])
    ref = R.attention_slice(q.double(), k.double(), tok, 2, 0.25)
    for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
        out, _ = emu.attention(q.to(dtype), k.to(dtype), tok, 2, 0.25)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# --- soft_topk ---------------------------------------------------------------------

EXACT_FWD, EXACT_BWD, SINK_FWD, SINK_BWD = 0, 1, 2, 3
# Emulated devices: (SMs, blocks per SM, shared memory per block).
ONE_BLOCK = (4, 2, 227 * 1024)  # every row in one block
GROUPS = (4, 2, 16 * 1024)  # rows split over cooperating blocks, several rounds
GLOBAL = (2, 1, 16 * 1024)  # rows too large for the device's shared memory


def _topk_case(emu, solver, x, k, tau, normalize, iters, grad):
    minmax = normalize == "minmax"
    if solver == "exact":
        mask, stats = emu.topk(EXACT_FWD, x, k, tau, 0, minmax)
        gx, _ = emu.topk(EXACT_BWD, x, k, tau, 0, minmax, grad=grad, mask=mask, stats=stats)
    else:
        mask, stats = emu.topk(SINK_FWD, x, k, tau, iters, minmax)
        gx, _ = emu.topk(SINK_BWD, x, k, tau, iters, minmax, grad=grad, stats=stats)
    return mask, stats, gx


@pytest.mark.parametrize(
    "device", [ONE_BLOCK, GROUPS, GLOBAL], ids=["one-block", "groups", "global"]
)
@pytest.mark.parametrize(
    "solver,k,tau,normalize,scale,iters",
    [
        ("exact", 1229, 0.1, "minmax", 1.0, 0),
        ("exact", 1, 0.05, "none", 1.0, 0),
        ("sinkhorn", 1229, 0.1, "minmax", 1.0, 6),
        ("sinkhorn", 4096, 0.01, "none", 3.0, 4),
    ],
)
def test_emulated_soft_topk_float64(emu, device, solver, k, tau, normalize, scale, iters):
    emu.device(*device)
    try:
        kind = EXACT_FWD if solver == "exact" else SINK_FWD
        plan = emu.topk_plan(kind, torch.float64, 3, 4097, iters)
        if device is ONE_BLOCK:
            assert plan["P"] == 1
        elif device is GROUPS:
            assert plan["P"] > 1 and plan["smem"] and plan["groups"] < 3  # several rounds
        else:
            assert plan["P"] > 1 and not plan["smem"]
        g = _gen(7)
        x = torch.rand(3, 4097, generator=g, dtype=torch.float64) * scale
        grad = torch.randn(3, 4097, generator=g, dtype=torch.float64)
        mask, stats, gx = _topk_case(emu, solver, x, k, tau, normalize, iters, grad)
    finally:
        emu.device(*ONE_BLOCK)
    ref = R.soft_topk(x, k, tau, solver, iters, normalize)
    torch.testing.assert_close(mask, ref, rtol=0, atol=1e-12)
    xx = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(R.soft_topk(xx, k, tau, solver, iters, normalize), xx, grad)
    torch.testing.assert_close(gx, want, rtol=1e-8, atol=1e-11)
    if solver == "exact":
        y = R.minmax_normalize(x) if normalize == "minmax" else x
        torch.testing.assert_close(stats[:, 2], R.soft_topk_theta(y, k, tau), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_emulated_soft_topk_float32_within_2x_of_torch(emu, solver):
    g = _gen(8)
    x = torch.rand(3, 4097, generator=g, dtype=torch.float64)
    mask, _, _ = _topk_case(emu, solver, x.float(), 1229, 0.1, "minmax", 20, torch.zeros(3, 4097))
    ref64 = R.soft_topk(x, 1229, 0.1, solver, 20)
    _close_2x(mask, R.soft_topk(x.float(), 1229, 0.1, solver, 20), ref64, 1e-6, solver)


def test_emulated_sinkhorn_stats_follow_the_cpu_convention(emu):
    """(min, range) then the potentials (g0, g1) of every iteration, as
    csrc/cpu/soft_topk.cpp stores them (recomputed here in float64)."""
    g = _gen(9)
    x = torch.rand(2, 500, generator=g, dtype=torch.float64)
    k, tau, iters = 150, 0.05, 5
    _, stats = emu.topk(SINK_FWD, x, k, tau, iters, True)
    y = R.minmax_normalize(x)
    n = x.shape[1]
    lse0 = torch.logsumexp(-(y**2) / tau, -1)
    lse1 = torch.logsumexp(-((y - 1) ** 2) / tau, -1)
    g0 = math.log((n - k) / n) - lse0
    g1 = math.log(k / n) - lse1
    want = [x.amin(-1), x.amax(-1) - x.amin(-1), g0, g1]
    a = (2 * y - 1) / tau
    for _ in range(iters - 1):
        z = a + (g1 - g0)[:, None]
        log_s1 = torch.logsumexp(torch.nn.functional.logsigmoid(z), -1)
        log_s2 = torch.logsumexp(torch.nn.functional.logsigmoid(-z), -1)
        g0 = g0 + math.log(n - k) - log_s2
        g1 = g1 + math.log(k) - log_s1
        want += [g0, g1]
    torch.testing.assert_close(stats, torch.stack(want, -1), rtol=1e-12, atol=1e-10)
    _, stats = emu.topk(SINK_FWD, x, k, tau, iters, False)
    assert stats[:, :2].tolist() == [[0.0, 1.0]] * 2


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("tau", [1e-3, 0.1])
def test_emulated_soft_topk_edge_inputs_are_finite(emu, solver, tau):
    n, k = 300, 90
    inputs = {
        "constant": torch.full((2, n), 3.5),
        "zeros": torch.zeros(2, n),
        "huge": torch.rand(2, n, generator=_gen(10)) * 1e30,
        "ties": (torch.rand(2, n, generator=_gen(11)) * 4).floor(),
    }
    for name, x in inputs.items():
        for normalize in ("minmax", "none"):
            for dtype in (torch.float32, torch.float64):
                xd = x.to(dtype)
                grad = torch.randn(xd.shape, generator=_gen(12), dtype=dtype)
                mask, _, gx = _topk_case(emu, solver, xd, k, tau, normalize, 6, grad)
                what = f"{name} {normalize} {dtype}"
                assert torch.isfinite(mask).all() and torch.isfinite(gx).all(), what
                assert mask.min() >= 0 and mask.max() <= 1, what
                if solver == "exact":
                    torch.testing.assert_close(
                        mask.double().sum(-1),
                        torch.full((2,), float(k), dtype=torch.float64),
                        rtol=1e-4,
                        atol=0,
                    )
                else:
                    ref = R.soft_topk(xd.double(), k, tau, solver, 6, normalize)
                    torch.testing.assert_close(mask.double(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_emulated_soft_topk_16bit(emu, dtype, solver):
    x = torch.rand(2, 1000, generator=_gen(13)).to(dtype)
    grad = torch.randn(2, 1000, generator=_gen(14)).to(dtype)
    mask, _, gx = _topk_case(emu, solver, x, 300, 0.05, "minmax", 20, grad)
    ref = R.soft_topk(x.double(), 300, 0.05, solver, 20)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(mask.double(), ref, rtol=0, atol=tol)
    xx = x.double().requires_grad_()
    (want,) = torch.autograd.grad(R.soft_topk(xx, 300, 0.05, solver, 20), xx, grad.double())
    assert (gx.double() - want).abs().max() <= tol * 50 * want.abs().max()


@pytest.mark.parametrize("seed", [1, 2])
def test_emulated_kernels_under_other_schedules(emu, seed, monkeypatch):
    """Thread interleavings reshuffled: a missing barrier reads unwritten (NaN) memory."""
    monkeypatch.setenv("BIASMAP_EMU_SEED", str(seed))
    test_emulated_soft_topk_float64(emu, GROUPS, "sinkhorn", 1229, 0.1, "minmax", 1.0, 3)
    test_emulated_soft_topk_float64(emu, GROUPS, "exact", 1229, 0.1, "minmax", 1.0, 0)
    test_emulated_attention_slice(emu, ATTN_CASES[2])
    test_emulated_quantile_mask_16bit(emu)
    test_emulated_soft_iou(emu, 3, 4097)


# ---------------------------------------------------------------------------
# The torch-facing wrappers (slow: ~1-2 min per file against torch's headers)

SHIM = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in CUDA_SRC.glob("*.cu")))
def test_cuda_wrappers_compile_against_torch_headers(name, request, tmp_path):
    """nvcc -c of csrc/cuda/<name>.cu with torch's headers, as setup.py builds it on a
    GPU machine (linking needs libtorch_cuda, which a CPU wheel lacks). A CPU wheel
    ships no c10/cuda/impl/cuda_cmake_macros.h; a one-line shim stands in for it."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: run with -m slow")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text(SHIM)
    cmd = [
        nvcc,
        "-std=c++20",
        "-O0",
        "-arch=sm_80",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler",
        "-fPIC",
        f"-I{tmp_path / 'shim'}",
        *[f"-I{p}" for p in include_paths()],
        f"-I{ROOT / 'csrc'}",
        "-c",
        str(CUDA_SRC / f"{name}.cu"),
        "-o",
        str(tmp_path / f"{name}.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
