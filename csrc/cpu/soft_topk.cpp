// CPU kernels of the soft top-k family: soft_topk_{exact,sinkhorn}_{fwd,bwd}
// (schemas and output layouts in csrc/ops.cpp; semantics in DESIGN.md section 2
// and biasmap/ops/reference.py; the reduction of both solvers to a scalar
// threshold is explained in csrc/common/soft_topk.h).
//
// Layout: every row is independent and processed by one thread. A row goes
// through a few O(n) passes; each pass is a separate small function whose loop
// gcc vectorises (fastmath::exp is branch free) and that is compiled for
// AVX2+FMA and baseline x86-64 (BIASMAP_CPU_CLONES). Passes work on float
// (float, half, bfloat16 inputs; half/bfloat16 rows are converted to a float
// scratch row first) or double, and accumulate their sums in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/fastmath.h"
#include "common/soft_topk.h"

namespace biasmap {
namespace {

namespace stk = ::biasmap::soft_topk;
namespace fm = ::biasmap::fastmath;

// ---------------------------------------------------------------------------
// Vectorised passes. y_i = (x_i - shift) * scale is recomputed in every pass
// rather than stored: it costs two flops and saves a row of memory traffic.
//
// Long sums are blocked: kBlock entries are summed in the compute type T (each
// SIMD lane adds kBlock / width values), the block sums in double. Widening
// every element to double instead costs about a third of a pass. Sums of
// sigmoids use the small side: sigmoid(d) = [d >= 0] + s with s = -sigmoid(-d)
// or sigmoid(d), |s| <= 1/2 and tiny for saturated entries, so the float
// partial sums stay small and S = count + sum(s) keeps ~1e-7 relative
// precision (plain float sums of k ones and fractions lose ~1e-5).
// ---------------------------------------------------------------------------

constexpr int64_t kBlock = 512;

struct Sums2 {
  double a, b;
};
struct Sums4 {
  double a, b, c, d;
};

template <typename T>
BIASMAP_FORCEINLINE void scan_impl(const T* __restrict x, int64_t n, T* mn_out, T* mx_out,
                                   double* sum_out) {
  T mn = x[0], mx = x[0];
  double sum = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T part = T(0);
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : part)
    for (int64_t i = b; i < e; ++i) {
      mn = x[i] < mn ? x[i] : mn;
      mx = x[i] > mx ? x[i] : mx;
      part += x[i];
    }
    sum += static_cast<double>(part);
  }
  *mn_out = mn;
  *mx_out = mx;
  *sum_out = sum;
}

// min |x| and min |x - 1|: the maxima of the Sinkhorn log-kernels S_i0, S_i1
// without normalisation, needed to shift their logsumexps.
template <typename T>
BIASMAP_FORCEINLINE void scan_anchor_impl(const T* __restrict x, int64_t n, T* a0_out, T* a1_out) {
  T a0 = std::numeric_limits<T>::infinity(), a1 = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : a0, a1)
  for (int64_t i = 0; i < n; ++i) {
    const T v0 = fm::select(x[i] < T(0), -x[i], x[i]);
    const T d1 = x[i] - T(1);
    const T v1 = fm::select(d1 < T(0), -d1, d1);
    a0 = v0 < a0 ? v0 : a0;
    a1 = v1 < a1 ? v1 : a1;
  }
  *a0_out = a0;
  *a1_out = a1;
}

// Sigmoid of d split for the passes, from one exp of -|d| (no overflow, and
// the small side keeps full relative precision): pos = sigmoid(d),
// neg = sigmoid(-d), small = pos - [d >= 0] (the signed small side),
// deriv = sigmoid'(d) = pos * neg, diff = neg - pos = 1 - 2 pos.
template <typename T>
struct Sig {
  T pos, neg, small, deriv, diff;
  int32_t nonneg;
};

template <typename T>
BIASMAP_FORCEINLINE Sig<T> sig(T d) {
  const bool nonneg = d >= T(0);
  const T e = fm::exp(fm::select(nonneg, -d, d));
  const T r = T(1) / (T(1) + e);
  const T er = e * r;  // the smaller of sigmoid(d), sigmoid(-d)
  Sig<T> s;
  s.pos = fm::select(nonneg, r, er);
  s.neg = fm::select(nonneg, er, r);
  s.small = fm::select(nonneg, -er, er);
  s.deriv = er * r;
  const T big_minus_small = r - er;
  s.diff = fm::select(nonneg, -big_minus_small, big_minus_small);
  s.nonneg = static_cast<int32_t>(nonneg);
  return s;
}

// (S, W, V) = (sum s_i, sum s_i', sum s_i' (1 - 2 s_i)) with s_i = sigmoid(d_i):
// the solver's S, -S' / beta and S'' / beta^2; optionally stores s_i.
template <typename T>
BIASMAP_FORCEINLINE Sums4 exact_eval_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                          stk::Affine<T> af, T* __restrict out) {
  double s_tot = 0.0, w_tot = 0.0, v_tot = 0.0;
  int64_t cnt_tot = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T s = T(0), w = T(0), v = T(0);
    int32_t cnt = 0;
    if (out == nullptr) {
#pragma omp simd reduction(+ : s, w, v, cnt)
      for (int64_t i = b; i < e; ++i) {
        const Sig<T> g = sig(stk::affine_eval(af, (x[i] - shift) * scale));
        s += g.small;
        cnt += g.nonneg;
        w += g.deriv;
        v += g.deriv * g.diff;
      }
    } else {
#pragma omp simd reduction(+ : s, w, v, cnt)
      for (int64_t i = b; i < e; ++i) {
        const Sig<T> g = sig(stk::affine_eval(af, (x[i] - shift) * scale));
        out[i] = g.pos;
        s += g.small;
        cnt += g.nonneg;
        w += g.deriv;
        v += g.deriv * g.diff;
      }
    }
    s_tot += static_cast<double>(s);
    cnt_tot += cnt;
    w_tot += static_cast<double>(w);
    v_tot += static_cast<double>(v);
  }
  return {static_cast<double>(cnt_tot) + s_tot, w_tot, v_tot, 0.0};
}

