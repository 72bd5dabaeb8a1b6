#pragma once
// The tensor-core passes for bfloat16 and float16 inputs: the same walk, policy
// and per-element rules as the scalar passes (dense_kernels.cuh), with the
// tile products on the tensor cores through WMMA (16 x 16 x 16 fragments,
// float32 accumulation; sm_80 and newer).
//
// A block of 8 warps owns kRows rows. The products write their float32
// tiles (scores, dp) to shared memory; the per-element step (policy, online
// softmax, dropout, score gradient) runs on them as in the scalar passes,
// kLanes threads per row; the probabilities / score gradients go back to
// shared memory in the input type for the next product, as FlashAttention-2
// does. Accumulators that need no per-row rescaling (dq, dk, dv) stay in
// fragments for the whole walk; the forward's output, rescaled by the online
// softmax, lives in shared memory in float32.
//
// Shared-memory rows of 16-bit tiles are padded by 8 elements (16 bytes) and
// float rows by 4, which keeps WMMA's alignment rules (ldm a multiple of 8 /
// 4 elements, fragment pointers on 32 bytes) and shifts consecutive rows by
// one bank group.
#include <mma.h>

#include "attnzoo/ops/cuda/dense_kernels.cuh"

namespace attnzoo::cuda {

template <int kMaxD_>
struct MmaTiles {
  static constexpr int kMaxD = kMaxD_;
  static constexpr int kRows = kMaxD <= 128 ? 64 : 32;
  static constexpr int kThreads = 256;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kLanes = kThreads / kRows;  // threads sharing a row: 4 or 8
  static constexpr int kCols = kRows / kLanes;     // tile columns per thread
  static constexpr int kTiles = kRows / 16;        // fragment tiles along a row block
  // Accumulator fragments per warp for a kRows x kMaxD result.
  static constexpr int kFrags = (kTiles * (kMaxD / 16) + kWarps - 1) / kWarps;
};

__host__ __device__ inline int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ inline size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Row strides (elements) and region sizes (bytes) of the shared memory.
struct MmaLayout {
  int64_t Dp, Dvp;   // head dimensions padded to the fragment size
  int64_t ldq, ldv;  // 16-bit tiles of q/k and v/grad_out rows
  int64_t lds, ldp;  // float score tiles, 16-bit probability tiles
  int64_t ldo;       // float staging of a kRows x max(D, Dv) result
  size_t scores, staged_pair, result, rows16;
  __host__ __device__ MmaLayout(int64_t D, int64_t Dv, int rows)
      : Dp(round16(D)),
        Dvp(round16(Dv)),
        ldq(Dp + 8),
        ldv(Dvp + 8),
        lds(rows + 4),
        ldp(rows + 8),
        ldo((Dp > Dvp ? Dp : Dvp) + 4),
        scores(align128(sizeof(float) * rows * lds)),
        staged_pair(align128(2 * rows * (ldq + ldv))),
        result(align128(sizeof(float) * rows * ldo)),
        rows16(align128(2 * rows * ldp)) {}
  // A region holding either a staged (q|k, v|grad_out) pair or a float result.
  __host__ __device__ size_t pair_or_result() const { return staged_pair > result ? staged_pair : result; }
};

// Stage rows [0, n) and columns [0, dim) of a (rows x dim) block into a
// (kRows x dim_padded) 16-bit tile; the rest becomes 0 (padded columns feed
// the products).
template <int kRows, int kThreads, typename T>
__device__ __forceinline__ void stage_padded(T* dst, int64_t ld, const T* src, int64_t dim,
                                             int64_t dim_padded, int64_t n) {
  for (int64_t idx = threadIdx.x; idx < kRows * dim_padded; idx += kThreads) {
    const int64_t row = idx / dim_padded, col = idx - row * dim_padded;
    dst[row * ld + col] = (row < n && col < dim) ? src[row * dim + col] : T(0.0f);
  }
}

namespace wm = nvcuda::wmma;
template <typename T>
using FragA = wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major>;
template <typename T, typename Layout>
using FragB = wm::fragment<wm::matrix_b, 16, 16, 16, T, Layout>;
using FragC = wm::fragment<wm::accumulator, 16, 16, 16, float>;

// C (kRows x kRows, float, ldc) = A (kRows x depth) * B^T, B given as
// (kRows x depth) rows: the scores q k^T or dp = dout v^T. Warps split the tiles.
template <class Tl, typename T>
__device__ __forceinline__ void product_abt(float* c, int64_t ldc, const T* a, const T* b, int64_t ld,
                                            int64_t depth) {
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < Tl::kTiles * Tl::kTiles; t += Tl::kWarps) {
    const int ti = t / Tl::kTiles, tj = t % Tl::kTiles;
    FragC acc;
    wm::fill_fragment(acc, 0.0f);
    for (int64_t kk = 0; kk < depth; kk += 16) {
      FragA<T> fa;
      FragB<T, wm::col_major> fb;
      wm::load_matrix_sync(fa, a + ti * 16 * ld + kk, unsigned(ld));
      wm::load_matrix_sync(fb, b + tj * 16 * ld + kk, unsigned(ld));
      wm::mma_sync(acc, fa, fb, acc);
    }
    wm::store_matrix_sync(c + ti * 16 * ldc + tj * 16, acc, unsigned(ldc), wm::mem_row_major);
  }
}

