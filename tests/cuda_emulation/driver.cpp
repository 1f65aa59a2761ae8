// Runs the CUDA kernels of csrc/cuda on the CPU emulator (emu_cuda.h) for one test case.
// Usage: driver <case dir>. The case dir holds meta.txt ("name value" lines) and raw
// little-endian tensors written by emulator.py; outputs are written back next to them.
// The launch code below mirrors the host code of the csrc/cuda/*/*.cu files (same plan and grid
// functions, same kernels, the same choice of kernel path), and prints the path it took as one
// line that the tests assert: "engine=mma|simt ..." (indexer), "path=mma|rowwise ..." (attention),
// "select cand_cap=..." (top-k).
#include "emu_cuda.h"
// kernel headers (copied from csrc/cuda with cuda/common/tensor_core.cuh replaced by the emulated one)
#include "cuda/attention/sparse_attention_mma_bwd.cuh"
#include "cuda/attention/sparse_attention_mma_fwd.cuh"
#include "cuda/attention/sparse_attention_rowwise.cuh"
#include "cuda/attention/sparse_attention_split.cuh"
#include "cuda/indexer/indexer_backward_kernels.cuh"
#include "cuda/indexer/indexer_logits_kernels.cuh"
#include "cuda/indexer/indexer_topk_kernels.cuh"
#include "cuda/indexer/indexer_topk_merge.cuh"
#include "cuda/indexer/select_rows.cuh"

#include <fstream>
#include <initializer_list>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

using namespace dsa;
using namespace dsa::cuda::indexer;

namespace {

std::string dir;
std::map<std::string, std::string> meta;

std::string get(const std::string& key) {
  auto it = meta.find(key);
  if (it == meta.end()) {
    std::fprintf(stderr, "driver: missing meta key %s\n", key.c_str());
    std::exit(2);
  }
  return it->second;
}
int64_t geti(const std::string& key) { return std::stoll(get(key)); }
double getf(const std::string& key) { return std::stod(get(key)); }

std::vector<uint8_t> read_file(const std::string& name) {
  std::ifstream f(dir + "/" + name, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "driver: cannot read %s\n", name.c_str());
    std::exit(2);
  }
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}
template <typename T>
void write_file(const std::string& name, const T* data, size_t n) {
  std::ofstream f(dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * sizeof(T)));
}

// Exactly-sized heap copies, so that AddressSanitizer sees any read past a tensor's end.
template <typename T>
std::unique_ptr<T[]> exact_copy(const std::vector<uint8_t>& bytes) {
  const size_t n = bytes.size() / sizeof(T);
  std::unique_ptr<T[]> p(new T[n]);
  std::memcpy(p.get(), bytes.data(), n * sizeof(T));
  return p;
}

struct Inputs {
  std::vector<uint8_t> q_bytes, k_bytes;
  std::unique_ptr<float[]> w, k_scale;
  std::unique_ptr<int32_t[]> key_start, key_end;
  IndexerParams p{};
  std::string dtype;
};

template <typename T>
struct Owned {
  std::unique_ptr<T[]> q, k;
};

Inputs read_indexer_inputs() {
  Inputs in;
  in.dtype = get("dtype");
  in.q_bytes = read_file("q.bin");
  in.k_bytes = read_file("k.bin");
  in.w = exact_copy<float>(read_file("w.bin"));
  IndexerParams& p = in.p;
  p.B = geti("B"), p.T = geti("T"), p.S = geti("S"), p.Hi = geti("Hi"), p.Di = geti("Di");
  p.q_batch_stride = geti("q_batch_stride"), p.q_row_stride = geti("q_row_stride"), p.q_head_stride = geti("q_head_stride");
  p.k_batch_stride = geti("k_batch_stride"), p.k_row_stride = geti("k_row_stride");
  p.scale = getf("scale");
  p.causal = geti("causal") != 0;
  p.causal_offset = p.S - p.T;
  p.w = in.w.get();
  if (geti("k_scale") != 0) {
    in.k_scale = exact_copy<float>(read_file("ks.bin"));
    p.k_scale = in.k_scale.get();
  }
  if (geti("key_start") != 0) {
    in.key_start = exact_copy<int32_t>(read_file("key_start.bin"));
    p.key_start = in.key_start.get();
  }
  if (geti("key_end") != 0) {
    in.key_end = exact_copy<int32_t>(read_file("key_end.bin"));
    p.key_end = in.key_end.get();
  }
  return in;
}

