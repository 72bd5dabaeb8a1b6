// Autograd of attnzoo::attention: the forward saves (q, k, v, out, lse), the
// options and the dropout seed; the backward (attnzoo::_attention_backward)
// recomputes the probabilities tile by tile from the log-sum-exp. Nothing
// N x N is stored.
//
// The node is a plain torch::autograd::Node registered from the op's Autograd
// kernel, as ATen's own ops do, rather than a torch::autograd::Function: that
// keeps it usable under torch.func transforms (grad, vjp, jacrev), which
// refuse C++ Functions.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "attnzoo/ops/autograd/autograd_support.h"
#include "attnzoo/ops/longformer_support.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::OptTensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// An option as the node keeps it: tensors as SavedVariables (so that an
// in-place change before the backward is caught), the rest by value.
template <class T>
struct Saved {
  T value;
  void save(const T& v) { value = v; }
  T load(const detail::NodePtr&) const { return value; }
  void release() {}
};
template <>
struct Saved<OptTensor> {
  SavedVariable variable;
  bool present = false;
  void save(const OptTensor& t) {
    present = given(t);
    if (present) variable = SavedVariable(*t, /*is_output=*/false);
  }
  OptTensor load(const detail::NodePtr& node) const {
    return present ? OptTensor(variable.unpack(node)) : std::nullopt;
  }
  void release() { variable.reset_data(); }
};

// Every option, saved: one member per entry of ATTNZOO_ATTENTION_OPTIONS.
struct SavedOptions {
#define ATTNZOO_SAVED_MEMBER(name, T, default_value) Saved<T> name;
  ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_SAVED_MEMBER)
#undef ATTNZOO_SAVED_MEMBER

  void save(const AttentionOptions& o) {
#define ATTNZOO_SAVE(name, T, default_value) name.save(o.name());
    ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_SAVE)
#undef ATTNZOO_SAVE
  }
  AttentionOptions load(const detail::NodePtr& node) const {
    AttentionOptions o;
#define ATTNZOO_LOAD(name, T, default_value) o.name(name.load(node));
    ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_LOAD)
#undef ATTNZOO_LOAD
    return o;
  }
  void release() {
#define ATTNZOO_RELEASE(name, T, default_value) name.release();
    ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_RELEASE)
#undef ATTNZOO_RELEASE
  }
};

// The differentiable inputs, in the order of the node's edges and of
// _attention_backward's results. The option gradients follow output_mask's
// order: bias, t5_table, shaw_k, shaw_v.
std::vector<at::Tensor> differentiable_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const AttentionOptions& o) {
  auto or_undefined = [](const OptTensor& t) { return given(t) ? *t : at::Tensor(); };
  return {q,
          k,
          v,
          or_undefined(o.bias()),
          or_undefined(o.t5_table()),
          or_undefined(o.shaw_k()),
          or_undefined(o.shaw_v())};
}

struct AttentionBackward : torch::autograd::Node {
  // What the backward reads.
  SavedVariable q, k, v, out, lse;
  SavedOptions saved_options;
  at::Tensor seed;  // undefined without dropout; made by the forward, not an input

  std::string name() const override { return "AttentionBackward"; }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_op = detail::op_handle<detail::BackwardSig>("attnzoo::_attention_backward");
    const auto self = detail::self_of(this);
    const at::Tensor q_ = q.unpack(self), k_ = k.unpack(self), v_ = v.unpack(self);
    const at::Tensor out_ = out.unpack(self), lse_ = lse.unpack(self);
    const AttentionOptions options = saved_options.load(self);
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out_);
    const OptTensor grad_lse = detail::optional_of(grads[1]);
    // An option gradient is computed when its edge leads somewhere.
    const detail::OptionGradMask wanted = {task_should_compute_output(3), task_should_compute_output(4),
                                           task_should_compute_output(5), task_should_compute_output(6)};
    variable_list result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [dq, dk, dv, dbias, dtable, dshaw_k, dshaw_v] =
          backward_op.call(grad_out, grad_lse, q_, k_, v_, out_, lse_ ATTNZOO_OPTION_VALUES,
                           detail::optional_of(seed), wanted);
      result = {dq, dk, dv, dbias, dtable, dshaw_k, dshaw_v};
    }
    for (size_t i = 3; i < result.size(); ++i)
      if (!wanted[i - 3]) result[i] = at::Tensor();
    std::vector<at::Tensor> depends = differentiable_inputs(q_, k_, v_, options);
    depends.push_back(grad_out);
    return detail::once_differentiable("attention", std::move(result), depends);
  }

  void release_variables() override {
    q.reset_data(), k.reset_data(), v.reset_data(), out.reset_data(), lse.reset_data();
    saved_options.release();
    seed.reset();
  }
};

