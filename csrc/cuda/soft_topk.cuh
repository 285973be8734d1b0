// CUDA kernels for biasmap::soft_topk_{exact,sinkhorn}_{fwd,bwd}.
//
// Every row x [n] of x [B, n] is one map. y = minmax-normalised x (or x), as
// reference.minmax_normalize: y = (x - min) / (max - min), 0 where the range is
// <= 1e-12.
//
// exact:    mask = sigmoid((2 y - theta) / tau) with theta solving sum(mask) = k:
//           a histogram of y (2048 bins) gives theta0 = 2 * (k-th largest y),
//           then safeguarded Newton on f(theta) = sum sigmoid - k (derivative
//           -sum w / tau, w = mask (1 - mask)) inside the bracket
//           [2 min y - tau logit(k/n), 2 max y - tau logit(k/n)], with bisection
//           when a step leaves it. Typically 3-6 passes.
//           stats [B, 3] float64 = (min x, max x - min x, theta), with (0, 1)
//           for (min, range) when not min-max normalising (the CPU kernel's
//           convention; the CUDA backward reads them only with min-max).
//           Backward (closed form, then through the normalisation):
//             gy_j = (2/tau) w_j (g_j - sum(w g) / sum(w)),
//             dx_j = gy_j / r + [x_j = min] (S2 - S1) / (r c_min) - [x_j = max] S2 / (r c_max)
//           with r the range, S1 = sum gy, S2 = sum gy y and c_min / c_max the
//           number of tied minima / maxima (torch's amin / amax split the
//           gradient evenly among ties).
// sinkhorn: the scalar recursion of reference.soft_topk_sinkhorn: a = (2y - 1)/tau,
//           d_1 = logit(k/n) + LSE(-y^2/tau) - LSE(-(y - 1)^2/tau) in float64,
//           d_{t+1} = d_t + logit(k/n) - (log sum sigmoid(a + d_t) - log sum sigmoid(-a - d_t)),
//           mask = sigmoid(a + d_iters). Sums of sigmoids are taken relative to
//           the largest term when all terms are tiny (so they never underflow to
//           0 where the reference's logsumexp(logsigmoid) would not).
//           stats [B, 2 + 2 iters] float64 = (min x, range (or 0, 1), then the
//           potentials (g0, g1) after each iteration, as the CPU kernel stores
//           them: g0 = log((n-k)/n) - LSE(-y^2/tau), g1 = log(k/n) - LSE(-(y-1)^2/tau),
//           then g0 += log(n - k) - log sum sigmoid(-z), g1 += log k - log sum sigmoid(z)).
//           The forward carries d separately (g's can be ~y^2/tau, far larger
//           than d); the backward reads d_t = g1 - g0. iters = 0 gives the
//           plan's column with f = g = 0: n exp(-(y - 1)^2 / tau), as the CPU kernel.
//           Backward: with s = sigmoid(z_t), z_t = a + d_t, p = s / sum s,
//           q = (1 - s) / sum (1 - s) and r_t = p (1 - s) + q s = d lm_t / d z_t:
//             delta_T = sum g m (1 - m),  delta_t = delta_{t+1} (1 - sum_i r_{t,i}),
//             dL/da_i = g_i m_i (1 - m_i) - sum_{t<T} delta_{t+1} r_{t,i},
//             gy_i = (2/tau) dL/da_i + delta_1 (-2/tau) (y_i P0_i - (y_i - 1) P1_i),
//           P0 / P1 the softmaxes of -y^2/tau / -(y-1)^2/tau; then the same
//           normalisation chain rule as exact.
//
// Layout: a row is split over P blocks ("group"), P >= 1 chosen so that the row's
// per-element working set fits in the blocks' shared memory (so each pass after
// the first reads shared memory, not HBM: one HBM read of the inputs and one
// write of the output per call). Sums over a row combine each block's
// fixed-order block sum in part order (group_reduce): deterministic, and equal in
// every block of the group, so all blocks take the same Newton / bisection
// decisions. P > 1 uses a cooperative launch (all blocks co-resident) with a
// grid of `groups` groups that walk the rows in rounds; P == 1 is an ordinary
// launch with one block per row. If a row does not fit even the whole device's
// shared memory, the working set lives in a global workspace instead.
#pragma once

#include "cuda/common.cuh"

#ifndef BIASMAP_TOPK_SMALL_THREADS
#define BIASMAP_TOPK_SMALL_THREADS 256
#endif
#ifndef BIASMAP_TOPK_LARGE_THREADS
#define BIASMAP_TOPK_LARGE_THREADS 1024
#endif

