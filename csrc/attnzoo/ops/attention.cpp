// attnzoo::attention and attention_weights: the public C++ functions, every
// check of their arguments, and their meta kernels (shapes only, for
// torch.compile, FakeTensor and meta tensors). The CPU kernels are in
// cpu/attention_cpu.cpp, the autograd node in autograd/attention_autograd.cpp,
// the schemas in registration.cpp.
#include "attnzoo/ops/attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <iomanip>

#include "attnzoo/ops/attention_variants.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo {
int link_anchor();  // declared in attnzoo/attnzoo.h
int link_anchor() { return 1; }
}  // namespace attnzoo

namespace attnzoo::ops {
namespace detail {
namespace {

// The schema literal of an option's default value.
template <class T>
std::string schema_literal(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "True" : "False";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return std::to_string(value);
  } else if constexpr (std::is_same_v<T, double>) {
    std::ostringstream os;
    os << std::showpoint << std::setprecision(17) << value;
    std::string text = os.str();
    text.erase(text.find_last_not_of('0') + 1);
    return text.back() == '.' ? text + "0" : text;
  } else {
    TORCH_INTERNAL_ASSERT(!value.has_value(), "optional options default to None");
    return "None";
  }
}

template <class Int>
void check_broadcast4(const char* op, const char* name, const at::Tensor& t, const Shapes<Int>& s) {
  const Int want[4] = {s.B, s.H, s.Nq, s.Nk};
  const auto sizes = sizes_of<Int>(t);
  bool ok = t.dim() <= 4;
  for (int64_t d = 0; ok && d < t.dim(); ++d) {
    const Int& size = sizes[sizes.size() - 1 - d];
    ok = size == 1 || size == want[3 - d];
  }
  TORCH_CHECK(ok, op, ": ", name, " of shape ", shape_str(sizes),
              " is not broadcastable to (B, H, Nq, Nk) = ", shape_str(c10::ArrayRef<Int>(want, 4)));
}

void check_floating(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  check_same_device(op, name, t, "q", q);
}

}  // namespace

std::string attention_options_schema() {
  std::string out;
#define ATTNZOO_OPTION_SCHEMA(name, T, default_value)                                  \
  out += std::string(out.empty() ? "" : ", ") + OptionArg<T>::schema + " " #name "=" + \
         schema_literal<T>(T(default_value));
  ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_OPTION_SCHEMA)
#undef ATTNZOO_OPTION_SCHEMA
  return out;
}

