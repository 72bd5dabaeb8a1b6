#pragma once
// Reformer shared-QK LSH attention (Kitaev et al. 2020), as reformer-pytorch's
// LSHAttention computes it, built from the engine's parts (tile products, row
// kernels, counter-based dropout). A work item is one (batch, head):
//   1. hash: bucket = argmax([x R_r, -x R_r]) for every round r;
//   2. sort positions by (round, bucket, position) (a counting sort);
//   3. cut the sorted order of all rounds into chunks of bucket_size; each
//      chunk attends to itself and the chunk before it (circularly);
//   4. combine the rounds by their log-sum-exp, online, per position.
// Nothing of size rounds x N x 2*bucket_size is kept: the backward redoes
// the hashing and each chunk's probabilities, and needs only the combined
// output and log-sum-exp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attnzoo/ops/cpu/engine/dropout.h"
#include "attnzoo/ops/cpu/engine/row_kernels.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// reformer-pytorch's logit for a query attending to itself: allowed, but only
// when nothing else is.
constexpr double kLshSelfLogit = -5e4;

template <typename T>
struct LshHead {
  const LshArgs& a;
  const int64_t b, h, Np, D, Dv, R, half, bs, chunks_per_round, chunks;
  const T* qk;
  const T* v;
  const T* rot;
  std::vector<int64_t> perm;  // (R, Np): sorted order of positions per round
  std::vector<T> khat;        // (Np, D): L2-normalised keys
  std::vector<T> norm;        // (Np): max(||x||, eps)
  // Scratch of scores(): per key column its lowest allowed query position;
  // per position its column in the previous chunk, or -1.
  mutable std::vector<int64_t> limit, slot;

  LshHead(const LshArgs& args, int64_t b_, int64_t h_)
      : a(args),
        b(b_),
        h(h_),
        Np(args.Npad),
        D(args.D),
        Dv(args.Dv),
        R(args.R),
        half(args.n_buckets / 2),
        bs(args.bucket_size),
        chunks_per_round(args.Npad / args.bucket_size),
        chunks(args.R * (args.Npad / args.bucket_size)) {
    const int64_t bh = b * args.H + h;
    qk = static_cast<const T*>(args.qk) + bh * Np * D;
    v = static_cast<const T*>(args.v) + bh * Np * Dv;
    rot = static_cast<const T*>(args.rotations) + h * args.rot_sh;
  }

