#pragma once
// What the causal linear attention files share (not installed): the fused
// core's signatures and checks. On the CPU linear_attention
// (attention_variants.cpp) calls the core, attnzoo::_causal_linear(q, k, v,
// feature_map): forward in cpu/linear_cpu.cpp, autograd in
// autograd/linear_autograd.cpp. The core applies the feature map per chunk
// (no feature-mapped copy of q and k); with a key mask or GQA, ATen maps,
// masks and repeats first and the core gets feature_map = kFeatureMapNone.
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops::detail {

// Chunk length of causal linear attention: within a chunk an explicit C x C
// product, across chunks a running D x Dv state. And the denominator's eps.
constexpr int64_t kLinearChunk = 64;
constexpr double kLinearEps = 1e-6;

// The feature map the core applies to q and k: none (already mapped),
// elu(x) + 1, or relu(x).
constexpr int64_t kFeatureMapNone = 0, kFeatureMapElu1 = 1, kFeatureMapRelu = 2;

// _causal_linear(q, k, v, feature_map) -> out: q, k (B, H, N, D), v (B, H, N, Dv).
using CausalLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
// _causal_linear_backward(grad_out, q, k, v, feature_map) -> (grad_q, grad_k, grad_v)
using CausalLinearBackwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, int64_t);

// The core's arguments (CPU kernels: plain sizes; meta kernels: symbolic).
template <class Int>
void check_causal_linear(const char* op, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                         int64_t feature_map);

}  // namespace attnzoo::ops::detail
