// Schemas of the attnzoo ops (the one TORCH_LIBRARY), argument checking, the
// CPU wrappers around the engine, and the public C++ functions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>

#include "attnzoo/ops/attention.h"
#include "attnzoo/ops/attention_internal.h"
#include "attnzoo/ops/attention_variants.h"
#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo {
int link_anchor();  // declared in attnzoo/attnzoo.h
int link_anchor() { return 1; }
}  // namespace attnzoo

namespace attnzoo::ops {
namespace {

using cpu::DenseArgs;
using cpu::EngineTable;
using detail::OptTensor;

}  // namespace

// The engine build for this CPU: the same choice ATen makes for its own
// kernels, so ATEN_CPU_CAPABILITY=default|avx2|avx512 steers both.
const EngineTable& detail::engine() {
  static const EngineTable* table = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(ATTNZOO_HAVE_ISA_AVX512)
    if (cap == "AVX512") return &cpu::engine_AVX512();
#endif
#if defined(ATTNZOO_HAVE_ISA_AVX2)
    if (cap == "AVX2" || cap == "AVX512") return &cpu::engine_AVX2();
#endif
    return &cpu::engine_DEFAULT();
  }();
  return *table;
}

namespace {
using detail::engine;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// ---------------------------------------------------------------------------
// Argument checking. Every message names the op and the argument.

struct Shapes {
  int64_t B, H, Hkv, Nq, Nk, D, Dv;
};

Shapes check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D), got ", t->dim(),
                " dimensions ", shape_str(t->sizes()));
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(),
                "; attnzoo has CPU kernels only so far (CUDA kernels are not built yet)");
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, op, ": ", name,
                " must be float32, float64 or bfloat16, got ", dt);
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op,
              ": q, k and v must have the same batch size B, got q ", shape_str(q.sizes()), ", k ",
              shape_str(k.sizes()), ", v ", shape_str(v.sizes()));
  TORCH_CHECK(v.size(1) == s.Hkv, op, ": k and v must have the same number of heads, got k ",
              shape_str(k.sizes()), " and v ", shape_str(v.sizes()));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": the heads of q (H=", s.H,
              ") must be a multiple of the heads of k and v (Hkv=", s.Hkv, ")");
  TORCH_CHECK(v.size(2) == s.Nk, op, ": k and v must have the same sequence length, got k ",
              shape_str(k.sizes()), " and v ", shape_str(v.sizes()));
  TORCH_CHECK(k.size(3) == s.D, op, ": q and k must have the same head dim D, got q ",
              shape_str(q.sizes()), " and k ", shape_str(k.sizes()));
  TORCH_CHECK(s.D > 0, op, ": head dim D of q and k must be positive");
  return s;
}

// True if `t` broadcasts to (B, H, Nq, Nk) under the usual right-aligned rules.
void check_broadcast4(const char* op, const char* name, const at::Tensor& t, const Shapes& s) {
  const int64_t want[4] = {s.B, s.H, s.Nq, s.Nk};
  bool ok = t.dim() <= 4;
  for (int64_t d = 0; ok && d < t.dim(); ++d) {
    const int64_t size = t.size(t.dim() - 1 - d), target = want[3 - d];
    ok = size == 1 || size == target;
  }
  TORCH_CHECK(ok, op, ": ", name, " of shape ", shape_str(t.sizes()),
              " is not broadcastable to (B, H, Nq, Nk) = ", shape_str(at::IntArrayRef(want, 4)));
}

// Everything that changes the scores, as the internal ops receive it.
struct ScoreArgs {
  const OptTensor& mask;
  const OptTensor& bias;
  const OptTensor& rel_bias;
  bool causal;
  at::OptionalIntArrayRef window;
  const OptTensor& alibi;
  double dropout_p;
  std::optional<double> scale;
  const OptTensor& seed;
  const OptTensor& layout;
  int64_t block_size;
  const OptTensor& shaw_k;
  const OptTensor& shaw_v;
  int64_t shaw_max_distance;
};

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Validated, normalised arguments in the compute type (float or double).
struct Prepared {
  Shapes s;
  at::ScalarType compute;
  at::Tensor q, k, v, mask, bias, rel_bias, alibi, layout, shaw_k, shaw_v;
  int64_t block_size = 0, shaw_K = 0;
  int64_t left, right;
  double scale, dropout_p;
  uint64_t seed;
};