// acc[u] += P (kRows x kRows, 16-bit, ldp) * B (kRows x width, row-major, ldb)
// for the result tiles this warp owns: tile t = warp + kWarps * u.
template <class Tl, typename T>
__device__ __forceinline__ void accumulate_pb(FragC (&acc)[Tl::kFrags], const T* p, int64_t ldp, const T* b,
                                              int64_t ldb, int64_t width) {
  const int warp = threadIdx.x / 32;
  const int64_t col_tiles = width / 16;
#pragma unroll
  for (int u = 0; u < Tl::kFrags; ++u) {
    const int64_t t = warp + Tl::kWarps * u;
    if (t >= Tl::kTiles * col_tiles) break;
    const int64_t ti = t / col_tiles, tj = t % col_tiles;
    for (int kk = 0; kk < Tl::kRows; kk += 16) {
      FragA<T> fa;
      FragB<T, wm::row_major> fb;
      wm::load_matrix_sync(fa, p + ti * 16 * ldp + kk, unsigned(ldp));
      wm::load_matrix_sync(fb, b + kk * ldb + tj * 16, unsigned(ldb));
      wm::mma_sync(acc[u], fa, fb, acc[u]);
    }
  }
}

// Store the warp's accumulator tiles of a (kRows x width) result to float
// shared memory (row stride ldo).
template <class Tl>
__device__ __forceinline__ void store_frags(float* dst, int64_t ldo, FragC (&acc)[Tl::kFrags],
                                            int64_t width) {
  const int warp = threadIdx.x / 32;
  const int64_t col_tiles = width / 16;
#pragma unroll
  for (int u = 0; u < Tl::kFrags; ++u) {
    const int64_t t = warp + Tl::kWarps * u;
    if (t >= Tl::kTiles * col_tiles) break;
    const int64_t ti = t / col_tiles, tj = t % col_tiles;
    wm::store_matrix_sync(dst + ti * 16 * ldo + tj * 16, acc[u], unsigned(ldo), wm::mem_row_major);
  }
}

template <class Tl>
__device__ __forceinline__ void zero_frags(FragC (&acc)[Tl::kFrags]) {
#pragma unroll
  for (int u = 0; u < Tl::kFrags; ++u) wm::fill_fragment(acc[u], 0.0f);
}

// --- Forward --------------------------------------------------------------

