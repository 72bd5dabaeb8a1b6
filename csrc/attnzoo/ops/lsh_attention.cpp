// Reformer LSH attention: argument checks, padding to a multiple of the
// bucket size, the CPU kernels of the internal ops, and autograd.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <sstream>

#include "attnzoo/ops/attention_internal.h"
#include "attnzoo/ops/attention_variants.h"

namespace attnzoo::ops {
namespace {

using detail::OptTensor;

std::string dims(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

struct Lsh {
  int64_t B, H, N, D, Dv, R, n_buckets, Npad;
  at::ScalarType compute;
  at::Tensor qk, v, rotations, key_mask;  // padded, contiguous, compute type
  double dropout_p;
  uint64_t seed;
};

Lsh prepare(const char* op, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
            int64_t bucket_size, const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  for (auto [name, t] : {std::pair{"qk", &qk}, {"v", &v}}) {
    TORCH_CHECK(t->defined() && t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D), got ",
                t->defined() ? dims(*t) : std::string("undefined"));
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(), "; only CPU kernels exist so far");
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, op, ": ", name,
                " must be float32, float64 or bfloat16, got ", dt);
  }
  TORCH_CHECK(v.scalar_type() == qk.scalar_type(), op, ": qk and v must have one dtype, got ",
              qk.scalar_type(), " and ", v.scalar_type());
  Lsh l;
  l.B = qk.size(0), l.H = qk.size(1), l.N = qk.size(2), l.D = qk.size(3), l.Dv = v.size(3);
  TORCH_CHECK(v.size(0) == l.B && v.size(1) == l.H && v.size(2) == l.N, op,
              ": v must match qk in (B, H, N), got qk ", dims(qk), " and v ", dims(v));
  TORCH_CHECK(l.D > 0, op, ": head dim D of qk must be positive");
  TORCH_CHECK(bucket_size > 0, op, ": bucket_size must be positive, got ", bucket_size);
  TORCH_CHECK(rotations.defined() && at::isFloatingType(rotations.scalar_type()), op,
              ": rotations must be a floating tensor");
  TORCH_CHECK((rotations.dim() == 3 && rotations.size(0) == l.D) ||
                  (rotations.dim() == 4 && rotations.size(0) == l.H && rotations.size(1) == l.D),
              op, ": rotations must have shape (D, n_hashes, n_buckets/2) or (H, D, n_hashes, n_buckets/2) "
              "with D = ", l.D, ", H = ", l.H, ", got ", dims(rotations));
  l.R = rotations.size(-2);
  l.n_buckets = 2 * rotations.size(-1);
  TORCH_CHECK(l.R > 0 && l.n_buckets > 0, op, ": rotations must have n_hashes >= 1 and n_buckets/2 >= 1, got ",
              dims(rotations));
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, op,
              ": dropout_p must be in [0, 1), got ", dropout_p);
  l.compute = qk.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  l.Npad = ((l.N + bucket_size - 1) / bucket_size) * bucket_size;
  const int64_t pad = l.Npad - l.N;
  auto padded = [&](const at::Tensor& t) {
    at::Tensor c = t.to(l.compute);
    return (pad ? at::constant_pad_nd(c, {0, 0, 0, pad}, 0.0) : c).contiguous();
  };
  l.qk = padded(qk);
  l.v = padded(v);
  l.rotations = (rotations.dim() == 3 ? rotations.unsqueeze(0) : rotations).to(l.compute).contiguous();
  at::Tensor km = at::ones({l.B, l.N}, at::TensorOptions().dtype(at::kBool));
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool, op, ": key_mask must be bool (True = keep), got ",
                key_mask->scalar_type());
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == l.B && key_mask->size(1) == l.N, op,
                ": key_mask must have shape (B, N) = (", l.B, ", ", l.N, "), got ", dims(*key_mask));
    km = key_mask->contiguous();
  }
  l.key_mask = (pad ? at::constant_pad_nd(km.to(at::kByte), {0, pad}, 0) : km.to(at::kByte)).contiguous();
  l.dropout_p = dropout_p;
  l.seed = 0;
  if (dropout_p > 0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1, op,
                ": dropout needs a one-element int64 seed tensor");
    l.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return l;
}

cpu::LshArgs args_of(const Lsh& l, int64_t bucket_size, bool causal) {
  cpu::LshArgs a;
  a.B = l.B, a.H = l.H, a.Npad = l.Npad, a.D = l.D, a.Dv = l.Dv, a.R = l.R, a.n_buckets = l.n_buckets;
  a.bucket_size = bucket_size;
  a.qk = l.qk.data_ptr(), a.v = l.v.data_ptr(), a.rotations = l.rotations.data_ptr();
  a.rot_sh = l.rotations.size(0) == 1 ? 0 : l.rotations.stride(0);
  a.key_mask = static_cast<const uint8_t*>(l.key_mask.data_ptr());
  a.causal = causal;
  a.dropout_p = l.dropout_p;
  a.seed = l.seed;
  return a;
}

// Work items are (b, h); an empty sequence has none.
void run(const cpu::LshArgs& a, cpu::LshRangeFn fn) { detail::run_parallel(a.Npad ? a.B * a.H : 0, a, fn); }