  // Buckets of every round and the sorted orders; optionally reports buckets.
  void hash_and_sort(int64_t* buckets_out) {
    const int64_t nb = 2 * half, PB = 256;
    std::vector<T> tile(half * PB), best(PB), worst(PB), at_best(PB), at_worst(PB);
    std::vector<int64_t> bucket(R * Np), count(nb + 1);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t t0 = 0; t0 < Np; t0 += PB) {
        const int64_t pb = std::min(PB, Np - t0);
        // tile (half x pb) = (x R_r)^T, R_r = rot[:, r, :] with row stride R*half:
        // bucket j of all positions is one contiguous row, so the argmax over
        // buckets runs across positions in vector lanes.
        gemm_rowmajor<T>(true, true, half, pb, D, T(1), rot + r * half, R * half, qk + t0 * D, D, T(0),
                         tile.data(), pb);
        argmax_columns(tile.data(), half, pb, best.data(), worst.data(), at_best.data(), at_worst.data());
        for (int64_t i = 0; i < pb; ++i) {
          // argmax over [xR, -xR]; ties go to the first index, as torch.argmax
          bucket[r * Np + t0 + i] = best[i] >= -worst[i] ? int64_t(at_best[i]) : half + int64_t(at_worst[i]);
        }
      }
      // counting sort by bucket, stable in position
      std::fill(count.begin(), count.end(), 0);
      for (int64_t t = 0; t < Np; ++t) ++count[bucket[r * Np + t] + 1];
      for (int64_t k = 0; k < nb; ++k) count[k + 1] += count[k];
      int64_t* order = perm.data() + r * Np;
      for (int64_t t = 0; t < Np; ++t) order[count[bucket[r * Np + t]]++] = t;
    }
    if (buckets_out) std::copy(bucket.begin(), bucket.end(), buckets_out + (b * a.H + h) * R * Np);
  }

  // Per column c of x (rows x cols, row-major): the largest and smallest
  // value and the first row holding each (as T; rows < 2^24).
  static void argmax_columns(const T* x, int64_t rows, int64_t cols, T* best, T* worst, T* at_best,
                             T* at_worst) {
    using V = Vec<T>;
    std::copy(x, x + cols, best);
    std::copy(x, x + cols, worst);
    std::fill(at_best, at_best + cols, T(0));
    std::fill(at_worst, at_worst + cols, T(0));
    for (int64_t j = 1; j < rows; ++j) {
      const T* row = x + j * cols;
      const V vj(static_cast<T>(j));
      int64_t c = 0;
      for (; c + V::size() <= cols; c += V::size()) {
        const V val = V::loadu(row + c), hi = V::loadu(best + c), lo = V::loadu(worst + c);
        const V up = val > hi, down = val < lo;  // strict: the first index wins ties
        V::blendv(hi, val, up).store(best + c);
        V::blendv(V::loadu(at_best + c), vj, up).store(at_best + c);
        V::blendv(lo, val, down).store(worst + c);
        V::blendv(V::loadu(at_worst + c), vj, down).store(at_worst + c);
      }
      for (; c < cols; ++c) {
        if (row[c] > best[c]) best[c] = row[c], at_best[c] = T(j);
        if (row[c] < worst[c]) worst[c] = row[c], at_worst[c] = T(j);
      }
    }
  }

  void normalise_keys() {
    khat.resize(Np * D);
    norm.resize(Np);
    for (int64_t t = 0; t < Np; ++t) {
      const T* x = qk + t * D;
      T ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
      norm[t] = std::max(std::sqrt(ss), T(1e-12));  // F.normalize's eps
      for (int64_t d = 0; d < D; ++d) khat[t * D + d] = x[d] / norm[t];
    }
  }

  void prepare(int64_t* buckets_out) {
    perm.resize(R * Np);
    limit.resize(2 * bs);
    slot.assign(Np, -1);
    hash_and_sort(buckets_out);
    normalise_keys();
  }

  // Positions of chunk g (bs of them) in sorted order.
  const int64_t* chunk(int64_t g) const {
    const int64_t r = g / chunks_per_round, c = g % chunks_per_round;
    return perm.data() + r * Np + c * bs;
  }
  // The key positions of chunk g: itself, then the chunk before it (unless
  // there is only one chunk in all, which would list every key twice).
  int64_t keys_of(int64_t g, int64_t* kpos) const {
    std::copy(chunk(g), chunk(g) + bs, kpos);
    if (chunks == 1) return bs;
    const int64_t* prev = chunk((g + chunks - 1) % chunks);
    std::copy(prev, prev + bs, kpos + bs);
    return 2 * bs;
  }

  // s (bs x nk) = masked scaled scores of chunk g; q gathered into qt.
  void scores(int64_t g, const int64_t* kpos, int64_t nk, T* qt, T* kt, T* s) const {
    const int64_t* qpos = chunk(g);
    for (int64_t i = 0; i < bs; ++i) std::copy(qk + qpos[i] * D, qk + (qpos[i] + 1) * D, qt + i * D);
    for (int64_t j = 0; j < nk; ++j)
      std::copy(khat.data() + kpos[j] * D, khat.data() + (kpos[j] + 1) * D, kt + j * D);
    gemm_rowmajor<T>(false, true, bs, nk, D, T(1) / std::sqrt(T(D)), qt, D, kt, D, T(0), s, nk);
    // Key validity once per chunk; then per row a branch-free causal test.
    const uint8_t* km = a.key_mask + b * Np;
    // lim[j]: key j is allowed for queries at positions >= lim[j] (masked: never)
    int64_t* lim = limit.data();
    for (int64_t j = 0; j < nk; ++j) lim[j] = km[kpos[j]] ? kpos[j] : std::numeric_limits<int64_t>::max();
    for (int64_t j = bs; j < nk; ++j) slot[kpos[j]] = j;
    const T ninf = neg_inf<T>();
    for (int64_t i = 0; i < bs; ++i) {
      T* row = s + i * nk;
      // masked keys always; with causal also keys after the query
      const int64_t qi = a.causal ? qpos[i] : std::numeric_limits<int64_t>::max() - 1;
      for (int64_t j = 0; j < nk; ++j) row[j] = lim[j] <= qi ? row[j] : ninf;
      // the query itself: at column i of its own chunk, and wherever the
      // chunk before holds the same position (another round's chunk may)
      row[i] = T(kLshSelfLogit);
      if (slot[qpos[i]] >= 0) row[slot[qpos[i]]] = T(kLshSelfLogit);
    }
    for (int64_t j = bs; j < nk; ++j) slot[kpos[j]] = -1;
  }

  // p (in place of s) = softmax rows; lse per row.
  void softmax(T* s, int64_t nk, T* lse) const {
    for (int64_t i = 0; i < bs; ++i) {
      T* row = s + i * nk;
      const T m = row_max(row, nk);  // finite: the self entry is always there
      const T sum = exp_sub_sum(row, nk, m);
      scale_row(row, nk, T(1) / sum);
      lse[i] = m + std::log(sum);
    }
  }

  // Dropout of chunk g's probabilities, keyed by (b, h, round, query, key).
  void dropout(const Dropout& drop, int64_t g, const int64_t* kpos, int64_t nk, T* p) const {
    const int64_t r = g / chunks_per_round;
    const int64_t* qpos = chunk(g);
    const T s = T(drop.keep_scale);
    for (int64_t i = 0; i < bs; ++i)
      for (int64_t j = 0; j < nk; ++j) {
        const uint64_t idx = ((((uint64_t(b) * a.H + h) * R + r) * Np + qpos[i]) * Np) + kpos[j];
        p[i * nk + j] = drop.keeps(idx) ? p[i * nk + j] * s : T(0);
      }
  }
};

