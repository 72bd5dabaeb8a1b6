// The CUDA kernels of attention, attention_weights, _attention_forward,
// _attention_backward and the LSH ops: the checked options turned into the
// kernels' plain arguments (cuda::DenseArgs) and the passes of
// dense_kernels.cuh launched on the current stream. The same schemas and
// semantics as the CPU kernels (cpu/attention_cpu.cpp, cpu/lsh_cpu.cpp);
// inputs stay in their own type (float32, float64, bfloat16, float16) and
// are accumulated in float32 (float64 for float64).
//
// What is not per element runs here in ATen: a layout's tile walks
// (layouts::tile_walks), Shaw's products with its tables (q rel_k^T,
// grad_out rel_v^T, and the per-bucket sums back through them), and LSH's
// hashing, sorting and merging of rounds around one engine call over the
// sorted rows of all rounds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "attnzoo/ops/cuda/engine_api.h"
#include "attnzoo/ops/layouts.h"
#include "attnzoo/ops/lsh_support.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::OptTensor;
using Shapes = detail::Shapes<int64_t>;

// The checked options on the device, in the types the kernels read.
struct Prepared {
  Shapes s;
  at::ScalarType acc;  // float32, or float64 for float64 inputs
  at::Tensor q, k, v, mask, bias, t5_buckets, t5_table, alibi;
  detail::BlockLayout layout;
  layouts::TileWalks walks;
  // Shaw: the tables as (H or 1, 2K+1, D / Dv) in acc, and scale * q rel_k^T.
  at::Tensor shaw_k, shaw_v, shaw_qr;
  int64_t shaw_K = -1;
  detail::Band band;
  double scale, dropout_p;
  uint64_t seed = 0;
  const cuda::DensePasses* passes = nullptr;
};

// The passes for an input type: with the kinds' rules compiled in (kinds)
// or the dense ones.
const cuda::DensePasses* passes_for(at::ScalarType dt, int64_t D, int64_t Dv, bool kinds) {
  switch (dt) {
    case at::kFloat:
      return kinds ? cuda::kind_passes_f32(D, Dv) : cuda::dense_passes_f32(D, Dv);
    case at::kDouble:
      return kinds ? cuda::kind_passes_f64(D, Dv) : cuda::dense_passes_f64(D, Dv);
    case at::kHalf:
      return kinds ? cuda::kind_passes_f16(D, Dv) : cuda::dense_passes_f16(D, Dv);
    case at::kBFloat16:
      return kinds ? cuda::kind_passes_bf16(D, Dv) : cuda::dense_passes_bf16(D, Dv);
    default:
      return nullptr;
  }
}

const cuda::DensePasses* checked_passes(const char* op, at::ScalarType dt, int64_t D, int64_t Dv,
                                        bool kinds) {
  const cuda::DensePasses* passes = passes_for(dt, D, Dv, kinds);
  TORCH_CHECK(passes != nullptr, op, ": on CUDA the head dimensions D and Dv must be at most ",
              dt == at::kDouble ? 128 : 256, " for ", dt, " inputs, got D = ", D, " and Dv = ", Dv);
  return passes;
}

