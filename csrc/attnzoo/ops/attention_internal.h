#pragma once
// Shared by attention.cpp and autograd/attention_autograd.cpp; not installed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::ops::detail {

// Signatures of the internal ops (see the schemas in registration.cpp). The
// score arguments come in one order everywhere:
//   mask, bias, rel_bias, causal, window, alibi_slopes, dropout_p, scale,
//   seed, layout, block_size, shaw_k, shaw_v, shaw_max_distance
using OptTensor = std::optional<at::Tensor>;
using ForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, bool, at::OptionalIntArrayRef, const OptTensor&, double,
    std::optional<double>, const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
    const OptTensor&, int64_t);
using BackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        bool, at::OptionalIntArrayRef, const OptTensor&, double, std::optional<double>,
        const OptTensor&, const OptTensor&, int64_t, const OptTensor&, const OptTensor&, int64_t,
        bool, bool, bool, bool, const OptTensor&);
// The public op: q, k, v, mask, bias, causal, window, alibi_slopes,
// dropout_p, scale, t5_table, t5_bidirectional, t5_max_distance, layout,
// block_size, shaw_k, shaw_v, shaw_max_distance.
using AttentionSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    bool, at::OptionalIntArrayRef, const OptTensor&, double, std::optional<double>,
    const OptTensor&, bool, int64_t, const OptTensor&, int64_t, const OptTensor&, const OptTensor&,
    int64_t);
using WeightsSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const OptTensor&, const OptTensor&, bool, at::OptionalIntArrayRef,
                              const OptTensor&, double, std::optional<double>, const OptTensor&,
                              bool, int64_t, const OptTensor&, int64_t, const OptTensor&,
                              const OptTensor&, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The (H, Nq + Nk - 1) bias vector of a T5 bucket table (num_buckets, H):
// entry d + Nk - 1 is table[bucket(d), h] for the relative position
// d = j - p_i. Differentiable (a gather), checked against q's head count.
at::Tensor t5_relative_bias(const char* op, const at::Tensor& table, int64_t heads, int64_t Nq,
                            int64_t Nk, bool bidirectional, int64_t max_distance);

// The T5 arguments of the public ops -> that bias vector, or none.
OptTensor t5_bias_or_none(const char* op, const at::Tensor& q, const at::Tensor& k,
                          const OptTensor& t5_table, bool bidirectional, int64_t max_distance);

// A fresh dropout seed, drawn by an ATen op from the default generator.
at::Tensor fresh_seed();

// The engine build chosen for this CPU.
const cpu::EngineTable& engine();

// Runs an engine range function over work items [0, items) on ATen's
// threads, with BLAS kept to the calling thread inside each.
template <class Args>
void run_parallel(int64_t items, const Args& a, void (*fn)(const Args&, int64_t, int64_t)) {
  if (items <= 0) return;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    cpu::SingleThreadedBlas single_threaded;
    fn(a, begin, end);
  });
}

// LSH internal op signatures (see registration.cpp).
using LshForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, const OptTensor&, double,
    const OptTensor&);
using LshBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, bool, const OptTensor&, double, const OptTensor&);

}  // namespace attnzoo::ops::detail
