// CPU kernels of resize_aggregate: the sum (or stack) of bilinear resizes of M
// attribution maps to one size, and its adjoint.
//
// Forward. Each map's output pixel is bit-identical to F.interpolate(mode="bilinear",
// align_corners=False) on this torch, for every dtype and CPU capability (see
// common/resize_aggregate.h). The sum adds the maps' float32/float64 results in
// map order, which is what torch.stack(...).sum(0) does for up to ~32 maps except
// for a few tail entries of odd sizes that its vectorised reduction reassociates
// (1 ulp). fp16/bf16 accumulate in float32 and round once.
// Two passes, each parallel over rows:
//  1. every source row of every map is turned into out_w-wide float rows: its
//     width resize (separable path) or its two column gathers (four-tap path,
//     ATen's choice for out_h + out_w <= 128). Maps already at the output size
//     skip this in the four-tap path.
//  2. every output row is written once, reading two (separable) or four
//     (four-tap) contiguous rows per map; no gathers in the hot loop.
//
// Backward (the adjoint), scatter-free and deterministic: maps of equal shape
// share one gradient in the summed mode, so it is computed once per distinct
// shape. Pass 1 gathers, for every source row, the gradient rows that read it
// (a transposed, CSR table of the row taps); pass 2 does the same along the
// width and writes the result into every map of that shape.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/resize_aggregate.h"

namespace biasmap {
namespace {

using resize::bilinear4;
using resize::bilinear4_vector;
using resize::lerp2;
using resize::madd;

#if defined(__x86_64__) || defined(__i386__)
#define BIASMAP_X86 1
#define BIASMAP_TARGET_FMA __attribute__((target("avx2,fma")))
#else
#define BIASMAP_X86 0
#define BIASMAP_TARGET_FMA
#endif
#define BIASMAP_INLINE inline __attribute__((always_inline))

// ATen's CPU kernels for the AVX2/AVX512 capabilities are built with FMA
// contraction; the DEFAULT capability is not. Matching the reference bit for bit
// means using FMAs exactly when the capability ATen dispatches to has them.
// Off x86 we have not verified how ATen was built and use plain arithmetic.
bool aten_uses_fma() {
#if BIASMAP_X86
  static const bool value = [] {
    const std::string cap = at::get_cpu_capability();
    return cap != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return value;
#else
  return false;
#endif
}

// Taps of one axis: output coordinate o reads source i0[o] (weight l0[o]) and
// i1[o] (weight l1[o]).
template <typename opmath_t>
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<opmath_t> l0, l1;
};

template <typename opmath_t, typename weight_t, bool kFma>
Axis<opmath_t> make_axis_impl(int64_t in_size, int64_t out_size) {
  Axis<opmath_t> axis;
  axis.i0.resize(out_size);
  axis.i1.resize(out_size);
  axis.l0.resize(out_size);
  axis.l1.resize(out_size);
  const opmath_t scale = resize::source_scale<opmath_t>(in_size, out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    int64_t i0, i1;
    resize::source_taps<opmath_t, weight_t, kFma>(
        o, in_size, out_size, scale, i0, i1, axis.l0[o], axis.l1[o]);
    axis.i0[o] = static_cast<int32_t>(i0);
    axis.i1[o] = static_cast<int32_t>(i1);
  }
  return axis;
}

template <typename scalar_t, typename opmath_t>
Axis<opmath_t> make_axis(int64_t in_size, int64_t out_size, bool four_tap, bool fma) {
  // The separable path stores weights in the input dtype, the four-tap path in
  // the accumulate type; both round exactly as ATen does.
  if (four_tap) {
    return fma ? make_axis_impl<opmath_t, opmath_t, true>(in_size, out_size)
               : make_axis_impl<opmath_t, opmath_t, false>(in_size, out_size);
  }
  return fma ? make_axis_impl<opmath_t, scalar_t, true>(in_size, out_size)
             : make_axis_impl<opmath_t, scalar_t, false>(in_size, out_size);
}

// Transposed taps: for source index s, the (output index, weight) pairs reading it,
// in increasing output order. Zero weights are dropped.
template <typename opmath_t>
struct Csr {
  std::vector<int32_t> offset;  // [in_size + 1]
  std::vector<int32_t> dst;
  std::vector<opmath_t> weight;
};

template <typename opmath_t>
Csr<opmath_t> transpose_axis(const Axis<opmath_t>& axis, int64_t in_size) {
  const int64_t out_size = static_cast<int64_t>(axis.i0.size());
  Csr<opmath_t> csr;
  csr.offset.assign(in_size + 1, 0);
  for (int64_t o = 0; o < out_size; ++o) {
    if (axis.l0[o] != opmath_t(0)) csr.offset[axis.i0[o] + 1]++;
    if (axis.l1[o] != opmath_t(0)) csr.offset[axis.i1[o] + 1]++;
  }
  for (int64_t s = 0; s < in_size; ++s) csr.offset[s + 1] += csr.offset[s];
  csr.dst.resize(csr.offset[in_size]);
  csr.weight.resize(csr.offset[in_size]);
  std::vector<int32_t> fill(csr.offset.begin(), csr.offset.end() - 1);
  for (int64_t o = 0; o < out_size; ++o) {
    if (axis.l0[o] != opmath_t(0)) {
      const int32_t k = fill[axis.i0[o]]++;
      csr.dst[k] = static_cast<int32_t>(o);
      csr.weight[k] = axis.l0[o];
    }
    if (axis.l1[o] != opmath_t(0)) {
      const int32_t k = fill[axis.i1[o]]++;
      csr.dst[k] = static_cast<int32_t>(o);
      csr.weight[k] = axis.l1[o];
    }
  }
  return csr;
}

// Pointer to one [S_h, S_w] output (or output-gradient) plane.
inline int64_t plane_offset(
    int64_t p, int64_t m, int64_t num_maps, int64_t channels, bool per_map, int64_t plane) {
  if (!per_map) return p * plane;
  const int64_t b = p / channels, t = p % channels;
  return ((b * num_maps + m) * channels + t) * plane;
}

// --------------------------------------------------------------------------
// Forward
// --------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
struct Forward {
  int64_t num_planes = 0, channels = 0, num_maps = 0, out_h = 0, out_w = 0;
  bool per_map = false;
  std::vector<const scalar_t*> src;
  std::vector<int64_t> h, w;
  std::vector<Axis<opmath_t>> rows, cols;
  // ATen's formula for each map (resize::use_four_tap) and, for the four-tap
  // one, whether the map already has the output size (then it is read in place).
  std::vector<char> four_tap, identity;
  // Pass 1 turns every (plane, map, source row) unit into `width[m]` rows of
  // out_w: its width resize (separable, 1 row) or its two column gathers
  // x[y, c0[:]], x[y, c1[:]] (four-tap, 2 rows), so pass 2 reads contiguous rows.
  std::vector<int64_t> width;
  std::vector<int64_t> unit0;  // first unit of map m within a plane, [M + 1]
  std::vector<int64_t> row0;   // first tmp row of map m within a plane, [M + 1]
  opmath_t* tmp = nullptr;
  scalar_t* out = nullptr;