template <typename T>
void lsh_forward_range(const LshArgs& a, int64_t begin, int64_t end) {
  const Dropout drop(a.dropout_p, a.seed);
  const int64_t bs = a.bucket_size, D = a.D, Dv = a.Dv, Np = a.Npad;
  std::vector<T> qt(bs * D), kt(2 * bs * D), vt(2 * bs * Dv), s(bs * 2 * bs), o(bs * Dv), lse_r(bs);
  std::vector<T> m_run(Np), l_run(Np);
  std::vector<int64_t> kpos(2 * bs);
  for (int64_t item = begin; item < end; ++item) {
    LshHead<T> head(a, item / a.H, item % a.H);
    head.prepare(static_cast<int64_t*>(a.buckets));
    T* out = static_cast<T*>(a.out) + item * Np * Dv;
    T* lse = static_cast<T*>(a.lse) + item * Np;
    std::fill(out, out + Np * Dv, T(0));
    std::fill(m_run.begin(), m_run.end(), neg_inf<T>());
    std::fill(l_run.begin(), l_run.end(), T(0));
    for (int64_t g = 0; g < head.chunks; ++g) {
      const int64_t nk = head.keys_of(g, kpos.data());
      head.scores(g, kpos.data(), nk, qt.data(), kt.data(), s.data());
      head.softmax(s.data(), nk, lse_r.data());
      if (drop.active) head.dropout(drop, g, kpos.data(), nk, s.data());
      for (int64_t j = 0; j < nk; ++j)
        std::copy(head.v + kpos[j] * Dv, head.v + (kpos[j] + 1) * Dv, vt.data() + j * Dv);
      gemm_rowmajor<T>(false, false, bs, Dv, nk, T(1), s.data(), nk, vt.data(), Dv, T(0), o.data(), Dv);
      // Combine with the rounds so far: out_t = sum_r exp(lse_r) o_r / sum_r exp(lse_r).
      const int64_t* qpos = head.chunk(g);
      for (int64_t i = 0; i < bs; ++i) {
        const int64_t t = qpos[i];
        const T m_new = std::max(m_run[t], lse_r[i]);
        const T old_w = std::exp(m_run[t] - m_new), new_w = std::exp(lse_r[i] - m_new);
        T* acc = out + t * Dv;
        for (int64_t d = 0; d < Dv; ++d) acc[d] = acc[d] * old_w + o[i * Dv + d] * new_w;
        l_run[t] = l_run[t] * old_w + new_w;
        m_run[t] = m_new;
      }
    }
    for (int64_t t = 0; t < Np; ++t) {
      scale_row(out + t * Dv, Dv, T(1) / l_run[t]);
      lse[t] = m_run[t] + std::log(l_run[t]);
    }
  }
}

