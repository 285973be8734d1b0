// The single place where every biasmap op schema is declared. Kernels for each
// device live in csrc/<device>/ and only register implementations
// (TORCH_LIBRARY_IMPL). Autograd and fake (meta) kernels are registered from
// Python (biasmap/ops/native.py), following pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing biasmap._C loads this library and runs the static registrations
// below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(biasmap, m) {
  // q [B, N, H*d], k [B|1, L, H*d], token_index long [T], key_mask bool [B|1, L].
  // Returns (out [B, T, N] in q's dtype, lse [B, H, N] in the accumulate dtype).
  m.def(
      "attention_slice_fwd(Tensor q, Tensor k, Tensor token_index, int num_heads, float scale, "
      "Tensor? key_mask) -> (Tensor, Tensor)");
  // Returns (grad_q [B, N, H*d], grad_k [B|1, L, H*d]); need_grad_k=false skips grad_k's
  // share of the work and returns it as zeros (guidance differentiates through q only).
  m.def(
      "attention_slice_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor token_index, int num_heads, "
      "float scale, Tensor? key_mask, Tensor lse, bool need_grad_k=True) -> (Tensor, Tensor)");

  // maps: M tensors [B, T, h_i, w_i]. Returns [B, T, out_h, out_w], or
  // [B, M, T, out_h, out_w] when per_map.
  m.def("resize_aggregate_fwd(Tensor[] maps, int out_h, int out_w, bool per_map) -> Tensor");
  // Returns one gradient per input map, shaped like it.
  m.def(
      "resize_aggregate_bwd(Tensor grad, Tensor[] maps, int out_h, int out_w, bool per_map) -> "
      "Tensor[]");

  // x [B, n]. Returns (mask [B, n] in x's dtype, stats [B, 3] float64 =
  // (min, range, theta)).
  m.def("soft_topk_exact_fwd(Tensor x, int k, float tau, bool minmax) -> (Tensor, Tensor)");
  m.def(
      "soft_topk_exact_bwd(Tensor grad, Tensor x, Tensor mask, Tensor stats, int k, float tau, "
      "bool minmax) -> Tensor");
  // Returns (mask [B, n], stats [B, 2 + 2*iters] float64 = (min, range,
  // g_1[0], g_1[1], ..., g_iters[0], g_iters[1])).
  m.def(
      "soft_topk_sinkhorn_fwd(Tensor x, int k, float tau, int iters, bool minmax) -> (Tensor, "
      "Tensor)");
  m.def(
      "soft_topk_sinkhorn_bwd(Tensor grad, Tensor x, Tensor stats, int k, float tau, int iters, "
      "bool minmax) -> Tensor");

  // a, b [B, n]. Returns (iou [B], sums [B, 3] float64 = (sum a*b, sum a, sum b)).
  m.def("soft_iou_fwd(Tensor a, Tensor b, float eps) -> (Tensor, Tensor)");
  m.def("soft_iou_bwd(Tensor grad, Tensor a, Tensor b, Tensor sums, float eps) -> (Tensor, Tensor)");

  // x [B, n] -> bool [B, n]: x >= quantile_q(x) (or >), numpy 'linear' quantile.
  m.def("quantile_mask(Tensor x, float q, bool inclusive) -> Tensor");
  // a, b bool [B, n] -> float32 [B]; 0 where the union is empty.
  m.def("mask_iou(Tensor a, Tensor b) -> Tensor");
}
