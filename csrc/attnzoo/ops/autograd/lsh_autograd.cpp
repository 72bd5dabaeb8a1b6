// Autograd of attnzoo::lsh_attention: the forward saves (qk, v, rotations,
// out, lse), the key mask and the dropout seed; the backward
// (attnzoo::_lsh_backward) redoes the hashing and each chunk's
// probabilities. A plain Node, as in attention_autograd.cpp, so torch.func
// transforms accept it. The buckets are not differentiable.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "attnzoo/ops/autograd/autograd_support.h"
#include "attnzoo/ops/lsh_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::OptTensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

struct LshBackward : torch::autograd::Node {
  // What the backward reads.
  SavedVariable qk, v, rotations, out, lse, key_mask;
  bool has_key_mask = false;
  int64_t bucket_size = 0;
  bool causal = false;
  double dropout_p = 0.0;
  at::Tensor seed;  // undefined without dropout

  std::string name() const override { return "LshBackward"; }

  variable_list apply(variable_list&& grads) override {
    static const auto op = detail::op_handle<detail::LshBackwardSig>("attnzoo::_lsh_backward");
    const auto self = detail::self_of(this);
    const at::Tensor out_ = out.unpack(self);
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(out_);
    const at::Tensor qk_ = qk.unpack(self), v_ = v.unpack(self);
    at::Tensor dqk, dv;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dqk, dv) = op.call(grad, qk_, v_, rotations.unpack(self), out_, lse.unpack(self), bucket_size,
                                  causal, has_key_mask ? OptTensor(key_mask.unpack(self)) : std::nullopt,
                                  dropout_p, detail::optional_of(seed));
    }
    return detail::once_differentiable("lsh_attention", {dqk, dv},
                                       {qk_, v_, grad});  // the edges are qk and v
  }

  void release_variables() override {
    qk.reset_data(), v.reset_data(), rotations.reset_data(), out.reset_data(), lse.reset_data();
    key_mask.reset_data();
    seed.reset();
  }
};

// The Autograd kernel of attnzoo::lsh_attention.
detail::Tensor2 lsh_attention_autograd(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                       int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                       double dropout_p) {
  static const auto forward_op = detail::op_handle<detail::LshForwardSig>("attnzoo::_lsh_forward");
  detail::refuse_forward_ad("lsh_attention", {qk, v});
  const at::Tensor seed = dropout_p > 0 ? detail::fresh_seed() : at::Tensor();
  at::Tensor out, lse, buckets;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, lse, buckets) = forward_op.call(qk, v, rotations, bucket_size, causal, key_mask, dropout_p,
                                                  detail::optional_of(seed));
  }
  if (torch::autograd::compute_requires_grad(qk, v)) {
    auto node = detail::make_node<LshBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(qk, v));
    node->qk = SavedVariable(qk, false);
    node->v = SavedVariable(v, false);
    node->rotations = SavedVariable(rotations, false);
    node->has_key_mask = given(key_mask);
    if (node->has_key_mask) node->key_mask = SavedVariable(*key_mask, false);
    node->bucket_size = bucket_size;
    node->causal = causal;
    node->dropout_p = dropout_p;
    node->seed = seed;
    torch::autograd::set_history(out, node);
    node->out = SavedVariable(out, /*is_output=*/true);
    node->lse = SavedVariable(lse, false);  // not an output of the public op
  }
  return {out, buckets};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) {
  m.impl("lsh_attention", &lsh_attention_autograd);
  m.impl("_lsh_forward", detail::not_differentiable());
  m.impl("_lsh_backward", detail::not_differentiable());
}

}  // namespace attnzoo::ops
