#pragma once
// The CUDA attention engine: one template per pass (forward, probabilities,
// query-major backward, key-major backward) over a policy that says which
// key tiles a query tile visits and what each score becomes. One policy
// template, AttentionPolicy<Acc, kKinds>: the band, mask, bias, T5 and ALiBi
// always; with kKinds also a block-sparse layout (its tiles walked from
// compressed lists), Shaw's relative tables and Reformer's LSH rules, each
// switched on by its arguments. Every pass is instantiated twice, as
// DensePolicy and KindsPolicy (dense_<type>.cu, kinds_<type>.cu), so that
// dense attention keeps the registers the kinds' state would take.
//
// Layout of a pass (FlashAttention-2): a block of kThreads threads owns kRows
// query rows (or key rows in grad_kv); kLanes consecutive lanes of one warp
// share a row, so row reductions are warp shuffles and a row's scratch in
// shared memory is only read by its own warp. Tiles of q, k, v and grad_out
// are staged in shared memory in the accumulation type; the products are
// scalar fused multiply-adds. No Nq x Nk buffer: the forward keeps the
// running max and sum per row and stores the log-sum-exp; the backward
// recomputes the probabilities from it.
//
// Determinism: each output element has exactly one owning thread, and every
// sum runs in a fixed order, so two runs give the same bits (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attnzoo/ops/cuda/engine_api.h"
#include "attnzoo/ops/score_rules.h"

