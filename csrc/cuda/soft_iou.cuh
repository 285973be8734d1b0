// CUDA kernels for biasmap::soft_iou_fwd / soft_iou_bwd / mask_iou.
//
// soft_iou_fwd: E = I / (Sa + Sb - I + eps), I = sum a*b, Sa = sum a, Sb = sum b
// per row of a, b [B, n]. One pass over a and b: blocks sum chunks of a row into
// float64 partials [B, C, 3], and a second small kernel adds each row's C
// partials in a fixed order (deterministic, no atomics) and writes
// sums [B, 3] float64 = (I, Sa, Sb) and iou [B].
// soft_iou_bwd (element-wise, the sums are saved by the forward):
//   dE/da_i = g (b_i U - I (1 - b_i)) / U^2,  U = Sa + Sb - I + eps, likewise for b.
// mask_iou: bool a, b [B, n] -> float32 [B] = |a & b| / |a | b|, 0 for an empty
// union; one block per row, integer counts, an IEEE division.
#pragma once

#include "cuda/common.cuh"

namespace biasmap {
namespace cuda {
namespace soft_iou {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                        int64_t chunk, int64_t chunks, double* __restrict__ partials) {
  // Flat grid (rows * chunks blocks): grid.y would cap rows at 65535.
  const int64_t row = blockIdx.x / chunks;
  const int64_t c = blockIdx.x % chunks;
  const int64_t begin = c * chunk;
  const int64_t end = bm_min<int64_t>(n, begin + chunk);
  const T* ar = a + row * n;
  const T* br = b + row * n;
  double v[3] = {0.0, 0.0, 0.0};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double x = to_compute(ar[i]);
    const double y = to_compute(br[i]);
    v[0] += x * y;
    v[1] += x;
    v[2] += y;
  }
  double* scratch = reinterpret_cast<double*>(dyn_smem());
  block_reduce<kThreads, 3>(v, 0u, scratch);
  if (threadIdx.x < 3) partials[(row * chunks + c) * 3 + threadIdx.x] = v[threadIdx.x];
}

// One warp per row: adds the row's C partials (lane-strided, then a fixed
// shuffle tree) and finishes E.
template <class T>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const double* __restrict__ partials, int64_t rows, int64_t chunks, double eps,
                  double* __restrict__ sums, T* __restrict__ iou) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  double v[3] = {0.0, 0.0, 0.0};
  for (int64_t c = lane; c < chunks; c += 32) {
#pragma unroll
    for (int k = 0; k < 3; ++k) v[k] += partials[(row * chunks + c) * 3 + k];
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
    sums[row * 3 + 0] = v[0];
    sums[row * 3 + 1] = v[1];
    sums[row * 3 + 2] = v[2];
    iou[row] = store_as<T>(v[0] / (v[1] + v[2] - v[0] + eps));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ a, const T* __restrict__ b,
                    const double* __restrict__ sums, int64_t rows, int64_t n, double eps,
                    T* __restrict__ grad_a, T* __restrict__ grad_b) {
  using A = acc_t<T>;
  const int64_t total = rows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / n;
    const double inter = sums[row * 3 + 0];
    const double u = sums[row * 3 + 1] + sums[row * 3 + 2] - inter + eps;
    const double g = to_compute(grad[row]);
    // dE/da_i = b_i * (g / U) - (1 - b_i) * (g I / U^2) = b_i (c + e) - e.
    const A c = static_cast<A>(g / u);
    const A e = static_cast<A>(g * inter / (u * u));
    const A x = load_as<A>(a, i);
    const A y = load_as<A>(b, i);
    grad_a[i] = store_as<T>(y * (c + e) - e);
    grad_b[i] = store_as<T>(x * (c + e) - e);
  }
}

__global__ void __launch_bounds__(kThreads)
    mask_iou_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, int64_t n,
                    float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const uint8_t* ar = a + row * n;
  const uint8_t* br = b + row * n;
  long long inter = 0, uni = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const bool x = ar[i] != 0, y = br[i] != 0;
    inter += (x && y) ? 1 : 0;
    uni += (x || y) ? 1 : 0;
  }
  // Counts below 2^53 are exact in double, so the reduction is exact.
  double v[2] = {static_cast<double>(inter), static_cast<double>(uni)};
  block_reduce<kThreads, 2>(v, 0u, reinterpret_cast<double*>(dyn_smem()));
  if (threadIdx.x == 0) {
    const float fi = static_cast<float>(static_cast<long long>(v[0]));
    const float fu = static_cast<float>(static_cast<long long>(v[1]));
    // __fdiv_rn: IEEE division even under --use_fast_math, as torch's CPU float division.
    out[row] = v[1] > 0 ? __fdiv_rn(fi, fu) : 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Launchers. Pointers are to contiguous [B, n] rows on the current device.

// Bytes of float64 workspace soft_iou_forward needs (the [B, C, 3] partials).
inline int64_t forward_chunks(int64_t rows, int64_t n, int num_sms) {
  // Enough blocks to fill the device twice, but chunks of at least 2048 elements.
  const int64_t want = ceil_div(2 * static_cast<int64_t>(num_sms), bm_max<int64_t>(rows, 1));
  return bm_max<int64_t>(1, bm_min<int64_t>(want, ceil_div(n, 2048)));
}
inline size_t forward_workspace_bytes(int64_t rows, int64_t n, int num_sms) {
  return static_cast<size_t>(rows * forward_chunks(rows, n, num_sms) * 3) * sizeof(double);
}

// a, b: [rows, n]; sums: [rows, 3] float64; iou: [rows]; workspace: at least
// forward_workspace_bytes(rows, n, num_sms) bytes.
template <class T>
cudaError_t forward(const T* a, const T* b, int64_t rows, int64_t n, double eps, double* sums,
                    T* iou, void* workspace, int num_sms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t chunks = forward_chunks(rows, n, num_sms);
  const int64_t chunk = ceil_div(n, chunks);
  auto* partials = static_cast<double*>(workspace);
  const size_t smem = smem_bytes<double>(block_reduce_scratch<kThreads, 3>());
  cudaError_t err =
      launch_kernel(partial_sums_kernel<T>, dim3(static_cast<unsigned>(rows * chunks)),
                    dim3(kThreads), smem, stream, false, a, b, n, chunk, chunks, partials);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kThreads / 32));
  return launch_kernel(finish_kernel<T>, dim3(blocks), dim3(kThreads), 0, stream, false,
                       partials, rows, chunks, eps, sums, iou);
}

// grad: [rows] upstream gradient of iou; sums: the forward's [rows, 3].
template <class T>
cudaError_t backward(const T* grad, const T* a, const T* b, const double* sums, int64_t rows,
                     int64_t n, double eps, T* grad_a, T* grad_b, int num_sms,
                     cudaStream_t stream) {
  const int64_t total = rows * n;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = bm_min<int64_t>(ceil_div(total, kThreads), 8LL * num_sms);
  return launch_kernel(backward_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                       0, stream, false, grad, a, b, sums, rows, n, eps, grad_a, grad_b);
}

// a, b: bool [rows, n] as bytes; out: float32 [rows].
inline cudaError_t mask_iou(const uint8_t* a, const uint8_t* b, int64_t rows, int64_t n,
                            float* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const size_t smem = smem_bytes<double>(block_reduce_scratch<kThreads, 2>());
  return launch_kernel(mask_iou_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), smem,
                       stream, false, a, b, n, out);
}

}  // namespace soft_iou
}  // namespace cuda
}  // namespace biasmap
