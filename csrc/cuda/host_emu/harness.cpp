// C entry points that run the CUDA kernel headers under the host emulation, for
// tests/test_cuda_compile.py (ctypes). Pointers are host memory; dtype codes:
// 0 float32, 1 float64, 2 float16, 3 bfloat16. Every entry returns the
// cudaError_t of the launcher (0 = success).
//
// Build (tests/test_cuda_compile.py does): g++ -std=c++20 -O1 -pthread -shared
//   -fPIC -I csrc -I <cuda>/include -DBIASMAP_TOPK_SMALL_THREADS=64
//   -DBIASMAP_TOPK_LARGE_THREADS=128 harness.cpp
// (smaller top-k blocks than on a GPU keep the thread count of the emulation low;
// the kernels are templates over the block size, so the code is the same).
#include "cuda/host_emu/cuda_host_emu.h"
// clang-format off
#include "cuda/attention_slice.cuh"
#include "cuda/quantile_mask.cuh"
#include "cuda/resize_aggregate.cuh"
#include "cuda/soft_iou.cuh"
#include "cuda/soft_topk.cuh"
// clang-format on

#include <vector>

namespace bc = biasmap::cuda;

namespace {

template <class F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(double{});
    case 2:
      return f(__half{});
    case 3:
      return f(__nv_bfloat16{});
    default:
      return -1;
  }
}

constexpr int kSms() { return 0; }  // unused marker

}  // namespace

extern "C" {

void bm_emu_set_device(int num_sms, int blocks_per_sm, int smem_optin) {
  bm_emu::device().num_sms = num_sms;
  bm_emu::device().max_blocks_per_sm = blocks_per_sm;
  bm_emu::device().smem_optin = smem_optin;
}

int bm_attention_fwd(int dtype, const void* q, const void* k, const int64_t* tok,
                     const uint8_t* mask, int64_t B, int64_t N, int64_t Bk, int64_t L, int64_t Bm,
                     int H, int d, int T, double scale, void* out, void* lse) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto g = bc::attention::make_geom<bc::acc_t<S>>(B, N, Bk, L, mask ? Bm : 0, H, d, T);
    if (!bc::attention::smem_fits<S>(g)) return 1000;
    std::vector<unsigned char> ws(bc::attention::forward_workspace_bytes<S>(g) + 16);
    return static_cast<int>(bc::attention::forward<S>(
        static_cast<const S*>(q), static_cast<const S*>(k), tok, mask, g, scale,
        static_cast<S*>(out), static_cast<bc::acc_t<S>*>(lse), ws.data(),
        bm_emu::device().num_sms, nullptr));
  });
}

int bm_attention_bwd(int dtype, const void* grad_out, const void* q, const void* k,
                     const int64_t* tok, const uint8_t* mask, const void* lse, int64_t B,
                     int64_t N, int64_t Bk, int64_t L, int64_t Bm, int H, int d, int T,
                     double scale, void* grad_q, void* grad_k) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto g = bc::attention::make_geom<bc::acc_t<S>>(B, N, Bk, L, mask ? Bm : 0, H, d, T);
    const int sms = bm_emu::device().num_sms;
    std::vector<unsigned char> ws(
        bc::attention::backward_workspace_bytes<S>(g, sms, grad_k != nullptr) + 16);
    return static_cast<int>(bc::attention::backward<S>(
        static_cast<const S*>(grad_out), static_cast<const S*>(q), static_cast<const S*>(k), tok,
        mask, static_cast<const bc::acc_t<S>*>(lse), g, scale, static_cast<S*>(grad_q),
        static_cast<S*>(grad_k), ws.data(), sms, nullptr));
  });
}

int bm_resize_fwd(int dtype, const void* const* maps, const int* h, const int* w, int M, int64_t B,
                  int64_t T, int OH, int OW, int per_map, void* out) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    return static_cast<int>(bc::resize::forward<S>(reinterpret_cast<const S* const*>(maps), h, w,
                                                   M, B, T, OH, OW, per_map != 0,
                                                   static_cast<S*>(out),
                                                   bm_emu::device().num_sms, nullptr));
  });
}