template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) mma_forward_kernel(const __grid_constant__ DenseArgs a) {
  constexpr int R = Tl::kRows;
  const MmaLayout L(a.D, a.Dv, R);
  extern __shared__ __align__(128) unsigned char mma_smem[];
  unsigned char* smem_raw = mma_smem;
  float* Ss = reinterpret_cast<float*>(smem_raw);
  float* Os = reinterpret_cast<float*>(smem_raw + L.scores);
  T* Qs = reinterpret_cast<T*>(smem_raw + L.scores + L.result);
  T* Ks = Qs + R * L.ldq;
  T* Vs = Ks + R * L.ldq;
  T* Ps = reinterpret_cast<T*>(smem_raw + L.scores + L.result + align128(2 * R * (2 * L.ldq + L.ldv)));

  const auto [tiles, qt, bh, b, h, kvh, q0, mq, r, lane] = BlockTile<R, Tl::kLanes>(a, a.Nq);
  const T* k = static_cast<const T*>(a.k) + kvh * a.Nk * a.D;
  const T* v = static_cast<const T*>(a.v) + kvh * a.Nk * a.Dv;
  const Policy<float> policy(a, b, h);
  const DropoutRule<float> dropout(a);
  const float scale = float(a.scale);

  stage_padded<R, Tl::kThreads>(Qs, L.ldq, static_cast<const T*>(a.q) + (bh * a.Nq + q0) * a.D, a.D, L.Dp,
                                mq);
  for (int64_t x = threadIdx.x; x < R * L.ldo; x += Tl::kThreads) Os[x] = 0.0f;
  float m_run = neg_inf<float>(), l_run = 0.0f;
  ShawRow<Tl::kLanes, float, Policy<float>::kKinds> shaw(a, bh, q0 + r, r < mq, a.shaw.probs != nullptr);

  policy.for_each_key_tile(qt, q0, mq, R, [&](int64_t k0) {
    const int64_t nk = rules::min64(R, a.Nk - k0);
    __syncthreads();  // the previous tile is no longer read
    stage_padded<R, Tl::kThreads>(Ks, L.ldq, k + k0 * a.D, a.D, L.Dp, nk);
    stage_padded<R, Tl::kThreads>(Vs, L.ldv, v + k0 * a.Dv, a.Dv, L.Dvp, nk);
    __syncthreads();
    product_abt<Tl>(Ss, L.lds, Qs, Ks, L.ldq, L.Dp);
    __syncthreads();

    // The per-element step (dense_kernels.cuh), on the float scores.
    float s[Tl::kCols];
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) s[m] = Ss[r * L.lds + lane + Tl::kLanes * m];
    T* prow = Ps + r * L.ldp;
    const float alpha =
        online_softmax_tile<Tl::kLanes>(a, policy, dropout, b, h, q0 + r, r < mq, k0, nk, lane, scale, s,
                                        m_run, l_run, [&](int64_t c, float p) {
                                          prow[c] = from_acc<T>(p);
                                          shaw.forward_prob(k0 + c, p);
                                        });
    shaw.forward_scores(a, s, k0, nk, lane);
    shaw.end_tile(alpha);
    if (alpha != 1.0f)
      for (int64_t col = lane; col < L.Dvp; col += Tl::kLanes) Os[r * L.ldo + col] *= alpha;
    __syncthreads();

    // O += P V, through the float staging of O.
    const int warp = threadIdx.x / 32;
    const int64_t col_tiles = L.Dvp / 16;
    for (int64_t t = warp; t < Tl::kTiles * col_tiles; t += Tl::kWarps) {
      const int64_t ti = t / col_tiles, tj = t % col_tiles;
      FragC acc;
      float* o = Os + ti * 16 * L.ldo + tj * 16;
      wm::load_matrix_sync(acc, o, unsigned(L.ldo), wm::mem_row_major);
      for (int kk = 0; kk < R; kk += 16) {
        FragA<T> fa;
        FragB<T, wm::row_major> fb;
        wm::load_matrix_sync(fa, Ps + ti * 16 * L.ldp + kk, unsigned(L.ldp));
        wm::load_matrix_sync(fb, Vs + kk * L.ldv + tj * 16, unsigned(L.ldv));
        wm::mma_sync(acc, fa, fb, acc);
      }
      wm::store_matrix_sync(o, acc, unsigned(L.ldo), wm::mem_row_major);
    }
  });
  __syncthreads();
  shaw.finish_forward(a, policy, dropout, q0 + r, lane, m_run, l_run);

  if (r >= mq) return;
  const int64_t i = q0 + r;
  const bool seen = l_run > 0.0f;
  const float inv = seen ? 1.0f / l_run : 0.0f;  // no visible key: output 0, lse -inf
  for (int64_t col = lane; col < a.Dv; col += Tl::kLanes)
    store_output<T>(a, (bh * a.Nq + i) * a.Dv + col, Os[r * L.ldo + col] * inv);
  if (lane == 0) static_cast<float*>(a.lse)[bh * a.Nq + i] = seen ? m_run + logf(l_run) : neg_inf<float>();
}

