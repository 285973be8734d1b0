// CPU kernels for biasmap::attention_slice_fwd / attention_slice_bwd.
//
// The reference materialises the [B, H, N, L] probabilities (tens of MB for one
// SD1.5 layer) and then reads T (=1-3) columns of them. Here every block of R
// query rows of one head computes its R x L scores in registers, reduces them to
// the row's log-sum-exp and the T wanted probabilities, and moves on: the only
// O(N) outputs are out [B, T, N] and lse [B, H, N]. The backward recomputes the
// probabilities from lse the same way and never stores them either.
//
// Speed comes from register-blocked micro-kernels over packed keys. For each
// (key batch, head) the keys are packed once, pre-multiplied by scale * log2(e)
// (scores in log2 units, so the softmax needs 2^x), as K^T [d, Lp] (Lp = L
// rounded up to the vector width): a tile of R rows x CT vectors of key columns
// accumulates in registers while streaming over d, CT vector loads and R
// broadcasts feeding R*CT FMAs per step. grad_q uses scale * K [L, dp] the same
// way over the key axis; grad_k keeps a tile of dK^T in registers over a block
// of query rows. Vectors are GCC/Clang vector extensions, and the task bodies
// are compiled three times on x86-64 (AVX-512, AVX2+FMA, baseline), the widest
// one the CPU supports picked at run time; BIASMAP_CPU_ISA=avx2|default caps it
// (to test the other paths). 2^x is a small rounding + polynomial one (1e-7
// relative) so that it vectorises; float64 uses std::exp2.
//
// Determinism: each task owns disjoint rows of out/lse/grad_q; grad_k partial
// sums are kept per (batch, head, row chunk) and reduced in a fixed order, with
// a task split that depends only on the shapes, not on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/attention_slice.h"

#if defined(__GNUC__) && !defined(__clang__)
// Passing vector-extension values between always_inline helpers triggers
// "ABI changed" notes that do not apply: nothing here crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define BIASMAP_X86_MULTIVERSION 1
#else
#define BIASMAP_X86_MULTIVERSION 0
#endif

namespace biasmap {
namespace {

namespace as = biasmap::attention_slice;

#define BM_INLINE inline __attribute__((always_inline))

template <class T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};

template <class V, class T>
BM_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
BM_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <class V, class T>
BM_INLINE V vbroadcast(T x) {
  return V{} + x;
}

// Micro-kernel shape: W lanes per vector, R query rows per tile, CT key-column
// vectors per score / grad_k tile, DT head-dim vectors per grad_q tile. R*CT
// accumulators + CT loads + 1 broadcast must fit the register file.
template <class T_, int W_, int R_, int CT_, int DT_>
struct Cfg {
  using T = T_;
  static constexpr int W = W_;
  static constexpr int R = R_;
  static constexpr int CT = CT_;
  static constexpr int DT = DT_;
  using V = typename VecOf<T, W>::type;
};

using CfgAvx512 = Cfg<float, 16, 4, 5, 5>;  // 32 zmm: 20 acc + 5 + 1
using CfgAvx2 = Cfg<float, 8, 4, 3, 3>;     // 16 ymm: 12 acc + 3 + 1
using CfgBase = Cfg<float, 4, 4, 3, 3>;     // 16 xmm (SSE2 / NEON)
using CfgF64 = Cfg<double, 4, 4, 2, 2>;     // correctness path for float64

// 2^x over a vector. The packed keys carry a factor log2(e), so scores are in
// log2 units and the exponential needs no multiply by log2(e) and no two-part
// ln2 reduction: x = n + f with n = round(x), |f| <= 1/2 exact, 2^f from a
// degree-6 polynomial (fitted here for minimum relative error on [-1/2, 1/2],
// 1e-7 max), 2^n put in the exponent bits. Inputs below -126 give 0, so -inf
// (masked keys) gives exactly 0. Callers pass x <= ~0 only (scores minus their
// max or their log-sum-exp), so there is no overflow branch.
template <class T, int W>
struct VExp2;

template <int W>
struct VExp2<float, W> {
  using V = typename VecOf<float, W>::type;
  using I = typename VecOf<int32_t, W>::type;
  static BM_INLINE V apply(V x) {
    const V lo = vbroadcast<V>(-126.0f);
    const V magic = vbroadcast<V>(12582912.0f);  // 1.5 * 2^23: t's low bits hold round(x)
    const V xc = x < lo ? lo : x;
    const V t = xc + magic;
    const V f = xc - (t - magic);
    const I bits = ((I)t - ((I)magic - 127)) << 23;  // (round(x) + 127) << 23 = 2^round(x)
    V p = vbroadcast<V>(1.5353362e-4f);
    p = p * f + 1.3398875e-3f;
    p = p * f + 9.6184369e-3f;
    p = p * f + 5.5503324e-2f;
    p = p * f + 2.4022648e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    return x < lo ? V{} : p * (V)bits;
  }
};

template <int W>
struct VExp2<double, W> {
  using V = typename VecOf<double, W>::type;
  static BM_INLINE V apply(const V& x) {
    V y;
    for (int i = 0; i < W; ++i) y[i] = std::exp2(x[i]);
    return y;
  }
};

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// Horizontal sum / max by halving (log2(W) vector steps instead of W scalar ones).
template <class T, int W>
BM_INLINE T hsum(const typename VecOf<T, W>::type& v) {
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    using H = typename VecOf<T, W / 2>::type;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum<T, W / 2>(lo + hi);
  }
}

template <class T, int W>
BM_INLINE T hmax(const typename VecOf<T, W>::type& v) {
  if constexpr (W == 2) {
    return v[0] > v[1] ? v[0] : v[1];
  } else {
    using H = typename VecOf<T, W / 2>::type;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hmax<T, W / 2>(lo > hi ? lo : hi);
  }
}

