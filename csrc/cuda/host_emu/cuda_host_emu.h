// A minimal CUDA execution model on the CPU, for testing csrc/cuda/*.cuh on
// machines without a GPU. Include it before any kernel header and compile with
// a host C++20 compiler (g++ -std=c++20 -I csrc -I <cuda>/include).
//
// Every CUDA thread is a fiber (ucontext) on the calling OS thread. A fiber runs
// until it has to wait: __syncthreads (all threads of its block), a warp
// shuffle (all 32 lanes of its warp; a shuffle not reached by every lane hangs,
// as it is undefined on a GPU) or a spin-wait on another block. The scheduler
// resumes the fibers in an order reshuffled every round from a seed
// (BIASMAP_EMU_SEED), so a missing barrier shows up as reads of shared memory
// that was not written yet (shared memory starts as 0xff bytes, i.e. NaN) for
// some seeds. When no fiber can move the launch fails with a deadlock error.
// Ordinary launches run one block after another, which also checks that no
// kernel relies on blocks running concurrently; cooperative launches run all
// blocks at once. The emulated device (SM count, blocks per SM, shared memory)
// is settable so that tests can force the multi-block and multi-round paths of
// the kernels with small inputs.
//
// What it cannot check: register / shared-memory limits, the GPU memory model,
// warp-synchronous timing, fast-math intrinsics' accuracy. nvcc checks that the
// code compiles for the real targets (scripts/nvcc_check.sh).
#pragma once

#define BIASMAP_CUDA_EMU 1

#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
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

// Counts everything that can unblock a waiting fiber; a scheduler round in
// which it does not change while fibers still wait is a deadlock.
inline unsigned long long& progress() {
  static unsigned long long p = 0;
  return p;
}

struct Barrier {
  unsigned count = 0, arrived = 0;
  unsigned long long generation = 0;
};

struct Warp {
  Barrier bar;
  uint64_t slot[32] = {};
};

struct Block {
  Block(unsigned threads, size_t smem_bytes)
      : warps(threads / 32), smem((smem_bytes + 15) / 16 + 1) {
    bar.count = threads;
    for (auto& w : warps) w.bar.count = 32;
    // Garbage, not zeros: a kernel that reads shared memory it never wrote
    // gets NaNs / huge counts instead of passing by luck.
    std::memset(static_cast<void*>(smem.data()), 0xff, smem.size() * sizeof(smem[0]));
  }
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<std::max_align_t> smem;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid, bid;
  Block* block;
  bool done = false;
};

struct Scheduler {
  ucontext_t main;
  Fiber* current = nullptr;
  dim3 grid, block_dim;
};
inline thread_local Scheduler* tl_sched = nullptr;
inline thread_local Block* tl_block = nullptr;

inline void yield() { swapcontext(&tl_sched->current->ctx, &tl_sched->main); }

inline void arrive_and_wait(Barrier& b) {
  ++progress();
  const unsigned long long gen = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline unsigned char* dyn_smem() { return reinterpret_cast<unsigned char*>(tl_block->smem.data()); }
inline void spin_pause() { yield(); }

template <class V>
inline V load_shared_global(const V* p) {
  return *const_cast<const volatile V*>(p);
}

inline unsigned lane() { return threadIdx.x & 31u; }

template <class V>
inline V shfl_from(V v, unsigned src) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  Warp& w = tl_block->warps[threadIdx.x / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  w.slot[lane()] = bits;
  arrive_and_wait(w.bar);
  bits = w.slot[src & 31u];
  arrive_and_wait(w.bar);
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

struct LaunchError {
  cudaError_t code;
};

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
  const char* seed_env = std::getenv("BIASMAP_EMU_SEED");
  std::mt19937 rng(seed_env ? static_cast<unsigned>(std::strtoul(seed_env, nullptr, 10)) : 0u);
  constexpr size_t kStack = 256 * 1024;

  Scheduler sched;
  sched.grid = grid;
  sched.block_dim = dim3(threads, 1, 1);
  Scheduler* prev_sched = tl_sched;
  tl_sched = &sched;

  static thread_local const std::tuple<P...>* tl_params;
  static thread_local void (*tl_kernel)(P...);
  tl_params = &params;
  tl_kernel = kernel;
  auto entry = +[]() {
    std::apply(tl_kernel, *tl_params);
    tl_sched->current->done = true;
    ++progress();
    swapcontext(&tl_sched->current->ctx, &tl_sched->main);
  };

  auto run_blocks = [&](unsigned first, unsigned count) -> cudaError_t {
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::unique_ptr<Fiber>> fibers;
    for (unsigned b = 0; b < count; ++b) {
      blocks.push_back(std::make_unique<Block>(threads, smem));
      const unsigned id = first + b;
      const uint3 bidx{id % grid.x, (id / grid.x) % grid.y, id / (grid.x * grid.y)};
      for (unsigned t = 0; t < threads; ++t) {
        auto f = std::make_unique<Fiber>();
        f->stack.reset(new char[kStack]);
        f->tid = uint3{t, 0, 0};
        f->bid = bidx;
        f->block = blocks.back().get();
        getcontext(&f->ctx);
        f->ctx.uc_stack.ss_sp = f->stack.get();
        f->ctx.uc_stack.ss_size = kStack;
        f->ctx.uc_link = nullptr;
        makecontext(&f->ctx, entry, 0);
        fibers.push_back(std::move(f));
      }
    }
    std::vector<size_t> order(fibers.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    size_t live = fibers.size();
    while (live > 0) {
      std::shuffle(order.begin(), order.end(), rng);
      const unsigned long long before = progress();
      for (size_t i : order) {
        Fiber* f = fibers[i].get();
        if (f->done) continue;
        threadIdx = f->tid;
        blockIdx = f->bid;
        blockDim = sched.block_dim;
        gridDim = grid;
        tl_block = f->block;
        sched.current = f;
        swapcontext(&sched.main, &f->ctx);
        if (f->done) --live;
      }
      if (live > 0 && progress() == before) return cudaErrorLaunchTimeout;  // deadlock
    }
    return cudaSuccess;
  };
  cudaError_t err = cudaSuccess;
  if (cooperative) {
    err = run_blocks(0, nblocks);
  } else {
    for (unsigned b = 0; b < nblocks && err == cudaSuccess; ++b) err = run_blocks(b, 1);
  }
  tl_sched = prev_sched;
  return err;
}

}  // namespace bm_emu

// ---- CUDA device API used by the kernels ----------------------------------

inline void __syncthreads() { bm_emu::arrive_and_wait(bm_emu::tl_block->bar); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  bm_emu::arrive_and_wait(bm_emu::tl_block->warps[threadIdx.x / 32].bar);
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
template <class V>
inline V atomicAdd(V* p, V v) {
  ++bm_emu::progress();
  const V old = *p;
  *p = old + v;
  return old;
}
template <class V>
inline V atomicMax(V* p, V v) {
  ++bm_emu::progress();
  const V old = *p;
  if (old < v) *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __nanosleep(unsigned) { bm_emu::yield(); }
template <class V>
inline V __ldg(const V* p) {
  return *p;
}
template <class V>
inline V __ldcg(const V* p) {
  return *p;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
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
