// Reformer LSH attention: the public C++ function, every check of its
// arguments and its meta kernels. The CPU kernels are in cpu/lsh_cpu.cpp,
// the autograd node in autograd/lsh_autograd.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attnzoo/ops/attention_variants.h"
#include "attnzoo/ops/lsh_support.h"

namespace attnzoo::ops {
namespace detail {

template <class Int>
LshShapes<Int> check_lsh(const char* op, const at::Tensor& qk, const at::Tensor& v,
                         const at::Tensor& rotations, int64_t bucket_size, const OptTensor& key_mask,
                         double dropout_p) {
  for (auto [name, t] : {std::pair{"qk", &qk}, {"v", &v}}) {
    TORCH_CHECK(t->defined() && t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D), got ",
                shape_str(*t));
    check_input_dtype(op, name, *t);
  }
  TORCH_CHECK(v.scalar_type() == qk.scalar_type(), op, ": qk and v must have one dtype, got ",
              qk.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(v.device() == qk.device(), op, ": qk and v must be on one device, got ", qk.device(), " and ",
              v.device());
  const auto qs = sizes_of<Int>(qk), vs = sizes_of<Int>(v);
  LshShapes<Int> s{qs[0], qs[1], qs[2], qs[3], vs[3], 0, 0};
  TORCH_CHECK(vs[0] == s.B && vs[1] == s.H && vs[2] == s.N, op, ": v must match qk in (B, H, N), got qk ",
              shape_str(qk), " and v ", shape_str(v));
  TORCH_CHECK(s.D > 0, op, ": head dim D of qk must be positive");
  TORCH_CHECK(bucket_size > 0, op, ": bucket_size must be positive, got ", bucket_size);
  TORCH_CHECK(rotations.defined() && at::isFloatingType(rotations.scalar_type()), op,
              ": rotations must be a floating tensor");
  check_same_device(op, "rotations", rotations, "qk", qk);
  const auto rs = sizes_of<Int>(rotations);
  TORCH_CHECK(
      (rotations.dim() == 3 && rs[0] == s.D) || (rotations.dim() == 4 && rs[0] == s.H && rs[1] == s.D), op,
      ": rotations must have shape (D, n_hashes, n_buckets/2) or (H, D, n_hashes, n_buckets/2) with D = ",
      s.D, ", H = ", s.H, ", got ", shape_str(rotations));
  s.R = rs[rs.size() - 2];
  s.n_buckets = 2 * rs[rs.size() - 1];
  TORCH_CHECK(s.R > 0 && s.n_buckets > 0, op,
              ": rotations must have n_hashes >= 1 and n_buckets/2 >= 1, got ", shape_str(rotations));
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, op,
              ": dropout_p must be in [0, 1), got ", dropout_p);
  if (given(key_mask)) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool, op, ": key_mask must be bool (True = keep), got ",
                key_mask->scalar_type());
    check_same_device(op, "key_mask", *key_mask, "qk", qk);
    const auto ms = sizes_of<Int>(*key_mask);
    TORCH_CHECK(key_mask->dim() == 2 && ms[0] == s.B && ms[1] == s.N, op,
                ": key_mask must have shape (B, N) = (", s.B, ", ", s.N, "), got ", shape_str(*key_mask));
  }
  return s;
}

template <class Int>
void check_lsh_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                        const at::Tensor& lse, const LshShapes<Int>& s) {
  const Int out_sizes[4] = {s.B, s.H, s.N, s.Dv};
  const c10::ArrayRef<Int> want_out(out_sizes, 4), want_lse(out_sizes, 3);
  TORCH_CHECK(
      sizes_of<Int>(grad_out) == want_out && sizes_of<Int>(out) == want_out && sizes_of<Int>(lse) == want_lse,
      op, ": grad_out and out must have shape (B, H, N, Dv) = ", shape_str(want_out),
      " and lse (B, H, N) = ", shape_str(want_lse), ", got ", shape_str(grad_out), ", ", shape_str(out),
      " and ", shape_str(lse));
}

template LshShapes<int64_t> check_lsh<int64_t>(const char*, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t, const OptTensor&, double);
template LshShapes<c10::SymInt> check_lsh<c10::SymInt>(const char*, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, int64_t, const OptTensor&, double);
template void check_lsh_backward<int64_t>(const char*, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const LshShapes<int64_t>&);
template void check_lsh_backward<c10::SymInt>(const char*, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const LshShapes<c10::SymInt>&);

}  // namespace detail

namespace {

using detail::OptTensor;

detail::Tensor3 lsh_forward_meta(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                 int64_t bucket_size, bool, const OptTensor& key_mask, double dropout_p,
                                 const OptTensor&) {
  const auto s =
      detail::check_lsh<c10::SymInt>("lsh_attention", qk, v, rotations, bucket_size, key_mask, dropout_p);
  return {at::empty_symint({s.B, s.H, s.N, s.Dv}, qk.options()),
          at::empty_symint({s.B, s.H, s.N}, qk.options().dtype(detail::compute_type(qk.scalar_type()))),
          at::empty_symint({s.B, s.H, s.R, s.N}, qk.options().dtype(at::kLong))};
}

detail::Tensor2 lsh_attention_meta(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                   int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                   double dropout_p) {
  auto [out, lse, buckets] = lsh_forward_meta(qk, v, rotations, bucket_size, causal, key_mask, dropout_p, {});
  return {out, buckets};
}

detail::Tensor2 lsh_backward_meta(const at::Tensor& grad_out, const at::Tensor& qk, const at::Tensor& v,
                                  const at::Tensor& rotations, const at::Tensor& out, const at::Tensor& lse,
                                  int64_t bucket_size, bool, const OptTensor& key_mask, double dropout_p,
                                  const OptTensor&) {
  const char* op = "lsh_attention_backward";
  const auto s = detail::check_lsh<c10::SymInt>(op, qk, v, rotations, bucket_size, key_mask, dropout_p);
  detail::check_lsh_backward(op, grad_out, out, lse, s);
  return {at::empty_symint(qk.sym_sizes(), qk.options()), at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, Meta, m) {
  m.impl("lsh_attention", &lsh_attention_meta);
  m.impl("_lsh_forward", &lsh_forward_meta);
  m.impl("_lsh_backward", &lsh_backward_meta);
}

std::tuple<at::Tensor, at::Tensor> lsh_attention(const at::Tensor& qk, const at::Tensor& v,
                                                 const at::Tensor& rotations, int64_t bucket_size,
                                                 bool causal, const std::optional<at::Tensor>& key_mask,
                                                 double dropout_p) {
  static const auto op = detail::op_handle<detail::LshSig>("attnzoo::lsh_attention");
  return op.call(qk, v, rotations, bucket_size, causal, key_mask, dropout_p);
}

}  // namespace attnzoo::ops