template <class Int>
Shapes<Int> check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionOptions& o) {
  for (auto [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must have shape (B, H, N, D), got ", t->dim(),
                " dimensions ", shape_str(*t));
    check_input_dtype(op, name, *t);
    TORCH_CHECK(t->device() == q.device(), op, ": q, k and v must be on one device, got q on ", q.device(),
                ", ", name, " on ", t->device());
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const auto qs = sizes_of<Int>(q), ks = sizes_of<Int>(k), vs = sizes_of<Int>(v);
  Shapes<Int> s{qs[0], qs[1], ks[1], qs[2], ks[2], qs[3], vs[3]};
  TORCH_CHECK(ks[0] == s.B && vs[0] == s.B, op, ": q, k and v must have the same batch size B, got q ",
              shape_str(q), ", k ", shape_str(k), ", v ", shape_str(v));
  TORCH_CHECK(vs[1] == s.Hkv, op, ": k and v must have the same number of heads, got k ", shape_str(k),
              " and v ", shape_str(v));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": the heads of q (H=", s.H,
              ") must be a multiple of the heads of k and v (Hkv=", s.Hkv, ")");
  TORCH_CHECK(vs[2] == s.Nk, op, ": k and v must have the same sequence length, got k ", shape_str(k),
              " and v ", shape_str(v));
  TORCH_CHECK(ks[3] == s.D, op, ": q and k must have the same head dim D, got q ", shape_str(q), " and k ",
              shape_str(k));
  TORCH_CHECK(s.D > 0, op, ": head dim D of q and k must be positive");

  if (given(o.mask())) {
    const auto& m = *o.mask();
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be a bool tensor (True = may attend), got ",
                m.scalar_type(), "; pass an additive float mask as bias=");
    check_same_device(op, "mask", m, "q", q);
    check_broadcast4(op, "mask", m, s);
  }
  if (given(o.bias())) {
    check_floating(op, "bias", *o.bias(), q);
    check_broadcast4(op, "bias", *o.bias(), s);
  }
  if (given(o.alibi_slopes())) {
    const auto& a = *o.alibi_slopes();
    check_floating(op, "alibi_slopes", a, q);
    const auto as = sizes_of<Int>(a);
    TORCH_CHECK((a.dim() == 1 && as[0] == s.H) || (a.dim() == 2 && as[0] == s.B && as[1] == s.H), op,
                ": alibi_slopes must have shape (H,) = (", s.H, ",) or (B, H) = (", s.B, ", ", s.H, "), got ",
                shape_str(a));
  }
  if (given(o.t5_table())) {
    const auto& t = *o.t5_table();
    check_floating(op, "t5_table", t, q);
    TORCH_CHECK(t.dim() == 2 && sizes_of<Int>(t)[1] == s.H, op,
                ": t5_table must have shape (num_buckets, H) with H = ", s.H, ", got ", shape_str(t));
    TORCH_CHECK(sizes_of<Int>(t)[0] >= (o.t5_bidirectional() ? 4 : 2), op, ": t5_table must have at least ",
                o.t5_bidirectional() ? 4 : 2, " buckets, got ", shape_str(t));
  }
  if (given(o.layout())) {
    const auto& l = *o.layout();
    const int64_t bs = o.block_size();
    TORCH_CHECK(bs > 0, op, ": block_size must be positive, got ", bs);
    TORCH_CHECK(l.scalar_type() == at::kBool, op, ": layout must be a bool tensor, got ", l.scalar_type());
    check_same_device(op, "layout", l, "q", q);
    const Int rows = (s.Nq + bs - 1) / bs, cols = (s.Nk + bs - 1) / bs;
    const auto ls = sizes_of<Int>(l);
    const bool three = l.dim() == 3 && (ls[0] == 1 || ls[0] == s.H) && ls[1] == rows && ls[2] == cols;
    const bool four = l.dim() == 4 && (ls[0] == 1 || ls[0] == s.B) && (ls[1] == 1 || ls[1] == s.H) &&
                      ls[2] == rows && ls[3] == cols;
    TORCH_CHECK(three || four, op,
                ": layout must have shape (H or 1, ceil(Nq/block_size), ceil(Nk/block_size)) = (", s.H,
                " or 1, ", rows, ", ", cols, ") or (B or 1, H or 1, ", rows, ", ", cols, ") for block_size ",
                bs, ", got ", shape_str(l));
  }
  if (given(o.block_masks()) || given(o.block_mask_index())) {
    TORCH_CHECK(
        given(o.layout()), op,
        ": block_masks needs a layout (block_masks and block_mask_index refine a block-sparse layout)");
    TORCH_CHECK(given(o.block_masks()) && given(o.block_mask_index()), op,
                ": block_masks and block_mask_index must be given together");
    const auto& index = *o.block_mask_index();
    const auto& masks = *o.block_masks();
    const int64_t bs = o.block_size();
    TORCH_CHECK(index.scalar_type() == at::kInt, op, ": block_mask_index must be an int32 tensor, got ",
                index.scalar_type());
    TORCH_CHECK(index.sym_sizes().equals(o.layout()->sym_sizes()), op,
                ": block_mask_index must have the layout's shape ", shape_str(*o.layout()), ", got ",
                shape_str(index));
    TORCH_CHECK(masks.scalar_type() == at::kBool, op, ": block_masks must be a bool tensor, got ",
                masks.scalar_type());
    TORCH_CHECK(masks.dim() == 3 && sizes_of<Int>(masks)[1] == bs && sizes_of<Int>(masks)[2] == bs, op,
                ": block_masks must have shape (P, block_size, block_size) = (P, ", bs, ", ", bs, "), got ",
                shape_str(masks));
    check_same_device(op, "block_mask_index", index, "q", q);
    check_same_device(op, "block_masks", masks, "q", q);
  }
  if (given(o.shaw_k())) {
    TORCH_CHECK(!given(o.layout()), op, ": Shaw relative positions and a block layout cannot be combined");
    const int64_t K = o.shaw_max_distance();
    TORCH_CHECK(K >= 0, op, ": max_distance must be >= 0, got ", K);
    auto check_table = [&](const char* name, const at::Tensor& t, const Int& dim) {
      check_floating(op, name, t, q);
      const auto ts = sizes_of<Int>(t);
      TORCH_CHECK((t.dim() == 2 && ts[0] == 2 * K + 1 && ts[1] == dim) ||
                      (t.dim() == 3 && ts[0] == s.H && ts[1] == 2 * K + 1 && ts[2] == dim),
                  op, ": ", name, " must have shape (2K+1, ", dim, ") or (H, 2K+1, ", dim,
                  ") with K = max_distance = ", K, ", H = ", s.H, ", got ", shape_str(t));
    };
    check_table("rel_k", *o.shaw_k(), s.D);
    if (given(o.shaw_v())) check_table("rel_v", *o.shaw_v(), s.Dv);
  } else {
    TORCH_CHECK(!given(o.shaw_v()), op, ": rel_v needs rel_k");
  }
  if (o.window().has_value()) {
    const auto& w = *o.window();
    TORCH_CHECK(w[0] >= 0 && w[1] >= 0, op, ": window sizes must be >= 0, got (", w[0], ", ", w[1], ")");
  }
  TORCH_CHECK(!o.scale().has_value() || std::isfinite(*o.scale()), op, ": scale must be finite, got ",
              *o.scale());
  TORCH_CHECK(std::isfinite(o.dropout_p()) && o.dropout_p() >= 0.0 && o.dropout_p() <= 1.0, op,
              ": dropout_p must be in [0, 1], got ", o.dropout_p());
  return s;
}

