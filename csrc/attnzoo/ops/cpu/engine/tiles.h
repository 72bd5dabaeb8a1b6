#pragma once
// The tile products of the passes, by input type. The passes (passes.h) read
// q, k, v and grad_out of type In and keep everything else (scores,
// probabilities, output and gradient accumulators, log-sum-exp) in the
// compute type T:
//   ComputeTiles<T>  In = T (float, double): row-major BLAS on the inputs as
//                    they are.
//   Bf16Tiles<G>     In = bfloat16, T = float: the products multiply
//                    bfloat16 with float32 accumulation through oneDNN's
//                    batch-reduce GEMM (ATen's cpublas::brgemm: AVX512-BF16
//                    dot products or AMX tiles), about twice the float32 rate.
//                    Probabilities and score gradients are rounded to
//                    bfloat16 for their products, as FlashAttention does.
//
// What a Tiles class provides (k and v are one kv head's rows):
//   forward:  scores(q, mq, k, k0, nk, scale, s, ld)   s = scale * q k^T
//             add_pv(p, ld, mq, v, k0, nk, acc)        acc += p v
//             accumulator(out, mq) / store(acc, out, mq)
//                                     where the running output lives
//   backward, per key block [k0, k0 + nk) of one head:
//             begin_key_block(q, dout, k, v, k0, nk)   q, dout: the head's rows
//             scores(...)             as in the forward, for a query tile
//             add_dv(p, ld, dout_tile, q0, mq, nk, dv)          dv += p^T dout
//             dp(dout_tile, mq, nk, dp, ld)                     dp = dout v^T
//             add_dq(ds, ld, mq, nk, scale, dq_tile)            dq += scale ds k
//             add_dk(ds, ld, q_tile, q0, mq, nk, scale, dk)     dk += scale ds^T q
//             end_key_block(nk, dk, dv)
// dv and dk point at the key block's rows of the head's key and value
// gradients, of type GradKV: T accumulators (ComputeTiles); Bf16Tiles writes
// each key block once at end_key_block (a key block belongs to one work
// item, so its gradient is complete there), in bfloat16, or in float where
// the caller sums GQA groups (rounding each head first would add error).
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine/row_kernels.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
struct ComputeTiles {
  using In = T;
  using GradKV = T;
  int64_t D, Dv;
  ComputeTiles(const DenseArgs& a, int64_t /*max_rows*/, int64_t /*max_cols*/) : D(a.D), Dv(a.Dv) {}

  void scores(const T* q, int64_t mq, const T* k, int64_t k0, int64_t nk, T scale, T* s, int64_t ld) {
    gemm_rowmajor<T>(false, true, mq, nk, D, scale, q, D, k + k0 * D, D, T(0), s, ld);
  }
  void add_pv(const T* p, int64_t ld, int64_t mq, const T* v, int64_t k0, int64_t nk, T* acc) {
    gemm_rowmajor<T>(false, false, mq, Dv, nk, T(1), p, ld, v + k0 * Dv, Dv, T(1), acc, Dv);
  }
  // The running output is the output itself.
  T* accumulator(T* out, int64_t /*mq*/) { return out; }
  void store(const T* /*acc*/, T* /*out*/, int64_t /*mq*/) {}

  const T *k_ = nullptr, *v_ = nullptr;
  int64_t k0_ = 0;
  void begin_key_block(const T* /*q*/, const T* /*dout*/, const T* k, const T* v, int64_t k0,
                       int64_t /*nk*/) {
    k_ = k, v_ = v, k0_ = k0;
  }
  void add_dv(const T* p, int64_t ld, const T* dout, int64_t /*q0*/, int64_t mq, int64_t nk, T* dv) {
    gemm_rowmajor<T>(true, false, nk, Dv, mq, T(1), p, ld, dout, Dv, T(1), dv, Dv);
  }
  void dp(const T* dout, int64_t mq, int64_t nk, T* dp, int64_t ld) {
    gemm_rowmajor<T>(false, true, mq, nk, Dv, T(1), dout, Dv, v_ + k0_ * Dv, Dv, T(0), dp, ld);
  }
  void add_dq(const T* ds, int64_t ld, int64_t mq, int64_t nk, T scale, T* dq) {
    gemm_rowmajor<T>(false, false, mq, D, nk, scale, ds, ld, k_ + k0_ * D, D, T(1), dq, D);
  }
  void add_dk(const T* ds, int64_t ld, const T* q, int64_t /*q0*/, int64_t mq, int64_t nk, T scale, T* dk) {
    gemm_rowmajor<T>(true, false, nk, D, mq, scale, ds, ld, q, D, T(1), dk, D);
  }
  void end_key_block(int64_t /*nk*/, T* /*dk*/, T* /*dv*/) {}
  void end_range() {}
};