// --- Backward, query-major: dq and the score gradients --------------------

template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) mma_grad_q_kernel(const __grid_constant__ DenseArgs a) {
  constexpr int R = Tl::kRows;
  const MmaLayout L(a.D, a.Dv, R);
  extern __shared__ __align__(128) unsigned char mma_smem[];
  unsigned char* smem_raw = mma_smem;
  float* Ss = reinterpret_cast<float*>(smem_raw);
  float* dPs = reinterpret_cast<float*>(smem_raw + L.scores);
  unsigned char* pair = smem_raw + 2 * L.scores;  // k and v tiles, then the dq result
  T* Ks = reinterpret_cast<T*>(pair);
  T* Vs = Ks + R * L.ldq;
  float* result = reinterpret_cast<float*>(pair);
  T* Qs = reinterpret_cast<T*>(pair + L.pair_or_result());
  T* dOs = Qs + R * L.ldq;
  T* Ds = reinterpret_cast<T*>(pair + L.pair_or_result() + L.staged_pair);
  float* t5_slots = reinterpret_cast<float*>(pair + L.pair_or_result() + L.staged_pair + L.rows16);

  const auto [tiles, qt, bh, b, h, kvh, q0, mq, r, lane] = BlockTile<R, Tl::kLanes>(a, a.Nq);
  const T* k = static_cast<const T*>(a.k) + kvh * a.Nk * a.D;
  const T* v = static_cast<const T*>(a.v) + kvh * a.Nk * a.Dv;
  const Policy<float> policy(a, b, h);
  const DropoutRule<float> dropout(a);
  const float scale = float(a.scale);

  stage_padded<R, Tl::kThreads>(Qs, L.ldq, static_cast<const T*>(a.q) + (bh * a.Nq + q0) * a.D, a.D, L.Dp,
                                mq);
  stage_padded<R, Tl::kThreads>(dOs, L.ldv, static_cast<const T*>(a.grad_out) + (bh * a.Nq + q0) * a.Dv, a.Dv,
                                L.Dvp, mq);
  zero_t5_slots<Tl::kThreads>(a, t5_slots);
  const int64_t i = q0 + r;
  const float lse = r < mq ? static_cast<const float*>(a.lse)[bh * a.Nq + i] : neg_inf<float>();
  const float delta = r < mq ? static_cast<const float*>(a.delta)[bh * a.Nq + i] : 0.0f;
  FragC dq[Tl::kFrags];
  zero_frags<Tl>(dq);
  ShawRow<Tl::kLanes, float, Policy<float>::kKinds> shaw(a, bh, i, r < mq, a.shaw.grad_scores != nullptr);

  policy.for_each_key_tile(qt, q0, mq, R, [&](int64_t k0) {
    const int64_t nk = rules::min64(R, a.Nk - k0);
    __syncthreads();
    stage_padded<R, Tl::kThreads>(Ks, L.ldq, k + k0 * a.D, a.D, L.Dp, nk);
    stage_padded<R, Tl::kThreads>(Vs, L.ldv, v + k0 * a.Dv, a.Dv, L.Dvp, nk);
    __syncthreads();
    product_abt<Tl>(Ss, L.lds, Qs, Ks, L.ldq, L.Dp);
    product_abt<Tl>(dPs, L.lds, dOs, Vs, L.ldv, L.Dvp);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) {
      const int64_t c = lane + Tl::kLanes * m, j = k0 + c;
      const bool valid = r < mq && c < nk;
      const ScoreGrad<float> g = element_grad(a, policy, dropout, b, h, i, j, valid,
                                              Ss[r * L.lds + c] * scale, lse, dPs[r * L.lds + c], delta);
      Ds[r * L.ldp + c] = from_acc<T>(g.ds);
      if (valid) {
        route_score_grad<Tl::kThreads>(a, policy, bh, i, j, g.ds, t5_slots);
        shaw.backward_element(a, j, g);
      }
    }
    __syncthreads();
    accumulate_pb<Tl>(dq, Ds, L.ldp, Ks, L.ldq, L.Dp);
  });
  shaw.finish_backward(a, lane);

  __syncthreads();  // the k / v tiles are done with: their region takes the dq result
  store_frags<Tl>(result, L.ldo, dq, L.Dp);
  __syncthreads();
  if (r < mq) {
    float* out = static_cast<float*>(a.grad_q) + (bh * a.Nq + i) * a.D;
    for (int64_t col = lane; col < a.D; col += Tl::kLanes) out[col] = result[r * L.ldo + col] * scale;
  }
  if (a.grad_t5_partial)
    write_t5_partial<Tl::kThreads>(a, t5_slots, bh * tiles + qt);  // (after the barriers above)
}