template <class Int>
void check_attention_backward(const char* op, const at::Tensor& grad_out, const OptTensor& grad_lse,
                              const at::Tensor& out, const at::Tensor& lse, const Shapes<Int>& s) {
  const Int out_sizes[4] = {s.B, s.H, s.Nq, s.Dv};
  const c10::ArrayRef<Int> want_out(out_sizes, 4), want_lse(out_sizes, 3);
  TORCH_CHECK(sizes_of<Int>(grad_out) == want_out && sizes_of<Int>(out) == want_out, op,
              ": grad_out and out must have shape (B, H, Nq, Dv) = ", shape_str(want_out), ", got ",
              shape_str(grad_out), " and ", shape_str(out));
  TORCH_CHECK(sizes_of<Int>(lse) == want_lse && (!given(grad_lse) || sizes_of<Int>(*grad_lse) == want_lse),
              op, ": lse and grad_lse must have shape (B, H, Nq) = ", shape_str(want_lse), ", got ",
              shape_str(lse), " and ", given(grad_lse) ? shape_str(*grad_lse) : std::string("none"));
}

template Shapes<int64_t> check_attention<int64_t>(const char*, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const AttentionOptions&);
template Shapes<c10::SymInt> check_attention<c10::SymInt>(const char*, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const AttentionOptions&);
template void check_attention_backward<int64_t>(const char*, const at::Tensor&, const OptTensor&,
                                                const at::Tensor&, const at::Tensor&, const Shapes<int64_t>&);
template void check_attention_backward<c10::SymInt>(const char*, const at::Tensor&, const OptTensor&,
                                                    const at::Tensor&, const at::Tensor&,
                                                    const Shapes<c10::SymInt>&);

at::Tensor t5_relative_buckets(int64_t num_buckets, int64_t Nq, int64_t Nk, bool bidirectional,
                               int64_t max_distance) {
  const at::Tensor d = at::arange(1 - Nk, Nq, at::TensorOptions().dtype(at::kLong));
  return t5_relative_bucket(d, bidirectional, num_buckets, max_distance);
}

at::Tensor t5_relative_bias(const at::Tensor& table, int64_t Nq, int64_t Nk, bool bidirectional,
                            int64_t max_distance) {
  return table.index_select(0, t5_relative_buckets(table.size(0), Nq, Nk, bidirectional, max_distance)).t();
}

at::Tensor fresh_seed() { return at::randint(int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong)); }

}  // namespace detail

using detail::given;
using detail::OptTensor;

// ---------------------------------------------------------------------------
// Meta kernels: the checks above on symbolic sizes, then empty outputs.

namespace {

using SymShapes = detail::Shapes<c10::SymInt>;

detail::Tensor2 forward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& options) {
  const SymShapes s = detail::check_attention<c10::SymInt>("attention", q, k, v, options);
  return {at::empty_symint({s.B, s.H, s.Nq, s.Dv}, q.options()),
          at::empty_symint({s.B, s.H, s.Nq}, q.options().dtype(detail::compute_type(q.scalar_type())))};
}

detail::Tensor2 attention_meta(const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v ATTNZOO_OPTION_PARAMS) {
  ATTNZOO_OPTIONS_FROM_PARAMS
  return forward_meta(q, k, v, options);
}

detail::Tensor2 attention_forward_meta(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v ATTNZOO_OPTION_PARAMS, const OptTensor&) {
  ATTNZOO_OPTIONS_FROM_PARAMS
  return forward_meta(q, k, v, options);
}