// ---------------------------------------------------------------------------
// Micro-kernels. Pointers are pre-offset to the tile's first column; `lp` is the
// row stride of packed K^T, scores, ds and dK^T; `ldq` the row stride of q.

// acc[r, :] = q[r, :d] . kt[:d, :] + bias for R rows and NC column vectors.
template <class C, int NC>
BM_INLINE void score_acc(const typename C::T* q, int64_t ldq, int64_t d, const typename C::T* kt,
                         int64_t lp, const typename C::T* bias, typename C::V (&acc)[C::R][NC]) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = V{};
  for (int64_t j = 0; j < d; ++j) {
    V kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = vload<V>(kt + j * lp + c * W);
    for (int r = 0; r < R; ++r) {
      const T a = q[r * ldq + j];
      for (int c = 0; c < NC; ++c) acc[r][c] += a * kv[c];
    }
  }
  for (int c = 0; c < NC; ++c) {
    const V b = vload<V>(bias + c * W);
    for (int r = 0; r < R; ++r) acc[r][c] += b;
  }
}

// s[r, :] = q[r, :d] . kt[:d, :] + bias for R rows and NC column vectors;
// with rmax, also folds the tile into the rows' running lane-wise maxima.
template <class C, int NC>
BM_INLINE void score_tile(const typename C::T* q, int64_t ldq, int64_t d,
                          const typename C::T* kt, int64_t lp, const typename C::T* bias,
                          typename C::T* s, typename C::V* rmax) {
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  V acc[R][NC];
  score_acc<C, NC>(q, ldq, d, kt, lp, bias, acc);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) vstore(s + r * lp + c * W, acc[r][c]);
  if (rmax) {
    for (int r = 0; r < R; ++r) {
      V m = rmax[r];
      for (int c = 0; c < NC; ++c) m = acc[r][c] > m ? acc[r][c] : m;
      rmax[r] = m;
    }
  }
}

// Whole rows in one tile (Lp = NC vectors, e.g. L = 77 with 16 lanes): the
// forward's softmax runs on the registers the scores were accumulated in.
// Writes 2^(s - max) to s (for the token columns), lse for the nr real rows,
// and adds their token probabilities to oacc[t * ostride + r].
template <class C, int NC>
BM_INLINE void fwd_rows_fused(const typename C::T* q, int64_t ldq, int64_t d,
                              const typename C::T* kt, int64_t lp, const typename C::T* bias,
                              typename C::T* s, int64_t nr, typename C::T* lse_out,
                              const int64_t* tok, int64_t ntok, typename C::T* oacc,
                              int64_t ostride) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  V acc[R][NC];
  score_acc<C, NC>(q, ldq, d, kt, lp, bias, acc);
  for (int r = 0; r < R; ++r) {
    if (r >= nr) break;
    V mv = acc[r][0];
    for (int c = 1; c < NC; ++c) mv = acc[r][c] > mv ? acc[r][c] : mv;
    const T m = hmax<T, W>(mv);
    V sv = V{};
    for (int c = 0; c < NC; ++c) {
      const V e = VExp2<T, W>::apply(acc[r][c] - m);
      vstore(s + r * lp + c * W, e);
      sv += e;
    }
    const T sum = hsum<T, W>(sv);
    // Back to natural-log units, rounded once.
    lse_out[r] =
        static_cast<T>((static_cast<double>(m) + std::log2(static_cast<double>(sum))) * kLn2);
    const T inv = T(1) / sum;
    for (int64_t t = 0; t < ntok; ++t) oacc[t * ostride + r] += s[r * lp + tok[t]] * inv;
  }
}

// The backward's counterpart: p = 2^(s - lse2[r]) from registers to s, then
// ds = p (G - D) to ds; rows r >= nr get ds = 0. g points at grad_out[b, 0, n].
template <class C, int NC, class S>
BM_INLINE void bwd_rows_fused(const typename C::T* q, int64_t ldq, int64_t d,
                              const typename C::T* kt, int64_t lp, const typename C::T* bias,
                              typename C::T* s, typename C::T* ds, int64_t nr,
                              const typename C::T* lse2, const int64_t* tok, int64_t ntok,
                              const S* g, int64_t g_stride) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  V acc[R][NC];
  score_acc<C, NC>(q, ldq, d, kt, lp, bias, acc);
  for (int r = 0; r < R; ++r) {
    T* pr = s + r * lp;
    T* dr = ds + r * lp;
    if (r >= nr) {
      for (int c = 0; c < NC; ++c) vstore(dr + c * W, V{});
      continue;
    }
    for (int c = 0; c < NC; ++c) {
      acc[r][c] = VExp2<T, W>::apply(acc[r][c] - lse2[r]);
      vstore(pr + c * W, acc[r][c]);
    }
    const T delta = as::row_delta(pr, tok, ntok, g + r, g_stride);
    for (int c = 0; c < NC; ++c) vstore(dr + c * W, acc[r][c] * -delta);
    as::row_add_token_grads(dr, pr, tok, ntok, g + r, g_stride);
  }
}

// Calls fwd_rows_fused / bwd_rows_fused with NC = nv (nv in [1, K]).
template <class C, int K>
BM_INLINE void fwd_rows_fused_n(int64_t nv, const typename C::T* q, int64_t ldq, int64_t d,
                                const typename C::T* kt, int64_t lp, const typename C::T* bias,
                                typename C::T* s, int64_t nr, typename C::T* lse_out,
                                const int64_t* tok, int64_t ntok, typename C::T* oacc,
                                int64_t ostride) {
  if constexpr (K > 0) {
    if (nv == K) {
      fwd_rows_fused<C, K>(q, ldq, d, kt, lp, bias, s, nr, lse_out, tok, ntok, oacc, ostride);
    } else {
      fwd_rows_fused_n<C, K - 1>(nv, q, ldq, d, kt, lp, bias, s, nr, lse_out, tok, ntok, oacc,
                                 ostride);
    }
  }
}

