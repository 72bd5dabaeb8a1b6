#pragma once
// The blocked online-softmax attention engine (FlashAttention-2 on a CPU).
//
// One engine, three passes (forward, probabilities, backward), and a Policy
// that says what differs between attention kinds:
//   block_q(), block_k()          the query block of a forward work item and the
//                                 key block of a backward one;
//   max_key_tile(), max_query_tile()  the widest tiles it hands out;
//   for_each_key_tile(b, h, q0, mq, fn)    the key tiles (k0, nk) a query
//                                 block visits: everything else is never
//                                 touched, so it costs nothing;
//   for_each_query_tile(b, h, k0, nk, fn)  the same seen from a key block;
//   modify_scores(...)            what is added to a tile of scaled scores and
//                                 which entries are disallowed (-inf);
//   accumulate_score_grad(...)    where the gradient of added scores goes.
//
// Included only by attention_kernel.cpp, which is compiled once per
// instruction set with CPU_CAPABILITY set, so everything here lives in an
// ISA-specific inline namespace.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Row-major tiles through the column-major BLAS interface:
// C(m x n, row-major, ldc) = A(m x k) * B(k x n) is C^T = B^T A^T.
// Each helper names the row-major product it computes.
template <typename T>
inline void gemm_rowmajor(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                          int64_t ldc) {
  blas_gemm(trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// ---------------------------------------------------------------------------
// Vectorised row kernels. The exponentials are the hidden cost of attention on
// a CPU (N^2 per head), so they are fused with the max / sum passes and use a
// fast exp for float; double keeps the accurate one (it serves gradcheck).
template <typename T>
inline Vec<T> fast_exp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Four independent accumulators: a single one would make every step wait for
// the previous max/add (latency-bound); four keep the vector units busy.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  T m = neg_inf<T>();
  if (n >= 4 * W) {
    V m0 = V::loadu(x), m1 = V::loadu(x + W), m2 = V::loadu(x + 2 * W), m3 = V::loadu(x + 3 * W);
    for (c = 4 * W; c + 4 * W <= n; c += 4 * W) {
      m0 = at::vec::maximum(m0, V::loadu(x + c));
      m1 = at::vec::maximum(m1, V::loadu(x + c + W));
      m2 = at::vec::maximum(m2, V::loadu(x + c + 2 * W));
      m3 = at::vec::maximum(m3, V::loadu(x + c + 3 * W));
    }
    V vm = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x <- exp(x - m); returns the sum of the new x.
template <typename T>
inline T exp_sub_sum(T* x, int64_t n, T m) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vm(m);
  V acc0(T(0)), acc1(T(0));
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    V e0 = fast_exp<T>(V::loadu(x + c) - vm);
    V e1 = fast_exp<T>(V::loadu(x + c + W) - vm);
    e0.store(x + c);
    e1.store(x + c + W);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  V acc = acc0 + acc1;
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

// x <- exp(x - m) (m finite).
template <typename T>
inline void exp_sub(T* x, int64_t n, T m) {
  using V = Vec<T>;
  const V vm(m);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) fast_exp<T>(V::loadu(x + c) - vm).store(x + c);
  for (; c < n; ++c) x[c] = std::exp(x[c] - m);
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using V = Vec<T>;
  const V va(a);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// ds <- p * (dp - delta)
template <typename T>
inline void softmax_grad_row(const T* p, T* dp, int64_t n, T delta) {
  using V = Vec<T>;
  const V vd(delta);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size())
    (V::loadu(p + c) * (V::loadu(dp + c) - vd)).store(dp + c);
  for (; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
}

// dst[c] += src[c * stride]
template <typename T>
inline void add_strided(T* dst, const T* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    using V = Vec<T>;
    int64_t c = 0;
    for (; c + V::size() <= n; c += V::size()) (V::loadu(dst + c) + V::loadu(src + c)).store(dst + c);
    for (; c < n; ++c) dst[c] += src[c];
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] += src[c * stride];
  }
}

// ---------------------------------------------------------------------------
// Dropout with a counter-based generator: the keep decision for (b, h, i, j)
// is a pure function of (seed, index), so backward regenerates the pattern
// instead of storing it. SplitMix64: output n is mix(seed + n * gamma).
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // drop iff 24-bit uniform < threshold
  double keep_scale = 1.0;
  int64_t H = 0, Nq = 0, Nk = 0;

  Dropout(double p, uint64_t seed_)
      : active(p > 0), seed(seed_), threshold(static_cast<uint64_t>(p * double(1u << 24))),
        keep_scale(p < 1 ? 1.0 / (1.0 - p) : 0.0) {}
  explicit Dropout(const DenseArgs& a) : Dropout(a.dropout_p, a.seed) {
    H = a.H, Nq = a.Nq, Nk = a.Nk;
  }
  // Whether the element with this counter is kept: a 24-bit uniform >= p.
  bool keeps(uint64_t index) const {
    return (splitmix64(seed + (index + 1) * 0x9e3779b97f4a7c15ULL) >> 40) >= threshold;
  }
  // row[c] *= keep(b, h, i, j0 + c) / (1 - p)
  template <typename T>
  void apply(T* row, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const uint64_t base = ((uint64_t(b) * H + h) * Nq + i) * Nk + j0;
    const T s = T(keep_scale);
    for (int64_t c = 0; c < n; ++c) row[c] = keeps(base + c) ? row[c] * s : T(0);
  }
};

