#pragma once
// Fused dense attention: the C++ entry points. They go through the Torch
// dispatcher (torch.ops.attnzoo.*), so autograd works from C++ as well.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <array>
#include <optional>
#include <tuple>

namespace attnzoo::ops {

// Options of attention() and attention_weights(); see DESIGN.md section 4.
//   auto out = attnzoo::ops::attention(q, k, v, AttentionOptions().causal(true));
struct AttentionOptions {
  using Window = std::array<int64_t, 2>;
  // bool, broadcastable to (B, H, Nq, Nk); true = may attend.
  TORCH_ARG(std::optional<at::Tensor>, mask) = std::nullopt;
  // float, broadcastable to (B, H, Nq, Nk), added to the scaled scores;
  // differentiable (its gradient is summed over broadcast dimensions).
  TORCH_ARG(std::optional<at::Tensor>, bias) = std::nullopt;
  // Bottom-right aligned: query i stands at position i + Nk - Nq.
  TORCH_ARG(bool, causal) = false;
  // (left, right): key j visible iff p_i - left <= j <= p_i + right.
  TORCH_ARG(std::optional<Window>, window) = std::nullopt;
  // (H,) or (B, H); adds -slope * |p_i - j|.
  TORCH_ARG(std::optional<at::Tensor>, alibi_slopes) = std::nullopt;
  TORCH_ARG(double, dropout_p) = 0.0;
  // Defaults to 1/sqrt(D).
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
  // T5 relative position bias: table (num_buckets, H); adds
  // table[t5_relative_bucket(j - p_i), h] inside the kernel; differentiable.
  // (T5 itself uses scale 1.0.)
  TORCH_ARG(std::optional<at::Tensor>, t5_table) = std::nullopt;
  TORCH_ARG(bool, t5_bidirectional) = true;
  TORCH_ARG(int64_t, t5_max_distance) = 128;
};

// softmax(scale * q k^T + bias + alibi, masked) v, with q (B,H,Nq,D),
// k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv); returns (B,H,Nq,Dv).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options = {});

// The same, also returning the row log-sum-exp (B,H,Nq): float32 for float32
// and bfloat16 inputs, float64 for float64 inputs; -inf for rows that see no key.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const AttentionOptions& options = {});

// The (B,H,Nq,Nk) attention probabilities, for inspection and plots (not
// differentiable; it materialises Nq x Nk, which attention() never does).
at::Tensor attention_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& options = {});

// T5's bucket of each relative position (memory - query), exactly as HF
// transformers' T5Attention._relative_position_bucket. Returns int64.
at::Tensor t5_relative_bucket(const at::Tensor& relative_position, bool bidirectional = true,
                              int64_t num_buckets = 32, int64_t max_distance = 128);

// The ALiBi paper's slopes for num_heads heads (float32, shape (num_heads,)).
at::Tensor alibi_slopes(int64_t num_heads);

// Name of the engine build chosen for this CPU ("DEFAULT", "AVX2", "AVX512").
const char* engine_isa();

}  // namespace attnzoo::ops
