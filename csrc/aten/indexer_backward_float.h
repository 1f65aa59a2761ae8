// indexer_logits_backward in float32 ATen operations: the simple path of the CUDA backend
// (cuda/indexer/indexer_logits_backward.cu) for float32 inputs and for bfloat16/float16 shapes
// beyond the tensor-core kernels. The formulas of cuda/indexer/indexer_backward_kernels.cuh with
// ATen batched GEMMs over chunks of queries, each against the keys its rows see (key ranges and
// causal mask), so that at most kFloatPathBudget bytes of [.., Hi, keys] temporaries exist at a
// time. With key ranges, the plan reads them on the host (one synchronisation per call).
// Device-agnostic (no CUDA of its own: the emulation tests run it on CPU tensors); deterministic.
// TF32 follows torch's global matmul setting.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "aten/key_ranges.h"
#include "host.h"

namespace dsa {
namespace aten {

constexpr int64_t kFloatPathBudget = int64_t{256} << 20;

// dw = scale * sum_s g m d, dq = scale * w * (g m) k, dk = sum (g m scale w) q, in float32, with
// m = (query t sees key s) and (d > 0). Chunks of queries (plan_query_chunks) meet only the keys
// their rows see, so the [.., Hi, keys] temporaries of a chunk stay within the budget.
inline void indexer_backward_float32(const IndexerLogitsBwdCall& c, int64_t budget = kFloatPathBudget) {
  const IndexerParams& p = c.p.fwd;
  const at::Tensor q = c.q.to(at::kFloat), k = c.k.to(at::kFloat);
  const at::Tensor ws = c.w * p.scale;  // [B, T, Hi] float32
  at::Tensor dk = at::zeros({p.B, p.S, p.Di}, k.options());
  const int64_t per_pair = p.Hi * 4 * 6;  // bytes of a chunk's temporaries per (query, key) pair
  const RowRanges rows = row_ranges(p, c.ranges, p.causal, k.device());
  for (const QueryChunk& ch : plan_query_chunks(p, c.ranges, p.causal, p.T, std::max<int64_t>(1, budget / per_pair))) {
    const int64_t t0 = ch.t0, tc = ch.tc, n = ch.s1 - ch.s0;
    const at::Tensor kc = k.narrow(1, ch.s0, n);  // [B, n, Di]
    const at::Tensor qc = q.narrow(1, t0, tc).reshape({p.B, tc * p.Hi, p.Di});
    const at::Tensor d = at::bmm(qc, kc.transpose(1, 2)).view({p.B, tc, p.Hi, n});
    const at::Tensor keys = at::arange(ch.s0, ch.s1, rows.lo.options()).view({1, 1, n});
    const at::Tensor seen = keys.ge(rows.lo.narrow(1, t0, tc).unsqueeze(-1))
                                .logical_and_(keys.lt(rows.hi.narrow(1, t0, tc).unsqueeze(-1)));  // [B, tc, n]
    const at::Tensor on = (d > 0).logical_and_(seen.unsqueeze(2));
    const at::Tensor g = c.grad_logits.narrow(1, t0, tc).narrow(2, ch.s0, n).unsqueeze(2);  // [B, tc, 1, n]
    const at::Tensor gm = at::where(on, g, at::zeros({}, g.options()));  // [B, tc, Hi, n]
    c.grad_w.narrow(1, t0, tc).copy_(at::where(on, gm * d, at::zeros({}, d.options())).sum(-1) * p.scale);
    const at::Tensor wc = ws.narrow(1, t0, tc).unsqueeze(-1);  // [B, tc, Hi, 1]
    const at::Tensor dq = at::bmm(gm.view({p.B, tc * p.Hi, n}), kc).view({p.B, tc, p.Hi, p.Di});
    c.grad_q.narrow(1, t0, tc).copy_(dq * wc);
    dk.narrow(1, ch.s0, n).add_(at::bmm((gm * wc).view({p.B, tc * p.Hi, n}).transpose(1, 2), qc));
  }
  c.grad_k.copy_(dk);
}

}  // namespace aten
}  // namespace dsa