// The dynamic shared memory an indexer block may use, as dynamic_smem_limit in indexer_cuda.h
// computes it from the block limit (the case's smem_limit: the device's, or DSA_EXT_CUDA_SMEM_LIMIT).
int indexer_smem() { return static_cast<int>(geti("smem_limit")) - kStaticSmemReserve; }

// Calls fn.template operator()<Tile>(params, vec16) with the engine with_score_engine in
// indexer_cuda.h picks (the case's smem_limit makes the fallback reachable), and prints it:
// "engine=mma|simt dtype=<input dtype> vec16=0|1 converted=0|1".
template <class Fn>
void with_engine(Inputs& in, const Fn& fn) {
  static std::unique_ptr<float[]> qf, kf;
  static std::unique_ptr<__half[]> qh, kh;
  static std::unique_ptr<__nv_bfloat16[]> qb, kb;
  static std::unique_ptr<__nv_fp8_e4m3[]> q8, k8;
  IndexerParams p = in.p;
  const int smem = indexer_smem();
  const int64_t q_off = geti("q_off"), k_off = geti("k_off");
  const auto print = [&](const char* engine, bool vec16, bool converted) {
    std::printf("engine=%s dtype=%s vec16=%d converted=%d\n", engine, in.dtype.c_str(), vec16 ? 1 : 0,
                converted ? 1 : 0);
  };
  if (in.dtype == "f32") {
    qf = exact_copy<float>(in.q_bytes), kf = exact_copy<float>(in.k_bytes);
    p.q = qf.get() + q_off, p.k = kf.get() + k_off;
    print("simt", false, false);
    fn.template operator()<SimtTile>(p, false);
    return;
  }
  if (in.dtype == "e4m3") {  // an sm_89+ device (the e4m3 tensor cores)
    q8 = exact_copy<__nv_fp8_e4m3>(in.q_bytes), k8 = exact_copy<__nv_fp8_e4m3>(in.k_bytes);
    p.q = q8.get() + q_off, p.k = k8.get() + k_off;
    if (mma_fits<__nv_fp8_e4m3>(p, smem)) {
      const bool vec16 = rows_16b_aligned(p, 1);
      print("mma", vec16, false);
      fn.template operator()<MmaTile<__nv_fp8_e4m3>>(p, vec16);
      return;
    }
    std::fprintf(stderr, "driver: e4m3 case outside the tensor-core tiles\n");
    std::exit(3);
  }
  if (in.dtype == "f16") {
    qh = exact_copy<__half>(in.q_bytes), kh = exact_copy<__half>(in.k_bytes);
    p.q = qh.get() + q_off, p.k = kh.get() + k_off;
  } else {
    qb = exact_copy<__nv_bfloat16>(in.q_bytes), kb = exact_copy<__nv_bfloat16>(in.k_bytes);
    p.q = qb.get() + q_off, p.k = kb.get() + k_off;
  }
  if (mma_fits<__half>(p, smem)) {  // the same layout for both 16-bit types
    const bool vec16 = rows_16b_aligned(p, 2);
    print("mma", vec16, false);
    if (in.dtype == "f16")
      fn.template operator()<MmaTile<__half>>(p, vec16);
    else
      fn.template operator()<MmaTile<__nv_bfloat16>>(p, vec16);
    return;
  }
  // Fallback: contiguous float32 copies (the host code uses .to(kFloat)).
  print("simt", false, true);
  const auto to_float = [&](const void* base, int64_t rows, int64_t cols, auto row_off) {
    std::unique_ptr<float[]> out(new float[rows * cols]);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t o = row_off(r) + c;
        out[r * cols + c] = in.dtype == "f16" ? __half2float(static_cast<const __half*>(base)[o])
                                              : __bfloat162float(static_cast<const __nv_bfloat16*>(base)[o]);
      }
    return out;
  };
  qf = to_float(p.q, p.B * p.T * p.Hi, p.Di, [&](int64_t r) {
    return (r / (p.T * p.Hi)) * p.q_batch_stride + ((r / p.Hi) % p.T) * p.q_row_stride + (r % p.Hi) * p.q_head_stride;
  });
  kf = to_float(p.k, p.B * p.S, p.Di, [&](int64_t r) { return (r / p.S) * p.k_batch_stride + (r % p.S) * p.k_row_stride; });
  p.q = qf.get(), p.k = kf.get();
  p.q_batch_stride = p.T * p.Hi * p.Di, p.q_row_stride = p.Hi * p.Di, p.q_head_stride = p.Di;
  p.k_batch_stride = p.S * p.Di, p.k_row_stride = p.Di;
  fn.template operator()<SimtTile>(p, false);
}