template <typename T>
BIASMAP_FORCEINLINE void mask_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                   stk::Affine<T> af, T* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = sig(stk::affine_eval(af, (x[i] - shift) * scale)).pos;
}

// First-order move of a stored mask to a threshold shifted by a tiny amount:
// m(d - a) = m - a m (1 - m) + O(a^2).
template <typename T>
BIASMAP_FORCEINLINE void mask_nudge_impl(T* __restrict m, int64_t n, T a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) m[i] = m[i] - a * m[i] * (T(1) - m[i]);
}

// exp(S_i0 - max S_0) and exp(S_i1 - max S_1), with S_i0 = -y_i^2 / tau,
// S_i1 = -(y_i - 1)^2 / tau and a0 = min |y|, a1 = min |y - 1| (so the exponents
// are <= 0). The differences of squares are factored so that large |y| keeps
// its precision.
template <typename T>
BIASMAP_FORCEINLINE void kernel_terms(T y, T inv_tau, T a0, T a1, T* e0, T* e1) {
  const T u0 = fm::select(y < T(0), -y, y);
  const T ym = y - T(1);
  const T u1 = fm::select(ym < T(0), -ym, ym);
  *e0 = fm::exp(-(u0 - a0) * (u0 + a0) * inv_tau);
  *e1 = fm::exp(-(u1 - a1) * (u1 + a1) * inv_tau);
}

// Sinkhorn first iteration (f = 0): sum_i exp(S_i0 - max S_0), same for S_1.
template <typename T>
BIASMAP_FORCEINLINE Sums2 sk_first_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                        T inv_tau, T a0, T a1) {
  double s0_tot = 0.0, s1_tot = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T s0 = T(0), s1 = T(0);
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t i = b; i < e; ++i) {
      T e0, e1;
      kernel_terms((x[i] - shift) * scale, inv_tau, a0, a1, &e0, &e1);
      s0 += e0;
      s1 += e1;
    }
    s0_tot += static_cast<double>(s0);
    s1_tot += static_cast<double>(s1);
  }
  return {s0_tot, s1_tot};
}

// Sinkhorn iteration sums A = sum sigmoid(d_i), B = sum sigmoid(-d_i).
// mode 0: plain (A = count + small, B = (n - count) - small). mode 1 (every
// d_i < 0, A could underflow): A is returned as A e^{-d_max} = sum exp(beta
// (y_i - y_max)) sigmoid(-d_i). mode 2 (every d_i > 0): B is returned as
// B e^{d_min} = sum exp(beta (y_min - y_i)) sigmoid(d_i). Modes 1-2 only occur
// in the first iterations on extreme inputs, so they are not blocked.
template <typename T>
BIASMAP_FORCEINLINE Sums2 sk_eval_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                       stk::Affine<T> af, int mode, T y_ref) {
  if (mode == 0) {
    double s_tot = 0.0;
    int64_t cnt_tot = 0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      T s = T(0);
      int32_t cnt = 0;
#pragma omp simd reduction(+ : s, cnt)
      for (int64_t i = b; i < e; ++i) {
        const Sig<T> g = sig(stk::affine_eval(af, (x[i] - shift) * scale));
        s += g.small;
        cnt += g.nonneg;
      }
      s_tot += static_cast<double>(s);
      cnt_tot += cnt;
    }
    return {static_cast<double>(cnt_tot) + s_tot, static_cast<double>(n - cnt_tot) - s_tot};
  }
  double sa = 0.0, sb = 0.0;
  const bool shift_a = mode == 1;
  const T sign = shift_a ? T(1) : T(-1);
#pragma omp simd reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const T y = (x[i] - shift) * scale;
    const Sig<T> g = sig(stk::affine_eval(af, y));
    const T rel = fm::exp(sign * af.beta * (y - y_ref));
    sa += static_cast<double>(fm::select(shift_a, rel * g.neg, g.pos));
    sb += static_cast<double>(fm::select(shift_a, g.neg, rel * g.pos));
  }
  return {sa, sb};
}

// Sinkhorn backward, start: cbar_i = g_i sigmoid'(d_i) at delta_T; returns
// (sum_i cbar_i, sum exp(S_i0 - max), sum exp(S_i1 - max)) -- the last two to
// recompute the softmaxes of the first iteration exactly as the forward did.
template <typename T>
BIASMAP_FORCEINLINE Sums4 sk_bwd_start_impl(const T* __restrict x, const T* __restrict g,
                                            int64_t n, T shift, T scale, stk::Affine<T> af,
                                            T inv_tau, T a0, T a1, T* __restrict cbar) {
  double sg_tot = 0.0, s0_tot = 0.0, s1_tot = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T sg = T(0), s0 = T(0), s1 = T(0);
#pragma omp simd reduction(+ : sg, s0, s1)
    for (int64_t i = b; i < e; ++i) {
      const T y = (x[i] - shift) * scale;
      const T c = g[i] * sig(stk::affine_eval(af, y)).deriv;
      cbar[i] = c;
      sg += c;
      T e0, e1;
      kernel_terms(y, inv_tau, a0, a1, &e0, &e1);
      s0 += e0;
      s1 += e1;
    }
    sg_tot += static_cast<double>(sg);
    s0_tot += static_cast<double>(s0);
    s1_tot += static_cast<double>(s1);
  }
  return {sg_tot, s0_tot, s1_tot, 0.0};
}

