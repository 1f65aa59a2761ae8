// indexer_logits_backward in float32 ATen operations: the simple path of the CUDA backend
// (cuda/indexer/indexer_logits_backward.cu) for float32 inputs and for bfloat16/float16 shapes
// beyond the tensor-core kernels. The formulas of cuda/indexer/indexer_backward_kernels.cuh with
// ATen batched GEMMs over chunks of queries, so that at most kFloatPathBudget bytes of [.., Hi, S]
// temporaries exist at a time. Device-agnostic (no CUDA of its own: the emulation tests run it on
// CPU tensors); deterministic. TF32 follows torch's global matmul setting.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "host.h"

namespace dsa {
namespace aten {

constexpr int64_t kFloatPathBudget = int64_t{256} << 20;

// dw = scale * sum_s g m d, dq = scale * w * (g m) k, dk = sum (g m scale w) q, in float32.
inline void indexer_backward_float32(const IndexerLogitsBwdCall& c, int64_t budget = kFloatPathBudget) {
  const IndexerParams& p = c.p.fwd;
  const at::Tensor q = c.q.to(at::kFloat), k = c.k.to(at::kFloat);
  const at::Tensor kt = k.transpose(1, 2);
  const at::Tensor ws = c.w * p.scale;  // [B, T, Hi] float32
  at::Tensor dk = at::zeros({p.B, p.S, p.Di}, k.options());
  const int64_t per_query = p.B * p.Hi * p.S * 4 * 6;  // bytes of the chunk's temporaries per query
  const int64_t chunk = std::max<int64_t>(1, budget / per_query);
  const at::Tensor keys = at::arange(p.S, k.options().dtype(at::kLong));
  for (int64_t t0 = 0; t0 < p.T; t0 += chunk) {
    const int64_t tc = std::min(chunk, p.T - t0);
    const at::Tensor qc = q.narrow(1, t0, tc).reshape({p.B, tc * p.Hi, p.Di});
    const at::Tensor d = at::bmm(qc, kt).view({p.B, tc, p.Hi, p.S});
    at::Tensor on = d > 0;
    if (p.causal) {
      const at::Tensor last = at::arange(t0, t0 + tc, keys.options()) + p.causal_offset;  // last visible key
      on = on.logical_and_(keys.unsqueeze(0).le(last.unsqueeze(1)).view({1, tc, 1, p.S}));
    }
    const at::Tensor g = c.grad_logits.narrow(1, t0, tc).unsqueeze(2);  // [B, tc, 1, S]
    const at::Tensor gm = at::where(on, g, at::zeros({}, g.options()));  // [B, tc, Hi, S]
    c.grad_w.narrow(1, t0, tc).copy_(at::where(on, gm * d, at::zeros({}, d.options())).sum(-1) * p.scale);
    const at::Tensor wc = ws.narrow(1, t0, tc).unsqueeze(-1);  // [B, tc, Hi, 1]
    const at::Tensor dq = at::bmm(gm.view({p.B, tc * p.Hi, p.S}), k).view({p.B, tc, p.Hi, p.Di});
    c.grad_q.narrow(1, t0, tc).copy_(dq * wc);
    dk.add_(at::bmm((gm * wc).view({p.B, tc * p.Hi, p.S}).transpose(1, 2), qc));
  }
  c.grad_k.copy_(dk);
}

}  // namespace aten
}  // namespace dsa
