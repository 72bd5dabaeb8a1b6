#pragma once
// The engine's three passes over (batch, head, block) work items: forward
// (online softmax), probabilities (for inspection) and backward
// (FlashAttention-2). What differs between attention kinds is the Policy's
// (policy.h lists its hooks).
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attnzoo/ops/cpu/engine/dropout.h"
#include "attnzoo/ops/cpu/engine/policy.h"
#include "attnzoo/ops/cpu/engine/row_kernels.h"
#include "attnzoo/ops/cpu/engine/tiles.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// Shared geometry of one call.
struct Geometry {
  int64_t B, H, Hkv, Nq, Nk, D, Dv, group;
  explicit Geometry(const DenseArgs& a)
      : B(a.B), H(a.H), Hkv(a.Hkv), Nq(a.Nq), Nk(a.Nk), D(a.D), Dv(a.Dv), group(a.H / a.Hkv) {}
  int64_t kv_head(int64_t b, int64_t h) const { return b * Hkv + h / group; }
};

// The policy hooks that read q or dout take them in the compute type; with
// reduced-precision inputs they get null, and a policy that reads them
// (Shaw) has no reduced-precision passes.
template <typename T, typename In>
const T* compute_view(const In* p) {
  if constexpr (std::is_same_v<T, In>) {
    return p;
  } else {
    return nullptr;
  }
}
template <typename T, typename In, class Policy>
constexpr bool policy_reads_inputs() {
  return !std::is_same_v<T, In> &&
         (Policy::kOverrides & hooks(Hook::begin_query_tile, Hook::begin_pair, Hook::on_probs,
                                     Hook::end_query_tile, Hook::accumulate_value_grad)) != 0;
}

// A forward / probabilities work item: query rows [q0, q0 + mq) of head h
// of batch entry b (bh = b * H + h), their q rows and the head's keys.
template <typename T>
struct QueryBlock {
  int64_t bh, b, h, q0, mq;
  const T* q;
  const T* k;
  QueryBlock(const DenseArgs& a, const Geometry& g, int64_t item, int64_t block_q) {
    const int64_t blocks = (g.Nq + block_q - 1) / block_q;
    bh = item / blocks;
    b = bh / g.H, h = bh % g.H;
    q0 = (item % blocks) * block_q, mq = std::min(block_q, g.Nq - q0);
    q = static_cast<const T*>(a.q) + (bh * g.Nq + q0) * g.D;
    k = static_cast<const T*>(a.k) + g.kv_head(b, h) * g.Nk * g.D;
  }
};

// Forward: items are (b, h, query block). With a.out == nullptr only the
// log-sum-exp is computed (used by the probabilities pass). q, k, v and out
// are of Tiles::In (tiles.h); the running output is in T.
template <typename T, class Policy, class Tiles = ComputeTiles<T>>
void forward_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  using In = typename Tiles::In;
  static_assert(check_policy_hooks<Policy>());
  static_assert(!policy_reads_inputs<T, In, Policy>(), "this policy reads q: no reduced-precision passes");
  const Geometry g(a);
  const int64_t BQ = policy.block_q(), BK = policy.max_key_tile();
  const Dropout dropout(a);
  const T scale = T(a.scale);
  std::vector<T> s_tile(BQ * BK), m_run(BQ), l_run(BQ);
  Tiles tiles(a, BQ, BK);

  for (int64_t item = begin; item < end; ++item) {
    const QueryBlock<In> blk(a, g, item, BQ);
    const int64_t bh = blk.bh, b = blk.b, h = blk.h, q0 = blk.q0, mq = blk.mq;
    const In *q = blk.q, *k = blk.k;
    const In* v = static_cast<const In*>(a.v) + g.kv_head(b, h) * g.Nk * g.Dv;
    In* out_rows = a.out ? static_cast<In*>(a.out) + (bh * g.Nq + q0) * g.Dv : nullptr;
    T* out = out_rows ? tiles.accumulator(out_rows, mq) : nullptr;
    T* lse = static_cast<T*>(a.lse) + bh * g.Nq + q0;

    std::fill(m_run.begin(), m_run.end(), neg_inf<T>());
    std::fill(l_run.begin(), l_run.end(), T(0));
    if (out) std::fill(out, out + mq * g.Dv, T(0));
    policy.begin_query_tile(b, h, q0, mq, compute_view<T>(q));

    policy.for_each_key_tile(b, h, q0, mq, [&](int64_t k0, int64_t nk) {
      T* s = s_tile.data();
      tiles.scores(q, mq, k, k0, nk, scale, s, BK);  // s = scale * q k^T
      policy.modify_scores(b, h, q0, mq, k0, nk, s, BK);
      bool any_row = false;
      for (int64_t r = 0; r < mq; ++r) {
        T* row = s + r * BK;
        const T m_new = std::max(m_run[r], row_max(row, nk));
        if (m_new == neg_inf<T>()) {  // nothing visible in this row yet
          std::fill(row, row + nk, T(0));
          continue;
        }
        any_row = true;
        const T sum = exp_sub_sum(row, nk, m_new);
        const T alpha = std::exp(m_run[r] - m_new);  // 0 when m_run was -inf
        l_run[r] = l_run[r] * alpha + sum;
        m_run[r] = m_new;
        if (out && alpha != T(1)) {
          scale_row(out + r * g.Dv, g.Dv, alpha);
          policy.on_rescale(r, alpha);
        }
        if (dropout.active) dropout.apply(row, nk, b, h, q0 + r, k0);
        if (out) policy.on_probs(r, row, q0 + r, k0, nk);
      }
      // out += p v
      if (out && any_row) tiles.add_pv(s, BK, mq, v, k0, nk, out);
    });
    if (out) policy.end_query_tile(out, g.Dv, mq);
    for (int64_t r = 0; r < mq; ++r) {
      if (l_run[r] > T(0)) {
        if (out) scale_row(out + r * g.Dv, g.Dv, T(1) / l_run[r]);
        lse[r] = m_run[r] + std::log(l_run[r]);
      } else {  // no visible key: output 0, lse -inf (never NaN)
        if (out) std::fill(out + r * g.Dv, out + (r + 1) * g.Dv, T(0));
        lse[r] = neg_inf<T>();
      }
    }
    if (out) tiles.store(out, out_rows, mq);
  }
  tiles.end_range();
}

