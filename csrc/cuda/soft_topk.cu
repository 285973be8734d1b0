// CUDA implementations of biasmap::soft_topk_{exact,sinkhorn}_{fwd,bwd}
// (schemas in csrc/ops.cpp, kernels and stats layouts in soft_topk.cuh).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cuda/soft_topk.cuh"
#include "cuda/torch_glue.h"

namespace biasmap {
namespace cuda {
namespace {

void check_x(const at::Tensor& x, int64_t k, double tau, const char* op) {
  glue::check_cuda(x, op, "x");
  glue::check_dim(x, 2, op, "x");
  glue::check_float(x, op, "x");
  const int64_t n = x.size(1);
  TORCH_CHECK(x.size(0) == 0 || n >= 2, "biasmap::", op, ": x must be [B, n] with n >= 2, got ",
              x.sizes());
  TORCH_CHECK(x.size(0) == 0 || (k > 0 && k < n), "biasmap::", op,
              ": k must satisfy 0 < k < n = ", n, ", got k = ", k);
  TORCH_CHECK(std::isfinite(tau) && tau > 0.0, "biasmap::", op,
              ": tau must be finite and > 0, got ", tau);
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  glue::check_same_device(x, t, op, "x", name);
  TORCH_CHECK(t.sizes() == x.sizes(), "biasmap::", op, ": ", name, " must have x's shape ",
              x.sizes(), ", got ", t.sizes());
}

void check_stats(const at::Tensor& stats, const at::Tensor& x, int64_t cols, const char* op) {
  glue::check_same_device(x, stats, op, "x", "stats");
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.dim() == 2 && stats.size(0) == x.size(0) &&
                  stats.size(1) == cols,
              "biasmap::", op, ": stats must be float64 [", x.size(0), ", ", cols,
              "] as returned by the forward, got ", stats.scalar_type(), " ", stats.sizes());
}

template <class S>
topk::Args<glue::cuda_t<S>> args_for(const at::Tensor& x, int64_t k, double tau, int64_t iters,
                                     bool minmax) {
  topk::Args<glue::cuda_t<S>> a{};
  a.x = glue::ptr<S>(x);
  a.k = k;
  a.tau = tau;
  a.iters = static_cast<int>(iters);
  a.minmax = minmax;
  return a;
}

// Runs one of the four kernels with its workspace on the current stream.
template <class C>
void run(topk::Kernel kind, const topk::Args<C>& a, const at::Tensor& x, const char* op) {
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor ws = glue::workspace(topk::workspace_bytes<C>(kind, rows, n, a.iters), x);
  glue::check_launch(topk::launch<C>(kind, a, rows, n, ws.data_ptr(), glue::current_stream()), op);
}

std::tuple<at::Tensor, at::Tensor> exact_fwd(const at::Tensor& x_in, int64_t k, double tau,
                                             bool minmax) {
  constexpr const char* op = "soft_topk_exact_fwd";
  check_x(x_in, k, tau, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor mask = at::empty_like(x);
  at::Tensor stats = at::empty({x.size(0), 3}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto a = args_for<scalar_t>(x, k, tau, 0, minmax);
    a.out = glue::ptr<scalar_t>(mask);
    a.stats = stats.data_ptr<double>();
    run(topk::Kernel::kExactFwd, a, x, op);
  });
  return {mask, stats};
}

at::Tensor exact_bwd(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mask_in,
                     const at::Tensor& stats_in, int64_t k, double tau, bool minmax) {
  constexpr const char* op = "soft_topk_exact_bwd";
  check_x(x_in, k, tau, op);
  check_like(grad_in, x_in, "grad", op);
  check_like(mask_in, x_in, "mask", op);
  check_stats(stats_in, x_in, 3, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // grad may be a stride-0 expanded view (from .sum().backward()): make it dense.
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor mask = mask_in.to(x.scalar_type()).contiguous();
  const at::Tensor stats = stats_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto a = args_for<scalar_t>(x, k, tau, 0, minmax);
    a.grad = glue::ptr<scalar_t>(grad);
    a.mask = glue::ptr<scalar_t>(mask);
    a.out = glue::ptr<scalar_t>(grad_x);
    a.stats = const_cast<double*>(stats.data_ptr<double>());
    run(topk::Kernel::kExactBwd, a, x, op);
  });
  return grad_x;
}

void check_iters(int64_t iters, const char* op) {
  TORCH_CHECK(iters >= 0 && iters <= 100000000, "biasmap::", op,
              ": iters must be in [0, 1e8], got ", iters);
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_fwd(const at::Tensor& x_in, int64_t k, double tau,
                                                int64_t iters, bool minmax) {
  constexpr const char* op = "soft_topk_sinkhorn_fwd";
  check_x(x_in, k, tau, op);
  check_iters(iters, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor mask = at::empty_like(x);
  at::Tensor stats =
      at::empty({x.size(0), topk::stats_width(static_cast<int>(iters))}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto a = args_for<scalar_t>(x, k, tau, iters, minmax);
    a.out = glue::ptr<scalar_t>(mask);
    a.stats = stats.data_ptr<double>();
    run(topk::Kernel::kSinkhornFwd, a, x, op);
  });
  return {mask, stats};
}

at::Tensor sinkhorn_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                        const at::Tensor& stats_in, int64_t k, double tau, int64_t iters,
                        bool minmax) {
  constexpr const char* op = "soft_topk_sinkhorn_bwd";
  check_x(x_in, k, tau, op);
  check_iters(iters, op);
  check_like(grad_in, x_in, "grad", op);
  check_stats(stats_in, x_in, topk::stats_width(static_cast<int>(iters)), op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor stats = stats_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    auto a = args_for<scalar_t>(x, k, tau, iters, minmax);
    a.grad = glue::ptr<scalar_t>(grad);
    a.out = glue::ptr<scalar_t>(grad_x);
    a.stats = const_cast<double*>(stats.data_ptr<double>());
    run(topk::Kernel::kSinkhornBwd, a, x, op);
  });
  return grad_x;
}

}  // namespace
}  // namespace cuda
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CUDA, m) {
  m.impl("soft_topk_exact_fwd", &biasmap::cuda::exact_fwd);
  m.impl("soft_topk_exact_bwd", &biasmap::cuda::exact_bwd);
  m.impl("soft_topk_sinkhorn_fwd", &biasmap::cuda::sinkhorn_fwd);
  m.impl("soft_topk_sinkhorn_bwd", &biasmap::cuda::sinkhorn_bwd);
}