void run_logits() {
  Inputs in = read_indexer_inputs();
  const IndexerParams& p0 = in.p;
  std::unique_ptr<float[]> out(new float[p0.B * p0.T * p0.S]);
  with_engine(in, [&]<class Tile>(const IndexerParams& p, bool vec16) {
    const auto L = Tile::layout(p, vec16);
    const LogitsGrid grid = logits_grid(p);
    emu::launch(static_cast<unsigned>(grid.blocks), kThreads, L.bytes,
                [&] { indexer_logits_kernel<Tile, decltype(L)>(p, L, grid, out.get()); });
  });
  write_file("out.bin", out.get(), p0.B * p0.T * p0.S);
}

void run_indexer_topk() {
  Inputs in = read_indexer_inputs();
  const IndexerParams& p0 = in.p;
  const int64_t topk = geti("k");
  std::unique_ptr<int32_t[]> out(new int32_t[p0.B * p0.T * topk]);
  const TopkPlan plan = plan_indexer_topk(
      p0, topk, TopkLimits{static_cast<int>(geti("sm_count")), geti("budget"), static_cast<int>(geti("max_splits")),
                           geti("min_split_keys")});
  const MergeTree& tree = plan.tree;
  std::printf("plan k=%d capacity=%d splits=%d split_len=%ld t_chunk=%ld merge_levels=%d\n", plan.k, plan.capacity,
              plan.splits, static_cast<long>(plan.split_len), static_cast<long>(plan.t_chunk), tree.levels);
  const int64_t slots = topk_workspace_slots(p0, plan);
  std::unique_ptr<uint32_t[]> keys(new uint32_t[slots * plan.capacity]);
  std::unique_ptr<int32_t[]> pos(new int32_t[slots * plan.capacity]);
  std::unique_ptr<int32_t[]> counts(new int32_t[slots]);
  // as indexer_topk.cu: the merge tree's two buffer sets
  const int64_t tree_rows = tree.levels > 0 ? p0.B * plan.t_chunk : 0;
  std::unique_ptr<uint32_t[]> tree_keys[2];
  std::unique_ptr<int32_t[]> tree_pos[2], tree_counts[2];
  for (int i = 0; i < 2; ++i) {
    tree_keys[i].reset(new uint32_t[tree_rows * tree.most_entries]);
    tree_pos[i].reset(new int32_t[tree_rows * tree.most_entries]);
    tree_counts[i].reset(new int32_t[tree_rows * tree.n[1]]);
  }
  const int final_cand_cap = merge_select_candidates(tree.n[tree.levels], tree.cap[tree.levels]);
  with_engine(in, [&]<class Tile>(const IndexerParams& p, bool vec16) {
    const auto L = Tile::layout(p, vec16);
    for (int64_t t_begin = 0; t_begin < p.T; t_begin += plan.t_chunk) {
      const TopkWorkspace ws = topk_workspace(p, plan, keys.get(), pos.get(), counts.get(), t_begin);
      emu::launch(static_cast<unsigned>(p.B * ws.q_tiles * plan.splits), kThreads, L.bytes,
                  [&] { indexer_topk_partial_kernel<Tile, decltype(L)>(p, L, ws); });
      const CandidateSet last = run_merge_tree(
          tree, p.B * ws.t_count, CandidateSet{ws.keys, ws.pos, ws.counts},
          CandidateSet{tree_keys[0].get(), tree_pos[0].get(), tree_counts[0].get()},
          CandidateSet{tree_keys[1].get(), tree_pos[1].get(), tree_counts[1].get()},
          [&](const MergeLevel& m, int64_t blocks, int cand_cap) {
            emu::launch(static_cast<unsigned>(blocks), kSelectThreads, cand_cap * sizeof(uint32_t),
                        [&] { merge_level_kernel<>(m, cand_cap); });
          });
      const SplitRows rows{final_buffers(ws, tree, last), p.T};
      emu::launch(static_cast<unsigned>(p.B * ws.t_count), kSelectThreads, final_cand_cap * sizeof(uint32_t),
                  [&] { select_rows_kernel<SplitRows>(rows, plan.k, topk, out.get(), final_cand_cap); });
    }
  });
  write_file("out.bin", out.get(), p0.B * p0.T * topk);
}