at::Tensor to_compute(const at::Tensor& t, at::ScalarType compute) {
  return t.to(compute).contiguous();
}

void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
}

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const ScoreArgs& sa) {
  Prepared p;
  p.s = check_qkv(op, q, k, v);
  const Shapes& s = p.s;
  p.compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.q = to_compute(q, p.compute);
  p.k = to_compute(k, p.compute);
  p.v = to_compute(v, p.compute);

  if (given(sa.mask)) {
    const auto& m = *sa.mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be a bool tensor (True = may attend), got ",
                m.scalar_type(), "; pass an additive float mask as bias=");
    TORCH_CHECK(m.device().is_cpu(), op, ": mask is on ", m.device(), ", expected cpu");
    check_broadcast4(op, "mask", m, s);
    p.mask = m.contiguous();
  }
  if (given(sa.bias)) {
    check_cpu_float(op, "bias", *sa.bias);
    check_broadcast4(op, "bias", *sa.bias, s);
    p.bias = to_compute(*sa.bias, p.compute);
  }
  if (given(sa.rel_bias)) {
    const auto& r = *sa.rel_bias;
    check_cpu_float(op, "rel_bias", r);
    const int64_t L = s.Nq + s.Nk - 1;
    TORCH_CHECK((r.dim() == 2 && r.size(0) == s.H && r.size(1) == L) ||
                    (r.dim() == 3 && r.size(0) == s.B && r.size(1) == s.H && r.size(2) == L),
                op, ": rel_bias must have shape (H, Nq + Nk - 1) = (", s.H, ", ", L,
                ") or (B, H, Nq + Nk - 1), got ", shape_str(r.sizes()));
    p.rel_bias = to_compute(r, p.compute);
  }
  if (given(sa.alibi)) {
    const auto& a = *sa.alibi;
    check_cpu_float(op, "alibi_slopes", a);
    TORCH_CHECK((a.dim() == 1 && a.size(0) == s.H) || (a.dim() == 2 && a.size(0) == s.B && a.size(1) == s.H),
                op, ": alibi_slopes must have shape (H,) = (", s.H, ",) or (B, H) = (", s.B, ", ", s.H,
                "), got ", shape_str(a.sizes()));
    p.alibi = to_compute(a, p.compute);
  }

  if (given(sa.layout)) {
    const auto& l = *sa.layout;
    const int64_t bs = sa.block_size;
    TORCH_CHECK(bs > 0, op, ": block_size must be positive, got ", bs);
    TORCH_CHECK(l.scalar_type() == at::kBool, op, ": layout must be a bool tensor, got ", l.scalar_type());
    TORCH_CHECK(l.device().is_cpu(), op, ": layout is on ", l.device(), ", expected cpu");
    const int64_t rows = (s.Nq + bs - 1) / bs, cols = (s.Nk + bs - 1) / bs;
    TORCH_CHECK(l.dim() == 3 && (l.size(0) == 1 || l.size(0) == s.H) && l.size(1) == rows &&
                    l.size(2) == cols,
                op, ": layout must have shape (H or 1, ceil(Nq/block_size), ceil(Nk/block_size)) = (",
                s.H, " or 1, ", rows, ", ", cols, ") for block_size ", bs, ", got ", shape_str(l.sizes()));
    p.layout = l.contiguous();
    p.block_size = bs;
  }

  if (given(sa.shaw_k)) {
    TORCH_CHECK(!p.layout.defined(), op, ": Shaw relative positions and a block layout cannot be combined");
    const int64_t K = sa.shaw_max_distance;
    TORCH_CHECK(K >= 0, op, ": max_distance must be >= 0, got ", K);
    auto check_table = [&](const char* name, const at::Tensor& t, int64_t dim) {
      check_cpu_float(op, name, t);
      TORCH_CHECK((t.dim() == 2 && t.size(0) == 2 * K + 1 && t.size(1) == dim) ||
                      (t.dim() == 3 && t.size(0) == s.H && t.size(1) == 2 * K + 1 && t.size(2) == dim),
                  op, ": ", name, " must have shape (2K+1, ", dim, ") or (H, 2K+1, ", dim,
                  ") with K = max_distance = ", K, ", H = ", s.H, ", got ", shape_str(t.sizes()));
      return to_compute(t.dim() == 2 ? t.unsqueeze(0) : t, p.compute);
    };
    p.shaw_k = check_table("rel_k", *sa.shaw_k, s.D);
    if (given(sa.shaw_v)) p.shaw_v = check_table("rel_v", *sa.shaw_v, s.Dv);
    p.shaw_K = K;
  } else {
    TORCH_CHECK(!given(sa.shaw_v), op, ": rel_v needs rel_k");
  }

  // Any bound >= Nq + Nk is "unbounded"; it keeps the index arithmetic far
  // from overflow.
  const int64_t unbounded = s.Nq + s.Nk + 1;
  p.left = unbounded;
  p.right = sa.causal ? 0 : unbounded;
  if (sa.window.has_value()) {
    const auto w = *sa.window;
    TORCH_CHECK(w.size() == 2, op, ": window must be (left, right), got ", w.size(), " values");
    TORCH_CHECK(w[0] >= 0 && w[1] >= 0, op, ": window sizes must be >= 0, got (", w[0], ", ", w[1], ")");
    p.left = std::min(p.left, w[0]);
    p.right = std::min(p.right, w[1]);
  }

  p.scale = sa.scale.has_value() ? *sa.scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  TORCH_CHECK(std::isfinite(p.scale), op, ": scale must be finite, got ", p.scale);
  TORCH_CHECK(std::isfinite(sa.dropout_p) && sa.dropout_p >= 0.0 && sa.dropout_p <= 1.0, op,
              ": dropout_p must be in [0, 1], got ", sa.dropout_p);
  p.dropout_p = sa.dropout_p;
  p.seed = 0;
  if (sa.dropout_p > 0) {
    TORCH_CHECK(given(sa.seed) && sa.seed->numel() == 1, op,
                ": dropout needs a one-element int64 seed tensor");
    p.seed = static_cast<uint64_t>(sa.seed->item<int64_t>());
  }
  return p;
}