  int64_t units_per_plane() const { return unit0.back(); }
  opmath_t* tmp_row(int64_t p, int64_t m, int64_t y) const {
    return tmp + (p * row0.back() + row0[m] + y * width[m]) * out_w;
  }
};

// Pass 1: units [begin, end) of (plane, map, source row).
template <typename scalar_t, typename opmath_t, bool kFma>
BIASMAP_INLINE void width_pass(const Forward<scalar_t, opmath_t>& f, int64_t begin, int64_t end) {
  const int64_t per_plane = f.units_per_plane();
  const int64_t out_w = f.out_w;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t p = r / per_plane, q = r % per_plane;
    int64_t m = 0;
    while (q >= f.unit0[m + 1]) ++m;
    const int64_t y = q - f.unit0[m];
    const scalar_t* __restrict__ x = f.src[m] + (p * f.h[m] + y) * f.w[m];
    opmath_t* __restrict__ t = f.tmp_row(p, m, y);
    const int32_t* __restrict__ c0 = f.cols[m].i0.data();
    const int32_t* __restrict__ c1 = f.cols[m].i1.data();
    const opmath_t* __restrict__ u0 = f.cols[m].l0.data();
    const opmath_t* __restrict__ u1 = f.cols[m].l1.data();
    if (f.four_tap[m]) {
      opmath_t* __restrict__ t1 = t + out_w;
#pragma omp simd
      for (int64_t o = 0; o < out_w; ++o) {
        t[o] = static_cast<opmath_t>(x[c0[o]]);
        t1[o] = static_cast<opmath_t>(x[c1[o]]);
      }
    } else if (f.w[m] == out_w) {
      // Equal widths: taps (o, 1) and (o, 0), i.e. v * 1 + v * 0 = v + v * 0 in
      // either rounding mode (v for finite v, NaN for inf, as ATen), without gathers.
#pragma omp simd
      for (int64_t o = 0; o < out_w; ++o) {
        const opmath_t v = static_cast<opmath_t>(x[o]);
        t[o] = v + v * opmath_t(0);
      }
    } else {
#pragma omp simd
      for (int64_t o = 0; o < out_w; ++o) {
        t[o] = lerp2<kFma>(
            static_cast<opmath_t>(x[c0[o]]), u0[o], static_cast<opmath_t>(x[c1[o]]), u1[o]);
      }
    }
  }
}

// One map's contribution to one output row, as ATen computes each formula.
template <typename opmath_t, bool kFma>
struct SeparableTap {
  const opmath_t* __restrict__ t0;
  const opmath_t* __restrict__ t1;
  opmath_t a, b;
  BIASMAP_INLINE opmath_t operator()(int64_t x) const { return lerp2<kFma>(t0[x], a, t1[x], b); }
};

// All four taps are x[oy, o] with weights (1, 0, 0, 0): the sum is v + v * 0.
template <typename scalar_t, typename opmath_t>
struct IdentityTap {
  const scalar_t* __restrict__ x;
  BIASMAP_INLINE opmath_t operator()(int64_t o) const {
    const opmath_t v = static_cast<opmath_t>(x[o]);
    return v + v * opmath_t(0);
  }
};

template <typename opmath_t, bool kFma, bool kVector, bool kHalf>
struct FourTap {
  const opmath_t* __restrict__ ea;  // rows i0: x[i0, c0[:]], then x[i0, c1[:]]
  const opmath_t* __restrict__ ec;  // rows i1
  const opmath_t* __restrict__ u0;
  const opmath_t* __restrict__ u1;
  opmath_t h0, h1;
  int64_t out_w;
  BIASMAP_INLINE opmath_t operator()(int64_t o) const {
    const opmath_t a = ea[o], b = ea[out_w + o], c = ec[o], d = ec[out_w + o];
    if constexpr (kVector) {
      return bilinear4_vector<kFma, kHalf>(a, b, c, d, h0 * u0[o], h0 * u1[o], h1 * u0[o],
                                           h1 * u1[o]);
    } else {
      return bilinear4<kFma, kHalf>(a, b, c, d, h0 * u0[o], h0 * u1[o], h1 * u0[o], h1 * u1[o]);
    }
  }
};

// Stores the map's row (per_map) or adds it to the running sum.
template <typename scalar_t, typename opmath_t, typename Tap>
BIASMAP_INLINE void emit_row(const Tap& tap, bool per_map, scalar_t* __restrict__ o,
                             opmath_t* __restrict__ s, int64_t n) {
  if (per_map) {
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) o[x] = static_cast<scalar_t>(tap(x));
  } else {
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) s[x] += tap(x);
  }
}

