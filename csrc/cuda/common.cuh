// Shared pieces of the biasmap CUDA kernels (csrc/cuda/*.cuh).
//
// Every kernel header takes raw pointers, sizes and a cudaStream_t, and includes
// no torch header, so that
//   * nvcc compile-checks each header for sm_80 / sm_90 without torch's CUDA
//     libraries (scripts/nvcc_check.sh), and
//   * the same source runs on the CPU under csrc/cuda/host_emu/cuda_host_emu.h,
//     one std::thread per CUDA thread, which is how the kernels' logic is tested
//     on machines without a GPU (tests/test_cuda_compile.py).
// The emulation supports only what these kernels use, which sets the rules:
//   * shared memory is only the dynamic block (dyn_smem()); no static __shared__,
//   * block-wide sync is __syncthreads(), warp collectives use full masks and are
//     reached by all 32 lanes, blocks are 1-D with a multiple of 32 threads,
//   * launches go through launch_kernel(), CUDA runtime queries through rt::.
// Determinism: every reduction here has a fixed association order that depends
// only on the launch shape, never on timing; no floating-point atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#if !defined(__CUDACC__) && !defined(BIASMAP_CUDA_EMU)
#error "csrc/cuda headers compile with nvcc, or on the host under host_emu/cuda_host_emu.h"
#endif

// Same definition as csrc/common/macros.h (identical redefinitions are allowed).
#ifndef BIASMAP_HD
#ifdef __CUDACC__
#define BIASMAP_HD __host__ __device__
#else
#define BIASMAP_HD
#endif
#endif

#ifdef __CUDACC__
#define BM_DEVICE __device__ __forceinline__
#define BM_HD_INLINE __host__ __device__ __forceinline__
#else
#define BM_DEVICE inline
#define BM_HD_INLINE inline
#endif

