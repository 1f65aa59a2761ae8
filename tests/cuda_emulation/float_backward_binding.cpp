// Exposes the float32 path of the CUDA indexer backward (device-agnostic ATen code) to Python so
// that test_float_backward.py can run it on CPU tensors.
#include <torch/extension.h>

#include "aten/indexer_backward_float.h"

std::vector<at::Tensor> indexer_backward_float32(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& w, double scale, bool causal,
                                                 int64_t budget, const std::optional<at::Tensor>& key_start,
                                                 const std::optional<at::Tensor>& key_end) {
  auto c = dsa::prepare_indexer_logits_backward(grad, q, k, w, scale, causal, key_start, key_end);
  dsa::aten::indexer_backward_float32(c, budget);
  return {c.grad_q, c.grad_k, dsa::finish_grad_w(c.grad_w, w)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("indexer_backward_float32", &indexer_backward_float32, py::arg("grad"), py::arg("q"), py::arg("k"),
        py::arg("w"), py::arg("scale"), py::arg("causal"), py::arg("budget"), py::arg("key_start") = py::none(),
        py::arg("key_end") = py::none());
}