// Pass 2: output rows [begin, end) of (plane, out row); `acc` holds out_w values.
template <typename scalar_t, typename opmath_t, bool kFma>
BIASMAP_INLINE void output_pass(
    const Forward<scalar_t, opmath_t>& f, int64_t begin, int64_t end, opmath_t* acc) {
  constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
  constexpr bool kReduced = sizeof(scalar_t) == 2;
  // ATen's Vectorized<scalar_t>::size() in the 256-bit builds its kernel runs.
  constexpr int64_t kVectorWidth = kReduced ? 16 : 32 / sizeof(scalar_t);
  const int64_t vector_channels = resize::vector_channels(f.channels, kVectorWidth);
  const int64_t out_w = f.out_w, plane = f.out_h * f.out_w;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t p = r / f.out_h, oy = r % f.out_h;
    const bool vector_channel = p % f.channels < vector_channels;
    scalar_t* sum_row = f.out + p * plane + oy * out_w;
    // float/double sums accumulate straight into the output row.
    opmath_t* s = std::is_same_v<scalar_t, opmath_t> ? reinterpret_cast<opmath_t*>(sum_row) : acc;
    if (!f.per_map) std::fill(s, s + out_w, opmath_t(0));
    for (int64_t m = 0; m < f.num_maps; ++m) {
      scalar_t* o = f.per_map
          ? f.out + plane_offset(p, m, f.num_maps, f.channels, true, plane) + oy * out_w
          : nullptr;
      const auto& rows = f.rows[m];
      if (!f.four_tap[m]) {
        const SeparableTap<opmath_t, kFma> tap{f.tmp_row(p, m, rows.i0[oy]),
                                               f.tmp_row(p, m, rows.i1[oy]), rows.l0[oy],
                                               rows.l1[oy]};
        emit_row(tap, f.per_map, o, s, out_w);
      } else if (f.identity[m]) {
        const IdentityTap<scalar_t, opmath_t> tap{f.src[m] + (p * f.h[m] + oy) * f.w[m]};
        emit_row(tap, f.per_map, o, s, out_w);
      } else if (vector_channel) {
        const FourTap<opmath_t, kFma, true, kReduced> tap{
            f.tmp_row(p, m, rows.i0[oy]), f.tmp_row(p, m, rows.i1[oy]), f.cols[m].l0.data(),
            f.cols[m].l1.data(), rows.l0[oy], rows.l1[oy], out_w};
        emit_row(tap, f.per_map, o, s, out_w);
      } else {
        const FourTap<opmath_t, kFma, false, kHalf> tap{
            f.tmp_row(p, m, rows.i0[oy]), f.tmp_row(p, m, rows.i1[oy]), f.cols[m].l0.data(),
            f.cols[m].l1.data(), rows.l0[oy], rows.l1[oy], out_w};
        emit_row(tap, f.per_map, o, s, out_w);
      }
    }
    if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
      if (!f.per_map) {
#pragma omp simd
        for (int64_t x = 0; x < out_w; ++x) sum_row[x] = static_cast<scalar_t>(s[x]);
      }
    }
  }
}

