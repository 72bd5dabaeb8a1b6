// The CPU kernels of _causal_linear and _causal_linear_backward: causal
// kernelised linear attention over chunks of C = kLinearChunk positions, one
// (batch, head) per work item, with the running D x Dv state and the D-vector
// normaliser kept by the thread that owns the head, so nothing per chunk is
// materialised for the whole batch (the ATen composition it replaces built
// the C x C scores and a D x Dv state for every chunk of every head at once,
// and fell out of cache past N = 8192).
//
// For chunk c with rows Q, K, V (q and k feature-mapped, by the caller or
// here per chunk into scratch rows):
//   A   = tril(Q K^T)                       (C x C, j <= i)
//   num = A V + Q S,   den = rowsum(A) + Q z + eps,   out = num / den
//   S  += K^T V,       z  += colsum(K)       (S, z: sums over earlier chunks)
// The backward sweeps forward once to record S and z before each chunk, then
// backwards, carrying dS = sum over later chunks of Q^T (g / den) and dz the
// same for the denominator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "attnzoo/ops/cpu/cpu_support.h"
#include "attnzoo/ops/linear_support.h"

namespace attnzoo::ops {
namespace {

using detail::kLinearChunk;

using cpu::gemm_rowmajor;

struct Dims {
  int64_t BH, N, D, Dv;
  int64_t feature_map = detail::kFeatureMapNone;  // applied to q and k chunk by chunk
};

// The feature map phi (or its derivative) of n values, vectorised by the
// engine build for this CPU (attention_kernel.cpp): elu(x) + 1 = x + 1
// (x > 0) or e^x, and relu; the same values as ATen's up to rounding.
template <typename T>
void feature(int64_t map, bool slope, const T* x, T* y, int64_t n) {
  cpu::selected_engine().feature_rows[std::is_same_v<T, double> ? 1 : 0](map, slope, x, y, n);
}

// The m x D rows of a chunk as the core reads them: mapped into `scratch`,
// or the rows themselves when the caller mapped them already.
template <typename T>
const T* mapped_rows(const T* rows, int64_t m, const Dims& d, std::vector<T>& scratch) {
  if (d.feature_map == detail::kFeatureMapNone) return rows;
  feature(d.feature_map, false, rows, scratch.data(), m * d.D);
  return scratch.data();
}

// Gradient rows with respect to the mapped rows -> with respect to the raw ones.
template <typename T>
void chain_feature_map(T* grad, const T* raw, int64_t m, const Dims& d, std::vector<T>& scratch) {
  if (d.feature_map == detail::kFeatureMapNone) return;
  feature(d.feature_map, true, raw, scratch.data(), m * d.D);
  for (int64_t i = 0; i < m * d.D; ++i) grad[i] *= scratch[i];
}

// One chunk's forward from the state before it: fills A (m x m, lower
// triangle, zero above), num (m x Dv) and den (m); returns nothing else.
template <typename T>
void chunk_forward(const T* Q, const T* K, const T* V, const T* S, const T* z, int64_t m, const Dims& d, T* A,
                   T* num, T* den) {
  const int64_t C = kLinearChunk;
  gemm_rowmajor<T>(false, true, m, m, d.D, 1, Q, d.D, K, d.D, 0, A, C);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = i + 1; j < m; ++j) A[i * C + j] = 0;
  gemm_rowmajor<T>(false, false, m, d.Dv, m, 1, A, C, V, d.Dv, 0, num, d.Dv);
  gemm_rowmajor<T>(false, false, m, d.Dv, d.D, 1, Q, d.D, S, d.Dv, 1, num, d.Dv);
  for (int64_t i = 0; i < m; ++i) {
    T acc = T(detail::kLinearEps);
    for (int64_t j = 0; j <= i; ++j) acc += A[i * C + j];
    for (int64_t e = 0; e < d.D; ++e) acc += Q[i * d.D + e] * z[e];
    den[i] = acc;
  }
}

// S += K^T V, z += colsum(K) for a chunk of m rows.
template <typename T>
void add_chunk_state(const T* K, const T* V, int64_t m, const Dims& d, T* S, T* z) {
  gemm_rowmajor<T>(true, false, d.D, d.Dv, m, 1, K, d.D, V, d.Dv, 1, S, d.Dv);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t e = 0; e < d.D; ++e) z[e] += K[i * d.D + e];
}

template <typename T>
void forward_heads(const T* fq, const T* fk, const T* v, T* out, const Dims& d, int64_t begin, int64_t end) {
  const int64_t C = kLinearChunk;
  std::vector<T> S(d.D * d.Dv), z(d.D), A(C * C), den(C), q_map(C * d.D), k_map(C * d.D);
  for (int64_t bh = begin; bh < end; ++bh) {
    std::fill(S.begin(), S.end(), T(0));
    std::fill(z.begin(), z.end(), T(0));
    for (int64_t c0 = 0; c0 < d.N; c0 += C) {
      const int64_t m = std::min(C, d.N - c0);
      const T* Q = mapped_rows(fq + (bh * d.N + c0) * d.D, m, d, q_map);
      const T* K = mapped_rows(fk + (bh * d.N + c0) * d.D, m, d, k_map);
      const T* V = v + (bh * d.N + c0) * d.Dv;
      T* O = out + (bh * d.N + c0) * d.Dv;
      chunk_forward(Q, K, V, S.data(), z.data(), m, d, A.data(), O, den.data());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t e = 0; e < d.Dv; ++e) O[i * d.Dv + e] /= den[i];
      add_chunk_state(K, V, m, d, S.data(), z.data());
    }
  }
}