// ---------------------------------------------------------------------------
// bfloat16. oneDNN's brgemm computes C (+)= A B with A (M x K) row-major and
// B in the VNNI layout [K/2][N][2] (pairs of consecutive K rows interleaved),
// K even: the layouts below pad an odd count with a zero row or column.
namespace bf16 {

using bfloat16 = c10::BFloat16;
inline int64_t even(int64_t n) { return (n + 1) & ~int64_t(1); }

// Rounds 16 floats to bfloat16 bits, to nearest even as c10's
// round_to_nearest_even does for the tails (the values here are finite).
using U32x16 = uint32_t __attribute__((vector_size(64)));
using U16x16 = uint16_t __attribute__((vector_size(32)));
inline U32x16 round_high(const float* x, float scale) {  // bfloat16 in the high half of each lane
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = x[i] * scale;
  U32x16 u;
  std::memcpy(&u, f, 64);
  return u + 0x7fffu + ((u >> 16) & 1u);
}

// dst (rows x even(cols), ld_dst) = bfloat16(scale * src (rows x cols, ld_src)),
// the padding column zero.
inline void convert_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float scale,
                         bfloat16* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * ld_src;
    uint16_t* y = reinterpret_cast<uint16_t*>(dst + r * ld_dst);
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const U16x16 h = __builtin_convertvector(round_high(x + c, scale) >> 16, U16x16);
      std::memcpy(y + c, &h, 32);
    }
    for (; c < cols; ++c) y[c] = c10::detail::round_to_nearest_even(x[c] * scale);
    if (cols & 1) y[cols] = 0;
  }
}

// Calls pack(x0, x1, out) for each pair of rows of src (x1 null for an odd
// last row), out the pair's words in the VNNI layout [rows/2][ld_dst][2].
template <typename S, class Pack>
inline void for_each_row_pair(const S* src, int64_t ld_src, int64_t rows, bfloat16* dst, int64_t ld_dst,
                              Pack&& pack) {
  uint32_t* w = reinterpret_cast<uint32_t*>(dst);
  for (int64_t r = 0; r < rows; r += 2) {
    const S* x0 = src + r * ld_src;
    pack(x0, r + 1 < rows ? x0 + ld_src : nullptr, w + (r / 2) * ld_dst);
  }
}

// dst [even(rows)/2][cols][2] (pair stride 2 * ld_dst) = bfloat16(scale * src):
// the VNNI layout of a float tile, rows paired.
inline void convert_vnni(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float scale,
                         bfloat16* dst, int64_t ld_dst) {
  for_each_row_pair(src, ld_src, rows, dst, ld_dst, [&](const float* x0, const float* x1, uint32_t* out) {
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const U32x16 lo = round_high(x0 + c, scale) >> 16;
      const U32x16 hi = x1 ? (round_high(x1 + c, scale) & 0xffff0000u) : U32x16{};
      const U32x16 word = lo | hi;
      std::memcpy(out + c, &word, 64);
    }
    for (; c < cols; ++c)
      out[c] = uint32_t(c10::detail::round_to_nearest_even(x0[c] * scale)) |
               (x1 ? uint32_t(c10::detail::round_to_nearest_even(x1[c] * scale)) << 16 : 0u);
  });
}

// dst [even(rows)/2][cols][2] = src (rows x cols, ld_src): bfloat16 rows paired.
inline void pack_vnni(const bfloat16* src, int64_t ld_src, int64_t rows, int64_t cols, bfloat16* dst,
                      int64_t ld_dst) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for_each_row_pair(bits, ld_src, rows, dst, ld_dst,
                    [&](const uint16_t* x0, const uint16_t* x1, uint32_t* out) {
                      for (int64_t c = 0; c < cols; ++c)
                        out[c] = uint32_t(x0[c]) | (x1 ? uint32_t(x1[c]) << 16 : 0u);
                    });
}