// Entry points per instruction set. The FMA variants are compiled for AVX2+FMA
// and only called when the CPU has them (aten_uses_fma()).
template <typename scalar_t, typename opmath_t, bool kFma>
BIASMAP_INLINE void forward_rows_body(
    const Forward<scalar_t, opmath_t>& f, bool width, int64_t begin, int64_t end) {
  if (width) {
    width_pass<scalar_t, opmath_t, kFma>(f, begin, end);
    return;
  }
  std::vector<opmath_t> acc(f.out_w);
  output_pass<scalar_t, opmath_t, kFma>(f, begin, end, acc.data());
}

template <typename scalar_t, typename opmath_t>
BIASMAP_TARGET_FMA void forward_rows_fma(
    const Forward<scalar_t, opmath_t>& f, bool width, int64_t begin, int64_t end) {
  forward_rows_body<scalar_t, opmath_t, true>(f, width, begin, end);
}

template <typename scalar_t, typename opmath_t>
void forward_rows_plain(
    const Forward<scalar_t, opmath_t>& f, bool width, int64_t begin, int64_t end) {
  forward_rows_body<scalar_t, opmath_t, false>(f, width, begin, end);
}

template <typename scalar_t, typename opmath_t>
void run_rows(const Forward<scalar_t, opmath_t>& f, bool width, int64_t num_rows,
              int64_t row_cost, bool fma) {
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    if (fma) {
      forward_rows_fma<scalar_t, opmath_t>(f, width, begin, end);
    } else {
      forward_rows_plain<scalar_t, opmath_t>(f, width, begin, end);
    }
  });
}

// ATen's formula for one map (the input's own memory format matters: a
// channels-last input with more than 3 channels, which includes every 1x1 map,
// takes the four-tap loop at any output size).
bool map_four_tap(const at::Tensor& map, int64_t out_h, int64_t out_w, int num_threads) {
  return resize::use_four_tap(out_h, out_w, map.size(1), num_threads) ||
      (map.size(1) > 3 && map.is_contiguous(at::MemoryFormat::ChannelsLast));
}

struct MapsInfo {
  int64_t batch, channels;
  at::ScalarType dtype;
};

