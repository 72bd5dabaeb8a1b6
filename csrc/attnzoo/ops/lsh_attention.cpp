// Reformer LSH attention: the public C++ function, every check of its
// arguments and its meta kernels. The CPU kernels are in cpu/lsh_cpu.cpp,
// the autograd node in autograd/lsh_autograd.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

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

// --- LSH over an engine that attends over sorted rows ----------------------

namespace {

// One call's hashing and sorting: the sorted rows for the engine, and the
// permutations to go back.
struct LshSort {
  LshShapes<int64_t> s;
  int64_t Np = 0, L = 0;
  at::ScalarType acc;
  at::Tensor buckets, perm, inverse;  // (B, H, R, Np): buckets, each round's sorted order and its inverse
  at::Tensor khat, norm;              // (B, H, Np, D) normalised keys, (B, H, Np, 1) max(|x|, eps), in acc
  LshRows rows;

  // (B, H, L, X) in sorted order -> (B, H, R, Np, X) in original order.
  at::Tensor per_round(const at::Tensor& t) const {
    const int64_t X = t.size(-1);
    return t.reshape({s.B, s.H, s.R, Np, X}).gather(3, inverse.unsqueeze(-1).expand({s.B, s.H, s.R, Np, X}));
  }
  // (B, H, R, Np, X) in original order -> (B, H, L, X) in sorted order.
  at::Tensor sorted(const at::Tensor& t) const {
    const int64_t X = t.size(-1);
    return t.gather(3, perm.unsqueeze(-1).expand({s.B, s.H, s.R, Np, X})).reshape({s.B, s.H, L, X});
  }
};

LshSort lsh_sort(const char* op, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                 int64_t bucket_size, bool causal, const OptTensor& key_mask, double dropout_p,
                 const OptTensor& seed) {
  LshSort l;
  l.s = check_lsh<int64_t>(op, qk, v, rotations, bucket_size, key_mask, dropout_p);
  const auto& s = l.s;
  l.acc = compute_type(qk.scalar_type());
  l.Np = (s.N + bucket_size - 1) / bucket_size * bucket_size;
  l.L = s.R * l.Np;
  const int64_t pad = l.Np - s.N;
  auto padded = [&](const at::Tensor& t) { return pad ? at::constant_pad_nd(t, {0, 0, 0, pad}, 0.0) : t; };
  const at::Tensor x = padded(qk).to(l.acc);  // (B, H, Np, D)

  // Hash: bucket = argmax over [x R_r, -x R_r], the first index on ties (as the CPU kernel).
  const at::Tensor rot = (rotations.dim() == 3 ? rotations.unsqueeze(0) : rotations).to(l.acc);
  const at::Tensor rotated = at::matmul(x.unsqueeze(2), rot.permute({0, 2, 1, 3}));  // (B, H, R, Np, half)
  l.buckets = at::cat({rotated, rotated.neg()}, -1).argmax(-1);                      // (B, H, R, Np)
  // Each round sorted by (bucket, position): the keys are distinct.
  const at::Tensor position = at::arange(l.Np, qk.options().dtype(at::kLong));
  l.perm = (l.buckets * l.Np + position).argsort(/*stable=*/true, /*dim=*/-1, /*descending=*/false);
  l.inverse = l.perm.argsort(/*stable=*/true, /*dim=*/-1, /*descending=*/false);
  l.norm = x.norm(2, -1, true).clamp_min(1e-12);  // F.normalize's eps
  l.khat = x / l.norm;

  LshRows& r = l.rows;
  r.positions = l.perm.flatten(2).contiguous();  // (B, H, L)
  auto rows_of = [&](const at::Tensor& t) {      // (B, H, Np, X) -> (B, H, L, X)
    return t.gather(2, r.positions.unsqueeze(-1).expand({s.B, s.H, l.L, t.size(-1)})).contiguous();
  };
  const auto dt = qk.scalar_type();
  r.q = rows_of(padded(qk).to(dt));
  r.k = rows_of(l.khat.to(dt));
  r.v = rows_of(padded(v).to(dt));
  // The key mask per head in its sorted order; padding keys are masked.
  at::Tensor keep = given(key_mask) ? *key_mask : at::ones({s.B, s.N}, qk.options().dtype(at::kBool));
  if (pad) keep = at::constant_pad_nd(keep, {0, pad}, 0);
  r.keep = keep.unsqueeze(1).expand({s.B, s.H, l.Np}).gather(2, r.positions).unsqueeze(2);
  const int64_t chunks = l.L / bucket_size;
  const at::Tensor own = at::eye(chunks, qk.options().dtype(at::kBool));
  r.layout = own.logical_or(at::roll(own, {-1}, {1})).unsqueeze(0);  // chunk g: chunks g and g - 1
  r.positions_len = l.Np;
  r.bucket_size = bucket_size;
  r.causal = causal;
  r.dropout_p = dropout_p;
  r.seed = seed;
  return l;
}

}  // namespace

