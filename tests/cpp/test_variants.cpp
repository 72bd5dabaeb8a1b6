// The C++ entry points of the attention kinds beyond dense attention, each
// against a float64 reference written here.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <array>
#include <catch2/catch.hpp>

#include "attnzoo/attnzoo.h"
#include "attnzoo/ops/lsh_support.h"

namespace {

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// softmax(q k^T / sqrt(D) with disallowed entries removed) v
at::Tensor masked_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& allowed) {
  auto s = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(q.size(-1)));
  s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(s, -1).nan_to_num(0.0), v);
}

}  // namespace

TEST_CASE("block_sparse_attention equals attention under the expanded mask", "[variants]") {
  at::manual_seed(1);
  const int64_t N = 200, bs = 32, nb = (N + bs - 1) / bs;
  auto q = at::randn({1, 2, N, 16}, at::kDouble), k = at::randn({1, 2, N, 16}, at::kDouble),
       v = at::randn({1, 2, N, 16}, at::kDouble);
  auto layout = attnzoo::layouts::bigbird(nb, nb, 1, 1, 1, 2, 5);
  auto out = attnzoo::ops::block_sparse_attention(q, k, v, layout, bs, true);
  auto tokens = layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2).narrow(1, 0, N).narrow(2, 0, N);
  auto allowed = tokens.unsqueeze(0) & at::ones({N, N}, at::kBool).tril();
  REQUIRE(max_err(out, masked_reference(q, k, v, allowed)) < 1e-12);
}

TEST_CASE("per-batch layouts with per-block token masks (FlexAttention's partial blocks)", "[variants]") {
  at::manual_seed(4);
  const int64_t B = 2, N = 100, bs = 16, nb = (N + bs - 1) / bs;
  auto q = at::randn({B, 2, N, 8}, at::kDouble).requires_grad_();
  auto k = at::randn({B, 2, N, 8}, at::kDouble), v = at::randn({B, 2, N, 8}, at::kDouble);
  // Batch 0: block-causal with the diagonal blocks masked causally; batch 1:
  // every block, the first key block masked by a random pattern.
  auto layout = at::stack({at::ones({nb, nb}, at::kBool).tril(), at::ones({nb, nb}, at::kBool)}).unsqueeze(1);
  auto index = at::full({B, 1, nb, nb}, -1, at::kInt);
  auto masks = at::cat({at::ones({1, bs, bs}, at::kBool).tril(), at::rand({nb, bs, bs}) < 0.6});
  for (int64_t i = 0; i < nb; ++i) {
    index[0][0][i][i] = 0;
    index[1][0][i][0] = int32_t(1 + i);
  }
  auto out = attnzoo::ops::attention(
      q, k, v,
      attnzoo::ops::AttentionOptions().layout(layout).block_size(bs).block_mask_index(index).block_masks(
          masks));
  // The same pattern per token: each block's tile, the mask where one is named.
  auto allowed = at::zeros({B, 1, nb * bs, nb * bs}, at::kBool);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t j = 0; j < nb; ++j) {
        if (!layout[b][0][i][j].item<bool>()) continue;
        const int64_t p = index[b][0][i][j].item<int32_t>();
        allowed[b][0]
            .narrow(0, i * bs, bs)
            .narrow(1, j * bs, bs)
            .copy_(p < 0 ? at::ones({bs, bs}, at::kBool) : masks[p]);
      }
  allowed = allowed.narrow(2, 0, N).narrow(3, 0, N);
  auto ref = masked_reference(q, k, v, allowed);
  REQUIRE(max_err(out, ref) < 1e-12);
  auto grad = at::randn_like(out);
  REQUIRE(max_err(torch::autograd::grad({out}, {q}, {grad})[0],
                  torch::autograd::grad({ref}, {q}, {grad})[0]) < 1e-10);
}

TEST_CASE("shaw_attention adds relative keys and values", "[variants]") {
  at::manual_seed(2);
  const int64_t N = 50, K = 4, D = 8;
  auto q = at::randn({1, 1, N, D}, at::kDouble), k = at::randn({1, 1, N, D}, at::kDouble),
       v = at::randn({1, 1, N, D}, at::kDouble);
  auto rel_k = at::randn({2 * K + 1, D}, at::kDouble), rel_v = at::randn({2 * K + 1, D}, at::kDouble);
  auto out = attnzoo::ops::shaw_attention(q, k, v, rel_k, rel_v, K);
  auto pos = at::arange(N, at::kLong);
  auto r = (pos.unsqueeze(0) - pos.unsqueeze(1)).clamp(-K, K) + K;  // (N, N)
  auto rk = rel_k.index({r});                                       // (N, N, D)
  auto s = (at::matmul(q[0][0], k[0][0].t()) + (q[0][0].unsqueeze(1) * rk).sum(-1)) / std::sqrt(double(D));
  auto p = at::softmax(s, -1);
  auto ref = at::matmul(p, v[0][0]) + (p.unsqueeze(-1) * rel_v.index({r})).sum(1);
  REQUIRE(max_err(out[0][0], ref) < 1e-12);
}