MapsInfo check_maps(const at::TensorList& maps, const char* op) {
  TORCH_CHECK(!maps.empty(), op, ": maps must be a non-empty list of tensors [B, T, h_i, w_i]");
  const at::Tensor& first = maps[0];
  for (size_t i = 0; i < maps.size(); ++i) {
    const at::Tensor& m = maps[i];
    TORCH_CHECK(m.dim() == 4, op, ": maps[", i, "] must be 4-D [B, T, h, w], got shape ",
                m.sizes());
    TORCH_CHECK(m.device().is_cpu(), op, ": maps[", i, "] must be a CPU tensor, got ", m.device());
    TORCH_CHECK(m.scalar_type() == first.scalar_type(), op, ": maps[", i, "] has dtype ",
                m.scalar_type(), " but maps[0] has ", first.scalar_type(),
                "; all maps must share one dtype");
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), op, ": maps[", i, "] has dtype ",
                m.scalar_type(), "; accepted: float16, bfloat16, float32, float64");
    TORCH_CHECK(m.size(0) == first.size(0) && m.size(1) == first.size(1), op, ": maps[", i,
                "] has [B, T] = [", m.size(0), ", ", m.size(1), "] but maps[0] has [",
                first.size(0), ", ", first.size(1), "]");
    TORCH_CHECK(m.size(2) >= 1 && m.size(3) >= 1 && m.size(2) < (1LL << 31) &&
                    m.size(3) < (1LL << 31),
                op, ": maps[", i, "] has an empty or too large spatial size ", m.sizes());
  }
  return {first.size(0), first.size(1), first.scalar_type()};
}

void check_size(int64_t out_h, int64_t out_w, const char* op) {
  TORCH_CHECK(out_h >= 1 && out_w >= 1 && out_h < (1LL << 31) && out_w < (1LL << 31), op,
              ": out_h and out_w must be positive, got ", out_h, " and ", out_w);
}

at::Tensor resize_aggregate_fwd(at::TensorList maps_in, int64_t out_h, int64_t out_w,
                                bool per_map) {
  const char* op = "resize_aggregate_fwd";
  const MapsInfo info = check_maps(maps_in, op);
  check_size(out_h, out_w, op);
  const int64_t num_maps = static_cast<int64_t>(maps_in.size());
  std::vector<at::Tensor> maps;
  maps.reserve(num_maps);
  for (const auto& m : maps_in) maps.push_back(m.contiguous());

  auto options = maps[0].options();
  at::Tensor out = per_map
      ? at::empty({info.batch, num_maps, info.channels, out_h, out_w}, options)
      : at::empty({info.batch, info.channels, out_h, out_w}, options);
  const int64_t num_planes = info.batch * info.channels;
  if (num_planes == 0) return out;

  const bool fma = aten_uses_fma();
  const int num_threads = at::get_num_threads();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, info.dtype, "resize_aggregate_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Forward<scalar_t, opmath_t> f;
    f.num_planes = num_planes;
    f.channels = info.channels;
    f.num_maps = num_maps;
    f.out_h = out_h;
    f.out_w = out_w;
    f.per_map = per_map;
    f.out = out.data_ptr<scalar_t>();
    f.unit0.assign(1, 0);
    f.row0.assign(1, 0);
    for (int64_t i = 0; i < num_maps; ++i) {
      const at::Tensor& m = maps[i];
      const int64_t h = m.size(2), w = m.size(3);
      const bool four_tap = map_four_tap(maps_in[i], out_h, out_w, num_threads);
      const bool identity = four_tap && h == out_h && w == out_w;
      const int64_t width = identity ? 0 : (four_tap ? 2 : 1);
      f.src.push_back(m.const_data_ptr<scalar_t>());
      f.h.push_back(h);
      f.w.push_back(w);
      f.four_tap.push_back(four_tap);
      f.identity.push_back(identity);
      f.width.push_back(width);
      f.rows.push_back(make_axis<scalar_t, opmath_t>(h, out_h, four_tap, fma));
      f.cols.push_back(make_axis<scalar_t, opmath_t>(w, out_w, four_tap, fma));
      f.unit0.push_back(f.unit0.back() + (width > 0 ? h : 0));
      f.row0.push_back(f.row0.back() + width * h);
    }
    at::Tensor tmp = at::empty({num_planes * f.row0.back(), out_w},
                               options.dtype(c10::CppTypeToScalarType<opmath_t>::value));
    f.tmp = tmp.data_ptr<opmath_t>();
    run_rows(f, /*width=*/true, num_planes * f.units_per_plane(), 2 * out_w, fma);
    run_rows(f, /*width=*/false, num_planes * out_h, 2 * num_maps * out_w, fma);
  });
  return out;
}

