#pragma once
// What the op files share (not installed): the one shape printer, the one
// "is this optional tensor set" test, typed dispatcher handles, and the
// machinery that turns the option list of attention.h
// (ATTNZOO_ATTENTION_OPTIONS) into a schema, a signature, a call and a kernel.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "attnzoo/ops/attention.h"

namespace attnzoo::ops::detail {

using OptTensor = std::optional<at::Tensor>;

// Whether an optional tensor argument was given (set and defined).
inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

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
template <>
struct OptionArg<bool> {
  static constexpr const char* schema = "bool";
  using type = bool;
  static bool to(bool v) { return v; }
  static bool from(bool v) { return v; }
};
template <>
struct OptionArg<int64_t> {
  static constexpr const char* schema = "int";
  using type = int64_t;
  static int64_t to(int64_t v) { return v; }
  static int64_t from(int64_t v) { return v; }
};
template <>
struct OptionArg<double> {
  static constexpr const char* schema = "float";
  using type = double;
  static double to(double v) { return v; }
  static double from(double v) { return v; }
};
template <>
struct OptionArg<std::optional<double>> {
  static constexpr const char* schema = "float?";
  using type = std::optional<double>;
  static std::optional<double> to(std::optional<double> v) { return v; }
  static std::optional<double> from(std::optional<double> v) { return v; }
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

// The (H, Nq + Nk - 1) bias of a T5 bucket table (num_buckets, H): entry
// d + Nk - 1 is table[bucket(d), h] for the relative position d = j - p_i.
at::Tensor t5_relative_bias(const at::Tensor& table, int64_t Nq, int64_t Nk, bool bidirectional,
                            int64_t max_distance);
// The buckets of the relative positions 1 - Nk .. Nq - 1 (those entries).
at::Tensor t5_relative_buckets(int64_t num_buckets, int64_t Nq, int64_t Nk, bool bidirectional,
                               int64_t max_distance);

}  // namespace attnzoo::ops::detail