template <class C, int K, class S>
BM_INLINE void bwd_rows_fused_n(int64_t nv, const typename C::T* q, int64_t ldq, int64_t d,
                                const typename C::T* kt, int64_t lp, const typename C::T* bias,
                                typename C::T* s, typename C::T* ds, int64_t nr,
                                const typename C::T* lse2, const int64_t* tok, int64_t ntok,
                                const S* g, int64_t g_stride) {
  if constexpr (K > 0) {
    if (nv == K) {
      bwd_rows_fused<C, K, S>(q, ldq, d, kt, lp, bias, s, ds, nr, lse2, tok, ntok, g, g_stride);
    } else {
      bwd_rows_fused_n<C, K - 1, S>(nv, q, ldq, d, kt, lp, bias, s, ds, nr, lse2, tok, ntok, g,
                                    g_stride);
    }
  }
}

// dkt[:JT, :] += q[:rows, :JT]^T ds[:rows, :] for JT head-dim rows and NC
// key-column vectors: a JT x NC accumulator tile stays in registers over all
// the block's query rows (per row: NC loads, JT broadcasts, JT*NC FMAs), and
// dK^T memory is touched once per block.
template <class C, int JT, int NC>
BM_INLINE void dkt_tile(const typename C::T* q, int64_t ldq, int64_t rows, const typename C::T* ds,
                        int64_t lp, typename C::T* dkt) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W;
  V acc[JT][NC];
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < NC; ++c) acc[j][c] = V{};
  for (int64_t r = 0; r < rows; ++r) {
    V dv[NC];
    for (int c = 0; c < NC; ++c) dv[c] = vload<V>(ds + r * lp + c * W);
    for (int j = 0; j < JT; ++j) {
      const T a = q[r * ldq + j];
      for (int c = 0; c < NC; ++c) acc[j][c] += a * dv[c];
    }
  }
  for (int j = 0; j < JT; ++j) {
    for (int c = 0; c < NC; ++c) {
      vstore(dkt + j * lp + c * W, vload<V>(dkt + j * lp + c * W) + acc[j][c]);
    }
  }
}

// gq[r, :] = sum_{l < L} ds[r, l] kp[l, :] for ND head-dim vectors of type VV
// (WW lanes; kp is scale * K packed [L, dp], gq row stride dp).
template <class C, class VV, int WW, int ND>
BM_INLINE void gq_tile(const typename C::T* ds, int64_t lp, int64_t L, const typename C::T* kp,
                       int64_t dp, typename C::T* gq) {
  using T = typename C::T;
  constexpr int R = C::R;
  VV acc[R][ND];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < ND; ++c) acc[r][c] = VV{};
  for (int64_t l = 0; l < L; ++l) {
    VV kv[ND];
    for (int c = 0; c < ND; ++c) kv[c] = vload<VV>(kp + l * dp + c * WW);
    for (int r = 0; r < R; ++r) {
      const T a = ds[r * lp + l];
      for (int c = 0; c < ND; ++c) acc[r][c] += a * kv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < ND; ++c) vstore(gq + r * dp + c * WW, acc[r][c]);
}

// Full rows: tiles of CT (or DT) vectors, then one narrower tile for the rest.
template <class C, int K>
BM_INLINE void score_rest(int64_t rest, const typename C::T* q, int64_t ldq, int64_t d,
                          const typename C::T* kt, int64_t lp, const typename C::T* bias,
                          typename C::T* s, typename C::V* rmax) {
  if constexpr (K > 0) {
    if (rest == K) {
      score_tile<C, K>(q, ldq, d, kt, lp, bias, s, rmax);
    } else {
      score_rest<C, K - 1>(rest, q, ldq, d, kt, lp, bias, s, rmax);
    }
  }
}

// rmax (optional): R lane-wise maxima, updated.
template <class C>
BM_INLINE void score_rows(const typename C::T* q, int64_t ldq, int64_t d, const typename C::T* kt,
                          int64_t lp, const typename C::T* bias, typename C::T* s,
                          typename C::V* rmax) {
  constexpr int W = C::W, CT = C::CT;
  const int64_t nv = lp / W;
  int64_t v = 0;
  for (; v + CT <= nv; v += CT) {
    score_tile<C, CT>(q, ldq, d, kt + v * W, lp, bias + v * W, s + v * W, rmax);
  }
  score_rest<C, CT - 1>(nv - v, q, ldq, d, kt + v * W, lp, bias + v * W, s + v * W, rmax);
}

template <class C, int JT, int K>
BM_INLINE void dkt_rest(int64_t rest, const typename C::T* q, int64_t ldq, int64_t rows,
                        const typename C::T* ds, int64_t lp, typename C::T* dkt) {
  if constexpr (K > 0) {
    if (rest == K) {
      dkt_tile<C, JT, K>(q, ldq, rows, ds, lp, dkt);
    } else {
      dkt_rest<C, JT, K - 1>(rest, q, ldq, rows, ds, lp, dkt);
    }
  }
}

template <class C, int JT>
BM_INLINE void dkt_cols(const typename C::T* q, int64_t ldq, int64_t rows, const typename C::T* ds,
                        int64_t lp, typename C::T* dkt) {
  constexpr int W = C::W, CT = C::CT;
  const int64_t nv = lp / W;
  int64_t v = 0;
  for (; v + CT <= nv; v += CT) dkt_tile<C, JT, CT>(q, ldq, rows, ds + v * W, lp, dkt + v * W);
  dkt_rest<C, JT, CT - 1>(nv - v, q, ldq, rows, ds + v * W, lp, dkt + v * W);
}

