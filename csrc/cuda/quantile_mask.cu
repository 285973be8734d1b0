// CUDA implementation of biasmap::quantile_mask (schema in csrc/ops.cpp, kernel
// in quantile_mask.cuh).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/quantile_mask.cuh"
#include "cuda/torch_glue.h"

namespace biasmap {
namespace cuda {
namespace {

at::Tensor quantile_mask(const at::Tensor& x_in, double q, bool inclusive) {
  constexpr const char* op = "quantile_mask";
  glue::check_cuda(x_in, op, "x");
  glue::check_dim(x_in, 2, op, "x");
  glue::check_float(x_in, op, "x");
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "biasmap::", op, ": q must be in [0, 1], got ", q);
  TORCH_CHECK(x_in.size(0) == 0 || x_in.size(1) >= 1, "biasmap::", op,
              ": x must have at least one entry per row, got shape ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    glue::check_launch(
        quantile::quantile_mask(glue::ptr<scalar_t>(x), x.size(0), x.size(1), q, inclusive,
                                reinterpret_cast<uint8_t*>(out.data_ptr<bool>()),
                                glue::current_stream()),
        op);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CUDA, m) { m.impl("quantile_mask", &biasmap::cuda::quantile_mask); }
