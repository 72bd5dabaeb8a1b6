// The ops composed of ATen ops and the fused attention op, each with its
// checks: rotary embeddings, Linformer, token-exact Longformer and kernelised
// linear attention. Most are registered as CompositeImplicitAutograd, so
// autograd, meta/fake tensors and torch.compile follow from their parts.
// Longformer has its own autograd node (longformer_support.h): its two
// engine calls' outputs and gradients are merged in place.
#include "attnzoo/ops/attention_variants.h"

#include <ATen/ATen.h>
#include <ATen/functorch/TensorWrapper.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <limits>
#include <vector>

#include "attnzoo/ops/attention.h"
#include "attnzoo/ops/linear_support.h"
#include "attnzoo/ops/longformer_support.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::shape_str;

void check_bhnd(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() == 4, op, ": ", name, " must have shape (B, H, N, D), got ",
              shape_str(t));
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
}

// Tensor (B, Nk) bool -> (B, 1, Nk, 1) for masking rows of keys/values.
at::Tensor key_rows(const char* op, const at::Tensor& key_mask, int64_t B, int64_t Nk) {
  TORCH_CHECK(key_mask.scalar_type() == at::kBool, op, ": key_mask must be bool (True = keep), got ",
              key_mask.scalar_type());
  TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == B && key_mask.size(1) == Nk, op,
              ": key_mask must have shape (B, Nk) = (", B, ", ", Nk, "), got ", shape_str(key_mask));
  return key_mask.view({B, 1, Nk, 1});
}

}  // namespace

// ---------------------------------------------------------------------------
// Rotary position embedding (RoFormer). Pairs of features are rotated by
// position * base^(-2i/rotary_dim): half-split pairs (i, i + rd/2) as in
// GPT-NeoX / LLaMA, or adjacent pairs (2i, 2i+1) as in GPT-J.

at::Tensor rotary(const at::Tensor& x, const std::optional<at::Tensor>& positions, int64_t offset,
                  double base, std::optional<int64_t> rotary_dim, bool interleaved) {
  const char* op = "rotary";
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (..., N, D), got ", shape_str(x));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ", x.scalar_type());
  const int64_t N = x.size(-2), D = x.size(-1);
  const int64_t rd = rotary_dim.value_or(D);
  TORCH_CHECK(rd > 0 && rd <= D && rd % 2 == 0, op, ": rotary_dim must be even and in (0, D = ", D, "], got ",
              rd);
  TORCH_CHECK(std::isfinite(base) && base > 0, op, ": base must be positive and finite, got ", base);
  // float32 angles as in the reference implementations, float64 for float64.
  const auto angle_type = detail::compute_type(x.scalar_type());
  const auto topt = at::TensorOptions().dtype(angle_type).device(x.device());
  at::Tensor pos;
  if (given(positions)) {
    const auto& p = *positions;
    TORCH_CHECK(!at::isFloatingType(p.scalar_type()) && p.scalar_type() != at::kBool, op,
                ": positions must be an integer tensor, got ", p.scalar_type());
    TORCH_CHECK((p.dim() == 1 && p.size(0) == N) ||
                    (p.dim() == 2 && x.dim() >= 3 && p.size(0) == x.size(0) && p.size(1) == N),
                op, ": positions must have shape (N,) = (", N, ",) or (B, N), got ", shape_str(p));
    pos = (p + offset).to(angle_type);
    if (p.dim() == 2)  // (B, N) -> (B, 1, ..., N)
      for (int64_t d = 1; d < x.dim() - 2; ++d) pos = pos.unsqueeze(1);
  } else {
    pos = at::arange(offset, offset + N, topt);
  }
  const at::Tensor inv_freq = 1.0 / at::pow(base, at::arange(0, rd, 2, topt) / static_cast<double>(rd));
  const at::Tensor angles = pos.unsqueeze(-1) * inv_freq;  // (..., N, rd/2)
  const at::Tensor cos = angles.cos().to(x.scalar_type()), sin = angles.sin().to(x.scalar_type());
  const at::Tensor rot = x.narrow(-1, 0, rd);
  at::Tensor rotated;
  if (interleaved) {
    const at::Tensor pairs = rot.unflatten(-1, {rd / 2, 2});
    const at::Tensor even = pairs.select(-1, 0), odd = pairs.select(-1, 1);
    rotated = at::stack({even * cos - odd * sin, odd * cos + even * sin}, -1).flatten(-2);
  } else {
    const at::Tensor first = rot.narrow(-1, 0, rd / 2), second = rot.narrow(-1, rd / 2, rd / 2);
    rotated = at::cat({first * cos - second * sin, second * cos + first * sin}, -1);
  }
  return rd == D ? rotated : at::cat({rotated, x.narrow(-1, rd, D - rd)}, -1);
}