template <typename T>
void backward_heads(const T* g, const T* fq, const T* fk, const T* v, T* gq, T* gk, T* gv, const Dims& d,
                    int64_t begin, int64_t end) {
  const int64_t C = kLinearChunk, chunks = (d.N + C - 1) / C, SD = d.D * d.Dv;
  if (chunks == 0) return;
  // The state before each chunk, kept for the first chunk of every segment
  // of R chunks and recomputed for the others when the backward sweep enters
  // the segment: (chunks / R + R) x D x Dv per thread instead of chunks x D x
  // Dv, so that it stays in cache at long N, for one more K^T V per chunk.
  constexpr int64_t R = 16;
  const int64_t segments = (chunks + R - 1) / R;
  std::vector<T> S_kept(segments * SD), z_kept(segments * d.D), S_seg(R * SD), z_seg(R * d.D);
  std::vector<T> S_run(SD), z_run(d.D);
  std::vector<T> A(C * C), gA(C * C), num(C * d.Dv), den(C), gnum(C * d.Dv), gden(C), dS(SD), dz(d.D);
  std::vector<T> q_map(C * d.D), k_map(C * d.D);
  for (int64_t bh = begin; bh < end; ++bh) {
    const T* Qh = fq + bh * d.N * d.D;
    const T* Kh = fk + bh * d.N * d.D;
    const T* Vh = v + bh * d.N * d.Dv;
    // The state after chunk c is the state before it plus the chunk's K^T V.
    auto add_chunk = [&](int64_t c, T* S, T* z) {
      add_chunk_state(mapped_rows(Kh + c * C * d.D, C, d, k_map), Vh + c * C * d.Dv, C, d, S, z);
    };
    std::fill(S_run.begin(), S_run.end(), T(0));
    std::fill(z_run.begin(), z_run.end(), T(0));
    for (int64_t c = 0; c < chunks; ++c) {
      if (c % R == 0) {
        std::copy_n(S_run.data(), SD, &S_kept[c / R * SD]);
        std::copy_n(z_run.data(), d.D, &z_kept[c / R * d.D]);
      }
      if (c + 1 < chunks) add_chunk(c, S_run.data(), z_run.data());  // the state after the last is never read
    }
    std::fill(dS.begin(), dS.end(), T(0));
    std::fill(dz.begin(), dz.end(), T(0));
    for (int64_t seg = segments - 1; seg >= 0; --seg) {
      const int64_t first = seg * R, last = std::min(chunks, first + R);
      std::copy_n(&S_kept[seg * SD], SD, S_seg.data());
      std::copy_n(&z_kept[seg * d.D], d.D, z_seg.data());
      for (int64_t c = first + 1; c < last; ++c) {
        std::copy_n(&S_seg[(c - 1 - first) * SD], SD, &S_seg[(c - first) * SD]);
        std::copy_n(&z_seg[(c - 1 - first) * d.D], d.D, &z_seg[(c - first) * d.D]);
        add_chunk(c - 1, &S_seg[(c - first) * SD], &z_seg[(c - first) * d.D]);
      }
      for (int64_t c = last - 1; c >= first; --c) {
        const int64_t c0 = c * C, m = std::min(C, d.N - c0);
        const T* Q = mapped_rows(Qh + c0 * d.D, m, d, q_map);
        const T* K = mapped_rows(Kh + c0 * d.D, m, d, k_map);
        const T *V = Vh + c0 * d.Dv, *G = g + (bh * d.N + c0) * d.Dv;
        const T *S = &S_seg[(c - first) * SD], *z = &z_seg[(c - first) * d.D];
        T* GQ = gq + (bh * d.N + c0) * d.D;
        T* GK = gk + (bh * d.N + c0) * d.D;
        T* GV = gv + (bh * d.N + c0) * d.Dv;
        chunk_forward(Q, K, V, S, z, m, d, A.data(), num.data(), den.data());
        // out = num / den: g_num = g / den, g_den = -sum(g * num) / den^2.
        for (int64_t i = 0; i < m; ++i) {
          T dot = 0;
          for (int64_t e = 0; e < d.Dv; ++e) {
            gnum[i * d.Dv + e] = G[i * d.Dv + e] / den[i];
            dot += G[i * d.Dv + e] * num[i * d.Dv + e];
          }
          gden[i] = -dot / (den[i] * den[i]);
        }
        // gA = tril(g_num V^T + g_den 1^T).
        gemm_rowmajor<T>(false, true, m, m, d.Dv, 1, gnum.data(), d.Dv, V, d.Dv, 0, gA.data(), C);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < m; ++j) gA[i * C + j] = j <= i ? gA[i * C + j] + gden[i] : T(0);
        // dQ = gA K + g_num S^T + g_den z^T.
        gemm_rowmajor<T>(false, false, m, d.D, m, 1, gA.data(), C, K, d.D, 0, GQ, d.D);
        gemm_rowmajor<T>(false, true, m, d.D, d.Dv, 1, gnum.data(), d.Dv, S, d.Dv, 1, GQ, d.D);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t e = 0; e < d.D; ++e) GQ[i * d.D + e] += gden[i] * z[e];
        // dK = gA^T Q + V dS^T + 1 dz^T, dV = A^T g_num + K dS (dS, dz: from later chunks).
        gemm_rowmajor<T>(true, false, m, d.D, m, 1, gA.data(), C, Q, d.D, 0, GK, d.D);
        gemm_rowmajor<T>(false, true, m, d.D, d.Dv, 1, V, d.Dv, dS.data(), d.Dv, 1, GK, d.D);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t e = 0; e < d.D; ++e) GK[i * d.D + e] += dz[e];
        gemm_rowmajor<T>(true, false, m, d.Dv, m, 1, A.data(), C, gnum.data(), d.Dv, 0, GV, d.Dv);
        gemm_rowmajor<T>(false, false, m, d.Dv, d.D, 1, K, d.D, dS.data(), d.Dv, 1, GV, d.Dv);
        // This chunk's queries read S and z: their gradient reaches every earlier chunk.
        gemm_rowmajor<T>(true, false, d.D, d.Dv, m, 1, Q, d.D, gnum.data(), d.Dv, 1, dS.data(), d.Dv);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t e = 0; e < d.D; ++e) dz[e] += Q[i * d.D + e] * gden[i];
        chain_feature_map(GQ, Qh + c0 * d.D, m, d, q_map);  // Q and K are read no more
        chain_feature_map(GK, Kh + c0 * d.D, m, d, k_map);
      }
    }
  }
}

