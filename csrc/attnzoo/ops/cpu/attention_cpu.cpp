// The CPU kernels of attention, attention_weights, _attention_forward and
// _attention_backward: the checked options turned into the engine's plain
// arguments (DenseArgs), and the engine's passes run over ATen's threads.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attnzoo/ops/cpu/cpu_support.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::cpu {

const EngineTable& selected_engine() {
  static const EngineTable* table = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(ATTNZOO_HAVE_ISA_AVX512)
    if (cap == "AVX512") return &engine_AVX512();
#endif
#if defined(ATTNZOO_HAVE_ISA_AVX2)
    if (cap == "AVX2" || cap == "AVX512") return &engine_AVX2();
#endif
    return &engine_DEFAULT();
  }();
  return *table;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("ATTNZOO_HUGE_PAGES");
    return !(env && std::string(env) == "0");
  }();
  constexpr uintptr_t kFresh = uintptr_t(32) << 20, kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
  if (enabled && t.device().is_cpu() && bytes >= kFresh) {
    // Only the 2 MiB-aligned inside: the edges share pages with the
    // allocator's header and whatever lies next to the block.
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
    if (last > first)
      (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
#endif
  return t;
}

}  // namespace attnzoo::cpu

namespace attnzoo::ops {

const char* engine_isa() { return cpu::selected_engine().isa; }

namespace {
// bfloat16 inputs are computed as bfloat16 (tiles.h) where the CPU multiplies
// bfloat16 in hardware and the engine build has the passes; elsewhere, and
// with ATTNZOO_CPU_BF16=0, they are converted to float up front.
bool bf16_engine_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("ATTNZOO_CPU_BF16");
    if (env && std::string(env) == "0") return false;
#if defined(__x86_64__)
    const bool hardware = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
    const bool hardware = false;
#endif
    return hardware && cpu::selected_engine().dense_bf16[0].forward != nullptr;
  }();
  return enabled;
}
}  // namespace

bool cpu_bf16_engine() { return bf16_engine_enabled(); }