// ---------------------------------------------------------------------------
// Linformer: keys and values are projected along the sequence to Kp rows,
// then ordinary (fused) attention runs over them.

at::Tensor linformer_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& E, const std::optional<at::Tensor>& F,
                               const std::optional<at::Tensor>& key_mask, double dropout_p,
                               std::optional<double> scale, bool causal) {
  const char* op = "linformer_attention";
  TORCH_CHECK(!causal, op,
              ": causal=True is not supported: the sequence projection mixes every key, future ones "
              "included, into each projected key");
  check_bhnd(op, "q", q);
  check_bhnd(op, "k", k);
  check_bhnd(op, "v", v);
  const int64_t B = k.size(0), Nk = k.size(2);
  auto check_projection = [&](const char* name, const at::Tensor& P) {
    TORCH_CHECK(P.dim() == 2, op, ": ", name, " must have shape (Kp, Nmax), got ", shape_str(P));
    TORCH_CHECK(P.size(1) >= Nk, op, ": ", name, " covers ", P.size(1), " positions (Nmax), but k has ", Nk,
                "; make it at least as long as the longest sequence");
    TORCH_CHECK(P.size(0) > 0, op, ": ", name, " must project to Kp > 0 rows");
    TORCH_CHECK(P.scalar_type() == k.scalar_type(), op, ": ", name, " must have the dtype of k (",
                k.scalar_type(), "), got ", P.scalar_type());
  };
  check_projection("E", E);
  const bool shared = !given(F);
  if (!shared) {
    check_projection("F", *F);
    TORCH_CHECK(F->size(0) == E.size(0), op, ": E and F must project to the same Kp, got ", E.size(0),
                " and ", F->size(0));
  }
  at::Tensor keys = k, values = v;
  if (given(key_mask)) {
    const at::Tensor rows = key_rows(op, *key_mask, B, Nk);
    keys = keys.masked_fill(rows.logical_not(), 0.0);
    values = values.masked_fill(rows.logical_not(), 0.0);
  }
  const at::Tensor Ek = E.narrow(1, 0, Nk);
  const at::Tensor Fk = shared ? Ek : F->narrow(1, 0, Nk);
  const at::Tensor kp = at::matmul(Ek, keys);    // (B, Hkv, Kp, D)
  const at::Tensor vp = at::matmul(Fk, values);  // (B, Hkv, Kp, Dv)
  return attention(q, kp, vp, AttentionOptions().dropout_p(dropout_p).scale(scale));
}

// ---------------------------------------------------------------------------
// Longformer, exact at token level: a query sees the keys within `window` of
// it and every global token; a global token's query sees every key.
//
// The non-global rows are one fused block-sparse call (on the CPU and on
// CUDA): the global keys are gathered after the sequence (keys N .. N + G -
// 1), the layout marks the blocks the window reaches plus those of the
// gathered keys, and the blocks a window edge or a global key's original
// position (which the gathered copy replaces) cuts carry token masks:
// FlexAttention's BlockMask, run by the engine's block-sparse policy. The
// global rows are one dense call over every key.

constexpr int64_t kLongformerBlock = 64;

struct LongformerPlan {
  at::Tensor layout, index, masks;  // (1, nb, kb) bool, the same int32, (P, bs, bs) bool
};