// Sinkhorn backward through delta_{s+1} = delta_s + L - log A_s + log B_s:
// d delta_{s+1} / d c_i = -w_i (1/A + 1/B), with w_i = sigmoid'(d_i) and c_i
// the part of d_i that depends on y_i. With the same shifts as sk_eval
// (A' = A e^{-sA}, B' = B e^{-sB}), w_i / A = sigmoid(-d_i) pa_i / A' where
// pa_i = sigmoid(d_i) e^{-sA} is O(1): no 0 * inf in the saturated regimes.
// cbar_i -= ka * sigmoid(-d_i) pa_i + kb * sigmoid(d_i) qb_i with
// ka = dbar / A', kb = dbar / B'. Returns (sum sigmoid(-d) pa, sum sigmoid(d) qb),
// i.e. (W / A', W / B') * (A', B'), for the delta adjoint.
template <typename T>
BIASMAP_FORCEINLINE Sums2 sk_bwd_iter_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                           stk::Affine<T> af, int mode, T y_ref, T ka, T kb,
                                           T* __restrict cbar) {
  if (mode == 0) {
    const T kab = ka + kb;
    double w_tot = 0.0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      T w = T(0);
#pragma omp simd reduction(+ : w)
      for (int64_t i = b; i < e; ++i) {
        const T dw = sig(stk::affine_eval(af, (x[i] - shift) * scale)).deriv;
        cbar[i] -= kab * dw;
        w += dw;
      }
      w_tot += static_cast<double>(w);
    }
    return {w_tot, w_tot};
  }
  double ua = 0.0, ub = 0.0;
  const bool shift_a = mode == 1;
  const T sign = shift_a ? T(1) : T(-1);
#pragma omp simd reduction(+ : ua, ub)
  for (int64_t i = 0; i < n; ++i) {
    const T y = (x[i] - shift) * scale;
    const Sig<T> g = sig(stk::affine_eval(af, y));
    const T rel = fm::exp(sign * af.beta * (y - y_ref));
    const T ta = fm::select(shift_a, g.neg * (rel * g.neg), g.deriv);
    const T tb = fm::select(shift_a, g.deriv, g.pos * (rel * g.pos));
    cbar[i] -= ka * ta + kb * tb;
    ua += static_cast<double>(ta);
    ub += static_cast<double>(tb);
  }
  return {ua, ub};
}

// Sinkhorn backward, end: ybar_i = beta cbar_i + dbar_1 d delta_1 / d y_i with
// d delta_1 / d y_i = p0_i (-2 y_i / tau) + p1_i (2 (y_i - 1) / tau), p0, p1 the
// softmaxes of S_0, S_1 over i (inv0, inv1 = 1 / their normalisers). Writes
// ybar and returns (sum ybar, sum ybar * y) for the min-max backward.
template <typename T>
BIASMAP_FORCEINLINE Sums2 sk_bwd_end_impl(const T* __restrict x, int64_t n, T shift, T scale,
                                          T inv_tau, T a0, T a1, T inv0, T inv1, T beta, T dbar1,
                                          const T* __restrict cbar, T* __restrict ybar) {
  double sy_tot = 0.0, syy_tot = 0.0;
  const T coef = dbar1 * beta;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T sy = T(0), syy = T(0);
#pragma omp simd reduction(+ : sy, syy)
    for (int64_t i = b; i < e; ++i) {
      const T y = (x[i] - shift) * scale;
      T e0, e1;
      kernel_terms(y, inv_tau, a0, a1, &e0, &e1);
      const T v = beta * cbar[i] + coef * (e1 * inv1 * (y - T(1)) - e0 * inv0 * y);
      ybar[i] = v;
      sy += v;
      syy += v * y;
    }
    sy_tot += static_cast<double>(sy);
    syy_tot += static_cast<double>(syy);
  }
  return {sy_tot, syy_tot};
}

// Exact backward sums: with w = m (1 - m): (sum w, sum w g, sum w y, sum w g y).
template <typename T>
BIASMAP_FORCEINLINE Sums4 ex_bwd_sums_impl(const T* __restrict x, const T* __restrict m,
                                           const T* __restrict g, int64_t n, T shift, T scale) {
  double sw_tot = 0.0, swg_tot = 0.0, swy_tot = 0.0, swgy_tot = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T sw = T(0), swg = T(0), swy = T(0), swgy = T(0);
#pragma omp simd reduction(+ : sw, swg, swy, swgy)
    for (int64_t i = b; i < e; ++i) {
      const T y = (x[i] - shift) * scale;
      const T w = m[i] * (T(1) - m[i]);
      const T wg = w * g[i];
      sw += w;
      swg += wg;
      swy += w * y;
      swgy += wg * y;
    }
    sw_tot += static_cast<double>(sw);
    swg_tot += static_cast<double>(swg);
    swy_tot += static_cast<double>(swy);
    swgy_tot += static_cast<double>(swgy);
  }
  return {sw_tot, swg_tot, swy_tot, swgy_tot};
}

// dL/dx_i = ybar_i * scale + [x_i == min] gmin + [x_i == max] gmax with
// ybar_i = beta w_i (g_i - mu) (exact solver).
template <typename T>
BIASMAP_FORCEINLINE void ex_bwd_write_impl(const T* __restrict x, const T* __restrict m,
                                           const T* __restrict g, int64_t n, T coef, T mu, T mn,
                                           T mx, T gmin, T gmax, T* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T w = m[i] * (T(1) - m[i]);
    T v = coef * w * (g[i] - mu);
    v += fm::select(x[i] == mn, gmin, T(0));
    v += fm::select(x[i] == mx, gmax, T(0));
    out[i] = v;
  }
}

