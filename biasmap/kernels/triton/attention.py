"""Triton attention slice: concept columns of the per-head key softmax, summed over heads.

Shapes: q [B, N, H*d], k [Kb, L, H*d] (Kb = B or 1), token_index long [T], key_mask bool
[Mb, L] (Mb = B or 1, True = key takes part). out [B, T, N]; lse [B, H, N] (float32, float64
for float64 inputs) is saved for the backward.

Forward: one program per (query block, head, batch). It streams over the keys in
[BLOCK_N, BLOCK_L] score tiles with a running max and sum per query row (online softmax), so
[B, H, N, L] never exists; then the T concept columns are exp(s_tok - lse), written per head
to [B, H, T, N] and summed over the heads by torch (directly to out with one head).

Backward, with p = exp(s - lse), G_l = sum_t g_t [tok_t == l] and D = sum_t g_t p_tok_t:
ds = p (G - D), dq = scale ds @ k, dk = scale ds^T @ q.
- dq kernel: one program per (query block, head, batch) over all keys; it also stores D.
- dk kernel: one program per (key block, head, k batch, split), working with keys along rows
  (s^T = k q^T, dk += ds^T q); a split sums over a contiguous range of query blocks (of every
  batch when k is broadcast) into a float partial [SPLIT, Kb, L, H*d], and one torch sum over
  the splits finishes it: deterministic, no atomics, and enough programs to fill a GPU even
  though L (77) is small.
Score dots take the input dtype (tensor cores for half types); everything after the softmax
is float32 (float64 for float64 inputs), with float32 dots in IEEE precision, not TF32.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from biasmap.ops._autograd import register_attention_slice

from ._common import INTERPRET, Tuned, acc_dtype, device_fn, pow2, tl_acc

# A key block covers CLIP's 77 tokens in one step, unless the head is wide: a [BLOCK_D, BLOCK_L]
# key tile stays within KEY_TILE elements (32 KiB in float32) so that it fits in shared memory
# next to the query tile (SD1.5's d = 160 pads to 256 and gets 32 keys per step).
MAX_BLOCK_L = 128
BWD_MAX_BLOCK_L = 32
KEY_TILE = 8192
# float64 MMA cannot take an operand produced by another float64 MMA in registers (Triton
# 3.7 fails to lower it), so the float64 backward contracts ds by broadcast-and-sum
# (CHAIN_DOT=False) over 16 x 16 tiles.
FLOAT64_META = {"BLOCK_N": 16, "num_warps": 4}
# Heads wider than NARROW_HEAD (SD1.5's d = 80 and 160 pad to BLOCK_D = 128 and 256) run one
# fixed config instead of the autotuned ones: those hold a [64, BLOCK_D] query tile, which
# spills registers at these widths (fp32, d = 160: over 12 KB of stack per thread). A tile of
# QUERY_TILE elements and 8 warps keep each thread's share small.
NARROW_HEAD = 64
QUERY_TILE = 4096


def fixed_meta(block_d: int, float64_backward: bool) -> dict | None:
    """The meta-parameters a launch pins, or None where it autotunes (narrow heads)."""
    if float64_backward:
        return FLOAT64_META
    if block_d > NARROW_HEAD:
        return {"BLOCK_N": max(16, QUERY_TILE // block_d), "num_warps": 8}
    return None


def _launcher(tuned: Tuned, block_d: int, float64_backward: bool = False):
    meta = fixed_meta(block_d, float64_backward)
    return tuned if meta is None else tuned.pinned(meta)


@device_fn
def _key_tile_scores(
    q,
    k_base,
    mask_ptr,
    mask_row,
    l0,
    L,
    col,
    d_ok,
    stride_kl,
    sc,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Scaled scores [BLOCK_N, BLOCK_L] of the query tile q against keys l0 .. l0 + BLOCK_L of
    one head (columns col), which of those keys take part (in range and unmasked), and their
    positions."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    in_range = offs_l < L
    keep = in_range
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + mask_row + offs_l, mask=in_range, other=0) != 0)
    kt = tl.load(
        k_base + offs_l[None, :] * stride_kl + col[:, None],
        mask=d_ok[:, None] & in_range[None, :],
        other=0.0,
    )
    s = tl.dot(q, kt, input_precision="ieee").to(ACC) * sc
    return s, keep, offs_l


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    tok_ptr,
    mask_ptr,
    probs_ptr,
    lse_ptr,
    scale: tl.float64,
    N,
    L,
    T,
    HEAD_DIM,
    stride_qb,
    stride_qn,
    stride_kb,
    stride_kl,
    stride_mb,
    stride_pb,
    stride_ph,
    stride_pt,
    stride_lb,
    stride_lh,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tok = tl.load(tok_ptr + offs_t, mask=t_ok, other=0)
    mask_row = b * stride_mb
    tok_keep = t_ok
    if HAS_MASK:
        tok_keep = tok_keep & (tl.load(mask_ptr + mask_row + tok, mask=t_ok, other=0) != 0)
    sc = tl.full([], scale, tl.float64).to(ACC)
    k_base = k_ptr + b * stride_kb
    col = h * HEAD_DIM + offs_d
    q = tl.load(
        q_ptr + b * stride_qb + offs_n[:, None] * stride_qn + col[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    for l0 in range(0, L, BLOCK_L):
        s, keep, _ = _key_tile_scores(
            q, k_base, mask_ptr, mask_row, l0, L, col, d_ok, stride_kl, sc, HAS_MASK, ACC, BLOCK_L
        )
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row whose keys so far are all masked keeps max -inf; shifting by 0 instead
        # avoids exp(-inf - -inf) = nan while its sum stays 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_n, lse, mask=n_ok)
    kt_tok = tl.load(
        k_base + tok[None, :] * stride_kl + col[:, None],
        mask=d_ok[:, None] & t_ok[None, :],
        other=0.0,
    )
    s_tok = tl.dot(q, kt_tok, input_precision="ieee").to(ACC) * sc
    probs = tl.where(tok_keep[None, :], tl.exp(s_tok - lse[:, None]), 0.0)
    tl.store(
        probs_ptr + b * stride_pb + h * stride_ph + offs_t[None, :] * stride_pt + offs_n[:, None],
        probs,
        mask=n_ok[:, None] & t_ok[None, :],
    )


@triton.jit
def _attn_bwd_dq_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    tok_ptr,
    mask_ptr,
    lse_ptr,
    dq_ptr,
    delta_ptr,
    scale: tl.float64,
    N,
    L,
    T,
    HEAD_DIM,
    stride_gb,
    stride_gt,
    stride_qb,
    stride_qn,
    stride_kb,
    stride_kl,
    stride_mb,
    stride_lb,
    stride_lh,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    CHAIN_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tok = tl.load(tok_ptr + offs_t, mask=t_ok, other=0)
    mask_row = b * stride_mb
    tok_keep = t_ok
    if HAS_MASK:
        tok_keep = tok_keep & (tl.load(mask_ptr + mask_row + tok, mask=t_ok, other=0) != 0)
    sc = tl.full([], scale, tl.float64).to(ACC)
    col = h * HEAD_DIM + offs_d
    k_base = k_ptr + b * stride_kb
    q = tl.load(
        q_ptr + b * stride_qb + offs_n[:, None] * stride_qn + col[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse_off = b * stride_lb + h * stride_lh + offs_n
    lse = tl.load(lse_ptr + lse_off, mask=n_ok, other=0.0)
    g = tl.load(
        g_ptr + b * stride_gb + offs_t[None, :] * stride_gt + offs_n[:, None],
        mask=n_ok[:, None] & t_ok[None, :],
        other=0.0,
    ).to(ACC)
    kt_tok = tl.load(
        k_base + tok[None, :] * stride_kl + col[:, None],
        mask=d_ok[:, None] & t_ok[None, :],
        other=0.0,
    )
    s_tok = tl.dot(q, kt_tok, input_precision="ieee").to(ACC) * sc
    p_tok = tl.where(tok_keep[None, :], tl.exp(s_tok - lse[:, None]), 0.0)
    delta = tl.sum(g * p_tok, axis=1)
    tl.store(delta_ptr + lse_off, delta, mask=n_ok)
    dq = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        s, keep, offs_l = _key_tile_scores(
            q, k_base, mask_ptr, mask_row, l0, L, col, d_ok, stride_kl, sc, HAS_MASK, ACC, BLOCK_L
        )
        # The same keys again as [BLOCK_L, BLOCK_D] (a cache hit) rather than tl.trans(kt):
        # the transposed register operand does not lower for float64 MMA.
        k_blk = tl.load(
            k_base + offs_l[:, None] * stride_kl + col[None, :],
            mask=(offs_l < L)[:, None] & d_ok[None, :],
            other=0.0,
        )
        p = tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)
        # G scatters the T upstream columns onto their key positions (repeats add up).
        onehot = ((tok[:, None] == offs_l[None, :]) & t_ok[:, None]).to(ACC)
        big_g = tl.dot(g, onehot, input_precision="ieee")
        ds = p * (big_g - delta[:, None])
        if CHAIN_DOT:
            dq += tl.dot(ds, k_blk.to(ACC), input_precision="ieee")
        else:
            dq += tl.sum(ds[:, :, None] * k_blk.to(ACC)[None, :, :], axis=1)
    tl.store(
        dq_ptr + b * stride_qb + offs_n[:, None] * stride_qn + col[None, :],
        dq * sc,
        mask=n_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _attn_bwd_dk_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    tok_ptr,
    mask_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    scale: tl.float64,
    N,
    L,
    T,
    HEAD_DIM,
    REPS,
    SPLIT,
    stride_gb,
    stride_gt,
    stride_qb,
    stride_qn,
    stride_kb,
    stride_kl,
    stride_mb,
    stride_lb,
    stride_lh,
    stride_ds,
    stride_db,
    stride_dl,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    CHAIN_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    pid_s = tl.program_id(2)
    kb = pid_s // SPLIT
    split = pid_s % SPLIT
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_in = offs_l < L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tok = tl.load(tok_ptr + offs_t, mask=t_ok, other=0)
    # Keys along rows throughout (s^T = k q^T, dk += ds^T q), so no tl.trans is needed: a
    # transposed register operand does not lower for float64 MMA.
    onehot_t = ((offs_l[:, None] == tok[None, :]) & t_ok[None, :]).to(ACC)  # [BLOCK_L, BLOCK_T]
    sc = tl.full([], scale, tl.float64).to(ACC)
    col = h * HEAD_DIM + offs_d
    k_blk = tl.load(
        k_ptr + kb.to(tl.int64) * stride_kb + offs_l[:, None] * stride_kl + col[None, :],
        mask=l_in[:, None] & d_ok[None, :],
        other=0.0,
    )
    n_blocks = (N + BLOCK_N - 1) // BLOCK_N
    total = REPS * n_blocks
    per_split = (total + SPLIT - 1) // SPLIT
    j_start = split * per_split
    j_end = tl.minimum(j_start + per_split, total)
    dk = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC)
    for j in range(j_start, j_end):
        # k batch kb serves query batch b: itself when k has one row per batch, every batch
        # (REPS = B) when k is broadcast.
        b = (kb * REPS + j // n_blocks).to(tl.int64)
        offs_n = (j % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        keep = l_in
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * stride_mb + offs_l, mask=l_in, other=0) != 0)
        q_rows = q_ptr + b * stride_qb + offs_n * stride_qn
        q = tl.load(q_rows[:, None] + col[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        q_t = tl.load(q_rows[None, :] + col[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        lse_off = b * stride_lb + h * stride_lh + offs_n
        lse = tl.load(lse_ptr + lse_off, mask=n_ok, other=0.0)
        delta = tl.load(delta_ptr + lse_off, mask=n_ok, other=0.0)
        g_t = tl.load(
            g_ptr + b * stride_gb + offs_t[:, None] * stride_gt + offs_n[None, :],
            mask=t_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(ACC)
        s_t = tl.dot(k_blk, q_t, input_precision="ieee").to(ACC) * sc  # [BLOCK_L, BLOCK_N]
        p_t = tl.where(keep[:, None] & n_ok[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        big_g_t = tl.dot(onehot_t, g_t, input_precision="ieee")
        ds_t = p_t * (big_g_t - delta[None, :])
        if CHAIN_DOT:
            dk += tl.dot(ds_t, q.to(ACC), input_precision="ieee")
        else:
            dk += tl.sum(ds_t[:, :, None] * q.to(ACC)[None, :, :], axis=1)
    tl.store(
        dk_ptr
        + split.to(tl.int64) * stride_ds
        + kb.to(tl.int64) * stride_db
        + offs_l[:, None] * stride_dl
        + col[None, :],
        dk * sc,
        mask=l_in[:, None] & d_ok[None, :],
    )


def _configs(block_warps, stages):
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=stages) for bn, w in block_warps]


# Autotuned on a GPU (keyed on the shape; the key loop rarely runs more than once, so it is not
# software-pipelined); the interpreter runs the fixed config, large so that few programs run:
# there every op of every program costs ~0.3 ms of Python, whatever its size.
# Two configs each: every config is a compile of several seconds per shape on first use, and
# SD1.5 has three head widths. On an H100 (fp32, SD1.5 shapes) the winners among BLOCK_N in
# {32, 64, 128} x warps in {4, 8} were 64 x 8 (forward) and 64 x 4 (dq).
_fwd = Tuned(
    _attn_fwd_kernel,
    _configs(((64, 4), (64, 8)), 1),
    key=["N", "L", "T", "HEAD_DIM"],
    fixed={"BLOCK_N": 1024},
)
_bwd_dq = Tuned(
    _attn_bwd_dq_kernel,
    _configs(((32, 4), (64, 4)), 1),
    key=["N", "L", "T", "HEAD_DIM"],
    fixed={"BLOCK_N": 1024},
)
_bwd_dk = Tuned(
    _attn_bwd_dk_kernel,
    _configs(((32, 4), (64, 4)), 2),
    key=["N", "L", "T", "HEAD_DIM", "REPS", "SPLIT"],
    fixed={"BLOCK_N": 1024},
)


def dk_splits(k_batch: int, reps: int, n_query: int, heads: int, key_blocks: int, device) -> int:
    """How many query ranges the dk reduction is split into: enough programs for about two per
    SM, never more ranges than 16-query blocks. One under the interpreter (nothing to fill)."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = k_batch * heads * key_blocks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), reps * triton.cdiv(n_query, 16)))