// The plan over N queries and N + G keys (the sequence, then the global keys).
LongformerPlan longformer_plan(int64_t N, int64_t window, const std::vector<int64_t>& global, int64_t bs) {
  const int64_t G = int64_t(global.size()), Nk = N + G;
  const int64_t rows = (N + bs - 1) / bs, cols = (Nk + bs - 1) / bs;
  std::vector<uint8_t> is_global(N, 0);
  for (int64_t j : global) is_global[j] = 1;
  // Whether key j (of the N + G) is visible from query i.
  auto visible = [&](int64_t i, int64_t j) {
    return j < N ? std::abs(i - j) <= window && !is_global[j] : j < Nk;
  };
  at::Tensor layout = at::zeros({1, rows, cols}, at::kBool);
  at::Tensor index = at::full({1, rows, cols}, -1, at::kInt);
  bool* L = layout.data_ptr<bool>();
  int32_t* I = index.data_ptr<int32_t>();
  std::vector<uint8_t> masks;
  int32_t partial = 0;
  const int64_t reach = window / bs + 1;  // key blocks the window can reach on either side
  const int64_t first_global = N / bs;    // the block holding key N
  for (int64_t qb = 0; qb < rows; ++qb) {
    const int64_t i0 = qb * bs, i1 = std::min(N, i0 + bs) - 1;
    for (int64_t kb = std::max<int64_t>(0, qb - reach); kb < cols; ++kb) {
      if (kb > qb + reach && kb < first_global) kb = first_global;
      const int64_t j0 = kb * bs, j1 = std::min(Nk, j0 + bs) - 1;
      const bool sequence_only = j1 < N, global_only = j0 >= N;
      if (sequence_only && (j0 - i1 > window || i0 - j1 > window)) continue;  // no pair within the window
      L[qb * cols + kb] = true;
      bool full = global_only;
      if (sequence_only && j1 - i0 <= window && i1 - j0 <= window) {
        full = true;
        for (int64_t j = j0; j <= j1; ++j) full &= !is_global[j];
      }
      if (full) continue;
      for (int64_t r = 0; r < bs; ++r)
        for (int64_t c = 0; c < bs; ++c) masks.push_back(i0 + r < N && visible(i0 + r, j0 + c));
      I[qb * cols + kb] = partial++;
    }
  }
  at::Tensor block_masks = at::empty({partial, bs, bs}, at::kBool);
  std::copy(masks.begin(), masks.end(), block_masks.data_ptr<bool>());
  return {layout, index, block_masks};
}

namespace detail {

LongformerCall longformer_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                               const at::Tensor& global_tokens, const OptTensor& key_mask, double dropout_p,
                               std::optional<double> scale) {
  const char* op = "longformer_attention";
  check_bhnd(op, "q", q);
  check_bhnd(op, "k", k);
  check_bhnd(op, "v", v);
  const int64_t B = k.size(0), N = k.size(2);
  TORCH_CHECK(q.size(2) == N, op, ": q and k must have the same length (self-attention), got ", q.size(2),
              " and ", N);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0, got ", window);
  TORCH_CHECK(global_tokens.dim() == 1 && !at::isFloatingType(global_tokens.scalar_type()) &&
                  global_tokens.scalar_type() != at::kBool,
              op, ": global_tokens must be a 1-D integer tensor of positions, got ", shape_str(global_tokens),
              " ", global_tokens.scalar_type());
  const int64_t G = global_tokens.numel();
  std::vector<int64_t> positions(G);
  at::Tensor global_cpu;
  LongformerPlan plan;
  {
    // Host work, with torch.func's layers out of the way: under its grad
    // transforms every input comes wrapped and every tensor made here would
    // too (a TensorWrapper has no storage to read or fill).
    c10::impl::ExcludeDispatchKeyGuard no_functorch(c10::DispatchKeySet(
        {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode}));
    at::Tensor g = global_tokens;
    while (const auto* wrapper = at::functorch::maybeGetTensorWrapper(g)) g = wrapper->value();
    global_cpu = g.to(at::kCPU, at::kLong).contiguous();
    std::copy(global_cpu.data_ptr<int64_t>(), global_cpu.data_ptr<int64_t>() + G, positions.begin());
    std::vector<uint8_t> seen(N, 0);
    for (int64_t j : positions) {
      TORCH_CHECK(j >= 0 && j < N, op, ": global_tokens must lie in [0, N = ", N, "), got ", j);
      TORCH_CHECK(!seen[j], op, ": global_tokens must not repeat a position, got ", j, " twice");
      seen[j] = 1;
    }
    plan = longformer_plan(N, window, positions, kLongformerBlock);
  }
  const auto device = q.device();
  LongformerCall call;
  call.global = global_cpu.to(device);
  // The sequence, then the global tokens (keys N .. N + G - 1 of the window call).
  auto extend = [&](const at::Tensor& t, int64_t dim) {
    return G == 0 ? t : at::cat({t, t.index_select(dim, call.global)}, dim);
  };
  call.k_ext = extend(k, 2);
  call.v_ext = extend(v, 2);
  const auto opts = AttentionOptions().dropout_p(dropout_p).scale(scale);
  call.window = AttentionOptions(opts)
                    .layout(plan.layout.to(device))
                    .block_size(kLongformerBlock)
                    .block_mask_index(plan.index.to(device))
                    .block_masks(plan.masks.to(device));
  call.rows = opts;
  if (given(key_mask)) {
    const at::Tensor keep = key_rows(op, *key_mask, B, N).view({B, 1, 1, N}).to(device);
    call.window.mask(extend(keep, 3));
    call.rows.mask(keep);
  }
  return call;
}