namespace biasmap {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Types: inputs may be float, double, __half or __nv_bfloat16; arithmetic runs in
// acc_t (float, or double for double inputs).

template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccType<T>::type;

// Value of an input element in its natural arithmetic type (float or double).
// Only explicit conversion functions are used for __half / __nv_bfloat16: torch
// builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and friends.
BM_HD_INLINE float to_compute(float v) { return v; }
BM_HD_INLINE double to_compute(double v) { return v; }
BM_HD_INLINE float to_compute(__half v) { return __half2float(v); }
BM_HD_INLINE float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class A, class T>
BM_HD_INLINE A load_as(const T* p, int64_t i) {
  return static_cast<A>(to_compute(p[i]));
}

template <class T>
struct Store;
template <>
struct Store<float> {
  static BM_HD_INLINE float from(double v) { return static_cast<float>(v); }
};
template <>
struct Store<double> {
  static BM_HD_INLINE double from(double v) { return v; }
};
template <>
struct Store<__half> {
  static BM_HD_INLINE __half from(double v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct Store<__nv_bfloat16> {
  static BM_HD_INLINE __nv_bfloat16 from(double v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
// float -> float and double -> double are exact; a float value passed as double
// converts back exactly, so float math never gets double rounding here.
template <class T, class A>
BM_HD_INLINE T store_as(A v) {
  return Store<T>::from(static_cast<double>(v));
}
template <>
BM_HD_INLINE float store_as<float, float>(float v) {
  return v;
}
template <>
BM_HD_INLINE __half store_as<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
BM_HD_INLINE __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------
// Scalar math shared by host and device (overloaded on float / double).

template <class A>
BM_HD_INLINE A bm_min(A a, A b) {
  return b < a ? b : a;
}
template <class A>
BM_HD_INLINE A bm_max(A a, A b) {
  return a < b ? b : a;
}
BM_HD_INLINE float bm_exp(float x) { return ::expf(x); }
BM_HD_INLINE double bm_exp(double x) { return ::exp(x); }
BM_HD_INLINE float bm_log(float x) { return ::logf(x); }
BM_HD_INLINE double bm_log(double x) { return ::log(x); }
BM_HD_INLINE float bm_abs(float x) { return ::fabsf(x); }
BM_HD_INLINE double bm_abs(double x) { return ::fabs(x); }
// 1 / (1 + e) for e >= 0, written as a division so that it stays correctly
// rounded where nvcc's --use_fast_math is off and approximately so where it is on.
template <class A>
BM_HD_INLINE A one_over_one_plus(A e) {
  return A(1) / (A(1) + e);
}

// sigmoid(z) and sigmoid(-z) from one exp and one reciprocal, without overflow:
// e = exp(-|z|) <= 1, so 1 + e never overflows and the small side is e / (1 + e).
template <class A>
BM_HD_INLINE void sigmoid_pair(A z, A& s_pos, A& s_neg) {
  const A e = bm_exp(-bm_abs(z));
  const A r = one_over_one_plus(e);
  const A small = e * r;
  s_pos = z >= A(0) ? r : small;
  s_neg = z >= A(0) ? small : r;
}

BM_HD_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Runtime queries and launches. On the host emulation these go to the emulated
// device (host_emu/cuda_host_emu.h); on a GPU to the CUDA runtime.

namespace rt {

#ifdef BIASMAP_CUDA_EMU
inline int current_device() { return 0; }
inline int num_sms(int) { return bm_emu::device().num_sms; }
inline int smem_optin(int) { return bm_emu::device().smem_optin; }
template <class F>
inline int max_active_blocks(F, int threads, size_t smem) {
  const auto& d = bm_emu::device();
  if (smem > static_cast<size_t>(d.smem_optin) || threads > 1024) return 0;
  return d.max_blocks_per_sm;
}
template <class F>
inline cudaError_t allow_dynamic_smem(F, size_t) {
  return cudaSuccess;
}
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
#else
inline int current_device() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}
inline int num_sms(int dev) {
  int v = 0;
  cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
  return v;
}
// Largest dynamic shared memory one block may opt in to (227 KiB on sm_90,
// 163 KiB on sm_80).
inline int smem_optin(int dev) {
  int v = 0;
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return v;
}
template <class F>
inline int max_active_blocks(F kernel, int threads, size_t smem) {
  int v = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so the caller's launch check is clean
    return 0;
  }
  return v;
}
// Kernels asking for more than 48 KiB of dynamic shared memory must opt in.
template <class F>
inline cudaError_t allow_dynamic_smem(F kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t s) {
  return cudaMemsetAsync(p, v, n, s);
}
#endif

}  // namespace rt

// Launches `kernel` with the given arguments on `stream`. `cooperative` uses
// cudaLaunchCooperativeKernel, which guarantees that all blocks are resident at
// once (needed by the kernels whose blocks wait for each other); the grid must
// then fit the device, which the callers ensure through rt::max_active_blocks.
template <class... P, class... A>
inline cudaError_t launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, bool cooperative, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  std::tuple<P...> params(std::forward<A>(args)...);
#ifdef BIASMAP_CUDA_EMU
  (void)stream;
  return bm_emu::launch(kernel, grid, block, smem, cooperative, params);
#else
  void* argv[sizeof...(P) > 0 ? sizeof...(P) : 1];
  std::apply(
      [&argv](auto&... p) {
        int i = 0;
        ((argv[i++] = static_cast<void*>(&p)), ...);
      },
      params);
  const void* fn = reinterpret_cast<const void*>(kernel);
  return cooperative ? cudaLaunchCooperativeKernel(fn, grid, block, argv, smem, stream)
                     : cudaLaunchKernel(fn, grid, block, argv, smem, stream);
#endif
}

// ---------------------------------------------------------------------------
// Device-side building blocks.

#ifdef __CUDACC__
extern __shared__ __align__(16) unsigned char bm_dyn_smem_[];
BM_DEVICE unsigned char* dyn_smem() { return bm_dyn_smem_; }
BM_DEVICE void spin_pause() { __nanosleep(64); }
template <class V>
BM_DEVICE V load_cg(const V* p) {
  return __ldcg(p);  // L2 only: sees other blocks' writes, never a stale L1 line
}
BM_DEVICE unsigned load_volatile(const unsigned* p) {
  return *reinterpret_cast<const volatile unsigned*>(p);
}
#else
inline unsigned char* dyn_smem() { return bm_emu::dyn_smem(); }
inline void spin_pause() { bm_emu::spin_pause(); }
template <class V>
inline V load_cg(const V* p) {
  return bm_emu::load_shared_global(p);
}
inline unsigned load_volatile(const unsigned* p) { return bm_emu::load_shared_global(p); }
#endif

// Carves the dynamic shared memory block into typed arrays, 16-byte aligned.
struct SmemCarver {
  unsigned char* base;
  size_t offset = 0;
  template <class V>
  BM_HD_INLINE V* take(size_t count) {
    V* p = reinterpret_cast<V*>(base + offset);
    offset += (count * sizeof(V) + 15) / 16 * 16;
    return p;
  }
};
template <class V>
BM_HD_INLINE constexpr size_t smem_bytes(size_t count) {
  return (count * sizeof(V) + 15) / 16 * 16;
}

template <class V>
BM_DEVICE V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
template <class V>
BM_DEVICE V warp_max(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = bm_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Bit k of `max_mask` selects max for slot k, otherwise sum.
template <int K>
BM_DEVICE void warp_reduce(double (&v)[K], unsigned max_mask) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double o = __shfl_xor_sync(kFullMask, v[k], off);
      v[k] = ((max_mask >> k) & 1u) ? bm_max(v[k], o) : v[k] + o;
    }
  }
}

