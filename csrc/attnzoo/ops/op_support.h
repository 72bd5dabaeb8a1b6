#pragma once
// What the op files share (not installed): the one shape printer, the one
// "is this optional tensor set" test, typed dispatcher handles, and the
// machinery that turns the option list of attention.h
// (ATTNZOO_ATTENTION_OPTIONS) into a schema, a signature, a call and a kernel.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "attnzoo/ops/attention.h"
#include "attnzoo/ops/score_rules.h"

namespace attnzoo::ops::detail {

using OptTensor = std::optional<at::Tensor>;

// Whether an optional tensor argument was given (set and defined).
inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
// An undefined tensor (a node's absent seed or gradient) as an absent option.
inline OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// "(2, 6, 10,)" style: sizes as Python prints a shape tuple. For plain and
// symbolic sizes (the meta kernels see symbolic ones under torch.compile).
template <class Int>
std::string shape_str(c10::ArrayRef<Int> sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}
inline std::string shape_str(const at::Tensor& t) {
  return t.defined() ? shape_str(t.sym_sizes()) : std::string("undefined");
}

// A tensor's sizes as the kernels read them: plain on real tensors, symbolic
// (c10::SymInt) in the meta kernels, so one check function serves both.
template <class Int>
c10::ArrayRef<Int> sizes_of(const at::Tensor& t);
template <>
inline c10::ArrayRef<int64_t> sizes_of<int64_t>(const at::Tensor& t) {
  return t.sizes();
}
template <>
inline c10::ArrayRef<c10::SymInt> sizes_of<c10::SymInt>(const at::Tensor& t) {
  return t.sym_sizes();
}

// A typed handle of a registered op; Sig is the C++ signature of its schema.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A fresh dropout seed, drawn by an ATen op from the default generator (so
// torch.manual_seed reproduces it and a traced graph draws a new one per call).
at::Tensor fresh_seed();
// The seed a kernel was handed for dropout (one made by fresh_seed()).
inline uint64_t seed_value(const char* op, const OptTensor& seed) {
  TORCH_CHECK(given(seed) && seed->numel() == 1, op, ": dropout needs a one-element int64 seed tensor");
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// The type the kernels compute in, and the log-sum-exp's: float64 for
// float64 inputs, float32 for float32 and bfloat16 ones.
inline at::ScalarType compute_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The argument checks the ops share; each message names the op and the argument.
// An attention input (q, k, v, qk): float32, float64, bfloat16 or float16.
inline void check_input_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
}
// The band of visible keys as both engines read it (score_rules.h): causal
// and window folded into (left, right), with any bound >= Nq + Nk meaning
// unbounded (which keeps the index arithmetic far from overflow).
struct Band {
  int64_t left, right;
};
inline Band attention_band(const AttentionOptions& o, int64_t Nq, int64_t Nk) {
  const int64_t unbounded = Nq + Nk + 1;
  Band band{unbounded, o.causal() ? 0 : unbounded};
  if (o.window().has_value()) {
    band.left = std::min(band.left, (*o.window())[0]);
    band.right = std::min(band.right, (*o.window())[1]);
  }
  return band;
}
// The score scale: the option, or 1/sqrt(D).
inline double attention_scale(const AttentionOptions& o, int64_t D) {
  return o.scale().value_or(1.0 / std::sqrt(static_cast<double>(D)));
}

// A mask or bias as the kernels read it: broadcast to (B, H, Nq, Nk), its
// data pointer and strides (empty for an undefined tensor).
inline rules::Broadcast4 broadcast4(const at::Tensor& t, int64_t B, int64_t H, int64_t Nq, int64_t Nk) {
  rules::Broadcast4 view;
  if (!t.defined()) return view;
  const auto e = t.expand({B, H, Nq, Nk});
  view.data = e.data_ptr();
  view.sb = e.stride(0), view.sh = e.stride(1), view.si = e.stride(2), view.sj = e.stride(3);
  return view;
}

// A layout and its block masks as both engines read them: (Bl, Hl, rows,
// cols) contiguous (a 3-D layout is shared by the batch), and
// block_mask_index checked against the number of masks (a data check, so
// here and not in check_attention, which also runs on meta tensors).
struct BlockLayout {
  at::Tensor layout, mask_index, masks;
  int64_t block = 0;
};
inline BlockLayout block_layout(const char* op, const AttentionOptions& o) {
  BlockLayout l;
  if (!given(o.layout())) return l;
  auto as_4d = [](const at::Tensor& t) { return (t.dim() == 3 ? t.unsqueeze(0) : t).contiguous(); };
  l.layout = as_4d(*o.layout());
  l.block = o.block_size();
  if (given(o.block_mask_index())) {
    l.mask_index = as_4d(*o.block_mask_index());
    l.masks = o.block_masks()->contiguous();
    const int64_t P = l.masks.size(0);
    if (l.mask_index.numel() > 0) {
      const int64_t min = l.mask_index.min().item<int32_t>(), max = l.mask_index.max().item<int32_t>();
      TORCH_CHECK(min >= -1 && max < P, op, ": block_mask_index entries must lie in [-1, ", P,
                  ") (-1 = no mask, else a row of block_masks), got entries from ", min, " to ", max);
    }
  }
  return l;
}

// An optional argument on the device of the main input (q, or qk).
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* main_name,
                              const at::Tensor& main) {
  TORCH_CHECK(t.device() == main.device(), op, ": ", name, " is on ", t.device(), ", ", main_name, " on ",
              main.device());
}