DenseArgs engine_args(const Prepared& p) {
  DenseArgs a;
  const Shapes& s = p.s;
  a.B = s.B, a.H = s.H, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.D = s.D, a.Dv = s.Dv;
  a.block_q = cpu::forward_block_q(s.Nq);
  a.q = p.q.data_ptr(), a.k = p.k.data_ptr(), a.v = p.v.data_ptr();
  a.scale = p.scale;
  a.left = p.left, a.right = p.right;
  auto view4 = [&](const at::Tensor& t, cpu::Broadcast4& out) {
    if (!t.defined()) return;
    const auto e = t.expand({s.B, s.H, s.Nq, s.Nk});
    out.data = e.data_ptr();
    out.sb = e.stride(0), out.sh = e.stride(1), out.si = e.stride(2), out.sj = e.stride(3);
  };
  view4(p.mask, a.mask);
  view4(p.bias, a.bias);
  if (p.rel_bias.defined()) {
    const auto e = p.rel_bias.expand({s.B, s.H, s.Nq + s.Nk - 1});
    a.rel_bias = e.data_ptr();
    a.rel_sb = e.stride(0), a.rel_sh = e.stride(1);
  }
  if (p.alibi.defined()) {
    const auto e = p.alibi.expand({s.B, s.H});
    a.alibi = e.data_ptr();
    a.alibi_sb = e.stride(0), a.alibi_sh = e.stride(1);
  }
  a.dropout_p = p.dropout_p;
  a.seed = p.seed;
  if (p.layout.defined()) {
    a.layout = static_cast<const uint8_t*>(p.layout.data_ptr());
    a.layout_sh = p.layout.size(0) == 1 ? 0 : p.layout.stride(0);
    a.layout_cols = p.layout.size(2);
    a.layout_block = p.block_size;
    a.block_q = p.block_size;
  }
  if (p.shaw_k.defined()) {
    a.shaw_k = p.shaw_k.data_ptr();
    a.shaw_k_sh = p.shaw_k.size(0) == 1 ? 0 : p.shaw_k.stride(0);
    if (p.shaw_v.defined()) {
      a.shaw_v = p.shaw_v.data_ptr();
      a.shaw_v_sh = p.shaw_v.size(0) == 1 ? 0 : p.shaw_v.stride(0);
    }
    a.shaw_K = p.shaw_K;
  }
  return a;
}

const cpu::PassTable& passes(const Prepared& p) {
  const auto& e = engine();
  const int dt = p.compute == at::kDouble ? 1 : 0;
  if (p.layout.defined()) return e.block_sparse[dt];
  if (p.shaw_k.defined()) return e.shaw[dt];
  return e.dense[dt];
}

