// CUDA kernel for biasmap::quantile_mask: x [B, n] -> bool [B, n],
// x >= quantile_q(row) (x > it when not inclusive), with torch.quantile's
// "linear" interpolation reproduced bit for bit:
//   rank = q * (n - 1) in the row's scalar type S (float, or double for double),
//   below = trunc(rank), above = ceil(rank), w = rank - below,
//   lo, hi = the below-th and above-th smallest values,
//   thr = w < 0.5 ? lo + w (hi - lo) : hi - (hi - lo)(1 - w), each with one
//   fused multiply-add as torch's CPU lerp kernel (measured: its float results
//   match the fused form, not the two-rounding one).
// One block per row selects lo by radix select over order-preserving integer
// keys (8 bits per pass, counts in shared memory with integer atomics, so the
// result is exact and deterministic), then finds hi with one counting pass. The
// keys sit in shared memory when the row fits, otherwise every pass re-reads x.
#pragma once

#include "cuda/common.cuh"

namespace biasmap {
namespace cuda {
namespace quantile {

constexpr int kThreads = 512;

// Order-preserving unsigned keys (IEEE sign-magnitude -> two's-order): larger
// values give larger keys; -0.0 sorts just below +0.0, which changes no value.
BIASMAP_HD inline uint32_t to_key(float v) {
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
BIASMAP_HD inline uint64_t to_key(double v) {
  uint64_t u;
#ifdef __CUDA_ARCH__
  u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
BIASMAP_HD inline float from_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float v;
#ifdef __CUDA_ARCH__
  v = __uint_as_float(u);
#else
  std::memcpy(&v, &u, sizeof(v));
#endif
  return v;
}
BIASMAP_HD inline double from_key(uint64_t k) {
  const uint64_t u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
  double v;
#ifdef __CUDA_ARCH__
  v = __longlong_as_double(static_cast<long long>(u));
#else
  std::memcpy(&v, &u, sizeof(v));
#endif
  return v;
}

template <class S>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

BM_HD_INLINE float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return ::fmaf(a, b, c);
#endif
}
BM_HD_INLINE double fma_rn(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, c);
#else
  return ::fma(a, b, c);
#endif
}
BM_HD_INLINE float ceil_s(float v) { return ::ceilf(v); }
BM_HD_INLINE double ceil_s(double v) { return ::ceil(v); }

// torch.quantile's interpolation position for q over n sorted values.
template <class S>
struct Rank {
  int64_t below, above;
  S weight;
};
template <class S>
BIASMAP_HD inline Rank<S> quantile_rank(double q, int64_t n) {
  const S rank = static_cast<S>(q) * static_cast<S>(n - 1);
  Rank<S> r;
  r.below = static_cast<int64_t>(rank);
  r.above = static_cast<int64_t>(ceil_s(rank));
  r.weight = rank - static_cast<S>(r.below);
  return r;
}
// torch.lerp(lo, hi, w) as its kernels compute it (fused multiply-adds).
template <class S>
BIASMAP_HD inline S lerp_like_torch(S lo, S hi, S w) {
  const S d = hi - lo;
  return w < S(0.5) ? fma_rn(w, d, lo) : fma_rn(-d, S(1) - w, hi);
}

struct Smem {
  unsigned* hist;       // [256]
  long long* scan;      // [NT/32 + 1]
  long long* sel;       // [2]: chosen digit, count below it
  double* reduce;       // block_reduce scratch
};

// The key of rank r (0-based, ascending) among keys key_at(0..n-1).
template <int NT, class K, class KeyAt>
BM_DEVICE K radix_select(const KeyAt& key_at, int64_t n, int64_t r, const Smem& sm) {
  static_assert(NT >= 256, "one thread per digit in the scan");
  constexpr int kBits = static_cast<int>(sizeof(K) * 8);
  K prefix = 0;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    const K high = shift + 8 >= kBits ? K(0) : static_cast<K>(~K(0) << (shift + 8));
    for (int j = threadIdx.x; j < 256; j += NT) sm.hist[j] = 0u;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += NT) {
      const K k = key_at(i);
      if ((k & high) == prefix) atomicAdd(&sm.hist[static_cast<int>((k >> shift) & 255u)], 1u);
    }
    __syncthreads();
    const long long c = threadIdx.x < 256 ? static_cast<long long>(sm.hist[threadIdx.x]) : 0;
    long long total;
    const long long incl = block_inclusive_scan<NT>(c, sm.scan, &total);
    if (threadIdx.x < 256 && c > 0 && incl - c <= r && r < incl) {
      sm.sel[0] = threadIdx.x;
      sm.sel[1] = incl - c;
    }
    __syncthreads();
    prefix |= static_cast<K>(sm.sel[0]) << shift;
    r -= sm.sel[1];
    __syncthreads();
  }
  return prefix;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    quantile_mask_kernel(const T* __restrict__ x, int64_t n, double q, bool inclusive,
                         bool cache_keys, uint8_t* __restrict__ out) {
  using S = acc_t<T>;
  using K = typename KeyOf<S>::type;
  constexpr int NT = kThreads;
  SmemCarver carve{dyn_smem()};
  Smem sm;
  sm.hist = carve.take<unsigned>(256);
  sm.scan = carve.take<long long>(NT / 32 + 1);
  sm.sel = carve.take<long long>(2);
  sm.reduce = carve.take<double>(block_reduce_scratch<NT, 2>());
  K* keys = carve.take<K>(cache_keys ? static_cast<size_t>(n) : 0);

  const T* xr = x + static_cast<int64_t>(blockIdx.x) * n;
  if (cache_keys) {
    for (int64_t i = threadIdx.x; i < n; i += NT) keys[i] = to_key(load_as<S>(xr, i));
    __syncthreads();
  }
  auto key_at = [&](int64_t i) -> K { return cache_keys ? keys[i] : to_key(load_as<S>(xr, i)); };

  const Rank<S> rank = quantile_rank<S>(q, n);
  const K klo = radix_select<NT, K>(key_at, n, rank.below, sm);
  const S lo = from_key(klo);
  S hi = lo;
  if (rank.above != rank.below) {
    // hi is lo again when lo's copies reach past rank `above`, else the next
    // larger value.
    double v[2] = {0.0, -INFINITY};
    for (int64_t i = threadIdx.x; i < n; i += NT) {
      const K k = key_at(i);
      if (k <= klo) {
        v[0] += 1.0;
      } else {
        v[1] = bm_max(v[1], -static_cast<double>(from_key(k)));
      }
    }
    block_reduce<NT, 2>(v, 2u, sm.reduce);
    const int64_t count_le = static_cast<int64_t>(v[0]);
    if (count_le - 1 < rank.above) hi = static_cast<S>(-v[1]);
  }
  const S thr = lerp_like_torch<S>(lo, hi, rank.weight);
  uint8_t* o = out + static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += NT) {
    const S v = load_as<S>(xr, i);
    o[i] = (inclusive ? v >= thr : v > thr) ? 1 : 0;
  }
}

