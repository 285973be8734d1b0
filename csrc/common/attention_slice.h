// Scalar pieces of the attention-slice math shared by the CPU and CUDA kernels.
//
// Forward, per batch b, head h, query n (scores s_l = scale * q_n . k_l over the
// kept keys l):  p_l = exp(s_l - lse),  lse = logsumexp_l s_l,
//                out[b, t, n] = sum_h p_{token_index[t]}.
// Backward of out with upstream g[t] = grad_out[b, t, n]:
//   G_l = sum_{t : token_index[t] == l} g[t]      (duplicate tokens add up)
//   D   = sum_t g[t] p_{token_index[t]}  =  sum_l G_l p_l
//   ds_l = p_l (G_l - D)                          (0 for masked keys, as p_l = 0)
//   grad_q_n = scale * sum_l ds_l k_l,  grad_k_l = scale * sum_n ds_l q_n.
// The two helpers below do the token-column part of ds on one row, so that the
// dense part (-D p_l) can be a plain vector loop.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace biasmap {
namespace attention_slice {

BIASMAP_HD inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// D = sum_t g[t * g_stride] * p[token_index[t]].
template <class T, class G>
BIASMAP_HD inline T row_delta(const T* p, const int64_t* token_index, int64_t num_tokens,
                              const G* g, int64_t g_stride) {
  T delta = T(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    delta += static_cast<T>(g[t * g_stride]) * p[token_index[t]];
  }
  return delta;
}

// Given ds_l = -D p_l for every l, adds g[t] p_l at l = token_index[t], which
// makes ds_l = p_l (G_l - D) including repeated token columns.
template <class T, class G>
BIASMAP_HD inline void row_add_token_grads(T* ds, const T* p, const int64_t* token_index,
                                           int64_t num_tokens, const G* g, int64_t g_stride) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t l = token_index[t];
    ds[l] += static_cast<T>(g[t * g_stride]) * p[l];
  }
}

}  // namespace attention_slice
}  // namespace biasmap