namespace {
const auto& forward_op() {
  static const auto op = op_handle<ForwardSig>("attnzoo::_attention_forward");
  return op;
}
const auto& backward_op() {
  static const auto op = op_handle<BackwardSig>("attnzoo::_attention_backward");
  return op;
}
}  // namespace

LongformerForward longformer_forward(const LongformerCall& call, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& window_seed,
                                     const at::Tensor& rows_seed) {
  LongformerForward f;
  {
    const AttentionOptions& options = call.window;
    std::tie(f.out, f.window_lse) =
        forward_op().call(q, call.k_ext, call.v_ext ATTNZOO_OPTION_VALUES, optional_of(window_seed));
  }
  if (call.global.numel() == 0) return f;
  const at::Tensor& g = call.global;
  {
    const AttentionOptions& options = call.rows;
    std::tie(f.rows_out, f.rows_lse) =
        forward_op().call(q.index_select(2, g), k, v ATTNZOO_OPTION_VALUES, optional_of(rows_seed));
  }
  // The outputs are ours: merge in place instead of copying N rows.
  f.out.index_copy_(2, g, f.rows_out);
  f.window_lse.index_fill_(2, g, -std::numeric_limits<double>::infinity());
  return f;
}

Tensor3 longformer_backward(const LongformerCall& call, const LongformerForward& saved,
                            const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& window_seed, const at::Tensor& rows_seed) {
  const std::array<bool, 4> no_option_grads = {false, false, false, false};
  at::Tensor dq, dk_ext, dv_ext;
  {
    // The global rows' lse is -inf, so the window call gives them no gradient.
    const AttentionOptions& options = call.window;
    std::tie(dq, dk_ext, dv_ext, std::ignore, std::ignore, std::ignore, std::ignore) =
        backward_op().call(grad_out, std::nullopt, q, call.k_ext, call.v_ext, saved.out,
                           saved.window_lse ATTNZOO_OPTION_VALUES, optional_of(window_seed), no_option_grads);
  }
  const at::Tensor& g = call.global;
  const int64_t N = k.size(2), G = g.numel();
  if (G == 0) return {dq, dk_ext, dv_ext};
  at::Tensor dq_rows, dk, dv;
  {
    const AttentionOptions& options = call.rows;
    std::tie(dq_rows, dk, dv, std::ignore, std::ignore, std::ignore, std::ignore) = backward_op().call(
        grad_out.index_select(2, g), std::nullopt, q.index_select(2, g), k, v, saved.rows_out,
        saved.rows_lse ATTNZOO_OPTION_VALUES, optional_of(rows_seed), no_option_grads);
  }
  // Every buffer here is fresh from the engine: merge in place. A gathered
  // key's gradient goes back to its position in the sequence.
  dq.index_copy_(2, g, dq_rows);
  dk.add_(dk_ext.narrow(2, 0, N)).index_add_(2, g, dk_ext.narrow(2, N, G));
  dv.add_(dv_ext.narrow(2, 0, N)).index_add_(2, g, dv_ext.narrow(2, N, G));
  return {dq, dk, dv};
}

}  // namespace detail