// Probabilities for inspection: items are (b, h, query block); a.lse must
// already hold the log-sum-exp. Entries outside the policy's key range stay 0.
template <typename T, class Policy>
void probs_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  static_assert(check_policy_hooks<Policy>());
  const Geometry g(a);
  const int64_t BQ = policy.block_q(), BK = policy.max_key_tile();
  const Dropout dropout(a);
  std::vector<T> s_tile(BQ * BK);
  for (int64_t item = begin; item < end; ++item) {
    const QueryBlock<T> blk(a, g, item, BQ);
    const int64_t bh = blk.bh, b = blk.b, h = blk.h, q0 = blk.q0, mq = blk.mq;
    const T *q = blk.q, *k = blk.k;
    const T* lse = static_cast<const T*>(a.lse) + bh * g.Nq + q0;
    T* probs = static_cast<T*>(a.probs) + (bh * g.Nq + q0) * g.Nk;
    policy.begin_query_tile(b, h, q0, mq, q);
    policy.for_each_key_tile(b, h, q0, mq, [&](int64_t k0, int64_t nk) {
      T* s = s_tile.data();
      gemm_rowmajor<T>(false, true, mq, nk, g.D, T(a.scale), q, g.D, k + k0 * g.D, g.D, T(0), s, BK);
      policy.modify_scores(b, h, q0, mq, k0, nk, s, BK);
      for (int64_t r = 0; r < mq; ++r) {
        if (lse[r] == neg_inf<T>()) continue;
        T* row = s + r * BK;
        exp_sub(row, nk, lse[r]);
        if (dropout.active) dropout.apply(row, nk, b, h, q0 + r, k0);
        std::copy(row, row + nk, probs + r * g.Nk + k0);
      }
    });
  }
}