// --- Backward, key-major: dk and dv ---------------------------------------

template <typename T, class Tl, template <typename> class Policy>
__global__ void __launch_bounds__(Tl::kThreads) mma_grad_kv_kernel(const __grid_constant__ DenseArgs a) {
  constexpr int R = Tl::kRows;
  const MmaLayout L(a.D, a.Dv, R);
  extern __shared__ __align__(128) unsigned char mma_smem[];
  unsigned char* smem_raw = mma_smem;
  float* St = reinterpret_cast<float*>(smem_raw);  // scores, transposed: row = key
  float* dPt = reinterpret_cast<float*>(smem_raw + L.scores);
  unsigned char* pair = smem_raw + 2 * L.scores;  // q and grad_out tiles, then the dk / dv results
  T* Qs = reinterpret_cast<T*>(pair);
  T* dOs = Qs + R * L.ldq;
  float* result = reinterpret_cast<float*>(pair);
  T* Ks = reinterpret_cast<T*>(pair + L.pair_or_result());
  T* Vs = Ks + R * L.ldq;
  T* Pt = reinterpret_cast<T*>(pair + L.pair_or_result() + L.staged_pair);
  T* Dt = Pt + R * L.ldp;
  float* lse_s = reinterpret_cast<float*>(pair + L.pair_or_result() + L.staged_pair + 2 * L.rows16);
  float* delta_s = lse_s + R;

  const auto [tiles, kt, bh, b, h, kvh, k0, nk, c, lane] = BlockTile<R, Tl::kLanes>(a, a.Nk);
  const T* q = static_cast<const T*>(a.q) + bh * a.Nq * a.D;
  const T* dout = static_cast<const T*>(a.grad_out) + bh * a.Nq * a.Dv;
  const Policy<float> policy(a, b, h);
  const DropoutRule<float> dropout(a);
  const float scale = float(a.scale);
  const int64_t j = k0 + c;

  stage_padded<R, Tl::kThreads>(Ks, L.ldq, static_cast<const T*>(a.k) + (kvh * a.Nk + k0) * a.D, a.D, L.Dp,
                                nk);
  stage_padded<R, Tl::kThreads>(Vs, L.ldv, static_cast<const T*>(a.v) + (kvh * a.Nk + k0) * a.Dv, a.Dv, L.Dvp,
                                nk);
  FragC dk[Tl::kFrags], dv[Tl::kFrags];
  zero_frags<Tl>(dk);
  zero_frags<Tl>(dv);

  policy.for_each_query_tile(kt, k0, nk, R, [&](int64_t q0) {
    const int64_t mq = rules::min64(R, a.Nq - q0);
    __syncthreads();
    stage_padded<R, Tl::kThreads>(Qs, L.ldq, q + q0 * a.D, a.D, L.Dp, mq);
    stage_padded<R, Tl::kThreads>(dOs, L.ldv, dout + q0 * a.Dv, a.Dv, L.Dvp, mq);
    stage_row_stats<R, Tl::kThreads>(a, bh, q0, mq, lse_s, delta_s);
    __syncthreads();
    product_abt<Tl>(St, L.lds, Ks, Qs, L.ldq, L.Dp);
    product_abt<Tl>(dPt, L.lds, Vs, dOs, L.ldv, L.Dvp);
    __syncthreads();
#pragma unroll
    for (int m = 0; m < Tl::kCols; ++m) {
      const int64_t rr = lane + Tl::kLanes * m, i = q0 + rr;
      const bool valid = c < nk && rr < mq;
      const ScoreGrad<float> g =
          element_grad(a, policy, dropout, b, h, i, j, valid, St[c * L.lds + rr] * scale, lse_s[rr],
                       dPt[c * L.lds + rr], delta_s[rr]);
      Pt[c * L.ldp + rr] = from_acc<T>(g.p_dropped);
      Dt[c * L.ldp + rr] = from_acc<T>(g.ds);
    }
    __syncthreads();
    accumulate_pb<Tl>(dv, Pt, L.ldp, dOs, L.ldv, L.Dvp);
    accumulate_pb<Tl>(dk, Dt, L.ldp, Qs, L.ldq, L.Dp);
  });

  // The q / grad_out tiles are done with: their region takes dk, then dv.
  float* gk = static_cast<float*>(a.grad_k) + (bh * a.Nk + j) * a.D;
  float* gv = static_cast<float*>(a.grad_v) + (bh * a.Nk + j) * a.Dv;
  __syncthreads();
  store_frags<Tl>(result, L.ldo, dk, L.Dp);
  __syncthreads();
  if (c < nk)
    for (int64_t col = lane; col < a.D; col += Tl::kLanes) gk[col] = result[c * L.ldo + col] * scale;
  __syncthreads();
  store_frags<Tl>(result, L.ldo, dv, L.Dvp);
  __syncthreads();
  if (c < nk)
    for (int64_t col = lane; col < a.Dv; col += Tl::kLanes) gv[col] = result[c * L.ldo + col];
}