at::Tensor attention_weights_meta(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v ATTNZOO_OPTION_PARAMS) {
  ATTNZOO_OPTIONS_FROM_PARAMS
  const SymShapes s = detail::check_attention<c10::SymInt>("attention_weights", q, k, v, options);
  return at::empty_symint({s.B, s.H, s.Nq, s.Nk}, q.options());
}

// A gradient shaped like `input` when it is wanted, else an empty tensor.
at::Tensor grad_like(const OptTensor& input, bool wanted, const at::Tensor& q) {
  return wanted && given(input) ? at::empty_symint(input->sym_sizes(), input->options())
                                : at::empty({0}, q.options());
}

detail::Tensor7 attention_backward_meta(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& out, const at::Tensor& lse ATTNZOO_OPTION_PARAMS,
                                        const OptTensor&, detail::OptionGradMask wanted) {
  ATTNZOO_OPTIONS_FROM_PARAMS
  const char* op = "attention_backward";
  const SymShapes s = detail::check_attention<c10::SymInt>(op, q, k, v, options);
  detail::check_attention_backward(op, grad_out, grad_lse, out, lse, s);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options()), grad_like(options.bias(), wanted[0], q),
          grad_like(options.t5_table(), wanted[1], q),  grad_like(options.shaw_k(), wanted[2], q),
          grad_like(options.shaw_v(), wanted[3], q)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, Meta, m) {
  m.impl("attention", &attention_meta);
  m.impl("attention_weights", &attention_weights_meta);
  m.impl("_attention_forward", &attention_forward_meta);
  m.impl("_attention_backward", &attention_backward_meta);
}

// attention_weights is for inspection: below autograd, so its result never
// claims a gradient it does not have.
TORCH_LIBRARY_IMPL(attnzoo, Autograd, m) {
  m.impl("attention_weights", torch::CppFunction::makeFallthrough());
}

// ---------------------------------------------------------------------------
// T5 relative position buckets, exactly as HF transformers'
// T5Attention._relative_position_bucket (float32 log, truncation toward 0).

at::Tensor t5_relative_bucket(const at::Tensor& relative_position, bool bidirectional, int64_t num_buckets,
                              int64_t max_distance) {
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
  TORCH_CHECK(max_distance > max_exact, op, ": max_distance must exceed the exact range (", max_exact,
              "), got ", max_distance);
  const at::Tensor is_small = rel < max_exact;
  at::Tensor large =
      max_exact + (at::log(rel.to(at::kFloat) / static_cast<float>(max_exact)) /
                   static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact)) *
                   static_cast<float>(num_buckets - max_exact))
                      .to(at::kLong);
  large = at::minimum(large, at::full_like(large, num_buckets - 1));
  return buckets + at::where(is_small, rel, large);
}

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

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("alibi_slopes", &alibi_slopes);
  m.impl("t5_relative_bucket", &t5_relative_bucket);
}

// ---------------------------------------------------------------------------
// Public C++ functions: through the dispatcher, so autograd applies.

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const AttentionOptions& options) {
  static const auto op = detail::op_handle<detail::AttentionSig>("attnzoo::attention");
  return op.call(q, k, v ATTNZOO_OPTION_VALUES);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options) {
  return std::get<0>(attention_with_lse(q, k, v, options));
}

at::Tensor attention_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& options) {
  static const auto op = detail::op_handle<detail::WeightsSig>("attnzoo::attention_weights");
  return op.call(q, k, v ATTNZOO_OPTION_VALUES);
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& layout, int64_t block_size, bool causal,
                                  const std::optional<at::Tensor>& mask, double dropout_p,
                                  std::optional<double> scale) {
  TORCH_CHECK(layout.defined(), "block_sparse_attention: layout is undefined");
  return attention(q, k, v,
                   AttentionOptions()
                       .layout(layout)
                       .block_size(block_size)
                       .causal(causal)
                       .mask(mask)
                       .dropout_p(dropout_p)
                       .scale(scale));
}

at::Tensor shaw_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& rel_k, const std::optional<at::Tensor>& rel_v,
                          int64_t max_distance, const std::optional<at::Tensor>& mask, bool causal,
                          double dropout_p, std::optional<double> scale) {
  TORCH_CHECK(rel_k.defined(), "shaw_attention: rel_k is undefined");
  return attention(q, k, v,
                   AttentionOptions()
                       .shaw_k(rel_k)
                       .shaw_v(rel_v)
                       .shaw_max_distance(max_distance)
                       .mask(mask)
                       .causal(causal)
                       .dropout_p(dropout_p)
                       .scale(scale));
}

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("block_sparse_attention", &block_sparse_attention);
  m.impl("shaw_attention", &shaw_attention);
}

}  // namespace attnzoo::ops