template <typename Elem>
void run_topk_typed(const std::vector<uint8_t>& bytes) {
  const int64_t B = geti("B"), T = geti("T"), S = geti("S"), k = geti("k");
  auto logits = exact_copy<Elem>(bytes);
  TopkParams p{logits.get(), B, T, S, k, geti("logits_batch_stride"), geti("logits_row_stride"), nullptr};
  std::unique_ptr<int32_t[]> out(new int32_t[B * T * k]);
  p.out = out.get();
  // as launch_topk_rows in topk.cu
  const DenseRows<Elem> rows{static_cast<const Elem*>(p.logits), p.T, p.logits_batch_stride, p.logits_row_stride, static_cast<int>(p.S)};
  const int kk = static_cast<int>(std::min(p.topk, p.S));
  const int cand_cap = static_cast<int>(std::min<int64_t>(p.S, geti("cand_cap")));
  std::printf("select cand_cap=%d\n", cand_cap);
  emu::launch(static_cast<unsigned>(p.B * p.T), kSelectThreads, cand_cap * sizeof(uint32_t),
              [&] { select_rows_kernel<DenseRows<Elem>>(rows, kk, p.topk, p.out, cand_cap); });
  write_file("out.bin", out.get(), B * T * k);
}

void run_topk() {
  const auto bytes = read_file("logits.bin");
  const std::string dtype = get("dtype");
  if (dtype == "f32")
    run_topk_typed<float>(bytes);
  else if (dtype == "f16")
    run_topk_typed<__half>(bytes);
  else
    run_topk_typed<__nv_bfloat16>(bytes);
}

template <typename T>
void run_backward_typed(Inputs& in) {
  IndexerBwdParams bp{};
  auto q = exact_copy<T>(in.q_bytes);
  auto k = exact_copy<T>(in.k_bytes);
  auto g = exact_copy<float>(read_file("g.bin"));
  bp.fwd = in.p;
  const IndexerParams& p = bp.fwd;
  bp.fwd.q = q.get() + geti("q_off");
  bp.fwd.k = k.get() + geti("k_off");
  bp.grad_logits = g.get();
  bp.grad_batch_stride = geti("grad_batch_stride"), bp.grad_row_stride = geti("grad_row_stride");
  std::unique_ptr<T[]> gq(new T[p.B * p.T * p.Hi * p.Di]), gk(new T[p.B * p.S * p.Di]);
  std::unique_ptr<float[]> gw(new float[p.B * p.T * p.Hi]);
  bp.grad_q = gq.get(), bp.grad_k = gk.get(), bp.grad_w = gw.get();
  if (!bwd_mma_fits(p, indexer_smem())) {  // the host takes the ATen path (test_float_backward.py)
    std::fprintf(stderr, "driver: backward case outside the tensor-core kernels\n");
    std::exit(3);
  }
  // as launch_mma_backward in indexer_logits_backward.cu
  const BwdLayout L = bwd_layout<T>(p, rows_16b_aligned(p, sizeof(T)));
  std::printf("engine=mma dtype=%s vec16=%d converted=0\n", in.dtype.c_str(), L.vec16 ? 1 : 0);
  const IndexerBwdGrid grid = bwd_grid(p);
  emu::launch(static_cast<unsigned>(grid.dq_blocks), kThreads, L.bytes, [&] { indexer_dq_kernel<T>(bp, L, grid); });
  emu::launch(static_cast<unsigned>(grid.dk_blocks), kThreads, L.bytes, [&] { indexer_dk_kernel<T>(bp, L, grid); });
  write_file("grad_q.bin", gq.get(), p.B * p.T * p.Hi * p.Di);
  write_file("grad_k.bin", gk.get(), p.B * p.S * p.Di);
  write_file("grad_w.bin", gw.get(), p.B * p.T * p.Hi);
}

void run_backward() {
  Inputs in = read_indexer_inputs();
  if (in.dtype == "f16")
    run_backward_typed<__half>(in);
  else
    run_backward_typed<__nv_bfloat16>(in);
}