template <class C, int JT>
BM_INLINE void dkt_jrest(int64_t rest, const typename C::T* q, int64_t ldq, int64_t rows,
                         const typename C::T* ds, int64_t lp, typename C::T* dkt) {
  if constexpr (JT > 0) {
    if (rest == JT) {
      dkt_cols<C, JT>(q, ldq, rows, ds, lp, dkt);
    } else {
      dkt_jrest<C, JT - 1>(rest, q, ldq, rows, ds, lp, dkt);
    }
  }
}

// dkt[:d, :] += q[:rows, :d]^T ds[:rows, :], in tiles of R head-dim rows.
template <class C>
BM_INLINE void dkt_rows(const typename C::T* q, int64_t ldq, int64_t d, int64_t rows,
                        const typename C::T* ds, int64_t lp, typename C::T* dkt) {
  constexpr int JT = C::R;
  int64_t j = 0;
  for (; j + JT <= d; j += JT) dkt_cols<C, JT>(q + j, ldq, rows, ds, lp, dkt + j * lp);
  dkt_jrest<C, JT - 1>(d - j, q + j, ldq, rows, ds, lp, dkt + j * lp);
}

template <class C, int K>
BM_INLINE void gq_rest(int64_t rest, const typename C::T* ds, int64_t lp, int64_t L,
                       const typename C::T* kp, int64_t dp, typename C::T* gq) {
  if constexpr (K > 0) {
    if (rest == K) {
      gq_tile<C, typename C::V, C::W, K>(ds, lp, L, kp, dp, gq);
    } else {
      gq_rest<C, K - 1>(rest, ds, lp, L, kp, dp, gq);
    }
  }
}

// dp is d rounded up to half a vector: a head dim of 2.5 vectors (d = 40 with
// 16 lanes) ends with one half-width vector instead of a padded full one.
template <class C>
BM_INLINE void gq_rows(const typename C::T* ds, int64_t lp, int64_t L, const typename C::T* kp,
                       int64_t dp, typename C::T* gq) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, DT = C::DT, WH = W / 2;
  using VH = typename VecOf<T, WH>::type;
  const int64_t nv = dp / W;
  int64_t v = 0;
  for (; v + DT <= nv; v += DT) gq_tile<C, V, W, DT>(ds, lp, L, kp + v * W, dp, gq + v * W);
  gq_rest<C, DT - 1>(nv - v, ds, lp, L, kp + v * W, dp, gq + v * W);
  if (dp % W != 0) gq_tile<C, VH, WH, 1>(ds, lp, L, kp + nv * W, dp, gq + nv * W);
}

// ---------------------------------------------------------------------------
// Tasks.

template <class S, class T>
struct Problem {
  const S* q;
  const T* kt;    // [Bk, H, d, lp], scale * K^T, zero padded
  const T* kp;    // [Bk, H, L, dp], scale * K, zero padded (backward only)
  const T* bias;  // [Bm, lp], 0 for kept keys, -inf for masked keys and padding
  const int64_t* tok;
  int64_t B, N, H, d, hd, L, lp, dp, ntok;
  bool k_batched, mask_batched;
  int64_t chunk;  // query rows per task
  // forward
  S* out;
  T* lse_out;
  // backward
  const S* gout;
  const T* lse;
  S* grad_q;
  T* dk_partial;  // [B, H, chunks, L, d]
  int64_t chunks;
  bool need_dk;
};

// Points qp at R rows of head h starting at row n (directly into q when the
// dtype matches and all rows exist, else into a zero-padded converted copy).
template <class C, class S>
BM_INLINE const typename C::T* q_rows(const Problem<S, typename C::T>& p, int64_t b, int64_t h,
                                      int64_t n, int64_t nr, typename C::T* qbuf,
                                      int64_t* ldq) {
  using T = typename C::T;
  const S* src = p.q + (b * p.N + n) * p.hd + h * p.d;
  if constexpr (std::is_same_v<S, T>) {
    if (nr == C::R) {
      *ldq = p.hd;
      return src;
    }
  }
  for (int64_t r = 0; r < C::R; ++r) {
    for (int64_t j = 0; j < p.d; ++j) {
      qbuf[r * p.d + j] = r < nr ? static_cast<T>(src[r * p.hd + j]) : T(0);
    }
  }
  *ldq = p.d;
  return qbuf;
}

// Forward for query rows [n0, n1) of batch b, all heads.
template <class C, class S>
BM_INLINE void fwd_task(const Problem<S, typename C::T>& p, int64_t b, int64_t n0, int64_t n1) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  const int64_t rows = n1 - n0, lp = p.lp, nv = lp / W;
  std::vector<T> buf(R * lp + R * p.d + p.ntok * rows, T(0));
  T* s = buf.data();
  T* qbuf = s + R * lp;
  T* oacc = qbuf + R * p.d;
  const T* bias = p.bias + (p.mask_batched ? b : 0) * lp;
  const int64_t bk = p.k_batched ? b : 0;
  for (int64_t h = 0; h < p.H; ++h) {
    const T* kt = p.kt + (bk * p.H + h) * p.d * lp;
    T* lse_row = p.lse_out + (b * p.H + h) * p.N;
    for (int64_t n = n0; n < n1; n += R) {
      const int64_t nr = std::min<int64_t>(R, n1 - n);
      int64_t ldq = 0;
      const T* qp = q_rows<C>(p, b, h, n, nr, qbuf, &ldq);
      // This head's slice of each query row is a few cache lines 1-2.5 KB
      // apart, a stream the hardware prefetchers follow poorly: ask for the
      // rows 8 tiles ahead (6-12% of the forward at N=4096, d=40).
      for (int64_t r = n + 8 * R; r < std::min(n1, n + 9 * R); ++r) {
        const char* src = reinterpret_cast<const char*>(p.q + (b * p.N + r) * p.hd + h * p.d);
        for (int64_t off = 0; off < p.d * static_cast<int64_t>(sizeof(S)); off += 64) {
          __builtin_prefetch(src + off);
        }
        __builtin_prefetch(src + p.d * sizeof(S) - 1);
      }
      if (nv <= C::CT) {
        fwd_rows_fused_n<C, C::CT>(nv, qp, ldq, p.d, kt, lp, bias, s, nr, lse_row + n, p.tok,
                                   p.ntok, oacc + (n - n0), rows);
        continue;
      }
      V rmax[R];
      for (int r = 0; r < R; ++r) rmax[r] = vbroadcast<V>(-std::numeric_limits<T>::infinity());
      score_rows<C>(qp, ldq, p.d, kt, lp, bias, s, rmax);
      for (int64_t r = 0; r < nr; ++r) {
        T* sr = s + r * lp;
        const T m = hmax<T, W>(rmax[r]);
        V sv = V{};
        for (int64_t v = 0; v < nv; ++v) {
          const V e = VExp2<T, W>::apply(vload<V>(sr + v * W) - m);
          vstore(sr + v * W, e);
          sv += e;
        }
        const T sum = hsum<T, W>(sv);
        // Back to natural-log units, rounded once.
        lse_row[n + r] =
            static_cast<T>((static_cast<double>(m) + std::log2(static_cast<double>(sum))) * kLn2);
        const T inv = T(1) / sum;
        for (int64_t t = 0; t < p.ntok; ++t) oacc[t * rows + (n - n0 + r)] += sr[p.tok[t]] * inv;
      }
    }
  }
  for (int64_t t = 0; t < p.ntok; ++t) {
    S* dst = p.out + (b * p.ntok + t) * p.N + n0;
    for (int64_t i = 0; i < rows; ++i) dst[i] = static_cast<S>(oacc[t * rows + i]);
  }
}

