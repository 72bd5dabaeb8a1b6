// The CPU kernels of lsh_attention, _lsh_forward and _lsh_backward: padding
// to a multiple of the bucket size, the engine's LSH loop (cpu/lsh_kernel.h)
// over (batch, head) work items.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "attnzoo/ops/cpu/cpu_support.h"
#include "attnzoo/ops/lsh_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::OptTensor;

// The checked arguments, padded to Npad (a multiple of bucket_size),
// contiguous and in the compute type.
struct Lsh {
  detail::LshShapes<int64_t> s;
  int64_t Npad;
  at::ScalarType compute;
  at::Tensor qk, v, rotations, key_mask;
  double dropout_p;
  uint64_t seed = 0;
};

Lsh prepare(const char* op, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
            int64_t bucket_size, const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  Lsh l;
  l.s = detail::check_lsh<int64_t>(op, qk, v, rotations, bucket_size, key_mask, dropout_p);
  l.compute = detail::compute_type(qk.scalar_type());
  l.Npad = ((l.s.N + bucket_size - 1) / bucket_size) * bucket_size;
  const int64_t pad = l.Npad - l.s.N;
  auto padded = [&](const at::Tensor& t) {
    at::Tensor c = t.to(l.compute);
    return (pad ? at::constant_pad_nd(c, {0, 0, 0, pad}, 0.0) : c).contiguous();
  };
  l.qk = padded(qk);
  l.v = padded(v);
  l.rotations = (rotations.dim() == 3 ? rotations.unsqueeze(0) : rotations).to(l.compute).contiguous();
  const at::Tensor keep = given(key_mask) ? key_mask->contiguous()
                                          : at::ones({l.s.B, l.s.N}, at::TensorOptions().dtype(at::kBool));
  // Padding keys are masked.
  l.key_mask = (pad ? at::constant_pad_nd(keep.to(at::kByte), {0, pad}, 0) : keep.to(at::kByte)).contiguous();
  l.dropout_p = dropout_p;
  if (dropout_p > 0) l.seed = detail::seed_value(op, seed);
  return l;
}

cpu::LshArgs args_of(const Lsh& l, int64_t bucket_size, bool causal) {
  cpu::LshArgs a;
  a.B = l.s.B, a.H = l.s.H, a.Npad = l.Npad, a.D = l.s.D, a.Dv = l.s.Dv, a.R = l.s.R,
  a.n_buckets = l.s.n_buckets;
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
void run(const cpu::LshArgs& a, cpu::LshRangeFn fn) { cpu::run_parallel(a.Npad ? a.B * a.H : 0, a, fn); }

const cpu::LshTable& kernels(const Lsh& l) {
  return cpu::selected_engine().lsh[l.compute == at::kDouble ? 1 : 0];
}

detail::Tensor3 lsh_forward_kernel(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                   int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                   double dropout_p, const OptTensor& seed) {
  const Lsh l = prepare("lsh_attention", qk, v, rotations, bucket_size, key_mask, dropout_p, seed);
  const auto& s = l.s;
  const auto opts = l.qk.options();
  at::Tensor out = cpu::empty_output({s.B, s.H, l.Npad, s.Dv}, opts);
  at::Tensor lse = at::empty({s.B, s.H, l.Npad}, opts);
  at::Tensor buckets = at::empty({s.B, s.H, s.R, l.Npad}, at::TensorOptions().dtype(at::kLong));
  cpu::LshArgs a = args_of(l, bucket_size, causal);
  a.out = out.data_ptr(), a.lse = lse.data_ptr(), a.buckets = buckets.data_ptr();
  run(a, kernels(l).forward);
  return {out.narrow(2, 0, s.N).to(qk.scalar_type()), lse.narrow(2, 0, s.N).contiguous(),
          buckets.narrow(3, 0, s.N).contiguous()};
}

detail::Tensor2 lsh_backward_kernel(const at::Tensor& grad_out, const at::Tensor& qk, const at::Tensor& v,
                                    const at::Tensor& rotations, const at::Tensor& out, const at::Tensor& lse,
                                    int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                    double dropout_p, const OptTensor& seed) {
  const Lsh l = prepare("lsh_attention_backward", qk, v, rotations, bucket_size, key_mask, dropout_p, seed);
  const auto& s = l.s;
  detail::check_lsh_backward("lsh_attention_backward", grad_out, out, lse, s);
  const int64_t pad = l.Npad - s.N;
  // Pads the sequence dimension: dim 2 of (B, H, N, X) or (B, H, N).
  auto padded = [&](const at::Tensor& t, double value) {
    const at::Tensor c = t.to(l.compute);
    const std::vector<int64_t> p =
        t.dim() == 4 ? std::vector<int64_t>{0, 0, 0, pad} : std::vector<int64_t>{0, pad};
    return (pad ? at::constant_pad_nd(c, p, value) : c).contiguous();
  };
  // Padded queries: zero gradient, and an lse of +inf so that their round
  // weights are exactly 0.
  const at::Tensor dout = padded(grad_out, 0.0), out_p = padded(out, 0.0);
  const at::Tensor lse_p = padded(lse, std::numeric_limits<double>::infinity());
  const auto opts = l.qk.options();
  at::Tensor dqk = at::zeros({s.B, s.H, l.Npad, s.D}, opts);
  at::Tensor dv = at::zeros({s.B, s.H, l.Npad, s.Dv}, opts);
  cpu::LshArgs a = args_of(l, bucket_size, causal);
  a.out = const_cast<void*>(out_p.data_ptr()), a.lse = const_cast<void*>(lse_p.data_ptr());
  a.grad_out = dout.data_ptr(), a.grad_qk = dqk.data_ptr(), a.grad_v = dv.data_ptr();
  run(a, kernels(l).backward);
  return {dqk.narrow(2, 0, s.N).to(qk.scalar_type()), dv.narrow(2, 0, s.N).to(v.scalar_type())};
}

// Below autograd (inference, or nothing needs a gradient): draw the seed here.
detail::Tensor2 lsh_attention_kernel(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                     int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                     double dropout_p) {
  return detail::lsh_attention_with_fresh_seed(&lsh_forward_kernel, qk, v, rotations, bucket_size, causal,
                                               key_mask, dropout_p);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) {
  m.impl("lsh_attention", &lsh_attention_kernel);
  m.impl("_lsh_forward", &lsh_forward_kernel);
  m.impl("_lsh_backward", &lsh_backward_kernel);
}

}  // namespace attnzoo::ops
