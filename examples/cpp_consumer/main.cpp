#include <ATen/ATen.h>
#include <dsa_ext.h>

#include <iostream>

int main() {
  const int64_t B = 1, T = 1024, H = 8, Hkv = 2, D = 64, Hi = 4, Di = 32, topk = 128;
  auto q_idx = at::randn({B, T, Hi, Di}), k_idx = at::randn({B, T, Di}), w = at::randn({B, T, Hi});
  auto q = at::randn({B, T, H, D}), k = at::randn({B, T, Hkv, D}), v = at::randn({B, T, Hkv, D});

  auto idx = dsa::indexer_topk(q_idx, k_idx, w, topk);   // [B, T, topk] int32, -1 = empty slot
  auto [out, lse] = dsa::sparse_attention(q, k, v, idx);  // scale defaults to D ** -0.5

  // query 0 sees key 0 alone, so each of its heads returns that key's v row
  bool ok = at::allclose(out[0][0], v[0][0].repeat_interleave(H / Hkv, 0));
  std::cout << "indices " << idx.sizes() << ", out " << out.sizes() << ", first query "
            << (ok ? "ok" : "WRONG") << "\n";
  return ok ? 0 : 1;
}