// The backward walks its rows in blocks of this many (a multiple of every R):
// scores and ds for the block (reading packed K^T), then grad_q (packed K),
// then grad_k (dK^T), so each phase streams one matrix instead of cycling all
// three through L1 every R rows. grad_k is summed in three levels (a register
// tile over a block, kBwdFlushBlocks blocks, the chunk), which keeps its float
// error ~ (32 + 16 + N/512) eps where one running sum would give ~N eps.
constexpr int64_t kBwdBlockRows = 32;
constexpr int64_t kBwdFlushBlocks = 16;

// Backward for query rows of chunk c of batch b, head h: writes grad_q for
// those rows and head, and this task's grad_k partial sum.
template <class C, class S>
BM_INLINE void bwd_task(const Problem<S, typename C::T>& p, int64_t b, int64_t h, int64_t c) {
  using T = typename C::T;
  using V = typename C::V;
  constexpr int W = C::W, R = C::R;
  constexpr int64_t RB = kBwdBlockRows;
  static_assert(RB % R == 0, "block rows must be a multiple of the tile rows");
  const int64_t lp = p.lp, dp = p.dp, d = p.d, L = p.L, nv = lp / W;
  const int64_t n0 = c * p.chunk, n1 = std::min(p.N, n0 + p.chunk);
  std::vector<T> buf(R * lp + RB * lp + RB * d + R * dp + 2 * d * lp, T(0));
  T* s = buf.data();     // [R, lp] one tile's scores, then probabilities
  T* ds = s + R * lp;    // [RB, lp] the block's dL/dscores
  T* qb = ds + RB * lp;  // [RB, d] the block's queries of head h, zero-padded
  T* gq = qb + RB * d;   // [R, dp]
  T* dkt = gq + R * dp;       // [d, lp] grad_k^T (unscaled) of up to kBwdFlushBlocks blocks
  T* dkt_sum = dkt + d * lp;  // [d, lp] ... of the whole chunk
  const T* bias = p.bias + (p.mask_batched ? b : 0) * lp;
  const int64_t bk = p.k_batched ? b : 0;
  const T* kt = p.kt + (bk * p.H + h) * d * lp;
  const T* kp = p.kp + (bk * p.H + h) * L * dp;
  const T* lse_row = p.lse + (b * p.H + h) * p.N;
  const S* g = p.gout + b * p.ntok * p.N;
  for (int64_t n = n0; n < n1; n += RB) {
    const int64_t nb = std::min(RB, n1 - n);
    const int64_t nbp = as::round_up(nb, R);
    for (int64_t r = 0; r < nbp; ++r) {
      const S* src = p.q + (b * p.N + n + r) * p.hd + h * d;
      for (int64_t j = 0; j < d; ++j) qb[r * d + j] = r < nb ? static_cast<T>(src[j]) : T(0);
    }
    for (int64_t r0 = 0; r0 < nbp; r0 += R) {
      if (nv <= C::CT) {
        T lse2[R];
        for (int r = 0; r < R; ++r) {
          lse2[r] = r0 + r < nb
                        ? static_cast<T>(static_cast<double>(lse_row[n + r0 + r]) * kLog2e)
                        : T(0);
        }
        bwd_rows_fused_n<C, C::CT, S>(nv, qb + r0 * d, d, d, kt, lp, bias, s, ds + r0 * lp,
                                      std::min<int64_t>(R, nb - r0), lse2, p.tok, p.ntok,
                                      g + n + r0, p.N);
        continue;
      }
      score_rows<C>(qb + r0 * d, d, d, kt, lp, bias, s, nullptr);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        T* pr = s + r * lp;
        T* dr = ds + row * lp;
        if (row >= nb) {
          std::fill(dr, dr + lp, T(0));
          continue;
        }
        const T lse2 = static_cast<T>(static_cast<double>(lse_row[n + row]) * kLog2e);
        for (int64_t v = 0; v < nv; ++v) {
          vstore(pr + v * W, VExp2<T, W>::apply(vload<V>(pr + v * W) - lse2));
        }
        const T delta = as::row_delta(pr, p.tok, p.ntok, g + n + row, p.N);
        for (int64_t v = 0; v < nv; ++v) vstore(dr + v * W, vload<V>(pr + v * W) * -delta);
        as::row_add_token_grads(dr, pr, p.tok, p.ntok, g + n + row, p.N);
      }
    }
    for (int64_t r0 = 0; r0 < nbp; r0 += R) {
      gq_rows<C>(ds + r0 * lp, lp, L, kp, dp, gq);
      for (int64_t r = 0; r < R && r0 + r < nb; ++r) {
        S* dst = p.grad_q + (b * p.N + n + r0 + r) * p.hd + h * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<S>(gq[r * dp + j]);
      }
    }
    if (!p.need_dk) continue;
    dkt_rows<C>(qb, d, d, nb, ds, lp, dkt);
    if (n + RB >= n1 || ((n - n0) / RB + 1) % kBwdFlushBlocks == 0) {
      for (int64_t i = 0; i < d * lp; i += W) {
        vstore(dkt_sum + i, vload<V>(dkt_sum + i) + vload<V>(dkt + i));
        vstore(dkt + i, V{});
      }
    }
  }
  if (!p.need_dk) return;
  T* part = p.dk_partial + ((b * p.H + h) * p.chunks + c) * L * d;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < d; ++j) part[l * d + j] = dkt_sum[j * lp + l];
}

