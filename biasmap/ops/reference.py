"""Pure-PyTorch references for every biasmap op.

These functions are the specification and the test oracle: they are written for
clarity, not speed, and differentiate through plain autograd. The fused kernels in
csrc/ and biasmap/kernels/ must match them (DESIGN.md section 2).

No input validation happens here; the public wrappers in biasmap.ops check inputs
before any backend runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Below this range a map is treated as constant: min-max normalisation gives zeros
# (a uniform soft mask) instead of dividing by ~0.
MINMAX_EPS = 1e-12
# The exact solver stops once |sum(mask) - k| <= EXACT_REL_TOL * k.
EXACT_REL_TOL = 1e-6
EXACT_MAX_ITERS = 200


def attention_slice(
    q: torch.Tensor,
    k: torch.Tensor,
    token_index: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concept columns of the per-head key softmax, summed over heads.

    q: [B, N, H*d] queries; k: [B or 1, L, H*d] keys; token_index: long [T];
    key_mask: bool [B or 1, L], True where the key takes part in the softmax.
    Returns [B, T, N]: sum_h softmax_l(q_h k_h^T * scale)[:, token_index].
    Materialises [B, H, N, L]; that is what the kernels avoid.
    """
    batch, n_query, inner = q.shape
    head_dim = inner // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    qh = q.reshape(batch, n_query, num_heads, head_dim).transpose(1, 2)
    kh = k.reshape(k.shape[0], k.shape[1], num_heads, head_dim).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, N, L]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return probs[..., token_index].sum(dim=1).transpose(1, 2)


