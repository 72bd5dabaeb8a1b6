#pragma once
// Attention kinds beyond dense softmax attention, and positional helpers.
// Each is also a Torch op (torch.ops.attnzoo.<name>); semantics in docs/design.md section 5.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace attnzoo::ops {

// Rotary position embedding of x (..., N, D): pairs of features rotated by
// (position + offset) * base^(-2i/rotary_dim). Half-split pairs (i, i+rd/2)
// as in GPT-NeoX/LLaMA by default, adjacent pairs (2i, 2i+1) as in GPT-J when
// interleaved. positions: (N,) or (B, N) integers; default 0..N-1. Features
// past rotary_dim pass through.
at::Tensor rotary(const at::Tensor& x, const std::optional<at::Tensor>& positions = std::nullopt,
                  int64_t offset = 0, double base = 10000.0, std::optional<int64_t> rotary_dim = std::nullopt,
                  bool interleaved = false);

// Linformer: k and v are projected along the sequence with E[:, :Nk] and
// F[:, :Nk] (F defaults to E; both (Kp, Nmax)); keys whose key_mask (B, Nk)
// is false are zeroed before the projection. causal=true is refused.
at::Tensor linformer_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& E, const std::optional<at::Tensor>& F = std::nullopt,
                               const std::optional<at::Tensor>& key_mask = std::nullopt,
                               double dropout_p = 0.0, std::optional<double> scale = std::nullopt,
                               bool causal = false);

// Attention over a block layout: layout bool (H or 1, ceil(Nq/bs),
// ceil(Nk/bs)); only blocks marked true are computed, so the cost grows with
// their number. Builders: attnzoo::layouts.
at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& layout, int64_t block_size, bool causal = false,
                                  const std::optional<at::Tensor>& mask = std::nullopt,
                                  double dropout_p = 0.0, std::optional<double> scale = std::nullopt);

// Shaw et al. relative positions: with r = clamp(j - p_i, -K, K) + K and
// K = max_distance, score = (q_i.k_j + q_i.rel_k[r]) * scale and
// out_i = sum_j p_ij (v_j + rel_v[r]). rel_k (2K+1, D) or (H, 2K+1, D);
// rel_v likewise with Dv, or none. Computed inside the fused kernel.
at::Tensor shaw_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& rel_k, const std::optional<at::Tensor>& rel_v,
                          int64_t max_distance, const std::optional<at::Tensor>& mask = std::nullopt,
                          bool causal = false, double dropout_p = 0.0,
                          std::optional<double> scale = std::nullopt);

// Reformer shared-QK LSH attention, as reformer-pytorch's LSHAttention given
// the same rotations (D, n_hashes, n_buckets/2) or (H, D, n_hashes,
// n_buckets/2): buckets = argmax([xR, -xR]) per round, sort by (round, bucket,
// position), chunks of bucket_size attend to themselves and the chunk before
// (circularly), keys L2-normalised, logits scaled by D^-1/2, self allowed
// only as a last resort (logit -5e4), causal by original positions, rounds
// combined by their log-sum-exp. Any N (padded internally). Returns
// (out (B,H,N,Dv), buckets (B,H,n_hashes,N) int64).
std::tuple<at::Tensor, at::Tensor> lsh_attention(const at::Tensor& qk, const at::Tensor& v,
                                                 const at::Tensor& rotations, int64_t bucket_size,
                                                 bool causal = false,
                                                 const std::optional<at::Tensor>& key_mask = std::nullopt,
                                                 double dropout_p = 0.0);

// Longformer self-attention, exact at token level: query i sees keys j with
// |i - j| <= window and every global token; global tokens' queries see every
// key. global_tokens: 1-D positions; key_mask (B, N).
at::Tensor longformer_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                                const at::Tensor& global_tokens,
                                const std::optional<at::Tensor>& key_mask = std::nullopt,
                                double dropout_p = 0.0, std::optional<double> scale = std::nullopt);

// Kernelised linear attention, phi(q) (sum_j phi(k_j) v_j^T) / (phi(q) . sum_j
// phi(k_j)), feature map "elu+1" or "relu"; causal by chunked prefix sums.
at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            c10::string_view feature_map = "elu+1", bool causal = false,
                            const std::optional<at::Tensor>& key_mask = std::nullopt);

}  // namespace attnzoo::ops