namespace {

using cpu::DenseArgs;
using detail::given;
using detail::OptTensor;
using Shapes = detail::Shapes<int64_t>;

// The checked options in the compute type (float or double), contiguous:
// what the engine reads through raw pointers. With bf16 set, q, k and v stay
// bfloat16 for the engine's bfloat16 passes.
struct Prepared {
  Shapes s;
  at::ScalarType compute;
  bool bf16 = false;
  at::Tensor q, k, v, mask, bias, rel_bias, alibi, layout, block_mask_index, block_masks, shaw_k, shaw_v;
  int64_t block_size = 0, shaw_K = 0;
  int64_t left, right;
  double scale, dropout_p;
  uint64_t seed = 0;
};

at::Tensor to_compute(const at::Tensor& t, at::ScalarType compute) { return t.to(compute).contiguous(); }

// Whether a call runs on the bfloat16 passes: Shaw reads q in its hooks and
// has none; the VNNI layouts pair rows, so head dims and layout blocks are even.
bool use_bf16_passes(const at::Tensor& q, const Shapes& s, const AttentionOptions& o) {
  if (q.scalar_type() != at::kBFloat16 || !bf16_engine_enabled()) return false;
  if (given(o.shaw_k()) || s.D % 2 != 0 || s.Dv % 2 != 0) return false;
  return !given(o.layout()) || o.block_size() % 2 == 0;
}

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const AttentionOptions& o, const OptTensor& seed, bool allow_bf16 = true) {
  Prepared p;
  p.s = detail::check_attention<int64_t>(op, q, k, v, o);
  const Shapes& s = p.s;
  p.compute = detail::compute_type(q.scalar_type());
  p.bf16 = allow_bf16 && use_bf16_passes(q, s, o);
  const at::ScalarType input = p.bf16 ? at::kBFloat16 : p.compute;
  p.q = to_compute(q, input);
  p.k = to_compute(k, input);
  p.v = to_compute(v, input);
  if (given(o.mask())) p.mask = o.mask()->contiguous();
  if (given(o.bias())) p.bias = to_compute(*o.bias(), p.compute);
  if (given(o.alibi_slopes())) p.alibi = to_compute(*o.alibi_slopes(), p.compute);
  // T5: the table's entries for the Nq + Nk - 1 relative positions, once per
  // call; the kernel adds them without an Nq x Nk bias.
  if (given(o.t5_table()))
    p.rel_bias = to_compute(
        detail::t5_relative_bias(*o.t5_table(), s.Nq, s.Nk, o.t5_bidirectional(), o.t5_max_distance()),
        p.compute);
  const detail::BlockLayout layout = detail::block_layout(op, o);
  p.layout = layout.layout, p.block_mask_index = layout.mask_index, p.block_masks = layout.masks;
  p.block_size = layout.block;
  if (given(o.shaw_k())) {
    auto table = [&](const at::Tensor& t) {
      return to_compute(t.dim() == 2 ? t.unsqueeze(0) : t, p.compute);
    };
    p.shaw_k = table(*o.shaw_k());
    if (given(o.shaw_v())) p.shaw_v = table(*o.shaw_v());
    p.shaw_K = o.shaw_max_distance();
  }
  const detail::Band band = detail::attention_band(o, s.Nq, s.Nk);
  p.left = band.left, p.right = band.right;
  p.scale = detail::attention_scale(o, s.D);
  p.dropout_p = o.dropout_p();
  if (p.dropout_p > 0) p.seed = detail::seed_value(op, seed);
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
  a.mask = detail::broadcast4(p.mask, s.B, s.H, s.Nq, s.Nk);
  a.bias = detail::broadcast4(p.bias, s.B, s.H, s.Nq, s.Nk);
  if (p.rel_bias.defined()) {
    a.rel_bias = p.rel_bias.data_ptr();  // (H, Nq + Nk - 1): the same for every batch entry
    a.rel_sb = 0, a.rel_sh = p.rel_bias.stride(0);
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
    a.layout_sb = p.layout.size(0) == 1 ? 0 : p.layout.stride(0);
    a.layout_sh = p.layout.size(1) == 1 ? 0 : p.layout.stride(1);
    a.layout_cols = p.layout.size(3);
    if (p.block_mask_index.defined()) {  // same shape and strides as the layout
      a.block_mask_index = p.block_mask_index.data_ptr<int32_t>();
      a.block_masks = static_cast<const uint8_t*>(p.block_masks.data_ptr());
    }
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
  const auto& e = cpu::selected_engine();
  if (p.bf16) {
    const int grads = p.s.H == p.s.Hkv ? 0 : 1;  // GQA groups are summed in float
    return p.layout.defined() ? e.block_sparse_bf16[grads] : e.dense_bf16[grads];
  }
  const int dt = p.compute == at::kDouble ? 1 : 0;
  if (p.layout.defined()) return e.block_sparse[dt];
  if (p.shaw_k.defined()) return e.shaw[dt];
  return e.dense[dt];
}

// Forward / probabilities work items: (b, h, query block of a.block_q).
int64_t query_blocks(const DenseArgs& a) { return a.B * a.H * ((a.Nq + a.block_q - 1) / a.block_q); }

detail::Tensor2 forward_cpu(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionOptions& options, const OptTensor& seed) {
  const Prepared p = prepare(op, q, k, v, options, seed);
  const Shapes& s = p.s;
  at::Tensor out =
      cpu::empty_output({s.B, s.H, s.Nq, s.Dv}, p.q.options());  // bfloat16 on the bfloat16 passes
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, p.q.options().dtype(p.compute));
  DenseArgs a = engine_args(p);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  cpu::run_parallel(query_blocks(a), a, passes(p).forward);
  return {out.to(q.scalar_type()), lse};
}

// sum(a * b, -1) for a and b of one shape and element type In, accumulated
// in Acc (float for bfloat16), without an a * b temporary or float copies.
template <typename In, typename Acc>
at::Tensor rowwise_dot(const at::Tensor& a_, const at::Tensor& b_, at::ScalarType acc_type) {
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  const int64_t n = a.size(-1), rows = a.numel() / std::max<int64_t>(n, 1);
  at::Tensor out = at::empty(a.sizes().slice(0, a.dim() - 1), a.options().dtype(acc_type));
  const In* x = a.const_data_ptr<In>();
  const In* y = b.const_data_ptr<In>();
  Acc* o = out.data_ptr<Acc>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Acc acc = 0;
      for (int64_t c = 0; c < n; ++c) acc += Acc(x[r * n + c]) * Acc(y[r * n + c]);
      o[r] = acc;
    }
  });
  return out;
}

// The gradient of an option tensor from the engine's per-(b, h) accumulator,
// summed to the option's own (broadcast) shape and dtype.
at::Tensor to_option_grad(const at::Tensor& accumulated, const at::Tensor& option) {
  return accumulated.sum_to_size(option.sizes()).to(option.scalar_type());
}