// --- Launchers ------------------------------------------------------------

template <typename T, class Tl, template <typename> class Policy>
struct MmaLaunchers {
  static int64_t tiles(int64_t n) { return (n + Tl::kRows - 1) / Tl::kRows; }
  static size_t forward_bytes(const DenseArgs& a) {
    const MmaLayout L(a.D, a.Dv, Tl::kRows);
    return L.scores + L.result + align128(2 * Tl::kRows * (2 * L.ldq + L.ldv)) + L.rows16;
  }
  static size_t grad_q_bytes(const DenseArgs& a) {
    const MmaLayout L(a.D, a.Dv, Tl::kRows);
    const size_t t5 = a.grad_t5_partial ? sizeof(float) * a.t5_num_buckets * Tl::kThreads : 0;
    return 2 * L.scores + L.pair_or_result() + L.staged_pair + L.rows16 + t5;
  }
  static size_t grad_kv_bytes(const DenseArgs& a) {
    const MmaLayout L(a.D, a.Dv, Tl::kRows);
    return 2 * L.scores + L.pair_or_result() + L.staged_pair + 2 * L.rows16 + 2 * sizeof(float) * Tl::kRows;
  }
  static int forward(const DenseArgs& a, void* stream) {
    return launch(mma_forward_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nq), Tl::kThreads, forward_bytes(a),
                  a, stream);
  }
  static int grad_q(const DenseArgs& a, void* stream) {
    return launch(mma_grad_q_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nq), Tl::kThreads, grad_q_bytes(a), a,
                  stream);
  }
  static int grad_kv(const DenseArgs& a, void* stream) {
    return launch(mma_grad_kv_kernel<T, Tl, Policy>, a.B * a.H * tiles(a.Nk), Tl::kThreads, grad_kv_bytes(a),
                  a, stream);
  }
  static const DensePasses* table(const char* name) {
    static const DensePasses passes{
        &forward,       &DenseLaunchers<T, Tiles<Tl::kMaxD, float>, Policy>::probs,
        &grad_q,        &grad_kv,
        &forward_bytes, &grad_q_bytes,
        &grad_kv_bytes, Tl::kRows,
        Tl::kMaxD,      name};
    return &passes;
  }
};

// The tier for (D, Dv) of a 16-bit input type under Policy.
template <typename T, template <typename> class Policy>
const DensePasses* mma_passes_for(int64_t D, int64_t Dv) {
  const int64_t d = rules::max64(D, Dv);
  if (d <= 64) return MmaLaunchers<T, MmaTiles<64>, Policy>::table("d64/tensor-core");
  if (d <= 128) return MmaLaunchers<T, MmaTiles<128>, Policy>::table("d128/tensor-core");
  if (d <= 256) return MmaLaunchers<T, MmaTiles<256>, Policy>::table("d256/tensor-core");
  return nullptr;
}

}  // namespace attnzoo::cuda