// ---------------------------------------------------------------------------------------------
// sparse_attention: the launches of sparse_attention.cu / sparse_attention_*.cu
// ---------------------------------------------------------------------------------------------

namespace attn = dsa::cuda;

// q, k, v (v may be a view of k's storage: v_in_k), indices and the forward's params.
template <typename T>
struct AttnCase {
  std::unique_ptr<T[]> q, k, v;
  std::unique_ptr<int32_t[]> idx;
  SparseAttentionParams p{};
  bool v_in_k = false;

  AttnCase() {
    q = exact_copy<T>(read_file("q.bin"));
    k = exact_copy<T>(read_file("k.bin"));
    v_in_k = geti("v_in_k") != 0;
    if (!v_in_k) v = exact_copy<T>(read_file("v.bin"));
    idx = exact_copy<int32_t>(read_file("idx.bin"));
    p.B = geti("B"), p.T = geti("T"), p.S = geti("S"), p.H = geti("H"), p.Hkv = geti("Hkv");
    p.Dqk = geti("Dqk"), p.Dv = geti("Dv"), p.topk = geti("K");
    p.q_batch_stride = geti("q_batch_stride"), p.q_row_stride = geti("q_row_stride"), p.q_head_stride = geti("q_head_stride");
    p.k_batch_stride = geti("k_batch_stride"), p.k_row_stride = geti("k_row_stride"), p.k_head_stride = geti("k_head_stride");
    p.v_batch_stride = geti("v_batch_stride"), p.v_row_stride = geti("v_row_stride"), p.v_head_stride = geti("v_head_stride");
    p.idx_batch_stride = geti("idx_batch_stride"), p.idx_row_stride = geti("idx_row_stride"), p.idx_head_stride = geti("idx_head_stride");
    p.scale = getf("scale");
    p.q = q.get() + geti("q_off");
    p.k = k.get() + geti("k_off");
    p.v = v_in_k ? static_cast<const void*>(k.get() + geti("v_off")) : v.get() + geti("v_off");
    p.indices = idx.get();
  }

  // Rows of a [n0, n1, n2, D] view at `base` ((size, element stride) of the first three dims)
  // start 16-byte aligned: rows_aligned of sparse_attention.cu on the view.
  static bool rows_aligned(const void* base, std::initializer_list<std::pair<int64_t, int64_t>> dims) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
    for (const auto& [size, stride] : dims)
      if (size > 1 && stride * static_cast<int64_t>(sizeof(T)) % 16 != 0) return false;
    return true;
  }

  // The kernels sparse_attention.cu launches for this case (tensor_core_shape): the tensor-core
  // kernels for 16-bit inputs with head dims they take, 16-byte aligned rows of q, k, v (and of
  // grad_out in the backward) and a block shape that fits in smem_limit; the row-wise kernels
  // otherwise. Prints "path=mma rows=.. row_warps=.. col_warps=.. chunks=.. stages=.. pairs=.."
  // or "path=rowwise"; returns the block shape of the tensor-core path.
  std::optional<attn::MmaShape> kernel_path(const SparseAttentionBwdParams* bwd) const {
    const bool backward = bwd != nullptr;
    const int smem_limit = static_cast<int>(geti("smem_limit"));
    attn::MmaShape s;
    const bool mma =
        sizeof(T) == 2 && attn::mma_head_dims(p) &&
        rows_aligned(p.q, {{p.B, p.q_batch_stride}, {p.T, p.q_row_stride}, {p.H, p.q_head_stride}}) &&
        rows_aligned(p.k, {{p.B, p.k_batch_stride}, {p.S, p.k_row_stride}, {p.Hkv, p.k_head_stride}}) &&
        rows_aligned(p.v, {{p.B, p.v_batch_stride}, {p.S, p.v_row_stride}, {p.Hkv, p.v_head_stride}}) &&
        (!backward ||
         rows_aligned(bwd->grad_out, {{p.B, bwd->do_batch_stride}, {p.T, bwd->do_row_stride}, {p.H, bwd->do_head_stride}})) &&
        attn::choose_mma_shape(p, v_in_k, backward, smem_limit, static_cast<int>(geti("min_warps")), s);
    if (mma) {
      std::printf("path=mma rows=%d row_warps=%d col_warps=%d chunks=%d stages=%d pairs=%d\n", s.rows, s.row_warps,
                  s.col_warps, s.chunks, s.stages, s.pairs_per_warp);
      return s;
    }
    using Acc = typename attn::rowwise::AccOf<T>::type;
    if (attn::rowwise_smem_bytes(p, sizeof(Acc), backward) > smem_limit) {  // check_rowwise raises
      std::fprintf(stderr, "driver: the row-wise kernels' rows do not fit in shared memory\n");
      std::exit(3);
    }
    std::printf("path=rowwise\n");
    return std::nullopt;
  }
};