using detail::run_parallel;

// Forward / probabilities work items: (b, h, query block of a.block_q).
int64_t query_blocks(const DenseArgs& a) { return a.B * a.H * ((a.Nq + a.block_q - 1) / a.block_q); }

// ---------------------------------------------------------------------------
// CPU kernels of the internal ops.

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    const OptTensor& bias, const OptTensor& rel_bias, bool causal, at::OptionalIntArrayRef window,
    const OptTensor& alibi, double dropout_p, std::optional<double> scale, const OptTensor& seed,
    const OptTensor& layout, int64_t block_size, const OptTensor& shaw_k, const OptTensor& shaw_v,
    int64_t shaw_max_distance) {
  const Prepared p = prepare("attention", q, k, v,
                             {mask, bias, rel_bias, causal, window, alibi, dropout_p, scale, seed,
                              layout, block_size, shaw_k, shaw_v, shaw_max_distance});
  const Shapes& s = p.s;
  const auto opts = p.q.options();
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.Dv}, opts);
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, opts);
  DenseArgs a = engine_args(p);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  run_parallel(query_blocks(a), a, passes(p).forward);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, const OptTensor& bias,
    const OptTensor& rel_bias, bool causal, at::OptionalIntArrayRef window, const OptTensor& alibi,
    double dropout_p, std::optional<double> scale, const OptTensor& seed, const OptTensor& layout,
    int64_t block_size, const OptTensor& shaw_k, const OptTensor& shaw_v, int64_t shaw_max_distance,
    bool bias_requires_grad, bool rel_bias_requires_grad, bool shaw_k_requires_grad,
    bool shaw_v_requires_grad, const OptTensor& grad_lse) {
  const Prepared p = prepare("attention_backward", q, k, v,
                             {mask, bias, rel_bias, causal, window, alibi, dropout_p, scale, seed,
                              layout, block_size, shaw_k, shaw_v, shaw_max_distance});
  const Shapes& s = p.s;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({s.B, s.H, s.Nq, s.Dv}),
              "attention_backward: grad_out must have shape ", shape_str({s.B, s.H, s.Nq, s.Dv}),
              ", got ", shape_str(grad_out.sizes()));
  const auto opts = p.q.options();
  const at::Tensor dout = to_compute(grad_out, p.compute);
  const at::Tensor out_c = to_compute(out, p.compute);
  const at::Tensor lse_c = to_compute(lse, p.compute);
  // The log-sum-exp is an output too: its gradient g adds g_i * p_ij to the
  // score gradient, which is the same as lowering delta_i by g_i.
  at::Tensor delta = (dout * out_c).sum(-1);
  if (given(grad_lse)) {
    TORCH_CHECK(grad_lse->sizes() == at::IntArrayRef({s.B, s.H, s.Nq}),
                "attention_backward: grad_lse must have shape (B, H, Nq)");
    delta = delta - grad_lse->to(p.compute);
  }
  delta = delta.contiguous();

  const bool want_bias = bias_requires_grad && p.bias.defined();
  const bool want_rel = rel_bias_requires_grad && p.rel_bias.defined();
  const bool want_shaw_k = shaw_k_requires_grad && p.shaw_k.defined();
  const bool want_shaw_v = shaw_v_requires_grad && p.shaw_v.defined();
  // Score gradients are accumulated per (b, h) by one work item, so a head's
  // key blocks are only split across threads when none is wanted.
  const int64_t key_block = p.layout.defined() ? p.block_size : cpu::kBwdBlockK;
  const int64_t nkb = (s.Nk + key_block - 1) / key_block;
  int64_t splits = 1;
  const int64_t heads = s.B * s.H, threads = at::get_num_threads();
  if (!want_bias && !want_rel && !want_shaw_k && !want_shaw_v && heads < threads && nkb > 1)
    splits = std::min(nkb, (threads + heads - 1) / heads);

  at::Tensor dq = at::zeros({splits, s.B, s.H, s.Nq, s.D}, opts);
  at::Tensor dk = at::zeros({s.B, s.H, s.Nk, s.D}, opts);
  at::Tensor dv = at::zeros({s.B, s.H, s.Nk, s.Dv}, opts);
  at::Tensor dbias, drel, dshaw_k, dshaw_v;

  DenseArgs a = engine_args(p);
  a.lse = lse_c.data_ptr();
  a.grad_out = dout.data_ptr();
  a.delta = delta.data_ptr();
  a.grad_q = dq.data_ptr(), a.grad_k = dk.data_ptr(), a.grad_v = dv.data_ptr();
  a.key_splits = splits;
  if (want_bias) {
    // Summed over queries (keys) inside the engine where the bias broadcasts
    // over them; over batch and heads afterwards.
    const auto& b = *bias;
    const int64_t rows = (b.dim() >= 2 && b.size(-2) != 1) ? s.Nq : 1;
    const int64_t cols = (b.dim() >= 1 && b.size(-1) != 1) ? s.Nk : 1;
    dbias = at::zeros({s.B, s.H, rows, cols}, opts);
    a.grad_bias = dbias.data_ptr();
    a.gb_sb = dbias.stride(0), a.gb_sh = dbias.stride(1);
    a.gb_si = rows == 1 ? 0 : dbias.stride(2);
    a.gb_sj = cols == 1 ? 0 : dbias.stride(3);
  }
  if (want_rel) {
    drel = at::zeros({s.B, s.H, s.Nq + s.Nk - 1}, opts);
    a.grad_rel_bias = drel.data_ptr();
  }
  if (want_shaw_k) {
    dshaw_k = at::zeros({s.B, s.H, 2 * p.shaw_K + 1, s.D}, opts);
    a.grad_shaw_k = dshaw_k.data_ptr();
  }
  if (want_shaw_v) {
    dshaw_v = at::zeros({s.B, s.H, 2 * p.shaw_K + 1, s.Dv}, opts);
    a.grad_shaw_v = dshaw_v.data_ptr();
  }
  run_parallel(heads * splits, a, passes(p).backward);

  at::Tensor grad_q = splits == 1 ? dq[0] : dq.sum(0);
  if (s.H != s.Hkv) {
    const int64_t group = s.H / s.Hkv;
    dk = dk.view({s.B, s.Hkv, group, s.Nk, s.D}).sum(2);
    dv = dv.view({s.B, s.Hkv, group, s.Nk, s.Dv}).sum(2);
  }
  dbias = want_bias ? dbias.sum_to_size(bias->sizes()).to(bias->scalar_type()) : at::empty({0}, q.options());
  drel = want_rel ? drel.sum_to_size(rel_bias->sizes()).to(rel_bias->scalar_type()) : at::empty({0}, q.options());
  dshaw_k = want_shaw_k ? dshaw_k.sum_to_size(shaw_k->sizes()).to(shaw_k->scalar_type()) : at::empty({0}, q.options());
  dshaw_v = want_shaw_v ? dshaw_v.sum_to_size(shaw_v->sizes()).to(shaw_v->scalar_type()) : at::empty({0}, q.options());
  const auto dt = q.scalar_type();
  return {grad_q.to(dt), dk.to(dt), dv.to(dt), dbias, drel, dshaw_k, dshaw_v};
}