TEST_CASE("rotary, linformer and linear attention from C++", "[variants]") {
  at::manual_seed(3);
  auto x = at::randn({1, 2, 10, 8}, at::kDouble);
  // rotary keeps norms of each rotated pair and is the identity at position 0
  auto rx = attnzoo::ops::rotary(x);
  REQUIRE(max_err(rx.select(2, 0), x.select(2, 0)) < 1e-12);
  REQUIRE(max_err(rx.norm(2, -1), x.norm(2, -1)) < 1e-12);

  auto q = at::randn({2, 2, 30, 8}, at::kDouble), k = at::randn({2, 2, 30, 8}, at::kDouble),
       v = at::randn({2, 2, 30, 8}, at::kDouble);
  auto E = at::randn({6, 40}, at::kDouble) / 5;
  auto lin = attnzoo::ops::linformer_attention(q, k, v, E);
  auto Ek = E.narrow(1, 0, 30);
  REQUIRE(max_err(lin, masked_reference(q, at::matmul(Ek, k), at::matmul(Ek, v),
                                        at::ones({30, 6}, at::kBool))) < 1e-12);
  REQUIRE_THROWS_WITH(
      attnzoo::ops::linformer_attention(q, k, v, E, std::nullopt, std::nullopt, 0.0, std::nullopt, true),
      Catch::Matchers::Contains("causal=True is not supported"));

  auto la = attnzoo::ops::linear_attention(q, k, v, "elu+1", true);
  auto fq = at::elu(q) + 1, fk = at::elu(k) + 1;
  auto a = at::matmul(fq, fk.transpose(-1, -2)).tril();
  REQUIRE(max_err(la, at::matmul(a, v) / (a.sum(-1, true) + 1e-6)) < 1e-10);
}

TEST_CASE("lsh_attention returns buckets and trains from C++", "[variants]") {
  at::manual_seed(4);
  auto qk = at::randn({1, 2, 64, 8}, at::kDouble).requires_grad_();
  auto v = at::randn({1, 2, 64, 8}, at::kDouble).requires_grad_();
  auto rot = at::randn({8, 2, 4}, at::kDouble);
  auto [out, buckets] = attnzoo::ops::lsh_attention(qk, v, rot, 16, true);
  REQUIRE(out.sizes() == at::IntArrayRef({1, 2, 64, 8}));
  REQUIRE(buckets.sizes() == at::IntArrayRef({1, 2, 2, 64}));
  REQUIRE(buckets.min().item<int64_t>() >= 0);
  REQUIRE(buckets.max().item<int64_t>() < 8);
  // the buckets are argmax([x R, -x R]) of each round
  auto xr = at::einsum("bhnd,dri->bhrni", {qk.detach(), rot});
  REQUIRE(at::equal(buckets, at::cat({xr, -xr}, -1).argmax(-1)));
  // causal: the first position sees only itself
  REQUIRE(max_err(out.select(2, 0), v.select(2, 0)) < 1e-12);
  auto grads = torch::autograd::grad({out.sum()}, {qk, v});
  REQUIRE(at::isfinite(grads[0]).all().item<bool>());
  REQUIRE(grads[1].abs().sum().item<double>() > 0);
}

TEST_CASE("a layout's tile walks list exactly the tiles that meet a marked block", "[variants][layouts]") {
  // The CUDA kernels walk these lists; a tile missing from them would drop
  // keys, a tile too many only costs time (the per-element rule masks it).
  // Checked against the definition, token by token, for block sizes that
  // divide the tile, are multiples of it and are neither.
  at::manual_seed(7);
  for (const auto [block, tile, Nq, Nk] : {std::array<int64_t, 4>{16, 64, 200, 200},
                                           {64, 64, 130, 190},
                                           {128, 64, 300, 257},
                                           {24, 64, 100, 170},
                                           {48, 32, 97, 97},
                                           {1, 8, 20, 13}}) {
    const int64_t rows = (Nq + block - 1) / block, cols = (Nk + block - 1) / block;
    const at::Tensor layout = at::rand({3, rows, cols}) < 0.3;
    const auto walks = attnzoo::layouts::tile_walks(layout, block, Nq, Nk, tile);
    const int64_t tq = (Nq + tile - 1) / tile, tk = (Nk + tile - 1) / tile;
    // marked[s][t][u]: some query of tile t and key of tile u fall in a marked block.
    const at::Tensor tokens =
        layout.repeat_interleave(block, 1).repeat_interleave(block, 2).narrow(1, 0, Nq).narrow(2, 0, Nk);
    const at::Tensor padded = at::constant_pad_nd(tokens, {0, tk * tile - Nk, 0, tq * tile - Nq}, 0);
    const at::Tensor marked = padded.view({3, tq, tile, tk, tile}).any(4).any(2);
    auto check = [&](const at::Tensor& ptr, const at::Tensor& list, const at::Tensor& want) {
      const int64_t lines = want.size(0) * want.size(1);
      REQUIRE(ptr.scalar_type() == at::kInt);
      REQUIRE(ptr.numel() == lines + 1);
      const at::Tensor flat = want.reshape({lines, want.size(2)});
      for (int64_t x = 0; x < lines; ++x) {
        const int64_t first = ptr[x].item<int32_t>(), last = ptr[x + 1].item<int32_t>();
        const at::Tensor expected = flat[x].nonzero().flatten().to(at::kInt);
        REQUIRE(at::equal(list.narrow(0, first, last - first), expected));
      }
    };
    check(walks.key_ptr, walks.key_tiles, marked);
    check(walks.query_ptr, walks.query_tiles, marked.transpose(1, 2));
  }
}