template <int K>
BM_HD_INLINE double reduce_identity(unsigned max_mask, int k) {
  return ((max_mask >> k) & 1u) ? -INFINITY : 0.0;
}

// Scratch doubles block_reduce needs (NT/32 warp rows + one result row, K each).
template <int NT, int K>
BM_HD_INLINE constexpr size_t block_reduce_scratch() {
  return static_cast<size_t>(NT / 32 + 1) * K;
}

// K sums/maxima over the block; every thread gets the results. The association
// order is fixed by NT alone. `scratch` holds block_reduce_scratch<NT, K>() doubles.
template <int NT, int K>
BM_DEVICE void block_reduce(double (&v)[K], unsigned max_mask, double* scratch) {
  static_assert(NT % 32 == 0 && NT <= 1024, "blocks are whole warps");
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_reduce<K>(v, max_mask);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = lane < NW ? scratch[lane * K + k] : reduce_identity<K>(max_mask, k);
    warp_reduce<K>(v, max_mask);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[NW * K + k] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch[NW * K + k];
  // A following call first writes rows [0, NW) and syncs before it writes row NW
  // again, so no trailing barrier is needed for scratch reuse.
}

// ---------------------------------------------------------------------------
// Groups of blocks that cooperate on one row (map): used when one row is too
// large for one block. All P blocks of a group run in one cooperative launch, so
// they are co-resident and may wait for each other.

constexpr int kGroupMaxSlots = 8;

struct GroupSync {
  int P = 1;                      // blocks in the group
  int part = 0;                   // this block's index in it
  unsigned* counter = nullptr;    // the group's arrival counter (zeroed before launch)
  double* partials = nullptr;     // the group's [2][P][kGroupMaxSlots] exchange buffer
  unsigned phase = 0;             // barriers this block has passed
};

// Waits until all P blocks of the group have arrived. Writes made by any of
// them before arriving are visible afterwards through load_cg.
BM_DEVICE void group_barrier(GroupSync& g) {
  if (g.P == 1) {
    __syncthreads();
    return;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(g.counter, 1u);
    const unsigned target = (g.phase + 1u) * static_cast<unsigned>(g.P);
    while (load_volatile(g.counter) < target) spin_pause();
    __threadfence();
  }
  ++g.phase;
  __syncthreads();
}

// block_reduce, then across the group: every thread of every block of the
// group gets the same K results, combined in a fixed order (block results in
// part order 0..P-1, strided over 32 lanes, then a fixed shuffle tree).
template <int NT, int K>
BM_DEVICE void group_reduce(double (&v)[K], unsigned max_mask, double* scratch, GroupSync& g) {
  static_assert(K <= kGroupMaxSlots, "too many slots for the exchange buffer");
  block_reduce<NT, K>(v, max_mask, scratch);
  if (g.P == 1) return;
  double* buf = g.partials + static_cast<size_t>(g.phase & 1u) * g.P * kGroupMaxSlots;
  if (threadIdx.x < K) {
    buf[static_cast<size_t>(g.part) * kGroupMaxSlots + threadIdx.x] = v[threadIdx.x];
    __threadfence();
  }
  group_barrier(g);
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double* result = scratch;  // block_reduce is done with it; NW*K >= K slots
  for (int k = warp; k < K; k += NW) {
    const bool is_max = (max_mask >> k) & 1u;
    double acc = is_max ? -INFINITY : 0.0;
    for (int p = lane; p < g.P; p += 32) {
      const double o = load_cg(buf + static_cast<size_t>(p) * kGroupMaxSlots + k);
      acc = is_max ? bm_max(acc, o) : acc + o;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double o = __shfl_xor_sync(kFullMask, acc, off);
      acc = is_max ? bm_max(acc, o) : acc + o;
    }
    if (lane == 0) result[k] = acc;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = result[k];
  __syncthreads();  // result aliases block_reduce's scratch rows
}

// Inclusive prefix sum of one int per thread over the block (fixed order).
// `scratch` holds NT/32 + 1 ints. Returns this thread's inclusive sum; *total
// gets the block total.
template <int NT>
BM_DEVICE long long block_inclusive_scan(long long v, long long* scratch, long long* total) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const long long o = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += o;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    long long w = lane < NW ? scratch[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const long long o = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += o;
    }
    if (lane < NW) scratch[lane] = w;  // inclusive warp totals
    if (lane == NW - 1) scratch[NW] = w;
  }
  __syncthreads();
  const long long before = warp > 0 ? scratch[warp - 1] : 0;
  *total = scratch[NW];
  __syncthreads();
  return v + before;
}

}  // namespace cuda
}  // namespace biasmap