at::Tensor attention_weights_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const ScoreArgs& sa) {
  const Prepared p = prepare("attention_weights", q, k, v, sa);
  const Shapes& s = p.s;
  const auto opts = p.q.options();
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, opts);
  at::Tensor probs = at::zeros({s.B, s.H, s.Nq, s.Nk}, opts);
  DenseArgs a = engine_args(p);
  a.lse = lse.data_ptr();
  a.probs = probs.data_ptr();
  run_parallel(query_blocks(a), a, passes(p).forward);  // log-sum-exp only (out is null)
  run_parallel(query_blocks(a), a, passes(p).probs);
  return probs.to(q.scalar_type());
}

// `attention` below autograd (inference mode, or no input needs a gradient):
// draw the dropout seed and run the forward.
std::tuple<at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    const OptTensor& bias, bool causal, at::OptionalIntArrayRef window, const OptTensor& alibi,
    double dropout_p, std::optional<double> scale, const OptTensor& t5_table, bool t5_bidirectional,
    int64_t t5_max_distance, const OptTensor& layout, int64_t block_size, const OptTensor& shaw_k,
    const OptTensor& shaw_v, int64_t shaw_max_distance) {
  const OptTensor seed = dropout_p > 0 ? OptTensor(detail::fresh_seed()) : std::nullopt;
  const OptTensor rel =
      detail::t5_bias_or_none("attention", q, k, t5_table, t5_bidirectional, t5_max_distance);
  return attention_forward_cpu(q, k, v, mask, bias, rel, causal, window, alibi, dropout_p, scale,
                               seed, layout, block_size, shaw_k, shaw_v, shaw_max_distance);
}