// One out-of-line copy of each task per instruction set. The task bodies are
// always_inline, so they are compiled with the wrapper's target options.
#define BM_DEFINE_TASKS(SUFFIX, ATTR, CFG)                                                  \
  template <class S>                                                                       \
  ATTR __attribute__((noinline)) void fwd_task_##SUFFIX(const Problem<S, float>& p, int64_t b, \
                                                        int64_t n0, int64_t n1) {          \
    fwd_task<CFG, S>(p, b, n0, n1);                                                        \
  }                                                                                        \
  template <class S>                                                                       \
  ATTR __attribute__((noinline)) void bwd_task_##SUFFIX(const Problem<S, float>& p, int64_t b, \
                                                        int64_t h, int64_t c) {            \
    bwd_task<CFG, S>(p, b, h, c);                                                          \
  }

BM_DEFINE_TASKS(base, , CfgBase)
#if BIASMAP_X86_MULTIVERSION
BM_DEFINE_TASKS(avx2, __attribute__((target("avx2,fma"))), CfgAvx2)
BM_DEFINE_TASKS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))),
                CfgAvx512)
#endif

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa hardware_isa() {
#if BIASMAP_X86_MULTIVERSION
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

// The widest instruction set to use: the hardware's, capped by BIASMAP_CPU_ISA
// ("avx512", "avx2" or "default"), read on every call so tests can switch it.
Isa active_isa() {
  Isa isa = hardware_isa();
  if (const char* env = std::getenv("BIASMAP_CPU_ISA")) {
    const std::string cap(env);
    if (cap == "default" || cap == "base") {
      isa = Isa::kBase;
    } else if (cap == "avx2") {
      isa = std::min(isa, Isa::kAvx2);
    }
  }
  return isa;
}

template <class S, class T>
void run_fwd_task(Isa isa, const Problem<S, T>& p, int64_t b, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<T, double>) {
    (void)isa;
    fwd_task<CfgF64, S>(p, b, n0, n1);
  } else {
#if BIASMAP_X86_MULTIVERSION
    if (isa == Isa::kAvx512) return fwd_task_avx512<S>(p, b, n0, n1);
    if (isa == Isa::kAvx2) return fwd_task_avx2<S>(p, b, n0, n1);
#endif
    (void)isa;
    fwd_task_base<S>(p, b, n0, n1);
  }
}

template <class S, class T>
void run_bwd_task(Isa isa, const Problem<S, T>& p, int64_t b, int64_t h, int64_t c) {
  if constexpr (std::is_same_v<T, double>) {
    (void)isa;
    bwd_task<CfgF64, S>(p, b, h, c);
  } else {
#if BIASMAP_X86_MULTIVERSION
    if (isa == Isa::kAvx512) return bwd_task_avx512<S>(p, b, h, c);
    if (isa == Isa::kAvx2) return bwd_task_avx2<S>(p, b, h, c);
#endif
    (void)isa;
    bwd_task_base<S>(p, b, h, c);
  }
}

int vector_width(Isa isa, bool is_double) {
  if (is_double) return CfgF64::W;
  switch (isa) {
    case Isa::kAvx512:
      return CfgAvx512::W;
    case Isa::kAvx2:
      return CfgAvx2::W;
    default:
      return CfgBase::W;
  }
}

// ---------------------------------------------------------------------------
// Checks and packing.

struct Dims {
  int64_t B, N, hd, H, d, Bk, L, ntok, Bm;
};

Dims check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& token_index, int64_t num_heads,
                  const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, N, H*d], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must be [B or 1, L, H*d], got shape ", k.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(),
              " but q has dtype ", q.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && token_index.device().is_cpu(), op,
              ": q, k and token_index must be CPU tensors");
  Dims s{};
  s.B = q.size(0);
  s.N = q.size(1);
  s.hd = q.size(2);
  TORCH_CHECK(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(s.hd % num_heads == 0, op, ": q's last dimension ", s.hd,
              " is not divisible by num_heads=", num_heads);
  s.H = num_heads;
  s.d = s.hd / num_heads;
  s.Bk = k.size(0);
  s.L = k.size(1);
  TORCH_CHECK(k.size(2) == s.hd, op, ": k's last dimension must equal q's (", s.hd, "), got ",
              k.sizes());
  TORCH_CHECK(s.Bk == 1 || s.Bk == s.B, op, ": k's batch must be 1 or q's batch ", s.B,
              ", got ", s.Bk);
  TORCH_CHECK(s.L >= 1, op, ": k must have at least one key (L >= 1), got ", k.sizes());
  TORCH_CHECK(token_index.dim() == 1 && token_index.scalar_type() == at::kLong, op,
              ": token_index must be a 1-D long tensor [T], got ", token_index.scalar_type(), " ",
              token_index.sizes());
  s.ntok = token_index.size(0);
  s.Bm = 1;
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.device().is_cpu(), op, ": key_mask must be a CPU tensor");
    TORCH_CHECK(m.dim() == 2 && m.size(1) == s.L && (m.size(0) == 1 || m.size(0) == s.B), op,
                ": key_mask must be [", s.B, " or 1, ", s.L, "], got ", m.sizes());
    s.Bm = m.size(0);
  }
  return s;
}

