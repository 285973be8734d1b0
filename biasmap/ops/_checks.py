"""Input validation shared by every backend of the public ops.

Each check raises a ValueError or TypeError that names the argument, what it was
and what is accepted, before any kernel runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SOLVERS = ("exact", "sinkhorn")
NORMALIZATIONS = ("minmax", "none")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t: object, ndim: int, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {_describe(t)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has unsupported dtype {t.dtype}; accepted: float16, bfloat16, float32, float64"
        )
    return t


_state = threading.local()


def value_checks_enabled() -> bool:
    return getattr(_state, "value_checks", True)


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within the block (this thread), the ops skip the checks that read tensor data back
    to the host (NaN and inf, index ranges, empty mask rows); shape, dtype and device checks stay.

    Each such check is a device sync on a GPU, and a sync cannot be captured in a CUDA
    graph. For loops over inputs already checked once, and for graph capture.
    """
    before = value_checks_enabled()
    _state.value_checks = False
    try:
        yield
    finally:
        _state.value_checks = before


def finite(name: str, t: torch.Tensor) -> None:
    """Raise a ValueError naming `name` when `t` holds NaN or an infinity: either turns the
    masks and IoUs computed from it into NaN or into a silent 0/1."""
    if not value_checks_enabled():
        return
    # One reduction without a [t.shape] bool temporary; the elementwise tests only run when
    # the sum is not finite (a NaN or inf entry, or a sum that overflows the dtype).
    if bool(torch.isfinite(t.sum())):
        return
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN ({_describe(t)}); attribution maps must be finite")
    if bool(torch.isinf(t).any()):
        raise ValueError(f"{name} contains inf ({_describe(t)}); attribution maps must be finite")


def same_device_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}")


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def attention_slice_args(q, k, token_index, num_heads, scale, key_mask, values=True) -> None:
    """Shape/dtype checks, and with `values` the checks that read tensor data back to the
    host (index range, empty mask rows, NaN): each of those is a device sync on a GPU."""
    tensor("q", q, 3)
    tensor("k", k, 3)
    same_device_dtype("q", q, "k", k)
    batch, _, inner = q.shape
    integer("num_heads", num_heads, 1, max(inner, 1))
    if inner % num_heads:
        raise ValueError(f"q's last dimension {inner} is not divisible by num_heads={num_heads}")
    if k.shape[-1] != inner:
        raise ValueError(f"k's last dimension must equal q's ({inner}), got {_describe(k)}")
    if k.shape[0] not in (1, batch):
        raise ValueError(f"k's batch must be 1 or q's batch {batch}, got {_describe(k)}")
    num_keys = k.shape[1]
    if num_keys < 1:
        raise ValueError(f"k must have at least one key, got {_describe(k)}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale
    ):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if not isinstance(token_index, torch.Tensor) or token_index.dim() != 1:
        raise ValueError("token_index must be a 1-D long tensor of key positions [T]")
    if token_index.dtype != torch.long:
        raise TypeError(f"token_index must have dtype torch.long, got {token_index.dtype}")
    if token_index.numel() == 0:
        raise ValueError("token_index is empty; give at least one key position")
    if key_mask is not None and (
        not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool
    ):
        raise TypeError("key_mask must be a bool tensor [B or 1, L] (True = key is kept)")
    if key_mask is not None:
        if (
            key_mask.dim() != 2
            or key_mask.shape[1] != num_keys
            or key_mask.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"key_mask must have shape [{batch} or 1, {num_keys}], got {tuple(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")
    if not values or not value_checks_enabled():
        return
    low, high = int(token_index.min()), int(token_index.max())
    if low < 0 or high >= num_keys:
        raise ValueError(
            f"token_index values must be in [0, {num_keys - 1}] (k has {num_keys} keys), "
            f"got values in [{low}, {high}]"
        )
    if key_mask is not None:
        empty = (~key_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"key_mask rows {empty} keep no key; every row needs a True entry")
    finite("q", q)
    finite("k", k)


def resize_aggregate_args(maps, size) -> tuple[int, int]:
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence) or len(maps) == 0:
        raise TypeError("maps must be a non-empty list of tensors [B, T, h_i, w_i]")
    first = tensor("maps[0]", maps[0], 4)
    for i, m in enumerate(maps[1:], start=1):
        tensor(f"maps[{i}]", m, 4)
        same_device_dtype("maps[0]", first, f"maps[{i}]", m)
        if m.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"every map must share [B, T] = {list(first.shape[:2])}, maps[{i}] has "
                f"{list(m.shape[:2])}"
            )
    for i, m in enumerate(maps):
        if m.shape[2] < 1 or m.shape[3] < 1:
            raise ValueError(f"maps[{i}] has an empty spatial size {tuple(m.shape)}")
        finite(f"maps[{i}]", m)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be a positive int or a pair (S_h, S_w), got {size!r}")
    return int(size[0]), int(size[1])


def map_batch(name: str, x) -> torch.Tensor:
    tensor(name, x, 2)
    if x.shape[1] < 2:
        raise ValueError(f"{name} must be [B, n] with n >= 2 entries per map, got {_describe(x)}")
    finite(name, x)
    return x


def soft_topk_args(x, k, tau, solver, iters, normalize) -> None:
    map_batch("x", x)
    n = x.shape[1]
    integer("k", k, 1, n - 1)
    positive_number("tau", tau)
    choice("solver", solver, SOLVERS)
    integer("iters", iters, 1, 1_000_000)
    choice("normalize", normalize, NORMALIZATIONS)


def soft_iou_args(a, b, eps) -> None:
    map_batch("a", a)
    map_batch("b", b)
    same_device_dtype("a", a, "b", b)
    same_shape("a", a, "b", b)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def quantile_mask_args(x, q) -> None:
    map_batch("x", x)
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1:
        raise ValueError(f"q must be a quantile in [0, 1], got {q!r}")


def mask_iou_args(a, b) -> None:
    for name, m in (("a", a), ("b", b)):
        tensor(name, m, 2, floating=False)
        if m.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool mask [B, n], got dtype {m.dtype}")
    same_shape("a", a, "b", b)
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