namespace attnzoo::cuda {

// --- Types ----------------------------------------------------------------

// Input type T -> accumulation type and conversions.
template <typename T>
struct TypeTraits {
  using Acc = float;
};
template <>
struct TypeTraits<double> {
  using Acc = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x) {
  return x;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename Acc>
__device__ __forceinline__ Acc neg_inf() {
  return Acc(-INFINITY);
}

// --- Tile shapes ----------------------------------------------------------

// One tier per largest head dimension: rows per tile chosen so that the
// staged tiles (four of kRows x (D + 1) accumulators) fit the shared memory
// of sm_80 and sm_90 alike.
template <int kMaxD_, typename Acc>
struct Tiles {
  static constexpr int kMaxD = kMaxD_;
  static constexpr int kRows = kMaxD * int(sizeof(Acc)) <= 256 ? 64 : 32;
  static constexpr int kThreads = 128;
  static constexpr int kLanes = kThreads / kRows;  // threads sharing a row: 2 or 4
  static constexpr int kCols = kRows / kLanes;     // tile columns per thread
  static constexpr int kDims = kMaxD / kLanes;     // head-dimension columns per thread
  static_assert(kLanes == 2 || kLanes == 4, "a row's lanes must divide a warp");
};

// Shared-memory rows are padded by one element so that the lanes of a warp,
// which read one column of different rows, hit different banks.
struct Strides {
  int64_t qk, v, tile;  // row strides of q/k tiles, v/grad_out tiles, score tiles
  __host__ __device__ Strides(int64_t D, int64_t Dv, int rows) : qk(D + 1), v(Dv + 1), tile(rows + 1) {}
};

// Reduce over the kLanes lanes of a row (consecutive lanes of one warp).
template <int kLanes, typename Acc>
__device__ __forceinline__ Acc row_max(Acc x) {
#pragma unroll
  for (int o = 1; o < kLanes; o *= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int kLanes, typename Acc>
__device__ __forceinline__ Acc row_sum(Acc x) {
#pragma unroll
  for (int o = 1; o < kLanes; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Stage rows [0, n) of a contiguous (rows x dim) block of global memory into
// shared memory (row stride ld), converted to Acc; rows [n, kRows) become 0.
template <int kRows, int kThreads, typename Acc, typename T>
__device__ __forceinline__ void stage_rows(Acc* dst, int64_t ld, const T* src, int64_t dim, int64_t n) {
  for (int64_t idx = threadIdx.x; idx < kRows * dim; idx += kThreads) {
    const int64_t row = idx / dim, col = idx - row * dim;
    dst[row * ld + col] = row < n ? to_acc(src[row * dim + col]) : Acc(0);
  }
}

// s[m] = dot(a, b row (lane + kLanes * m)) over dim, a one shared row.
template <class Tl, typename Acc>
__device__ __forceinline__ void dot_rows(Acc (&s)[Tl::kCols], const Acc* a, const Acc* b, int64_t ld,
                                         int lane, int64_t dim) {
#pragma unroll
  for (int m = 0; m < Tl::kCols; ++m) s[m] = Acc(0);
  for (int64_t x = 0; x < dim; ++x) {
    const Acc av = a[x];
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) s[m] += av * b[(lane + Tl::kLanes * m) * ld + x];
  }
}

// acc[d] += sum over c < n of w[c] * rows[c][lane + kLanes * d] (d < dim).
template <class Tl, typename Acc>
__device__ __forceinline__ void accumulate_rows(Acc (&acc)[Tl::kDims], const Acc* w, const Acc* rows,
                                                int64_t ld, int lane, int64_t n, int64_t dim) {
  for (int64_t c = 0; c < n; ++c) {
    const Acc wc = w[c];  // (no skip of zeros: 0 * inf must stay NaN, as in the CPU's products)
#pragma unroll
    for (int d = 0; d < Tl::kDims; ++d) {
      const int64_t col = lane + Tl::kLanes * d;
      if (col < dim) acc[d] += wc * rows[c * ld + col];
    }
  }
}

// The (b, h, tile) a block owns, from its flattened index: rows
// [start, start + n) of an axis of `length` (queries in query-major passes,
// keys in key-major ones), the head its keys and values come from (GQA), and
// the calling thread's row and lane within the tile.
template <int kRows, int kLanes>
struct BlockTile {
  int64_t tiles, tile, bh, b, h, kv_head, start, n;
  int row, lane;
  __device__ BlockTile(const DenseArgs& a, int64_t length)
      : tiles((length + kRows - 1) / kRows),
        tile(blockIdx.x % tiles),
        bh(blockIdx.x / tiles),
        b(bh / a.H),
        h(bh % a.H),
        kv_head(b * a.Hkv + h / (a.H / a.Hkv)),
        start(tile * kRows),
        n(rules::min64(kRows, length - start)),
        row(threadIdx.x / kLanes),
        lane(threadIdx.x % kLanes) {}
};

// --- The dense policy -----------------------------------------------------

// Shaw's bucket of query position p and key j: clamp(j - p, -K, K) + K.
__device__ __forceinline__ int64_t shaw_bucket(int64_t p, int64_t j, int64_t K) {
  const int64_t d = j - p;
  return (d < -K ? -K : (d > K ? K : d)) + K;
}

// Which tiles a pass visits and what a score becomes, for (b, h).
template <typename Acc, bool kKinds_>
struct AttentionPolicy {
  static constexpr bool kKinds = kKinds_;
  const DenseArgs& a;
  int64_t b, h, bh, offset, slice;
  Acc slope;

  __device__ AttentionPolicy(const DenseArgs& args, int64_t b_, int64_t h_)
      : a(args),
        b(b_),
        h(h_),
        bh(b_ * args.H + h_),
        offset(args.Nk - args.Nq),
        slice(b_ * args.layout.slice_b + h_ * args.layout.slice_h),
        slope(0) {
    if (a.alibi) slope = static_cast<const Acc*>(a.alibi)[b * a.alibi_sb + h * a.alibi_sh];
  }
  __device__ rules::Range keys_of(int64_t q0, int64_t mq) const {
    return rules::band_keys(q0, mq, offset, a.left, a.right, a.Nk);
  }
  __device__ rules::Range queries_of(int64_t k0, int64_t nk) const {
    return rules::band_queries(k0, nk, offset, a.left, a.right, a.Nq);
  }
  // fn(k0) for each key tile (of R keys) that query tile qt (rows [q0, q0 +
  // mq)) visits, and fn(q0) for each query tile that key tile kt (keys [k0,
  // k0 + nk)) visits: the band's range, or a layout's listed tiles that meet
  // it. Every thread of the block calls them alike, so barriers in fn stay
  // matched.
  template <class Fn>
  __device__ void for_each_key_tile(int64_t qt, int64_t q0, int64_t mq, int R, Fn&& fn) const {
    for_each_tile(keys_of(q0, mq), a.layout.q_ptr, a.layout.q_tiles, slice * a.layout.tiles_q + qt, R, fn);
  }
  template <class Fn>
  __device__ void for_each_query_tile(int64_t kt, int64_t k0, int64_t nk, int R, Fn&& fn) const {
    for_each_tile(queries_of(k0, nk), a.layout.k_ptr, a.layout.k_tiles, slice * a.layout.tiles_k + kt, R, fn);
  }
  // The tiles of a band: its range, or list[ptr[x] .. ptr[x + 1]) where they meet it.
  template <class Fn>
  __device__ void for_each_tile(rules::Range band, const int32_t* ptr, const int32_t* list, int64_t x, int R,
                                Fn& fn) const {
    if constexpr (kKinds) {
      if (a.layout.blocks) {
        for (int64_t e = ptr[x]; e < ptr[x + 1]; ++e) {
          const int64_t start = int64_t(list[e]) * R;
          if (start < band.hi && start + R > band.lo) fn(start);
        }
        return;
      }
    }
    for (int64_t start = (band.lo / R) * R; start < band.hi; start += R) fn(start);
  }

  // Whether the layout (and its block masks) lets query i see key j.
  __device__ bool layout_allows(int64_t i, int64_t j) const {
    const BlockLayoutArgs& L = a.layout;
    const int64_t qb = i / L.block, kb = j / L.block;
    const int64_t e = (slice * L.rows + qb) * L.cols + kb;
    if (!L.blocks[e]) return false;
    if (!L.mask_index) return true;
    const int32_t p = L.mask_index[e];
    return p < 0 || L.masks[(int64_t(p) * L.block + (i - qb * L.block)) * L.block + (j - kb * L.block)];
  }
  __device__ int64_t lsh_position(int64_t row) const { return a.lsh.positions[bh * a.Nq + row]; }
  // LSH: a query's own position scores a constant, which has no gradient.
  __device__ bool constant_score(int64_t i, int64_t j) const {
    if constexpr (kKinds) return a.lsh.positions && lsh_position(i) == lsh_position(j);
    return false;
  }

  // The score of (i, j) from the scaled product, or -inf where j is not visible.
  __device__ Acc score(int64_t i, int64_t j, Acc scaled) const {
    const int64_t p = i + offset;
    if (!rules::in_band(p, j, a.left, a.right)) return neg_inf<Acc>();
    if constexpr (kKinds) {
      if (a.layout.blocks && !layout_allows(i, j)) return neg_inf<Acc>();
      if (a.lsh.positions) {
        const int64_t pi = lsh_position(i), pj = lsh_position(j);
        if (pi == pj) return Acc(a.lsh.self_logit);  // even where masked, as the CPU kernel
        if (a.lsh.causal && pj > pi) return neg_inf<Acc>();
      }
    }
    if (a.mask.present() && !static_cast<const uint8_t*>(a.mask.data)[a.mask.offset(b, h, i, j)])
      return neg_inf<Acc>();
    Acc s = scaled;
    if (a.bias.present()) s += static_cast<const Acc*>(a.bias.data)[a.bias.offset(b, h, i, j)];
    if (a.t5_table) s += static_cast<const Acc*>(a.t5_table)[int64_t(t5_bucket(i, j)) * a.H + h];
    if (a.alibi) s += rules::alibi_term(slope, p, j);
    if constexpr (kKinds)
      if (a.shaw.qr) s += shaw_entry(a.shaw.qr, i, j);
    return s;
  }
  // dp of (i, j) from grad_out . v_j: Shaw adds grad_out . rel_v[bucket].
  __device__ Acc dp_of(int64_t i, int64_t j, Acc dp) const {
    if constexpr (kKinds) return a.shaw.dor ? dp + shaw_entry(a.shaw.dor, i, j) : dp;
    return dp;
  }
  __device__ Acc shaw_entry(const void* table, int64_t i, int64_t j) const {
    const int64_t K = a.shaw.K;
    return static_cast<const Acc*>(table)[(bh * a.Nq + i) * (2 * K + 1) + shaw_bucket(i + offset, j, K)];
  }
  __device__ int32_t t5_bucket(int64_t i, int64_t j) const {
    return a.t5_buckets[j - (i + offset) + a.Nk - 1];
  }
  // The dropout counter of (i, j); LSH keys it by round and original positions.
  __device__ uint64_t dropout_index(int64_t i, int64_t j) const {
    if (!kKinds || !a.lsh.positions) return rules::dropout_index(b, h, i, j, a.H, a.Nq, a.Nk);
    const uint64_t n = uint64_t(a.lsh.positions_len), rounds = uint64_t(a.Nq) / n;
    const uint64_t round = uint64_t(i) / n;
    return ((uint64_t(bh) * rounds + round) * n + uint64_t(lsh_position(i))) * n + uint64_t(lsh_position(j));
  }
};
template <typename Acc>
using DensePolicy = AttentionPolicy<Acc, false>;
template <typename Acc>
using KindsPolicy = AttentionPolicy<Acc, true>;

// The dropout of element (i, j) of a policy's (b, h): the factor its probability is multiplied by.
template <typename Acc>
struct DropoutRule {
  bool active;
  uint64_t seed, threshold;
  Acc keep_scale;
  __device__ explicit DropoutRule(const DenseArgs& a)
      : active(a.dropout_p > 0),
        seed(a.seed),
        threshold(rules::dropout_threshold(a.dropout_p)),
        keep_scale(Acc(rules::dropout_keep_scale(a.dropout_p))) {}
  template <class Policy>
  __device__ Acc factor(const Policy& policy, int64_t i, int64_t j) const {
    if (!active) return Acc(1);
    return rules::dropout_keeps(seed, threshold, policy.dropout_index(i, j)) ? keep_scale : Acc(0);
  }
};

// --- The per-element steps, written once for the scalar and tensor-core passes

// One key tile of a row's online softmax. s[m] holds the row's products with
// this lane's columns c = lane + kLanes * m of the tile at k0 (nk columns):
// they become the policy's scores (scaled; -inf where invisible, outside the
// tile or past the last row). Each column's (dropped) probability goes to
// write(c, p). Updates the row's running max and sum and returns the factor
// its running output must be scaled by (1 while it has seen nothing). Every
// lane of the warp must call it: the row reductions are shuffles.
template <int kLanes, int kCols, typename Acc, class Policy, class Write>
__device__ __forceinline__ Acc online_softmax_tile(const DenseArgs& a, const Policy& policy,
                                                   const DropoutRule<Acc>& dropout, int64_t b, int64_t h,
                                                   int64_t i, bool row_exists, int64_t k0, int64_t nk,
                                                   int lane, Acc scale, Acc (&s)[kCols], Acc& m_run,
                                                   Acc& l_run, Write&& write) {
  Acc mx = neg_inf<Acc>();
#pragma unroll
  for (int m = 0; m < kCols; ++m) {
    const int64_t c = lane + kLanes * m;
    s[m] = (row_exists && c < nk) ? policy.score(i, k0 + c, s[m] * scale) : neg_inf<Acc>();
    mx = fmax(mx, s[m]);
  }
  const Acc m_new = fmax(m_run, row_max<kLanes>(mx));
  const bool none = m_new == neg_inf<Acc>();  // nothing visible in this row yet
  Acc sum = 0;
#pragma unroll
  for (int m = 0; m < kCols; ++m) {
    const int64_t c = lane + kLanes * m;
    const Acc p = (none || s[m] == neg_inf<Acc>()) ? Acc(0) : exp_acc(s[m] - m_new);
    sum += p;
    write(c, p == Acc(0) ? Acc(0) : p * dropout.factor(policy, i, k0 + c));
  }
  const Acc row_total = row_sum<kLanes>(sum);
  if (none) return Acc(1);
  const Acc alpha = m_run == neg_inf<Acc>() ? Acc(0) : exp_acc(m_run - m_new);
  l_run = l_run * alpha + row_total;
  m_run = m_new;
  return alpha;
}

// The probability and the score gradient of element (i, j), recomputed from
// its scaled product and the forward's lse: p = exp(s - lse) with s the
// policy's score; dp (with the policy's terms) is dropped as p was;
// ds = p (dp - delta), 0 for a constant score. Zero where the element is not
// a real one of the tile (valid false) or not visible.
template <typename Acc>
struct ScoreGrad {
  Acc p_dropped, ds;
};
template <typename Acc, class Policy>
__device__ __forceinline__ ScoreGrad<Acc> element_grad(const DenseArgs& a, const Policy& policy,
                                                       const DropoutRule<Acc>& dropout, int64_t b, int64_t h,
                                                       int64_t i, int64_t j, bool valid, Acc scaled, Acc lse,
                                                       Acc dp, Acc delta) {
  if (!valid || lse == neg_inf<Acc>()) return {Acc(0), Acc(0)};
  const Acc s = policy.score(i, j, scaled);
  if (s == neg_inf<Acc>()) return {Acc(0), Acc(0)};
  const Acc p = exp_acc(s - lse);
  const Acc drop = dropout.factor(policy, i, j);
  const Acc ds = policy.constant_score(i, j) ? Acc(0) : p * (policy.dp_of(i, j, dp) * drop - delta);
  return {p * drop, ds};
}

// A query-major pass routes each score gradient to where the policy's terms
// came from: the bias element by element, the T5 table per bucket into this
// thread's slot of the bucket (slots (num_buckets, kThreads), so that no two
// threads add to one slot; write_t5_partial sums them in a fixed order).
template <int kThreads, typename Acc, class Policy>
__device__ __forceinline__ void route_score_grad(const DenseArgs& a, const Policy& policy, int64_t bh,
                                                 int64_t i, int64_t j, Acc ds, Acc* t5_slots) {
  if (a.grad_bias) static_cast<Acc*>(a.grad_bias)[(bh * a.Nq + i) * a.Nk + j] = ds;
  if (a.grad_t5_partial) t5_slots[int64_t(policy.t5_bucket(i, j)) * kThreads + threadIdx.x] += ds;
}
template <int kThreads, typename Acc>
__device__ __forceinline__ void zero_t5_slots(const DenseArgs& a, Acc* t5_slots) {
  if (a.grad_t5_partial)
    for (int64_t x = threadIdx.x; x < a.t5_num_buckets * kThreads; x += kThreads) t5_slots[x] = Acc(0);
}
// After the walk (and a barrier): the block's per-bucket sums into its row of
// the (B, H, query tiles, num_buckets) partials.
template <int kThreads, typename Acc>
__device__ __forceinline__ void write_t5_partial(const DenseArgs& a, const Acc* t5_slots, int64_t block_row) {
  Acc* partial = static_cast<Acc*>(a.grad_t5_partial) + block_row * a.t5_num_buckets;
  for (int64_t bucket = threadIdx.x; bucket < a.t5_num_buckets; bucket += kThreads) {
    Acc sum = 0;
    for (int t = 0; t < kThreads; ++t) sum += t5_slots[bucket * kThreads + t];
    partial[bucket] = sum;
  }
}

// Shaw's per-row bucket sums (ShawArgs), for the calling thread's share of
// query row i. Column j of the row is always handled by lane j mod kLanes
// (tiles start at multiples of kRows), so an inner bucket (|j - p| < K: one
// key per row) has one owner, which writes it directly; the two end buckets
// (every key beyond K) are summed per lane and reduced over the row's lanes
// at the end. Every lane of the warp must call finish_*: its sums are shuffles.
template <int kLanes, typename Acc, bool kOn>
struct ShawRow {
  Acc lo = 0, hi = 0, lo2 = 0, hi2 = 0, tile_lo = 0, tile_hi = 0;
  int64_t K = -1, p = 0, row = 0;  // row: (bh, i)'s offset in the (.., 2K+1) tables
  bool on = false;

  __device__ ShawRow(const DenseArgs& a, int64_t bh, int64_t i, bool row_exists, bool wanted) {
    on = wanted && row_exists;
    if (!wanted) return;
    K = a.shaw.K;
    p = i + a.Nk - a.Nq;
    row = (bh * a.Nq + i) * (2 * K + 1);
  }
  // Where key j goes: -1 the low end, +1 the high end, 0 an inner bucket.
  __device__ int side(int64_t j) const {
    const int64_t d = j - p;
    return d <= -K ? -1 : (d >= K ? 1 : 0);
  }

  // --- forward: the dropped probabilities of a row, per bucket -------------
  // A probability of this tile (relative to the tile's running max).
  __device__ void forward_prob(int64_t j, Acc prob) {
    if (!on) return;
    const int s = side(j);
    if (s < 0) tile_lo += prob;
    if (s > 0) tile_hi += prob;
  }
  // The tile's scores (after online_softmax_tile: -inf where invisible): an
  // inner bucket keeps its score until the row's lse is known.
  template <int kCols>
  __device__ void forward_scores(const DenseArgs& a, const Acc (&s)[kCols], int64_t k0, int64_t nk,
                                 int lane) {
    if (!on) return;
#pragma unroll
    for (int m = 0; m < kCols; ++m) {
      const int64_t c = lane + kLanes * m, j = k0 + c;
      if (c < nk && side(j) == 0) static_cast<Acc*>(a.shaw.probs)[row + (j - p + K)] = s[m];
    }
  }
  // After the tile: the end sums follow the running max (alpha), like the output.
  __device__ void end_tile(Acc alpha) {
    lo = lo * alpha + tile_lo;
    hi = hi * alpha + tile_hi;
    tile_lo = tile_hi = 0;
  }
  // The row's bucket probabilities from its final max and sum.
  template <class Policy>
  __device__ void finish_forward(const DenseArgs& a, const Policy& policy, const DropoutRule<Acc>& dropout,
                                 int64_t i, int lane, Acc m_run, Acc l_run) {
    const Acc lo_all = row_sum<kLanes>(lo), hi_all = row_sum<kLanes>(hi);
    if (!on) return;
    Acc* out = static_cast<Acc*>(a.shaw.probs) + row;
    const bool seen = l_run > Acc(0);
    const Acc lse = seen ? m_run + log_acc(l_run) : Acc(0), inv = seen ? Acc(1) / l_run : Acc(0);
    for (int64_t r = 1; r < 2 * K; ++r) {
      const int64_t j = p + r - K;
      if (((j % kLanes) + kLanes) % kLanes != lane) continue;  // the lane that wrote it
      const Acc s = out[r];
      const bool visible = seen && j >= 0 && j < a.Nk && s != neg_inf<Acc>();
      out[r] = visible ? exp_acc(s - lse) * dropout.factor(policy, i, j) : Acc(0);
    }
    if (lane != 0) return;
    if (K == 0) {
      out[0] = (lo_all + hi_all) * inv;
    } else {
      out[0] = lo_all * inv;
      out[2 * K] = hi_all * inv;
    }
  }

  // --- grad_q: the score gradients and dropped probabilities per bucket ----
  __device__ void backward_element(const DenseArgs& a, int64_t j, const ScoreGrad<Acc>& g) {
    if (!on) return;
    const int s = side(j);
    if (s == 0) {
      static_cast<Acc*>(a.shaw.grad_scores)[row + (j - p + K)] = g.ds;
      if (a.shaw.grad_probs) static_cast<Acc*>(a.shaw.grad_probs)[row + (j - p + K)] = g.p_dropped;
    } else if (s < 0) {
      lo += g.ds;
      lo2 += g.p_dropped;
    } else {
      hi += g.ds;
      hi2 += g.p_dropped;
    }
  }
  __device__ void finish_backward(const DenseArgs& a, int lane) {
    const Acc lo_all = row_sum<kLanes>(lo), hi_all = row_sum<kLanes>(hi);
    const Acc lo2_all = row_sum<kLanes>(lo2), hi2_all = row_sum<kLanes>(hi2);
    if (!on || lane != 0) return;
    Acc* ds = static_cast<Acc*>(a.shaw.grad_scores) + row;
    Acc* pr = a.shaw.grad_probs ? static_cast<Acc*>(a.shaw.grad_probs) + row : nullptr;
    if (K == 0) {
      ds[0] = lo_all + hi_all;
      if (pr) pr[0] = lo2_all + hi2_all;
    } else {
      ds[0] = lo_all, ds[2 * K] = hi_all;
      if (pr) pr[0] = lo2_all, pr[2 * K] = hi2_all;
    }
  }
};
// Without the kinds compiled in: nothing to keep.
template <int kLanes, typename Acc>
struct ShawRow<kLanes, Acc, false> {
  __device__ ShawRow(const DenseArgs&, int64_t, int64_t, bool, bool) {}
  __device__ void forward_prob(int64_t, Acc) {}
  template <int kCols>
  __device__ void forward_scores(const DenseArgs&, const Acc (&)[kCols], int64_t, int64_t, int) {}
  __device__ void end_tile(Acc) {}
  template <class Policy>
  __device__ void finish_forward(const DenseArgs&, const Policy&, const DropoutRule<Acc>&, int64_t, int, Acc,
                                 Acc) {}
  __device__ void backward_element(const DenseArgs&, int64_t, const ScoreGrad<Acc>&) {}
  __device__ void finish_backward(const DenseArgs&, int) {}
};

// A key-major pass stages the log-sum-exp (-inf past the last row) and delta
// of query rows [q0, q0 + mq) for the whole block.
template <int kRows, int kThreads, typename Acc>
__device__ __forceinline__ void stage_row_stats(const DenseArgs& a, int64_t bh, int64_t q0, int64_t mq,
                                                Acc* lse_s, Acc* delta_s) {
  for (int x = threadIdx.x; x < kRows; x += kThreads) {
    lse_s[x] = x < mq ? static_cast<const Acc*>(a.lse)[bh * a.Nq + q0 + x] : neg_inf<Acc>();
    delta_s[x] = x < mq ? static_cast<const Acc*>(a.delta)[bh * a.Nq + q0 + x] : Acc(0);
  }
}

// Element e of the forward's output: in T, or in Acc where the caller adds
// more to it (Shaw's relative values) before rounding.
template <typename T, typename Acc>
__device__ __forceinline__ void store_output(const DenseArgs& a, int64_t e, Acc x) {
  if (a.out_in_acc)
    static_cast<Acc*>(a.out)[e] = x;
  else
    static_cast<T*>(a.out)[e] = from_acc<T>(x);
}

// --- Forward --------------------------------------------------------------

// Blocks: (b, h, query tile) flattened on x.
template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) forward_kernel(const __grid_constant__ DenseArgs a) {
  using Acc = typename TypeTraits<T>::Acc;
  constexpr int R = Tl::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strides ld(a.D, a.Dv, R);
  Acc* Qs = reinterpret_cast<Acc*>(smem_raw);
  Acc* Ks = Qs + R * ld.qk;
  Acc* Vs = Ks + R * ld.qk;
  Acc* Ps = Vs + R * ld.v;

  const auto [tiles, qt, bh, b, h, kvh, q0, mq, r, lane] = BlockTile<R, Tl::kLanes>(a, a.Nq);
  const T* k = static_cast<const T*>(a.k) + kvh * a.Nk * a.D;
  const T* v = static_cast<const T*>(a.v) + kvh * a.Nk * a.Dv;
  const Policy<Acc> policy(a, b, h);
  const DropoutRule<Acc> dropout(a);
  const Acc scale = Acc(a.scale);

  stage_rows<R, Tl::kThreads>(Qs, ld.qk, static_cast<const T*>(a.q) + (bh * a.Nq + q0) * a.D, a.D, mq);
  Acc m_run = neg_inf<Acc>(), l_run = 0;
  Acc o[Tl::kDims];
#pragma unroll
  for (int d = 0; d < Tl::kDims; ++d) o[d] = 0;
  ShawRow<Tl::kLanes, Acc, Policy<Acc>::kKinds> shaw(a, bh, q0 + r, r < mq, a.shaw.probs != nullptr);

  policy.for_each_key_tile(qt, q0, mq, R, [&](int64_t k0) {
    const int64_t nk = rules::min64(R, a.Nk - k0);
    __syncthreads();  // the previous tile is no longer read
    stage_rows<R, Tl::kThreads>(Ks, ld.qk, k + k0 * a.D, a.D, nk);
    stage_rows<R, Tl::kThreads>(Vs, ld.v, v + k0 * a.Dv, a.Dv, nk);
    __syncthreads();
    Acc s[Tl::kCols];
    dot_rows<Tl>(s, Qs + r * ld.qk, Ks, ld.qk, lane, a.D);
    Acc* prow = Ps + r * ld.tile;
    const Acc alpha = online_softmax_tile<Tl::kLanes>(a, policy, dropout, b, h, q0 + r, r < mq, k0, nk, lane,
                                                      scale, s, m_run, l_run, [&](int64_t c, Acc p) {
                                                        prow[c] = p;
                                                        shaw.forward_prob(k0 + c, p);
                                                      });
    shaw.forward_scores(a, s, k0, nk, lane);
    shaw.end_tile(alpha);
    if (alpha != Acc(1))
#pragma unroll
      for (int d = 0; d < Tl::kDims; ++d) o[d] *= alpha;
    __syncwarp();  // the row's probabilities, written by its lanes, are read by all of them
    accumulate_rows<Tl>(o, prow, Vs, ld.v, lane, nk, a.Dv);
  });
  shaw.finish_forward(a, policy, dropout, q0 + r, lane, m_run, l_run);

  if (r >= mq) return;
  const int64_t i = q0 + r;
  const bool seen = l_run > Acc(0);
  const Acc inv = seen ? Acc(1) / l_run : Acc(0);  // no visible key: output 0, lse -inf
#pragma unroll
  for (int d = 0; d < Tl::kDims; ++d) {
    const int64_t col = lane + Tl::kLanes * d;
    if (col < a.Dv) store_output<T>(a, (bh * a.Nq + i) * a.Dv + col, o[d] * inv);
  }
  if (lane == 0) static_cast<Acc*>(a.lse)[bh * a.Nq + i] = seen ? m_run + log_acc(l_run) : neg_inf<Acc>();
}

// --- Probabilities (attention_weights) ------------------------------------

// One thread per (b, h, i, j); reads the forward's lse. For inspection only.
template <typename T, template <typename> class Policy>
__global__ void probs_kernel(const __grid_constant__ DenseArgs a) {
  using Acc = typename TypeTraits<T>::Acc;
  const int64_t total = a.B * a.H * a.Nq * a.Nk;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % a.Nk, i = (e / a.Nk) % a.Nq, bh = e / (a.Nk * a.Nq), b = bh / a.H, h = bh % a.H;
    const Policy<Acc> policy(a, b, h);
    const Acc lse = static_cast<const Acc*>(a.lse)[bh * a.Nq + i];
    Acc p = 0;
    if (lse != neg_inf<Acc>()) {
      const int64_t kvh = b * a.Hkv + h / (a.H / a.Hkv);
      const T* q = static_cast<const T*>(a.q) + (bh * a.Nq + i) * a.D;
      const T* k = static_cast<const T*>(a.k) + (kvh * a.Nk + j) * a.D;
      Acc dot = 0;
      for (int64_t x = 0; x < a.D; ++x) dot += to_acc(q[x]) * to_acc(k[x]);
      const Acc s = policy.score(i, j, dot * Acc(a.scale));
      if (s != neg_inf<Acc>()) p = exp_acc(s - lse) * DropoutRule<Acc>(a).factor(policy, i, j);
    }
    static_cast<T*>(a.probs)[e] = from_acc<T>(p);
  }
}

// --- Backward -------------------------------------------------------------

// Query-major: dq, and the gradients of what the policy added to the scores
// (the bias element by element, the T5 table per bucket). Blocks as forward.
template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) grad_q_kernel(const __grid_constant__ DenseArgs a) {
  using Acc = typename TypeTraits<T>::Acc;
  constexpr int R = Tl::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strides ld(a.D, a.Dv, R);
  Acc* Qs = reinterpret_cast<Acc*>(smem_raw);
  Acc* dOs = Qs + R * ld.qk;
  Acc* Ks = dOs + R * ld.v;
  Acc* Vs = Ks + R * ld.qk;
  Acc* Ds = Vs + R * ld.v;
  Acc* t5_slots = Ds + R * ld.tile;  // (num_buckets, kThreads): route_score_grad

  const auto [tiles, qt, bh, b, h, kvh, q0, mq, r, lane] = BlockTile<R, Tl::kLanes>(a, a.Nq);
  const T* k = static_cast<const T*>(a.k) + kvh * a.Nk * a.D;
  const T* v = static_cast<const T*>(a.v) + kvh * a.Nk * a.Dv;
  const Policy<Acc> policy(a, b, h);
  const DropoutRule<Acc> dropout(a);
  const Acc scale = Acc(a.scale);

  stage_rows<R, Tl::kThreads>(Qs, ld.qk, static_cast<const T*>(a.q) + (bh * a.Nq + q0) * a.D, a.D, mq);
  stage_rows<R, Tl::kThreads>(dOs, ld.v, static_cast<const T*>(a.grad_out) + (bh * a.Nq + q0) * a.Dv, a.Dv,
                              mq);
  zero_t5_slots<Tl::kThreads>(a, t5_slots);
  const int64_t i = q0 + r;
  const Acc lse = r < mq ? static_cast<const Acc*>(a.lse)[bh * a.Nq + i] : neg_inf<Acc>();
  const Acc delta = r < mq ? static_cast<const Acc*>(a.delta)[bh * a.Nq + i] : Acc(0);
  Acc dq[Tl::kDims];
#pragma unroll
  for (int d = 0; d < Tl::kDims; ++d) dq[d] = 0;
  ShawRow<Tl::kLanes, Acc, Policy<Acc>::kKinds> shaw(a, bh, i, r < mq, a.shaw.grad_scores != nullptr);

  policy.for_each_key_tile(qt, q0, mq, R, [&](int64_t k0) {
    const int64_t nk = rules::min64(R, a.Nk - k0);
    __syncthreads();
    stage_rows<R, Tl::kThreads>(Ks, ld.qk, k + k0 * a.D, a.D, nk);
    stage_rows<R, Tl::kThreads>(Vs, ld.v, v + k0 * a.Dv, a.Dv, nk);
    __syncthreads();
    Acc s[Tl::kCols], dp[Tl::kCols];
    dot_rows<Tl>(s, Qs + r * ld.qk, Ks, ld.qk, lane, a.D);
    dot_rows<Tl>(dp, dOs + r * ld.v, Vs, ld.v, lane, a.Dv);
    Acc* drow = Ds + r * ld.tile;
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) {
      const int64_t c = lane + Tl::kLanes * m, j = k0 + c;
      const bool valid = r < mq && c < nk;
      const ScoreGrad<Acc> g =
          element_grad(a, policy, dropout, b, h, i, j, valid, s[m] * scale, lse, dp[m], delta);
      drow[c] = g.ds;
      if (valid) {
        route_score_grad<Tl::kThreads>(a, policy, bh, i, j, g.ds, t5_slots);
        shaw.backward_element(a, j, g);
      }
    }
    __syncwarp();
    accumulate_rows<Tl>(dq, drow, Ks, ld.qk, lane, nk, a.D);
  });
  shaw.finish_backward(a, lane);

  if (r < mq) {
    Acc* out = static_cast<Acc*>(a.grad_q) + (bh * a.Nq + i) * a.D;
#pragma unroll
    for (int d = 0; d < Tl::kDims; ++d) {
      const int64_t col = lane + Tl::kLanes * d;
      if (col < a.D) out[col] = dq[d] * scale;
    }
  }
  if (a.grad_t5_partial) {
    __syncthreads();
    write_t5_partial<Tl::kThreads>(a, t5_slots, bh * tiles + qt);
  }
}

// Key-major: dk and dv of one key tile of one query head. Blocks: (b, h, key tile).
template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) grad_kv_kernel(const __grid_constant__ DenseArgs a) {
  using Acc = typename TypeTraits<T>::Acc;
  constexpr int R = Tl::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Strides ld(a.D, a.Dv, R);
  Acc* Ks = reinterpret_cast<Acc*>(smem_raw);
  Acc* Vs = Ks + R * ld.qk;
  Acc* Qs = Vs + R * ld.v;
  Acc* dOs = Qs + R * ld.qk;
  Acc* Pt = dOs + R * ld.v;    // dropped probabilities, transposed: row = key
  Acc* Dt = Pt + R * ld.tile;  // score gradients, transposed
  Acc* lse_s = Dt + R * ld.tile;
  Acc* delta_s = lse_s + R;

  const auto [tiles, kt, bh, b, h, kvh, k0, nk, c, lane] = BlockTile<R, Tl::kLanes>(a, a.Nk);
  const T* q = static_cast<const T*>(a.q) + bh * a.Nq * a.D;
  const T* dout = static_cast<const T*>(a.grad_out) + bh * a.Nq * a.Dv;
  const Policy<Acc> policy(a, b, h);
  const DropoutRule<Acc> dropout(a);
  const Acc scale = Acc(a.scale);
  const int64_t j = k0 + c;

  stage_rows<R, Tl::kThreads>(Ks, ld.qk, static_cast<const T*>(a.k) + (kvh * a.Nk + k0) * a.D, a.D, nk);
  stage_rows<R, Tl::kThreads>(Vs, ld.v, static_cast<const T*>(a.v) + (kvh * a.Nk + k0) * a.Dv, a.Dv, nk);
  Acc dk[Tl::kDims], dv[Tl::kDims];
#pragma unroll
  for (int d = 0; d < Tl::kDims; ++d) dk[d] = dv[d] = 0;

  policy.for_each_query_tile(kt, k0, nk, R, [&](int64_t q0) {
    const int64_t mq = rules::min64(R, a.Nq - q0);
    __syncthreads();
    stage_rows<R, Tl::kThreads>(Qs, ld.qk, q + q0 * a.D, a.D, mq);
    stage_rows<R, Tl::kThreads>(dOs, ld.v, dout + q0 * a.Dv, a.Dv, mq);
    stage_row_stats<R, Tl::kThreads>(a, bh, q0, mq, lse_s, delta_s);
    __syncthreads();
    Acc s[Tl::kCols], dp[Tl::kCols];
    dot_rows<Tl>(s, Ks + c * ld.qk, Qs, ld.qk, lane, a.D);
    dot_rows<Tl>(dp, Vs + c * ld.v, dOs, ld.v, lane, a.Dv);
    Acc* prow = Pt + c * ld.tile;
    Acc* drow = Dt + c * ld.tile;
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) {
      const int64_t rr = lane + Tl::kLanes * m, i = q0 + rr;
      const bool valid = c < nk && rr < mq;
      const ScoreGrad<Acc> g =
          element_grad(a, policy, dropout, b, h, i, j, valid, s[m] * scale, lse_s[rr], dp[m], delta_s[rr]);
      prow[rr] = g.p_dropped;
      drow[rr] = g.ds;
    }
    __syncwarp();
    accumulate_rows<Tl>(dv, prow, dOs, ld.v, lane, mq, a.Dv);
    accumulate_rows<Tl>(dk, drow, Qs, ld.qk, lane, mq, a.D);
  });

  if (c >= nk) return;
  Acc* gk = static_cast<Acc*>(a.grad_k) + (bh * a.Nk + j) * a.D;
  Acc* gv = static_cast<Acc*>(a.grad_v) + (bh * a.Nk + j) * a.Dv;