// ---------------------------------------------------------------------------
// Dense policy: bool mask, additive bias, ALiBi and a (causal / window) band.
template <typename T>
struct DensePolicy {
  const DenseArgs& a;
  int64_t offset;  // position of query i is i + offset (bottom-right alignment)

  explicit DensePolicy(const DenseArgs& args) : a(args), offset(args.Nk - args.Nq) {}

  std::pair<int64_t, int64_t> key_range(int64_t q0, int64_t mq) const {
    const int64_t p_first = q0 + offset, p_last = q0 + mq - 1 + offset;
    const int64_t lo = std::max<int64_t>(0, p_first - a.left);
    const int64_t hi = std::min<int64_t>(a.Nk, p_last + a.right + 1);
    return {lo, std::max(lo, hi)};
  }
  std::pair<int64_t, int64_t> query_range(int64_t k0, int64_t nk) const {
    const int64_t lo = std::max<int64_t>(0, k0 - a.right - offset);
    const int64_t hi = std::min<int64_t>(a.Nq, k0 + nk - 1 + a.left - offset + 1);
    return {lo, std::max(lo, hi)};
  }

  int64_t block_q() const { return a.block_q; }
  int64_t block_k() const { return kBwdBlockK; }
  int64_t max_key_tile() const { return kBlockK; }
  int64_t max_query_tile() const { return kBwdBlockQ; }

  // The band [lo, hi) cut into aligned tiles.
  template <class Fn>
  void for_each_key_tile(int64_t, int64_t, int64_t q0, int64_t mq, Fn&& fn) const {
    const auto [lo, hi] = key_range(q0, mq);
    for (int64_t k0 = (lo / kBlockK) * kBlockK; k0 < hi; k0 += kBlockK)
      fn(k0, std::min(kBlockK, a.Nk - k0));
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
      if (bias)
        add_strided(row, bias + b * a.bias.sb + h * a.bias.sh + i * a.bias.si + k0 * a.bias.sj, nk,
                    a.bias.sj);
      // d = j - p runs over a contiguous stretch of the relative bias vector.
      if (rel) add_strided(row, rel + (k0 - p + a.Nk - 1), nk, int64_t(1));
      if (a.alibi)
        for (int64_t c = 0; c < nk; ++c) row[c] -= slope * T(std::abs(p - (k0 + c)));
      if (mask) {
        const uint8_t* m = mask + b * a.mask.sb + h * a.mask.sh + i * a.mask.si + k0 * a.mask.sj;
        for (int64_t c = 0; c < nk; ++c)
          if (!m[c * a.mask.sj]) row[c] = neg_inf<T>();
      }
      // The band: only the columns outside [p - left, p + right] are written.
      const int64_t first = std::clamp<int64_t>(p - a.left - k0, 0, nk);
      const int64_t last = std::clamp<int64_t>(p + a.right - k0 + 1, first, nk);
      std::fill(row, row + first, neg_inf<T>());
      std::fill(row + last, row + nk, neg_inf<T>());
    }
  }

  // Hooks for kinds that also touch the values or need per-tile state
  // (Shaw); no-ops here, so they compile away.
  void begin_query_tile(int64_t, int64_t, int64_t, int64_t, const T*) {}
  void on_rescale(int64_t, T) {}
  void on_probs(int64_t, const T*, int64_t, int64_t, int64_t) {}
  void end_query_tile(T*, int64_t, int64_t) {}
  void begin_pair(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, const T*) {}
  void modify_dp(int64_t, int64_t, int64_t, int64_t, T*, int64_t) {}
  void accumulate_value_grad(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, int64_t,
                             const T*) {}

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

