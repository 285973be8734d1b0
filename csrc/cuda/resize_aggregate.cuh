// CUDA kernels for biasmap::resize_aggregate_fwd / resize_aggregate_bwd.
//
// Forward: out[b, t] = sum_i bilinear_resize(maps_i[b, t], (OH, OW)) (or one
// slice per map with per_map), bilinear exactly as F.interpolate(...,
// align_corners=False): per axis scale = in / out, src = scale * (dst + 0.5) - 0.5
// clamped at 0, i0 = floor(src), i1 = min(i0 + 1, in - 1), weights (1 - f, f) with
// f = src - i0. One gather pass: each output pixel reads its 4 source pixels of
// every map and writes once; maps are added in index order.
// Backward (the adjoint, as a gather): each source pixel (y, x) of map i sums
// w_y(oy) w_x(ox) grad[oy, ox] over the output pixels whose stencil contains it:
// w_y(oy) = [i0(oy) == y] (1 - f) + [i1(oy) == y] f. Those oy form a short
// contiguous run, found by inverting src and then checked exactly with the
// forward's own index arithmetic. Deterministic; no atomics.
#pragma once

#include "cuda/common.cuh"

namespace biasmap {
namespace cuda {
namespace resize {

constexpr int kThreads = 256;
// Maps per launch (kernel parameter space); more maps take several launches.
constexpr int kMaxMaps = 32;

// IEEE division even under --use_fast_math: torch computes in / out exactly.
BM_HD_INLINE float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
BM_HD_INLINE double div_rn(double a, double b) { return a / b; }

// One output coordinate's source indices and weights (PyTorch's
// area_pixel_compute_source_index for align_corners=False, non-cubic).
template <class A>
struct Tap {
  int i0, i1;
  A l0, l1;
};
template <class A>
BIASMAP_HD inline Tap<A> source_tap(int dst, A scale, int in_size) {
  A src = scale * (static_cast<A>(dst) + A(0.5)) - A(0.5);
  if (src < A(0)) src = A(0);
  Tap<A> t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.l1 = src - static_cast<A>(t.i0);
  t.l0 = A(1) - t.l1;
  return t;
}
// Weight of source index `s` in output index `dst`'s tap.
template <class A>
BIASMAP_HD inline A tap_weight(const Tap<A>& t, int s) {
  return (t.i0 == s ? t.l0 : A(0)) + (t.i1 == s ? t.l1 : A(0));
}
// A superset of the output indices whose tap touches source index s: from
// i0(dst) in {s - 1, s}, i.e. s - 1 <= src < s + 1, widened by one on each side
// against rounding (the exact test is tap_weight).
BIASMAP_HD inline void dst_range(int s, int in_size, int out_size, int* lo, int* hi) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double a = (s - 0.5) / scale - 0.5;
  const double b = (s + 1.5) / scale - 0.5;
  int l = static_cast<int>(floor(a)) - 1;
  int h = static_cast<int>(ceil(b)) + 1;
  *lo = l < 0 ? 0 : l;
  *hi = h > out_size - 1 ? out_size - 1 : h;
}

template <class T>
struct MapPtrs {
  const T* src[kMaxMaps];
  T* dst[kMaxMaps];  // backward: the gradient of each map
  int h[kMaxMaps];
  int w[kMaxMaps];
  int count;
};

// planes = B*T. out: [B, T, OH, OW] (accumulate adds to it), or with per_map
// [B, M_total, T, OH, OW] where this launch's maps start at map_offset.
template <class T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(MapPtrs<T> maps, int64_t batch, int64_t tokens, int out_h, int out_w,
                   bool per_map, int map_offset, int64_t total_maps, bool accumulate,
                   T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t planes = batch * tokens;
  const int64_t total = planes * out_h * out_w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int ox = static_cast<int>(idx % out_w);
    const int oy = static_cast<int>((idx / out_w) % out_h);
    const int64_t plane = idx / (static_cast<int64_t>(out_w) * out_h);
    A sum = A(0);
    if (!per_map && accumulate) sum = load_as<A>(out, idx);
    for (int i = 0; i < maps.count; ++i) {
      const int h = maps.h[i], w = maps.w[i];
      const Tap<A> ty = source_tap<A>(oy, div_rn(static_cast<A>(h), static_cast<A>(out_h)), h);
      const Tap<A> tx = source_tap<A>(ox, div_rn(static_cast<A>(w), static_cast<A>(out_w)), w);
      const T* src = maps.src[i] + plane * h * w;
      const A v00 = load_as<A>(src, static_cast<int64_t>(ty.i0) * w + tx.i0);
      const A v01 = load_as<A>(src, static_cast<int64_t>(ty.i0) * w + tx.i1);
      const A v10 = load_as<A>(src, static_cast<int64_t>(ty.i1) * w + tx.i0);
      const A v11 = load_as<A>(src, static_cast<int64_t>(ty.i1) * w + tx.i1);
      const A v = ty.l0 * (tx.l0 * v00 + tx.l1 * v01) + ty.l1 * (tx.l0 * v10 + tx.l1 * v11);
      if (per_map) {
        const int64_t b = plane / tokens, t = plane % tokens;
        const int64_t o = (((b * total_maps + map_offset + i) * tokens + t) * out_h + oy) * out_w + ox;
        out[o] = store_as<T>(v);
      } else {
        sum += v;
      }
    }
    if (!per_map) out[idx] = store_as<T>(sum);
  }
}

// blockIdx.y selects the map; threads cover its B*T*h*w source pixels.
template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(MapPtrs<T> maps, const T* __restrict__ grad, int64_t batch, int64_t tokens,
                    int out_h, int out_w, bool per_map, int map_offset, int64_t total_maps) {
  using A = acc_t<T>;
  const int i = blockIdx.y;
  const int h = maps.h[i], w = maps.w[i];
  const int64_t planes = batch * tokens;
  const int64_t total = planes * h * w;
  const A scale_y = div_rn(static_cast<A>(h), static_cast<A>(out_h));
  const A scale_x = div_rn(static_cast<A>(w), static_cast<A>(out_w));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int x = static_cast<int>(idx % w);
    const int y = static_cast<int>((idx / w) % h);
    const int64_t plane = idx / (static_cast<int64_t>(w) * h);
    const int64_t b = plane / tokens, t = plane % tokens;
    const int64_t gplane = per_map ? (b * total_maps + map_offset + i) * tokens + t : plane;
    const T* g = grad + gplane * out_h * out_w;
    int oy_lo, oy_hi, ox_lo, ox_hi;
    dst_range(y, h, out_h, &oy_lo, &oy_hi);
    dst_range(x, w, out_w, &ox_lo, &ox_hi);
    A acc = A(0);
    for (int oy = oy_lo; oy <= oy_hi; ++oy) {
      const A wy = tap_weight(source_tap<A>(oy, scale_y, h), y);
      if (wy == A(0)) continue;
      A row = A(0);
      for (int ox = ox_lo; ox <= ox_hi; ++ox) {
        const A wx = tap_weight(source_tap<A>(ox, scale_x, w), x);
        if (wx != A(0)) row += wx * load_as<A>(g, static_cast<int64_t>(oy) * out_w + ox);
      }
      acc += wy * row;
    }
    maps.dst[i][idx] = store_as<T>(acc);
  }
}