// A layout's blocks and walks at the passes' tile size.
void prepare_layout(const char* op, Prepared& p, const AttentionOptions& o) {
  p.layout = detail::block_layout(op, o);
  if (!p.layout.layout.defined()) return;
  const at::Tensor& l = p.layout.layout;
  p.walks = layouts::tile_walks(l.view({-1, l.size(2), l.size(3)}), p.layout.block, p.s.Nq, p.s.Nk,
                                p.passes->block_q);
}

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const AttentionOptions& o, const OptTensor& seed) {
  Prepared p;
  p.s = detail::check_attention<int64_t>(op, q, k, v, o);
  const Shapes& s = p.s;
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": on CUDA, q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  // Block-sparse layouts and Shaw (and LSH, which comes with a layout) run
  // the passes with the kinds' rules compiled in.
  p.passes = checked_passes(op, q.scalar_type(), s.D, s.Dv, given(o.layout()) || given(o.shaw_k()));
  p.acc = detail::compute_type(q.scalar_type());
  p.q = q.contiguous(), p.k = k.contiguous(), p.v = v.contiguous();
  if (given(o.mask())) p.mask = o.mask()->contiguous();
  if (given(o.bias())) p.bias = o.bias()->to(p.acc).contiguous();
  if (given(o.alibi_slopes())) p.alibi = o.alibi_slopes()->to(p.acc).contiguous();
  if (given(o.t5_table())) {
    const at::Tensor& table = *o.t5_table();
    // The bucket of each relative position, by the one bucket function
    // (t5_relative_bucket, as HF computes it), then looked up per element.
    p.t5_buckets =
        detail::t5_relative_buckets(table.size(0), s.Nq, s.Nk, o.t5_bidirectional(), o.t5_max_distance())
            .to(q.device(), at::kInt);
    p.t5_table = table.to(p.acc).contiguous();
  }
  prepare_layout(op, p, o);
  p.band = detail::attention_band(o, s.Nq, s.Nk);
  p.scale = detail::attention_scale(o, s.D);
  if (given(o.shaw_k())) {
    auto table = [&](const at::Tensor& t) {
      return (t.dim() == 2 ? t.unsqueeze(0) : t).to(p.acc).contiguous();
    };
    p.shaw_K = o.shaw_max_distance();
    p.shaw_k = table(*o.shaw_k());
    if (given(o.shaw_v())) p.shaw_v = table(*o.shaw_v());
    // (B, H, Nq, D) x (Hs, D, 2K+1): the score term of every bucket.
    p.shaw_qr = (at::matmul(p.q.to(p.acc), p.shaw_k.transpose(-1, -2)) * p.scale).contiguous();
  }
  p.dropout_p = o.dropout_p();
  if (p.dropout_p > 0) p.seed = detail::seed_value(op, seed);
  return p;
}

cuda::DenseArgs kernel_args(const Prepared& p) {
  cuda::DenseArgs a;
  const Shapes& s = p.s;
  a.B = s.B, a.H = s.H, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.D = s.D, a.Dv = s.Dv;
  a.q = p.q.data_ptr(), a.k = p.k.data_ptr(), a.v = p.v.data_ptr();
  a.scale = p.scale;
  a.left = p.band.left, a.right = p.band.right;
  a.mask = detail::broadcast4(p.mask, s.B, s.H, s.Nq, s.Nk);
  a.bias = detail::broadcast4(p.bias, s.B, s.H, s.Nq, s.Nk);
  if (p.t5_table.defined()) {
    a.t5_buckets = p.t5_buckets.data_ptr<int32_t>();
    a.t5_table = p.t5_table.data_ptr();
    a.t5_num_buckets = p.t5_table.size(0);
  }
  if (p.alibi.defined()) {
    const auto e = p.alibi.expand({s.B, s.H});
    a.alibi = e.data_ptr();
    a.alibi_sb = e.stride(0), a.alibi_sh = e.stride(1);
  }
  if (p.layout.layout.defined()) {
    const at::Tensor& l = p.layout.layout;  // (Bl, Hl, rows, cols)
    cuda::BlockLayoutArgs& L = a.layout;
    L.blocks = static_cast<const uint8_t*>(l.data_ptr());
    L.block = p.layout.block, L.rows = l.size(2), L.cols = l.size(3);
    L.slice_b = l.size(0) == 1 ? 0 : l.size(1);
    L.slice_h = l.size(1) == 1 ? 0 : 1;
    if (p.layout.mask_index.defined()) {
      L.mask_index = p.layout.mask_index.data_ptr<int32_t>();
      L.masks = static_cast<const uint8_t*>(p.layout.masks.data_ptr());
    }
    const int64_t tile = p.passes->block_q;  // what prepare_layout built the walks for
    L.tiles_q = (s.Nq + tile - 1) / tile, L.tiles_k = (s.Nk + tile - 1) / tile;
    L.q_ptr = p.walks.key_ptr.data_ptr<int32_t>(), L.q_tiles = p.walks.key_tiles.data_ptr<int32_t>();
    L.k_ptr = p.walks.query_ptr.data_ptr<int32_t>(), L.k_tiles = p.walks.query_tiles.data_ptr<int32_t>();
  }
  if (p.shaw_qr.defined()) {
    a.shaw.K = p.shaw_K;
    a.shaw.qr = p.shaw_qr.data_ptr();
  }
  a.dropout_p = p.dropout_p;
  a.seed = p.seed;
  return a;
}