// Backward (FlashAttention-2): items are (b, h, key split); the key blocks of
// a split are visited in turn and each recomputes p = exp(s - lse) for the
// query blocks that can see it. dk and dv of a key block are owned by one
// item; dq is summed across splits by the caller.
template <typename T, class Policy, class Tiles = ComputeTiles<T>>
void backward_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  using In = typename Tiles::In;
  static_assert(check_policy_hooks<Policy>());
  static_assert(!policy_reads_inputs<T, In, Policy>(), "this policy reads q: no reduced-precision passes");
  const Geometry g(a);
  const int64_t BQ = policy.max_query_tile(), BK = policy.block_k();
  const int64_t nkb = (g.Nk + BK - 1) / BK;
  const int64_t splits = a.key_splits;
  const int64_t blocks_per_split = (nkb + splits - 1) / splits;
  const Dropout dropout(a);
  const T scale = T(a.scale);
  const bool score_grad = policy.wants_score_grad();
  std::vector<T> p_tile(BQ * BK), dp_tile(BQ * BK), pd_tile(dropout.active ? BQ * BK : 0);
  Tiles tiles(a, BQ, BK);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / splits, split = item % splits;
    const int64_t b = bh / g.H, h = bh % g.H;
    const In* q = static_cast<const In*>(a.q) + bh * g.Nq * g.D;
    const In* k = static_cast<const In*>(a.k) + g.kv_head(b, h) * g.Nk * g.D;
    const In* v = static_cast<const In*>(a.v) + g.kv_head(b, h) * g.Nk * g.Dv;
    const In* dout = static_cast<const In*>(a.grad_out) + bh * g.Nq * g.Dv;
    const T* lse = static_cast<const T*>(a.lse) + bh * g.Nq;
    const T* delta = static_cast<const T*>(a.delta) + bh * g.Nq;
    T* dq = static_cast<T*>(a.grad_q) + (split * g.B * g.H + bh) * g.Nq * g.D;
    using GradKV = typename Tiles::GradKV;
    GradKV* dk = static_cast<GradKV*>(a.grad_k) + bh * g.Nk * g.D;
    GradKV* dv = static_cast<GradKV*>(a.grad_v) + bh * g.Nk * g.Dv;
    // The gradient buffers come uninitialised: this item owns its dq partial
    // and its key blocks' dk and dv rows, and zeroes them as it reaches them
    // (one pass over memory less than a separate zero fill, and in cache).
    std::fill_n(dq, g.Nq * g.D, T(0));

    const int64_t kb_end = std::min(nkb, (split + 1) * blocks_per_split);
    for (int64_t kb = split * blocks_per_split; kb < kb_end; ++kb) {
      const int64_t k0 = kb * BK, nk = std::min(BK, g.Nk - k0);
      std::fill_n(dk + k0 * g.D, nk * g.D, GradKV(0));
      std::fill_n(dv + k0 * g.Dv, nk * g.Dv, GradKV(0));
      tiles.begin_key_block(q, dout, k, v, k0, nk);
      policy.for_each_query_tile(b, h, k0, nk, [&](int64_t q0, int64_t mq) {
        T* p = p_tile.data();
        T* dp = dp_tile.data();
        policy.begin_pair(b, h, q0, mq, k0, nk, compute_view<T>(q + q0 * g.D),
                          compute_view<T>(dout + q0 * g.Dv));
        tiles.scores(q + q0 * g.D, mq, k, k0, nk, scale, p, BK);
        policy.modify_scores(b, h, q0, mq, k0, nk, p, BK);
        for (int64_t r = 0; r < mq; ++r) {
          T* row = p + r * BK;
          if (lse[q0 + r] == neg_inf<T>())
            std::fill(row, row + nk, T(0));
          else
            exp_sub(row, nk, lse[q0 + r]);
        }
        // With dropout, dv uses the dropped probabilities and dp is masked the
        // same way; the softmax gradient itself uses the undropped p.
        const T* p_used = p;
        if (dropout.active) {
          for (int64_t r = 0; r < mq; ++r) {
            std::copy(p + r * BK, p + r * BK + nk, pd_tile.data() + r * BK);
            dropout.apply(pd_tile.data() + r * BK, nk, b, h, q0 + r, k0);
          }
          p_used = pd_tile.data();
        }
        // dv += p_used^T dout
        tiles.add_dv(p_used, BK, dout + q0 * g.Dv, q0, mq, nk, dv + k0 * g.Dv);
        policy.accumulate_value_grad(b, h, q0, mq, k0, nk, p_used, BK, compute_view<T>(dout + q0 * g.Dv));
        tiles.dp(dout + q0 * g.Dv, mq, nk, dp, BK);  // dp = dout v^T
        policy.modify_dp(q0, mq, k0, nk, dp, BK);
        for (int64_t r = 0; r < mq; ++r) {
          if (dropout.active) dropout.apply(dp + r * BK, nk, b, h, q0 + r, k0);
          softmax_grad_row(p + r * BK, dp + r * BK, nk, delta[q0 + r]);
        }
        if (score_grad)
          policy.accumulate_score_grad(b, h, q0, mq, k0, nk, dp, BK, compute_view<T>(q + q0 * g.D),
                                       dq + q0 * g.D);
        // dq += scale * ds k ;  dk += scale * ds^T q
        tiles.add_dq(dp, BK, mq, nk, scale, dq + q0 * g.D);
        tiles.add_dk(dp, BK, q + q0 * g.D, q0, mq, nk, scale, dk + k0 * g.D);
      });
      tiles.end_key_block(nk, dk + k0 * g.D, dv + k0 * g.Dv);
    }
  }
  tiles.end_range();
}

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
