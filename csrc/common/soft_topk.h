// Scalar math of the two-anchor soft top-k (DESIGN.md section 2, SoftTopK),
// shared by the CPU kernels and, later, the CUDA ones. Raw values only.
//
// Notation used by every kernel of the family. y is the (optionally min-max
// normalised) score row, beta = 2 / tau and t = theta / 2, so that the mask is
//   m_i = sigmoid(d_i),  d_i = beta * (y_i - t).
// Both solvers reduce to this form:
//  * exact: t solves sum_i sigmoid(d_i) = k;
//  * sinkhorn: with two columns, f_t is a function of g_t and the whole loop is
//    a scalar recursion on delta = g[1] - g[0] (t = (1 - tau * delta) / 2):
//      delta_1     = log(k/(n-k)) + lse_i(S_i0) - lse_i(S_i1)          (f_0 = 0)
//      delta_{s+1} = delta_s + log(k/(n-k)) - log A_s + log B_s,
//    A_s = sum_i sigmoid(d_i), B_s = sum_i sigmoid(-d_i) at delta_s, and the
//    returned plan column n * exp(S_i1 + f_T,i + g_T,1) equals sigmoid(d_i) at
//    delta_T. So each iteration is one O(n) pass with one exp per element.
#pragma once

#include <cmath>

#include "common/fastmath.h"
#include "common/macros.h"

namespace biasmap {
namespace soft_topk {

// Same constants as biasmap/ops/reference.py.
constexpr double kMinmaxEps = 1e-12;
constexpr double kExactRelTol = 1e-6;
constexpr int kExactMaxIters = 200;

// sigmoid(z), sigmoid(-z) and sigmoid'(z) = sigmoid(z) sigmoid(-z) from one exp
// of -|z|: no overflow for any z, and the small side of each pair keeps full
// relative precision (1 - sigmoid(z) would round to 0 for z > 17 in float).
template <typename T>
BIASMAP_HD BIASMAP_FORCEINLINE void sigmoid_parts(T z, T& pos, T& neg, T& deriv) {
  const bool nonneg = z >= T(0);
  const T e = fastmath::exp(fastmath::select(nonneg, -z, z));
  const T r = T(1) / (T(1) + e);
  const T er = e * r;
  pos = fastmath::select(nonneg, r, er);
  neg = fastmath::select(nonneg, er, r);
  deriv = er * r;
}

// d = beta * (y - t) evaluated as (y - t_hi) * beta + c with t_hi = T(t) and
// c = (t_hi - t) * beta: near the threshold y - t_hi is exact, so in float the
// threshold keeps double resolution (plain float theta / tau has an absolute
// error of ~1e-4 at tau = 1e-3, too coarse to hit sum = k to 1e-6 relative).
template <typename T>
struct Affine {
  T t_hi, beta, c;
};

template <typename T>
BIASMAP_HD inline Affine<T> make_affine(double t, double beta) {
  Affine<T> a;
  a.t_hi = static_cast<T>(t);
  a.beta = static_cast<T>(beta);
  a.c = static_cast<T>((static_cast<double>(a.t_hi) - t) * beta);
  return a;
}

template <typename T>
BIASMAP_HD BIASMAP_FORCEINLINE T affine_eval(const Affine<T>& a, T y) {
  return (y - a.t_hi) * a.beta + a.c;
}

// Safeguarded root finder on t for S(t) = sum_i sigmoid(beta (y_i - t)) = k.
// S is decreasing; [lo, hi] always brackets the root. Each evaluation gives
// S, W = sum sigmoid'(d_i) and V = sum sigmoid'(d_i) (1 - 2 sigmoid(d_i)), so
// S' = -beta W and S'' = beta^2 V.
//  * Near the root (the Newton step moves every d_i by at most 1, so a
//    quadratic model of S holds) a Halley step is taken: cubic convergence,
//    typically 2-3 passes from a 1% start to float64 roundoff.
//  * Farther away the Newton step is taken on log S (when S < k) or on
//    log(n - S) (when S > k): there S or n - S is a sum of exponentials in t,
//    nearly log-linear, where a plain Newton step overshoots by orders of
//    magnitude but the log step is almost exact.
// Steps that leave the bracket or do not at least halve the step of two
// iterations ago fall back to bisection, so convergence is guaranteed.
struct ExactSolver {
  double lo, hi, t;
  double step1, step2;  // the last two steps taken
  double correction;  // t on return true minus the t of the last evaluation

  BIASMAP_HD void init(double lo_, double hi_, double t0) {
    lo = lo_;
    hi = hi_;
    t = (t0 > lo && t0 < hi) ? t0 : 0.5 * (lo + hi);
    step1 = step2 = hi - lo;
    correction = 0.0;
  }

  // Halley increment of t when the local quadratic model is trustworthy, else 0
  // with *ok = false.
  BIASMAP_HD static double local_step(double r, double w_sum, double v_sum, double beta, bool* ok) {
    *ok = false;
    if (!(w_sum > 0.0) || !(fabs(r) <= w_sum)) return 0.0;
    const double h = r * v_sum / (2.0 * w_sum * w_sum);
    if (!(fabs(h) <= 0.5)) return 0.0;
    *ok = true;
    return r / (beta * w_sum * (1.0 - h));
  }

  // Returns true when t is final: |S - k| <= tol * k; or when the bracket has
  // collapsed to roundoff; or on NaN. Every mask entry moves the same way with
  // t, so the mask's error is at most |S(t) - k| entrywise. On convergence one
  // more correction step is applied (the reference applies a Newton one) when
  // the local model holds; it is skipped on a flat stretch of S between
  // separated scores (|r| > W), where a Newton step could jump across the next
  // score's transition.
  BIASMAP_HD bool step(double s_sum, double w_sum, double v_sum, double k, double n, double beta,
                       double tol) {
    const double r = s_sum - k;
    bool local;
    const double dl = local_step(r, w_sum, v_sum, beta, &local);
    if (!(fabs(r) > tol * k)) {
      correction = dl;
      t += correction;
      return true;
    }
    const double t_eval = t;
    if (r > 0.0) {
      lo = t;
    } else {
      hi = t;
    }
    double next = 0.5 * (lo + hi);
    if (w_sum > 0.0) {
      const double cand =
          local ? t + dl
                : (r < 0.0 ? t + s_sum * log(s_sum / k) / (beta * w_sum)
                           : t + (n - s_sum) * log((n - k) / (n - s_sum)) / (beta * w_sum));
      if (cand > lo && cand < hi && fabs(cand - t) <= 0.5 * fabs(step2)) next = cand;
    }
    step2 = step1;
    step1 = next - t;
    if (!(hi - lo > 4e-16 * (fabs(lo) + fabs(hi)))) {
      t = 0.5 * (lo + hi);
      correction = t - t_eval;
      return true;
    }
    t = next;
    return false;
  }
};

// Bracket of the exact root: at t = y_min - L/beta every mask entry is >= k/n
// and at t = y_max - L/beta every entry is <= k/n, with L = logit(k/n).
BIASMAP_HD inline void exact_bracket(double y_min, double y_max, double k, double n, double beta,
                                     double* lo, double* hi) {
  const double shift = log(k / (n - k)) / beta;
  *lo = y_min - shift;
  *hi = y_max - shift;
}

// Sinkhorn: t from delta = g[1] - g[0].
BIASMAP_HD inline double sinkhorn_t(double delta, double tau) { return 0.5 - 0.5 * tau * delta; }

}  // namespace soft_topk
}  // namespace biasmap
