// CUDA kernels for biasmap::attention_slice_fwd / attention_slice_bwd.
//
// Math, per batch b, head h, query n, over the kept keys l (scores
// s_l = scale * q_n . k_l):
//   lse = logsumexp_l s_l,  p_l = exp(s_l - lse),  out[b, t, n] = sum_h p_{tok_t}.
// Backward with upstream g[t] = grad_out[b, t, n]:
//   G_l = sum_{t: tok_t = l} g[t],  D = sum_l G_l p_l,  ds_l = p_l (G_l - D),
//   grad_q_n = scale sum_l ds_l k_l,  grad_k_l = scale sum_{b, n} ds_l q_n.
//
// Layout: a block works on a tile of 32 query rows and walks the keys in tiles
// of 32, one key per lane; warp w owns rows w, w+8, w+16, w+24, so a row's 32
// scores of a key tile sit in one warp's registers and its running max / sum
// (online softmax) update with two shuffle reductions. Only out [B, T, N] and
// lse [B, H, N] reach memory; [B, H, N, L] never exists, not even per block.
//   forward:  block = (b, h, row tile), so that small layers still fill the GPU
//             (N=256 with 8 heads: 128 blocks, not 16). With several heads each
//             block writes its head's token probabilities to a float workspace
//             [B, H, T, N] and a second kernel sums the heads in order
//             (deterministic); with one head it writes out directly.
//   bwd dq:   block = (b, h, row tile); two sweeps over the key tiles (D first,
//             then ds and grad_q = ds K'), writes grad_q and D [B, H, N].
//   bwd dk:   block = (key batch, h, key tile, row chunk): sweeps the chunk's
//             query rows, recomputes p and ds from lse and D, and adds
//             ds^T Q into a [32, d] shared accumulator. Row chunks write float
//             partials [C, Bk, L, H*d] that a last kernel adds in chunk order
//             (deterministic; no atomics). With one chunk it writes grad_k.
// Keys are staged pre-multiplied by scale (K' = scale K), so scores are Q K'^T
// and grad_q = ds K'. Rows of shared tiles are padded to a stride whose 16-byte
// groups are odd, which keeps the 128-bit loads of K' rows conflict-free.
#pragma once

#include "cuda/common.cuh"