// ---------------------------------------------------------------------------
// From the option list to the dispatcher. Each option's C++ type maps to the
// type the dispatcher passes for its schema type, and back.

template <class T>
struct OptionArg;  // schema type name, dispatcher parameter type, conversions
template <>
struct OptionArg<OptTensor> {
  static constexpr const char* schema = "Tensor?";
  using type = const OptTensor&;
  static const OptTensor& to(const OptTensor& v) { return v; }
  static OptTensor from(const OptTensor& v) { return given(v) ? v : std::nullopt; }
};
// Options the dispatcher passes as they are: only the schema type differs.
template <class T>
struct PlainOptionArg {
  using type = T;
  static T to(T v) { return v; }
  static T from(T v) { return v; }
};
template <>
struct OptionArg<bool> : PlainOptionArg<bool> {
  static constexpr const char* schema = "bool";
};
template <>
struct OptionArg<int64_t> : PlainOptionArg<int64_t> {
  static constexpr const char* schema = "int";
};
template <>
struct OptionArg<double> : PlainOptionArg<double> {
  static constexpr const char* schema = "float";
};
template <>
struct OptionArg<std::optional<double>> : PlainOptionArg<std::optional<double>> {
  static constexpr const char* schema = "float?";
};
template <>
struct OptionArg<std::optional<AttentionWindow>> {
  static constexpr const char* schema = "int[]?";
  using type = at::OptionalIntArrayRef;
  // Points into the options object, which outlives the call.
  static at::OptionalIntArrayRef to(const std::optional<AttentionWindow>& w) {
    return w ? at::OptionalIntArrayRef(at::IntArrayRef(w->data(), w->size())) : at::OptionalIntArrayRef();
  }
  static std::optional<AttentionWindow> from(at::OptionalIntArrayRef w) {
    if (!w.has_value()) return std::nullopt;
    TORCH_CHECK(w->size() == 2, "attention: window must be (left, right), got ", w->size(), " values");
    return AttentionWindow{(*w)[0], (*w)[1]};
  }
};

// The schema text of the options, "Tensor? mask=None, ..., int shaw_max_distance=0".
std::string attention_options_schema();

// Type lists, parameter lists, values and assignments made from the option list.
#define ATTNZOO_OPTION_TYPE(name, T, default_value) , typename ::attnzoo::ops::detail::OptionArg<T>::type
#define ATTNZOO_OPTION_PARAM(name, T, default_value) \
  , typename ::attnzoo::ops::detail::OptionArg<T>::type name
#define ATTNZOO_OPTION_VALUE(name, T, default_value) \
  , ::attnzoo::ops::detail::OptionArg<T>::to(options.name())
#define ATTNZOO_OPTION_FROM_PARAM(name, T, default_value) \
  options.name(::attnzoo::ops::detail::OptionArg<T>::from(name));

// After (q, k, v) or other leading tensors: the options' types / parameters / values.
#define ATTNZOO_OPTION_TYPES ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_OPTION_TYPE)
#define ATTNZOO_OPTION_PARAMS ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_OPTION_PARAM)
// Expands to ", value, value, ..." from a variable named `options`.
#define ATTNZOO_OPTION_VALUES ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_OPTION_VALUE)
// Inside a function declared with ATTNZOO_OPTION_PARAMS: AttentionOptions `options` from them.
#define ATTNZOO_OPTIONS_FROM_PARAMS \
  AttentionOptions options;         \
  ATTNZOO_ATTENTION_OPTIONS(ATTNZOO_OPTION_FROM_PARAM)

