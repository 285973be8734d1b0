// Helpers shared by the csrc/cuda/*.cu files, which are the only CUDA sources
// that see torch: argument checks, torch -> CUDA scalar types, the current
// stream and workspace allocation. Built only into the CUDA extension (setup.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace biasmap {
namespace cuda {
namespace glue {

// torch's scalar types and the CUDA types the kernel headers are written for
// (same size and bit layout).
template <class S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <class S>
using cuda_t = typename CudaScalar<S>::type;

static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "torch and CUDA 16-bit float types differ in size");

template <class S>
inline cuda_t<S>* ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<S>*>(t.data_ptr<S>());
}
inline const uint8_t* bool_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint8_t*>(t.data_ptr<bool>());
}

// The accumulate dtype paired with an input dtype (float64 stays float64).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "biasmap::", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
}
inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* na, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "biasmap::", op, ": ", na, " is on ", a.device(),
              " but ", nb, " is on ", b.device());
}
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "biasmap::", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}
inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, "biasmap::", op, ": ", name, " must have ", dim,
              " dimensions, got shape ", t.sizes());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "biasmap::", op, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}

// The stream torch would run this op on; kernels must go there, never to the
// legacy default stream.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int num_sms() { return rt::num_sms(rt::current_device()); }

// Scratch memory from torch's caching allocator, on the current stream.
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))},
                   like.options().dtype(at::kByte));
}

}  // namespace glue
}  // namespace cuda
}  // namespace biasmap
