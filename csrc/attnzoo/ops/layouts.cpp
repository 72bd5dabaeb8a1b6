// Block layouts for block_sparse_attention: small (blocks x blocks) bool
// tensors built on the CPU, each builder with its checks.
#include "attnzoo/ops/layouts.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

namespace attnzoo::layouts {
namespace {

void check_blocks(const char* op, const char* name, int64_t n) {
  TORCH_CHECK(n > 0, op, ": ", name, " must be positive, got ", n);
}

// allowed(i, j) over query/key block indices, as a (1, nq, nk) bool tensor.
template <class Fn>
at::Tensor build(int64_t nq, int64_t nk, Fn&& allowed) {
  at::Tensor out = at::zeros({1, nq, nk}, at::TensorOptions().dtype(at::kBool));
  auto acc = out.accessor<bool, 3>();
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j) acc[0][i][j] = allowed(i + nk - nq, j);
  return out;
}

}  // namespace

at::Tensor local(int64_t num_q_blocks, int64_t num_k_blocks, int64_t window, bool causal) {
  check_blocks("layouts.local", "num_q_blocks", num_q_blocks);
  check_blocks("layouts.local", "num_k_blocks", num_k_blocks);
  TORCH_CHECK(window >= 0, "layouts.local: window must be >= 0, got ", window);
  return build(num_q_blocks, num_k_blocks,
               [&](int64_t p, int64_t j) { return j >= p - window && j <= (causal ? p : p + window); });
}

at::Tensor bigbird(int64_t num_q_blocks, int64_t num_k_blocks, int64_t window, int64_t num_global,
                   int64_t num_random, int64_t num_heads, int64_t seed, bool causal) {
  const char* op = "layouts.bigbird";
  check_blocks(op, "num_q_blocks", num_q_blocks);
  check_blocks(op, "num_k_blocks", num_k_blocks);
  check_blocks(op, "num_heads", num_heads);
  TORCH_CHECK(window >= 0 && num_global >= 0 && num_random >= 0, op,
              ": window, num_global and num_random must be >= 0, got ", window, ", ", num_global, ", ",
              num_random);
  const int64_t nq = num_q_blocks, nk = num_k_blocks;
  const at::Tensor base = build(nq, nk, [&](int64_t p, int64_t j) {
    const bool visible = !causal || j <= p;
    const bool global = j < num_global || p - (nk - nq) < num_global;
    return visible && (std::abs(p - j) <= window || global);
  });
  at::Tensor out = base.repeat({num_heads, 1, 1});
  auto acc = out.accessor<bool, 3>();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  for (int64_t h = 0; h < num_heads; ++h) {
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t p = i + nk - nq;
      std::vector<int64_t> candidates;
      for (int64_t j = 0; j < nk; ++j)
        if (!acc[h][i][j] && (!causal || j <= p)) candidates.push_back(j);
      const int64_t take = std::min<int64_t>(num_random, candidates.size());
      const at::Tensor order = at::randperm(static_cast<int64_t>(candidates.size()), gen);
      for (int64_t r = 0; r < take; ++r) acc[h][i][candidates[order[r].item<int64_t>()]] = true;
    }
  }
  return out;
}

at::Tensor fixed(int64_t num_blocks, int64_t stride, int64_t num_summary, bool causal) {
  const char* op = "layouts.fixed";
  check_blocks(op, "num_blocks", num_blocks);
  check_blocks(op, "stride", stride);
  TORCH_CHECK(num_summary >= 1 && num_summary <= stride, op, ": num_summary must be in [1, stride = ", stride,
              "], got ", num_summary);
  return build(num_blocks, num_blocks, [&](int64_t i, int64_t j) {
    if (causal && j > i) return false;
    return j / stride == i / stride || j % stride >= stride - num_summary;
  });
}

at::Tensor strided(int64_t num_blocks, int64_t stride, bool causal) {
  const char* op = "layouts.strided";
  check_blocks(op, "num_blocks", num_blocks);
  check_blocks(op, "stride", stride);
  return build(num_blocks, num_blocks, [&](int64_t i, int64_t j) {
    if (causal && j > i) return false;
    return std::abs(i - j) < stride || (i - j) % stride == 0;
  });
}

at::Tensor longformer(int64_t num_blocks, int64_t window, const std::vector<int64_t>& global_blocks,
                      bool causal) {
  const char* op = "layouts.longformer";
  check_blocks(op, "num_blocks", num_blocks);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0, got ", window);
  std::vector<bool> global(num_blocks, false);
  for (int64_t g : global_blocks) {
    TORCH_CHECK(g >= 0 && g < num_blocks, op, ": global block ", g, " is outside [0, ", num_blocks, ")");
    global[g] = true;
  }
  return build(num_blocks, num_blocks, [&](int64_t i, int64_t j) {
    if (causal && j > i) return false;
    return std::abs(i - j) <= window || global[i] || global[j];
  });
}

}  // namespace attnzoo::layouts

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("layout_local", &attnzoo::layouts::local);
  m.impl("layout_bigbird", &attnzoo::layouts::bigbird);
  m.impl("layout_fixed", &attnzoo::layouts::fixed);
  m.impl("layout_strided", &attnzoo::layouts::strided);
  m.impl("layout_longformer", [](int64_t n, int64_t w, at::IntArrayRef g, bool c) {
    return attnzoo::layouts::longformer(n, w, g.vec(), c);
  });
}