void check_token_index(const char* op, const at::Tensor& tok, int64_t L) {
  const int64_t* t = tok.data_ptr<int64_t>();
  for (int64_t i = 0; i < tok.numel(); ++i) {
    TORCH_CHECK(t[i] >= 0 && t[i] < L, op, ": token_index[", i, "] = ", t[i],
                " is out of range; key positions must be in [0, ", L, ")");
  }
}

// [Bm, lp] additive bias: 0 for kept keys, -inf for masked keys and padding.
template <class T>
std::vector<T> make_bias(const char* op, const std::optional<at::Tensor>& key_mask, int64_t Bm,
                         int64_t L, int64_t lp) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> bias(Bm * lp, neg_inf);
  if (!key_mask.has_value()) {
    std::fill(bias.begin(), bias.begin() + L, T(0));
    return bias;
  }
  const at::Tensor m = key_mask->contiguous();
  const bool* mp = m.data_ptr<bool>();
  for (int64_t b = 0; b < Bm; ++b) {
    bool any = false;
    for (int64_t l = 0; l < L; ++l) {
      if (mp[b * L + l]) {
        bias[b * lp + l] = T(0);
        any = true;
      }
    }
    TORCH_CHECK(any, op, ": key_mask row ", b,
                " keeps no key; every row needs at least one True entry");
  }
  return bias;
}

// Keys packed per (key batch, head): kt = scale * log2(e) * K^T [d, lp] for the
// scores (in log2 units) and, if kp, kp = scale * K [L, dp] for grad_q. Each
// value is rounded once from double.
template <class S, class T>
void pack_keys(const S* k, const Dims& s, int64_t lp, int64_t dp, double scale, T* kt, T* kp) {
  const double score_scale = scale * kLog2e;
  for (int64_t bk = 0; bk < s.Bk; ++bk) {
    for (int64_t h = 0; h < s.H; ++h) {
      T* ktb = kt + (bk * s.H + h) * s.d * lp;
      T* kpb = kp ? kp + (bk * s.H + h) * s.L * dp : nullptr;
      for (int64_t l = 0; l < s.L; ++l) {
        const S* src = k + (bk * s.L + l) * s.hd + h * s.d;
        for (int64_t j = 0; j < s.d; ++j) {
          const double v = static_cast<double>(static_cast<T>(src[j]));
          ktb[j * lp + l] = static_cast<T>(score_scale * v);
          if (kpb) kpb[l * dp + j] = static_cast<T>(scale * v);
        }
      }
    }
  }
}

// Below this many multiply-adds a call runs on one thread (thread start-up
// costs more than it saves).
constexpr int64_t kSerialWork = int64_t(1) << 18;

// Runs fn(t) for t in [0, tasks) on ATen's threads, handing tasks out one at a
// time: on a shared machine one thread can lose its core for a while, and a
// static split would then leave the others waiting at the end. Which thread
// runs a task never changes its result, so outputs stay deterministic.
template <class F>
void run_tasks(int64_t tasks, int64_t work, const F& fn) {
  if (work < kSerialWork || tasks <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) fn(t);
    }
  });
}

// ---------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor> attention_slice_fwd(const at::Tensor& q_in,
                                                       const at::Tensor& k_in,
                                                       const at::Tensor& token_index_in,
                                                       int64_t num_heads, double scale,
                                                       const std::optional<at::Tensor>& key_mask) {
  constexpr const char* op = "attention_slice_fwd";
  const Dims s = check_inputs(op, q_in, k_in, token_index_in, num_heads, key_mask);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor tok = token_index_in.contiguous();
  check_token_index(op, tok, s.L);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.B, s.ntok, s.N}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, q.options().dtype(acc_dtype));
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using S = scalar_t;
    using T = at::opmath_type<S>;
    const int64_t W = vector_width(isa, std::is_same_v<T, double>);
    const int64_t lp = as::round_up(s.L, W);
    const std::vector<T> bias = make_bias<T>(op, key_mask, s.Bm, s.L, lp);
    if (s.B == 0 || s.N == 0) return;
    // Scratch goes through ATen's allocator so memory profilers see it.
    const auto acc_opts = q.options().dtype(acc_dtype);
    at::Tensor kt = at::zeros({s.Bk * s.H * s.d * lp}, acc_opts);
    pack_keys<S, T>(k.data_ptr<S>(), s, lp, 0, scale, kt.data_ptr<T>(), nullptr);

    Problem<S, T> p{};
    p.q = q.data_ptr<S>();
    p.kt = kt.data_ptr<T>();
    p.bias = bias.data();
    p.tok = tok.data_ptr<int64_t>();
    p.B = s.B, p.N = s.N, p.H = s.H, p.d = s.d, p.hd = s.hd, p.L = s.L, p.lp = lp;
    p.ntok = s.ntok;
    p.k_batched = s.Bk > 1, p.mask_batched = s.Bm > 1;
    p.out = out.data_ptr<S>();
    p.lse_out = lse.data_ptr<T>();
    // Row chunks of at most 256 (a multiple of R), at least 32 tasks overall when N allows.
    const int64_t want = std::max<int64_t>(1, (32 + s.B - 1) / s.B);
    p.chunk = std::clamp<int64_t>(as::round_up((s.N + want - 1) / want, 8), 8, 256);
    const int64_t per_b = (s.N + p.chunk - 1) / p.chunk;
    const int64_t tasks = s.B * per_b;
    const int64_t work = s.B * s.N * s.hd * lp;
    run_tasks(tasks, work, [&](int64_t t) {
      const int64_t b = t / per_b, n0 = (t % per_b) * p.chunk;
      run_fwd_task<S, T>(isa, p, b, n0, std::min(s.N, n0 + p.chunk));
    });
  });
  return {out, lse};
}