// ---------------------------------------------------------------------------
// Block-sparse policy: the dense score modifiers, but only the blocks a layout
// marks are visited. Runs of neighbouring blocks merge into one wider tile so
// that the tile products stay large (a local window of three blocks is one
// product, not three).
template <typename T>
struct BlockSparsePolicy : DensePolicy<T> {
  using Base = DensePolicy<T>;
  using Base::a;
  int64_t bs;

  explicit BlockSparsePolicy(const DenseArgs& args) : Base(args), bs(args.layout_block) {}

  int64_t block_q() const { return bs; }
  int64_t block_k() const { return bs; }
  int64_t max_key_tile() const { return std::max(bs, (kBlockK / bs) * bs); }
  int64_t max_query_tile() const { return std::max(bs, (kBwdBlockQ / bs) * bs); }

  template <class Fn>
  void for_each_key_tile(int64_t, int64_t h, int64_t q0, int64_t mq, Fn&& fn) const {
    const uint8_t* row = a.layout + h * a.layout_sh + (q0 / bs) * a.layout_cols;
    const auto [lo, hi] = Base::key_range(q0, mq);
    emit_runs(row, 1, lo / bs, (hi + bs - 1) / bs, max_key_tile() / bs, a.Nk, fn);
  }
  template <class Fn>
  void for_each_query_tile(int64_t, int64_t h, int64_t k0, int64_t nk, Fn&& fn) const {
    const uint8_t* col = a.layout + h * a.layout_sh + k0 / bs;
    const auto [lo, hi] = Base::query_range(k0, nk);
    emit_runs(col, a.layout_cols, lo / bs, (hi + bs - 1) / bs, max_query_tile() / bs, a.Nq, fn);
  }

 private:
  // Runs of true entries line[i * stride], i in [first, last), at most
  // max_blocks long, as token ranges (start, length) clipped to n.
  template <class Fn>
  void emit_runs(const uint8_t* line, int64_t stride, int64_t first, int64_t last, int64_t max_blocks,
                 int64_t n, Fn&& fn) const {
    for (int64_t i = first; i < last;) {
      if (!line[i * stride]) {
        ++i;
        continue;
      }
      int64_t j = i + 1;
      while (j < last && j - i < max_blocks && line[j * stride]) ++j;
      fn(i * bs, std::min(j * bs, n) - i * bs);
      i = j;
    }
  }
};

// ---------------------------------------------------------------------------
// Shaw et al. relative positions: with r = clamp(j - p_i, -K, K) + K,
//   score_ij += scale * q_i . rel_k[r],   out_i += sum_j p_ij rel_v[r].
// Per tile only the buckets it can reach are touched: q . rel_k for them is
// one small product, and the probabilities are summed per bucket (a
// histogram) before one product with rel_v. Away from the diagonal a whole
// tile falls into the clipped end buckets, so it costs next to nothing.
template <typename T>
struct ShawPolicy : DensePolicy<T> {
  using Base = DensePolicy<T>;
  using Base::a;
  using Base::offset;
  const int64_t K;
  int64_t rlo = 0, nr = 0, row0 = 0;          // bucket range of the current tile, its first query
  std::vector<T> qr, dvr, hist, hist_v;       // (rows x nr) scratch

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
    gemm_rowmajor<T>(false, true, mq, nr, a.D, T(a.scale), q_tile, a.D, rel_k(h) + rlo * a.D, a.D,
                     T(0), qr.data(), nr);
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
    for (int64_t r = 0; r < mq; ++r) gather_add(s + r * ld, qr.data() + (q0 - row0 + r) * nr, q0 + r + offset, k0, nk);
  }
  void on_rescale(int64_t r, T alpha) {
    if (a.shaw_v) scale_row(hist.data() + r * nr, nr, alpha);
  }
  void on_probs(int64_t r, const T* row, int64_t i, int64_t k0, int64_t nk) {
    if (a.shaw_v) scatter_add(hist.data() + r * nr, row, i + offset, k0, nk);
  }
  void end_query_tile(T* out, int64_t ld, int64_t mq) {
    if (a.shaw_v)  // out += hist rel_v[rlo .. rlo+nr)
      gemm_rowmajor<T>(false, false, mq, a.Dv, nr, T(1), hist.data(), nr, rel_v(cur_h) + rlo * a.Dv,
                       a.Dv, T(1), out, ld);
  }

  // --- backward ----------------------------------------------------------
  const T* dout_tile = nullptr;
  void begin_pair(int64_t, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk, const T* q_tile,
                  const T* dout) {
    set_range(q0, mq, k0, k0 + nk);
    cur_h = h;
    compute_qr(h, mq, q_tile);
    dout_tile = dout;
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
    for (int64_t r = 0; r < mq; ++r) scatter_add(hist_v.data() + r * nr, p_used + r * ld, q0 + r + offset, k0, nk);
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
    gemm_rowmajor<T>(false, false, mq, a.D, nr, scale, hist.data(), nr, rel_k(h) + rlo * a.D, a.D,
                     T(1), dq_tile, a.D);
    if (a.grad_shaw_k) {
      T* g = static_cast<T*>(a.grad_shaw_k) + ((b * a.H + h) * (2 * K + 1) + rlo) * a.D;
      gemm_rowmajor<T>(true, false, nr, a.D, mq, scale, hist.data(), nr, q_tile, a.D, T(1), g, a.D);
    }
  }
};

