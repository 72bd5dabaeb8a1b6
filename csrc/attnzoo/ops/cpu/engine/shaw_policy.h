#pragma once
// The Shaw relative-position policy.
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <algorithm>
#include <vector>

#include "attnzoo/ops/cpu/engine/dense_policy.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// Shaw et al. relative positions: with r = clamp(j - p_i, -K, K) + K,
//   score_ij += scale * q_i . rel_k[r],   out_i += sum_j p_ij rel_v[r].
// Per tile only the buckets it can reach are touched: q . rel_k for them is
// one small product, and the probabilities are summed per bucket (a
// histogram) before one product with rel_v. Away from the diagonal a whole
// tile falls into the clipped end buckets, so it costs next to nothing.
template <typename T>
struct ShawPolicy : DensePolicy<T> {
  static constexpr uint32_t kOverrides =
      hooks(Hook::modify_scores, Hook::begin_query_tile, Hook::on_rescale, Hook::on_probs,
            Hook::end_query_tile, Hook::begin_pair, Hook::modify_dp, Hook::accumulate_value_grad,
            Hook::wants_score_grad, Hook::accumulate_score_grad);
  using Base = DensePolicy<T>;
  using Base::a;
  using Base::offset;
  const int64_t K;
  int64_t rlo = 0, nr = 0, row0 = 0;     // bucket range of the current tile, its first query
  std::vector<T> qr, dvr, hist, hist_v;  // (rows x nr) scratch

  explicit ShawPolicy(const DenseArgs& args) : Base(args), K(args.shaw_K) {}

  const T* rel_k(int64_t h) const { return static_cast<const T*>(a.shaw_k) + h * a.shaw_k_sh; }
  const T* rel_v(int64_t h) const { return static_cast<const T*>(a.shaw_v) + h * a.shaw_v_sh; }