#pragma unroll
  for (int d = 0; d < Tl::kDims; ++d) {
    const int64_t col = lane + Tl::kLanes * d;
    if (col < a.D) gk[col] = dk[d] * scale;
    if (col < a.Dv) gv[col] = dv[d];
  }
}

// --- Launchers ------------------------------------------------------------

template <class Tl, typename Acc>
struct SharedBytesOf {
  static size_t forward(const DenseArgs& a) {
    const Strides ld(a.D, a.Dv, Tl::kRows);
    return sizeof(Acc) * Tl::kRows * (2 * ld.qk + ld.v + ld.tile);
  }
  static size_t grad_q(const DenseArgs& a) {
    const Strides ld(a.D, a.Dv, Tl::kRows);
    const int64_t t5 = a.grad_t5_partial ? a.t5_num_buckets * Tl::kThreads : 0;
    return sizeof(Acc) * (Tl::kRows * (2 * ld.qk + 2 * ld.v + ld.tile) + t5);
  }
  static size_t grad_kv(const DenseArgs& a) {
    const Strides ld(a.D, a.Dv, Tl::kRows);
    return sizeof(Acc) * Tl::kRows * (2 * ld.qk + 2 * ld.v + 2 * ld.tile + 2);
  }
};

// Launch with `bytes` of dynamic shared memory (raising the kernel's limit
// past the default 48 KB when needed); returns the CUDA error code.
template <class Kernel>
int launch(Kernel kernel, int64_t blocks, int threads, size_t bytes, const DenseArgs& a, void* stream) {
  if (blocks == 0) return cudaSuccess;
  if (bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(unsigned(blocks)), dim3(threads), bytes, static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}

template <typename T, class Tl, template <typename> class Policy>
struct DenseLaunchers {
  using Acc = typename TypeTraits<T>::Acc;
  static int64_t tiles(int64_t n) { return (n + Tl::kRows - 1) / Tl::kRows; }
  static int forward(const DenseArgs& a, void* stream) {
    return launch(forward_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nq), Tl::kThreads,
                  SharedBytesOf<Tl, Acc>::forward(a), a, stream);
  }
  static int probs(const DenseArgs& a, void* stream) {
    const int64_t total = a.B * a.H * a.Nq * a.Nk, threads = 256;
    const int64_t blocks = total == 0 ? 0 : rules::min64((total + threads - 1) / threads, 65536);
    return launch(probs_kernel<T, Policy>, blocks, int(threads), 0, a, stream);
  }
  static int grad_q(const DenseArgs& a, void* stream) {
    return launch(grad_q_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nq), Tl::kThreads,
                  SharedBytesOf<Tl, Acc>::grad_q(a), a, stream);
  }
  static int grad_kv(const DenseArgs& a, void* stream) {
    return launch(grad_kv_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nk), Tl::kThreads,
                  SharedBytesOf<Tl, Acc>::grad_kv(a), a, stream);
  }
  static const DensePasses* table(const char* name) {
    static const DensePasses passes{&forward,
                                    &probs,
                                    &grad_q,
                                    &grad_kv,
                                    &SharedBytesOf<Tl, Acc>::forward,
                                    &SharedBytesOf<Tl, Acc>::grad_q,
                                    &SharedBytesOf<Tl, Acc>::grad_kv,
                                    Tl::kRows,
                                    Tl::kMaxD,
                                    name};
    return &passes;
  }
};

// The tier for (D, Dv) of input type T under Policy; the .cu files of T
// instantiate it. (double stops at 128: its tiles take twice the shared
// memory, and it serves gradcheck, not speed.)
template <typename T, template <typename> class Policy>
const DensePasses* dense_passes_for(int64_t D, int64_t Dv) {
  using Acc = typename TypeTraits<T>::Acc;
  const int64_t d = rules::max64(D, Dv);
  if (d <= 64) return DenseLaunchers<T, Tiles<64, Acc>, Policy>::table("d64");
  if (d <= 128) return DenseLaunchers<T, Tiles<128, Acc>, Policy>::table("d128");
  if constexpr (sizeof(Acc) == 4) {
    if (d <= 256) return DenseLaunchers<T, Tiles<256, Acc>, Policy>::table("d256");
  }
  return nullptr;
}

}  // namespace attnzoo::cuda