// --------------------------------------------------------------------------
// Backward
// --------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
struct Backward {
  int64_t num_planes = 0, channels = 0, num_maps = 0, out_h = 0, out_w = 0;
  bool per_map = false;
  const scalar_t* grad = nullptr;
  // Groups of maps with one shared gradient: all maps of a shape (summed mode),
  // or each map alone (per_map mode).
  struct Group {
    int64_t h, w;
    bool four_tap;
    std::vector<int64_t> members;
    Csr<opmath_t> rows, cols;
  };
  std::vector<Group> groups;
  std::vector<int64_t> v_row0;  // first row of group g in a plane's V block, [G + 1]
  opmath_t* v = nullptr;        // height-adjoint rows [planes, sum_g h_g, out_w]
  std::vector<scalar_t*> grad_maps;

  int64_t v_rows_per_plane() const { return v_row0.back(); }

  const scalar_t* grad_plane(int64_t p, int64_t g) const {
    const int64_t m = per_map ? groups[g].members[0] : 0;
    return grad + plane_offset(p, m, num_maps, channels, per_map, out_h * out_w);
  }

  int64_t locate(int64_t q) const {
    int64_t g = 0;
    while (q >= v_row0[g + 1]) ++g;
    return g;
  }
};

// Pass 1: V[y, :] = sum over output rows oy reading source row y of weight * grad[oy, :].
template <typename scalar_t, typename opmath_t, bool kFma>
BIASMAP_INLINE void height_adjoint(const Backward<scalar_t, opmath_t>& k, int64_t begin,
                                   int64_t end) {
  const int64_t per_plane = k.v_rows_per_plane(), out_w = k.out_w;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t p = r / per_plane, q = r % per_plane;
    const int64_t g = k.locate(q);
    const int64_t y = q - k.v_row0[g];
    const auto& csr = k.groups[g].rows;
    const scalar_t* gp = k.grad_plane(p, g);
    opmath_t* __restrict__ v = k.v + r * out_w;
    std::fill(v, v + out_w, opmath_t(0));
    for (int32_t e = csr.offset[y]; e < csr.offset[y + 1]; ++e) {
      const scalar_t* __restrict__ src = gp + static_cast<int64_t>(csr.dst[e]) * out_w;
      const opmath_t wt = csr.weight[e];
#pragma omp simd
      for (int64_t x = 0; x < out_w; ++x) {
        v[x] = madd<kFma>(wt, static_cast<opmath_t>(src[x]), v[x]);
      }
    }
  }
}

// Pass 2: grad_map[y, j] = sum over output columns reading source column j of weight * V[y, col].
template <typename scalar_t, typename opmath_t, bool kFma>
BIASMAP_INLINE void width_adjoint(const Backward<scalar_t, opmath_t>& k, int64_t begin,
                                  int64_t end) {
  const int64_t per_plane = k.v_rows_per_plane(), out_w = k.out_w;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t p = r / per_plane, q = r % per_plane;
    const int64_t g = k.locate(q);
    const int64_t y = q - k.v_row0[g];
    const auto& grp = k.groups[g];
    const auto& csr = grp.cols;
    const opmath_t* __restrict__ v = k.v + r * out_w;
    scalar_t* first = k.grad_maps[grp.members[0]] + (p * grp.h + y) * grp.w;
    for (int64_t j = 0; j < grp.w; ++j) {
      opmath_t s = 0;
      for (int32_t e = csr.offset[j]; e < csr.offset[j + 1]; ++e) {
        s = madd<kFma>(csr.weight[e], v[csr.dst[e]], s);
      }
      first[j] = static_cast<scalar_t>(s);
    }
    for (size_t i = 1; i < grp.members.size(); ++i) {
      std::memcpy(k.grad_maps[grp.members[i]] + (p * grp.h + y) * grp.w, first,
                  sizeof(scalar_t) * grp.w);
    }
  }
}

template <typename scalar_t, typename opmath_t>
BIASMAP_TARGET_FMA void backward_rows_fma(const Backward<scalar_t, opmath_t>& k, bool height,
                                          int64_t begin, int64_t end) {
  if (height) {
    height_adjoint<scalar_t, opmath_t, true>(k, begin, end);
  } else {
    width_adjoint<scalar_t, opmath_t, true>(k, begin, end);
  }
}

