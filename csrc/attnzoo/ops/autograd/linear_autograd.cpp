// Autograd of attnzoo::_causal_linear, the fused core of causal
// linear_attention: the forward saves its inputs (q, k, v; feature-mapped in
// the core or before it) and the backward (attnzoo::_causal_linear_backward)
// recomputes each chunk from them. A plain
// Node, as in attention_autograd.cpp, so torch.func transforms accept it.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "attnzoo/ops/autograd/autograd_support.h"
#include "attnzoo/ops/linear_support.h"

namespace attnzoo::ops {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

struct CausalLinearBackward : torch::autograd::Node {
  SavedVariable fq, fk, v;
  int64_t feature_map = 0;

  std::string name() const override { return "CausalLinearBackward"; }

  variable_list apply(variable_list&& grads) override {
    static const auto op =
        detail::op_handle<detail::CausalLinearBackwardSig>("attnzoo::_causal_linear_backward");
    const auto self = detail::self_of(this);
    const at::Tensor q_ = fq.unpack(self), k_ = fk.unpack(self), v_ = v.unpack(self);
    if (!grads[0].defined()) return {at::zeros_like(q_), at::zeros_like(k_), at::zeros_like(v_)};
    at::Tensor dq, dk, dv;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dq, dk, dv) = op.call(grads[0], q_, k_, v_, feature_map);
    }
    // the edges are q, k and v
    return detail::once_differentiable("linear_attention", {dq, dk, dv}, {q_, k_, v_, grads[0]});
  }

  void release_variables() override { fq.reset_data(), fk.reset_data(), v.reset_data(); }
};

// The Autograd kernel of attnzoo::_causal_linear.
at::Tensor causal_linear_autograd(const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                                  int64_t feature_map) {
  static const auto op = detail::op_handle<detail::CausalLinearSig>("attnzoo::_causal_linear");
  detail::refuse_forward_ad("linear_attention", {fq, fk, v}, " for causal=True");
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(fq, fk, v, feature_map);
  }
  if (torch::autograd::compute_requires_grad(fq, fk, v)) {
    auto node = detail::make_node<CausalLinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(fq, fk, v));
    node->fq = SavedVariable(fq, false);
    node->fk = SavedVariable(fk, false);
    node->v = SavedVariable(v, false);
    node->feature_map = feature_map;
    torch::autograd::set_history(out, node);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) {
  m.impl("_causal_linear", &causal_linear_autograd);
  m.impl("_causal_linear_backward", detail::not_differentiable());
}

}  // namespace attnzoo::ops