namespace {

using attnzoo::ops::detail::LshRows;

// The engine over sorted rows that the CUDA path of lsh_attention uses,
// written densely: the (L x L) scores with Reformer's rules, the backward by
// autograd. With it, the ATen half of the CUDA path (hashing, sorting, the
// merge of rounds and its backward, the key normalisation's backward) runs
// here against the CPU kernel; only the CUDA engine itself needs a GPU.
struct DenseLshEngine final : attnzoo::ops::detail::LshRowsEngine {
  static std::tuple<at::Tensor, at::Tensor> attend(const LshRows& r, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v) {
    const int64_t bs = r.bucket_size;
    const at::Tensor blocks = r.layout[0].repeat_interleave(bs, 0).repeat_interleave(bs, 1);  // (L, L)
    const at::Tensor pi = r.positions.unsqueeze(-1), pj = r.positions.unsqueeze(-2);
    at::Tensor visible = blocks.logical_and(r.keep);
    if (r.causal) visible = visible.logical_and(pj <= pi);
    at::Tensor s = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(q.size(-1)));
    s = s.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
    s = at::where(blocks.logical_and(pi == pj),
                  at::scalar_tensor(attnzoo::ops::detail::kLshSelfLogit, s.options()), s);
    return {at::matmul(at::softmax(s, -1), v), at::logsumexp(s, -1)};
  }
  std::tuple<at::Tensor, at::Tensor> forward(const LshRows& r) const override {
    REQUIRE(r.dropout_p == 0.0);
    return attend(r, r.q, r.k, r.v);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const LshRows& r, const at::Tensor& grad_out,
                                                          const at::Tensor& grad_lse, const at::Tensor&,
                                                          const at::Tensor&) const override {
    const at::Tensor q = r.q.detach().requires_grad_(), k = r.k.detach().requires_grad_(),
                     v = r.v.detach().requires_grad_();
    auto [out, lse] = attend(r, q, k, v);
    const auto g = torch::autograd::grad({out, lse}, {q, k, v}, {grad_out, grad_lse});
    return {g[0], g[1], g[2]};
  }
};

}  // namespace

TEST_CASE("the CUDA path's hashing, sorting and merging of LSH rounds equals the CPU kernel",
          "[variants][lsh]") {
  using attnzoo::ops::detail::op_handle;
  namespace d = attnzoo::ops::detail;
  static const auto cpu_forward = op_handle<d::LshForwardSig>("attnzoo::_lsh_forward");
  static const auto cpu_backward = op_handle<d::LshBackwardSig>("attnzoo::_lsh_backward");
  at::manual_seed(11);
  const DenseLshEngine engine;
  // (N, bucket_size, rounds): a ragged N, one chunk in all, two chunks, several rounds.
  for (const auto [N, bs, R] : {std::array<int64_t, 3>{37, 8, 3}, {6, 8, 1}, {16, 8, 1}, {64, 16, 2}}) {
    for (const bool causal : {false, true}) {
      const int64_t B = 2, H = 3, D = 16, Dv = 12;
      const at::Tensor qk = at::randn({B, H, N, D}, at::kDouble), v = at::randn({B, H, N, Dv}, at::kDouble);
      const at::Tensor rotations = at::randn({H, D, R, 2}, at::kDouble);
      const at::Tensor key_mask = at::rand({B, N}) > 0.2;
      auto [out, lse, buckets] =
          d::lsh_forward_sorted(engine, qk, v, rotations, bs, causal, key_mask, 0.0, std::nullopt);
      auto [want_out, want_lse, want_buckets] =
          cpu_forward.call(qk, v, rotations, bs, causal, key_mask, 0.0, std::nullopt);
      CHECK(at::equal(buckets, want_buckets));
      CHECK(max_err(out, want_out) < 1e-10);
      CHECK(max_err(lse, want_lse) < 1e-9);
      const at::Tensor grad_out = at::randn({B, H, N, Dv}, at::kDouble);
      auto [dqk, dv] = d::lsh_backward_sorted(engine, grad_out, qk, v, rotations, want_out, want_lse, bs,
                                              causal, key_mask, 0.0, std::nullopt);
      auto [want_dqk, want_dv] = cpu_backward.call(grad_out, qk, v, rotations, want_out, want_lse, bs, causal,
                                                   key_mask, 0.0, std::nullopt);
      CHECK(max_err(dqk, want_dqk) < 1e-9);
      CHECK(max_err(dv, want_dv) < 1e-9);
    }
  }
}