// ---------------------------------------------------------------------------
// The attention ops' C++ signatures (their schemas are in registration.cpp):
//   attention(q, k, v, *, options) -> (out, lse)
//   attention_weights(q, k, v, *, options) -> probs
//   _attention_forward(q, k, v, *, options, seed) -> (out, lse)
//   _attention_backward(grad_out, grad_lse, q, k, v, out, lse, *, options, seed,
//                       output_mask) -> (grad_q, grad_k, grad_v, grad_bias,
//                       grad_t5_table, grad_shaw_k, grad_shaw_v)
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor7 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Which option gradients the backward computes: bias, t5_table, shaw_k, shaw_v.
using OptionGradMask = std::array<bool, 4>;
using AttentionSig = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor& ATTNZOO_OPTION_TYPES);
using WeightsSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor& ATTNZOO_OPTION_TYPES);
using ForwardSig = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor& ATTNZOO_OPTION_TYPES,
                           const OptTensor&);
using BackwardSig = Tensor7(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor& ATTNZOO_OPTION_TYPES,
                            const OptTensor&, OptionGradMask);

// The four attention kernels of a device, with the dispatcher's signatures,
// from a backend that implements them on AttentionOptions:
//   Backend::forward(op, q, k, v, options, seed) -> (out, lse)
//   Backend::weights(q, k, v, options, seed) -> probs
//   Backend::backward(grad_out, grad_lse, q, k, v, out, lse, options, seed, output_mask)
// Below autograd (inference, or nothing needs a gradient) attention and
// attention_weights draw their dropout seed here.
template <class Backend>
struct AttentionKernels {
  static OptTensor seed_for(const AttentionOptions& o) {
    return o.dropout_p() > 0 ? OptTensor(fresh_seed()) : std::nullopt;
  }
  static Tensor2 attention(const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v ATTNZOO_OPTION_PARAMS) {
    ATTNZOO_OPTIONS_FROM_PARAMS
    return Backend::forward("attention", q, k, v, options, seed_for(options));
  }
  static at::Tensor weights(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v ATTNZOO_OPTION_PARAMS) {
    ATTNZOO_OPTIONS_FROM_PARAMS
    return Backend::weights(q, k, v, options, seed_for(options));
  }
  static Tensor2 forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v ATTNZOO_OPTION_PARAMS,
                         const OptTensor& seed) {
    ATTNZOO_OPTIONS_FROM_PARAMS
    return Backend::forward("attention", q, k, v, options, seed);
  }
  static Tensor7 backward(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                          const at::Tensor& lse ATTNZOO_OPTION_PARAMS, const OptTensor& seed,
                          OptionGradMask output_mask) {
    ATTNZOO_OPTIONS_FROM_PARAMS
    return Backend::backward(grad_out, grad_lse, q, k, v, out, lse, options, seed, output_mask);
  }
  // m.impl(...) of the four ops for this backend's dispatch key.
  template <class Library>
  static void register_on(Library& m) {
    m.impl("attention", &attention);
    m.impl("attention_weights", &weights);
    m.impl("_attention_forward", &forward);
    m.impl("_attention_backward", &backward);
  }
};

// The shapes every attention kernel works with, plain or symbolic.
template <class Int>
struct Shapes {
  Int B, H, Hkv, Nq, Nk, D, Dv;
};

// Every check of the attention ops' arguments, in one place: the CPU kernels
// call it with plain sizes, the meta kernels (shape inference for
// torch.compile, FakeTensor and meta tensors) with symbolic ones, so tracing
// fails where running would. Every message names the op and the argument.
template <class Int>
Shapes<Int> check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionOptions& options);
// The backward's own arguments: grad_out and out (B, H, Nq, Dv), lse and
// grad_lse (B, H, Nq).
template <class Int>
void check_attention_backward(const char* op, const at::Tensor& grad_out, const OptTensor& grad_lse,
                              const at::Tensor& out, const at::Tensor& lse, const Shapes<Int>& s);

// The (H, Nq + Nk - 1) bias of a T5 bucket table (num_buckets, H): entry
// d + Nk - 1 is table[bucket(d), h] for the relative position d = j - p_i.
at::Tensor t5_relative_bias(const at::Tensor& table, int64_t Nq, int64_t Nk, bool bidirectional,
                            int64_t max_distance);
// The buckets of the relative positions 1 - Nk .. Nq - 1 (those entries).
at::Tensor t5_relative_buckets(int64_t num_buckets, int64_t Nq, int64_t Nk, bool bidirectional,
                               int64_t max_distance);

}  // namespace attnzoo::ops::detail