at::Tensor to_compute(const at::Tensor& t) {
  return t.to(detail::compute_type(t.scalar_type())).contiguous();
}

Dims dims_of(const at::Tensor& fq, const at::Tensor& v, int64_t feature_map) {
  return {fq.size(0) * fq.size(1), fq.size(2), fq.size(3), v.size(3), feature_map};
}

// Work items are (b, h); BLAS stays on the calling thread inside each.
template <class Fn>
void for_each_head(int64_t heads, const Fn& fn) {
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    cpu::SingleThreadedBlas single_threaded;
    fn(begin, end);
  });
}

at::Tensor causal_linear_cpu(const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                             int64_t feature_map) {
  detail::check_causal_linear<int64_t>("linear_attention", fq, fk, v, feature_map);
  const at::Tensor q_ = to_compute(fq), k_ = to_compute(fk), v_ = to_compute(v);
  const Dims d = dims_of(q_, v_, feature_map);
  at::Tensor out = cpu::empty_output({fq.size(0), fq.size(1), d.N, d.Dv}, q_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "causal_linear", [&] {
    for_each_head(d.BH, [&](int64_t begin, int64_t end) {
      forward_heads<scalar_t>(q_.data_ptr<scalar_t>(), k_.data_ptr<scalar_t>(), v_.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), d, begin, end);
    });
  });
  return out.to(fq.scalar_type());
}

detail::Tensor3 causal_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& fq,
                                           const at::Tensor& fk, const at::Tensor& v, int64_t feature_map) {
  const char* op = "linear_attention_backward";
  detail::check_causal_linear<int64_t>(op, fq, fk, v, feature_map);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({fq.size(0), fq.size(1), fq.size(2), v.size(3)}), op,
              ": grad_out must have the output's shape (B, H, N, Dv), got ", detail::shape_str(grad_out));
  const at::Tensor q_ = to_compute(fq), k_ = to_compute(fk), v_ = to_compute(v);
  const at::Tensor g_ = grad_out.to(q_.scalar_type()).contiguous();
  const Dims d = dims_of(q_, v_, feature_map);
  at::Tensor gq = cpu::empty_output(q_.sizes(), q_.options()),
             gk = cpu::empty_output(k_.sizes(), k_.options()),
             gv = cpu::empty_output(v_.sizes(), v_.options());
  AT_DISPATCH_FLOATING_TYPES(q_.scalar_type(), "causal_linear_backward", [&] {
    for_each_head(d.BH, [&](int64_t begin, int64_t end) {
      backward_heads<scalar_t>(g_.data_ptr<scalar_t>(), q_.data_ptr<scalar_t>(), k_.data_ptr<scalar_t>(),
                               v_.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                               gv.data_ptr<scalar_t>(), d, begin, end);
    });
  });
  return {gq.to(fq.scalar_type()), gk.to(fk.scalar_type()), gv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnzoo, CPU, m) {
  m.impl("_causal_linear", &causal_linear_cpu);
  m.impl("_causal_linear_backward", &causal_linear_backward_cpu);
}

}  // namespace attnzoo::ops