// A pass asks for more shared memory with larger head dimensions and with a
// T5 table's gradient (num_buckets accumulators per thread): say so rather
// than let the launch fail with "invalid argument".
void check_shared_memory(const char* op, cuda::SharedBytes bytes_of, const cuda::DenseArgs& a,
                         const char* pass) {
  const size_t bytes = bytes_of(a);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": the CUDA ", pass, " pass needs ", bytes,
              " bytes of shared memory per block for D = ", a.D, ", Dv = ", a.Dv,
              a.grad_t5_partial ? " and the T5 table's gradient over " : "",
              a.grad_t5_partial ? std::to_string(a.t5_num_buckets) + " buckets" : std::string(),
              ", more than this device allows (", limit,
              "); use smaller head dimensions or fewer T5 buckets");
}

void run(const char* op, cuda::Launch launch, const cuda::DenseArgs& a) {
  const int err = launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(cudaError_t(err)));
}

// The forward on prepared arguments: out (T) and lse (acc). Shaw's relative
// values are added to the output from the per-bucket probabilities the
// kernel leaves (in acc, rounded to T once).
detail::Tensor2 run_forward(const char* op, const Prepared& p, cuda::DenseArgs a,
                            const at::TensorOptions& in) {
  const Shapes& s = p.s;
  const bool shaw_values = p.shaw_v.defined();
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.Dv}, shaw_values ? in.dtype(p.acc) : in);
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, in.dtype(p.acc));
  at::Tensor bucket_probs;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  if (shaw_values) {
    bucket_probs = at::full({s.B, s.H, s.Nq, 2 * p.shaw_K + 1}, -std::numeric_limits<double>::infinity(),
                            in.dtype(p.acc));
    a.shaw.probs = bucket_probs.data_ptr();
    a.out_in_acc = true;
  }
  check_shared_memory(op, p.passes->forward_bytes, a, "forward");
  run(op, p.passes->forward, a);
  if (shaw_values) out = (out + at::matmul(bucket_probs, p.shaw_v)).to(in.dtype());
  return {out, lse};
}

detail::Tensor2 forward_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& options, const OptTensor& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(op, q, k, v, options, seed);
  return run_forward(op, p, kernel_args(p), q.options());
}

