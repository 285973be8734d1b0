// CPU kernels of SoftIoU: E = I / (sa + sb - I + eps) per row, with I = sum(a*b),
// sa = sum(a), sb = sum(b) (DESIGN.md section 2).
//
// Forward: one fused pass per row accumulating the three sums in double (the
// rows are whole maps, 4096+ entries, and the denominator subtracts I). The sums
// are returned so the backward needs no second reduction.
// Backward: with D = sa + sb - I + eps, dE/da_i = b_i / D - I (1 - b_i) / D^2
// = b_i (1/D + I/D^2) - I/D^2, symmetric in b. So each gradient is one affine
// map of the other input with two per-row coefficients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace biasmap {
namespace {

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [B, n], got shape ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), op, ": b must have a's shape ", a.sizes(), ", got ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": a has dtype ", a.scalar_type(),
              "; accepted: float16, bfloat16, float32, float64");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors");
}

int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, n));
}

template <typename scalar_t>
void soft_iou_fwd_rows(const scalar_t* ap, const scalar_t* bp, scalar_t* iou, double* sums,
                       int64_t rows, int64_t n, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ x = ap + r * n;
      const scalar_t* __restrict__ y = bp + r * n;
      double inter = 0, sa = 0, sb = 0;
#pragma omp simd reduction(+ : inter, sa, sb)
      for (int64_t i = 0; i < n; ++i) {
        const double xi = static_cast<double>(static_cast<opmath_t>(x[i]));
        const double yi = static_cast<double>(static_cast<opmath_t>(y[i]));
        inter += xi * yi;
        sa += xi;
        sb += yi;
      }
      sums[3 * r + 0] = inter;
      sums[3 * r + 1] = sa;
      sums[3 * r + 2] = sb;
      iou[r] = static_cast<scalar_t>(inter / (sa + sb - inter + eps));
    }
  });
}

template <typename scalar_t>
void soft_iou_bwd_rows(const scalar_t* ap, const scalar_t* bp, const double* sums,
                       const double* grad, scalar_t* grad_a, scalar_t* grad_b, int64_t rows,
                       int64_t n, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double inter = sums[3 * r], d = sums[3 * r + 1] + sums[3 * r + 2] - inter + eps;
      const double inv = 1.0 / d;
      const double beta_d = grad[r] * inter * inv * inv;
      const opmath_t alpha = static_cast<opmath_t>(grad[r] * inv + beta_d);
      const opmath_t beta = static_cast<opmath_t>(beta_d);
      const scalar_t* __restrict__ x = ap + r * n;
      const scalar_t* __restrict__ y = bp + r * n;
      scalar_t* __restrict__ gx = grad_a + r * n;
      scalar_t* __restrict__ gy = grad_b + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        gx[i] = static_cast<scalar_t>(alpha * static_cast<opmath_t>(y[i]) - beta);
        gy[i] = static_cast<scalar_t>(alpha * static_cast<opmath_t>(x[i]) - beta);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> soft_iou_fwd(const at::Tensor& a_in, const at::Tensor& b_in,
                                                double eps) {
  const char* op = "soft_iou_fwd";
  check_pair(a_in, b_in, op);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), n = a.size(1);
  at::Tensor iou = at::empty({rows}, a.options());
  at::Tensor sums = at::empty({rows, 3}, a.options().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "soft_iou_fwd", [&] {
    soft_iou_fwd_rows<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                iou.data_ptr<scalar_t>(), sp, rows, n, eps);
  });
  return {iou, sums};
}

std::tuple<at::Tensor, at::Tensor> soft_iou_bwd(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                const at::Tensor& b_in,
                                                const at::Tensor& sums_in, double eps) {
  const char* op = "soft_iou_bwd";
  check_pair(a_in, b_in, op);
  const int64_t rows = a_in.size(0), n = a_in.size(1);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == rows, op, ": grad must have shape [",
              rows, "], got ", grad_in.sizes());
  TORCH_CHECK(sums_in.dim() == 2 && sums_in.size(0) == rows && sums_in.size(1) == 3, op,
              ": sums must have shape [", rows, ", 3] (from soft_iou_fwd), got ",
              sums_in.sizes());
  TORCH_CHECK(sums_in.scalar_type() == at::kDouble, op, ": sums must be float64, got ",
              sums_in.scalar_type());
  TORCH_CHECK(grad_in.device().is_cpu() && sums_in.device().is_cpu(), op,
              ": grad and sums must be CPU tensors");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sums = sums_in.contiguous();
  // The upstream gradient may be a stride-0 view (iou.sum().backward()) or another dtype.
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "soft_iou_bwd", [&] {
    soft_iou_bwd_rows<scalar_t>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), sums.const_data_ptr<double>(),
        grad.const_data_ptr<double>(), grad_a.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(),
        rows, n, eps);
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasmap, CPU, m) {
  m.impl("soft_iou_fwd", &soft_iou_fwd);
  m.impl("soft_iou_bwd", &soft_iou_bwd);
}

}  // namespace biasmap