// need_grad_k = false skips grad_k's third of the backward (returning zeros)
// for callers whose keys need no gradient, such as guidance through the
// queries only.
std::tuple<at::Tensor, at::Tensor> attention_slice_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& token_index_in, int64_t num_heads, double scale,
    const std::optional<at::Tensor>& key_mask, const at::Tensor& lse_in, bool need_grad_k) {
  constexpr const char* op = "attention_slice_bwd";
  const Dims s = check_inputs(op, q_in, k_in, token_index_in, num_heads, key_mask);
  const auto acc_dtype = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == s.B &&
                  grad_out_in.size(1) == s.ntok && grad_out_in.size(2) == s.N,
              op, ": grad_out must be [", s.B, ", ", s.ntok, ", ", s.N, "], got ",
              grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.device().is_cpu(), op, ": grad_out must be a CPU tensor");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.H &&
                  lse_in.size(2) == s.N,
              op, ": lse must be [", s.B, ", ", s.H, ", ", s.N, "], got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == acc_dtype && lse_in.device().is_cpu(), op,
              ": lse must be a CPU ", acc_dtype, " tensor (the forward's), got ",
              lse_in.scalar_type());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor tok = token_index_in.contiguous();
  // Upstream gradients can be expanded (stride-0) views or another float dtype.
  const at::Tensor gout = grad_out_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  check_token_index(op, tok, s.L);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using S = scalar_t;
    using T = at::opmath_type<S>;
    const int64_t W = vector_width(isa, std::is_same_v<T, double>);
    const int64_t lp = as::round_up(s.L, W);
    const int64_t dp = as::round_up(s.d, W / 2);
    const std::vector<T> bias = make_bias<T>(op, key_mask, s.Bm, s.L, lp);
    if (s.B == 0 || s.N == 0) {
      grad_q.zero_();
      grad_k.zero_();
      return;
    }
    // Scratch goes through ATen's allocator so memory profilers see it.
    const auto acc_opts = q.options().dtype(acc_dtype);
    at::Tensor kt = at::zeros({s.Bk * s.H * s.d * lp}, acc_opts);
    at::Tensor kp = at::zeros({s.Bk * s.H * s.L * dp}, acc_opts);
    pack_keys<S, T>(k.data_ptr<S>(), s, lp, dp, scale, kt.data_ptr<T>(),
                    kp.data_ptr<T>());

    Problem<S, T> p{};
    p.q = q.data_ptr<S>();
    p.kt = kt.data_ptr<T>();
    p.kp = kp.data_ptr<T>();
    p.bias = bias.data();
    p.tok = tok.data_ptr<int64_t>();
    p.B = s.B, p.N = s.N, p.H = s.H, p.d = s.d, p.hd = s.hd, p.L = s.L, p.lp = lp, p.dp = dp;
    p.ntok = s.ntok;
    p.k_batched = s.Bk > 1, p.mask_batched = s.Bm > 1;
    p.gout = gout.data_ptr<S>();
    p.lse = lse.data_ptr<T>();
    p.grad_q = grad_q.data_ptr<S>();
    p.need_dk = need_grad_k;
    // Tasks are (b, h, row chunk); enough chunks for >= 32 tasks, each >= 128
    // rows. The split depends only on the shapes, so grad_k is reproducible.
    const int64_t bh = s.B * s.H;
    p.chunks = std::clamp<int64_t>((32 + bh - 1) / bh, 1, std::max<int64_t>(1, s.N / 128));
    p.chunk = as::round_up((s.N + p.chunks - 1) / p.chunks, 8);
    p.chunks = (s.N + p.chunk - 1) / p.chunk;
    at::Tensor partial_t = at::empty({need_grad_k ? bh * p.chunks * s.L * s.d : 0}, acc_opts);
    const T* partial = partial_t.data_ptr<T>();
    p.dk_partial = partial_t.data_ptr<T>();
    const int64_t tasks = bh * p.chunks;
    const int64_t work = 3 * s.B * s.N * s.hd * lp;
    run_tasks(tasks, work, [&](int64_t t) {
      const int64_t c = t % p.chunks, bh_i = t / p.chunks;
      run_bwd_task<S, T>(isa, p, bh_i / s.H, bh_i % s.H, c);
    });
    if (!need_grad_k) {
      grad_k.zero_();
      return;
    }
    // grad_k[bk, l, h*d + j] = scale * sum over (b of bk's group, chunk), in order.
    S* gk = grad_k.data_ptr<S>();
    const int64_t group = s.Bk == 1 ? s.B : 1;
    const T sc = static_cast<T>(scale);
    for (int64_t bk = 0; bk < s.Bk; ++bk) {
      for (int64_t l = 0; l < s.L; ++l) {
        for (int64_t h = 0; h < s.H; ++h) {
          for (int64_t j = 0; j < s.d; ++j) {
            T acc = T(0);
            for (int64_t b = bk * group; b < (bk + 1) * group; ++b) {
              for (int64_t c = 0; c < p.chunks; ++c) {
                acc += partial[(((b * s.H + h) * p.chunks + c) * s.L + l) * s.d + j];
              }
            }
            gk[(bk * s.L + l) * s.hd + h * s.d + j] = static_cast<S>(sc * acc);
          }
        }
      }
    }
  });
  return {grad_q, grad_k};
}

}  // namespace
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CPU, m) {
  m.impl("attention_slice_fwd", &biasmap::attention_slice_fwd);
  m.impl("attention_slice_bwd", &biasmap::attention_slice_bwd);
}
