// Block layouts for block_sparse_attention: small (blocks x blocks) bool
// tensors built on the CPU, each builder with its checks.
#include "attnzoo/ops/layouts.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <utility>

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

namespace {

// Whether any block meets each tile along `dim` of x (which has `blocks`
// entries there): tile t covers items [t * tile, min(n, t * tile + tile)),
// blocks lo(t) .. hi(t), at most (tile - 1) / block + 2 of them, so an OR of
// that many shifted gathers.
at::Tensor any_per_tile(const at::Tensor& x, int64_t dim, int64_t n, int64_t blocks, int64_t block,
                        int64_t tile) {
  const auto longs = at::TensorOptions().dtype(at::kLong).device(x.device());
  const at::Tensor first = at::arange((n + tile - 1) / tile, longs) * tile;
  const at::Tensor lo = at::div(first, block, "floor");
  const at::Tensor hi = at::div((first + (tile - 1)).clamp_max(n - 1), block, "floor").clamp_max(blocks - 1);
  at::Tensor out = x.index_select(dim, lo);
  for (int64_t o = 1; o < (tile - 1) / block + 2; ++o)
    out = out.logical_or(x.index_select(dim, at::minimum(lo + o, hi)));
  return out;
}

// The true entries of (S, rows, cols) per row, compressed: int32 row
// pointers over S * rows rows and the column of each entry.
std::pair<at::Tensor, at::Tensor> compressed_rows(const at::Tensor& marked) {
  TORCH_CHECK(marked.numel() < (int64_t(1) << 31), "tile_walks: too many tiles for int32 walks (",
              marked.numel(), ")");
  const at::Tensor counts = marked.sum(-1).flatten();
  const at::Tensor ptr = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)}).to(at::kInt);
  const at::Tensor cols = marked.nonzero().select(1, 2).to(at::kInt).contiguous();
  return {ptr.contiguous(), cols};
}

}  // namespace

TileWalks tile_walks(const at::Tensor& layout, int64_t block, int64_t Nq, int64_t Nk, int64_t tile) {
  TORCH_CHECK(
      layout.dim() == 3 && layout.scalar_type() == at::kBool && block > 0 && tile > 0 && Nq > 0 && Nk > 0,
      "tile_walks: needs a (S, rows, cols) bool layout and positive sizes");
  const int64_t rows = layout.size(1), cols = layout.size(2);
  const at::Tensor by_query_tile = any_per_tile(layout, 1, Nq, rows, block, tile);
  const at::Tensor marked = any_per_tile(by_query_tile, 2, Nk, cols, block, tile);
  auto [key_ptr, key_tiles] = compressed_rows(marked);
  auto [query_ptr, query_tiles] = compressed_rows(marked.transpose(1, 2));
  return {key_ptr, key_tiles, query_ptr, query_tiles};
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
