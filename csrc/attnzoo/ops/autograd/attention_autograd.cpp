// Autograd for attnzoo::attention: the forward saves (q, k, v, out, lse) and
// the dropout seed; the backward recomputes probabilities tile by tile from
// the log-sum-exp (attnzoo::_attention_backward). Nothing N x N is stored.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "attnzoo/ops/attention_internal.h"

namespace attnzoo::ops {
namespace {

using detail::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

at::OptionalIntArrayRef window_ref(const std::optional<std::vector<int64_t>>& w) {
  return w ? at::OptionalIntArrayRef(*w) : at::OptionalIntArrayRef();
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& mask, const OptTensor& bias,
                               const OptTensor& rel_bias, bool causal,
                               std::optional<std::vector<int64_t>> window, const OptTensor& alibi,
                               double dropout_p, std::optional<double> scale,
                               const OptTensor& layout, int64_t block_size,
                               const OptTensor& shaw_k, const OptTensor& shaw_v,
                               int64_t shaw_max_distance) {
    static const auto forward_op = detail::op_handle<detail::ForwardSig>("attnzoo::_attention_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    // The seed is a tensor made by an ATen op so that a traced graph draws a
    // new one on every call instead of baking one in.
    const at::Tensor seed = dropout_p > 0 ? detail::fresh_seed() : at::Tensor();
    auto [out, lse] = forward_op.call(q, k, v, mask, bias, rel_bias, causal, window_ref(window),
                                      alibi, dropout_p, scale, opt(seed), layout, block_size,
                                      shaw_k, shaw_v, shaw_max_distance);
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), rel_bias.value_or(at::Tensor()),
                            alibi.value_or(at::Tensor()), seed, layout.value_or(at::Tensor()),
                            shaw_k.value_or(at::Tensor()), shaw_v.value_or(at::Tensor())});
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["shaw_max_distance"] = shaw_max_distance;
    ctx->saved_data["shaw_k_requires_grad"] = shaw_k.has_value() && shaw_k->requires_grad();
    ctx->saved_data["shaw_v_requires_grad"] = shaw_v.has_value() && shaw_v->requires_grad();
    ctx->saved_data["causal"] = causal;
    if (window) ctx->saved_data["window"] = *window;
    ctx->saved_data["dropout_p"] = dropout_p;
    if (scale) ctx->saved_data["scale"] = *scale;
    ctx->saved_data["bias_requires_grad"] = bias.has_value() && bias->requires_grad();
    ctx->saved_data["rel_bias_requires_grad"] = rel_bias.has_value() && rel_bias->requires_grad();
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = detail::op_handle<detail::BackwardSig>("attnzoo::_attention_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const OptTensor grad_lse = grads[1].defined() ? OptTensor(grads[1]) : std::nullopt;
    std::optional<std::vector<int64_t>> window;
    if (ctx->saved_data.count("window")) window = ctx->saved_data["window"].toIntVector();
    std::optional<double> scale;
    if (ctx->saved_data.count("scale")) scale = ctx->saved_data["scale"].toDouble();
    const bool bias_grad = ctx->saved_data["bias_requires_grad"].toBool();
    const bool rel_grad = ctx->saved_data["rel_bias_requires_grad"].toBool();
    const bool shaw_k_grad = ctx->saved_data["shaw_k_requires_grad"].toBool();
    const bool shaw_v_grad = ctx->saved_data["shaw_v_requires_grad"].toBool();
    auto [dq, dk, dv, dbias, drel, dshaw_k, dshaw_v] = backward_op.call(
        grad_out, q, k, v, out, lse, opt(saved[5]), opt(saved[6]), opt(saved[7]),
        ctx->saved_data["causal"].toBool(), window_ref(window), opt(saved[8]),
        ctx->saved_data["dropout_p"].toDouble(), scale, opt(saved[9]), opt(saved[10]),
        ctx->saved_data["block_size"].toInt(), opt(saved[11]), opt(saved[12]),
        ctx->saved_data["shaw_max_distance"].toInt(), bias_grad, rel_grad, shaw_k_grad, shaw_v_grad,
        grad_lse);
    // One entry per forward argument: q, k, v, mask, bias, rel_bias, causal,
    // window, alibi, dropout_p, scale, layout, block_size, shaw_k, shaw_v,
    // shaw_max_distance.
    return {dq,
            dk,
            dv,
            at::Tensor(),
            bias_grad ? dbias : at::Tensor(),
            rel_grad ? drel : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            shaw_k_grad ? dshaw_k : at::Tensor(),
            shaw_v_grad ? dshaw_v : at::Tensor(),
            at::Tensor()};
  }
};

OptTensor defined_or_none(const OptTensor& t) { return t.has_value() && t->defined() ? t : std::nullopt; }

}  // namespace

// The Autograd kernel of attnzoo::attention. The T5 table becomes its bias
// vector through a gather recorded by autograd, so its gradient is the
// engine's relative-bias gradient scattered back into the buckets.
std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    const OptTensor& bias, bool causal, at::OptionalIntArrayRef window, const OptTensor& alibi,
    double dropout_p, std::optional<double> scale, const OptTensor& t5_table, bool t5_bidirectional,
    int64_t t5_max_distance, const OptTensor& layout, int64_t block_size, const OptTensor& shaw_k,
    const OptTensor& shaw_v, int64_t shaw_max_distance) {
  std::optional<std::vector<int64_t>> w;
  if (window.has_value()) w = window->vec();
  const OptTensor rel =
      detail::t5_bias_or_none("attention", q, k, t5_table, t5_bidirectional, t5_max_distance);
  auto r = AttentionFunction::apply(q, k, v, defined_or_none(mask), defined_or_none(bias), rel,
                                    causal, w, defined_or_none(alibi), dropout_p, scale,
                                    defined_or_none(layout), block_size, defined_or_none(shaw_k),
                                    defined_or_none(shaw_v), shaw_max_distance);
  return {r[0], r[1]};
}

}  // namespace attnzoo::ops
