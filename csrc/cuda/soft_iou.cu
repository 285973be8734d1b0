// CUDA implementations of biasmap::soft_iou_fwd, soft_iou_bwd and mask_iou
// (schemas in csrc/ops.cpp, kernels in soft_iou.cuh).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/soft_iou.cuh"
#include "cuda/torch_glue.h"

namespace biasmap {
namespace cuda {
namespace {

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  glue::check_cuda(a, op, "a");
  glue::check_same_device(a, b, op, "a", "b");
  glue::check_dim(a, 2, op, "a");
  TORCH_CHECK(a.sizes() == b.sizes(), "biasmap::", op, ": a and b must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
}

std::tuple<at::Tensor, at::Tensor> soft_iou_fwd(const at::Tensor& a_in, const at::Tensor& b_in,
                                                double eps) {
  constexpr const char* op = "soft_iou_fwd";
  check_pair(a_in, b_in, op);
  glue::check_float(a_in, op, "a");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "biasmap::", op,
              ": a and b must have the same dtype, got ", a_in.scalar_type(), " and ",
              b_in.scalar_type());
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), n = a.size(1);
  at::Tensor iou = at::empty({rows}, a.options());
  at::Tensor sums = at::empty({rows, 3}, a.options().dtype(at::kDouble));
  const int sms = glue::num_sms();
  at::Tensor ws = glue::workspace(soft_iou::forward_workspace_bytes(rows, n, sms), a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    glue::check_launch(
        soft_iou::forward(glue::ptr<scalar_t>(a), glue::ptr<scalar_t>(b), rows, n, eps,
                          sums.data_ptr<double>(), glue::ptr<scalar_t>(iou), ws.data_ptr(), sms,
                          glue::current_stream()),
        op);
  });
  return {iou, sums};
}

std::tuple<at::Tensor, at::Tensor> soft_iou_bwd(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                const at::Tensor& b_in, const at::Tensor& sums_in,
                                                double eps) {
  constexpr const char* op = "soft_iou_bwd";
  check_pair(a_in, b_in, op);
  glue::check_float(a_in, op, "a");
  glue::check_same_device(a_in, grad_in, op, "a", "grad");
  glue::check_same_device(a_in, sums_in, op, "a", "sums");
  const int64_t rows = a_in.size(0), n = a_in.size(1);
  TORCH_CHECK(grad_in.numel() == rows, "biasmap::", op, ": grad must have ", rows,
              " elements, got shape ", grad_in.sizes());
  TORCH_CHECK(sums_in.scalar_type() == at::kDouble && sums_in.dim() == 2 && sums_in.size(0) == rows &&
                  sums_in.size(1) == 3,
              "biasmap::", op, ": sums must be float64 [", rows, ", 3], got ", sums_in.scalar_type(),
              " ", sums_in.sizes());
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.to(a.scalar_type()).contiguous();
  const at::Tensor grad = grad_in.to(a.scalar_type()).contiguous();
  const at::Tensor sums = sums_in.contiguous();
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    glue::check_launch(soft_iou::backward(glue::ptr<scalar_t>(grad), glue::ptr<scalar_t>(a),
                                          glue::ptr<scalar_t>(b), sums.data_ptr<double>(), rows, n,
                                          eps, glue::ptr<scalar_t>(grad_a),
                                          glue::ptr<scalar_t>(grad_b), glue::num_sms(),
                                          glue::current_stream()),
                       op);
  });
  return {grad_a, grad_b};
}

at::Tensor mask_iou(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "mask_iou";
  check_pair(a_in, b_in, op);
  TORCH_CHECK(a_in.scalar_type() == at::kBool && b_in.scalar_type() == at::kBool, "biasmap::", op,
              ": a and b must be bool masks, got ", a_in.scalar_type(), " and ", b_in.scalar_type());
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor out = at::empty({a.size(0)}, a.options().dtype(at::kFloat));
  glue::check_launch(soft_iou::mask_iou(glue::bool_ptr(a), glue::bool_ptr(b), a.size(0), a.size(1),
                                        out.data_ptr<float>(), glue::current_stream()),
                     op);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CUDA, m) {
  m.impl("soft_iou_fwd", &biasmap::cuda::soft_iou_fwd);
  m.impl("soft_iou_bwd", &biasmap::cuda::soft_iou_bwd);
  m.impl("mask_iou", &biasmap::cuda::mask_iou);
}