const cpu::LshTable& kernels(const Lsh& l) { return detail::engine().lsh[l.compute == at::kDouble ? 1 : 0]; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsh_forward_cpu(
    const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations, int64_t bucket_size,
    bool causal, const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  const Lsh l = prepare("lsh_attention", qk, v, rotations, bucket_size, key_mask, dropout_p, seed);
  const auto opts = l.qk.options();
  at::Tensor out = at::empty({l.B, l.H, l.Npad, l.Dv}, opts);
  at::Tensor lse = at::empty({l.B, l.H, l.Npad}, opts);
  at::Tensor buckets = at::empty({l.B, l.H, l.R, l.Npad}, at::TensorOptions().dtype(at::kLong));
  cpu::LshArgs a = args_of(l, bucket_size, causal);
  a.out = out.data_ptr(), a.lse = lse.data_ptr(), a.buckets = buckets.data_ptr();
  run(a, kernels(l).forward);
  return {out.narrow(2, 0, l.N).to(qk.scalar_type()), lse.narrow(2, 0, l.N).contiguous(),
          buckets.narrow(3, 0, l.N).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> lsh_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
    const at::Tensor& out, const at::Tensor& lse, int64_t bucket_size, bool causal,
    const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  const Lsh l = prepare("lsh_attention_backward", qk, v, rotations, bucket_size, key_mask, dropout_p, seed);
  const int64_t pad = l.Npad - l.N;
  // Pads the sequence dimension: dim 2 of (B, H, N, X) or (B, H, N).
  auto padded = [&](const at::Tensor& t, double value) {
    const at::Tensor c = t.to(l.compute);
    const std::vector<int64_t> p = t.dim() == 4 ? std::vector<int64_t>{0, 0, 0, pad} : std::vector<int64_t>{0, pad};
    return (pad ? at::constant_pad_nd(c, p, value) : c).contiguous();
  };
  // Padded queries: zero gradient, and an lse of +inf so that their round
  // weights are exactly 0.
  const at::Tensor dout = padded(grad_out, 0.0), out_p = padded(out, 0.0);
  const at::Tensor lse_p = padded(lse, std::numeric_limits<double>::infinity());
  const auto opts = l.qk.options();
  at::Tensor dqk = at::zeros({l.B, l.H, l.Npad, l.D}, opts);
  at::Tensor dv = at::zeros({l.B, l.H, l.Npad, l.Dv}, opts);
  cpu::LshArgs a = args_of(l, bucket_size, causal);
  a.out = const_cast<void*>(out_p.data_ptr()), a.lse = const_cast<void*>(lse_p.data_ptr());
  a.grad_out = dout.data_ptr(), a.grad_qk = dqk.data_ptr(), a.grad_v = dv.data_ptr();
  run(a, kernels(l).backward);
  return {dqk.narrow(2, 0, l.N).to(qk.scalar_type()), dv.narrow(2, 0, l.N).to(v.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> lsh_attention_cpu(const at::Tensor& qk, const at::Tensor& v,
                                                     const at::Tensor& rotations, int64_t bucket_size,
                                                     bool causal, const OptTensor& key_mask,
                                                     double dropout_p) {
  const OptTensor seed = dropout_p > 0 ? OptTensor(detail::fresh_seed()) : std::nullopt;
  auto [out, lse, buckets] = lsh_forward_cpu(qk, v, rotations, bucket_size, causal, key_mask, dropout_p, seed);
  return {out, buckets};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LshFunction : public torch::autograd::Function<LshFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qk, const at::Tensor& v,
                               const at::Tensor& rotations, int64_t bucket_size, bool causal,
                               const OptTensor& key_mask, double dropout_p) {
    static const auto op = detail::op_handle<detail::LshForwardSig>("attnzoo::_lsh_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor seed = dropout_p > 0 ? detail::fresh_seed() : at::Tensor();
    auto [out, lse, buckets] = op.call(qk, v, rotations, bucket_size, causal, key_mask, dropout_p,
                                       seed.defined() ? OptTensor(seed) : std::nullopt);
    ctx->save_for_backward({qk, v, rotations, out, lse, key_mask.value_or(at::Tensor()), seed});
    ctx->saved_data["bucket_size"] = bucket_size;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({buckets});
    return {out, buckets};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = detail::op_handle<detail::LshBackwardSig>("attnzoo::_lsh_backward");
    const auto s = ctx->get_saved_variables();
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    auto [dqk, dv] = op.call(grad, s[0], s[1], s[2], s[3], s[4], ctx->saved_data["bucket_size"].toInt(),
                             ctx->saved_data["causal"].toBool(), opt(s[5]),
                             ctx->saved_data["dropout_p"].toDouble(), opt(s[6]));
    // qk, v, rotations, bucket_size, causal, key_mask, dropout_p
    return {dqk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lsh_attention_autograd(const at::Tensor& qk, const at::Tensor& v,
                                                          const at::Tensor& rotations, int64_t bucket_size,
                                                          bool causal, const OptTensor& key_mask,
                                                          double dropout_p) {
  auto r = LshFunction::apply(qk, v, rotations, bucket_size, causal,
                              key_mask.has_value() && key_mask->defined() ? key_mask : std::nullopt,
                              dropout_p);
  return {r[0], r[1]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lsh_attention(const at::Tensor& qk, const at::Tensor& v,
                                                 const at::Tensor& rotations, int64_t bucket_size,
                                                 bool causal, const std::optional<at::Tensor>& key_mask,
                                                 double dropout_p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnzoo::lsh_attention", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                                 const OptTensor&, double)>();
  return op.call(qk, v, rotations, bucket_size, causal, key_mask, dropout_p);
}

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) {
  m.impl("lsh_attention", &lsh_attention_cpu);
  m.impl("_lsh_forward", &lsh_forward_cpu);
  m.impl("_lsh_backward", &lsh_backward_cpu);
}

TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) { m.impl("lsh_attention", &lsh_attention_autograd); }

}  // namespace attnzoo::ops