constexpr float kLog2eF = 1.4426950408889634f;

template <typename T>
void run_attention_forward_typed() {
  using Acc = typename attn::rowwise::AccOf<T>::type;
  AttnCase<T> c;
  SparseAttentionParams& p = c.p;
  std::unique_ptr<T[]> out(new T[p.B * p.T * p.H * p.Dv]);
  std::unique_ptr<Acc[]> lse(new Acc[p.B * p.T * p.H]);
  p.out = out.get();
  p.lse = lse.get();
  if (const auto shape = c.kernel_path(nullptr)) {
    if constexpr (sizeof(T) == 2) {
      // as forward_mma in sparse_attention.cu
      const attn::MmaShape s = *shape;
      attn::FwdArgs a{p, s, static_cast<float>(p.scale) * kLog2eF};
      const attn::AttnSplits sp =
          attn::attention_splits(p, s, static_cast<int>(geti("sm_count")), static_cast<int>(geti("max_splits")));
      std::printf("attn_splits=%d split_tiles=%d\n", sp.splits, sp.split_tiles);
      const int64_t rows = p.B * p.T * p.H;
      std::unique_ptr<float[]> part_out, part_lse;
      if (sp.splits > 1) {
        part_out.reset(new float[rows * sp.splits * p.Dv]);
        part_lse.reset(new float[rows * sp.splits]);
        a.splits = sp.splits;
        a.split_tiles = sp.split_tiles;
        a.part_out = part_out.get();
        a.part_lse = part_lse.get();
      }
      emu::launch(static_cast<unsigned>(p.B * p.T * p.Hkv * s.chunks * sp.splits), attn::threads_of(s),
                  attn::smem_layout(s, false).bytes, [&] { attn::sparse_attention_fwd_mma_kernel<T>(a); });
      if (sp.splits > 1) {
        const attn::CombineArgs m{a.part_out, a.part_lse, p.out, lse.get(), rows, p.Dv, sp.splits};
        emu::launch(static_cast<unsigned>(attn::combine_blocks(m)), attn::kCombineWarps * 32, 0,
                    [&] { attn::combine_splits_kernel<T>(m); });
      }
    }
  } else {
    emu::launch(static_cast<unsigned>(attn::rowwise_blocks(p)), attn::kRowwiseWarps * 32,
                attn::rowwise_smem_bytes(p, sizeof(Acc), false), [&] { attn::rowwise::rowwise_fwd_kernel<T>(p); });
  }
  write_file("out.bin", out.get(), p.B * p.T * p.H * p.Dv);
  write_file("lse.bin", lse.get(), p.B * p.T * p.H);
}