at::Tensor attention_weights_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const OptTensor& mask, const OptTensor& bias, bool causal,
                                 at::OptionalIntArrayRef window, const OptTensor& alibi,
                                 double dropout_p, std::optional<double> scale,
                                 const OptTensor& t5_table, bool t5_bidirectional,
                                 int64_t t5_max_distance, const OptTensor& layout,
                                 int64_t block_size, const OptTensor& shaw_k,
                                 const OptTensor& shaw_v, int64_t shaw_max_distance) {
  const OptTensor seed = dropout_p > 0 ? OptTensor(detail::fresh_seed()) : std::nullopt;
  const OptTensor rel =
      detail::t5_bias_or_none("attention_weights", q, k, t5_table, t5_bidirectional, t5_max_distance);
  return attention_weights_impl(q, k, v,
                                {mask, bias, rel, causal, window, alibi, dropout_p, scale, seed,
                                 layout, block_size, shaw_k, shaw_v, shaw_max_distance});
}

}  // namespace

// ---------------------------------------------------------------------------
// T5 relative position buckets, exactly as HF transformers'
// T5Attention._relative_position_bucket (float32 log, truncation toward 0).

at::Tensor t5_relative_bucket(const at::Tensor& relative_position, bool bidirectional,
                              int64_t num_buckets, int64_t max_distance) {
  const char* op = "t5_relative_bucket";
  TORCH_CHECK(at::isIntegralType(relative_position.scalar_type(), /*includeBool=*/false), op,
              ": relative_position must be an integer tensor, got ", relative_position.scalar_type());
  TORCH_CHECK(num_buckets >= (bidirectional ? 4 : 2), op, ": num_buckets must be at least ",
              bidirectional ? 4 : 2, ", got ", num_buckets);
  at::Tensor rel = relative_position.to(at::kLong);
  at::Tensor buckets = at::zeros_like(rel);
  if (bidirectional) {
    num_buckets /= 2;
    buckets = buckets + (rel > 0).to(at::kLong) * num_buckets;
    rel = rel.abs();
  } else {
    rel = -at::minimum(rel, at::zeros_like(rel));
  }
  const int64_t max_exact = num_buckets / 2;
  TORCH_CHECK(max_distance > max_exact, op, ": max_distance must exceed the exact range (",
              max_exact, "), got ", max_distance);
  const at::Tensor is_small = rel < max_exact;
  at::Tensor large =
      max_exact + (at::log(rel.to(at::kFloat) / static_cast<float>(max_exact)) /
                   static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact)) *
                   static_cast<float>(num_buckets - max_exact))
                      .to(at::kLong);
  large = at::minimum(large, at::full_like(large, num_buckets - 1));
  return buckets + at::where(is_small, rel, large);
}

namespace detail {

at::Tensor t5_relative_bias(const char* op, const at::Tensor& table, int64_t heads, int64_t Nq,
                            int64_t Nk, bool bidirectional, int64_t max_distance) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == heads, op,
              ": t5_table must have shape (num_buckets, H) with H = ", heads, ", got ",
              shape_str(table.sizes()));
  check_cpu_float(op, "t5_table", table);
  const at::Tensor d = at::arange(1 - Nk, Nq, at::TensorOptions().dtype(at::kLong));
  const at::Tensor buckets = t5_relative_bucket(d, bidirectional, table.size(0), max_distance);
  return table.index_select(0, buckets).t();
}

OptTensor t5_bias_or_none(const char* op, const at::Tensor& q, const at::Tensor& k,
                          const OptTensor& t5_table, bool bidirectional, int64_t max_distance) {
  if (!given(t5_table)) return std::nullopt;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must have shape (B, H, N, D)");
  return t5_relative_bias(op, *t5_table, q.size(1), q.size(2), k.size(2), bidirectional, max_distance);
}

at::Tensor fresh_seed() {
  return at::randint(int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong));
}

}  // namespace detail