// The backward on prepared arguments (the forward's out and lse; grad_lse
// optional): dq, dk, dv in acc (dk, dv summed over GQA groups), then the
// option gradients `wanted` asks for, in their own types (empty otherwise).
detail::Tensor7 run_backward(const char* op, const Prepared& p, cuda::DenseArgs a, const AttentionOptions& o,
                             const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& out,
                             const at::Tensor& lse, detail::OptionGradMask wanted) {
  const Shapes& s = p.s;
  detail::check_attention_backward(op, grad_out, grad_lse, out, lse, s);
  const auto acc_opts = p.q.options().dtype(p.acc);
  const at::Tensor dout = grad_out.to(p.q.scalar_type()).contiguous();
  const at::Tensor lse_acc = lse.to(p.acc).contiguous();
  // The gradient g of the log-sum-exp adds g_i * p_ij to the score gradient:
  // the same as lowering delta_i by g_i.
  at::Tensor delta = (dout.to(p.acc) * out.to(p.acc)).sum(-1);
  if (given(grad_lse)) delta = delta - grad_lse->to(p.acc);
  delta = delta.contiguous();

  const bool want_bias = wanted[0] && p.bias.defined();
  const bool want_t5 = wanted[1] && p.t5_table.defined();
  const bool shaw = p.shaw_qr.defined();
  const bool want_shaw_k = wanted[2] && shaw;
  const bool want_shaw_v = wanted[3] && p.shaw_v.defined();
  const int64_t query_tiles = (s.Nq + p.passes->block_q - 1) / p.passes->block_q;
  at::Tensor dq = at::empty({s.B, s.H, s.Nq, s.D}, acc_opts);
  at::Tensor dk = at::empty({s.B, s.H, s.Nk, s.D}, acc_opts);
  at::Tensor dv = at::empty({s.B, s.H, s.Nk, s.Dv}, acc_opts);
  at::Tensor dbias, dt5, shaw_dor, shaw_ds, shaw_p;
  a.lse = lse_acc.data_ptr();
  a.grad_out = dout.data_ptr();
  a.delta = delta.data_ptr();
  a.grad_q = dq.data_ptr(), a.grad_k = dk.data_ptr(), a.grad_v = dv.data_ptr();
  if (want_bias) {
    // Element by element (entries no tile visits stay 0), then summed to the
    // bias's broadcast shape.
    dbias = at::zeros({s.B, s.H, s.Nq, s.Nk}, acc_opts);
    a.grad_bias = dbias.data_ptr();
  }
  if (want_t5) {
    dt5 = at::zeros({s.B, s.H, query_tiles, p.t5_table.size(0)}, acc_opts);
    a.grad_t5_partial = dt5.data_ptr();
  }
  if (shaw) {
    const int64_t buckets = 2 * p.shaw_K + 1;
    if (p.shaw_v.defined()) {  // dp's rel_v term: grad_out rel_v^T
      shaw_dor = at::matmul(dout.to(p.acc), p.shaw_v.transpose(-1, -2)).contiguous();
      a.shaw.dor = shaw_dor.data_ptr();
    }
    shaw_ds = at::zeros({s.B, s.H, s.Nq, buckets}, acc_opts);
    a.shaw.grad_scores = shaw_ds.data_ptr();
    if (want_shaw_v) {
      shaw_p = at::zeros({s.B, s.H, s.Nq, buckets}, acc_opts);
      a.shaw.grad_probs = shaw_p.data_ptr();
    }
  }
  check_shared_memory(op, p.passes->grad_q_bytes, a, "backward (dq)");
  check_shared_memory(op, p.passes->grad_kv_bytes, a, "backward (dk, dv)");
  run(op, p.passes->grad_q, a);
  run(op, p.passes->grad_kv, a);

  const at::Tensor none = at::empty({0}, p.q.options());
  at::Tensor grad_shaw_k = none, grad_shaw_v = none;
  if (shaw) {
    // A bucket's score gradient reaches q through scale * rel_k; the tables
    // get the rows that used them, summed over the batch (and over heads for
    // a table the heads share).
    dq = dq + at::matmul(shaw_ds, p.shaw_k) * p.scale;
    auto table_grad = [&](const at::Tensor& per_bucket, const at::Tensor& rows, const at::Tensor& table) {
      const at::Tensor g = at::matmul(per_bucket.transpose(-1, -2), rows).sum(0);  // (H, 2K+1, X)
      return (table.dim() == 2 ? g.sum(0) : g).to(table.scalar_type());
    };
    if (want_shaw_k) grad_shaw_k = table_grad(shaw_ds * p.scale, p.q.to(p.acc), *o.shaw_k());
    if (want_shaw_v) grad_shaw_v = table_grad(shaw_p, dout.to(p.acc), *o.shaw_v());
  }
  if (s.H != s.Hkv) {
    const int64_t group = s.H / s.Hkv;
    dk = dk.view({s.B, s.Hkv, group, s.Nk, s.D}).sum(2);
    dv = dv.view({s.B, s.Hkv, group, s.Nk, s.Dv}).sum(2);
  }
  return {dq, dk, dv, want_bias ? dbias.sum_to_size(o.bias()->sizes()).to(o.bias()->scalar_type()) : none,
          // (B, H, tiles, buckets) partial sums -> the table's (buckets, H).
          want_t5 ? dt5.sum(at::IntArrayRef{0, 2}).t().contiguous().to(o.t5_table()->scalar_type()) : none,
          grad_shaw_k, grad_shaw_v};
}

detail::Tensor7 backward_cuda(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& lse, const AttentionOptions& o, const OptTensor& seed,
                              detail::OptionGradMask wanted) {
  const char* op = "attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(op, q, k, v, o, seed);
  auto grads = run_backward(op, p, kernel_args(p), o, grad_out, grad_lse, out, lse, wanted);
  const auto dt = q.scalar_type();
  std::get<0>(grads) = std::get<0>(grads).to(dt);
  std::get<1>(grads) = std::get<1>(grads).to(dt);
  std::get<2>(grads) = std::get<2>(grads).to(dt);
  return grads;
}

