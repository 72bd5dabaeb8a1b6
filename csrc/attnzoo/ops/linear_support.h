#pragma once
// What the causal linear attention files share (not installed): the fused
// core's signatures and checks. linear_attention (attention_variants.cpp)
// applies the feature map, the key mask and GQA in ATen, then calls the core
// on the CPU: attnzoo::_causal_linear(fq, fk, v), forward in
// cpu/linear_cpu.cpp, autograd in autograd/linear_autograd.cpp.
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops::detail {

// Chunk length of causal linear attention: within a chunk an explicit C x C
// product, across chunks a running D x Dv state. And the denominator's eps.
constexpr int64_t kLinearChunk = 64;
constexpr double kLinearEps = 1e-6;

// _causal_linear(fq, fk, v) -> out: fq, fk (B, H, N, D) feature-mapped, v (B, H, N, Dv).
using CausalLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
// _causal_linear_backward(grad_out, fq, fk, v) -> (grad_fq, grad_fk, grad_v)
using CausalLinearBackwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&);

// The core's arguments (CPU kernels: plain sizes; meta kernels: symbolic).
template <class Int>
void check_causal_linear(const char* op, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v);

}  // namespace attnzoo::ops::detail