namespace biasmap {
namespace cuda {
namespace attention {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // query rows per tile and keys per tile
constexpr int kRowsPerWarp = kTile / kWarps;

// 16-byte vectors of the accumulate type: float4 or double2.
template <class A>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int width = 4;
  static BM_HD_INLINE float dot(const float4& a, const float4& b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
  static BM_HD_INLINE void axpy(float s, const float4& x, float4& y) {
    y.x += s * x.x;
    y.y += s * x.y;
    y.z += s * x.z;
    y.w += s * x.w;
  }
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int width = 2;
  static BM_HD_INLINE double dot(const double2& a, const double2& b) {
    return a.x * b.x + a.y * b.y;
  }
  static BM_HD_INLINE void axpy(double s, const double2& x, double2& y) {
    y.x += s * x.x;
    y.y += s * x.y;
  }
};

struct Geom {
  int64_t batch;     // B
  int64_t n_query;   // N
  int64_t k_batch;   // Bk: 1 or B
  int64_t n_keys;    // L
  int64_t m_batch;   // key_mask rows: 1 or B (0 without a mask)
  int64_t inner;     // H * d
  int heads;         // H
  int head_dim;      // d
  int tokens;        // T
  int dpad;          // d rounded up to the vector width
  int ld;            // row stride of the shared Q / K' tiles
};

template <class A>
BIASMAP_HD inline Geom make_geom(int64_t batch, int64_t n_query, int64_t k_batch, int64_t n_keys,
                                 int64_t m_batch, int heads, int head_dim, int tokens) {
  constexpr int vw = Vec16<A>::width;
  Geom g;
  g.batch = batch;
  g.n_query = n_query;
  g.k_batch = k_batch;
  g.n_keys = n_keys;
  g.m_batch = m_batch;
  g.heads = heads;
  g.head_dim = head_dim;
  g.inner = static_cast<int64_t>(heads) * head_dim;
  g.tokens = tokens;
  g.dpad = (head_dim + vw - 1) / vw * vw;
  // An odd number of 16-byte groups per row: 8 lanes reading 16 bytes each
  // from 8 consecutive rows then hit 8 different 4-bank groups.
  g.ld = (g.dpad / vw) % 2 == 1 ? g.dpad : g.dpad + vw;
  return g;
}

// Shared memory of each kernel, in bytes (backward: the larger of dq and dk).
template <class A>
BIASMAP_HD inline size_t forward_smem(const Geom& g) {
  return 2 * smem_bytes<A>(static_cast<size_t>(kTile) * g.ld) + smem_bytes<A>(kTile) +
         smem_bytes<int>(g.tokens) + smem_bytes<A>(static_cast<size_t>(kTile) * g.tokens);
}
template <class A>
BIASMAP_HD inline size_t backward_smem(const Geom& g) {
  return 2 * smem_bytes<A>(static_cast<size_t>(kTile) * g.ld) + smem_bytes<A>(kTile) +
         smem_bytes<int>(g.tokens) + smem_bytes<A>(static_cast<size_t>(kTile) * g.tokens) +
         smem_bytes<A>(static_cast<size_t>(kTile) * (kTile + 1)) +
         smem_bytes<A>(static_cast<size_t>(kTile) * g.dpad) + 3 * smem_bytes<A>(kTile) +
         smem_bytes<int>(kTile);
}

// Q tile rows [kTile, ld] of head h: row r from `row_ptr(r)` (nullptr: zeros);
// columns past d are zero so that the vector loops may run to dpad.
template <class T, class A, class RowPtr>
BM_DEVICE void load_tile(A* dst, const Geom& g, int h, A mul, const RowPtr& row_ptr) {
  const int total = kTile * g.dpad;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int r = idx / g.dpad, j = idx - r * g.dpad;
    const T* src = row_ptr(r);
    dst[r * g.ld + j] =
        (src != nullptr && j < g.head_dim) ? mul * load_as<A>(src, static_cast<int64_t>(h) * g.head_dim + j) : A(0);
  }
}

// Scores of this warp's rows against key `lane` of the staged tile:
// acc[i] = Q[warp + 8 i] . K'[lane].
template <class A>
BM_DEVICE void tile_scores(const A* Qs, const A* Ks, const Geom& g, A (&acc)[kRowsPerWarp]) {
  using V = Vec16<A>;
  using VT = typename V::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = A(0);
  for (int j = 0; j < g.dpad; j += V::width) {
    const VT kv = *reinterpret_cast<const VT*>(Ks + lane * g.ld + j);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const VT qv = *reinterpret_cast<const VT*>(Qs + (warp + kWarps * i) * g.ld + j);
      acc[i] += V::dot(qv, kv);
    }
  }
}

// G for (row r, key l): the upstream gradients of the token columns equal to l.
template <class A>
BM_DEVICE A token_grad(const int* tok, const A* gs, int tokens, int r, int64_t l) {
  A G = A(0);
  for (int t = 0; t < tokens; ++t) G += tok[t] == l ? gs[r * tokens + t] : A(0);
  return G;
}

// Stages key tile l0 of head h: K' = scale K in Ks, and each key's mask bias (0 kept, -inf
// masked or past L) in kbias. The leading barrier lets the previous tile's readers finish.
template <class T, class A>
BM_DEVICE void stage_key_tile(A* Ks, A* kbias, const Geom& g, int h, A scale, const T* k,
                              int64_t kb, const uint8_t* mask, int64_t l0) {
  __syncthreads();
  auto k_row = [&](int c) -> const T* {
    const int64_t l = l0 + c;
    return l < g.n_keys ? k + (kb * g.n_keys + l) * g.inner : nullptr;
  };
  load_tile<T, A>(Ks, g, h, scale, k_row);
  if (threadIdx.x < kTile) {
    const int64_t l = l0 + threadIdx.x;
    const bool keep = l < g.n_keys && (mask == nullptr || mask[l] != 0);
    kbias[threadIdx.x] = keep ? A(0) : A(-INFINITY);
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                   const int64_t* __restrict__ token_index, const uint8_t* __restrict__ key_mask,
                   Geom g, double scale_d, T* __restrict__ out, acc_t<T>* __restrict__ lse,
                   acc_t<T>* __restrict__ head_probs) {
  using A = acc_t<T>;
  const A scale = static_cast<A>(scale_d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = ceil_div(g.n_query, kTile);
  const int64_t b = blockIdx.x / (tiles * g.heads);
  const int h = static_cast<int>((blockIdx.x / tiles) % g.heads);
  const int64_t n0 = (blockIdx.x % tiles) * kTile;
  const int64_t kb = g.k_batch == 1 ? 0 : b;
  const uint8_t* mask = key_mask == nullptr ? nullptr : key_mask + (g.m_batch == 1 ? 0 : b) * g.n_keys;

  SmemCarver carve{dyn_smem()};
  A* Qs = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  A* Ks = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  A* kbias = carve.take<A>(kTile);
  int* tok = carve.take<int>(g.tokens);
  A* stok = carve.take<A>(static_cast<size_t>(kTile) * g.tokens);  // the token columns' scores

  for (int t = threadIdx.x; t < g.tokens; t += kThreads) tok[t] = static_cast<int>(token_index[t]);

  auto q_row = [&](int r) -> const T* {
    const int64_t n = n0 + r;
    return n < g.n_query ? q + (b * g.n_query + n) * g.inner : nullptr;
  };
  load_tile<T, A>(Qs, g, h, A(1), q_row);
  A m[kRowsPerWarp], s[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    s[i] = A(0);
    // A token index outside [0, L) then reads as a masked key (probability 0)
    // instead of stale shared memory.
    for (int t = lane; t < g.tokens; t += 32) stok[(warp + kWarps * i) * g.tokens + t] = A(-INFINITY);
  }
  __syncwarp();
  for (int64_t l0 = 0; l0 < g.n_keys; l0 += kTile) {
    // Its barriers also order the first tile after the Qs, tok and stok writes above.
    stage_key_tile<T, A>(Ks, kbias, g, h, scale, k, kb, mask, l0);
    A acc[kRowsPerWarp];
    tile_scores<A>(Qs, Ks, g, acc);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      const A sc = acc[i] + kbias[lane];
      const A tmax = warp_max(sc);
      if (tmax > A(-INFINITY)) {  // uniform over the warp
        const A nm = bm_max(m[i], tmax);
        const A p = sc == A(-INFINITY) ? A(0) : bm_exp(sc - nm);
        const A ts = warp_sum(p);
        s[i] = (m[i] == A(-INFINITY) ? A(0) : s[i] * bm_exp(m[i] - nm)) + ts;
        m[i] = nm;
      }
      for (int t = 0; t < g.tokens; ++t) {
        const int l = tok[t];
        if (l >= l0 && l < l0 + kTile) {  // uniform over the warp
          const A v = __shfl_sync(kFullMask, sc, static_cast<int>(l - l0));
          if (lane == 0) stok[r * g.tokens + t] = v;
        }
      }
    }
  }
  __syncwarp();  // lane 0's stok writes are visible to the warp
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp + kWarps * i;
    const int64_t n = n0 + r;
    if (n >= g.n_query) continue;  // uniform over the warp
    const A row_lse = m[i] + bm_log(s[i]);
    if (lane == 0) lse[(b * g.heads + h) * g.n_query + n] = row_lse;
    for (int t = lane; t < g.tokens; t += 32) {
      const A v = stok[r * g.tokens + t];
      const A p = v == A(-INFINITY) ? A(0) : bm_exp(v - row_lse);
      if (head_probs == nullptr) {
        out[(b * g.tokens + t) * g.n_query + n] = store_as<T>(p);
      } else {
        head_probs[((b * g.heads + h) * g.tokens + t) * g.n_query + n] = p;
      }
    }
  }
}

// out[b, t, n] = sum over h, in order, of head_probs[b, h, t, n].
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_heads_kernel(const acc_t<T>* __restrict__ head_probs, Geom g, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t plane = g.tokens * g.n_query;  // one image's [T, N]
  const int64_t total = g.batch * plane;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / plane, tn = idx - b * plane;
    const A* src = head_probs + b * g.heads * plane + tn;
    A sum = A(0);
    for (int h = 0; h < g.heads; ++h) sum += src[h * plane];
    out[idx] = store_as<T>(sum);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                       const T* __restrict__ k, const int64_t* __restrict__ token_index,
                       const uint8_t* __restrict__ key_mask, const acc_t<T>* __restrict__ lse,
                       Geom g, double scale_d, T* __restrict__ grad_q,
                       acc_t<T>* __restrict__ delta) {
  using A = acc_t<T>;
  using V = Vec16<A>;
  using VT = typename V::type;
  const A scale = static_cast<A>(scale_d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = ceil_div(g.n_query, kTile);
  const int64_t tile = blockIdx.x % tiles;
  const int64_t bh = blockIdx.x / tiles;
  const int h = static_cast<int>(bh % g.heads);
  const int64_t b = bh / g.heads;
  const int64_t n0 = tile * kTile;
  const int64_t kb = g.k_batch == 1 ? 0 : b;
  const uint8_t* mask = key_mask == nullptr ? nullptr : key_mask + (g.m_batch == 1 ? 0 : b) * g.n_keys;

  SmemCarver carve{dyn_smem()};
  A* Qs = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  A* Ks = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  A* kbias = carve.take<A>(kTile);
  int* tok = carve.take<int>(g.tokens);
  A* gs = carve.take<A>(static_cast<size_t>(kTile) * g.tokens);
  A* ds_s = carve.take<A>(static_cast<size_t>(kTile) * (kTile + 1));
  A* dQ = carve.take<A>(static_cast<size_t>(kTile) * g.dpad);
  A* lse_s = carve.take<A>(kTile);

  for (int t = threadIdx.x; t < g.tokens; t += kThreads) tok[t] = static_cast<int>(token_index[t]);
  for (int idx = threadIdx.x; idx < kTile * g.tokens; idx += kThreads) {
    const int t = idx / kTile, r = idx - t * kTile;
    const int64_t n = n0 + r;
    gs[r * g.tokens + t] = n < g.n_query ? load_as<A>(grad_out, (b * g.tokens + t) * g.n_query + n) : A(0);
  }
  for (int idx = threadIdx.x; idx < kTile * g.dpad; idx += kThreads) dQ[idx] = A(0);
  if (threadIdx.x < kTile) {
    const int64_t n = n0 + threadIdx.x;
    lse_s[threadIdx.x] = n < g.n_query ? lse[(b * g.heads + h) * g.n_query + n] : A(0);
  }
  auto q_row = [&](int r) -> const T* {
    const int64_t n = n0 + r;
    return n < g.n_query ? q + (b * g.n_query + n) * g.inner : nullptr;
  };
  load_tile<T, A>(Qs, g, h, A(1), q_row);

  A D[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) D[i] = A(0);
  for (int64_t l0 = 0; l0 < g.n_keys; l0 += kTile) {
    stage_key_tile<T, A>(Ks, kbias, g, h, scale, k, kb, mask, l0);
    A acc[kRowsPerWarp];
    tile_scores<A>(Qs, Ks, g, acc);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      const A sc = acc[i] + kbias[lane];
      const A p = sc == A(-INFINITY) ? A(0) : bm_exp(sc - lse_s[r]);
      D[i] += token_grad(tok, gs, g.tokens, r, l0 + lane) * p;
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) D[i] = warp_sum(D[i]);

  const int nvec = g.dpad / V::width;
  for (int64_t l0 = 0; l0 < g.n_keys; l0 += kTile) {
    stage_key_tile<T, A>(Ks, kbias, g, h, scale, k, kb, mask, l0);
    A acc[kRowsPerWarp];
    tile_scores<A>(Qs, Ks, g, acc);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      const A sc = acc[i] + kbias[lane];
      const A p = sc == A(-INFINITY) ? A(0) : bm_exp(sc - lse_s[r]);
      ds_s[r * (kTile + 1) + lane] = p * (token_grad(tok, gs, g.tokens, r, l0 + lane) - D[i]);
    }
    __syncthreads();
    // dQ[r, :] += sum_c ds[r, c] K'[c, :]
    for (int o = threadIdx.x; o < kTile * nvec; o += kThreads) {
      const int r = o / nvec, jv = (o - r * nvec) * V::width;
      VT a = *reinterpret_cast<VT*>(dQ + r * g.dpad + jv);
      for (int c = 0; c < kTile; ++c) {
        V::axpy(ds_s[r * (kTile + 1) + c], *reinterpret_cast<const VT*>(Ks + c * g.ld + jv), a);
      }
      *reinterpret_cast<VT*>(dQ + r * g.dpad + jv) = a;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * g.head_dim; idx += kThreads) {
    const int r = idx / g.head_dim, j = idx - r * g.head_dim;
    const int64_t n = n0 + r;
    if (n < g.n_query) {
      grad_q[(b * g.n_query + n) * g.inner + static_cast<int64_t>(h) * g.head_dim + j] =
          store_as<T>(dQ[r * g.dpad + j]);
    }
  }
  if (delta != nullptr && lane == 0) {  // only the dk kernel reads D back
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t n = n0 + warp + kWarps * i;
      if (n < g.n_query) delta[(b * g.heads + h) * g.n_query + n] = D[i];
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_dk_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                       const T* __restrict__ k, const int64_t* __restrict__ token_index,
                       const uint8_t* __restrict__ key_mask, const acc_t<T>* __restrict__ lse,
                       const acc_t<T>* __restrict__ delta, Geom g, double scale_d,
                       int64_t chunks, int64_t chunk_rows, T* __restrict__ grad_k,
                       acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  using V = Vec16<A>;
  using VT = typename V::type;
  const A scale = static_cast<A>(scale_d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ktiles = ceil_div(g.n_keys, kTile);
  int64_t rest = blockIdx.x;
  const int64_t chunk = rest % chunks;
  rest /= chunks;
  const int64_t l0 = (rest % ktiles) * kTile;
  rest /= ktiles;
  const int h = static_cast<int>(rest % g.heads);
  const int64_t kb = rest / g.heads;
  // The query rows this key batch sees: all B*N rows for shared keys, else batch kb's.
  const bool shared_keys = g.k_batch == 1;
  const int64_t rows = shared_keys ? g.batch * g.n_query : g.n_query;
  const int64_t row_begin = chunk * chunk_rows;
  const int64_t row_end = bm_min<int64_t>(rows, row_begin + chunk_rows);

  SmemCarver carve{dyn_smem()};
  A* Qs = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  A* Ks = carve.take<A>(static_cast<size_t>(kTile) * g.ld);
  int* tok = carve.take<int>(g.tokens);
  A* gs = carve.take<A>(static_cast<size_t>(kTile) * g.tokens);
  A* ds_s = carve.take<A>(static_cast<size_t>(kTile) * (kTile + 1));
  A* dK = carve.take<A>(static_cast<size_t>(kTile) * g.dpad);
  A* lse_s = carve.take<A>(kTile);
  A* D_s = carve.take<A>(kTile);
  int* row_b = carve.take<int>(kTile);  // batch of each staged row, -1 past the chunk

  for (int t = threadIdx.x; t < g.tokens; t += kThreads) tok[t] = static_cast<int>(token_index[t]);
  for (int idx = threadIdx.x; idx < kTile * g.dpad; idx += kThreads) dK[idx] = A(0);
  auto k_row = [&](int c) -> const T* {
    const int64_t l = l0 + c;
    return l < g.n_keys ? k + (kb * g.n_keys + l) * g.inner : nullptr;
  };
  load_tile<T, A>(Ks, g, h, scale, k_row);

  const int nvec = g.dpad / V::width;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
    __syncthreads();  // the previous row tile is consumed
    auto q_row = [&](int r) -> const T* {
      const int64_t row = r0 + r;
      if (row >= row_end) return nullptr;
      const int64_t b = shared_keys ? row / g.n_query : kb;
      const int64_t n = shared_keys ? row % g.n_query : row;
      return q + (b * g.n_query + n) * g.inner;
    };
    load_tile<T, A>(Qs, g, h, A(1), q_row);
    if (threadIdx.x < kTile) {
      const int64_t row = r0 + threadIdx.x;
      const bool valid = row < row_end;
      const int64_t b = shared_keys ? row / g.n_query : kb;
      const int64_t n = shared_keys ? row % g.n_query : row;
      row_b[threadIdx.x] = valid ? static_cast<int>(b) : -1;
      lse_s[threadIdx.x] = valid ? lse[(b * g.heads + h) * g.n_query + n] : A(0);
      D_s[threadIdx.x] = valid ? delta[(b * g.heads + h) * g.n_query + n] : A(0);
    }
    for (int idx = threadIdx.x; idx < kTile * g.tokens; idx += kThreads) {
      const int t = idx / kTile, r = idx - t * kTile;
      const int64_t row = r0 + r;
      A v = A(0);
      if (row < row_end) {
        const int64_t b = shared_keys ? row / g.n_query : kb;
        const int64_t n = shared_keys ? row % g.n_query : row;
        v = load_as<A>(grad_out, (b * g.tokens + t) * g.n_query + n);
      }
      gs[r * g.tokens + t] = v;
    }
    __syncthreads();
    A acc[kRowsPerWarp];
    tile_scores<A>(Qs, Ks, g, acc);
    const int64_t l = l0 + lane;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      const int b = row_b[r];
      bool keep = b >= 0 && l < g.n_keys;
      if (keep && key_mask != nullptr) {
        keep = key_mask[(g.m_batch == 1 ? 0 : b) * g.n_keys + l] != 0;
      }
      const A p = keep ? bm_exp(acc[i] - lse_s[r]) : A(0);
      ds_s[r * (kTile + 1) + lane] = p * (token_grad(tok, gs, g.tokens, r, l) - D_s[r]);
    }
    __syncthreads();
    // dK[c, :] += sum_r ds[r, c] Q[r, :]
    for (int o = threadIdx.x; o < kTile * nvec; o += kThreads) {
      const int c = o / nvec, jv = (o - c * nvec) * V::width;
      VT a = *reinterpret_cast<VT*>(dK + c * g.dpad + jv);
      for (int r = 0; r < kTile; ++r) {
        V::axpy(ds_s[r * (kTile + 1) + c], *reinterpret_cast<const VT*>(Qs + r * g.ld + jv), a);
      }
      *reinterpret_cast<VT*>(dK + c * g.dpad + jv) = a;
    }
  }
  __syncthreads();
  const int64_t key_elems = g.k_batch * g.n_keys * g.inner;
  for (int idx = threadIdx.x; idx < kTile * g.head_dim; idx += kThreads) {
    const int c = idx / g.head_dim, j = idx - c * g.head_dim;
    const int64_t key = l0 + c;
    if (key >= g.n_keys) continue;
    const int64_t e = (kb * g.n_keys + key) * g.inner + static_cast<int64_t>(h) * g.head_dim + j;
    const A v = scale * dK[c * g.dpad + j];
    if (chunks == 1) {
      grad_k[e] = store_as<T>(v);
    } else {
      partials[chunk * key_elems + e] = v;
    }
  }
}

// grad_k[e] = sum over chunks of partials[c, e], in chunk order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    reduce_chunks_kernel(const acc_t<T>* __restrict__ partials, int64_t chunks, int64_t elems,
                         T* __restrict__ grad_k) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < elems; e += stride) {
    A s = A(0);
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * elems + e];
    grad_k[e] = store_as<T>(s);
  }
}