detail::Tensor7 backward_cpu(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const AttentionOptions& o, const OptTensor& seed,
                             detail::OptionGradMask wanted) {
  const char* op = "attention_backward";
  const Prepared p = prepare(op, q, k, v, o, seed);
  const Shapes& s = p.s;
  detail::check_attention_backward(op, grad_out, grad_lse, out, lse, s);
  const auto opts = p.q.options().dtype(p.compute);
  const at::Tensor dout = to_compute(grad_out, p.q.scalar_type());
  const at::Tensor lse_c = to_compute(lse, p.compute);
  // The log-sum-exp is an output too: its gradient g adds g_i * p_ij to the
  // score gradient, which is the same as lowering delta_i by g_i.
  at::Tensor delta = p.bf16 ? rowwise_dot<at::BFloat16, float>(dout, out.to(at::kBFloat16), at::kFloat)
                     : p.compute == at::kDouble
                         ? rowwise_dot<double, double>(dout, to_compute(out, p.compute), at::kDouble)
                         : rowwise_dot<float, float>(dout, to_compute(out, p.compute), at::kFloat);
  if (given(grad_lse)) delta = delta - grad_lse->to(p.compute);
  delta = delta.contiguous();

  const bool want_bias = wanted[0] && p.bias.defined();
  const bool want_rel = wanted[1] && p.rel_bias.defined();
  const bool want_shaw_k = wanted[2] && p.shaw_k.defined();
  const bool want_shaw_v = wanted[3] && p.shaw_v.defined();
  // Score gradients are accumulated per (b, h) by one work item, so a head's
  // key blocks are only split across threads when none is wanted.
  const int64_t key_block = p.layout.defined() ? p.block_size : cpu::kBwdBlockK;
  const int64_t nkb = (s.Nk + key_block - 1) / key_block;
  int64_t splits = 1;
  const int64_t heads = s.B * s.H, threads = at::get_num_threads();
  if (!want_bias && !want_rel && !want_shaw_k && !want_shaw_v && heads < threads && nkb > 1)
    splits = std::min(nkb, (threads + heads - 1) / heads);

  // Uninitialised: the backward pass zeroes what it owns (passes.h).
  at::Tensor dq = cpu::empty_output({splits, s.B, s.H, s.Nq, s.D}, opts);
  // The bfloat16 passes write each key block's dk and dv once, in bfloat16
  // unless GQA groups are summed afterwards.
  const auto kv_opts = p.bf16 && s.H == s.Hkv ? opts.dtype(at::kBFloat16) : opts;
  at::Tensor dk = cpu::empty_output({s.B, s.H, s.Nk, s.D}, kv_opts);
  at::Tensor dv = cpu::empty_output({s.B, s.H, s.Nk, s.Dv}, kv_opts);
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
    const auto& b = *o.bias();
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
  cpu::run_parallel(heads * splits, a, passes(p).backward);

  at::Tensor grad_q = splits == 1 ? dq[0] : dq.sum(0);
  if (s.H != s.Hkv) {
    const int64_t group = s.H / s.Hkv;
    dk = dk.view({s.B, s.Hkv, group, s.Nk, s.D}).sum(2, false, p.compute);  // summed in float
    dv = dv.view({s.B, s.Hkv, group, s.Nk, s.Dv}).sum(2, false, p.compute);
  }
  const at::Tensor none = at::empty({0}, q.options());
  at::Tensor dtable = none;
  if (want_rel) {
    // Each relative position's gradient goes back to its bucket (in order,
    // so the sum is deterministic).
    const auto& table = *o.t5_table();
    const at::Tensor buckets =
        detail::t5_relative_buckets(table.size(0), s.Nq, s.Nk, o.t5_bidirectional(), o.t5_max_distance());
    dtable =
        at::zeros({table.size(0), s.H}, opts).index_add_(0, buckets, drel.sum(0).t()).to(table.scalar_type());
  }
  const auto dt = q.scalar_type();
  return {grad_q.to(dt),
          dk.to(dt),
          dv.to(dt),
          want_bias ? to_option_grad(dbias, *o.bias()) : none,
          dtable,
          want_shaw_k ? to_option_grad(dshaw_k, *o.shaw_k()) : none,
          want_shaw_v ? to_option_grad(dshaw_v, *o.shaw_v()) : none};
}

at::Tensor weights_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const AttentionOptions& o, const OptTensor& seed) {
  const Prepared p = prepare("attention_weights", q, k, v, o, seed, /*allow_bf16=*/false);
  const Shapes& s = p.s;
  const auto opts = p.q.options();
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, opts);
  at::Tensor probs = at::zeros({s.B, s.H, s.Nq, s.Nk}, opts);
  DenseArgs a = engine_args(p);
  a.lse = lse.data_ptr();
  a.probs = probs.data_ptr();
  cpu::run_parallel(query_blocks(a), a, passes(p).forward);  // log-sum-exp only (out is null)
  cpu::run_parallel(query_blocks(a), a, passes(p).probs);
  return probs.to(q.scalar_type());
}

// The kernels with the dispatcher's signatures (op_support.h).
struct CpuBackend {
  static constexpr auto forward = &forward_cpu;
  static constexpr auto weights = &weights_cpu;
  static constexpr auto backward = &backward_cpu;
};

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) { detail::AttentionKernels<CpuBackend>::register_on(m); }

}  // namespace attnzoo::ops