template <typename T>
void lsh_backward_range(const LshArgs& a, int64_t begin, int64_t end) {
  const Dropout drop(a.dropout_p, a.seed);
  const int64_t bs = a.bucket_size, D = a.D, Dv = a.Dv, Np = a.Npad;
  const T scale = T(1) / std::sqrt(T(a.D));
  std::vector<T> qt(bs * D), kt(2 * bs * D), vt(2 * bs * Dv), p(bs * 2 * bs), pd(bs * 2 * bs),
      dp(bs * 2 * bs), o(bs * Dv), dor(bs * Dv), lse_r(bs), dqt(bs * D), dkt(2 * bs * D), dvt(2 * bs * Dv),
      dkhat(Np * D), delta_total(Np), dlse(bs), delta_r(bs);
  std::vector<int64_t> kpos(2 * bs);
  for (int64_t item = begin; item < end; ++item) {
    LshHead<T> head(a, item / a.H, item % a.H);
    head.prepare(nullptr);
    const T* out = static_cast<const T*>(a.out) + item * Np * Dv;
    const T* lse = static_cast<const T*>(a.lse) + item * Np;
    const T* dout = static_cast<const T*>(a.grad_out) + item * Np * Dv;
    T* dqk = static_cast<T*>(a.grad_qk) + item * Np * D;
    T* dv = static_cast<T*>(a.grad_v) + item * Np * Dv;
    std::fill(dkhat.begin(), dkhat.end(), T(0));
    for (int64_t t = 0; t < Np; ++t) {
      T acc = 0;
      for (int64_t d = 0; d < Dv; ++d) acc += dout[t * Dv + d] * out[t * Dv + d];
      delta_total[t] = acc;
    }
    for (int64_t g = 0; g < head.chunks; ++g) {
      const int64_t nk = head.keys_of(g, kpos.data());
      const int64_t* qpos = head.chunk(g);
      head.scores(g, kpos.data(), nk, qt.data(), kt.data(), p.data());
      head.softmax(p.data(), nk, lse_r.data());
      const T* p_used = p.data();
      if (drop.active) {
        std::copy(p.begin(), p.begin() + bs * nk, pd.begin());
        head.dropout(drop, g, kpos.data(), nk, pd.data());
        p_used = pd.data();
      }
      for (int64_t j = 0; j < nk; ++j)
        std::copy(head.v + kpos[j] * Dv, head.v + (kpos[j] + 1) * Dv, vt.data() + j * Dv);
      gemm_rowmajor<T>(false, false, bs, Dv, nk, T(1), p_used, nk, vt.data(), Dv, T(0), o.data(), Dv);
      // This round's share of the output gradient and of the lse gradient.
      for (int64_t i = 0; i < bs; ++i) {
        const int64_t t = qpos[i];
        const T w = std::exp(lse_r[i] - lse[t]);
        T dot = 0, dd = 0;
        for (int64_t d = 0; d < Dv; ++d) {
          dor[i * Dv + d] = w * dout[t * Dv + d];
          dot += dout[t * Dv + d] * o[i * Dv + d];
          dd += dor[i * Dv + d] * o[i * Dv + d];
        }
        dlse[i] = w * (dot - delta_total[t]);
        delta_r[i] = dd;
      }
      // dv (nk x Dv) = p_used^T dor ; dp = dor v^T
      gemm_rowmajor<T>(true, false, nk, Dv, bs, T(1), p_used, nk, dor.data(), Dv, T(0), dvt.data(), Dv);
      gemm_rowmajor<T>(false, true, bs, nk, Dv, T(1), dor.data(), Dv, vt.data(), Dv, T(0), dp.data(), nk);
      if (drop.active) head.dropout(drop, g, kpos.data(), nk, dp.data());
      for (int64_t i = 0; i < bs; ++i) {
        T* row = dp.data() + i * nk;
        softmax_grad_row(p.data() + i * nk, row, nk, delta_r[i] - dlse[i]);
        for (int64_t j = 0; j < nk; ++j)
          if (kpos[j] == qpos[i]) row[j] = T(0);  // the self logit is a constant
      }
      gemm_rowmajor<T>(false, false, bs, D, nk, scale, dp.data(), nk, kt.data(), D, T(0), dqt.data(), D);
      gemm_rowmajor<T>(true, false, nk, D, bs, scale, dp.data(), nk, qt.data(), D, T(0), dkt.data(), D);
      for (int64_t i = 0; i < bs; ++i) add_strided(dqk + qpos[i] * D, dqt.data() + i * D, D, int64_t(1));
      for (int64_t j = 0; j < nk; ++j) {
        add_strided(dkhat.data() + kpos[j] * D, dkt.data() + j * D, D, int64_t(1));
        add_strided(dv + kpos[j] * Dv, dvt.data() + j * Dv, Dv, int64_t(1));
      }
    }
    // Through the key normalisation: d x = (d khat - khat (khat . d khat)) / ||x||.
    for (int64_t t = 0; t < Np; ++t) {
      const T* kh = head.khat.data() + t * D;
      const T* dk = dkhat.data() + t * D;
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += kh[d] * dk[d];
      const bool clamped = head.norm[t] <= T(1e-12);
      for (int64_t d = 0; d < D; ++d)
        dqk[t * D + d] += clamped ? dk[d] / head.norm[t] : (dk[d] - kh[d] * dot) / head.norm[t];
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