// dst [cols/2][rows][2] (pair stride 2 * ld_dst) = the VNNI layout of src^T,
// src (rows x cols, cols even): word c/2 of row r goes to (c/2, r).
inline void pack_vnni_transposed(const bfloat16* src, int64_t ld_src, int64_t rows, int64_t cols,
                                 bfloat16* dst, int64_t ld_dst) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint32_t* w = reinterpret_cast<uint32_t*>(dst);
  constexpr int64_t R = 16;  // rows at a time: the row words stay in L1
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int64_t r1 = std::min(rows, r0 + R);
    for (int64_t p = 0; p < cols / 2; ++p)
      for (int64_t r = r0; r < r1; ++r) w[p * ld_dst + r] = s[r * (ld_src / 2) + p];
  }
}

// dst (cols x even(rows), ld_dst) = src^T, src (rows x cols), padding column zero.
inline void transpose(const bfloat16* src, int64_t ld_src, int64_t rows, int64_t cols, bfloat16* dst,
                      int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    bfloat16* out = dst + c * ld_dst;
    for (int64_t r = 0; r < rows; ++r) out[r] = src[r * ld_src + c];
    if (rows & 1) out[rows] = bfloat16(0.0f);
  }
}

// C (M x N, ld_c) (+)= A (M x K, ld_a) B (VNNI, ld_b).
inline void brgemm(int64_t M, int64_t N, int64_t K, const bfloat16* A, int64_t ld_a, const bfloat16* B,
                   int64_t ld_b, float* C, int64_t ld_c, bool accumulate) {
  if (M == 0 || N == 0) return;
  at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, accumulate, A, B, C, /*is_vnni=*/true);
}

}  // namespace bf16

template <typename GradKVType>
struct Bf16Tiles {
  using In = c10::BFloat16;
  using GradKV = GradKVType;
  using bfloat16 = bf16::bfloat16;
  int64_t D, Dv, Nq, Nk;
  // The head's k^T and v in the VNNI layout, packed when the head changes.
  const bfloat16 *packed_keys_ = nullptr, *packed_values_ = nullptr;
  std::vector<bfloat16> kt_, v_;
  // A float tile rounded for a product (p or ds), and the output accumulator.
  std::vector<bfloat16> tile_, tile_vnni_;
  std::vector<float> acc_;
  // Backward: per head q^T and dout^T; per key block v^T and k in VNNI, and
  // dk^T, dv^T accumulated over the block's query tiles.
  const bfloat16* packed_q_ = nullptr;
  std::vector<bfloat16> qt_, doutt_, vt_block_, k_block_;
  std::vector<float> dkt_, dvt_;

  Bf16Tiles(const DenseArgs& a, int64_t max_rows, int64_t max_cols) : D(a.D), Dv(a.Dv), Nq(a.Nq), Nk(a.Nk) {
    const int64_t cols = bf16::even(max_cols);
    tile_.resize(max_rows * cols);
    tile_vnni_.resize(bf16::even(max_rows) * cols);
    acc_.resize(max_rows * Dv);
  }

  // --- forward ---
  void scores(const bfloat16* q, int64_t mq, const bfloat16* k, int64_t k0, int64_t nk, float scale, float* s,
              int64_t ld) {
    if (k != packed_keys_) pack_keys(k);
    bf16::brgemm(mq, nk, D, q, D, kt_.data() + 2 * k0, Nk, s, ld, false);
    scale_tile(s, ld, mq, nk, scale);
  }
  void add_pv(const float* p, int64_t ld, int64_t mq, const bfloat16* v, int64_t k0, int64_t nk, float* acc) {
    if (v != packed_values_) pack_values(v);
    const int64_t ke = bf16::even(nk);
    bf16::convert_rows(p, ld, mq, nk, 1.0f, tile_.data(), ke);
    bf16::brgemm(mq, Dv, ke, tile_.data(), ke, v_.data() + k0 * Dv, Dv, acc, Dv, true);
  }
  float* accumulator(bfloat16* /*out*/, int64_t /*mq*/) { return acc_.data(); }
  void store(const float* acc, bfloat16* out, int64_t mq) {
    for (int64_t i = 0; i < mq * Dv; ++i) out[i] = bfloat16(acc[i]);
  }