// The Autograd kernel of attnzoo::attention.
detail::Tensor2 attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v ATTNZOO_OPTION_PARAMS) {
  static const auto forward_op = detail::op_handle<detail::ForwardSig>("attnzoo::_attention_forward");
  ATTNZOO_OPTIONS_FROM_PARAMS
  const std::vector<at::Tensor> inputs = differentiable_inputs(q, k, v, options);
  detail::refuse_forward_ad("attention", inputs);
  // The seed is a tensor made by an ATen op so that a traced graph draws a
  // new one on every call instead of baking one in.
  const at::Tensor seed = options.dropout_p() > 0 ? detail::fresh_seed() : at::Tensor();
  at::Tensor out, lse;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, lse) = forward_op.call(q, k, v ATTNZOO_OPTION_VALUES, detail::optional_of(seed));
  }
  if (torch::autograd::compute_requires_grad(inputs)) {
    auto node = detail::make_node<AttentionBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    node->q = SavedVariable(q, false);
    node->k = SavedVariable(k, false);
    node->v = SavedVariable(v, false);
    node->saved_options.save(options);
    node->seed = seed;
    torch::autograd::set_history({out, lse}, node);
    node->out = SavedVariable(out, /*is_output=*/true);
    node->lse = SavedVariable(lse, /*is_output=*/true);
  }
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Longformer (longformer_support.h): one node over its two engine calls.

struct LongformerBackward : torch::autograd::Node {
  SavedVariable q, k, v, out;
  // Made by the forward, not inputs: the gathered keys, the plan, the lse of
  // each call, the global rows' output and the dropout seeds.
  detail::LongformerCall call;
  detail::LongformerForward saved;
  at::Tensor window_seed, rows_seed;

  std::string name() const override { return "LongformerBackward"; }

  variable_list apply(variable_list&& grads) override {
    const auto self = detail::self_of(this);
    detail::LongformerForward f = saved;
    f.out = out.unpack(self);
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(f.out);
    // Below autograd: the engine's backward is not differentiable itself
    // (double backward is not implemented), and the merges are in place on
    // its fresh outputs, which must not be recorded (a graph being created
    // under torch.func.vjp would refuse them).
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor q_ = q.unpack(self), k_ = k.unpack(self), v_ = v.unpack(self);
    auto [dq, dk, dv] = detail::longformer_backward(call, f, grad_out, q_, k_, v_, window_seed, rows_seed);
    return detail::once_differentiable("longformer_attention", {dq, dk, dv}, {q_, k_, v_, grad_out});
  }

  void release_variables() override {
    q.reset_data(), k.reset_data(), v.reset_data(), out.reset_data();
    call = {};
    saved = {};
    window_seed.reset(), rows_seed.reset();
  }
};

at::Tensor longformer_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         int64_t window, const at::Tensor& global_tokens,
                                         const OptTensor& key_mask, double dropout_p,
                                         std::optional<double> scale) {
  detail::refuse_forward_ad("longformer_attention", {q, k, v});
  const bool dropout = dropout_p > 0;
  const at::Tensor window_seed = dropout ? detail::fresh_seed() : at::Tensor();
  const at::Tensor rows_seed = dropout ? detail::fresh_seed() : at::Tensor();
  detail::LongformerCall call;
  detail::LongformerForward f;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    call = detail::longformer_call(q, k, v, window, global_tokens, key_mask, dropout_p, scale);
    f = detail::longformer_forward(call, q, k, v, window_seed, rows_seed);
  }
  const at::Tensor out = f.out;
  if (torch::autograd::compute_requires_grad(q, k, v)) {
    auto node = detail::make_node<LongformerBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
    node->q = SavedVariable(q, false);
    node->k = SavedVariable(k, false);
    node->v = SavedVariable(v, false);
    node->window_seed = window_seed;
    node->rows_seed = rows_seed;
    torch::autograd::set_history(out, node);
    node->out = SavedVariable(out, /*is_output=*/true);
    f.out = at::Tensor();  // the node keeps it as the SavedVariable above
    node->call = std::move(call);
    node->saved = std::move(f);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("longformer_attention", &longformer_attention_autograd);
  m.impl("_attention_forward", detail::not_differentiable());
  m.impl("_attention_backward", detail::not_differentiable());
}

}  // namespace attnzoo::ops
