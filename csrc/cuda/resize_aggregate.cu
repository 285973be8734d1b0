// CUDA implementations of biasmap::resize_aggregate_fwd / resize_aggregate_bwd
// (schemas in csrc/ops.cpp, kernels in resize_aggregate.cuh).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "cuda/resize_aggregate.cuh"
#include "cuda/torch_glue.h"

namespace biasmap {
namespace cuda {
namespace {

// Contiguous copies of the maps after checking they share device, dtype and [B, T].
std::vector<at::Tensor> checked_maps(at::TensorList maps, const char* op) {
  TORCH_CHECK(!maps.empty(), "biasmap::", op, ": maps must be a non-empty list");
  const at::Tensor& first = maps[0];
  std::vector<at::Tensor> out;
  out.reserve(maps.size());
  for (size_t i = 0; i < maps.size(); ++i) {
    const at::Tensor& m = maps[i];
    glue::check_cuda(m, op, "maps");
    glue::check_dim(m, 4, op, "maps[i]");
    glue::check_float(m, op, "maps[i]");
    glue::check_same_device(first, m, op, "maps[0]", "maps[i]");
    TORCH_CHECK(m.scalar_type() == first.scalar_type(), "biasmap::", op, ": maps[", i,
                "] has dtype ", m.scalar_type(), " but maps[0] has ", first.scalar_type());
    TORCH_CHECK(m.size(0) == first.size(0) && m.size(1) == first.size(1), "biasmap::", op,
                ": every map must share [B, T] = ", first.sizes().slice(0, 2), ", maps[", i,
                "] has shape ", m.sizes());
    TORCH_CHECK(m.size(2) >= 1 && m.size(3) >= 1, "biasmap::", op, ": maps[", i,
                "] has an empty spatial size ", m.sizes());
    out.push_back(m.contiguous());
  }
  return out;
}

at::Tensor resize_aggregate_fwd(at::TensorList maps_in, int64_t out_h,
                                int64_t out_w, bool per_map) {
  constexpr const char* op = "resize_aggregate_fwd";
  TORCH_CHECK(out_h > 0 && out_w > 0, "biasmap::", op, ": the output size must be positive, got (",
              out_h, ", ", out_w, ")");
  const c10::cuda::CUDAGuard guard(maps_in.empty() ? at::Device(at::kCUDA) : maps_in[0].device());
  const std::vector<at::Tensor> maps = checked_maps(maps_in, op);
  const int64_t B = maps[0].size(0), T = maps[0].size(1);
  const int M = static_cast<int>(maps.size());
  at::Tensor out = per_map ? at::empty({B, M, T, out_h, out_w}, maps[0].options())
                           : at::empty({B, T, out_h, out_w}, maps[0].options());
  std::vector<int> h(M), w(M);
  for (int i = 0; i < M; ++i) {
    h[i] = static_cast<int>(maps[i].size(2));
    w[i] = static_cast<int>(maps[i].size(3));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), op, [&] {
    using C = glue::cuda_t<scalar_t>;
    std::vector<const C*> src(M);
    for (int i = 0; i < M; ++i) src[i] = glue::ptr<scalar_t>(maps[i]);
    glue::check_launch(resize::forward<C>(src.data(), h.data(), w.data(), M, B, T,
                                          static_cast<int>(out_h), static_cast<int>(out_w),
                                          per_map, glue::ptr<scalar_t>(out), glue::num_sms(),
                                          glue::current_stream()),
                       op);
  });
  return out;
}

std::vector<at::Tensor> resize_aggregate_bwd(const at::Tensor& grad_in, at::TensorList maps_in,
                                             int64_t out_h, int64_t out_w, bool per_map) {
  constexpr const char* op = "resize_aggregate_bwd";
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const std::vector<at::Tensor> maps = checked_maps(maps_in, op);
  glue::check_same_device(maps[0], grad_in, op, "maps[0]", "grad");
  const int64_t B = maps[0].size(0), T = maps[0].size(1);
  const int M = static_cast<int>(maps.size());
  const std::vector<int64_t> want =
      per_map ? std::vector<int64_t>{B, M, T, out_h, out_w} : std::vector<int64_t>{B, T, out_h, out_w};
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(want), "biasmap::", op, ": grad must have shape ",
              at::IntArrayRef(want), ", got ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(maps[0].scalar_type()).contiguous();
  std::vector<at::Tensor> grads;
  grads.reserve(M);
  std::vector<int> h(M), w(M);
  for (int i = 0; i < M; ++i) {
    grads.push_back(at::empty_like(maps[i]));
    h[i] = static_cast<int>(maps[i].size(2));
    w[i] = static_cast<int>(maps[i].size(3));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), op, [&] {
    using C = glue::cuda_t<scalar_t>;
    std::vector<C*> dst(M);
    for (int i = 0; i < M; ++i) dst[i] = glue::ptr<scalar_t>(grads[i]);
    glue::check_launch(resize::backward<C>(glue::ptr<scalar_t>(grad), h.data(), w.data(), M, B, T,
                                           static_cast<int>(out_h), static_cast<int>(out_w),
                                           per_map, dst.data(), glue::num_sms(),
                                           glue::current_stream()),
                       op);
  });
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CUDA, m) {
  m.impl("resize_aggregate_fwd", &biasmap::cuda::resize_aggregate_fwd);
  m.impl("resize_aggregate_bwd", &biasmap::cuda::resize_aggregate_bwd);
}