int bm_resize_bwd(int dtype, const void* grad, const int* h, const int* w, int M, int64_t B,
                  int64_t T, int OH, int OW, int per_map, void* const* grads) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    return static_cast<int>(bc::resize::backward<S>(static_cast<const S*>(grad), h, w, M, B, T, OH,
                                                    OW, per_map != 0,
                                                    reinterpret_cast<S* const*>(grads),
                                                    bm_emu::device().num_sms, nullptr));
  });
}

// kind: 0 exact fwd, 1 exact bwd, 2 sinkhorn fwd, 3 sinkhorn bwd.
int bm_topk(int dtype, int kind, const void* x, const void* grad, const void* mask, void* out,
            double* stats, int64_t rows, int64_t n, int64_t k, double tau, int iters, int minmax) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto kk = static_cast<bc::topk::Kernel>(kind);
    bc::topk::Args<S> a;
    a.x = static_cast<const S*>(x);
    a.grad = static_cast<const S*>(grad);
    a.mask = static_cast<const S*>(mask);
    a.out = static_cast<S*>(out);
    a.stats = stats;
    a.k = k;
    a.tau = tau;
    a.iters = iters;
    a.minmax = minmax != 0;
    std::vector<unsigned char> ws(bc::topk::workspace_bytes<S>(kk, rows, n, iters) + 16);
    return static_cast<int>(bc::topk::launch<S>(kk, a, rows, n, ws.data(), nullptr));
  });
}

// The plan the launcher would use: out = {P, groups, chunk, smem_cache, threads, cooperative}.
int bm_topk_plan(int dtype, int kind, int64_t rows, int64_t n, int iters, int64_t* out) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto p = bc::topk::make_plan<S>(static_cast<bc::topk::Kernel>(kind), rows, n, iters);
    out[0] = p.lay.P;
    out[1] = p.lay.groups;
    out[2] = p.lay.chunk;
    out[3] = p.lay.smem_cache;
    out[4] = p.threads;
    out[5] = p.cooperative;
    return 0;
  });
}

int bm_iou_fwd(int dtype, const void* a, const void* b, int64_t rows, int64_t n, double eps,
               double* sums, void* iou) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const int sms = bm_emu::device().num_sms;
    std::vector<unsigned char> ws(bc::soft_iou::forward_workspace_bytes(rows, n, sms) + 16);
    return static_cast<int>(bc::soft_iou::forward<S>(static_cast<const S*>(a),
                                                     static_cast<const S*>(b), rows, n, eps, sums,
                                                     static_cast<S*>(iou), ws.data(), sms, nullptr));
  });
}

int bm_iou_bwd(int dtype, const void* grad, const void* a, const void* b, const double* sums,
               int64_t rows, int64_t n, double eps, void* grad_a, void* grad_b) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    return static_cast<int>(bc::soft_iou::backward<S>(
        static_cast<const S*>(grad), static_cast<const S*>(a), static_cast<const S*>(b), sums, rows,
        n, eps, static_cast<S*>(grad_a), static_cast<S*>(grad_b), bm_emu::device().num_sms,
        nullptr));
  });
}

int bm_mask_iou(const uint8_t* a, const uint8_t* b, int64_t rows, int64_t n, float* out) {
  return static_cast<int>(bc::soft_iou::mask_iou(a, b, rows, n, out, nullptr));
}

int bm_quantile_mask(int dtype, const void* x, int64_t rows, int64_t n, double q, int inclusive,
                     uint8_t* out) {
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    return static_cast<int>(bc::quantile::quantile_mask<S>(static_cast<const S*>(x), rows, n, q,
                                                           inclusive != 0, out, nullptr));
  });
}

}  // extern "C"