template <typename T>
BIASMAP_FORCEINLINE void minmax_bwd_write_impl(const T* __restrict x, const T* __restrict ybar,
                                               int64_t n, T scale, T mn, T mx, T gmin, T gmax,
                                               T* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T v = ybar[i] * scale;
    v += fm::select(x[i] == mn, gmin, T(0));
    v += fm::select(x[i] == mx, gmax, T(0));
    out[i] = v;
  }
}

template <typename T>
BIASMAP_FORCEINLINE void count_ties_impl(const T* __restrict x, int64_t n, T mn, T mx,
                                         int64_t* cmin, int64_t* cmax) {
  int64_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    a += static_cast<int64_t>(x[i] == mn);
    b += static_cast<int64_t>(x[i] == mx);
  }
  *cmin = a;
  *cmax = b;
}

// Non-template entry points, one per compute type, so that each can be
// compiled in several ISA variants.
#define BIASMAP_TOPK_PASSES(T)                                                                    \
  BIASMAP_CPU_CLONES void scan(const T* x, int64_t n, T* mn, T* mx, double* sum) {                \
    scan_impl(x, n, mn, mx, sum);                                                                 \
  }                                                                                               \
  BIASMAP_CPU_CLONES void scan_anchor(const T* x, int64_t n, T* a0, T* a1) {                      \
    scan_anchor_impl(x, n, a0, a1);                                                               \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums4 exact_eval(const T* x, int64_t n, T shift, T scale, stk::Affine<T> af, \
                                      T* out) {                                                   \
    return exact_eval_impl(x, n, shift, scale, af, out);                                          \
  }                                                                                               \
  BIASMAP_CPU_CLONES void mask_write(const T* x, int64_t n, T shift, T scale, stk::Affine<T> af,  \
                                     T* out) {                                                    \
    mask_impl(x, n, shift, scale, af, out);                                                       \
  }                                                                                               \
  BIASMAP_CPU_CLONES void mask_nudge(T* m, int64_t n, T a) { mask_nudge_impl(m, n, a); }          \
  BIASMAP_CPU_CLONES Sums2 sk_first(const T* x, int64_t n, T shift, T scale, T inv_tau, T a0,     \
                                    T a1) {                                                       \
    return sk_first_impl(x, n, shift, scale, inv_tau, a0, a1);                                    \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums2 sk_eval(const T* x, int64_t n, T shift, T scale, stk::Affine<T> af,    \
                                   int mode, T y_ref) {                                           \
    return sk_eval_impl(x, n, shift, scale, af, mode, y_ref);                                     \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums4 sk_bwd_start(const T* x, const T* g, int64_t n, T shift, T scale,      \
                                        stk::Affine<T> af, T inv_tau, T a0, T a1, T* cbar) {      \
    return sk_bwd_start_impl(x, g, n, shift, scale, af, inv_tau, a0, a1, cbar);                   \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums2 sk_bwd_iter(const T* x, int64_t n, T shift, T scale,                   \
                                       stk::Affine<T> af, int mode, T y_ref, T ka, T kb,          \
                                       T* cbar) {                                                 \
    return sk_bwd_iter_impl(x, n, shift, scale, af, mode, y_ref, ka, kb, cbar);                   \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums2 sk_bwd_end(const T* x, int64_t n, T shift, T scale, T inv_tau, T a0,   \
                                      T a1, T inv0, T inv1, T beta, T dbar1, const T* cbar,       \
                                      T* ybar) {                                                  \
    return sk_bwd_end_impl(x, n, shift, scale, inv_tau, a0, a1, inv0, inv1, beta, dbar1, cbar,    \
                           ybar);                                                                 \
  }                                                                                               \
  BIASMAP_CPU_CLONES Sums4 ex_bwd_sums(const T* x, const T* m, const T* g, int64_t n, T shift,    \
                                       T scale) {                                                 \
    return ex_bwd_sums_impl(x, m, g, n, shift, scale);                                            \
  }                                                                                               \
  BIASMAP_CPU_CLONES void ex_bwd_write(const T* x, const T* m, const T* g, int64_t n, T coef,     \
                                       T mu, T mn, T mx, T gmin, T gmax, T* out) {                \
    ex_bwd_write_impl(x, m, g, n, coef, mu, mn, mx, gmin, gmax, out);                             \
  }                                                                                               \
  BIASMAP_CPU_CLONES void minmax_bwd_write(const T* x, const T* ybar, int64_t n, T scale, T mn,   \
                                           T mx, T gmin, T gmax, T* out) {                        \
    minmax_bwd_write_impl(x, ybar, n, scale, mn, mx, gmin, gmax, out);                            \
  }                                                                                               \
  BIASMAP_CPU_CLONES void count_ties(const T* x, int64_t n, T mn, T mx, int64_t* cmin,            \
                                     int64_t* cmax) {                                             \
    count_ties_impl(x, n, mn, mx, cmin, cmax);                                                    \
  }

BIASMAP_TOPK_PASSES(float)
BIASMAP_TOPK_PASSES(double)
#undef BIASMAP_TOPK_PASSES

// ---------------------------------------------------------------------------
// Row drivers.
// ---------------------------------------------------------------------------

// Rows of half/bfloat16 are converted into float scratch rows; float and double
// rows are used in place.
template <typename S, typename C>
const C* load_row(const S* src, int64_t n, std::vector<C>& buf) {
  if constexpr (std::is_same_v<S, C>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<C>(src[i]);
    return buf.data();
  }
}

template <typename S, typename C>
C* out_row(S* dst, int64_t n, std::vector<C>& buf) {
  if constexpr (std::is_same_v<S, C>) {
    return dst;
  } else {
    buf.resize(n);
    return buf.data();
  }
}

template <typename S, typename C>
void store_row(S* dst, const C* src, int64_t n) {
  if constexpr (!std::is_same_v<S, C>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

// Per-row normalisation: y = (x - shift) * scale.
template <typename C>
struct Norm {
  C mn, mx;  // raw extremes of x
  C shift, scale;
  double y_min, y_max;  // extremes of y
  bool flat;  // min-max on a (near) constant row: y = 0
  double sum_y;
};

template <typename C>
Norm<C> normalise(const C* x, int64_t n, bool minmax) {
  Norm<C> nm;
  double sum;
  scan(x, n, &nm.mn, &nm.mx, &sum);
  nm.flat = false;
  if (minmax) {
    // Same arithmetic as reference.minmax_normalize: range in x's precision.
    const C range = nm.mx - nm.mn;
    nm.flat = !(static_cast<double>(range) > stk::kMinmaxEps);
    nm.shift = nm.mn;
    nm.scale = nm.flat ? C(0) : C(1) / range;
    nm.y_min = 0.0;
    nm.y_max = static_cast<double>((nm.mx - nm.mn) * nm.scale);
    nm.sum_y = nm.flat ? 0.0 : (sum - static_cast<double>(nm.mn) * n) * nm.scale;
  } else {
    nm.shift = C(0);
    nm.scale = C(1);
    nm.y_min = nm.mn;
    nm.y_max = nm.mx;
    nm.sum_y = sum;
  }
  return nm;
}

// Below this row length the solver runs on the row directly; above, it first
// solves on a sample to start the full solve close to the root. The sample's
// rank error (~1/sqrt(size)) sets how many full passes follow; each sample pass
// costs size / n of a full one, so long rows get a larger sample.
constexpr int64_t kSampleMinRow = 2048;
inline int64_t sample_size(int64_t n) { return n >= 65536 ? 4096 : 512; }

// Golden-ratio low-discrepancy sample: spreads over both axes of a flattened
// 2-D map, unlike a plain stride.
template <typename C>
void gather_sample(const C* x, int64_t n, const Norm<C>& nm, C* out, int64_t s) {
  const double phi = 0.6180339887498949;
  for (int64_t j = 0; j < s; ++j) {
    double f = 0.5 + phi * static_cast<double>(j);
    f -= std::floor(f);
    int64_t i = static_cast<int64_t>(f * static_cast<double>(n));
    i = i < n ? i : n - 1;
    out[j] = (x[i] - nm.shift) * nm.scale;
  }
}

// Runs the safeguarded solver over x (normalised by shift/scale). If out is
// given, every pass also stores the mask there (a store is cheap next to the
// exp), so on return out holds the mask at t - *nudge / beta and *written is
// true, unless the iteration cap was hit.
template <typename C>
double solve_threshold(const C* x, int64_t n, C shift, C scale, double k, double beta, double lo,
                       double hi, double t0, double tol, C* out, bool* written, double* nudge) {
  stk::ExactSolver sv;
  sv.init(lo, hi, t0);
  bool done = false;
  for (int it = 0; it < stk::kExactMaxIters && !done; ++it) {
    const Sums4 sw = exact_eval(x, n, shift, scale, stk::make_affine<C>(sv.t, beta), out);
    done = sv.step(sw.a, sw.b, sw.c, k, static_cast<double>(n), beta, tol);
  }
  if (written) *written = done && out != nullptr;
  if (nudge) *nudge = beta * sv.correction;
  return sv.t;
}

// Relative tolerance on sum(mask) = k of the full solve. The reference
// bisects to full precision, so the float64 path goes far below its 1e-6 (the
// mask error is bounded by the residual, see ExactSolver::step); the float path
// stops well above the float rounding noise of the sum (~sqrt(k) * 3e-8).
template <typename C>
constexpr double exact_tol() {
  return std::is_same_v<C, double> ? 1e-12 : 1e-7;
}

template <typename S, typename C>
void exact_fwd_row(const S* x_raw, S* mask_raw, double* st, int64_t n, int64_t k, double tau,
                   bool minmax, std::vector<C>& xbuf, std::vector<C>& mbuf,
                   std::vector<C>& sbuf) {
  const C* x = load_row<S, C>(x_raw, n, xbuf);
  C* m = out_row<S, C>(mask_raw, n, mbuf);
  const Norm<C> nm = normalise(x, n, minmax);
  const double beta = 2.0 / tau;
  const double kd = static_cast<double>(k);
  const double nd = static_cast<double>(n);
  double lo, hi;
  stk::exact_bracket(nm.y_min, nm.y_max, kd, nd, beta, &lo, &hi);

  double t;
  bool written = false;
  double nudge = 0.0;
  if (!(hi > lo)) {
    t = lo;  // constant row: every entry is k/n
  } else {
    const double logit_shift = nm.y_max - hi;  // logit(k/n) / beta
    double t0 = nm.sum_y / nd - logit_shift;  // exact when every y is equal
    if (n >= kSampleMinRow) {
      const int64_t ns = sample_size(n);
      sbuf.resize(ns);
      gather_sample(x, n, nm, sbuf.data(), ns);
      double smean = 0.0;
      for (int64_t j = 0; j < ns; ++j) smean += sbuf[j];
      smean /= static_cast<double>(ns);
      const double ks = kd * static_cast<double>(ns) / nd;
      t0 = solve_threshold<C>(sbuf.data(), ns, C(0), C(1), ks, beta, lo, hi,
                              smean - logit_shift, 1e-3, nullptr, nullptr, nullptr);
    }
    t = solve_threshold<C>(x, n, nm.shift, nm.scale, kd, beta, lo, hi, t0, exact_tol<C>(), m,
                           &written, &nudge);
  }
  // The last pass stored the mask at the threshold before the final correction,
  // which shifts every d_i by -nudge. When that shift is so small that its
  // second-order effect (<= nudge^2 / 20) is below C's resolution, a first-order
  // update replaces a full exp pass; it also keeps the mask in [0, 1] (|nudge| <= 1).
  const double nudge_max = std::is_same_v<C, double> ? 3e-8 : 5e-4;
  if (written && std::fabs(nudge) <= nudge_max) {
    if (nudge != 0.0) mask_nudge(m, n, static_cast<C>(nudge));
  } else {
    mask_write(x, n, nm.shift, nm.scale, stk::make_affine<C>(t, beta), m);
  }
  store_row<S, C>(mask_raw, m, n);
  st[0] = minmax ? static_cast<double>(nm.mn) : 0.0;
  st[1] = minmax ? static_cast<double>(nm.mx - nm.mn) : 1.0;
  st[2] = 2.0 * t;
}

// Min-max backward: given ybar (dL/dy), dL/dx = ybar / range plus the amin /
// amax gradients split evenly over ties, as torch.amin/amax backward does.
// dL/dmin = sum ybar (y - 1) / range, dL/dmax = -sum ybar y / range.
template <typename C>
void minmax_coefs(const C* x, int64_t n, const Norm<C>& nm, double sum_ybar, double sum_ybar_y,
                  C* gmin, C* gmax) {
  int64_t cmin, cmax;
  count_ties(x, n, nm.mn, nm.mx, &cmin, &cmax);
  const double inv_range = static_cast<double>(nm.scale);
  *gmin = static_cast<C>((sum_ybar_y - sum_ybar) * inv_range / static_cast<double>(cmin));
  *gmax = static_cast<C>(-sum_ybar_y * inv_range / static_cast<double>(cmax));
}

template <typename S, typename C>
void exact_bwd_row(const S* g_raw, const S* x_raw, const S* m_raw, S* gx_raw, int64_t n,
                   double tau, bool minmax, std::vector<C>& gbuf, std::vector<C>& xbuf,
                   std::vector<C>& mbuf, std::vector<C>& obuf) {
  const C* x = load_row<S, C>(x_raw, n, xbuf);
  const C* g = load_row<S, C>(g_raw, n, gbuf);
  const C* m = load_row<S, C>(m_raw, n, mbuf);
  C* out = out_row<S, C>(gx_raw, n, obuf);
  const double beta = 2.0 / tau;
  Norm<C> nm;
  if (minmax) {
    nm = normalise(x, n, true);
  } else {
    nm.shift = C(0);
    nm.scale = C(1);
    nm.flat = false;
    nm.mn = nm.mx = C(0);
  }
  if (nm.flat) {
    std::fill(out, out + n, C(0));
    store_row<S, C>(gx_raw, out, n);
    return;
  }
  const Sums4 s = ex_bwd_sums(x, m, g, n, nm.shift, nm.scale);
  // dtheta/dy_j = 2 w_j / sum w; no dependence when every w is 0.
  const double mu = s.a > 0.0 ? s.b / s.a : 0.0;
  C gmin = C(0), gmax = C(0);
  C coef = static_cast<C>(beta);
  if (minmax) {
    // sum ybar = beta (sum wg - mu sum w), sum ybar y = beta (sum wgy - mu sum wy).
    const double sy = beta * (s.b - mu * s.a);
    const double syy = beta * (s.d - mu * s.c);
    minmax_coefs(x, n, nm, sy, syy, &gmin, &gmax);
    coef = static_cast<C>(beta * static_cast<double>(nm.scale));
  } else {
    // No min/max terms: make the tie tests never match.
    nm.mn = nm.mx = std::numeric_limits<C>::quiet_NaN();
  }
  ex_bwd_write(x, m, g, n, coef, static_cast<C>(mu), nm.mn, nm.mx, gmin, gmax, out);
  store_row<S, C>(gx_raw, out, n);
}

// Sinkhorn: normalisation plus the anchors a0 = min|y|, a1 = min|y - 1|.
template <typename C>
Norm<C> sk_normalise(const C* x, int64_t n, bool minmax, C* a0, C* a1) {
  Norm<C> nm = normalise(x, n, minmax);
  if (minmax) {
    // y_min = 0 is attained; the entry closest to 1 is the maximum.
    *a0 = C(0);
    *a1 = nm.flat ? C(1) : static_cast<C>(std::fabs(nm.y_max - 1.0));
  } else {
    scan_anchor(x, n, a0, a1);
  }
  return nm;
}

// Which shifted form sk_eval/sk_bwd_iter need at threshold t (see sk_eval_impl).
inline int sk_mode(double y_min, double y_max, double t, double beta, double* y_ref) {
  if (beta * (y_max - t) < 0.0) {
    *y_ref = y_max;
    return 1;
  }
  if (beta * (y_min - t) > 0.0) {
    *y_ref = y_min;
    return 2;
  }
  *y_ref = 0.0;
  return 0;
}

template <typename S, typename C>
void sinkhorn_fwd_row(const S* x_raw, S* mask_raw, double* st, int64_t n, int64_t k, double tau,
                      int64_t iters, bool minmax, std::vector<C>& xbuf, std::vector<C>& mbuf) {
  const C* x = load_row<S, C>(x_raw, n, xbuf);
  C* m = out_row<S, C>(mask_raw, n, mbuf);
  C a0, a1;
  const Norm<C> nm = sk_normalise(x, n, minmax, &a0, &a1);
  st[0] = minmax ? static_cast<double>(nm.mn) : 0.0;
  st[1] = minmax ? static_cast<double>(nm.mx - nm.mn) : 1.0;
  const double nd = static_cast<double>(n);
  const double kd = static_cast<double>(k);
  const double beta = 2.0 / tau;
  const double logit = std::log(kd / (nd - kd));
  const Sums2 first = sk_first(x, n, nm.shift, nm.scale, static_cast<C>(1.0 / tau), a0, a1);
  const double a0d = a0, a1d = a1;
  // lse_i S_ij = -a_j^2 / tau + log(sum_j).
  const double lse0 = -a0d * a0d / tau + std::log(first.a);
  const double lse1 = -a1d * a1d / tau + std::log(first.b);
  double g0 = std::log((nd - kd) / nd) - lse0;
  double g1 = std::log(kd / nd) - lse1;
  // delta kept separately from g1 - g0: the g's can be ~|y|^2 / tau, far larger
  // than their difference.
  double delta = logit + std::log(first.a) - std::log(first.b) + (a1d - a0d) * (a1d + a0d) / tau;
  st[2] = g0;
  st[3] = g1;
  const double log_k = std::log(kd), log_nk = std::log(nd - kd);
  for (int64_t it = 1; it < iters; ++it) {
    const double t = stk::sinkhorn_t(delta, tau);
    double y_ref;
    const int mode = sk_mode(nm.y_min, nm.y_max, t, beta, &y_ref);
    const Sums2 ab =
        sk_eval(x, n, nm.shift, nm.scale, stk::make_affine<C>(t, beta), mode, static_cast<C>(y_ref));
    double log_a = std::log(ab.a), log_b = std::log(ab.b);
    if (mode == 1) log_a += beta * (y_ref - t);
    if (mode == 2) log_b -= beta * (y_ref - t);
    g0 += log_nk - log_b;
    g1 += log_k - log_a;
    delta += logit - log_a + log_b;
    st[2 + 2 * it] = g0;
    st[3 + 2 * it] = g1;
  }
  mask_write(x, n, nm.shift, nm.scale, stk::make_affine<C>(stk::sinkhorn_t(delta, tau), beta), m);
  store_row<S, C>(mask_raw, m, n);
}

template <typename S, typename C>
void sinkhorn_bwd_row(const S* g_raw, const S* x_raw, const double* st, S* gx_raw, int64_t n,
                      int64_t k, double tau, int64_t iters, bool minmax, std::vector<C>& gbuf,
                      std::vector<C>& xbuf, std::vector<C>& cbuf, std::vector<C>& obuf) {
  const C* x = load_row<S, C>(x_raw, n, xbuf);
  const C* g = load_row<S, C>(g_raw, n, gbuf);
  C* out = out_row<S, C>(gx_raw, n, obuf);
  C a0, a1;
  Norm<C> nm = sk_normalise(x, n, minmax, &a0, &a1);
  if (minmax && nm.flat) {
    std::fill(out, out + n, C(0));
    store_row<S, C>(gx_raw, out, n);
    return;
  }
  const double nd = static_cast<double>(n);
  const double kd = static_cast<double>(k);
  const double beta = 2.0 / tau;
  cbuf.resize(n);
  C* ybar = cbuf.data();
  // delta_s = g_s[1] - g_s[0] and log A_s, log B_s (the forward's iteration
  // sums) are recovered from consecutive stored potentials:
  // g_{s+1}[1] = g_s[1] + log k - log A_s, g_{s+1}[0] = g_s[0] + log(n-k) - log B_s.
  auto g_at = [&](int64_t s, int j) { return st[2 + 2 * (s - 1) + j]; };
  const double log_k = std::log(kd), log_nk = std::log(nd - kd);
  C* cbar = out;  // the output row doubles as the c adjoint until the end
  const double t_last = stk::sinkhorn_t(g_at(iters, 1) - g_at(iters, 0), tau);
  const Sums4 s0 = sk_bwd_start(x, g, n, nm.shift, nm.scale, stk::make_affine<C>(t_last, beta),
                                static_cast<C>(1.0 / tau), a0, a1, cbar);
  double dbar = s0.a;
  for (int64_t s = iters - 1; s >= 1; --s) {
    const double t = stk::sinkhorn_t(g_at(s, 1) - g_at(s, 0), tau);
    const double log_a = g_at(s, 1) - g_at(s + 1, 1) + log_k;
    const double log_b = g_at(s, 0) - g_at(s + 1, 0) + log_nk;
    double y_ref;
    const int mode = sk_mode(nm.y_min, nm.y_max, t, beta, &y_ref);
    // A' = A e^{-sA}, B' = B e^{-sB} with the shifts of sk_eval_impl.
    const double sa = mode == 1 ? beta * (y_ref - t) : 0.0;
    const double sb = mode == 2 ? -beta * (y_ref - t) : 0.0;
    const double inv_a = std::exp(sa - log_a);
    const double inv_b = std::exp(sb - log_b);
    const Sums2 u = sk_bwd_iter(x, n, nm.shift, nm.scale, stk::make_affine<C>(t, beta), mode,
                                static_cast<C>(y_ref), static_cast<C>(dbar * inv_a),
                                static_cast<C>(dbar * inv_b), cbar);
    dbar *= 1.0 - u.a * inv_a - u.b * inv_b;
  }
  // delta_1 = L + lse(S_0) - lse(S_1).
  const Sums2 e = sk_bwd_end(x, n, nm.shift, nm.scale, static_cast<C>(1.0 / tau), a0, a1,
                             static_cast<C>(1.0 / s0.b), static_cast<C>(1.0 / s0.c),
                             static_cast<C>(beta), static_cast<C>(dbar), cbar, ybar);
  const double sum_ybar = e.a, sum_ybar_y = e.b;
  if (minmax) {
    C gmin, gmax;
    minmax_coefs(x, n, nm, sum_ybar, sum_ybar_y, &gmin, &gmax);
    minmax_bwd_write(x, ybar, n, nm.scale, nm.mn, nm.mx, gmin, gmax, out);
  } else {
    std::copy(ybar, ybar + n, out);
  }
  store_row<S, C>(gx_raw, out, n);
}

// ---------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------

void check_common(const at::Tensor& x, int64_t k, double tau, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, n], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t n = x.size(1);
  TORCH_CHECK(k > 0 && k < n, op, ": k must satisfy 0 < k < n = ", n, ", got k = ", k);
  TORCH_CHECK(std::isfinite(tau) && tau > 0.0, op, ": tau must be finite and > 0, got ", tau);
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

void check_stats(const at::Tensor& stats, int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kDouble && stats.dim() == 2 &&
                  stats.size(0) == rows && stats.size(1) == cols,
              op, ": stats must be a CPU float64 tensor of shape [", rows, ", ", cols,
              "] (as returned by the forward), got ", stats.scalar_type(), " ", stats.sizes());
}

// Rows per task: about 64k element-passes, so small inputs stay on one thread.
int64_t row_grain(int64_t n, int64_t passes) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * passes));
}

std::tuple<at::Tensor, at::Tensor> soft_topk_exact_fwd(const at::Tensor& x_in, int64_t k,
                                                       double tau, bool minmax) {
  const char* op = "soft_topk_exact_fwd";
  check_common(x_in, k, tau, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor mask = at::empty_like(x);
  at::Tensor stats = at::empty({rows, 3}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_topk_exact_fwd", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* mp = mask.data_ptr<scalar_t>();
    double* sp = stats.data_ptr<double>();
    at::parallel_for(0, rows, row_grain(n, 8), [&](int64_t r0, int64_t r1) {
      std::vector<C> xbuf, mbuf, sbuf;
      for (int64_t r = r0; r < r1; ++r) {
        exact_fwd_row<scalar_t, C>(xp + r * n, mp + r * n, sp + r * 3, n, k, tau, minmax, xbuf,
                                   mbuf, sbuf);
      }
    });
  });
  return {mask, stats};
}

at::Tensor soft_topk_exact_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                               const at::Tensor& mask_in, const at::Tensor& stats, int64_t k,
                               double tau, bool minmax) {
  const char* op = "soft_topk_exact_bwd";
  check_common(x_in, k, tau, op);
  check_like(grad_in, x_in, "grad", op);
  check_like(mask_in, x_in, "mask", op);
  check_stats(stats, x_in.size(0), 3, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_topk_exact_bwd", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mask.data_ptr<scalar_t>();
    scalar_t* op_ = gx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n, 3), [&](int64_t r0, int64_t r1) {
      std::vector<C> gbuf, xbuf, mbuf, obuf;
      for (int64_t r = r0; r < r1; ++r) {
        exact_bwd_row<scalar_t, C>(gp + r * n, xp + r * n, mp + r * n, op_ + r * n, n, tau, minmax,
                                   gbuf, xbuf, mbuf, obuf);
      }
    });
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> soft_topk_sinkhorn_fwd(const at::Tensor& x_in, int64_t k,
                                                          double tau, int64_t iters,
                                                          bool minmax) {
  const char* op = "soft_topk_sinkhorn_fwd";
  check_common(x_in, k, tau, op);
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t cols = 2 + 2 * iters;
  at::Tensor mask = at::empty_like(x);
  at::Tensor stats = at::empty({rows, cols}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_topk_sinkhorn_fwd", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* mp = mask.data_ptr<scalar_t>();
    double* sp = stats.data_ptr<double>();
    at::parallel_for(0, rows, row_grain(n, iters + 2), [&](int64_t r0, int64_t r1) {
      std::vector<C> xbuf, mbuf;
      for (int64_t r = r0; r < r1; ++r) {
        sinkhorn_fwd_row<scalar_t, C>(xp + r * n, mp + r * n, sp + r * cols, n, k, tau, iters,
                                      minmax, xbuf, mbuf);
      }
    });
  });
  return {mask, stats};
}

at::Tensor soft_topk_sinkhorn_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                                  const at::Tensor& stats_in, int64_t k, double tau, int64_t iters,
                                  bool minmax) {
  const char* op = "soft_topk_sinkhorn_bwd";
  check_common(x_in, k, tau, op);
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
  check_like(grad_in, x_in, "grad", op);
  check_stats(stats_in, x_in.size(0), 2 + 2 * iters, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t cols = 2 + 2 * iters;
  at::Tensor gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "soft_topk_sinkhorn_bwd", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* sp = stats.data_ptr<double>();
    scalar_t* op_ = gx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n, iters + 3), [&](int64_t r0, int64_t r1) {
      std::vector<C> gbuf, xbuf, cbuf, obuf;
      for (int64_t r = r0; r < r1; ++r) {
        sinkhorn_bwd_row<scalar_t, C>(gp + r * n, xp + r * n, sp + r * cols, op_ + r * n, n, k,
                                      tau, iters, minmax, gbuf, xbuf, cbuf, obuf);
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasmap, CPU, m) {
  m.impl("soft_topk_exact_fwd", &soft_topk_exact_fwd);
  m.impl("soft_topk_exact_bwd", &soft_topk_exact_bwd);
  m.impl("soft_topk_sinkhorn_fwd", &soft_topk_sinkhorn_fwd);
  m.impl("soft_topk_sinkhorn_bwd", &soft_topk_sinkhorn_bwd);
}

}  // namespace biasmap
