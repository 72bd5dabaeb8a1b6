// Autograd for attnzoo::attention: the forward saves (q, k, v, out, lse) and
// the dropout seed; the backward recomputes probabilities tile by tile from
// the log-sum-exp (attnzoo::_attention_backward). Nothing N x N is stored.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace attnzoo::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnzoo::_attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                           at::OptionalIntArrayRef, const std::optional<at::Tensor>&, double,
                           std::optional<double>, const std::optional<at::Tensor>&)>();
  return op;
}

const auto& backward_op() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnzoo::_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, at::OptionalIntArrayRef,
              const std::optional<at::Tensor>&, double, std::optional<double>,
              const std::optional<at::Tensor>&, bool)>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask_opt,
                               const std::optional<at::Tensor>& bias_opt, bool causal,
                               std::optional<std::vector<int64_t>> window,
                               const std::optional<at::Tensor>& alibi_opt, double dropout_p,
                               std::optional<double> scale) {
    const at::Tensor mask = mask_opt.value_or(at::Tensor());
    const at::Tensor bias = bias_opt.value_or(at::Tensor());
    const at::Tensor alibi = alibi_opt.value_or(at::Tensor());
    at::AutoDispatchBelowADInplaceOrView guard;
    // The seed is a tensor made by an ATen op so that a traced graph draws a
    // new one on every call instead of baking one in.
    at::Tensor seed;
    if (dropout_p > 0) seed = at::randint(int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong));
    const at::OptionalIntArrayRef w = window ? at::OptionalIntArrayRef(*window) : at::OptionalIntArrayRef();
    auto [out, lse] = forward_op().call(q, k, v, opt(mask), opt(bias), causal, w, opt(alibi),
                                        dropout_p, scale, opt(seed));
    ctx->save_for_backward({q, k, v, out, lse, mask, bias, alibi, seed});
    ctx->saved_data["causal"] = causal;
    if (window) ctx->saved_data["window"] = *window;
    ctx->saved_data["dropout_p"] = dropout_p;
    if (scale) ctx->saved_data["scale"] = *scale;
    ctx->saved_data["bias_requires_grad"] = bias.defined() && bias.requires_grad();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &mask = saved[5], &bias = saved[6], &alibi = saved[7], &seed = saved[8];
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    std::optional<std::vector<int64_t>> window;
    if (ctx->saved_data.count("window")) window = ctx->saved_data["window"].toIntVector();
    std::optional<double> scale;
    if (ctx->saved_data.count("scale")) scale = ctx->saved_data["scale"].toDouble();
    const bool bias_grad = ctx->saved_data["bias_requires_grad"].toBool();
    const at::OptionalIntArrayRef w = window ? at::OptionalIntArrayRef(*window) : at::OptionalIntArrayRef();
    auto [dq, dk, dv, dbias] = backward_op().call(
        grad_out, q, k, v, out, lse, opt(mask), opt(bias), ctx->saved_data["causal"].toBool(), w,
        opt(alibi), ctx->saved_data["dropout_p"].toDouble(), scale, opt(seed), bias_grad);
    return {dq, dk, dv, at::Tensor(), bias_grad ? dbias : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, bool causal,
    at::OptionalIntArrayRef window, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    std::optional<double> scale) {
  std::optional<std::vector<int64_t>> w;
  if (window.has_value()) w = window->vec();
  auto defined = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t : std::nullopt;
  };
  auto r = AttentionFunction::apply(q, k, v, defined(mask), defined(bias), causal, w,
                                    defined(alibi_slopes), dropout_p, scale);
  return {r[0], r[1]};
}

}  // namespace attnzoo::ops
