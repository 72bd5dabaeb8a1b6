#pragma once
// The dense policy: bool mask, additive bias, T5 relative bias, ALiBi and a
// (causal / window) band. The other policies build on it.
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <algorithm>
#include <cstdlib>
#include <utility>

#include "attnzoo/ops/cpu/engine/policy.h"
#include "attnzoo/ops/cpu/engine/row_kernels.h"
#include "attnzoo/ops/cpu/engine_api.h"
#include "attnzoo/ops/score_rules.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// Dense policy: bool mask, additive bias, ALiBi and a (causal / window) band.
template <typename T>
struct DensePolicy : PolicyHooks<T> {
  static constexpr uint32_t kOverrides = hooks(
      Hook::block_q, Hook::block_k, Hook::max_key_tile, Hook::max_query_tile, Hook::for_each_key_tile,
      Hook::for_each_query_tile, Hook::modify_scores, Hook::wants_score_grad, Hook::accumulate_score_grad);
  const DenseArgs& a;
  int64_t offset;  // position of query i is i + offset (bottom-right alignment)

  explicit DensePolicy(const DenseArgs& args) : a(args), offset(args.Nk - args.Nq) {}

  std::pair<int64_t, int64_t> key_range(int64_t q0, int64_t mq) const {
    const auto r = rules::band_keys(q0, mq, offset, a.left, a.right, a.Nk);
    return {r.lo, r.hi};
  }
  std::pair<int64_t, int64_t> query_range(int64_t k0, int64_t nk) const {
    const auto r = rules::band_queries(k0, nk, offset, a.left, a.right, a.Nq);
    return {r.lo, r.hi};
  }

  int64_t block_q() const { return a.block_q; }
  int64_t block_k() const { return kBwdBlockK; }
  int64_t max_key_tile() const { return kBlockK; }
  int64_t max_query_tile() const { return kBwdBlockQ; }

  // The band [lo, hi) cut into aligned tiles.
  template <class Fn>
  void for_each_key_tile(int64_t, int64_t, int64_t q0, int64_t mq, Fn&& fn) const {
    const auto [lo, hi] = key_range(q0, mq);
    for (int64_t k0 = (lo / kBlockK) * kBlockK; k0 < hi; k0 += kBlockK) fn(k0, std::min(kBlockK, a.Nk - k0));
  }
  template <class Fn>
  void for_each_query_tile(int64_t, int64_t, int64_t k0, int64_t nk, Fn&& fn) const {
    const auto [lo, hi] = query_range(k0, nk);
    for (int64_t q0 = (lo / kBwdBlockQ) * kBwdBlockQ; q0 < hi; q0 += kBwdBlockQ)
      fn(q0, std::min(kBwdBlockQ, a.Nq - q0));
  }

  void modify_scores(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk, T* s,
                     int64_t ld) const {
    const T* bias = static_cast<const T*>(a.bias.data);
    const uint8_t* mask = static_cast<const uint8_t*>(a.mask.data);
    const T slope = a.alibi ? static_cast<const T*>(a.alibi)[b * a.alibi_sb + h * a.alibi_sh] : T(0);
    const T* rel = a.rel_bias ? static_cast<const T*>(a.rel_bias) + b * a.rel_sb + h * a.rel_sh : nullptr;
    for (int64_t r = 0; r < mq; ++r) {
      T* row = s + r * ld;
      const int64_t i = q0 + r, p = i + offset;
      if (bias) add_strided(row, bias + a.bias.offset(b, h, i, k0), nk, a.bias.sj);
      // d = j - p runs over a contiguous stretch of the relative bias vector.
      if (rel) add_strided(row, rel + (k0 - p + a.Nk - 1), nk, int64_t(1));
      if (a.alibi)
        for (int64_t c = 0; c < nk; ++c) row[c] += rules::alibi_term(slope, p, k0 + c);
      if (mask) {
        const uint8_t* m = mask + a.mask.offset(b, h, i, k0);
        for (int64_t c = 0; c < nk; ++c)
          if (!m[c * a.mask.sj]) row[c] = neg_inf<T>();
      }
      // The band: only the columns outside [p - left, p + right] are written.
      const int64_t first = std::clamp<int64_t>(rules::band_begin(p, a.left) - k0, 0, nk);
      const int64_t last = std::clamp<int64_t>(rules::band_end(p, a.right) - k0, first, nk);
      std::fill(row, row + first, neg_inf<T>());
      std::fill(row + last, row + nk, neg_inf<T>());
    }
  }

  bool wants_score_grad() const { return a.grad_bias != nullptr || a.grad_rel_bias != nullptr; }
  void accumulate_score_grad(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk,
                             const T* ds, int64_t ld, const T* /*q_tile*/, T* /*dq_tile*/) {
    if (a.grad_rel_bias) {
      T* g = static_cast<T*>(a.grad_rel_bias) + (b * a.H + h) * (a.Nq + a.Nk - 1);
      for (int64_t r = 0; r < mq; ++r)
        add_strided(g + (k0 - (q0 + r + offset) + a.Nk - 1), ds + r * ld, nk, int64_t(1));
    }
    if (!a.grad_bias) return;
    T* g = static_cast<T*>(a.grad_bias) + b * a.gb_sb + h * a.gb_sh;
    for (int64_t r = 0; r < mq; ++r) {
      T* grow = g + (q0 + r) * a.gb_si + k0 * a.gb_sj;
      const T* drow = ds + r * ld;
      if (a.gb_sj == 1) {
        add_strided(grow, drow, nk, 1);
      } else {
        T acc = 0;
        for (int64_t c = 0; c < nk; ++c) acc += drow[c];
        grow[0] += acc;
      }
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