namespace biasmap {
namespace cuda {
namespace topk {

constexpr int kSmallThreads = BIASMAP_TOPK_SMALL_THREADS;
constexpr int kLargeThreads = BIASMAP_TOPK_LARGE_THREADS;
// Rows up to this length use kSmallThreads per block.
constexpr int64_t kSmallRow = 4096;
constexpr double kMinmaxEps = 1e-12;  // reference.MINMAX_EPS
constexpr int kHistBins = 2048;
constexpr int kMaxIters = 200;  // reference.EXACT_MAX_ITERS
// Rows are spread over more blocks only in chunks of at least this many elements.
constexpr int64_t kMinSpreadChunk = 16384;

// ---------------------------------------------------------------------------
// Scalar math shared by every kernel (host-testable).

struct Norm {
  bool minmax;
  bool flat;
  double lo;
  double range;
};
// From the row's min and range (the forward's stats).
BIASMAP_HD inline Norm make_norm(bool minmax, double lo, double range) {
  Norm nm;
  nm.minmax = minmax;
  nm.flat = minmax && !(range > kMinmaxEps);
  nm.lo = lo;
  nm.range = range;
  return nm;
}
// y rounded to the working type A, as the reference normalises in x's dtype.
template <class A>
BIASMAP_HD inline A normalized(const Norm& nm, double x) {
  if (!nm.minmax) return static_cast<A>(x);
  if (nm.flat) return A(0);
  return static_cast<A>((x - nm.lo) / nm.range);
}
// Smallest and largest normalised value of the row.
BIASMAP_HD inline void y_bounds(const Norm& nm, double xmax, double* ymin, double* ymax) {
  if (nm.minmax) {
    *ymin = 0.0;
    *ymax = nm.flat ? 0.0 : 1.0;
  } else {
    *ymin = nm.lo;
    *ymax = xmax;
  }
}
BIASMAP_HD inline double logit_kn(int64_t k, int64_t n) {
  return log(static_cast<double>(k) / static_cast<double>(n - k));
}

// Sums of sigmoid(z) and sigmoid(-z) over a row, relative to the largest term
// of a side whose terms are all small: log sum_i sigmoid(z_i) = off1 + log sum t1_i
// and log sum sigmoid(-z_i) = off2 + log sum t2_i.
struct SkCase {
  int kind;     // 0: both sides direct, 1: side 1 relative to zmax, 2: side 2 relative to zmin
  double zref;  // zmax (kind 1) or zmin (kind 2)
  double e;     // exp(zmax) (kind 1) or exp(-zmin) (kind 2); may underflow to 0
  double off1, off2;
};
BIASMAP_HD inline SkCase make_case(double zmin, double zmax) {
  SkCase c;
  c.kind = 0;
  c.zref = 0.0;
  c.e = 0.0;
  c.off1 = 0.0;
  c.off2 = 0.0;
  if (zmax < 0.0) {  // every sigmoid(z) < 1/2: the largest is sigmoid(zmax)
    c.kind = 1;
    c.zref = zmax;
    c.e = exp(zmax);
    c.off1 = zmax;
  } else if (zmin > 0.0) {  // every sigmoid(-z) < 1/2
    c.kind = 2;
    c.zref = zmin;
    c.e = exp(-zmin);
    c.off2 = -zmin;
  }
  return c;
}
// For z = zd (double) rounded to A: t1, t2 (the scaled terms), sp = sigmoid(z),
// sn = sigmoid(-z). One or two exps and one reciprocal; nothing overflows.
template <class A>
BIASMAP_HD inline void sk_terms(double zd, const SkCase& c, A& t1, A& t2, A& sp, A& sn) {
  if (c.kind == 0) {
    sigmoid_pair(static_cast<A>(zd), sp, sn);
    t1 = sp;
    t2 = sn;
  } else if (c.kind == 1) {
    const A u = bm_exp(static_cast<A>(zd - c.zref));  // e^(z - zmax) <= 1
    const A v = u * static_cast<A>(c.e);              // e^z
    const A r = one_over_one_plus(v);
    t1 = u * r;
    t2 = r;
    sp = v * r;
    sn = r;
  } else {
    const A u = bm_exp(static_cast<A>(c.zref - zd));  // e^(zmin - z) <= 1
    const A v = u * static_cast<A>(c.e);              // e^-z
    const A r = one_over_one_plus(v);
    t2 = u * r;
    t1 = r;
    sn = v * r;
    sp = r;
  }
}

// One safeguarded Newton step for f(theta) = S - k given S and W = sum w.
// Updates the bracket [lo, hi] (f(lo) >= 0 >= f(hi)) and returns the next
// theta; *done when the step is below tol (relative).
BIASMAP_HD inline double newton_step(double theta, double S, double W, double k, double tau,
                                     double tol, double* lo, double* hi, bool* done) {
  const double f = S - k;
  if (f == 0.0) {  // an exact root; the bisection fallback below would move off it
    *done = true;
    return theta;
  }
  if (f > 0.0) {
    *lo = theta;  // mask too large: theta too small
  } else {
    *hi = theta;
  }
  double next = theta + tau * f / W;
  const double scale = tol * (1.0 + fabs(theta));
  if (!(W > 0.0) || !(next > *lo && next < *hi)) {
    next = 0.5 * (*lo + *hi);
    *done = *hi - *lo <= scale;
    return next;
  }
  // Newton's error after a step of size s is at most C s^2 with
  // C = |f''| / (2 |f'|) <= 1 / (2 tau) for a sum of sigmoids of theta / tau, so a
  // step with s^2 <= tau * scale leaves an error below scale / 2: stop after it
  // instead of paying one more pass to see a tiny step.
  const double step = fabs(next - theta);
  *done = step <= scale || (step <= 0.01 * tau && step * step <= tau * scale) ||
          *hi - *lo <= scale;
  return next;
}

// Tolerance on theta: float64 rows converge to ~1e-13; float / half / bfloat16
// rows evaluate the sigmoids in float, whose rounding noise sits far below 1e-9.
template <class A>
BIASMAP_HD inline double theta_tol() {
  return sizeof(A) == 8 ? 1e-13 : 1e-9;
}

// z = (2 y - theta) / tau evaluated in A as (y - t_hi) * beta + c with t = theta/2,
// t_hi = A(t), beta = 2/tau and c = A((t_hi - t) * beta): near the threshold
// y - t_hi is exact, so float rows keep the threshold to double resolution with
// two float operations per element.
template <class A>
struct Affine {
  A t_hi, beta, c;
};
template <class A>
BIASMAP_HD inline Affine<A> make_affine(double theta, double tau) {
  const double t = 0.5 * theta, beta = 2.0 / tau;
  Affine<A> f;
  f.t_hi = static_cast<A>(t);
  f.beta = static_cast<A>(beta);
  f.c = static_cast<A>((static_cast<double>(f.t_hi) - t) * beta);
  return f;
}
template <class A>
BIASMAP_HD inline A affine_z(const Affine<A>& f, A y) {
  return (y - f.t_hi) * f.beta + f.c;
}

// ---------------------------------------------------------------------------
// Row layout and workspace.

struct Layout {
  int64_t rows;
  int64_t n;
  int P;          // blocks per row
  int groups;     // rows in flight (grid = groups * P)
  int64_t chunk;  // elements per block
  int narr;       // per-element cached values
  bool smem_cache;
};

struct Workspace {
  unsigned* counters;  // [groups]
  double* partials;    // [groups][2][P][kGroupMaxSlots]
  int* hist;           // [rows][kHistBins] (exact forward with P > 1)
  void* cache;         // [grid][narr][chunk] of acc_t (when !smem_cache)
  double* coef;        // [grid][iters][4] (sinkhorn backward)
};

template <int NT, class A>
struct Row {
  GroupSync sync;
  double* red;  // block_reduce scratch (kGroupMaxSlots wide)
  A* cache;     // narr arrays of `chunk`
  int64_t chunk;
  int64_t row;
  int64_t begin;  // offset of this block's part in the row
  int len;        // elements of this block's part
  BM_DEVICE A* arr(int i) const { return cache + static_cast<int64_t>(i) * chunk; }
};

// Fixed part of the shared memory (reduction scratch, histogram, scan scratch).
template <int NT>
BIASMAP_HD inline size_t fixed_smem(bool with_hist) {
  return smem_bytes<double>(block_reduce_scratch<NT, kGroupMaxSlots>()) +
         (with_hist ? smem_bytes<int>(kHistBins) + smem_bytes<long long>(NT / 32 + 1) +
                          smem_bytes<double>(2)
                    : 0);
}

template <int NT, class A>
BM_DEVICE Row<NT, A> make_row(const Layout& lay, const Workspace& ws, bool with_hist,
                              int** hist, long long** scan, double** bcast) {
  SmemCarver carve{dyn_smem()};
  Row<NT, A> r;
  r.red = carve.take<double>(block_reduce_scratch<NT, kGroupMaxSlots>());
  if (with_hist) {
    *hist = carve.take<int>(kHistBins);
    *scan = carve.take<long long>(NT / 32 + 1);
    *bcast = carve.take<double>(2);
  }
  r.chunk = lay.chunk;
  if (lay.smem_cache) {
    r.cache = carve.take<A>(static_cast<size_t>(lay.narr) * lay.chunk);
  } else {
    r.cache = static_cast<A*>(ws.cache) + static_cast<int64_t>(blockIdx.x) * lay.narr * lay.chunk;
  }
  const int g = static_cast<int>(blockIdx.x) / lay.P;
  r.sync.P = lay.P;
  r.sync.part = static_cast<int>(blockIdx.x) % lay.P;
  r.sync.counter = ws.counters + g;
  r.sync.partials = ws.partials + static_cast<int64_t>(g) * 2 * lay.P * kGroupMaxSlots;
  r.sync.phase = 0;
  r.row = g;
  return r;
}

template <int NT, class A>
BM_DEVICE void set_row(Row<NT, A>& r, const Layout& lay, int64_t row) {
  r.row = row;
  r.begin = static_cast<int64_t>(r.sync.part) * lay.chunk;
  const int64_t len = bm_min<int64_t>(lay.chunk, lay.n - r.begin);
  r.len = len > 0 ? static_cast<int>(len) : 0;
}

template <int NT, int K, class A>
BM_DEVICE void row_reduce(Row<NT, A>& r, double (&v)[K], unsigned max_mask) {
  group_reduce<NT, K>(v, max_mask, r.red, r.sync);
}

// ---------------------------------------------------------------------------
// exact forward

// theta0 = 2 * (approximate k-th largest y) from a kHistBins histogram of y over
// [ymin, ymax]; the k-th largest is placed inside its bin as if the bin's values
// were evenly spread.
template <int NT, class A>
BM_DEVICE double histogram_guess(Row<NT, A>& r, const Layout& lay, const Workspace& ws,
                                 double ymin, double ymax, int64_t k, int* hist,
                                 long long* scan, double* bcast) {
  static_assert(kHistBins % NT == 0, "bins split evenly over the threads");
  constexpr int kPer = kHistBins / NT;
  const double inv_bw = kHistBins / (ymax - ymin);
  const A ymin_a = static_cast<A>(ymin), inv_bw_a = static_cast<A>(inv_bw);
  for (int j = threadIdx.x; j < kHistBins; j += NT) hist[j] = 0;
  __syncthreads();
  const A* y = r.arr(0);
  for (int i = threadIdx.x; i < r.len; i += NT) {
    int b = static_cast<int>((y[i] - ymin_a) * inv_bw_a);
    b = b < 0 ? 0 : (b >= kHistBins ? kHistBins - 1 : b);
    atomicAdd(&hist[b], 1);
  }
  __syncthreads();
  if (lay.P > 1) {
    int* gh = ws.hist + r.row * kHistBins;
    for (int j = threadIdx.x; j < kHistBins; j += NT) {
      if (hist[j] != 0) atomicAdd(&gh[j], hist[j]);
    }
    __threadfence();
    group_barrier(r.sync);
    for (int j = threadIdx.x; j < kHistBins; j += NT) hist[j] = load_cg(gh + j);
    __syncthreads();
  }
  // Thread t owns bins counted from the top: kHistBins-1 - (t*kPer + u).
  long long seg = 0;
  for (int u = 0; u < kPer; ++u) seg += hist[kHistBins - 1 - (threadIdx.x * kPer + u)];
  long long total;
  const long long incl = block_inclusive_scan<NT>(seg, scan, &total);
  long long above = incl - seg;
  if (above < k && k <= incl) {
    for (int u = 0; u < kPer; ++u) {
      const int j = kHistBins - 1 - (threadIdx.x * kPer + u);
      const long long c = hist[j];
      if (above + c >= k) {
        const double frac = static_cast<double>(k - above) / static_cast<double>(c);
        bcast[0] = 2.0 * (ymin + (j + 1 - frac) / inv_bw);
        break;
      }
      above += c;
    }
  }
  __syncthreads();
  const double theta0 = bcast[0];
  __syncthreads();
  return theta0;
}

template <class T>
struct Args {
  const T* x;
  const T* grad;
  const T* mask;  // exact backward: the forward's mask
  T* out;
  double* stats;
  int64_t k;
  double tau;
  int iters;
  bool minmax;
};

template <class T, int NT>
__global__ void __launch_bounds__(NT) exact_fwd_kernel(Args<T> a, Layout lay, Workspace ws) {
  using A = acc_t<T>;
  int* hist = nullptr;
  long long* scan = nullptr;
  double* bcast = nullptr;
  Row<NT, A> r = make_row<NT, A>(lay, ws, true, &hist, &scan, &bcast);
  const double kd = static_cast<double>(a.k);
  const double L = logit_kn(a.k, lay.n);
  for (int64_t row = r.row; row < lay.rows; row += lay.groups) {
    set_row(r, lay, row);
    const T* xr = a.x + row * lay.n + r.begin;
    A* y = r.arr(0);
    double v[2] = {-INFINITY, -INFINITY};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A xv = load_as<A>(xr, i);
      y[i] = xv;
      v[0] = bm_max(v[0], static_cast<double>(xv));
      v[1] = bm_max(v[1], -static_cast<double>(xv));
    }
    row_reduce<NT, 2>(r, v, 3u);
    const double xmax = v[0], xmin = -v[1];
    const Norm nm = make_norm(a.minmax, xmin, xmax - xmin);
    for (int i = threadIdx.x; i < r.len; i += NT) y[i] = normalized<A>(nm, static_cast<double>(y[i]));
    double ymin, ymax;
    y_bounds(nm, xmax, &ymin, &ymax);
    double theta;
    if (!(ymax > ymin)) {
      theta = 2.0 * ymin - a.tau * L;  // all y equal: sigmoid(-L) * n = k exactly
      __syncthreads();
    } else {
      double lo = 2.0 * ymin - a.tau * L, hi = 2.0 * ymax - a.tau * L;
      theta = histogram_guess<NT, A>(r, lay, ws, ymin, ymax, a.k, hist, scan, bcast);
      theta = bm_min(bm_max(theta, lo), hi);
      for (int it = 0; it < kMaxIters; ++it) {
        const Affine<A> af = make_affine<A>(theta, a.tau);
        A ps = A(0), pw = A(0);  // a thread's chunk is short: A accumulates it exactly enough
        for (int i = threadIdx.x; i < r.len; i += NT) {
          A sp, sn;
          sigmoid_pair(affine_z(af, y[i]), sp, sn);
          ps += sp;
          pw += sp * sn;
        }
        double s[2] = {static_cast<double>(ps), static_cast<double>(pw)};
        row_reduce<NT, 2>(r, s, 0u);
        bool done;
        theta = newton_step(theta, s[0], s[1], kd, a.tau, theta_tol<A>(), &lo, &hi, &done);
        if (done) break;
      }
    }
    T* out = a.out + row * lay.n + r.begin;
    const Affine<A> af = make_affine<A>(theta, a.tau);
    for (int i = threadIdx.x; i < r.len; i += NT) {
      A sp, sn;
      sigmoid_pair(affine_z(af, y[i]), sp, sn);
      out[i] = store_as<T>(sp);
    }
    if (r.sync.part == 0 && threadIdx.x == 0) {
      // The CPU kernel's convention: (min, range) only with min-max normalisation.
      a.stats[row * 3 + 0] = a.minmax ? xmin : 0.0;
      a.stats[row * 3 + 1] = a.minmax ? xmax - xmin : 1.0;
      a.stats[row * 3 + 2] = theta;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// exact backward

template <class T, int NT>
__global__ void __launch_bounds__(NT) exact_bwd_kernel(Args<T> a, Layout lay, Workspace ws) {
  using A = acc_t<T>;
  Row<NT, A> r = make_row<NT, A>(lay, ws, false, nullptr, nullptr, nullptr);
  const double c2 = 2.0 / a.tau;
  for (int64_t row = r.row; row < lay.rows; row += lay.groups) {
    set_row(r, lay, row);
    const Norm nm = make_norm(a.minmax, a.stats[row * 3 + 0], a.stats[row * 3 + 1]);
    const bool chain = nm.minmax && !nm.flat;
    const int64_t off = row * lay.n + r.begin;
    A* G = r.arr(0);
    A* M = r.arr(1);
    A* X = r.arr(2);
    double v[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A g = load_as<A>(a.grad, off + i);
      const A m = load_as<A>(a.mask, off + i);
      const A x = load_as<A>(a.x, off + i);
      G[i] = g;
      M[i] = m;
      X[i] = x;
      const double w = static_cast<double>(m) * (1.0 - static_cast<double>(m));
      v[0] += w;
      v[1] += w * static_cast<double>(g);
      if (chain) {
        const double y = static_cast<double>(normalized<A>(nm, static_cast<double>(x)));
        v[2] += w * y;
        v[3] += w * static_cast<double>(g) * y;
        v[4] += static_cast<double>(x) == nm.lo ? 1.0 : 0.0;
        v[5] += static_cast<double>(x) - nm.lo == nm.range ? 1.0 : 0.0;
      }
    }
    row_reduce<NT, 6>(r, v, 0u);
    const double ratio = v[0] > 0.0 ? v[1] / v[0] : 0.0;
    const double S1 = c2 * (v[1] - ratio * v[0]);
    const double S2 = c2 * (v[3] - ratio * v[2]);
    const A k_gy = static_cast<A>(c2);
    const A k_ratio = static_cast<A>(ratio);
    const A inv_r = static_cast<A>(chain ? 1.0 / nm.range : 0.0);
    const A at_min = static_cast<A>(chain && v[4] > 0 ? (S2 - S1) / (nm.range * v[4]) : 0.0);
    const A at_max = static_cast<A>(chain && v[5] > 0 ? S2 / (nm.range * v[5]) : 0.0);
    T* out = a.out + off;
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A m = M[i];
      const A gy = k_gy * (m * (A(1) - m)) * (G[i] - k_ratio);
      A dx;
      if (!nm.minmax) {
        dx = gy;
      } else if (nm.flat) {
        dx = A(0);
      } else {
        const double x = static_cast<double>(X[i]);
        dx = gy * inv_r + (x == nm.lo ? at_min : A(0)) - (x - nm.lo == nm.range ? at_max : A(0));
      }
      out[i] = store_as<T>(dx);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// sinkhorn forward

// Offsets for the first step's logsumexps: the largest of -y^2/tau and of
// -(y - 1)^2/tau over the row.
BIASMAP_HD inline void first_step_offsets(const Norm& nm, double min_abs_x, double min_abs_x1,
                                          double inv_tau, double* m0, double* m1) {
  if (nm.minmax) {
    *m0 = 0.0;                           // y = 0 occurs
    *m1 = nm.flat ? -inv_tau : 0.0;      // y = 1 occurs unless the row is flat
  } else {
    *m0 = -min_abs_x * min_abs_x * inv_tau;
    *m1 = -min_abs_x1 * min_abs_x1 * inv_tau;
  }
}
template <class A>
BIASMAP_HD inline A a_of(A y, double inv_tau) {
  return static_cast<A>((2.0 * static_cast<double>(y) - 1.0) * inv_tau);
}
BIASMAP_HD inline int64_t stats_width(int iters) { return 2 + 2 * static_cast<int64_t>(iters); }

template <class T, int NT>
__global__ void __launch_bounds__(NT) sinkhorn_fwd_kernel(Args<T> a, Layout lay, Workspace ws) {
  using A = acc_t<T>;
  Row<NT, A> r = make_row<NT, A>(lay, ws, false, nullptr, nullptr, nullptr);
  const double inv_tau = 1.0 / a.tau;
  const double L = logit_kn(a.k, lay.n);
  const double n = static_cast<double>(lay.n), kd = static_cast<double>(a.k);
  const double log_k = log(kd), log_nk = log(n - kd);
  const int64_t sw = stats_width(a.iters);
  for (int64_t row = r.row; row < lay.rows; row += lay.groups) {
    set_row(r, lay, row);
    const T* xr = a.x + row * lay.n + r.begin;
    A* c = r.arr(0);  // x, then a = (2y - 1)/tau
    double v[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A xv = load_as<A>(xr, i);
      c[i] = xv;
      const double xd = static_cast<double>(xv);
      v[0] = bm_max(v[0], xd);
      v[1] = bm_max(v[1], -xd);
      v[2] = bm_max(v[2], -fabs(xd));
      v[3] = bm_max(v[3], -fabs(xd - 1.0));
    }
    row_reduce<NT, 4>(r, v, 15u);
    const double xmax = v[0], xmin = -v[1];
    const Norm nm = make_norm(a.minmax, xmin, xmax - xmin);
    double m0, m1;
    first_step_offsets(nm, -v[2], -v[3], inv_tau, &m0, &m1);
    double* st = a.stats + row * sw;
    const bool writer = r.sync.part == 0 && threadIdx.x == 0;
    if (writer) {
      st[0] = a.minmax ? xmin : 0.0;
      st[1] = a.minmax ? xmax - xmin : 1.0;
    }
    if (a.iters == 0) {
      // f = g = 0: the plan's column is n exp(-(y - 1)^2 / tau).
      T* out = a.out + row * lay.n + r.begin;
      for (int i = threadIdx.x; i < r.len; i += NT) {
        const double yd = static_cast<double>(normalized<A>(nm, static_cast<double>(c[i])));
        out[i] = store_as<T>(n * exp(-(yd - 1.0) * (yd - 1.0) * inv_tau));
      }
      __syncthreads();
      continue;
    }
    double s[2] = {0.0, 0.0};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A y = normalized<A>(nm, static_cast<double>(c[i]));
      const double yd = static_cast<double>(y);
      s[0] += exp(-yd * yd * inv_tau - m0);
      s[1] += exp(-(yd - 1.0) * (yd - 1.0) * inv_tau - m1);
      c[i] = a_of<A>(y, inv_tau);
    }
    row_reduce<NT, 2>(r, s, 0u);
    const double lse0 = m0 + log(s[0]), lse1 = m1 + log(s[1]);
    // d is carried on its own: the potentials can be ~y^2 / tau, much larger
    // than their difference. They are stored as the CPU kernel stores them.
    double d = L + lse0 - lse1;
    double g0 = log((n - kd) / n) - lse0, g1 = log(kd / n) - lse1;
    double ymin, ymax;
    y_bounds(nm, xmax, &ymin, &ymax);
    const double amin = static_cast<double>(a_of<A>(static_cast<A>(ymin), inv_tau));
    const double amax = static_cast<double>(a_of<A>(static_cast<A>(ymax), inv_tau));
    if (writer) {
      st[2] = g0;
      st[3] = g1;
    }
    for (int t = 1; t < a.iters; ++t) {
      const SkCase cs = make_case(amin + d, amax + d);
      double u[2] = {0.0, 0.0};
      for (int i = threadIdx.x; i < r.len; i += NT) {
        A t1, t2, sp, sn;
        sk_terms<A>(static_cast<double>(c[i]) + d, cs, t1, t2, sp, sn);
        u[0] += t1;
        u[1] += t2;
      }
      row_reduce<NT, 2>(r, u, 0u);
      const double log_s1 = cs.off1 + log(u[0]), log_s2 = cs.off2 + log(u[1]);
      d += L - (log_s1 - log_s2);
      g0 += log_nk - log_s2;
      g1 += log_k - log_s1;
      if (writer) {
        st[2 + 2 * t] = g0;
        st[3 + 2 * t] = g1;
      }
    }
    T* out = a.out + row * lay.n + r.begin;
    for (int i = threadIdx.x; i < r.len; i += NT) {
      A sp, sn;
      sigmoid_pair(static_cast<A>(static_cast<double>(c[i]) + d), sp, sn);
      out[i] = store_as<T>(sp);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// sinkhorn backward

template <class T, int NT>
__global__ void __launch_bounds__(NT) sinkhorn_bwd_kernel(Args<T> a, Layout lay, Workspace ws) {
  using A = acc_t<T>;
  Row<NT, A> r = make_row<NT, A>(lay, ws, false, nullptr, nullptr, nullptr);
  const double inv_tau = 1.0 / a.tau;
  const double c2 = 2.0 * inv_tau;
  const double n = static_cast<double>(lay.n);
  const int64_t sw = stats_width(a.iters);
  const int T_it = a.iters;
  // This block's [iters][4] coefficients (only this block reads them).
  double* coef = ws.coef + static_cast<int64_t>(blockIdx.x) * T_it * 4;
  for (int64_t row = r.row; row < lay.rows; row += lay.groups) {
    set_row(r, lay, row);
    const double* st = a.stats + row * sw;
    const Norm nm = make_norm(a.minmax, st[0], st[1]);
    // d_t = g1 - g0 of iteration t = 0..iters-1 (the forward's potentials).
    auto d_at = [&](int t) { return st[3 + 2 * t] - st[2 + 2 * t]; };
    const double dT = T_it > 0 ? d_at(T_it - 1) : 0.0;
    const int64_t off = row * lay.n + r.begin;
    A* G = r.arr(0);
    A* X = r.arr(1);
    A* acc = r.arr(2);
    // Pass A: dL/da of the last sigmoid (and delta_T, its sum), the first
    // step's offsets, the tie counts and the row's range.
    double v[7] = {0.0, -INFINITY, -INFINITY, 0.0, 0.0, -INFINITY, -INFINITY};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const A g = load_as<A>(a.grad, off + i);
      const A x = load_as<A>(a.x, off + i);
      G[i] = g;
      X[i] = x;
      const double xd = static_cast<double>(x);
      const A y = normalized<A>(nm, xd);
      A gw;
      if (T_it > 0) {
        A sp, sn;
        sigmoid_pair(static_cast<A>(static_cast<double>(a_of<A>(y, inv_tau)) + dT), sp, sn);
        gw = g * sp * sn;
      } else {
        // mask = n exp(-(y - 1)^2 / tau): dmask/dy = -(2/tau) (y - 1) mask; kept
        // here as dL/da = dL/dy * tau / 2 so that gy = (2/tau) acc below.
        const double yd = static_cast<double>(y);
        gw = static_cast<A>(static_cast<double>(g) * n * exp(-(yd - 1.0) * (yd - 1.0) * inv_tau) *
                            -(yd - 1.0));
      }
      acc[i] = gw;
      v[0] += gw;
      v[1] = bm_max(v[1], -fabs(xd));
      v[2] = bm_max(v[2], -fabs(xd - 1.0));
      v[3] += xd == nm.lo ? 1.0 : 0.0;
      v[4] += xd - nm.lo == nm.range ? 1.0 : 0.0;
      v[5] = bm_max(v[5], xd);
      v[6] = bm_max(v[6], -xd);
    }
    row_reduce<NT, 7>(r, v, 102u);  // slots 1, 2, 5, 6 are maxima
    double m0, m1;
    first_step_offsets(nm, -v[1], -v[2], inv_tau, &m0, &m1);
    const double cmin = v[3], cmax = v[4];
    double ymin, ymax;
    y_bounds(nm, v[5], &ymin, &ymax);
    if (!nm.minmax) ymin = -v[6];
    const double amin = static_cast<double>(a_of<A>(static_cast<A>(ymin), inv_tau));
    const double amax = static_cast<double>(a_of<A>(static_cast<A>(ymax), inv_tau));
    double delta = v[0];
    double lse0 = 0.0, lse1 = 0.0, delta1 = 0.0;
    if (T_it > 0) {
      // The first step's normalisers.
      double s[2] = {0.0, 0.0};
      for (int i = threadIdx.x; i < r.len; i += NT) {
        const double yd = static_cast<double>(normalized<A>(nm, static_cast<double>(X[i])));
        s[0] += exp(-yd * yd * inv_tau - m0);
        s[1] += exp(-(yd - 1.0) * (yd - 1.0) * inv_tau - m1);
      }
      row_reduce<NT, 2>(r, s, 0u);
      lse0 = m0 + log(s[0]);
      lse1 = m1 + log(s[1]);
      // Per iteration t < iters - 1: A_t = sum t1, B_t = sum t2, C_t = sum t1 sn, D_t = sum t2 sp.
      for (int t = 0; t + 1 < T_it; ++t) {
        const double dt = d_at(t);
        const SkCase cs = make_case(amin + dt, amax + dt);
        double u[4] = {0.0, 0.0, 0.0, 0.0};
        for (int i = threadIdx.x; i < r.len; i += NT) {
          const A y = normalized<A>(nm, static_cast<double>(X[i]));
          A t1, t2, sp, sn;
          sk_terms<A>(static_cast<double>(a_of<A>(y, inv_tau)) + dt, cs, t1, t2, sp, sn);
          u[0] += t1;
          u[1] += t2;
          u[2] += t1 * sn;
          u[3] += t2 * sp;
        }
        row_reduce<NT, 4>(r, u, 0u);
        if (threadIdx.x == 0) {
          coef[4 * t + 0] = u[0];
          coef[4 * t + 1] = u[1];
          coef[4 * t + 2] = u[2];
          coef[4 * t + 3] = u[3];
        }
      }
      // delta_t backwards; coef[t] becomes (delta_{t+1} / A_t, delta_{t+1} / B_t).
      if (threadIdx.x == 0) {
        for (int t = T_it - 2; t >= 0; --t) {
          const double At = coef[4 * t + 0], Bt = coef[4 * t + 1];
          const double Rt = coef[4 * t + 2] / At + coef[4 * t + 3] / Bt;
          coef[4 * t + 0] = delta / At;
          coef[4 * t + 1] = delta / Bt;
          delta *= 1.0 - Rt;
        }
        r.red[0] = delta;
      }
      __syncthreads();
      delta1 = r.red[0];
      __syncthreads();
      for (int t = 0; t + 1 < T_it; ++t) {
        const double dt = d_at(t);
        const SkCase cs = make_case(amin + dt, amax + dt);
        const A alpha = static_cast<A>(coef[4 * t + 0]);
        const A beta = static_cast<A>(coef[4 * t + 1]);
        for (int i = threadIdx.x; i < r.len; i += NT) {
          const A y = normalized<A>(nm, static_cast<double>(X[i]));
          A t1, t2, sp, sn;
          sk_terms<A>(static_cast<double>(a_of<A>(y, inv_tau)) + dt, cs, t1, t2, sp, sn);
          acc[i] -= alpha * t1 * sn + beta * t2 * sp;
        }
      }
    }
    // gy = (2/tau) dL/da + delta_1 dd_1/dy, dd_1/dy = -(2/tau) (y P0 - (y - 1) P1).
    double S[2] = {0.0, 0.0};
    for (int i = threadIdx.x; i < r.len; i += NT) {
      const double yd = static_cast<double>(normalized<A>(nm, static_cast<double>(X[i])));
      double gy = c2 * static_cast<double>(acc[i]);
      if (T_it > 0) {
        const double p0 = exp(-yd * yd * inv_tau - lse0);
        const double p1 = exp(-(yd - 1.0) * (yd - 1.0) * inv_tau - lse1);
        gy -= delta1 * c2 * (yd * p0 - (yd - 1.0) * p1);
      }
      acc[i] = static_cast<A>(gy);
      S[0] += gy;
      S[1] += gy * yd;
    }
    row_reduce<NT, 2>(r, S, 0u);
    const bool chain = nm.minmax && !nm.flat;
    const A inv_r = static_cast<A>(chain ? 1.0 / nm.range : 0.0);
    const A at_min = static_cast<A>(chain && cmin > 0 ? (S[1] - S[0]) / (nm.range * cmin) : 0.0);
    const A at_max = static_cast<A>(chain && cmax > 0 ? S[1] / (nm.range * cmax) : 0.0);
    T* out = a.out + off;
    for (int i = threadIdx.x; i < r.len; i += NT) {
      A dx;
      if (!nm.minmax) {
        dx = acc[i];
      } else if (nm.flat) {
        dx = A(0);
      } else {
        const double x = static_cast<double>(X[i]);
        dx = acc[i] * inv_r + (x == nm.lo ? at_min : A(0)) - (x - nm.lo == nm.range ? at_max : A(0));
      }
      out[i] = store_as<T>(dx);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Planning and launchers.

enum class Kernel { kExactFwd, kExactBwd, kSinkhornFwd, kSinkhornBwd };

BIASMAP_HD inline int cached_arrays(Kernel kind) {
  return (kind == Kernel::kExactBwd || kind == Kernel::kSinkhornBwd) ? 3 : 1;
}

struct Plan {
  Layout lay;
  int threads;
  size_t smem;
  bool cooperative;
  unsigned grid;
  // workspace layout (bytes from the start); the first `zero_bytes` must be zeroed
  size_t off_counters, off_partials, off_hist, off_cache, off_coef, bytes, zero_bytes;
};

template <class T, int NT>
inline auto kernel_for(Kernel kind) {
  switch (kind) {
    case Kernel::kExactFwd:
      return &exact_fwd_kernel<T, NT>;
    case Kernel::kExactBwd:
      return &exact_bwd_kernel<T, NT>;
    case Kernel::kSinkhornFwd:
      return &sinkhorn_fwd_kernel<T, NT>;
    default:
      return &sinkhorn_bwd_kernel<T, NT>;
  }
}

template <class T, int NT>
inline Plan make_plan_nt(Kernel kind, int64_t rows, int64_t n, int iters) {
  using A = acc_t<T>;
  const int dev = rt::current_device();
  const int sms = bm_max(1, rt::num_sms(dev));
  const size_t optin = static_cast<size_t>(rt::smem_optin(dev));
  const bool hist = kind == Kernel::kExactFwd;
  const int narr = cached_arrays(kind);
  const size_t fixed = fixed_smem<NT>(hist);
  const size_t per_elem = static_cast<size_t>(narr) * sizeof(A);
  auto kernel = kernel_for<T, NT>(kind);

  Plan p{};
  p.threads = NT;
  p.lay.rows = rows;
  p.lay.n = n;
  p.lay.narr = narr;
  // Blocks per row: enough shared memory for the row, and more when there are
  // few rows and long ones, so that the device fills up.
  const int64_t max_chunk = optin > fixed + 16 * per_elem ? static_cast<int64_t>((optin - fixed - 16) / per_elem) : 0;
  int64_t P = max_chunk > 0 ? ceil_div(n, max_chunk) : INT32_MAX;
  const int64_t spread = bm_min<int64_t>(sms / bm_max<int64_t>(rows, 1), n / kMinSpreadChunk);
  P = bm_max<int64_t>(bm_max<int64_t>(P, spread), 1);
  bool smem_cache = true;
  int64_t capacity = 0;
  if (P > 1) {
    const int64_t chunk = ceil_div(n, P);
    const size_t smem = fixed + smem_bytes<A>(static_cast<size_t>(narr) * chunk);
    if (smem <= optin) {
      rt::allow_dynamic_smem(kernel, smem);
      capacity = static_cast<int64_t>(rt::max_active_blocks(kernel, NT, smem)) * sms;
    }
    if (capacity < P) {
      // The row does not fit the device's shared memory: work from global memory.
      smem_cache = false;
      rt::allow_dynamic_smem(kernel, fixed);
      capacity = static_cast<int64_t>(rt::max_active_blocks(kernel, NT, fixed)) * sms;
      P = bm_max<int64_t>(1, bm_min<int64_t>(capacity, ceil_div(n, NT)));
    }
  }
  p.lay.P = static_cast<int>(P);
  p.lay.chunk = ceil_div(n, P);
  p.lay.smem_cache = smem_cache;
  p.cooperative = P > 1;
  p.lay.groups = static_cast<int>(P > 1 ? bm_max<int64_t>(1, bm_min<int64_t>(rows, capacity / P))
                                        : rows);
  p.grid = static_cast<unsigned>(static_cast<int64_t>(p.lay.groups) * P);
  p.smem = fixed + (smem_cache ? smem_bytes<A>(static_cast<size_t>(narr) * p.lay.chunk) : 0);
  if (P == 1) rt::allow_dynamic_smem(kernel, p.smem);

  // Group counters, histograms and exchange buffers exist only for P > 1.
  const size_t group_count = P > 1 ? static_cast<size_t>(p.lay.groups) : 0;
  size_t off = 0;
  p.off_counters = off;
  off += smem_bytes<unsigned>(group_count);
  p.off_hist = off;
  if (hist && P > 1) off += smem_bytes<int>(static_cast<size_t>(rows) * kHistBins);
  p.zero_bytes = off;
  p.off_partials = off;
  off += smem_bytes<double>(group_count * 2 * P * kGroupMaxSlots);
  p.off_cache = off;
  if (!smem_cache) off += smem_bytes<A>(static_cast<size_t>(p.grid) * narr * p.lay.chunk);
  p.off_coef = off;
  if (kind == Kernel::kSinkhornBwd) off += smem_bytes<double>(static_cast<size_t>(p.grid) * iters * 4);
  p.bytes = off;
  return p;
}

template <class T>
inline Plan make_plan(Kernel kind, int64_t rows, int64_t n, int iters) {
  return n <= kSmallRow ? make_plan_nt<T, kSmallThreads>(kind, rows, n, iters)
                        : make_plan_nt<T, kLargeThreads>(kind, rows, n, iters);
}

// Workspace bytes the launch below needs (0 when there are no rows).
template <class T>
inline size_t workspace_bytes(Kernel kind, int64_t rows, int64_t n, int iters) {
  if (rows == 0) return 0;
  return make_plan<T>(kind, rows, n, iters).bytes;
}

// x, grad, mask, out: contiguous [rows, n]; stats: [rows, 3] (exact) or
// [rows, 2 + 2 iters] (sinkhorn) float64; workspace: workspace_bytes(...) bytes.
template <class T>
cudaError_t launch(Kernel kind, const Args<T>& args, int64_t rows, int64_t n, void* workspace,
                   cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  const Plan p = make_plan<T>(kind, rows, n, args.iters);
  auto* base = static_cast<unsigned char*>(workspace);
  Workspace ws;
  ws.counters = reinterpret_cast<unsigned*>(base + p.off_counters);
  ws.hist = reinterpret_cast<int*>(base + p.off_hist);
  ws.partials = reinterpret_cast<double*>(base + p.off_partials);
  ws.cache = base + p.off_cache;
  ws.coef = reinterpret_cast<double*>(base + p.off_coef);
  if (p.zero_bytes > 0) {
    const cudaError_t err = rt::memset_async(base, 0, p.zero_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  auto go = [&](auto kernel) {
    return launch_kernel(kernel, dim3(p.grid), dim3(p.threads), p.smem, stream, p.cooperative, args,
                         p.lay, ws);
  };
  if (p.threads == kSmallThreads) return go(kernel_for<T, kSmallThreads>(kind));
  return go(kernel_for<T, kLargeThreads>(kind));
}

}  // namespace topk
}  // namespace cuda
}  // namespace biasmap