  // Buckets reachable from queries [q0, q0+mq) and keys [klo, khi).
  void set_range(int64_t q0, int64_t mq, int64_t klo, int64_t khi) {
    const int64_t dmin = klo - (q0 + mq - 1 + offset), dmax = khi - 1 - (q0 + offset);
    rlo = std::clamp<int64_t>(dmin, -K, K) + K;
    nr = std::clamp<int64_t>(dmax, -K, K) + K - rlo + 1;
    row0 = q0;
  }
  // Splits row columns [0, nk) at the ends of the unclipped stretch:
  // [0, c1) -> bucket 0, [c1, c2) -> bucket k0 + c - p + K, [c2, nk) -> 2K.
  void segments(int64_t p, int64_t k0, int64_t nk, int64_t& c1, int64_t& c2) const {
    c1 = std::clamp<int64_t>(p - K - k0, 0, nk);
    c2 = std::clamp<int64_t>(p + K - k0 + 1, c1, nk);
  }
  // row[c] += table[bucket(c) - rlo]
  void gather_add(T* row, const T* table, int64_t p, int64_t k0, int64_t nk) const {
    int64_t c1, c2;
    segments(p, k0, nk, c1, c2);
    if (c1 > 0) add_constant(row, c1, table[0 - rlo]);
    if (c2 > c1) add_strided(row + c1, table + (k0 + c1 - p + K - rlo), c2 - c1, int64_t(1));
    if (nk > c2) add_constant(row + c2, nk - c2, table[2 * K - rlo]);
  }
  // table[bucket(c) - rlo] += row[c]
  void scatter_add(T* table, const T* row, int64_t p, int64_t k0, int64_t nk) const {
    int64_t c1, c2;
    segments(p, k0, nk, c1, c2);
    if (c1 > 0) table[0 - rlo] += sum_of(row, c1);
    if (c2 > c1) add_strided(table + (k0 + c1 - p + K - rlo), row + c1, c2 - c1, int64_t(1));
    if (nk > c2) table[2 * K - rlo] += sum_of(row + c2, nk - c2);
  }
  // Most of a tile lies in the clipped end buckets: these two run over it.
  static void add_constant(T* x, int64_t n, T c) {
    using V = Vec<T>;
    const V vc(c);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) + vc).store(x + i);
    for (; i < n; ++i) x[i] += c;
  }
  static T sum_of(const T* x, int64_t n) {
    using V = Vec<T>;
    V acc(T(0));
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) acc = acc + V::loadu(x + i);
    T s = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
    for (; i < n; ++i) s += x[i];
    return s;
  }
  // qr (mq x nr) = scale * q_tile rel_k[rlo .. rlo+nr)^T
  void compute_qr(int64_t h, int64_t mq, const T* q_tile) {
    qr.resize(mq * nr);
    gemm_rowmajor<T>(false, true, mq, nr, a.D, T(a.scale), q_tile, a.D, rel_k(h) + rlo * a.D, a.D, T(0),
                     qr.data(), nr);
  }

  // --- forward -----------------------------------------------------------
  int64_t cur_h = 0;
  void begin_query_tile(int64_t, int64_t h, int64_t q0, int64_t mq, const T* q_tile) {
    // The key tiles are aligned to kBlockK, so they may start before lo and
    // end after hi: cover all of them (the clamped ends keep nr <= 2K+1).
    const auto [lo, hi] = Base::key_range(q0, mq);
    const int64_t first = (lo / kBlockK) * kBlockK;
    const int64_t last = std::min(a.Nk, ((std::max(hi, lo + 1) + kBlockK - 1) / kBlockK) * kBlockK);
    set_range(q0, mq, first, std::max(last, first + 1));
    cur_h = h;
    compute_qr(h, mq, q_tile);
    if (a.shaw_v) hist.assign(mq * nr, T(0));
  }
  void modify_scores(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk, T* s,
                     int64_t ld) const {
    Base::modify_scores(b, h, q0, mq, k0, nk, s, ld);
    for (int64_t r = 0; r < mq; ++r)
      gather_add(s + r * ld, qr.data() + (q0 - row0 + r) * nr, q0 + r + offset, k0, nk);
  }
  void on_rescale(int64_t r, T alpha) {
    if (a.shaw_v) scale_row(hist.data() + r * nr, nr, alpha);
  }
  void on_probs(int64_t r, const T* row, int64_t i, int64_t k0, int64_t nk) {
    if (a.shaw_v) scatter_add(hist.data() + r * nr, row, i + offset, k0, nk);
  }
  void end_query_tile(T* out, int64_t ld, int64_t mq) {
    if (a.shaw_v)  // out += hist rel_v[rlo .. rlo+nr)
      gemm_rowmajor<T>(false, false, mq, a.Dv, nr, T(1), hist.data(), nr, rel_v(cur_h) + rlo * a.Dv, a.Dv,
                       T(1), out, ld);
  }

  // --- backward ----------------------------------------------------------
  void begin_pair(int64_t, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk, const T* q_tile,
                  const T* dout) {
    set_range(q0, mq, k0, k0 + nk);
    cur_h = h;
    compute_qr(h, mq, q_tile);
    if (a.shaw_v) {  // dvr (mq x nr) = dout rel_v[...]^T: the rel_v part of dp
      dvr.resize(mq * nr);
      gemm_rowmajor<T>(false, true, mq, nr, a.Dv, T(1), dout, a.Dv, rel_v(h) + rlo * a.Dv, a.Dv, T(0),
                       dvr.data(), nr);
    }
  }
  void modify_dp(int64_t q0, int64_t mq, int64_t k0, int64_t nk, T* dp, int64_t ld) const {
    if (!a.shaw_v) return;
    for (int64_t r = 0; r < mq; ++r) gather_add(dp + r * ld, dvr.data() + r * nr, q0 + r + offset, k0, nk);
  }
  void accumulate_value_grad(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk,
                             const T* p_used, int64_t ld, const T* dout) {
    if (!a.shaw_v || !a.grad_shaw_v) return;
    hist_v.assign(mq * nr, T(0));
    for (int64_t r = 0; r < mq; ++r)
      scatter_add(hist_v.data() + r * nr, p_used + r * ld, q0 + r + offset, k0, nk);
    T* g = static_cast<T*>(a.grad_shaw_v) + ((b * a.H + h) * (2 * K + 1) + rlo) * a.Dv;
    // g (nr x Dv) += hist_v^T dout
    gemm_rowmajor<T>(true, false, nr, a.Dv, mq, T(1), hist_v.data(), nr, dout, a.Dv, T(1), g, a.Dv);
  }
  bool wants_score_grad() const { return true; }  // dq always has a rel_k term
  void accumulate_score_grad(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk,
                             const T* ds, int64_t ld, const T* q_tile, T* dq_tile) {
    if (Base::wants_score_grad()) Base::accumulate_score_grad(b, h, q0, mq, k0, nk, ds, ld, q_tile, dq_tile);
    hist.assign(mq * nr, T(0));
    for (int64_t r = 0; r < mq; ++r) scatter_add(hist.data() + r * nr, ds + r * ld, q0 + r + offset, k0, nk);
    const T scale = T(a.scale);
    // dq += scale * hist rel_k[...];  d rel_k[...] += scale * hist^T q
    gemm_rowmajor<T>(false, false, mq, a.D, nr, scale, hist.data(), nr, rel_k(h) + rlo * a.D, a.D, T(1),
                     dq_tile, a.D);
    if (a.grad_shaw_k) {
      T* g = static_cast<T*>(a.grad_shaw_k) + ((b * a.H + h) * (2 * K + 1) + rlo) * a.D;
      gemm_rowmajor<T>(true, false, nr, a.D, mq, scale, hist.data(), nr, q_tile, a.D, T(1), g, a.D);
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