Tensor3 lsh_forward_sorted(const LshRowsEngine& engine, const at::Tensor& qk, const at::Tensor& v,
                           const at::Tensor& rotations, int64_t bucket_size, bool causal,
                           const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  const char* op = "lsh_attention";
  const auto s = check_lsh<int64_t>(op, qk, v, rotations, bucket_size, key_mask, dropout_p);
  const auto acc = compute_type(qk.scalar_type());
  if (s.N == 0)
    return {at::empty({s.B, s.H, 0, s.Dv}, qk.options()), at::empty({s.B, s.H, 0}, qk.options().dtype(acc)),
            at::empty({s.B, s.H, s.R, 0}, qk.options().dtype(at::kLong))};
  const LshSort l = lsh_sort(op, qk, v, rotations, bucket_size, causal, key_mask, dropout_p, seed);
  auto [rows_out, rows_lse] = engine.forward(l.rows);
  // out = sum_r exp(lse_r - lse) out_r with lse = logsumexp_r lse_r (finite:
  // every row sees its own position).
  const at::Tensor out_r = l.per_round(rows_out.to(acc));
  const at::Tensor lse_r = l.per_round(rows_lse.unsqueeze(-1)).squeeze(-1);
  const at::Tensor lse = at::logsumexp(lse_r, 2);
  const at::Tensor out = (out_r * (lse_r - lse.unsqueeze(2)).exp().unsqueeze(-1)).sum(2);
  return {out.narrow(2, 0, s.N).to(qk.scalar_type()), lse.narrow(2, 0, s.N).contiguous(),
          l.buckets.narrow(3, 0, s.N).contiguous()};
}

Tensor2 lsh_backward_sorted(const LshRowsEngine& engine, const at::Tensor& grad_out, const at::Tensor& qk,
                            const at::Tensor& v, const at::Tensor& rotations, const at::Tensor& out,
                            const at::Tensor& lse, int64_t bucket_size, bool causal,
                            const OptTensor& key_mask, double dropout_p, const OptTensor& seed) {
  const char* op = "lsh_attention_backward";
  const auto s = check_lsh<int64_t>(op, qk, v, rotations, bucket_size, key_mask, dropout_p);
  check_lsh_backward(op, grad_out, out, lse, s);
  if (s.N == 0) return {at::zeros_like(qk), at::zeros_like(v)};
  const LshSort l = lsh_sort(op, qk, v, rotations, bucket_size, causal, key_mask, dropout_p, seed);
  const auto acc = l.acc;
  const int64_t pad = l.Np - s.N;
  auto padded = [&](const at::Tensor& t, double value) {  // the sequence dimension (2) of a 4-D or 3-D tensor
    const at::Tensor c = t.to(acc);
    if (!pad) return c;
    return at::constant_pad_nd(
        c, t.dim() == 4 ? std::vector<int64_t>{0, 0, 0, pad} : std::vector<int64_t>{0, pad}, value);
  };
  // Padded queries: zero gradient and an lse of +inf, so their round weights are 0.
  const at::Tensor dout = padded(grad_out, 0.0), out_p = padded(out, 0.0);
  const at::Tensor lse_p = padded(lse, std::numeric_limits<double>::infinity());

  // Each round's output and lse again, then its share of the gradient:
  // d out_r = w_r dout and d lse_r = w_r (dout . out_r - dout . out), w_r = exp(lse_r - lse).
  auto [rows_out, rows_lse] = engine.forward(l.rows);
  const at::Tensor out_r = l.per_round(rows_out.to(acc));
  const at::Tensor lse_r = l.per_round(rows_lse.unsqueeze(-1)).squeeze(-1);
  const at::Tensor w = (lse_r - lse_p.unsqueeze(2)).exp();
  const at::Tensor dout_r = dout.unsqueeze(2);
  const at::Tensor d_out_r = w.unsqueeze(-1) * dout_r;
  const at::Tensor d_lse_r = w * ((dout_r * out_r).sum(-1) - (dout * out_p).sum(-1).unsqueeze(2));
  auto [dq_rows, dk_rows, dv_rows] =
      engine.backward(l.rows, l.sorted(d_out_r).to(qk.scalar_type()),
                      l.sorted(d_lse_r.unsqueeze(-1)).squeeze(-1), rows_out, rows_lse);
  // Back to original positions, summed over rounds (a fixed order: deterministic).
  const at::Tensor dq = l.per_round(dq_rows.to(acc)).sum(2), dkhat = l.per_round(dk_rows.to(acc)).sum(2);
  const at::Tensor dv = l.per_round(dv_rows.to(acc)).sum(2);
  // Through the key normalisation: d x = (d khat - khat (khat . d khat)) / |x|.
  const at::Tensor dot = (l.khat * dkhat).sum(-1, true);
  const at::Tensor dx = at::where(l.norm <= 1e-12, dkhat / l.norm, (dkhat - l.khat * dot) / l.norm);
  return {(dq + dx).narrow(2, 0, s.N).to(qk.scalar_type()), dv.narrow(2, 0, s.N).to(v.scalar_type())};
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