  // --- backward ---
  void begin_key_block(const bfloat16* q, const bfloat16* dout, const bfloat16* k, const bfloat16* v,
                       int64_t k0, int64_t nk) {
    if (q != packed_q_) {  // a new head: q^T and dout^T, (D or Dv) x even(Nq)
      const int64_t ne = bf16::even(Nq);
      qt_.resize(D * ne), doutt_.resize(Dv * ne);
      bf16::transpose(q, D, Nq, D, qt_.data(), ne);
      bf16::transpose(dout, Dv, Nq, Dv, doutt_.data(), ne);
      packed_q_ = q;
    }
    const int64_t ke = bf16::even(nk);
    vt_block_.resize(Dv * ke), k_block_.resize(ke * D);
    bf16::pack_vnni_transposed(v + k0 * Dv, Dv, nk, Dv, vt_block_.data(), nk);
    bf16::pack_vnni(k + k0 * D, D, nk, D, k_block_.data(), D);
    dkt_.assign(D * nk, 0.0f), dvt_.assign(Dv * nk, 0.0f);
  }
  // dv^T (Dv x nk) += dout^T p, with p rounded into the VNNI layout.
  void add_dv(const float* p, int64_t ld, const bfloat16* /*dout*/, int64_t q0, int64_t mq, int64_t nk,
              GradKV* /*dv*/) {
    bf16::convert_vnni(p, ld, mq, nk, 1.0f, tile_vnni_.data(), nk);
    bf16::brgemm(Dv, nk, bf16::even(mq), doutt_.data() + q0, bf16::even(Nq), tile_vnni_.data(), nk,
                 dvt_.data(), nk, true);
  }
  void dp(const bfloat16* dout, int64_t mq, int64_t nk, float* dp, int64_t ld) {
    bf16::brgemm(mq, nk, Dv, dout, Dv, vt_block_.data(), nk, dp, ld, false);
  }
  void add_dq(const float* ds, int64_t ld, int64_t mq, int64_t nk, float scale, float* dq) {
    const int64_t ke = bf16::even(nk);
    bf16::convert_rows(ds, ld, mq, nk, scale, tile_.data(), ke);
    bf16::brgemm(mq, D, ke, tile_.data(), ke, k_block_.data(), D, dq, D, true);
  }
  // dk^T (D x nk) += q^T (scale ds).
  void add_dk(const float* ds, int64_t ld, const bfloat16* /*q*/, int64_t q0, int64_t mq, int64_t nk,
              float scale, GradKV* /*dk*/) {
    bf16::convert_vnni(ds, ld, mq, nk, scale, tile_vnni_.data(), nk);
    bf16::brgemm(D, nk, bf16::even(mq), qt_.data() + q0, bf16::even(Nq), tile_vnni_.data(), nk, dkt_.data(),
                 nk, true);
  }
  void end_key_block(int64_t nk, GradKV* dk, GradKV* dv) {
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t d = 0; d < D; ++d) dk[j * D + d] = GradKV(dkt_[d * nk + j]);
      for (int64_t d = 0; d < Dv; ++d) dv[j * Dv + d] = GradKV(dvt_[d * nk + j]);
    }
  }
  // AMX keeps a tile configuration per thread until it is released.
  void end_range() { at::native::cpublas::brgemm_release(); }

 private:
  void pack_keys(const bfloat16* k) {
    kt_.resize(D * Nk);
    bf16::pack_vnni_transposed(k, D, Nk, D, kt_.data(), Nk);
    packed_keys_ = k;
  }
  void pack_values(const bfloat16* v) {
    v_.resize(bf16::even(Nk) * Dv);
    bf16::pack_vnni(v, Dv, Nk, Dv, v_.data(), Dv);
    packed_values_ = v;
  }
  static void scale_tile(float* s, int64_t ld, int64_t mq, int64_t nk, float scale) {
    for (int64_t r = 0; r < mq; ++r) scale_row(s + r * ld, nk, scale);
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