// ---------------------------------------------------------------------------
// Launchers. maps[i]: contiguous [B, T, h[i], w[i]]; out / grad as described
// above; grads[i] shaped like maps[i].

template <class T>
cudaError_t forward(const T* const* maps, const int* h, const int* w, int num_maps, int64_t batch,
                    int64_t tokens, int out_h, int out_w, bool per_map, T* out, int num_sms,
                    cudaStream_t stream) {
  const int64_t total = batch * tokens * out_h * out_w;
  if (total == 0 || num_maps == 0) return cudaSuccess;
  const int64_t blocks = bm_min<int64_t>(ceil_div(total, kThreads), 16LL * num_sms);
  for (int first = 0; first < num_maps; first += kMaxMaps) {
    MapPtrs<T> p{};
    p.count = bm_min(kMaxMaps, num_maps - first);
    for (int j = 0; j < p.count; ++j) {
      p.src[j] = maps[first + j];
      p.dst[j] = nullptr;
      p.h[j] = h[first + j];
      p.w[j] = w[first + j];
    }
    const cudaError_t err = launch_kernel(
        forward_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, false, p,
        batch, tokens, out_h, out_w, per_map, first, static_cast<int64_t>(num_maps), first > 0, out);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class T>
cudaError_t backward(const T* grad, const int* h, const int* w, int num_maps, int64_t batch,
                     int64_t tokens, int out_h, int out_w, bool per_map, T* const* grads,
                     int num_sms, cudaStream_t stream) {
  for (int first = 0; first < num_maps; first += kMaxMaps) {
    MapPtrs<T> p{};
    p.count = bm_min(kMaxMaps, num_maps - first);
    int64_t largest = 0;
    for (int j = 0; j < p.count; ++j) {
      p.src[j] = nullptr;
      p.dst[j] = grads[first + j];
      p.h[j] = h[first + j];
      p.w[j] = w[first + j];
      largest = bm_max<int64_t>(largest, batch * tokens * h[first + j] * w[first + j]);
    }
    if (largest == 0) continue;
    const int64_t blocks = bm_min<int64_t>(ceil_div(largest, kThreads), 16LL * num_sms);
    const cudaError_t err = launch_kernel(
        backward_kernel<T>, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p.count)),
        dim3(kThreads), 0, stream, false, p, grad, batch, tokens, out_h, out_w, per_map, first,
        static_cast<int64_t>(num_maps));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace resize
}  // namespace cuda
}  // namespace biasmap