// x: contiguous [rows, n] (n >= 1, no NaN); out: bool [rows, n] as bytes.
template <class T>
cudaError_t quantile_mask(const T* x, int64_t rows, int64_t n, double q, bool inclusive,
                          uint8_t* out, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  using S = acc_t<T>;
  using K = typename KeyOf<S>::type;
  constexpr int NT = kThreads;
  const size_t fixed = smem_bytes<unsigned>(256) + smem_bytes<long long>(NT / 32 + 1) +
                       smem_bytes<long long>(2) + smem_bytes<double>(block_reduce_scratch<NT, 2>());
  const int dev = rt::current_device();
  // Cache the row's keys when they fit in a modest slice of shared memory.
  const size_t budget = bm_min<size_t>(96 * 1024, static_cast<size_t>(rt::smem_optin(dev)));
  const size_t key_bytes = smem_bytes<K>(static_cast<size_t>(n));
  const bool cache = fixed + key_bytes <= budget;
  const size_t smem = fixed + (cache ? key_bytes : 0);
  cudaError_t err = rt::allow_dynamic_smem(quantile_mask_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  return launch_kernel(quantile_mask_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(NT), smem,
                       stream, false, x, n, q, inclusive, cache, out);
}

}  // namespace quantile
}  // namespace cuda
}  // namespace biasmap