def _blocks(k: torch.Tensor, n_tokens: int, head_dim: int, backward: bool = False) -> dict:
    block_l = min(pow2(k.shape[1]), MAX_BLOCK_L, max(16, KEY_TILE // pow2(head_dim)))
    if backward:
        # The backward holds four [BLOCK_N, BLOCK_L] tiles (s, p, G, ds) and the keys twice:
        # 32 keys per step is where ptxas stops spilling (fp16, d = 40, sm_90).
        block_l = min(block_l, BWD_MAX_BLOCK_L)
    if k.dtype == torch.float64:
        block_l = 16  # float64 contracts ds through [*, BLOCK_L, *] broadcasts, not tl.dot
    return {
        "BLOCK_L": block_l,
        "BLOCK_D": pow2(head_dim),
        "BLOCK_T": pow2(n_tokens),
    }


def _mask_args(key_mask: torch.Tensor | None, placeholder: torch.Tensor):
    if key_mask is None:
        return placeholder, 0, False
    key_mask = key_mask.contiguous()
    return key_mask, (0 if key_mask.shape[0] == 1 else key_mask.stride(0)), True


@triton_op("biasmap_triton::attention_slice_fwd", mutates_args=())
def attention_slice_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    token_index: torch.Tensor,
    num_heads: int,
    scale: float,
    key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, H*d], k [B|1, L, H*d], token_index long [T], key_mask bool [B|1, L] or None
    -> (out [B, T, N] in q's dtype, lse [B, H, N] in the accumulation dtype)."""
    q, k, token_index = q.contiguous(), k.contiguous(), token_index.contiguous()
    batch, n_query, inner = q.shape
    head_dim = inner // num_heads
    n_tokens = token_index.shape[0]
    out = q.new_empty(batch, n_tokens, n_query)
    lse = q.new_empty(batch, num_heads, n_query, dtype=acc_dtype(q.dtype))
    mask, stride_mb, has_mask = _mask_args(key_mask, token_index)
    # One program per (query block, head, image), so that small layers still fill the GPU.
    # With several heads each program writes its head's token probabilities to
    # [B, H, T, N] and a torch sum adds the heads (deterministic, unlike atomics); a single
    # head writes out directly.
    if num_heads == 1:
        probs = out.unsqueeze(1)
    else:
        probs = q.new_empty(batch, num_heads, n_tokens, n_query, dtype=acc_dtype(q.dtype))
    blocks = _blocks(k, n_tokens, head_dim)
    forward = _launcher(_fwd, blocks["BLOCK_D"])
    forward[lambda meta: (triton.cdiv(n_query, meta["BLOCK_N"]), num_heads, batch)](
        q,
        k,
        token_index,
        mask,
        probs,
        lse,
        float(scale),
        n_query,
        k.shape[1],
        n_tokens,
        head_dim,
        q.stride(0),
        q.stride(1),
        0 if k.shape[0] == 1 else k.stride(0),
        k.stride(1),
        stride_mb,
        probs.stride(0),
        probs.stride(1),
        probs.stride(2),
        lse.stride(0),
        lse.stride(1),
        HAS_MASK=has_mask,
        ACC=tl_acc(q.dtype),
        **blocks,
    )
    if num_heads > 1:
        out.copy_(probs.sum(dim=1))
    return out, lse


@triton_op("biasmap_triton::attention_slice_bwd", mutates_args=())
def attention_slice_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    token_index: torch.Tensor,
    num_heads: int,
    scale: float,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    need_grad_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [B, T, N] and the forward's inputs and lse -> (grad_q like q, grad_k like k).

    need_grad_k=False skips the dk kernel and returns grad_k as zeros.
    """
    grad_out = grad_out.contiguous()
    q, k, token_index, lse = (
        q.contiguous(),
        k.contiguous(),
        token_index.contiguous(),
        lse.contiguous(),
    )
    batch, n_query, inner = q.shape
    k_batch, n_keys, _ = k.shape
    head_dim = inner // num_heads
    n_tokens = token_index.shape[0]
    acc = acc_dtype(q.dtype)
    mask, stride_mb, has_mask = _mask_args(key_mask, token_index)
    blocks = _blocks(k, n_tokens, head_dim, backward=True)
    grad_q = torch.empty_like(q)
    delta = torch.empty_like(lse)
    stride_kb = 0 if k_batch == 1 else k.stride(0)
    wide = q.dtype == torch.float64
    common = dict(HAS_MASK=has_mask, ACC=tl_acc(q.dtype), CHAIN_DOT=not wide, **blocks)
    # float64 (tests, gradcheck) skips autotuning: small fixed tiles keep its broadcast
    # contractions in registers.
    dq_kernel = _launcher(_bwd_dq, blocks["BLOCK_D"], wide)
    dk_kernel = _launcher(_bwd_dk, blocks["BLOCK_D"], wide)
    dq_kernel[lambda meta: (triton.cdiv(n_query, meta["BLOCK_N"]), num_heads, batch)](
        grad_out,
        q,
        k,
        token_index,
        mask,
        lse,
        grad_q,
        delta,
        float(scale),
        n_query,
        n_keys,
        n_tokens,
        head_dim,
        grad_out.stride(0),
        grad_out.stride(1),
        q.stride(0),
        q.stride(1),
        stride_kb,
        k.stride(1),
        stride_mb,
        lse.stride(0),
        lse.stride(1),
        **common,
    )
    if not need_grad_k:
        return grad_q, torch.zeros_like(k)
    reps = batch // k_batch
    key_blocks = triton.cdiv(n_keys, blocks["BLOCK_L"])
    split = dk_splits(k_batch, reps, n_query, num_heads, key_blocks, q.device)
    # One split writes the gradient directly; several write float partials summed below.
    if split == 1:
        partial = q.new_empty(k_batch, n_keys, inner, dtype=acc)
        stride_split = 0
    else:
        partial = q.new_empty(split, k_batch, n_keys, inner, dtype=acc)
        stride_split = partial.stride(0)
    dk_kernel[lambda meta: (key_blocks, num_heads, k_batch * split)](
        grad_out,
        q,
        k,
        token_index,
        mask,
        lse,
        delta,
        partial,
        float(scale),
        n_query,
        n_keys,
        n_tokens,
        head_dim,
        reps,
        split,
        grad_out.stride(0),
        grad_out.stride(1),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        stride_mb,
        lse.stride(0),
        lse.stride(1),
        stride_split,
        partial.stride(-3),
        partial.stride(-2),
        **common,
    )
    grad_k = partial.sum(dim=0) if split > 1 else partial
    return grad_q, grad_k.to(k.dtype)


register_attention_slice("biasmap_triton::attention_slice_fwd", attention_slice_bwd)