namespace {
// The forward without a graph (inference, and below autograd); the Autograd
// kernel is in autograd/attention_autograd.cpp.
at::Tensor longformer_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       int64_t window, const at::Tensor& global_tokens,
                                       const std::optional<at::Tensor>& key_mask, double dropout_p,
                                       std::optional<double> scale) {
  const detail::LongformerCall call =
      detail::longformer_call(q, k, v, window, global_tokens, key_mask, dropout_p, scale);
  const bool dropout = dropout_p > 0;
  return detail::longformer_forward(call, q, k, v, dropout ? detail::fresh_seed() : at::Tensor(),
                                    dropout ? detail::fresh_seed() : at::Tensor())
      .out;
}
}  // namespace

at::Tensor longformer_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                                const at::Tensor& global_tokens, const std::optional<at::Tensor>& key_mask,
                                double dropout_p, std::optional<double> scale) {
  static const auto op = detail::op_handle<detail::LongformerSig>("attnzoo::longformer_attention");
  return op.call(q, k, v, window, global_tokens, key_mask, dropout_p, scale);
}

// ---------------------------------------------------------------------------
// Kernelised linear attention (Katharopoulos et al. 2020):
//   out_i = phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j)).
// Causal mode sums over j <= i over chunks: within a chunk an explicit C x C
// product, across chunks a running (D x Dv) state. On the CPU the chunks run
// in the fused core attnzoo::_causal_linear (cpu/linear_cpu.cpp: one head per
// thread, the state carried along); elsewhere as ATen ops with prefix sums
// over chunks (memory O(N/C * D * Dv) per head, never a state per position).

namespace detail {

template <class Int>
void check_causal_linear(const char* op, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                         int64_t feature_map) {
  TORCH_CHECK(
      feature_map == kFeatureMapNone || feature_map == kFeatureMapElu1 || feature_map == kFeatureMapRelu, op,
      ": feature_map must be 0 (none), 1 (elu+1) or 2 (relu), got ", feature_map);
  check_bhnd(op, "fq", fq);
  check_bhnd(op, "fk", fk);
  check_bhnd(op, "v", v);
  const auto qs = sizes_of<Int>(fq), ks = sizes_of<Int>(fk), vs = sizes_of<Int>(v);
  TORCH_CHECK(ks[0] == qs[0] && ks[1] == qs[1] && ks[2] == qs[2] && ks[3] == qs[3], op,
              ": fq and fk must have the same shape, got ", shape_str(fq), " and ", shape_str(fk));
  TORCH_CHECK(vs[0] == qs[0] && vs[1] == qs[1] && vs[2] == qs[2], op, ": v must have fq's (B, H, N), got ",
              shape_str(fq), " and ", shape_str(v));
  TORCH_CHECK(fq.device() == fk.device() && fq.device() == v.device(), op,
              ": fq, fk and v must be on one device");
}
template void check_causal_linear<int64_t>(const char*, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t);
template void check_causal_linear<c10::SymInt>(const char*, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t);

}  // namespace detail

