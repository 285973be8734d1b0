// CUDA implementations of biasmap::attention_slice_fwd / attention_slice_bwd
// (schemas in csrc/ops.cpp, kernels in attention_slice.cuh).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>

#include <tuple>

#include "cuda/attention_slice.cuh"
#include "cuda/torch_glue.h"

namespace biasmap {
namespace cuda {
namespace {

struct Inputs {
  at::Tensor q, k, token_index, key_mask;  // contiguous; key_mask undefined when absent
  attention::Geom geom;
};

// Checks shapes, dtypes and devices and builds the kernels' geometry. The
// values of token_index (in [0, L)) are checked by the public wrapper
// (biasmap.ops.attention_slice); the kernels treat others as masked keys.
template <class A>
attention::Geom geom_for(const Inputs& in, int64_t heads) {
  const int64_t inner = in.q.size(2);
  return attention::make_geom<A>(in.q.size(0), in.q.size(1), in.k.size(0), in.k.size(1),
                                 in.key_mask.defined() ? in.key_mask.size(0) : 0,
                                 static_cast<int>(heads), static_cast<int>(inner / heads),
                                 static_cast<int>(in.token_index.size(0)));
}

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& token_index,
                    int64_t num_heads, const std::optional<at::Tensor>& key_mask, const char* op) {
  glue::check_cuda(q, op, "q");
  glue::check_dim(q, 3, op, "q");
  glue::check_dim(k, 3, op, "k");
  glue::check_float(q, op, "q");
  glue::check_same_device(q, k, op, "q", "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "biasmap::", op, ": q has dtype ",
              q.scalar_type(), " but k has ", k.scalar_type());
  const int64_t B = q.size(0), inner = q.size(2);
  TORCH_CHECK(num_heads >= 1 && inner % num_heads == 0, "biasmap::", op, ": q's last dimension ",
              inner, " is not divisible by num_heads = ", num_heads);
  TORCH_CHECK(k.size(2) == inner, "biasmap::", op, ": k's last dimension must equal q's (", inner,
              "), got ", k.sizes());
  TORCH_CHECK(k.size(0) == 1 || k.size(0) == B, "biasmap::", op, ": k's batch must be 1 or ", B,
              ", got ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1, "biasmap::", op, ": k must have at least one key, got ", k.sizes());
  TORCH_CHECK(token_index.dim() == 1 && token_index.scalar_type() == at::kLong &&
                  token_index.size(0) >= 1,
              "biasmap::", op, ": token_index must be a non-empty 1-D int64 tensor, got ",
              token_index.scalar_type(), " ", token_index.sizes());
  Inputs in;
  in.q = q.contiguous();
  in.k = k.contiguous();
  in.token_index = token_index.to(q.device()).contiguous();
  if (key_mask.has_value() && key_mask->defined()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(1) == k.size(1) &&
                    (m.size(0) == 1 || m.size(0) == B),
                "biasmap::", op, ": key_mask must be bool [", B, " or 1, ", k.size(1), "], got ",
                m.scalar_type(), " ", m.sizes());
    glue::check_same_device(q, m, op, "q", "key_mask");
    in.key_mask = m.contiguous();
  }
  return in;
}

template <class C>
void check_smem(const attention::Geom& g, const char* op) {
  TORCH_CHECK(attention::smem_fits<C>(g), "biasmap::", op, ": head_dim ", g.head_dim, " with ",
              g.tokens, " tokens needs ", attention::smem_needed<C>(g),
              " bytes of shared memory per block, more than this GPU offers; use float32 or the "
              "reference backend");
}

std::tuple<at::Tensor, at::Tensor> attention_slice_fwd(const at::Tensor& q_in,
                                                       const at::Tensor& k_in,
                                                       const at::Tensor& token_index,
                                                       int64_t num_heads, double scale,
                                                       const std::optional<at::Tensor>& key_mask) {
  constexpr const char* op = "attention_slice_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Inputs in = check_inputs(q_in, k_in, token_index, num_heads, key_mask, op);
  const int64_t B = in.q.size(0), N = in.q.size(1), T = in.token_index.size(0);
  at::Tensor out = at::empty({B, T, N}, in.q.options());
  at::Tensor lse = at::empty({B, num_heads, N}, in.q.options().dtype(glue::acc_dtype(in.q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), op, [&] {
    using C = glue::cuda_t<scalar_t>;
    using A = acc_t<C>;
    const attention::Geom g = geom_for<A>(in, num_heads);
    check_smem<C>(g, op);
    at::Tensor ws = glue::workspace(attention::forward_workspace_bytes<C>(g), in.q);
    glue::check_launch(
        attention::forward<C>(glue::ptr<scalar_t>(in.q), glue::ptr<scalar_t>(in.k),
                              in.token_index.data_ptr<int64_t>(),
                              in.key_mask.defined() ? glue::bool_ptr(in.key_mask) : nullptr, g,
                              scale, glue::ptr<scalar_t>(out), lse.data_ptr<A>(), ws.data_ptr(),
                              glue::num_sms(), glue::current_stream()),
        op);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_slice_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& token_index, int64_t num_heads, double scale,
    const std::optional<at::Tensor>& key_mask, const at::Tensor& lse_in, bool need_grad_k) {
  constexpr const char* op = "attention_slice_bwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Inputs in = check_inputs(q_in, k_in, token_index, num_heads, key_mask, op);
  const int64_t B = in.q.size(0), N = in.q.size(1), T = in.token_index.size(0);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({B, T, N}), "biasmap::", op,
              ": grad_out must have shape [", B, ", ", T, ", ", N, "], got ", grad_out_in.sizes());
  const at::ScalarType acc = glue::acc_dtype(in.q.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == acc && lse_in.sizes() == at::IntArrayRef({B, num_heads, N}),
              "biasmap::", op, ": lse must be ", acc, " [", B, ", ", num_heads, ", ", N,
              "] as returned by the forward, got ", lse_in.scalar_type(), " ", lse_in.sizes());
  glue::check_same_device(in.q, grad_out_in, op, "q", "grad_out");
  glue::check_same_device(in.q, lse_in, op, "q", "lse");
  // grad_out may be a stride-0 expanded view (from .sum().backward()): make it dense.
  const at::Tensor grad_out = grad_out_in.to(in.q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(in.q);
  at::Tensor grad_k = need_grad_k ? at::empty_like(in.k) : at::zeros_like(in.k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), op, [&] {
    using C = glue::cuda_t<scalar_t>;
    using A = acc_t<C>;
    const attention::Geom g = geom_for<A>(in, num_heads);
    check_smem<C>(g, op);
    const int sms = glue::num_sms();
    at::Tensor ws =
        glue::workspace(attention::backward_workspace_bytes<C>(g, sms, need_grad_k), in.q);
    glue::check_launch(
        attention::backward<C>(glue::ptr<scalar_t>(grad_out), glue::ptr<scalar_t>(in.q),
                               glue::ptr<scalar_t>(in.k), in.token_index.data_ptr<int64_t>(),
                               in.key_mask.defined() ? glue::bool_ptr(in.key_mask) : nullptr,
                               lse.data_ptr<A>(), g, scale, glue::ptr<scalar_t>(grad_q),
                               need_grad_k ? glue::ptr<scalar_t>(grad_k) : nullptr,
                               ws.data_ptr(), sms,
                               glue::current_stream()),
        op);
  });
  return {grad_q, grad_k};
}

}  // namespace
}  // namespace cuda
}  // namespace biasmap

TORCH_LIBRARY_IMPL(biasmap, CUDA, m) {
  m.impl("attention_slice_fwd", &biasmap::cuda::attention_slice_fwd);
  m.impl("attention_slice_bwd", &biasmap::cuda::attention_slice_bwd);
}
