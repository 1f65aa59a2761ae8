// The operator schemas of the `dsa` library, defined once, with their defaults: C++ callers
// (c10::Dispatcher) get the same defaults as Python. Kernels register per backend next to their
// code (csrc/cpu, csrc/cuda); fake kernels and autograd are registered from Python
// (dsa_ext/ops.py). What each operator computes: docs/DESIGN.md.
//
// Conventions: `topk` is the number of selected keys per query (`k` names keys); a `float?`
// scale of None takes the default the host code resolves once (host.h: indexer_scale,
// attention_scale). The indexer ops end with the optional per-query key ranges `key_start`,
// `key_end` (int32 [B, T]; None: 0 and S): query t sees key s only if
// key_start[b,t] <= s < key_end[b,t] (and s <= t + S - T when causal).
#include <torch/library.h>

TORCH_LIBRARY(dsa, m) {
  // Lightning indexer: logits[b,t,s] = scale * sum_j w[b,t,j] * relu(q_idx[b,t,j,:] . k_idx[b,s,:]),
  // -inf where s is masked (causal, bottom-right aligned). float32 out (float64 for float64 in).
  // FP8: q_idx and k_idx float8_e4m3fn, w float32 (with the per-row query scales folded in) and
  // an optional per-key scale k_scale [B, S] float32 that multiplies logits[b,t,s]; forward only.
  m.def(
      "indexer_logits(Tensor q_idx, Tensor k_idx, Tensor w, float? scale=None, bool causal=True, "
      "Tensor? k_scale=None, Tensor? key_start=None, Tensor? key_end=None) -> Tensor");
  m.def(
      "indexer_logits_backward(Tensor grad_logits, Tensor q_idx, Tensor k_idx, Tensor w, "
      "float? scale=None, bool causal=True, Tensor? key_start=None, Tensor? key_end=None) "
      "-> (Tensor grad_q_idx, Tensor grad_k_idx, Tensor grad_w)");

  // Deterministic top-k: ties go to the lower position, rows ascending, -1 padding.
  m.def("topk_indices(Tensor logits, int topk) -> Tensor");

  // Fused indexer + top-k, streaming over keys: [B, T, S] never exists. FP8 as indexer_logits.
  m.def(
      "indexer_topk(Tensor q_idx, Tensor k_idx, Tensor w, int topk, float? scale=None, bool causal=True, "
      "Tensor? k_scale=None, Tensor? key_start=None, Tensor? key_end=None) -> Tensor");

  // Attention over the gathered keys indices[b,t,(hkv,)i]; returns (out, lse).
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, float? scale=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor indices, Tensor out, Tensor lse, float? scale=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Indexer training loss: per-token KL(main attention's head-mean distribution || indexer
  // softmax) over the keys each query sees (indices absent) or the valid selected keys inside the
  // query's key range, streamed over keys.
  // Also returns the two lse it normalised with (idx_lse [B,T], attn_lse_out [B,T,H]) for the
  // backward; attn_lse, when given, is used instead of recomputing the attention lse.
  m.def(
      "indexer_kl_loss(Tensor q_idx, Tensor k_idx, Tensor w, Tensor q, Tensor k, Tensor? indices=None, "
      "float? idx_scale=None, float? attn_scale=None, bool causal=True, Tensor? attn_lse=None, "
      "Tensor? key_start=None, Tensor? key_end=None) -> (Tensor loss, Tensor idx_lse, Tensor attn_lse_out)");
  m.def(
      "indexer_kl_loss_backward(Tensor grad_loss, Tensor q_idx, Tensor k_idx, Tensor w, Tensor q, Tensor k, "
      "Tensor? indices, Tensor idx_lse, Tensor attn_lse, float? idx_scale=None, float? attn_scale=None, "
      "bool causal=True, Tensor? key_start=None, Tensor? key_end=None) "
      "-> (Tensor grad_q_idx, Tensor grad_k_idx, Tensor grad_w)");
}
