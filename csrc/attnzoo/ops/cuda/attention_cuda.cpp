// The CUDA kernels of attention, attention_weights, _attention_forward and
// _attention_backward: the checked options turned into the kernels' plain
// arguments (cuda::DenseArgs) and the passes of dense_kernels.cuh launched on
// the current stream. The same schemas and semantics as the CPU kernels
// (cpu/attention_cpu.cpp); inputs stay in their own type (float32, float64,
// bfloat16, float16) and are accumulated in float32 (float64 for float64).
// Block-sparse layouts, Shaw tables and LSH are not on CUDA yet: they raise.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>

#include "attnzoo/ops/cuda/engine_api.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops {
namespace {

using detail::given;
using detail::OptTensor;
using Shapes = detail::Shapes<int64_t>;

// The kinds whose walk is not written for CUDA yet (part 2 of the GPU work).
void check_supported_on_cuda(const char* op, const AttentionOptions& o) {
  TORCH_CHECK_NOT_IMPLEMENTED(!given(o.layout()), op,
                              ": block-sparse layouts (layout=...) are not yet supported on CUDA "
                              "tensors; run them on the CPU");
  TORCH_CHECK_NOT_IMPLEMENTED(!given(o.shaw_k()), op,
                              ": Shaw relative positions (shaw_k/shaw_v) are not yet supported on CUDA "
                              "tensors; run them on the CPU");
}

// The checked options on the device, in the types the kernels read.
struct Prepared {
  Shapes s;
  at::ScalarType acc;  // float32, or float64 for float64 inputs
  at::Tensor q, k, v, mask, bias, t5_buckets, t5_table, alibi;
  detail::Band band;
  double scale, dropout_p;
  uint64_t seed = 0;
  const cuda::DensePasses* passes = nullptr;
};

const cuda::DensePasses* passes_for(at::ScalarType dt, int64_t D, int64_t Dv) {
  switch (dt) {
    case at::kFloat:
      return cuda::dense_passes_f32(D, Dv);
    case at::kDouble:
      return cuda::dense_passes_f64(D, Dv);
    case at::kHalf:
      return cuda::dense_passes_f16(D, Dv);
    case at::kBFloat16:
      return cuda::dense_passes_bf16(D, Dv);
    default:
      return nullptr;
  }
}

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const AttentionOptions& o, const OptTensor& seed) {
  Prepared p;
  p.s = detail::check_attention<int64_t>(op, q, k, v, o);
  check_supported_on_cuda(op, o);
  const Shapes& s = p.s;
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": on CUDA, q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  p.passes = passes_for(q.scalar_type(), s.D, s.Dv);
  TORCH_CHECK(p.passes != nullptr, op, ": on CUDA the head dimensions D and Dv must be at most ",
              q.scalar_type() == at::kDouble ? 128 : 256, " for ", q.scalar_type(), " inputs, got D = ", s.D,
              " and Dv = ", s.Dv);
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
  p.band = detail::attention_band(o, s.Nq, s.Nk);
  p.scale = detail::attention_scale(o, s.D);
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

detail::Tensor2 forward_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const AttentionOptions& options, const OptTensor& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(op, q, k, v, options, seed);
  const Shapes& s = p.s;
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(p.acc));
  cuda::DenseArgs a = kernel_args(p);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  check_shared_memory(op, p.passes->forward_bytes, a, "forward");
  run(op, p.passes->forward, a);
  return {out, lse};
}

detail::Tensor7 backward_cuda(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& lse, const AttentionOptions& o, const OptTensor& seed,
                              detail::OptionGradMask wanted) {
  const char* op = "attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(op, q, k, v, o, seed);
  const Shapes& s = p.s;
  detail::check_attention_backward(op, grad_out, grad_lse, out, lse, s);
  const auto acc_opts = q.options().dtype(p.acc);
  const at::Tensor dout = grad_out.to(q.scalar_type()).contiguous();
  const at::Tensor lse_acc = lse.to(p.acc).contiguous();
  // The gradient g of the log-sum-exp adds g_i * p_ij to the score gradient:
  // the same as lowering delta_i by g_i.
  at::Tensor delta = (dout.to(p.acc) * out.to(p.acc)).sum(-1);
  if (given(grad_lse)) delta = delta - grad_lse->to(p.acc);
  delta = delta.contiguous();

  const bool want_bias = wanted[0] && p.bias.defined();
  const bool want_t5 = wanted[1] && p.t5_table.defined();
  const int64_t query_tiles = (s.Nq + p.passes->block_q - 1) / p.passes->block_q;
  at::Tensor dq = at::empty({s.B, s.H, s.Nq, s.D}, acc_opts);
  at::Tensor dk = at::empty({s.B, s.H, s.Nk, s.D}, acc_opts);
  at::Tensor dv = at::empty({s.B, s.H, s.Nk, s.Dv}, acc_opts);
  at::Tensor dbias, dt5;
  cuda::DenseArgs a = kernel_args(p);
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
  check_shared_memory(op, p.passes->grad_q_bytes, a, "backward (dq)");
  check_shared_memory(op, p.passes->grad_kv_bytes, a, "backward (dk, dv)");
  run(op, p.passes->grad_q, a);
  run(op, p.passes->grad_kv, a);

  if (s.H != s.Hkv) {
    const int64_t group = s.H / s.Hkv;
    dk = dk.view({s.B, s.Hkv, group, s.Nk, s.D}).sum(2);
    dv = dv.view({s.B, s.Hkv, group, s.Nk, s.Dv}).sum(2);
  }
  const at::Tensor none = at::empty({0}, q.options());
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt),
          want_bias ? dbias.sum_to_size(o.bias()->sizes()).to(o.bias()->scalar_type()) : none,
          // (B, H, tiles, buckets) partial sums -> the table's (buckets, H).
          want_t5 ? dt5.sum(at::IntArrayRef{0, 2}).t().contiguous().to(o.t5_table()->scalar_type()) : none,
          none, none};
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

// LSH attention has no CUDA kernel yet: a clear error instead of the
// dispatcher's "could not run ... with arguments from the CUDA backend".
[[noreturn]] void lsh_not_on_cuda() {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "lsh_attention is not yet supported on CUDA tensors; run it on the CPU");
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, CUDA, m) {
  detail::AttentionKernels<CudaBackend>::register_on(m);
  m.impl("lsh_attention",
         [](const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, const OptTensor&,
            double) -> std::tuple<at::Tensor, at::Tensor> { lsh_not_on_cuda(); });
  m.impl("_lsh_forward",
         [](const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, const OptTensor&, double,
            const OptTensor&) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> { lsh_not_on_cuda(); });
  m.impl("_lsh_backward",
         [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, int64_t, bool, const OptTensor&, double,
            const OptTensor&) -> std::tuple<at::Tensor, at::Tensor> { lsh_not_on_cuda(); });
}

}  // namespace attnzoo::ops
