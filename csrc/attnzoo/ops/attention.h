#pragma once
// Fused attention: the C++ entry points. They go through the Torch dispatcher
// (torch.ops.attnzoo.*), so autograd works from C++ as well.
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <array>
#include <optional>
#include <tuple>

namespace attnzoo::ops {

// (left, right): key j is visible from query position p iff p - left <= j <= p + right.
using AttentionWindow = std::array<int64_t, 2>;

// Every option of attnzoo::attention, once: X(name, C++ type, default).
// AttentionOptions below, the op's schema (registration.cpp), the dispatcher
// calls, the kernels and the autograd node are all made from this list, so an
// option added here reaches each of them (docs/design.md, "The op arguments").
//
//   mask              bool, broadcastable to (B, H, Nq, Nk); true = may attend.
//   bias              float, broadcastable to (B, H, Nq, Nk), added to the
//                     scaled scores; differentiable (its gradient is summed
//                     over broadcast dimensions).
//   causal            bottom-right aligned: query i stands at position i + Nk - Nq.
//   window            (left, right) band around each query's position.
//   alibi_slopes      (H,) or (B, H); adds -slope * |p_i - j|.
//   dropout_p         dropout on the probabilities (counter-based, regenerated
//                     by the backward from one seed).
//   scale             defaults to 1/sqrt(D).
//   t5_table          T5 relative position bias (num_buckets, H): adds
//                     table[t5_relative_bucket(j - p_i), h] inside the kernel;
//                     differentiable. (T5 itself uses scale 1.0.)
//   t5_bidirectional, t5_max_distance   T5's bucketing.
//   layout            block-sparse layout, bool (H or 1, ceil(Nq/block_size),
//                     ceil(Nk/block_size)) or (B or 1, H or 1, ...): only
//                     marked blocks are computed.
//   block_size        the layout's block size.
//   block_mask_index  int32, the layout's shape: -1 where a marked block is
//                     computed whole, p >= 0 where block_masks[p] masks it
//                     (FlexAttention's partial blocks; attnzoo.flex_attention).
//   block_masks       bool (P, block_size, block_size), true = may attend.
//   shaw_k, shaw_v    Shaw relative keys (2K+1, D) or (H, 2K+1, D) and values
//                     (2K+1, Dv) or (H, 2K+1, Dv), K = shaw_max_distance;
//                     differentiable. Not combinable with a layout.
// One option per line (clang-format would join them).
// clang-format off
#define ATTNZOO_ATTENTION_OPTIONS(X)                                      \
  X(mask, std::optional<at::Tensor>, std::nullopt)                        \
  X(bias, std::optional<at::Tensor>, std::nullopt)                        \
  X(causal, bool, false)                                                  \
  X(window, std::optional<::attnzoo::ops::AttentionWindow>, std::nullopt) \
  X(alibi_slopes, std::optional<at::Tensor>, std::nullopt)                \
  X(dropout_p, double, 0.0)                                               \
  X(scale, std::optional<double>, std::nullopt)                           \
  X(t5_table, std::optional<at::Tensor>, std::nullopt)                    \
  X(t5_bidirectional, bool, true)                                         \
  X(t5_max_distance, int64_t, 128)                                        \
  X(layout, std::optional<at::Tensor>, std::nullopt)                      \
  X(block_size, int64_t, 0)                                               \
  X(block_mask_index, std::optional<at::Tensor>, std::nullopt)            \
  X(block_masks, std::optional<at::Tensor>, std::nullopt)                 \
  X(shaw_k, std::optional<at::Tensor>, std::nullopt)                      \
  X(shaw_v, std::optional<at::Tensor>, std::nullopt)                      \
  X(shaw_max_distance, int64_t, 0)
// clang-format on

// The options of attention() and attention_weights(), set by chained calls:
//   auto out = attnzoo::ops::attention(q, k, v, AttentionOptions().causal(true).bias(b));
struct AttentionOptions {
  using Window = AttentionWindow;
#define ATTNZOO_DECLARE_OPTION(name, T, default_value) TORCH_ARG(T, name) = default_value;
  ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_DECLARE_OPTION)
#undef ATTNZOO_DECLARE_OPTION
};

// softmax(scale * q k^T + modifiers, masked) v, with q (B,H,Nq,D),
// k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv); returns (B,H,Nq,Dv).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options = {});

// The same, also returning the row log-sum-exp (B,H,Nq): float32 for float32
// and bfloat16 inputs, float64 for float64 inputs; -inf for rows that see no key.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const AttentionOptions& options = {});

// The (B,H,Nq,Nk) attention probabilities, for inspection and plots: not
// differentiable (the result does not require grad), and it materialises
// Nq x Nk, which attention() never does.
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

// Whether bfloat16 inputs run on the engine's bfloat16 passes on this CPU
// (products in bfloat16 with float accumulation) rather than in float:
// needs AVX512-BF16 or AMX, and ATTNZOO_CPU_BF16 unset or not "0".
bool cpu_bf16_engine();

}  // namespace attnzoo::ops
