// The dsa:: operators called from C++ as a LibTorch program would (dsa_ext.h: typed dispatcher
// calls with the schemas' defaults), checked against direct ATen formulas on small float64 inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <bitset>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <tuple>

#include "cpu/parallel.h"
#include "dsa_ext.h"

namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);
const auto kI32 = torch::TensorOptions().dtype(torch::kInt32);

torch::Tensor causal_mask(int64_t T, int64_t S) {
  auto t = torch::arange(T).unsqueeze(1), s = torch::arange(S).unsqueeze(0);
  return s.le(t + (S - T));
}

TEST(DsaOps, IndexerLogitsMatchesFormula) {
  torch::manual_seed(1);
  const int64_t B = 2, T = 5, S = 9, Hi = 3, Di = 8;
  auto q = torch::randn({B, T, Hi, Di}, kF64), k = torch::randn({B, S, Di}, kF64), w = torch::randn({B, T, Hi}, kF64);
  auto logits = dsa::indexer_logits(q, k, w, 0.5);
  auto want = 0.5 * torch::einsum("bth,bths->bts", {w, torch::einsum("bthd,bsd->bths", {q, k}).relu()});
  want = want.masked_fill(causal_mask(T, S).logical_not(), -std::numeric_limits<double>::infinity());
  ASSERT_EQ(logits.sizes(), want.sizes());
  EXPECT_TRUE(torch::allclose(logits, want, 1e-12, 1e-12));
  // the default scale is (Hi * Di) ** -0.5, resolved by the operator itself
  EXPECT_TRUE(torch::allclose(dsa::indexer_logits(q, k, w), logits * (std::pow(Hi * Di, -0.5) / 0.5), 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(dsa::indexer_topk(q, k, w, 4), dsa::topk_indices(logits, 4)));
}

TEST(DsaOps, SchemasCarryTheDefaults) {
  const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow("dsa::sparse_attention", "").schema();
  const auto& scale = schema.arguments().at(4);
  EXPECT_EQ(scale.name(), "scale");
  ASSERT_TRUE(scale.default_value().has_value());
  EXPECT_TRUE(scale.default_value()->isNone());
  const auto& kl = c10::Dispatcher::singleton().findSchemaOrThrow("dsa::indexer_kl_loss", "").schema();
  for (const char* name : {"indices", "idx_scale", "attn_scale", "causal", "attn_lse"}) {
    const auto at = kl.argumentIndexWithName(name);
    ASSERT_TRUE(at.has_value()) << name;
    EXPECT_TRUE(kl.arguments()[*at].default_value().has_value()) << name;
  }
}

TEST(DsaOps, TopkIsDeterministicUnderTies) {
  auto logits = torch::zeros({1, 2, 10}, kF64);
  logits[0][1][7] = 1.0;
  auto idx = dsa::topk_indices(logits, 3);
  auto want = torch::tensor({0, 1, 2, 0, 1, 7}, kI32).view({1, 2, 3});
  EXPECT_TRUE(torch::equal(idx, want));
}

TEST(DsaOps, SparseAttentionMatchesGatheredSoftmax) {
  torch::manual_seed(2);
  const int64_t T = 4, S = 7, H = 2, D = 8;
  auto q = torch::randn({1, T, H, D}, kF64), k = torch::randn({1, S, 1, D}, kF64), v = torch::randn({1, S, 1, D}, kF64);
  auto idx = torch::tensor({0, 3, -1, 1, 1, 6, 2, 5, -1, -1, -1, -1}, kI32).view({1, T, 3});
  auto [out, lse] = dsa::sparse_attention(q, k, v, idx, 0.25);
  // default scale: Dqk ** -0.5
  auto [out_default, lse_default] = dsa::sparse_attention(q, k, v, idx);
  auto [out_explicit, lse_explicit] = dsa::sparse_attention(q, k, v, idx, std::pow(D, -0.5));
  EXPECT_TRUE(torch::equal(out_default, out_explicit));
  for (int64_t t = 0; t < T; ++t) {
    auto row = idx[0][t];
    auto valid = row.ge(0);
    if (!valid.any().item<bool>()) {
      EXPECT_TRUE(out[0][t].eq(0).all().item<bool>());
      EXPECT_TRUE(std::isinf(lse[0][t][0].item<double>()));
      continue;
    }
    auto sel = row.masked_select(valid).to(torch::kLong);
    auto keys = k[0].index_select(0, sel).select(1, 0), vals = v[0].index_select(0, sel).select(1, 0);
    auto scores = 0.25 * torch::matmul(q[0][t], keys.t());  // [H, n]
    auto want = torch::matmul(torch::softmax(scores, -1), vals);
    EXPECT_TRUE(torch::allclose(out[0][t], want, 1e-12, 1e-12));
    EXPECT_TRUE(torch::allclose(lse[0][t], torch::logsumexp(scores, -1), 1e-12, 1e-12));
  }
}

TEST(DsaOps, IndexerKlLossMatchesDenseFormula) {
  torch::manual_seed(3);
  const int64_t T = 5, S = 8, Hi = 2, Di = 8, H = 4, Hkv = 2, D = 6;
  auto q_idx = torch::randn({1, T, Hi, Di}, kF64), k_idx = torch::randn({1, S, Di}, kF64);
  auto w = torch::randn({1, T, Hi}, kF64), q = torch::randn({1, T, H, D}, kF64), k = torch::randn({1, S, Hkv, D}, kF64);
  auto [loss, idx_lse, attn_lse] = dsa::indexer_kl_loss(q_idx, k_idx, w, q, k, std::nullopt, 0.5, 0.25);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto hidden = causal_mask(T, S).logical_not();
  auto I = (0.5 * torch::einsum("bth,bths->bts", {w, torch::einsum("bthd,bsd->bths", {q_idx, k_idx}).relu()}))
               .masked_fill(hidden, neg_inf)[0];                                          // [T, S]
  auto a = (0.25 * torch::einsum("thd,shd->hts", {q[0], k[0].repeat_interleave(H / Hkv, 1)}))
               .masked_fill(hidden, neg_inf);                                             // [H, T, S]
  auto p = torch::softmax(a, -1).mean(0);
  auto log_q = torch::log_softmax(I, -1);
  auto want = (p * (p.log() - log_q)).masked_fill(hidden, 0).sum(-1);
  EXPECT_TRUE(torch::allclose(loss[0], want, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(idx_lse[0], torch::logsumexp(I, -1), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(attn_lse[0], torch::logsumexp(a, -1).t(), 1e-12, 1e-12));
}

TEST(DsaOps, BadInputNamesTheArgument) {
  auto q = torch::randn({1, 4, 2, 8}, kF64), k = torch::randn({1, 6, 1, 8}, kF64);
  auto idx = torch::zeros({1, 4, 2}, torch::kInt64);
  try {
    dsa::sparse_attention(q, k, k, idx);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected indices to be int32, got Long"), std::string::npos) << e.what();
  }
}

// The library is built with OpenMP (at::parallel_for's OpenMP code is compiled into it): a
// kernel given 2 threads runs on 2 (the threads it records), 1 on 1.
TEST(DsaParallel, KernelsRunOnEveryThread) {
  ASSERT_GT(dsa::cpu::openmp_version(), 0) << "libdsa_ext was built without OpenMP";
  torch::manual_seed(4);
  auto q = torch::randn({1, 64, 4, 16}), k = torch::randn({1, 64, 2, 16}), v = torch::randn({1, 64, 2, 16});
  auto idx = torch::randint(0, 64, {1, 64, 8}, kI32);
  const int before = at::get_num_threads();
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    dsa::cpu::take_threads_seen();
    dsa::sparse_attention(q, k, v, idx);
    EXPECT_EQ(std::bitset<64>(dsa::cpu::take_threads_seen()).count(), static_cast<size_t>(threads));
  }
  at::set_num_threads(before);
}

#ifdef __linux__
// One OpenMP runtime in the process: the library links the one libtorch_cpu loads.
TEST(DsaParallel, OneOpenMpRuntime) {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> runtimes;
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string field, path;
    while (fields >> field) path = field;
    const std::string name = std::filesystem::path(path).filename();
    if (name.rfind("libgomp", 0) == 0 || name.rfind("libiomp", 0) == 0 || name.rfind("libomp", 0) == 0)
      runtimes.insert(std::filesystem::canonical(path));
  }
  EXPECT_EQ(runtimes.size(), 1u) << "OpenMP runtimes mapped: " << runtimes.size();
}
#endif

}  // namespace
