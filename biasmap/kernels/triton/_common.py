"""Helpers shared by the Triton kernel modules: dtypes, block sizes, and autotuning that
degrades to one fixed configuration under the interpreter.

Conventions of the kernels:
- float arguments that need full precision (scale, tau, eps) are annotated `tl.float64` and
  widened in the kernel with `tl.full([], x, tl.float64)`: the GPU launcher then passes a double,
  and the interpreter, which passes the Python float through, keeps it as float64 too (a bare
  Python float would become float32 in both).
- integer arguments may be specialised to the constant 1 by triton, so kernels convert them
  with `tl.cast`, never with `.to()`.
- float32 tl.dot uses input_precision="ieee": the default TF32 would miss the reference by 1e-3.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import interpreting

# Decided once at import, as triton's own @jit does: the variable must be set before triton is
# imported for the interpreter to take over.
INTERPRET: bool = interpreting()

# Row kernels (soft top-k, SoftIoU, masks) give each program ROWS maps and sweep them in chunks
# of BLOCK <= MAX_ROW_BLOCK entries, with ROWS * BLOCK <= ROW_TILE. On a GPU a [ROWS, BLOCK]
# float64 tile must fit in registers; the interpreter runs programs one after another in
# Python, so it takes as much as numpy handles at once. Tests lower both to exercise
# multi-chunk sweeps with ragged tails and partially filled row blocks.
MAX_ROW_BLOCK: int = 16384 if INTERPRET else 2048
ROW_TILE: int = 65536 if INTERPRET else 2048


def device_fn(fn):
    """Decorator for helpers that kernels call: @triton.jit when compiling. Under the
    interpreter the plain function runs inside the calling kernel's already patched
    triton.language, which skips the ~5 ms the interpreter spends re-patching it on every call
    of a jit helper (it adds up to seconds in loops and across programs)."""
    return fn if INTERPRET else triton.jit(fn)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def widen(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and float32 for half types. The row kernels compute in float64, and the
    interpreter converts bfloat16 (kept as raw uint16) correctly only to and from float32; the
    maps are small, so widening on the host costs nothing that matters."""
    return (t.float() if t.dtype in HALF_DTYPES else t).contiguous()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (half types included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= n and >= lo (tl.arange needs powers of two; tl.dot needs >= 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def row_tile(n_rows: int, n: int, max_tile: int | None = None) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) for a row kernel over [n_rows, n]: BLOCK the chunk of a row,
    ROWS rows per program; max_tile lowers ROW_TILE for kernels with wider intermediates."""
    tile = min(ROW_TILE, max_tile or ROW_TILE)
    block = min(pow2(n), pow2(MAX_ROW_BLOCK), pow2(tile))
    rows = min(pow2(n_rows, lo=1), max(1, tile // block))
    return rows, block, 8 if rows * block >= 1024 else 4


class Tuned:
    """A kernel that is autotuned on a GPU and runs one fixed config under the interpreter.

    `triton.autotune` benchmarks on the device, which the interpreter cannot do. `tuned[grid]`
    mirrors `wrap_triton(kernel)[grid]` with `grid` a function of the meta-parameters; the
    tuned meta-parameters must not be passed by the caller. `tuned.pinned(meta)[grid]` skips
    autotuning and runs `meta` (with the interpreter's fixed config there).
    """

    def __init__(self, kernel, configs: list[triton.Config], key: list[str], fixed: dict):
        self.kernel = kernel
        self.fixed = fixed
        self.autotuned = None if INTERPRET else triton.autotune(configs=configs, key=key)(kernel)

    def __getitem__(self, grid):
        if self.autotuned is not None:
            return wrap_triton(self.autotuned)[grid]
        return self.pinned(self.fixed)[grid]

    def pinned(self, meta: dict) -> "_Pinned":
        return _Pinned(self.kernel, self.fixed if INTERPRET else meta)


class _Pinned:
    def __init__(self, kernel, meta: dict):
        self.kernel, self.meta = kernel, dict(meta)

    def __getitem__(self, grid):
        meta = self.meta

        def launch(*args, **kwargs):
            return wrap_triton(self.kernel)[grid({**kwargs, **meta})](*args, **kwargs, **meta)

        return launch
