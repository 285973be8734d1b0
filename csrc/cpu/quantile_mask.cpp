// CPU kernels of the hard masks: quantile_mask (x >= or > the row's q-quantile)
// and mask_iou (IoU of two bool masks).
//
// The threshold must equal torch.quantile(x, q, dim=-1, interpolation="linear")
// bit for bit, or ties (integer-valued maps, flat regions) flip mask entries. So
// it follows ATen's quantile_impl step by step, only replacing the full sort by a
// selection (std::nth_element, O(n)):
//   q is rounded to x's dtype, rank = q * (n - 1) in that dtype, below = trunc(rank),
//   above = ceil(rank), weight = rank - below, and the two order statistics are
//   blended with ATen's lerp (weight < 0.5: lo + w (hi - lo), else
//   hi - (hi - lo) (1 - w)), fused as ATen's AVX2/AVX512 build fuses it.
//   A row with a NaN has a NaN quantile, so its mask is all False.
// float16/bfloat16 (which torch.quantile rejects) are treated as their float32 values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace biasmap {
namespace {

// See resize_aggregate.cpp: ATen's AVX2/AVX512 kernels contract a*b + c into an FMA.
bool aten_uses_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool value = [] {
    const std::string cap = at::get_cpu_capability();
    return cap != "DEFAULT" && __builtin_cpu_supports("fma");
  }();
  return value;
#else
  return false;
#endif
}

// ATen's scalar lerp (native/Lerp.h) with or without the contraction.
template <typename T>
T aten_lerp(T lo, T hi, T weight, bool fma) {
  const T diff = hi - lo;
  if (std::abs(weight) < T(0.5)) {
    return fma ? std::fma(weight, diff, lo) : lo + weight * diff;
  }
  return fma ? std::fma(-diff, T(1) - weight, hi) : hi - diff * (T(1) - weight);
}

template <typename scalar_t>
void quantile_mask_rows(const scalar_t* xp, bool* mp, int64_t rows, int64_t n, double q,
                        bool inclusive, bool fma) {
  // The dtype torch.quantile computes in: x's own for float/double.
  using value_t = at::opmath_type<scalar_t>;
  const value_t rank = static_cast<value_t>(q) * static_cast<value_t>(n - 1);
  const int64_t below = static_cast<int64_t>(rank);
  const int64_t above = static_cast<int64_t>(std::ceil(rank));
  const value_t weight = rank - static_cast<value_t>(below);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (8 * n));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<value_t> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ row = xp + r * n;
      bool* __restrict__ out = mp + r * n;
      bool has_nan = false;
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = static_cast<value_t>(row[i]);
        has_nan |= std::isnan(buf[i]);
      }
      if (has_nan) {
        std::fill(out, out + n, false);
        continue;
      }
      std::nth_element(buf.begin(), buf.begin() + below, buf.end());
      const value_t lo = buf[below];
      // After nth_element everything past `below` is >= lo; the next order
      // statistic is their minimum.
      const value_t hi =
          above == below ? lo : *std::min_element(buf.begin() + below + 1, buf.end());
      const value_t thr = aten_lerp(lo, hi, weight, fma);
      if (inclusive) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<value_t>(row[i]) >= thr;
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<value_t>(row[i]) > thr;
      }
    }
  });
}

at::Tensor quantile_mask(const at::Tensor& x_in, double q, bool inclusive) {
  const char* op = "quantile_mask";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D [B, n], got shape ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) >= 1, op, ": x must have at least one entry per row, got shape ",
              x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), op, ": x has dtype ", x_in.scalar_type(),
              "; accepted: float16, bfloat16, float32, float64");
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(q >= 0.0 && q <= 1.0, op, ": q must be in [0, 1], got ", q);
  TORCH_CHECK(x_in.size(1) <= (int64_t{1} << 24), op,
              ": rows longer than 2^24 entries are not supported (as torch.quantile), got ",
              x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor mask = at::empty({rows, n}, x.options().dtype(at::kBool));
  bool* mp = mask.data_ptr<bool>();
  const bool fma = aten_uses_fma();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantile_mask", [&] {
    quantile_mask_rows<scalar_t>(x.const_data_ptr<scalar_t>(), mp, rows, n, q, inclusive, fma);
  });
  return mask;
}

at::Tensor mask_iou(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "mask_iou";
  TORCH_CHECK(a_in.dim() == 2, op, ": a must be a 2-D bool mask [B, n], got shape ",
              a_in.sizes());
  TORCH_CHECK(b_in.sizes() == a_in.sizes(), op, ": b must have a's shape ", a_in.sizes(),
              ", got ", b_in.sizes());
  TORCH_CHECK(a_in.scalar_type() == at::kBool && b_in.scalar_type() == at::kBool, op,
              ": a and b must be bool tensors, got ", a_in.scalar_type(), " and ",
              b_in.scalar_type());
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), op,
              ": a and b must be CPU tensors");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), n = a.size(1);
  at::Tensor iou = at::empty({rows}, a.options().dtype(at::kFloat));
  // Bool storage is one byte per entry; reading it as bytes lets the counts vectorise.
  const uint8_t* ap = reinterpret_cast<const uint8_t*>(a.const_data_ptr<bool>());
  const uint8_t* bp = reinterpret_cast<const uint8_t*>(b.const_data_ptr<bool>());
  float* op_iou = iou.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, n));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* __restrict__ x = ap + r * n;
      const uint8_t* __restrict__ y = bp + r * n;
      int64_t inter = 0, uni = 0;
#pragma omp simd reduction(+ : inter, uni)
      for (int64_t i = 0; i < n; ++i) {
        const int xi = x[i] != 0, yi = y[i] != 0;
        inter += xi & yi;
        uni += xi | yi;
      }
      // As the reference: float32 counts, float32 division.
      op_iou[r] = uni > 0 ? static_cast<float>(inter) / static_cast<float>(uni) : 0.0f;
    }
  });
  return iou;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasmap, CPU, m) {
  m.impl("quantile_mask", &quantile_mask);
  m.impl("mask_iou", &mask_iou);
}

}  // namespace biasmap