// ---------------------------------------------------------------------------
// Shared geometry of one call.
struct Geometry {
  int64_t B, H, Hkv, Nq, Nk, D, Dv, group;
  explicit Geometry(const DenseArgs& a)
      : B(a.B), H(a.H), Hkv(a.Hkv), Nq(a.Nq), Nk(a.Nk), D(a.D), Dv(a.Dv), group(a.H / a.Hkv) {}
  int64_t kv_head(int64_t b, int64_t h) const { return b * Hkv + h / group; }
};

// Forward: items are (b, h, query block). With a.out == nullptr only the
// log-sum-exp is computed (used by the probabilities pass).
template <typename T, class Policy>
void forward_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  const Geometry g(a);
  const int64_t BQ = policy.block_q(), BK = policy.max_key_tile();
  const int64_t nqb = (g.Nq + BQ - 1) / BQ;
  const Dropout dropout(a);
  const T scale = T(a.scale);
  std::vector<T> s_tile(BQ * BK), m_run(BQ), l_run(BQ);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / nqb, qb = item % nqb;
    const int64_t b = bh / g.H, h = bh % g.H;
    const int64_t q0 = qb * BQ, mq = std::min(BQ, g.Nq - q0);
    const T* q = static_cast<const T*>(a.q) + (bh * g.Nq + q0) * g.D;
    const T* k = static_cast<const T*>(a.k) + g.kv_head(b, h) * g.Nk * g.D;
    const T* v = static_cast<const T*>(a.v) + g.kv_head(b, h) * g.Nk * g.Dv;
    T* out = a.out ? static_cast<T*>(a.out) + (bh * g.Nq + q0) * g.Dv : nullptr;
    T* lse = static_cast<T*>(a.lse) + bh * g.Nq + q0;

    std::fill(m_run.begin(), m_run.end(), neg_inf<T>());
    std::fill(l_run.begin(), l_run.end(), T(0));
    if (out) std::fill(out, out + mq * g.Dv, T(0));
    policy.begin_query_tile(b, h, q0, mq, q);

    policy.for_each_key_tile(b, h, q0, mq, [&](int64_t k0, int64_t nk) {
      T* s = s_tile.data();
      // s = scale * q k^T
      gemm_rowmajor<T>(false, true, mq, nk, g.D, scale, q, g.D, k + k0 * g.D, g.D, T(0), s, BK);
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
      if (out && any_row)
        gemm_rowmajor<T>(false, false, mq, g.Dv, nk, T(1), s, BK, v + k0 * g.Dv, g.Dv, T(1), out,
                         g.Dv);
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
  }
}

