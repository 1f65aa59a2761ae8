// Exposes the float32 path of the CUDA indexer backward (device-agnostic ATen code) to Python so
// that test_float_backward.py can run it on CPU tensors.
#include <torch/extension.h>

#include "aten/indexer_backward_float.h"

std::vector<at::Tensor> indexer_backward_float32(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& w, double scale, bool causal,
                                                 int64_t budget) {
  auto c = dsa::prepare_indexer_logits_backward(grad, q, k, w, scale, causal);
  dsa::aten::indexer_backward_float32(c, budget);
  return {c.grad_q, c.grad_k, dsa::finish_grad_w(c.grad_w, w)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("indexer_backward_float32", &indexer_backward_float32); }