at::Tensor weights_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const AttentionOptions& o, const OptTensor& seed) {
  const char* op = "attention_weights";
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(op, q, k, v, o, seed);
  const Shapes& s = p.s;
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(p.acc));
  at::Tensor probs = at::empty({s.B, s.H, s.Nq, s.Nk}, q.options());
  cuda::DenseArgs a = kernel_args(p);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  a.probs = probs.data_ptr();
  check_shared_memory(op, p.passes->forward_bytes, a, "forward");
  run(op, p.passes->forward, a);
  run(op, p.passes->probs, a);
  return probs;
}

// The kernels with the dispatcher's signatures (op_support.h).
struct CudaBackend {
  static constexpr auto forward = &forward_cuda;
  static constexpr auto weights = &weights_cuda;
  static constexpr auto backward = &backward_cuda;
};

// ---------------------------------------------------------------------------
// Reformer LSH attention (cpu/lsh_kernel.h is the reference): the rows of
// every round are hashed, sorted by (round, bucket, position) and merged by
// their log-sum-exps in ATen (lsh_attention.cpp, detail::lsh_forward_sorted);
// this engine attends over the sorted rows of all rounds in one call, with
// the layout of each chunk and the chunk before it and the LSH rules
// (cuda::LshRuleArgs: the self logit, causality by original position,
// dropout keyed as the CPU keys it). Nothing of size rounds x N x 2 *
// bucket_size is kept; the backward sorts again and recomputes each round.

struct CudaLshEngine final : detail::LshRowsEngine {
  const char* op;
  explicit CudaLshEngine(const char* op_) : op(op_) {}

  Prepared prepared(const detail::LshRows& rows) const {
    const auto options = AttentionOptions()
                             .mask(rows.keep)
                             .layout(rows.layout)
                             .block_size(rows.bucket_size)
                             .dropout_p(rows.dropout_p);
    return prepare(op, rows.q, rows.k, rows.v, options, rows.seed);
  }
  static cuda::DenseArgs args(const Prepared& p, const detail::LshRows& rows) {
    cuda::DenseArgs a = kernel_args(p);
    a.lsh.positions = rows.positions.data_ptr<int64_t>();
    a.lsh.positions_len = rows.positions_len;
    a.lsh.causal = rows.causal;
    a.lsh.self_logit = detail::kLshSelfLogit;
    return a;
  }
  detail::Tensor2 forward(const detail::LshRows& rows) const override {
    const Prepared p = prepared(rows);
    return run_forward(op, p, args(p, rows), rows.q.options());
  }
  detail::Tensor3 backward(const detail::LshRows& rows, const at::Tensor& grad_out,
                           const at::Tensor& grad_lse, const at::Tensor& out,
                           const at::Tensor& lse) const override {
    const Prepared p = prepared(rows);
    auto g = run_backward(op, p, args(p, rows), AttentionOptions(), grad_out, grad_lse, out, lse,
                          {false, false, false, false});
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g)};
  }
};

detail::Tensor3 lsh_forward_cuda(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                 int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                 double dropout_p, const OptTensor& seed) {
  const c10::cuda::CUDAGuard guard(qk.device());
  return detail::lsh_forward_sorted(CudaLshEngine("lsh_attention"), qk, v, rotations, bucket_size, causal,
                                    key_mask, dropout_p, seed);
}

detail::Tensor2 lsh_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qk, const at::Tensor& v,
                                  const at::Tensor& rotations, const at::Tensor& out, const at::Tensor& lse,
                                  int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                  double dropout_p, const OptTensor& seed) {
  const c10::cuda::CUDAGuard guard(qk.device());
  return detail::lsh_backward_sorted(CudaLshEngine("lsh_attention_backward"), grad_out, qk, v, rotations, out,
                                     lse, bucket_size, causal, key_mask, dropout_p, seed);
}

// Below autograd (inference, or nothing needs a gradient): draw the seed here.
detail::Tensor2 lsh_attention_cuda(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& rotations,
                                   int64_t bucket_size, bool causal, const OptTensor& key_mask,
                                   double dropout_p) {
  return detail::lsh_attention_with_fresh_seed(&lsh_forward_cuda, qk, v, rotations, bucket_size, causal,
                                               key_mask, dropout_p);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, CUDA, m) {
  detail::AttentionKernels<CudaBackend>::register_on(m);
  m.impl("lsh_attention", &lsh_attention_cuda);
  m.impl("_lsh_forward", &lsh_forward_cuda);
  m.impl("_lsh_backward", &lsh_backward_cuda);
}

}  // namespace attnzoo::ops