namespace {
using detail::kLinearChunk;
using detail::kLinearEps;

at::Tensor causal_linear_meta(const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                              int64_t feature_map) {
  detail::check_causal_linear<c10::SymInt>("linear_attention", fq, fk, v, feature_map);
  return at::empty_symint({fq.sym_size(0), fq.sym_size(1), fq.sym_size(2), v.sym_size(3)}, fq.options());
}

detail::Tensor3 causal_linear_backward_meta(const at::Tensor& grad_out, const at::Tensor& fq,
                                            const at::Tensor& fk, const at::Tensor& v, int64_t feature_map) {
  detail::check_causal_linear<c10::SymInt>("linear_attention_backward", fq, fk, v, feature_map);
  return {at::empty_symint(fq.sym_sizes(), fq.options()), at::empty_symint(fk.sym_sizes(), fk.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

int64_t feature_map_code(const char* op, c10::string_view name) {
  if (name == "elu+1") return detail::kFeatureMapElu1;
  if (name == "relu") return detail::kFeatureMapRelu;
  TORCH_CHECK(false, op, ": feature_map must be \"elu+1\" or \"relu\", got \"", std::string(name), "\"");
}

at::Tensor feature_map_of(const char* op, const at::Tensor& x, c10::string_view name) {
  return feature_map_code(op, name) == detail::kFeatureMapElu1 ? at::elu(x) + 1.0 : at::relu(x);
}
}  // namespace

at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            c10::string_view feature_map, bool causal,
                            const std::optional<at::Tensor>& key_mask) {
  const char* op = "linear_attention";
  check_bhnd(op, "q", q);
  check_bhnd(op, "k", k);
  check_bhnd(op, "v", v);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": q, k and v must have the same batch size");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == Nk, op, ": k and v must agree in heads and length, got ",
              shape_str(k), " and ", shape_str(v));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": the heads of q (", H,
              ") must be a multiple of the heads of k and v (", Hkv, ")");
  TORCH_CHECK(k.size(3) == D, op, ": q and k must have the same head dim D, got ", shape_str(q), " and ",
              shape_str(k));
  TORCH_CHECK(!causal || Nq == Nk, op, ": causal linear attention needs Nq == Nk, got ", Nq, " and ", Nk);

  static const auto core = detail::op_handle<detail::CausalLinearSig>("attnzoo::_causal_linear");
  if (causal && q.device().is_cpu() && !given(key_mask) && H == Hkv) {
    // The core maps q and k per chunk: no feature-mapped copies of them.
    return core.call(q, k, v, feature_map_code(op, feature_map));
  }
  at::Tensor fq = feature_map_of(op, q, feature_map);
  at::Tensor fk = feature_map_of(op, k, feature_map);
  at::Tensor vv = v;
  if (given(key_mask)) fk = fk.masked_fill(key_rows(op, *key_mask, B, Nk).logical_not(), 0.0);
  if (H != Hkv) {
    fk = fk.repeat_interleave(H / Hkv, 1);
    vv = vv.repeat_interleave(H / Hkv, 1);
  }
  if (!causal) {
    const at::Tensor kv = at::matmul(fk.transpose(-1, -2), vv);  // (B, H, D, Dv)
    const at::Tensor z = fk.sum(-2, /*keepdim=*/true);           // (B, H, 1, D)
    const at::Tensor num = at::matmul(fq, kv);                   // (B, H, Nq, Dv)
    const at::Tensor den = (fq * z).sum(-1, /*keepdim=*/true);   // (B, H, Nq, 1)
    return num / (den + kLinearEps);
  }
  if (q.device().is_cpu()) return core.call(fq, fk, vv, detail::kFeatureMapNone);
  const int64_t C = kLinearChunk, N = Nq, chunks = (N + C - 1) / C, pad = chunks * C - N;
  auto chunked = [&](const at::Tensor& t) {  // (B,H,N,X) -> (B,H,chunks,C,X), zero padded
    const at::Tensor p = pad ? at::constant_pad_nd(t, {0, 0, 0, pad}, 0.0) : t;
    return p.view({B, H, chunks, C, t.size(-1)});
  };
  const at::Tensor cq = chunked(fq), ck = chunked(fk), cv = chunked(vv);
  const at::Tensor tril = at::ones({C, C}, q.options().dtype(at::kBool)).tril();
  const at::Tensor scores = at::matmul(cq, ck.transpose(-1, -2)).masked_fill(tril.logical_not(), 0.0);
  const at::Tensor kv = at::matmul(ck.transpose(-1, -2), cv);  // (B,H,chunks,D,Dv)
  const at::Tensor z = ck.sum(-2);                             // (B,H,chunks,D)
  const at::Tensor kv_before = at::cumsum(kv, 2) - kv;         // exclusive prefix over chunks
  const at::Tensor z_before = at::cumsum(z, 2) - z;
  const at::Tensor num = at::matmul(scores, cv) + at::matmul(cq, kv_before);
  const at::Tensor den = scores.sum(-1, true) + at::matmul(cq, z_before.unsqueeze(-1));
  const at::Tensor out = (num / (den + kLinearEps)).view({B, H, chunks * C, Dv});
  return pad ? out.narrow(2, 0, N) : out;
}

TORCH_LIBRARY_IMPL(attnzoo, Meta, m) {
  m.impl("_causal_linear", &causal_linear_meta);
  m.impl("_causal_linear_backward", &causal_linear_backward_meta);
}

TORCH_LIBRARY_IMPL(attnzoo, CompositeExplicitAutograd, m) {
  m.impl("longformer_attention", &longformer_attention_kernel);
}

TORCH_LIBRARY_IMPL(attnzoo, CompositeImplicitAutograd, m) {
  m.impl("rotary", &rotary);
  m.impl("linformer_attention", &linformer_attention);
  m.impl("linear_attention", &linear_attention);
}

}  // namespace attnzoo::ops