def resize_aggregate(
    maps: Sequence[torch.Tensor], size: tuple[int, int], per_map: bool = False
) -> torch.Tensor:
    """Sum of bilinear resizes (align_corners=False, as F.interpolate) to `size`.

    maps: M tensors [B, T, h_i, w_i]. Returns [B, T, S_h, S_w], or
    [B, M, T, S_h, S_w] with per_map=True.
    """
    resized = [
        F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) for m in maps
    ]
    if per_map:
        return torch.stack(resized, dim=1)
    return torch.stack(resized, dim=0).sum(dim=0)


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-row (x - min) / (max - min) of x [B, n]; rows with range <= MINMAX_EPS become 0."""
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    flat = span <= MINMAX_EPS
    return torch.where(flat, torch.zeros_like(x), (x - lo) / torch.where(flat, 1.0, span))


def _normalized(x: torch.Tensor, normalize: str) -> torch.Tensor:
    return minmax_normalize(x) if normalize == "minmax" else x


def soft_topk_theta(x: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """theta [B] solving sum_i sigmoid((2 x_i - theta) / tau) = k for normalised x [B, n].

    Bisection in float64 on the bracket where every mask entry is >= or <= k/n; no
    gradient. The bracket halves each step, so the result is exact to float64.
    """
    xd = x.detach().double()
    n = x.shape[-1]
    logit = math.log(k / (n - k))
    lo = 2 * xd.amin(dim=-1) - tau * logit
    hi = 2 * xd.amax(dim=-1) - tau * logit
    for _ in range(EXACT_MAX_ITERS):
        mid = 0.5 * (lo + hi)
        total = torch.sigmoid((2 * xd - mid[:, None]) / tau).sum(dim=-1)
        above = total > k  # theta too small: mask too large
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
        if bool(((hi - lo) <= 1e-15 * (1 + hi.abs())).all()):
            break
    return 0.5 * (lo + hi)


def soft_topk_exact(x: torch.Tensor, k: int, tau: float, normalize: str = "minmax") -> torch.Tensor:
    """Converged two-anchor entropic-OT top-k mask of x [B, n] -> [B, n] in [0, 1].

    mask = sigmoid((2 y - theta) / tau) with y the normalised x and theta such that
    the mask sums to k. theta is found without gradient; one Newton correction
    evaluated at the solution carries the implicit-function gradient
    dtheta/dy_j = 2 w_j / sum(w), w = mask (1 - mask), so autograd reproduces the
    closed-form backward independently of any kernel.
    """
    y = _normalized(x, normalize)
    theta0 = soft_topk_theta(y, k, tau).to(y.dtype)[:, None]
    mask0 = torch.sigmoid((2 * y - theta0) / tau)
    w = (mask0 * (1 - mask0)).detach()
    residual = mask0.sum(dim=-1, keepdim=True) - k
    theta = theta0 + tau * residual / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.sigmoid((2 * y - theta) / tau)


def soft_topk_sinkhorn(
    x: torch.Tensor, k: int, tau: float, iters: int = 20, normalize: str = "minmax"
) -> torch.Tensor:
    """`iters` log-domain Sinkhorn iterations of the two-anchor top-k OT, x [B, n] -> [B, n].

    The authors' loop: cost C_i0 = y_i^2, C_i1 = (y_i - 1)^2 (y the normalised x), row
    marginals 1/n, column marginals [(n-k)/n, k/n], scaled potentials f = g = 0 at the
    start; each iteration updates g (columns) then f (rows); the mask is n * plan[:, 1].

    With two columns this collapses exactly: after every row update the mask is
    sigmoid(a_i + d) with a_i = (2 y_i - 1)/tau and d = g_1 - g_0, and one iteration
    maps d to d + logit(k/n) - logit(mean_i sigmoid(a_i + d)). The first iteration,
    from f = 0, gives d = logit(k/n) - LSE_i(-(y_i-1)^2/tau) + LSE_i(-y_i^2/tau); it is
    taken in float64 because those scores reach -1e11 for raw inputs. Logits of means
    are log-sum-exps of log-sigmoids, so nothing saturates to inf at small tau.
    """
    y = _normalized(x, normalize)
    n = y.shape[-1]
    logit_kn = math.log(k / (n - k))
    yd = y.double()
    lse_0 = torch.logsumexp(-(yd**2) / tau, dim=-1)
    lse_1 = torch.logsumexp(-((yd - 1) ** 2) / tau, dim=-1)
    first = lse_0 - lse_1
    d = (logit_kn + first).to(y.dtype)[:, None]
    a = (2 * y - 1) / tau
    for _ in range(iters - 1):
        z = a + d
        # log sigmoid(z) = -softplus(-z); F.logsigmoid is ~1000x slower with 2 threads here.
        log_mask = -F.softplus(-z)
        log_rest = -F.softplus(z)
        logit_mean = torch.logsumexp(log_mask, dim=-1, keepdim=True) - torch.logsumexp(
            log_rest, dim=-1, keepdim=True
        )
        d = d + logit_kn - logit_mean
    return torch.sigmoid(a + d)


def soft_topk(
    x: torch.Tensor,
    k: int,
    tau: float,
    solver: str = "exact",
    iters: int = 20,
    normalize: str = "minmax",
) -> torch.Tensor:
    """Soft top-k mask of x [B, n] -> [B, n] with the chosen solver ("exact" or "sinkhorn")."""
    if solver == "exact":
        return soft_topk_exact(x, k, tau, normalize)
    return soft_topk_sinkhorn(x, k, tau, iters, normalize)


def soft_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SoftIoU of a, b [B, n] -> [B]: sum(ab) / (sum a + sum b - sum(ab) + eps)."""
    inter = (a * b).sum(dim=-1)
    return inter / (a.sum(dim=-1) + b.sum(dim=-1) - inter + eps)


def entanglement_energy(
    ma: torch.Tensor,
    mb: torch.Tensor,
    k: int,
    tau: float,
    solver: str = "exact",
    iters: int = 20,
    normalize: str = "minmax",
    eps: float = 1e-8,
) -> torch.Tensor:
    """soft_iou(soft_topk(ma), soft_topk(mb)) for maps ma, mb [B, n] -> [B]."""
    return soft_iou(
        soft_topk(ma, k, tau, solver, iters, normalize),
        soft_topk(mb, k, tau, solver, iters, normalize),
        eps,
    )


def quantile_mask(x: torch.Tensor, q: float, inclusive: bool = True) -> torch.Tensor:
    """Hard mask of x [B, n] -> bool [B, n]: x >= quantile_q(x) (x > it when not inclusive).

    The quantile is numpy's default ("linear") per row, as np.percentile.
    """
    # torch.quantile takes float32/float64 only; half values are exact in float32.
    values = x if x.dtype in (torch.float32, torch.float64) else x.float()
    threshold = torch.quantile(values, q, dim=-1, keepdim=True, interpolation="linear")
    return x >= threshold if inclusive else x > threshold


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks a, b [B, n] -> float32 [B]; 0 where the union is empty."""
    inter = (a & b).sum(dim=-1).float()
    union = (a | b).sum(dim=-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