template <typename scalar_t, typename opmath_t>
void backward_rows_plain(const Backward<scalar_t, opmath_t>& k, bool height, int64_t begin,
                         int64_t end) {
  if (height) {
    height_adjoint<scalar_t, opmath_t, false>(k, begin, end);
  } else {
    width_adjoint<scalar_t, opmath_t, false>(k, begin, end);
  }
}

std::vector<at::Tensor> resize_aggregate_bwd(const at::Tensor& grad_in, at::TensorList maps,
                                             int64_t out_h, int64_t out_w, bool per_map) {
  const char* op = "resize_aggregate_bwd";
  const MapsInfo info = check_maps(maps, op);
  check_size(out_h, out_w, op);
  const int64_t num_maps = static_cast<int64_t>(maps.size());
  std::vector<int64_t> expected = per_map
      ? std::vector<int64_t>{info.batch, num_maps, info.channels, out_h, out_w}
      : std::vector<int64_t>{info.batch, info.channels, out_h, out_w};
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(expected), op, ": grad must have shape ",
              at::IntArrayRef(expected), ", got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == info.dtype, op, ": grad has dtype ", grad_in.scalar_type(),
              " but the maps have ", info.dtype);
  TORCH_CHECK(grad_in.device().is_cpu(), op, ": grad must be a CPU tensor, got ",
              grad_in.device());
  const at::Tensor grad = grad_in.contiguous();

  std::vector<at::Tensor> grads;
  grads.reserve(num_maps);
  for (const auto& m : maps) {
    grads.push_back(at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  const int64_t num_planes = info.batch * info.channels;
  if (num_planes == 0) return grads;

  const bool fma = aten_uses_fma();
  const int num_threads = at::get_num_threads();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, info.dtype, "resize_aggregate_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Group = typename Backward<scalar_t, opmath_t>::Group;
    Backward<scalar_t, opmath_t> k;
    k.num_planes = num_planes;
    k.channels = info.channels;
    k.num_maps = num_maps;
    k.out_h = out_h;
    k.out_w = out_w;
    k.per_map = per_map;
    k.grad = grad.const_data_ptr<scalar_t>();
    for (auto& g : grads) k.grad_maps.push_back(g.data_ptr<scalar_t>());
    for (int64_t m = 0; m < num_maps; ++m) {
      const int64_t h = maps[m].size(2), w = maps[m].size(3);
      // The adjoint of the weights the forward used (they differ between ATen's
      // two formulas only in how fp16/bf16 weights are rounded).
      const bool four_tap = map_four_tap(maps[m], out_h, out_w, num_threads);
      Group* found = nullptr;
      if (!per_map) {
        for (auto& g : k.groups) {
          if (g.h == h && g.w == w && g.four_tap == four_tap) found = &g;
        }
      }
      if (found != nullptr) {
        found->members.push_back(m);
        continue;
      }
      Group g;
      g.h = h;
      g.w = w;
      g.four_tap = four_tap;
      g.members.push_back(m);
      g.rows = transpose_axis(make_axis<scalar_t, opmath_t>(h, out_h, four_tap, fma), h);
      g.cols = transpose_axis(make_axis<scalar_t, opmath_t>(w, out_w, four_tap, fma), w);
      k.groups.push_back(std::move(g));
    }
    k.v_row0.assign(1, 0);
    for (const auto& g : k.groups) k.v_row0.push_back(k.v_row0.back() + g.h);
    const int64_t v_rows = num_planes * k.v_rows_per_plane();
    at::Tensor v = at::empty({v_rows, out_w},
                             grad.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    k.v = v.data_ptr<opmath_t>();

    for (const bool height : {true, false}) {
      // A source row gathers ~2 out_h / h gradient rows of out_w in pass 1, and
      // ~2 out_w values in pass 2.
      const int64_t cost =
          height ? 2 * out_w * std::max<int64_t>(1, out_h / k.groups[0].h) : 2 * out_w;
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / cost);
      at::parallel_for(0, v_rows, grain, [&](int64_t begin, int64_t end) {
        if (fma) {
          backward_rows_fma<scalar_t, opmath_t>(k, height, begin, end);
        } else {
          backward_rows_plain<scalar_t, opmath_t>(k, height, begin, end);
        }
      });
    }
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasmap, CPU, m) {
  m.impl("resize_aggregate_fwd", &resize_aggregate_fwd);
  m.impl("resize_aggregate_bwd", &resize_aggregate_bwd);
}

}  // namespace biasmap
