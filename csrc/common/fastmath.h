// Branch-free exp for float and double, written so that gcc vectorises loops
// that call it (libm's exp is an opaque call that blocks vectorisation unless
// -ffast-math, which the project does not use).
//
// Method: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2 so n*ln2_hi
// is exact), e^r by its Taylor polynomial (degree 7 in float, 13 in double: the
// truncation error is below 0.1 ulp on that interval, so the result is within
// about 1-2 ulp, dominated by rounding in Horner's scheme), then scaled by 2^n
// built from the exponent bits. 2^n is applied as two factors so that n = 128
// (float) / 1024 (double), reached just below the overflow threshold, stays
// finite. Results that would be subnormal are flushed to zero: producing
// subnormals makes some CPUs take slow microcode paths, and every user of this
// header only needs relative accuracy on normal numbers. Overflow gives +inf,
// NaN propagates.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__)
#define BIASMAP_FORCEINLINE __forceinline__
#elif defined(__GNUC__)
#define BIASMAP_FORCEINLINE inline __attribute__((always_inline))
#else
#define BIASMAP_FORCEINLINE inline
#endif

// Hot CPU loops are compiled for the x86-64 ISA levels v4 (AVX-512), v3 (AVX2
// + FMA) and the baseline, and picked at load time, so a build without -march
// still uses wide vectors. (Not "arch=haswell": its resolver tests the CPU
// model, so it is never taken on AMD or newer Intel parts.)
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define BIASMAP_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BIASMAP_CPU_CLONES
#endif

namespace biasmap {
namespace fastmath {

BIASMAP_HD BIASMAP_FORCEINLINE int32_t bits_of(float v) {
  int32_t i;
  memcpy(&i, &v, sizeof i);
  return i;
}
BIASMAP_HD BIASMAP_FORCEINLINE float float_of(int32_t i) {
  float v;
  memcpy(&v, &i, sizeof v);
  return v;
}
BIASMAP_HD BIASMAP_FORCEINLINE int64_t bits_of(double v) {
  int64_t i;
  memcpy(&i, &v, sizeof i);
  return i;
}
BIASMAP_HD BIASMAP_FORCEINLINE double double_of(int64_t i) {
  double v;
  memcpy(&v, &i, sizeof v);
  return v;
}

// c ? a : b without control flow. gcc keeps a floating-point ?: as a branch
// when an operand's computation can be sunk into it (-ftrapping-math forbids
// speculating it back), which stops loop vectorisation; a bitwise blend of
// already-computed values cannot be sunk.
BIASMAP_HD BIASMAP_FORCEINLINE float select(bool c, float a, float b) {
#ifdef __CUDA_ARCH__
  return c ? a : b;
#else
  const int32_t m = -static_cast<int32_t>(c);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
#endif
}
BIASMAP_HD BIASMAP_FORCEINLINE double select(bool c, double a, double b) {
#ifdef __CUDA_ARCH__
  return c ? a : b;
#else
  const int64_t m = -static_cast<int64_t>(c);
  return double_of((bits_of(a) & m) | (bits_of(b) & ~m));
#endif
}

BIASMAP_HD BIASMAP_FORCEINLINE float exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;  // 355/512: n * kLn2Hi is exact for |n| < 2^15
  const float kLn2Lo = -2.12194440054690583e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kMaxArg = 88.72283935546875f;  // ~ln(FLT_MAX)
  const float kMinArg = -87.3f;  // e^kMinArg is still a normal float (> 2^-126)
  float xc = select(x > kMaxArg, kMaxArg, x);
  xc = select(xc < kMinArg, kMinArg, xc);
  const float t = xc * kLog2e + kRound;
  const int32_t n = bits_of(t) - bits_of(kRound);
  const float nf = t - kRound;
  float r = xc - nf * kLn2Hi;
  r = r - nf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n1 = n >> 1;
  const int32_t n2 = n - n1;
  // Unsigned shifts: well defined even for the garbage n a NaN input produces.
  float res = p * float_of(static_cast<int32_t>(static_cast<uint32_t>(n1 + 127) << 23)) *
              float_of(static_cast<int32_t>(static_cast<uint32_t>(n2 + 127) << 23));
  res = select(x > kMaxArg, float_of(0x7f800000), res);
  res = select(x < kMinArg, 0.0f, res);
  return res;
}

BIASMAP_HD BIASMAP_FORCEINLINE double exp(double x) {
  const double kLog2e = 1.4426950408889634;
  const double kLn2Hi = 0.6931471806019545;  // 32 significant bits: n * kLn2Hi exact
  const double kLn2Lo = -4.2009150726810846e-11;
  const double kRound = 6755399441055744.0;  // 1.5 * 2^52
  const double kMaxArg = 709.782712893384;  // just below ln(DBL_MAX)
  const double kMinArg = -708.3;  // e^kMinArg > 2^-1022
  double xc = select(x > kMaxArg, kMaxArg, x);
  xc = select(xc < kMinArg, kMinArg, xc);
  const double t = xc * kLog2e + kRound;
  const int64_t n = bits_of(t) - bits_of(kRound);
  const double nf = t - kRound;
  double r = xc - nf * kLn2Hi;
  r = r - nf * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t n1 = n >> 1;
  const int64_t n2 = n - n1;
  double res = p * double_of(static_cast<int64_t>(static_cast<uint64_t>(n1 + 1023) << 52)) *
               double_of(static_cast<int64_t>(static_cast<uint64_t>(n2 + 1023) << 52));
  res = select(x > kMaxArg, double_of(0x7ff0000000000000LL), res);
  res = select(x < kMinArg, 0.0, res);
  return res;
}

}  // namespace fastmath
}  // namespace biasmap
