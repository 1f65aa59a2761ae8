// Exposes the streamed indexer KL loss of the CUDA backend (device-agnostic ATen code,
// csrc/aten/indexer_kl_loss_streamed.h) to Python, so that test_kl_streamed.py can run it on CPU
// tensors against the CPU kernel and the reference.
#include <torch/extension.h>

#include "aten/indexer_kl_loss_streamed.h"

std::vector<at::Tensor> kl_forward(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                   const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& indices,
                                   double idx_scale, double attn_scale, bool causal,
                                   const std::optional<at::Tensor>& attn_lse, int64_t budget, int64_t block_keys,
                                   const std::optional<at::Tensor>& key_start,
                                   const std::optional<at::Tensor>& key_end) {
  auto c = dsa::prepare_indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse,
                                        key_start, key_end);
  dsa::aten::indexer_kl_loss_streamed(c, budget, block_keys);
  return {c.loss, c.idx_lse, c.attn_lse};
}

std::vector<at::Tensor> kl_backward(const at::Tensor& grad_loss, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                    const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
                                    const std::optional<at::Tensor>& indices, const at::Tensor& idx_lse,
                                    const at::Tensor& attn_lse, double idx_scale, double attn_scale, bool causal,
                                    int64_t budget, int64_t block_keys, const std::optional<at::Tensor>& key_start,
                                    const std::optional<at::Tensor>& key_end) {
  auto c = dsa::prepare_indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse,
                                                 idx_scale, attn_scale, causal, key_start, key_end);
  dsa::aten::indexer_kl_loss_backward_streamed(c, budget, block_keys);
  return {c.grad_q_idx, c.grad_k_idx, dsa::finish_grad_w(c.grad_w, w)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kl_forward", &kl_forward, py::arg("q_idx"), py::arg("k_idx"), py::arg("w"), py::arg("q"), py::arg("k"),
        py::arg("indices"), py::arg("idx_scale"), py::arg("attn_scale"), py::arg("causal"), py::arg("attn_lse"),
        py::arg("budget"), py::arg("block_keys"), py::arg("key_start") = py::none(), py::arg("key_end") = py::none());
  m.def("kl_backward", &kl_backward, py::arg("grad_loss"), py::arg("q_idx"), py::arg("k_idx"), py::arg("w"),
        py::arg("q"), py::arg("k"), py::arg("indices"), py::arg("idx_lse"), py::arg("attn_lse"),
        py::arg("idx_scale"), py::arg("attn_scale"), py::arg("causal"), py::arg("budget"), py::arg("block_keys"),
        py::arg("key_start") = py::none(), py::arg("key_end") = py::none());
}
