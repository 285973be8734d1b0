"""Plain-PyTorch re-implementation of the authors' soft top-k, as a benchmark baseline.

The BiasMap authors compute their differentiable top-k mask (`differentiable_topk_mask`
in run_gender.py of chakrabortyrajatsubhra/biasmap) as a full entropic optimal-transport
problem between the n scores and two anchors, 0 and 1 (DESIGN.md section 2, SoftTopK):

* cost C[b, i, j] = (x[b, i] - anchor_j)^2 for anchors (0, 1), a [B, n, 2] tensor;
* row marginals 1/n, column marginals ((n - k)/n, k/n), regulariser tau (their gamma);
* a fixed number of log-domain Sinkhorn iterations from zero potentials, each updating
  the column potential g (logsumexp over the n rows) and then the row potential f
  (logsumexp over the 2 columns);
* the mask is n times the plan's second column, and gradients come from autograd
  through the unrolled loop.

This file is written from that description to measure what the project's fused
solvers replace: it keeps the full [B, n, 2] plan and lets autograd store every
iteration. It is not used by the library. Unlike biasmap.ops.soft_topk it does no input
normalisation, as the authors' code passes raw maps.
"""

from __future__ import annotations

import math

import torch

AUTHORS_TAU = 0.01
AUTHORS_ITERS = 20
AUTHORS_KEEP_FRACTION = 0.3


def authors_topk_count(n: int, keep_fraction: float = AUTHORS_KEEP_FRACTION) -> int:
    """Entries kept, computed as the authors do: int(n * keep_fraction)."""
    return int(n * keep_fraction)


def authors_soft_topk(
    scores: torch.Tensor,
    k: int | None = None,
    tau: float = AUTHORS_TAU,
    iters: int = AUTHORS_ITERS,
) -> torch.Tensor:
    """Soft top-k mask of scores [B, ...] by unrolled log-Sinkhorn on the full plan.

    The trailing dimensions are flattened into n entries per batch row; k defaults to
    the authors' int(0.3 n). Returns a mask of scores' shape, roughly in [0, 1],
    summing to about k per row once the iterations have converged.
    """
    batch = scores.shape[0]
    flat = scores.reshape(batch, -1)
    n = flat.shape[1]
    keep = authors_topk_count(n) if k is None else k

    anchors = torch.tensor([0.0, 1.0], device=flat.device, dtype=flat.dtype)
    # Gibbs kernel in log space: -C / tau, with C the squared distance to each anchor.
    log_kernel = -((flat[:, :, None] - anchors) ** 2) / tau  # [B, n, 2]

    log_row_marginal = -math.log(n)  # every score carries mass 1/n
    log_col_marginal = torch.log(
        torch.tensor([(n - keep) / n, keep / n], device=flat.device, dtype=flat.dtype)
    )

    row_potential = torch.zeros_like(flat)  # f, [B, n]
    col_potential = flat.new_zeros(batch, 2)  # g, [B, 2]
    for _ in range(iters):
        # Column update first (as the authors do), then the rows.
        col_potential = log_col_marginal - torch.logsumexp(
            log_kernel + row_potential[:, :, None], dim=1
        )
        row_potential = log_row_marginal - torch.logsumexp(
            log_kernel + col_potential[:, None, :], dim=2
        )

    # The whole [B, n, 2] plan is exponentiated, as in the authors' code, so the
    # baseline pays what theirs pays; the mask is the mass sent to anchor 1, times n.
    plan = (log_kernel + row_potential[:, :, None] + col_potential[:, None, :]).exp()
    mask = n * plan[:, :, 1]
    return mask.reshape(scores.shape)
