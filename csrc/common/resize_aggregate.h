// Index, weight and interpolation arithmetic of bilinear resizing with
// align_corners=False, written so that results are bit-identical to ATen's CPU
// upsample_bilinear2d (torch 2.13, UpSample.h + cpu/UpSampleKernel.cpp) and
// reusable from CUDA. Raw values only: no tensors, no c10 includes.
//
// Bit-identity needs three details that a textbook formula misses:
//  * ATen's kernels are compiled with FMA contraction on AVX2/AVX512 machines,
//    so the source index and the interpolation sums are fused multiply-adds.
//    Every formula here takes kFma and callers pick it to match the CPU
//    capability ATen dispatches to (no FMA only on the DEFAULT capability).
//  * The floor of the source index goes through float (floorf) even for
//    double; near-integer double indices therefore round to float first.
//  * ATen has two 2-D formulas: a separable one (width pass, then height pass;
//    weights stored in the input dtype) and a "channels-last" one (four taps with
//    product weights in the accumulate type) used when out_h + out_w <= 128, or
//    with one thread and 3 channels. use_four_tap() mirrors that choice. The
//    latter sums in two orders, by channel (bilinear4, bilinear4_vector).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace biasmap {
namespace resize {

template <typename T>
BIASMAP_HD inline T fused_madd(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// a*b + c, fused or rounded twice.
template <bool kFma, typename T>
BIASMAP_HD inline T madd(T a, T b, T c) {
  if constexpr (kFma) {
    return fused_madd(a, b, c);
  } else {
    return a * b + c;
  }
}

// ATen's area_pixel_compute_scale for align_corners=False and no explicit scale
// factor: in / out in the accumulate type.
template <typename opmath_t>
BIASMAP_HD inline opmath_t source_scale(int64_t in_size, int64_t out_size) {
  return static_cast<opmath_t>(in_size) / static_cast<opmath_t>(out_size);
}

// One output coordinate's two source taps: index i0 with weight l0, i1 with l1.
// Equal sizes copy (i0 = i1 = dst, l0 = 1, l1 = 0) as ATen does.
// weight_t is the type ATen stores weights in (the input dtype in the separable
// path, the accumulate type in the four-tap path); weights are rounded through it.
template <typename opmath_t, typename weight_t, bool kFma>
BIASMAP_HD inline void source_taps(
    int64_t dst, int64_t in_size, int64_t out_size, opmath_t scale, int64_t& i0, int64_t& i1,
    opmath_t& l0, opmath_t& l1) {
  if (in_size == out_size) {
    i0 = dst;
    i1 = dst;
    l0 = opmath_t(1);
    l1 = opmath_t(0);
    return;
  }
  opmath_t src = madd<kFma>(scale, static_cast<opmath_t>(dst) + opmath_t(0.5), opmath_t(-0.5));
  if (src < opmath_t(0)) {
    src = opmath_t(0);
  }
  int64_t idx = static_cast<int64_t>(floorf(static_cast<float>(src)));
  if (idx > in_size - 1) {
    idx = in_size - 1;
  }
  opmath_t lam = src - static_cast<opmath_t>(idx);
  lam = lam < opmath_t(0) ? opmath_t(0) : (lam > opmath_t(1) ? opmath_t(1) : lam);
  i0 = idx;
  i1 = idx + (idx < in_size - 1 ? 1 : 0);
  const weight_t w1 = static_cast<weight_t>(lam);
  // ATen computes l0 = 1 - l1 in weight_t (c10::Half arithmetic goes through float).
  const weight_t w0 = static_cast<weight_t>(opmath_t(1) - static_cast<opmath_t>(w1));
  l1 = static_cast<opmath_t>(w1);
  l0 = static_cast<opmath_t>(w0);
}

// Two-tap interpolation t0*w0 + t1*w1 as ATen's Interpolate<1, ..., 2> computes it.
template <bool kFma, typename T>
BIASMAP_HD inline T lerp2(T t0, T w0, T t1, T w1) {
  return madd<kFma>(t0, w0, t1 * w1);
}

// Four-tap interpolation of cpu_upsample_linear_channels_last's scalar loop:
// a*w00 + b*w01 + c*w10 + d*w11 (a = (h0, w0), b = (h0, w1), c = (h1, w0), d = (h1, w1)),
// the weights being products of the row and column weights. The compiler fused
// the first sum differently for float16 inputs (measured on torch 2.13): there
// b*w01 is the fused product and a*w00 is rounded (kFuseB).
template <bool kFma, bool kFuseB = false, typename T>
BIASMAP_HD inline T bilinear4(T a, T b, T c, T d, T w00, T w01, T w10, T w11) {
  const T ab = kFuseB ? madd<kFma>(b, w01, a * w00) : madd<kFma>(a, w00, b * w01);
  return madd<kFma>(d, w11, madd<kFma>(c, w10, ab));
}

// The same four taps as summed by that kernel's vector loop, which handles the
// first channels - channels % vector_width channels (the rest take the scalar
// loop above): a*w00 + (b*w01 + (c*w10 + d*w11)), fused from the inside out.
// The innermost pair fuses c*w10 for float16/bfloat16 (float vectors of
// converted values) and d*w11 for float/double (kFuseC selects the former).
template <bool kFma, bool kFuseC = false, typename T>
BIASMAP_HD inline T bilinear4_vector(T a, T b, T c, T d, T w00, T w01, T w10, T w11) {
  const T cd = kFuseC ? madd<kFma>(c, w10, d * w11) : madd<kFma>(d, w11, c * w10);
  return madd<kFma>(a, w00, madd<kFma>(b, w01, cd));
}

// Channels [0, vector_channels) of the four-tap kernel take its vector loop.
// vector_width is ATen's Vectorized<scalar_t>::size() for the kernel it runs: the
// upsample kernels are not built for AVX512, so 32 bytes (8 floats, 4 doubles)
// and 16 for float16/bfloat16, on AVX2, AVX512 and DEFAULT alike.
BIASMAP_HD inline int64_t vector_channels(int64_t channels, int64_t vector_width) {
  return channels - channels % vector_width;
}

// Whether ATen's CPU bilinear kernel takes the four-tap path for a contiguous
// NCHW input (_use_vectorized_kernel_cond_2d plus its single-thread 3-channel
// rule). A channels-last input with more than 3 channels takes it too.
BIASMAP_HD inline bool use_four_tap(
    int64_t out_h, int64_t out_w, int64_t channels, int num_threads) {
  return (out_h + out_w) <= 128 || (num_threads == 1 && channels == 3);
}

}  // namespace resize
}  // namespace biasmap
