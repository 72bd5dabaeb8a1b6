// The dense attention op from C++: against a float64 reference written here
// (matmul + softmax with an explicit mask), gradients through the C++
// autograd, and the errors that bad arguments give.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <catch2/catch.hpp>
#include <thread>

#include "attnzoo/attnzoo.h"

using attnzoo::ops::AttentionOptions;

namespace {

// Reference in float64: scores, explicit bool visibility, softmax, output;
// rows with no visible key give 0.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     std::optional<std::array<int64_t, 2>> window, const at::Tensor& bias) {
  auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  const int64_t H = q.size(1), Hkv = k.size(1), Nq = q.size(2), Nk = k.size(2);
  kd = kd.repeat_interleave(H / Hkv, 1);
  vd = vd.repeat_interleave(H / Hkv, 1);
  auto s = at::matmul(qd, kd.transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  if (bias.defined()) s = s + bias.to(at::kDouble);
  auto pos = at::arange(Nq, at::kLong).unsqueeze(1) + (Nk - Nq);
  auto j = at::arange(Nk, at::kLong).unsqueeze(0);
  auto allowed = at::ones({Nq, Nk}, at::kBool);
  if (causal) allowed = allowed & (j <= pos);
  if (window) allowed = allowed & (j >= pos - (*window)[0]) & (j <= pos + (*window)[1]);
  s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  auto p = at::softmax(s, -1).nan_to_num(0.0);
  return at::matmul(p, vd);
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("attention matches the float64 reference", "[attention]") {
  at::manual_seed(1234);
  struct Case {
    int64_t B, H, Hkv, Nq, Nk, D;
    bool causal;
    std::optional<std::array<int64_t, 2>> window;
  };
  const Case cases[] = {
      {2, 4, 4, 77, 77, 32, false, std::nullopt},
      {1, 4, 2, 33, 300, 16, true, std::nullopt},
      {2, 2, 1, 130, 70, 24, false, std::nullopt},
      {1, 3, 3, 260, 260, 8, false, std::array<int64_t, 2>{17, 5}},
      {1, 2, 2, 100, 40, 16, true, std::nullopt},    // Nq > Nk: the first rows see nothing
      {1, 2, 1, 900, 1200, 16, true, std::nullopt},  // several blocks in every pass
  };
  for (const auto& c : cases) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto q = at::randn({c.B, c.H, c.Nq, c.D}, dtype);
      auto k = at::randn({c.B, c.Hkv, c.Nk, c.D}, dtype);
      auto v = at::randn({c.B, c.Hkv, c.Nk, c.D + 3}, dtype);
      auto bias = at::randn({c.H, c.Nq, c.Nk}, dtype);
      auto out =
          attnzoo::ops::attention(q, k, v, AttentionOptions().causal(c.causal).window(c.window).bias(bias));
      auto ref = reference(q, k, v, c.causal, c.window, bias);
      INFO("B=" << c.B << " H=" << c.H << " Nq=" << c.Nq << " Nk=" << c.Nk << " dtype=" << dtype);
      REQUIRE(out.sizes() == ref.sizes());
      REQUIRE(max_err(out, ref) < (dtype == at::kFloat ? 2e-5 : 1e-12));
      REQUIRE(!out.isnan().any().item<bool>());
    }
  }
}

TEST_CASE("attention gradients match the reference's", "[attention][autograd]") {
  at::manual_seed(7);
  auto q = at::randn({2, 4, 45, 16}, at::kDouble).requires_grad_();
  auto k = at::randn({2, 2, 150, 16}, at::kDouble).requires_grad_();
  auto v = at::randn({2, 2, 150, 12}, at::kDouble).requires_grad_();
  auto bias = at::randn({1, 4, 45, 150}, at::kDouble).requires_grad_();
  auto grad = at::randn({2, 4, 45, 12}, at::kDouble);
  auto out = attnzoo::ops::attention(q, k, v, AttentionOptions().causal(true).bias(bias));
  auto got = torch::autograd::grad({out}, {q, k, v, bias}, {grad});
  auto ref = reference(q, k, v, true, std::nullopt, bias);
  auto want = torch::autograd::grad({ref}, {q, k, v, bias}, {grad});
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("input " << i);
    REQUIRE(max_err(got[i], want[i]) < 1e-10);
  }
}

