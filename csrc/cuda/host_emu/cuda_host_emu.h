// A minimal CUDA execution model on the CPU, for testing csrc/cuda/*.cuh on
// machines without a GPU. Include it before any kernel header and compile with
// a host C++20 compiler (g++ -std=c++20 -I csrc -I <cuda>/include -pthread).
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a
// std::barrier over the block, warp shuffles exchange through a per-warp buffer
// between two warp barriers (so a shuffle not reached by all 32 lanes hangs, as
// it is undefined on a GPU). Ordinary launches run one block after another,
// which also checks that no kernel relies on blocks running concurrently;
// cooperative launches run all blocks at once. The emulated device (SM count,
// blocks per SM, shared memory) is settable so that tests can force the
// multi-block and multi-round paths with small inputs.
//
// What it cannot check: register/shared-memory limits, the real memory model,
// warp-synchronous timing, fast-math intrinsics' accuracy. nvcc checks the
// code compiles for the real targets (scripts/nvcc_check.sh).
#pragma once

#define BIASMAP_CUDA_EMU 1

#include <cuda_runtime_api.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace bm_emu {

struct DeviceModel {
  int num_sms = 4;
  int max_blocks_per_sm = 2;
  int smem_optin = 227 * 1024;
};
inline DeviceModel& device() {
  static DeviceModel d;
  return d;
}

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32] = {};
};

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : bar(threads), warps(threads / 32), smem((smem_bytes + 15) / 16 + 1) {
    for (auto& w : warps) w = std::make_unique<Warp>();
    // Garbage, not zeros: a kernel that reads shared memory it never wrote
    // gets NaNs / huge counts instead of passing by luck.
    std::memset(static_cast<void*>(smem.data()), 0xff, smem.size() * sizeof(smem[0]));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::max_align_t> smem;  // 16-byte aligned storage
};

inline thread_local Block* tl_block = nullptr;

inline unsigned char* dyn_smem() { return reinterpret_cast<unsigned char*>(tl_block->smem.data()); }
inline void spin_pause() { std::this_thread::yield(); }

template <class V>
inline V load_shared_global(const V* p) {
  return std::atomic_ref<V>(*const_cast<V*>(p)).load();
}

inline unsigned lane() { return threadIdx.x & 31u; }

template <class V>
inline V shfl_from(V v, unsigned src) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  Warp& w = *tl_block->warps[threadIdx.x / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  w.slot[lane()] = bits;
  w.bar.arrive_and_wait();
  bits = w.slot[src & 31u];
  w.bar.arrive_and_wait();
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

template <class... P>
inline cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          bool cooperative, const std::tuple<P...>& params) {
  const unsigned threads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || threads % 32 != 0 || threads == 0 || threads > 1024) {
    return cudaErrorInvalidConfiguration;
  }
  if (smem > static_cast<size_t>(device().smem_optin)) return cudaErrorInvalidValue;
  const unsigned nblocks = grid.x * grid.y * grid.z;
  if (cooperative &&
      nblocks > static_cast<unsigned>(device().num_sms * device().max_blocks_per_sm)) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  auto block_index = [&](unsigned b) {
    return uint3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
  };
  auto run_blocks = [&](unsigned first, unsigned count) {
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> pool;
    for (unsigned b = 0; b < count; ++b) {
      blocks.push_back(std::make_unique<Block>(threads, smem));
      Block* blk = blocks.back().get();
      const uint3 bidx = block_index(first + b);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &params] {
          threadIdx = uint3{t, 0, 0};
          blockIdx = bidx;
          blockDim = dim3(threads, 1, 1);
          gridDim = grid;
          tl_block = blk;
          std::apply(kernel, params);
        });
      }
    }
    for (auto& th : pool) th.join();
  };
  if (cooperative) {
    run_blocks(0, nblocks);
  } else {
    for (unsigned b = 0; b < nblocks; ++b) run_blocks(b, 1);
  }
  return cudaSuccess;
}

}  // namespace bm_emu

// ---- CUDA device API used by the kernels ----------------------------------

inline void __syncthreads() { bm_emu::tl_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  bm_emu::tl_block->warps[threadIdx.x / 32]->bar.arrive_and_wait();
}
template <class V>
inline V __shfl_sync(unsigned, V v, int src, int = 32) {
  return bm_emu::shfl_from(v, static_cast<unsigned>(src));
}
template <class V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask, int = 32) {
  return bm_emu::shfl_from(v, bm_emu::lane() ^ static_cast<unsigned>(lane_mask));
}
template <class V>
inline V __shfl_up_sync(unsigned, V v, unsigned delta, int = 32) {
  const unsigned l = bm_emu::lane();
  return bm_emu::shfl_from(v, l >= delta ? l - delta : l);
}
template <class V>
inline V __shfl_down_sync(unsigned, V v, unsigned delta, int = 32) {
  const unsigned l = bm_emu::lane();
  return bm_emu::shfl_from(v, l + delta < 32 ? l + delta : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned bits = 0;
  for (unsigned src = 0; src < 32; ++src) {
    bits |= (bm_emu::shfl_from(pred ? 1u : 0u, src) & 1u) << src;
  }
  return bits;
}
template <class V>
inline V atomicAdd(V* p, V v) {
  return std::atomic_ref<V>(*p).fetch_add(v);
}
template <class V>
inline V atomicMax(V* p, V v) {
  std::atomic_ref<V> r(*p);
  V cur = r.load();
  while (cur < v && !r.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <class V>
inline V __ldg(const V* p) {
  return *p;
}
template <class V>
inline V __ldcg(const V* p) {
  return bm_emu::load_shared_global(p);
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline long long __double_as_longlong(double d) {
  long long u;
  std::memcpy(&u, &d, 8);
  return u;
}
inline double __longlong_as_double(long long u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}