// Probabilities for inspection: items are (b, h, query block); a.lse must
// already hold the log-sum-exp. Entries outside the policy's key range stay 0.
template <typename T, class Policy>
void probs_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  const Geometry g(a);
  const int64_t BQ = policy.block_q(), BK = policy.max_key_tile();
  const int64_t nqb = (g.Nq + BQ - 1) / BQ;
  const Dropout dropout(a);
  std::vector<T> s_tile(BQ * BK);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / nqb, qb = item % nqb;
    const int64_t b = bh / g.H, h = bh % g.H;
    const int64_t q0 = qb * BQ, mq = std::min(BQ, g.Nq - q0);
    const T* q = static_cast<const T*>(a.q) + (bh * g.Nq + q0) * g.D;
    const T* k = static_cast<const T*>(a.k) + g.kv_head(b, h) * g.Nk * g.D;
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
template <typename T, class Policy>
void backward_range(const DenseArgs& a, Policy& policy, int64_t begin, int64_t end) {
  const Geometry g(a);
  const int64_t BQ = policy.max_query_tile(), BK = policy.block_k();
  const int64_t nkb = (g.Nk + BK - 1) / BK;
  const int64_t splits = a.key_splits;
  const int64_t blocks_per_split = (nkb + splits - 1) / splits;
  const Dropout dropout(a);
  const T scale = T(a.scale);
  const bool score_grad = policy.wants_score_grad();
  std::vector<T> p_tile(BQ * BK), dp_tile(BQ * BK), pd_tile(dropout.active ? BQ * BK : 0);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / splits, split = item % splits;
    const int64_t b = bh / g.H, h = bh % g.H;
    const T* q = static_cast<const T*>(a.q) + bh * g.Nq * g.D;
    const T* k = static_cast<const T*>(a.k) + g.kv_head(b, h) * g.Nk * g.D;
    const T* v = static_cast<const T*>(a.v) + g.kv_head(b, h) * g.Nk * g.Dv;
    const T* dout = static_cast<const T*>(a.grad_out) + bh * g.Nq * g.Dv;
    const T* lse = static_cast<const T*>(a.lse) + bh * g.Nq;
    const T* delta = static_cast<const T*>(a.delta) + bh * g.Nq;
    T* dq = static_cast<T*>(a.grad_q) + (split * g.B * g.H + bh) * g.Nq * g.D;
    T* dk = static_cast<T*>(a.grad_k) + bh * g.Nk * g.D;
    T* dv = static_cast<T*>(a.grad_v) + bh * g.Nk * g.Dv;

    const int64_t kb_end = std::min(nkb, (split + 1) * blocks_per_split);
    for (int64_t kb = split * blocks_per_split; kb < kb_end; ++kb) {
      const int64_t k0 = kb * BK, nk = std::min(BK, g.Nk - k0);
      policy.for_each_query_tile(b, h, k0, nk, [&](int64_t q0, int64_t mq) {
        T* p = p_tile.data();
        T* dp = dp_tile.data();
        policy.begin_pair(b, h, q0, mq, k0, nk, q + q0 * g.D, dout + q0 * g.Dv);
        gemm_rowmajor<T>(false, true, mq, nk, g.D, scale, q + q0 * g.D, g.D, k + k0 * g.D, g.D,
                         T(0), p, BK);
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
        gemm_rowmajor<T>(true, false, nk, g.Dv, mq, T(1), p_used, BK, dout + q0 * g.Dv, g.Dv, T(1),
                         dv + k0 * g.Dv, g.Dv);
        policy.accumulate_value_grad(b, h, q0, mq, k0, nk, p_used, BK, dout + q0 * g.Dv);
        // dp = dout v^T
        gemm_rowmajor<T>(false, true, mq, nk, g.Dv, T(1), dout + q0 * g.Dv, g.Dv, v + k0 * g.Dv,
                         g.Dv, T(0), dp, BK);
        policy.modify_dp(q0, mq, k0, nk, dp, BK);
        for (int64_t r = 0; r < mq; ++r) {
          if (dropout.active) dropout.apply(dp + r * BK, nk, b, h, q0 + r, k0);
          softmax_grad_row(p + r * BK, dp + r * BK, nk, delta[q0 + r]);
        }
        if (score_grad)
          policy.accumulate_score_grad(b, h, q0, mq, k0, nk, dp, BK, q + q0 * g.D, dq + q0 * g.D);
        // dq += scale * ds k ;  dk += scale * ds^T q
        gemm_rowmajor<T>(false, false, mq, g.D, nk, scale, dp, BK, k + k0 * g.D, g.D, T(1),
                         dq + q0 * g.D, g.D);
        gemm_rowmajor<T>(true, false, nk, g.D, mq, scale, dp, BK, q + q0 * g.D, g.D, T(1),
                         dk + k0 * g.D, g.D);
      });
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