TEST_CASE("fully masked rows give zeros, never NaN", "[attention]") {
  auto q = at::randn({1, 2, 8, 4});
  auto k = at::randn({1, 2, 8, 4});
  auto v = at::randn({1, 2, 8, 4});
  auto mask = at::ones({8, 8}, at::kBool);
  mask.index_put_({3}, false);
  auto [out, lse] = attnzoo::ops::attention_with_lse(q, k, v, AttentionOptions().mask(mask));
  REQUIRE(out.select(2, 3).abs().max().item<float>() == 0.0f);
  REQUIRE(std::isinf(lse[0][0][3].item<float>()));
  REQUIRE(!out.isnan().any().item<bool>());
}

TEST_CASE("bad arguments raise errors that name them", "[attention][errors]") {
  auto q = at::randn({1, 4, 8, 16});
  auto k = at::randn({1, 2, 8, 16});
  auto v = at::randn({1, 2, 8, 16});
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q[0], k, v), Contains("q must have shape"));
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q, at::randn({1, 3, 8, 16}), at::randn({1, 3, 8, 16})),
                      Contains("multiple of the heads"));
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q, at::randn({1, 2, 8, 8}), v), Contains("head dim D"));
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q, k, v, AttentionOptions().mask(at::ones({8, 9}, at::kBool))),
                      Contains("mask of shape (8, 9)"));
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q, k, v, AttentionOptions().scale(std::nan(""))),
                      Contains("scale must be finite"));
  REQUIRE_THROWS_WITH(attnzoo::ops::attention(q.to(at::kInt), k.to(at::kInt), v.to(at::kInt)),
                      Contains("q must be float32"));
  REQUIRE_THROWS_WITH(attnzoo::ops::alibi_slopes(0), Contains("num_heads"));
}

TEST_CASE("alibi slopes follow the paper", "[attention][alibi]") {
  auto s8 = attnzoo::ops::alibi_slopes(8);
  for (int i = 0; i < 8; ++i) REQUIRE(s8[i].item<float>() == Approx(std::pow(2.0, -(i + 1))));
  auto s6 = attnzoo::ops::alibi_slopes(6);  // 4 geometric + slopes 0 and 2 of the 8-head set
  for (int i = 0; i < 4; ++i) REQUIRE(s6[i].item<float>() == Approx(std::pow(2.0, -2 * (i + 1))));
  REQUIRE(s6[4].item<float>() == Approx(0.5));
  REQUIRE(s6[5].item<float>() == Approx(0.125));
}

TEST_CASE("T5 bias in the kernel equals the explicit bias", "[attention][t5]") {
  at::manual_seed(3);
  const int64_t H = 3, Nq = 70, Nk = 600;
  auto q = at::randn({2, H, Nq, 16}, at::kDouble).requires_grad_();
  auto k = at::randn({2, H, Nk, 16}, at::kDouble);
  auto v = at::randn({2, H, Nk, 16}, at::kDouble);
  auto table = at::randn({32, H}, at::kDouble).requires_grad_();
  auto out = attnzoo::ops::attention(
      q, k, v, AttentionOptions().t5_table(table).t5_bidirectional(false).causal(true).scale(1.0));
  auto rel = at::arange(Nk, at::kLong).unsqueeze(0) - (at::arange(Nq, at::kLong).unsqueeze(1) + (Nk - Nq));
  auto buckets = attnzoo::ops::t5_relative_bucket(rel, false, 32, 128);
  auto bias = table.index({buckets}).permute({2, 0, 1});          // (H, Nq, Nk)
  auto ref = reference(q * 4.0, k, v, true, std::nullopt, bias);  // scale 1 = (4q) / sqrt(16)
  REQUIRE(max_err(out, ref) < 1e-12);
  auto grad = at::randn_like(out);
  auto got = torch::autograd::grad({out}, {table}, {grad});
  auto want = torch::autograd::grad({ref}, {table}, {grad});
  REQUIRE(max_err(got[0], want[0]) < 1e-10);
}

TEST_CASE("the ops are safe to call from several threads at once", "[attention][threads]") {
  at::manual_seed(9);
  const int kThreads = 4;
  std::vector<at::Tensor> qs, ks, vs, serial(kThreads), parallel(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    qs.push_back(at::randn({1, 4, 300 + 50 * t, 32}));
    ks.push_back(at::randn({1, 2, 400, 32}));
    vs.push_back(at::randn({1, 2, 400, 32}));
  }
  auto run = [&](int t) {
    auto opts = AttentionOptions().causal(t % 2 == 0).alibi_slopes(attnzoo::ops::alibi_slopes(4));
    return attnzoo::ops::attention(qs[t], ks[t], vs[t], opts);
  };
  for (int t = 0; t < kThreads; ++t) serial[t] = run(t);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep) parallel[t] = run(t);
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) REQUIRE(at::equal(serial[t], parallel[t]));
}