// ---------------------------------------------------------------------------
// Launchers. q [B, N, H*d], k [Bk, L, H*d], token_index int64 [T] (values in
// [0, L)), key_mask bool-as-bytes [Bm, L] or nullptr, all contiguous on the
// current device. lse / delta: [B, H, N] in acc_t<T>.

// Whether the kernels' shared memory fits this device, else the bytes needed.
template <class T>
inline size_t smem_needed(const Geom& g) {
  using A = acc_t<T>;
  return bm_max(forward_smem<A>(g), backward_smem<A>(g));
}
template <class T>
inline bool smem_fits(const Geom& g) {
  return smem_needed<T>(g) <= static_cast<size_t>(rt::smem_optin(rt::current_device()));
}

// Workspace bytes of the forward: the per-head token probabilities [B, H, T, N] (none with
// one head, whose block writes out directly).
template <class T>
inline size_t forward_workspace_bytes(const Geom& g) {
  if (g.heads == 1) return 0;
  return static_cast<size_t>(g.batch * g.heads * g.tokens * g.n_query) * sizeof(acc_t<T>);
}

template <class T>
cudaError_t forward(const T* q, const T* k, const int64_t* token_index, const uint8_t* key_mask,
                    const Geom& g, double scale, T* out, acc_t<T>* lse, void* workspace,
                    int num_sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t blocks = g.batch * g.heads * ceil_div(g.n_query, kTile);
  if (blocks == 0) return cudaSuccess;
  const size_t smem = forward_smem<A>(g);
  cudaError_t err = rt::allow_dynamic_smem(forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  A* head_probs = g.heads == 1 ? nullptr : static_cast<A*>(workspace);
  err = launch_kernel(forward_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem,
                      stream, false, q, k, token_index, key_mask, g, scale, out, lse, head_probs);
  if (err != cudaSuccess || head_probs == nullptr) return err;
  const int64_t elems = g.batch * g.tokens * g.n_query;
  const int64_t sum_blocks = bm_min<int64_t>(ceil_div(elems, kThreads), 8LL * num_sms);
  return launch_kernel(sum_heads_kernel<T>, dim3(static_cast<unsigned>(sum_blocks)), dim3(kThreads),
                       0, stream, false, static_cast<const A*>(head_probs), g, out);
}

// Row chunks of the dk kernel: enough blocks for about two waves.
inline int64_t dk_chunk_rows(const Geom& g, int num_sms) {
  const int64_t rows = g.k_batch == 1 ? g.batch * g.n_query : g.n_query;
  const int64_t base_blocks = g.k_batch * g.heads * ceil_div(g.n_keys, kTile);
  const int64_t want = bm_max<int64_t>(1, ceil_div(2LL * num_sms, bm_max<int64_t>(base_blocks, 1)));
  const int64_t chunks = bm_min<int64_t>(want, bm_max<int64_t>(1, ceil_div(rows, kTile)));
  return bm_max<int64_t>(kTile, ceil_div(ceil_div(rows, chunks), kTile) * kTile);
}
inline int64_t dk_chunks(const Geom& g, int num_sms) {
  const int64_t rows = g.k_batch == 1 ? g.batch * g.n_query : g.n_query;
  return bm_max<int64_t>(1, ceil_div(rows, dk_chunk_rows(g, num_sms)));
}
// Workspace bytes: none for grad_q alone; with grad_k, delta [B, H, N] plus, with several
// chunks, [C, Bk, L, H*d] partials.
template <class T>
inline size_t backward_workspace_bytes(const Geom& g, int num_sms, bool with_grad_k) {
  using A = acc_t<T>;
  if (!with_grad_k) return 0;
  const int64_t chunks = dk_chunks(g, num_sms);
  size_t bytes = smem_bytes<A>(static_cast<size_t>(g.batch * g.heads * g.n_query));
  if (chunks > 1) {
    bytes += static_cast<size_t>(chunks * g.k_batch * g.n_keys * g.inner) * sizeof(A);
  }
  return bytes;
}

// grad_k == nullptr: only grad_q (no dk kernel, no workspace: workspace may be null).
template <class T>
cudaError_t backward(const T* grad_out, const T* q, const T* k, const int64_t* token_index,
                     const uint8_t* key_mask, const acc_t<T>* lse, const Geom& g, double scale,
                     T* grad_q, T* grad_k, void* workspace, int num_sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const size_t smem = backward_smem<A>(g);
  A* delta = nullptr;
  A* partials = nullptr;
  if (grad_k != nullptr) {
    delta = static_cast<A*>(workspace);
    partials = reinterpret_cast<A*>(static_cast<unsigned char*>(workspace) +
                                    smem_bytes<A>(static_cast<size_t>(g.batch * g.heads * g.n_query)));
  }
  const int64_t dq_blocks = g.batch * g.heads * ceil_div(g.n_query, kTile);
  cudaError_t err = rt::allow_dynamic_smem(backward_dq_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  err = launch_kernel(backward_dq_kernel<T>, dim3(static_cast<unsigned>(dq_blocks)), dim3(kThreads),
                      smem, stream, false, grad_out, q, k, token_index, key_mask, lse, g, scale,
                      grad_q, delta);
  if (err != cudaSuccess || grad_k == nullptr) return err;
  const int64_t chunk_rows = dk_chunk_rows(g, num_sms);
  const int64_t chunks = dk_chunks(g, num_sms);
  const int64_t dk_blocks = g.k_batch * g.heads * ceil_div(g.n_keys, kTile) * chunks;
  err = rt::allow_dynamic_smem(backward_dk_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  err = launch_kernel(backward_dk_kernel<T>, dim3(static_cast<unsigned>(dk_blocks)), dim3(kThreads),
                      smem, stream, false, grad_out, q, k, token_index, key_mask, lse,
                      static_cast<const A*>(delta), g, scale, chunks, chunk_rows, grad_k, partials);
  if (err != cudaSuccess || chunks == 1) return err;
  const int64_t elems = g.k_batch * g.n_keys * g.inner;
  const int64_t blocks = bm_min<int64_t>(ceil_div(elems, kThreads), 8LL * num_sms);
  return launch_kernel(reduce_chunks_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                       0, stream, false, static_cast<const A*>(partials), chunks, elems, grad_k);
}

}  // namespace attention
}  // namespace cuda
}  // namespace biasmap