at::Tensor alibi_slopes(int64_t num_heads) {
  TORCH_CHECK(num_heads > 0, "alibi_slopes: num_heads must be positive, got ", num_heads);
  // Geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of two; other
  // counts take the closest smaller power of two and complete it with every
  // other slope of the next power of two.
  auto geometric = [](int64_t n) {
    std::vector<double> r(n);
    const double start = std::pow(2.0, -8.0 / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) r[i] = std::pow(start, static_cast<double>(i + 1));
    return r;
  };
  int64_t pow2 = 1;
  while (pow2 * 2 <= num_heads) pow2 *= 2;
  std::vector<double> slopes = geometric(pow2);
  if (pow2 != num_heads) {
    const auto extra = geometric(2 * pow2);
    for (int64_t i = 0; static_cast<int64_t>(slopes.size()) < num_heads; i += 2) slopes.push_back(extra[i]);
  }
  return at::tensor(slopes, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
}

const char* engine_isa() { return engine().isa; }

// Implemented in autograd/attention_autograd.cpp. The schemas are in
// registration.cpp.
std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    const OptTensor& bias, bool causal, at::OptionalIntArrayRef window, const OptTensor& alibi,
    double dropout_p, std::optional<double> scale, const OptTensor& t5_table, bool t5_bidirectional,
    int64_t t5_max_distance, const OptTensor& layout, int64_t block_size, const OptTensor& shaw_k,
    const OptTensor& shaw_v, int64_t shaw_max_distance);

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_weights", &attention_weights_cpu);
  m.impl("_attention_forward", &attention_forward_cpu);
  m.impl("_attention_backward", &attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("alibi_slopes", &alibi_slopes);
  m.impl("t5_relative_bucket", &t5_relative_bucket);
}

TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) { m.impl("attention", &attention_autograd); }

// ---------------------------------------------------------------------------
// Public C++ functions: through the dispatcher, so autograd applies.

namespace {
std::optional<std::vector<int64_t>> window_vec(const AttentionOptions& o) {
  if (!o.window().has_value()) return std::nullopt;
  return std::vector<int64_t>{(*o.window())[0], (*o.window())[1]};
}
at::OptionalIntArrayRef window_ref(const std::optional<std::vector<int64_t>>& w) {
  return w ? at::OptionalIntArrayRef(*w) : at::OptionalIntArrayRef();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const AttentionOptions& o) {
  static const auto op = detail::op_handle<detail::AttentionSig>("attnzoo::attention");
  const auto w = window_vec(o);
  return op.call(q, k, v, o.mask(), o.bias(), o.causal(), window_ref(w), o.alibi_slopes(),
                 o.dropout_p(), o.scale(), o.t5_table(), o.t5_bidirectional(), o.t5_max_distance(),
                 std::nullopt, 0, std::nullopt, std::nullopt, 0);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& o) {
  return std::get<0>(attention_with_lse(q, k, v, o));
}

at::Tensor attention_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& o) {
  static const auto op = detail::op_handle<detail::WeightsSig>("attnzoo::attention_weights");
  const auto w = window_vec(o);
  return op.call(q, k, v, o.mask(), o.bias(), o.causal(), window_ref(w), o.alibi_slopes(),
                 o.dropout_p(), o.scale(), o.t5_table(), o.t5_bidirectional(), o.t5_max_distance(),
                 std::nullopt, 0, std::nullopt, std::nullopt, 0);
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& layout, int64_t block_size, bool causal,
                                  const std::optional<at::Tensor>& mask, double dropout_p,
                                  std::optional<double> scale) {
  static const auto op = detail::op_handle<detail::AttentionSig>("attnzoo::attention");
  TORCH_CHECK(layout.defined(), "block_sparse_attention: layout is undefined");
  return std::get<0>(op.call(q, k, v, mask, std::nullopt, causal, at::OptionalIntArrayRef(),
                             std::nullopt, dropout_p, scale, std::nullopt, true, 128, layout,
                             block_size, std::nullopt, std::nullopt, 0));
}

at::Tensor shaw_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& rel_k, const std::optional<at::Tensor>& rel_v,
                          int64_t max_distance, const std::optional<at::Tensor>& mask, bool causal,
                          double dropout_p, std::optional<double> scale) {
  static const auto op = detail::op_handle<detail::AttentionSig>("attnzoo::attention");
  TORCH_CHECK(rel_k.defined(), "shaw_attention: rel_k is undefined");
  return std::get<0>(op.call(q, k, v, mask, std::nullopt, causal, at::OptionalIntArrayRef(),
                             std::nullopt, dropout_p, scale, std::nullopt, true, 128, std::nullopt,
                             0, rel_k, rel_v, max_distance));
}

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("block_sparse_attention", &block_sparse_attention);
  m.impl("shaw_attention", &shaw_attention);
}

}  // namespace attnzoo::ops
