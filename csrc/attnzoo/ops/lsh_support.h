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

}  // namespace attnzoo::ops::detail