template <typename T>
void run_attention_backward_typed() {
  using Acc = typename attn::rowwise::AccOf<T>::type;
  AttnCase<T> c;
  const SparseAttentionParams& p = c.p;
  SparseAttentionBwdParams bp{};
  bp.fwd = p;
  auto out = exact_copy<T>(read_file("out.bin"));
  auto lse = exact_copy<Acc>(read_file("lse.bin"));
  auto dout = exact_copy<T>(read_file("dout.bin"));
  std::unique_ptr<Acc[]> glse;
  if (geti("grad_lse") != 0) glse = exact_copy<Acc>(read_file("glse.bin"));
  bp.fwd.out = out.get();
  bp.fwd.lse = lse.get();
  bp.grad_out = dout.get();
  bp.do_batch_stride = geti("do_batch_stride"), bp.do_row_stride = geti("do_row_stride"), bp.do_head_stride = geti("do_head_stride");
  bp.grad_lse = glse.get();
  std::unique_ptr<T[]> dq(new T[p.B * p.T * p.H * p.Dqk]);
  bp.grad_q = dq.get();
  const int64_t nk = p.B * p.S * p.Hkv * p.Dqk, nv = p.B * p.S * p.Hkv * p.Dv;
  std::unique_ptr<Acc[]> dk(new Acc[nk]()), dv(new Acc[nv]()), delta(new Acc[p.B * p.T * p.H]);
  emu::launch(static_cast<unsigned>(attn::rowwise_blocks(p)), attn::kRowwiseWarps * 32, 0,
              [&] { attn::rowwise::delta_kernel<T>(bp, delta.get()); });
  if (const auto shape = c.kernel_path(&bp)) {
    if constexpr (sizeof(T) == 2) {
      const attn::MmaShape s = *shape;
      const attn::BwdArgs a{bp, s, static_cast<float>(p.scale) * kLog2eF, delta.get(),
                            attn::KeyGradOut{dk.get(), dv.get(), nullptr, nullptr}};
      emu::launch(static_cast<unsigned>(p.B * p.T * p.Hkv * s.chunks), attn::threads_of(s),
                  attn::smem_layout(s, true).bytes, [&] { attn::sparse_attention_bwd_mma_kernel<T>(a); });
    }
  } else {
    const attn::SimpleBwdArgs a{bp, delta.get(), attn::KeyGradOut{dk.get(), dv.get(), nullptr, nullptr}};
    emu::launch(static_cast<unsigned>(attn::rowwise_blocks(p)), attn::kRowwiseWarps * 32,
                attn::rowwise_smem_bytes(p, sizeof(Acc), true), [&] { attn::rowwise::rowwise_bwd_kernel<T>(a); });
  }
  write_file("grad_q.bin", dq.get(), p.B * p.T * p.H * p.Dqk);
  write_file("grad_k.bin", dk.get(), nk);
  write_file("grad_v.bin", dv.get(), nv);
}

template <template <typename> class Run>
void with_attention_dtype() {
  const std::string dtype = get("dtype");
  if (dtype == "bf16")
    Run<__nv_bfloat16>{}();
  else if (dtype == "f16")
    Run<__half>{}();
  else
    Run<float>{}();
}
template <typename T>
struct AttnFwd {
  void operator()() const { run_attention_forward_typed<T>(); }
};
template <typename T>
struct AttnBwd {
  void operator()() const { run_attention_backward_typed<T>(); }
};

}  // namespace

// The host-side engine choices (indexer_tile.cuh, indexer_backward_kernels.cuh,
// sparse_attention_kernels.h) for shapes too large to allocate: they must compare the int64 dims,
// not narrowed copies. Prints "fits mma=.. e4m3=.. bwd=.. attn_mma=..".
void run_fits() {
  IndexerParams p{};
  p.B = 1, p.T = 1, p.S = 64, p.Hi = geti("Hi"), p.Di = geti("Di");
  const int smem = indexer_smem();
  SparseAttentionParams a{};
  a.B = 1, a.T = 1, a.S = 64, a.H = geti("H"), a.Hkv = geti("Hkv"), a.Dqk = a.Dv = geti("Dqk"), a.topk = 32;
  attn::MmaShape s;
  const bool attn_mma = attn::mma_head_dims(a) &&
                        attn::choose_mma_shape(a, false, false, static_cast<int>(geti("smem_limit")), 4, s);
  std::printf("fits mma=%d e4m3=%d bwd=%d attn_mma=%d\n", mma_fits<__half>(p, smem) ? 1 : 0,
              mma_fits<__nv_fp8_e4m3>(p, smem) ? 1 : 0, bwd_mma_fits(p, smem) ? 1 : 0, attn_mma ? 1 : 0);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: driver <case dir>\n");
    return 2;
  }
  dir = argv[1];
  std::ifstream f(dir + "/meta.txt");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string key, value;
    if (ss >> key >> value) meta[key] = value;
  }
  const std::string op = get("op");
  if (op == "fits")
    run_fits();
  else if (op == "logits")
    run_logits();
  else if (op == "indexer_topk")
    run_indexer_topk();
  else if (op == "topk")
    run_topk();
  else if (op == "backward")
    run_backward();
  else if (op == "attn_fwd")
    with_attention_dtype<AttnFwd>();
  else if (op == "attn_bwd")
    with_attention_dtype<AttnBwd>();
  else {
    std::fprintf(stderr, "driver: unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}
