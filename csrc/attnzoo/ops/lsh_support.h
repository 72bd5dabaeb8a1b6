#pragma once
// What the LSH op files share (not installed): signatures and the checks.
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops::detail {

// lsh_attention(qk, v, rotations, bucket_size, *, causal, key_mask, dropout_p) -> (out, buckets)
using LshSig = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                       const OptTensor&, double);
// _lsh_forward(..., seed) -> (out, lse, buckets)
using LshForwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                              const OptTensor&, double, const OptTensor&);
// _lsh_backward(grad_out, qk, v, rotations, out, lse, bucket_size, *, causal, key_mask, dropout_p, seed)
using LshBackwardSig = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, int64_t, bool, const OptTensor&, double,
                               const OptTensor&);

template <class Int>
struct LshShapes {
  Int B, H, N, D, Dv, R, n_buckets;
};

// Every check of lsh_attention's arguments, for the CPU kernels (plain sizes)
// and the meta kernels (symbolic sizes).
template <class Int>
LshShapes<Int> check_lsh(const char* op, const at::Tensor& qk, const at::Tensor& v,
                         const at::Tensor& rotations, int64_t bucket_size, const OptTensor& key_mask,
                         double dropout_p);
// The backward's own arguments: grad_out and out (B, H, N, Dv), lse (B, H, N).
template <class Int>
void check_lsh_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                        const at::Tensor& lse, const LshShapes<Int>& s);

// lsh_attention below autograd (inference, or nothing needs a gradient): a
// device's _lsh_forward with a seed drawn here, its lse dropped.
template <class Forward>
Tensor2 lsh_attention_with_fresh_seed(Forward forward, const at::Tensor& qk, const at::Tensor& v,
                                      const at::Tensor& rotations, int64_t bucket_size, bool causal,
                                      const OptTensor& key_mask, double dropout_p) {
  const OptTensor seed = dropout_p > 0 ? OptTensor(fresh_seed()) : std::nullopt;
  auto [out, lse, buckets] = forward(qk, v, rotations, bucket_size, causal, key_mask, dropout_p, seed);
  return {out, buckets};
}

// --- LSH over an engine that attends over sorted rows ----------------------
// The CUDA path (cuda/attention_cuda.cpp) hashes, sorts and merges rounds in
// ATen (lsh_attention.cpp) around one engine call over the sorted rows of
// every round; the C++ tests run the same code around a dense reference.

// reformer-pytorch's logit for a query attending to its own position.
constexpr double kLshSelfLogit = -5e4;

// The sorted rows of all rounds (L = rounds x Np, Np the padded length).
struct LshRows {
  at::Tensor q, k, v;    // (B, H, L, D / D / Dv), in qk's dtype; k is L2-normalised
  at::Tensor keep;       // (B, H, 1, L) bool: the key mask, padding keys false
  at::Tensor layout;     // (1, chunks, chunks) bool: chunk g sees chunks g and g - 1 (circularly)
  at::Tensor positions;  // (B, H, L) int64: original position of each row
  int64_t positions_len = 0, bucket_size = 0;
  bool causal = false;
  double dropout_p = 0.0;
  OptTensor seed;
};

// Attention over sorted rows with Reformer's rules: a query sees the keys of
// its own and the previous chunk that the key mask keeps (and, with causal,
// that do not stand after it); its own position scores kLshSelfLogit (a
// constant, even where masked); scale 1/sqrt(D); dropout keyed by (b, h,
// round, query position, key position) over positions_len.
struct LshRowsEngine {
  virtual ~LshRowsEngine() = default;
  // out (B, H, L, Dv) in q's dtype and lse (B, H, L) in the compute type.
  virtual Tensor2 forward(const LshRows& rows) const = 0;
  // dq, dk, dv in the compute type, for grad_out rows and grad_lse rows
  // given the forward's out and lse.
  virtual Tensor3 backward(const LshRows& rows, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                           const at::Tensor& out, const at::Tensor& lse) const = 0;
};

// _lsh_forward and _lsh_backward through an engine over sorted rows.
Tensor3 lsh_forward_sorted(const LshRowsEngine& engine, const at::Tensor& qk, const at::Tensor& v,
                           const at::Tensor& rotations, int64_t bucket_size, bool causal,
                           const OptTensor& key_mask, double dropout_p, const OptTensor& seed);
Tensor2 lsh_backward_sorted(const LshRowsEngine& engine, const at::Tensor& grad_out, const at::Tensor& qk,
                            const at::Tensor& v, const at::Tensor& rotations, const at::Tensor& out,
                            const at::Tensor& lse, int64_t bucket_size, bool causal,
                            const OptTensor& key_mask, double dropout_p, const OptTensor& seed);

}  // namespace attnzoo::ops::detail
