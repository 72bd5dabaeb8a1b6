#pragma once
// The boundary between the Torch-facing wrappers (attention.cpp) and the
// engine, which is compiled once per instruction set (attention_kernel.cpp).
// Only plain data crosses it: raw pointers into contiguous buffers of the
// compute type (float or double; q, k, v, out and grad_out may be bfloat16
// for the bfloat16 passes) and broadcast strides, so that the per-ISA
// translation units need no Tensor headers.
#include <cstdint>

#include "attnzoo/ops/score_rules.h"

namespace attnzoo::cpu {

// Block sizes of the engine (measured with tools/bench on AVX-512; the tile
// products run at BLAS speed from about 128 x 256 up). A forward work item is
// one (b, h, query block): short queries take smaller blocks so that several
// threads still find work.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockQSmall = 64;
constexpr int64_t kBlockK = 512;
inline int64_t forward_block_q(int64_t Nq) { return Nq >= 768 ? kBlockQ : kBlockQSmall; }

// A mask or bias broadcast to (B, H, Nq, Nk) (score_rules.h).
using Broadcast4 = ::attnzoo::rules::Broadcast4;

// Everything one dense-attention call needs. Tensors are (B, H, N, D) and
// contiguous; k and v have Hkv heads (H % Hkv == 0).
struct DenseArgs {
  int64_t B = 0, H = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0, Dv = 0;
  int64_t block_q = kBlockQ;  // forward / probs query block: forward_block_q(Nq)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  double scale = 1.0;

  // Band of visible keys for query row i at position p = i + Nk - Nq:
  // p - left <= j <= p + right. Causal sets right to at most 0. "Unbounded"
  // is any value >= Nq + Nk.
  int64_t left = 0, right = 0;

  Broadcast4 mask;  // bool (uint8), true = may attend
  Broadcast4 bias;  // compute type, added to the scaled scores
  // A bias that depends on (b, h) and the relative position d = j - p_i only
  // (T5 buckets): entry rel_bias[b*rel_sb + h*rel_sh + d + Nk - 1], a vector
  // of Nq + Nk - 1 per head.
  const void* rel_bias = nullptr;
  int64_t rel_sb = 0, rel_sh = 0;
  const void* alibi = nullptr;  // compute type, slope for (b, h)
  int64_t alibi_sb = 0, alibi_sh = 0;

  double dropout_p = 0.0;
  uint64_t seed = 0;

  // Shaw relative keys / values: (Hs, 2K+1, D) and (Hs, 2K+1, Dv) with
  // Hs = 1 (stride 0) or H; bucket r = clamp(j - p_i, -K, K) + K. shaw_v may
  // be null (relative keys only).
  const void* shaw_k = nullptr;
  const void* shaw_v = nullptr;
  int64_t shaw_k_sh = 0, shaw_v_sh = 0, shaw_K = 0;

  // Block-sparse layout, bool (Bl, Hl, ceil(Nq/bs), ceil(Nk/bs)) with Bl = 1
  // (layout_sb = 0) or B and Hl = 1 (layout_sh = 0) or H: only blocks whose
  // entry is true are computed.
  const uint8_t* layout = nullptr;
  int64_t layout_sb = 0, layout_sh = 0, layout_cols = 0, layout_block = 0;
  // Per-block token masks (FlexAttention's partial blocks): block_mask_index
  // has the layout's shape and strides; -1 computes the block whole, p >= 0
  // masks it with block_masks[p], a (bs, bs) bool tile (true = may attend).
  const int32_t* block_mask_index = nullptr;
  const uint8_t* block_masks = nullptr;

  // Forward outputs: out (B,H,Nq,Dv) may be null (log-sum-exp only); lse (B,H,Nq).
  void* out = nullptr;
  void* lse = nullptr;

  // attention_weights output: probs (B,H,Nq,Nk), zero-initialised.
  void* probs = nullptr;

  // Backward inputs and outputs. grad_q is (splits, B, H, Nq, D) partial sums
  // when key blocks of a head are split across work items; grad_k/grad_v are
  // per query head (B, H, Nk, D/Dv) and summed over GQA groups by the caller.
  // They may come uninitialised: the backward pass zeroes the dq partial of
  // each item and the dk / dv rows of each key block it owns before
  // accumulating (grad_bias and the tables' accumulators below are
  // zero-initialised by the caller). The bfloat16 passes write
  // grad_k/grad_v once per key block, in bfloat16 ([0]) or float ([1], for
  // GQA groups the caller sums); grad_q is float.
  const void* grad_out = nullptr;
  const void* delta = nullptr;  // (B,H,Nq): rowsum(grad_out * out)
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  int64_t key_splits = 1;
  // (B,H,Nq or 1,Nk or 1) accumulator for the bias gradient, with the same
  // broadcast convention as Broadcast4 (stride 0 where the bias broadcasts
  // over queries or keys). Only used with key_splits == 1.
  void* grad_bias = nullptr;
  int64_t gb_sb = 0, gb_sh = 0, gb_si = 0, gb_sj = 0;
  // (B, H, Nq + Nk - 1) accumulator for the rel_bias gradient (key_splits == 1).
  void* grad_rel_bias = nullptr;
  // (B, H, 2K+1, D / Dv) accumulators for the Shaw tables (key_splits == 1).
  void* grad_shaw_k = nullptr;
  void* grad_shaw_v = nullptr;
};

// Backward tiles are square: its five products all use them.
constexpr int64_t kBwdBlockQ = 256;
constexpr int64_t kBwdBlockK = 256;

// Reformer LSH attention (lsh_kernel.h): shared qk (B,H,Npad,D), v
// (B,H,Npad,Dv), Npad a multiple of bucket_size; rotations (Hr, D, R,
// n_buckets/2) with Hr = 1 (rot_sh = 0) or H.
struct LshArgs {
  int64_t B = 0, H = 0, Npad = 0, D = 0, Dv = 0, R = 0, n_buckets = 0, bucket_size = 0;
  const void* qk = nullptr;
  const void* v = nullptr;
  const void* rotations = nullptr;
  int64_t rot_sh = 0;
  const uint8_t* key_mask = nullptr;  // (B, Npad): false for masked and padding keys
  bool causal = false;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  void* buckets = nullptr;  // int64 (B, H, R, Npad), optional
  void* out = nullptr;      // (B, H, Npad, Dv)
  void* lse = nullptr;      // (B, H, Npad): rounds combined
  const void* grad_out = nullptr;
  void* grad_qk = nullptr;  // zero-initialised
  void* grad_v = nullptr;   // zero-initialised
};

using RangeFn = void (*)(const DenseArgs&, int64_t begin, int64_t end);
// Work items are (b, h).
using LshRangeFn = void (*)(const LshArgs&, int64_t begin, int64_t end);
struct LshTable {
  LshRangeFn forward, backward;
};

// The three passes of one policy and compute type. Work ranges index
//   forward / probs:  (b, h, query block)   B*H*ceil(Nq/block) items
//   backward:         (b, h, key split)     B*H*key_splits items
// where the query block is block_q (dense) or the layout's block.
struct PassTable {
  RangeFn forward, probs, backward;
};

// y[i] = phi(x[i]) (slope false) or phi'(x[i]) (slope true) for causal
// linear attention's feature map (1: elu+1, 2: relu; linear_support.h),
// vectorised per instruction set.
using FeatureRowsFn = void (*)(int64_t map, bool slope, const void* x, void* y, int64_t n);

// y[i] = keep(first + i) ? x[i] * scale : 0 for n contiguous elements, with
// keep = rules::dropout_keeps(seed, threshold, .) (score_rules.h): the
// models' dropout (attnzoo::nn::Dropout), one vectorised build per
// instruction set (the rule's 64-bit products need AVX-512 to vectorise).
using DropoutRowsFn = void (*)(const void* x, void* y, int64_t n, uint64_t first, uint64_t seed,
                               uint64_t threshold, double scale);

// The models' GELU with the tanh approximation over n contiguous elements:
// out = gelu(x), or with backward out = dy * gelu'(x) (dy unread otherwise).
using GeluRowsFn = void (*)(bool backward, const void* x, const void* dy, void* out, int64_t n);

// One engine build (one instruction set); index [0] float, [1] double. The
// bfloat16 passes (bfloat16 q, k, v, out and grad_out; float lse, delta and
// gradient accumulators) are null where the build has none, and have no
// probabilities pass.
struct EngineTable {
  const char* isa;
  PassTable dense[2];
  PassTable block_sparse[2];
  PassTable shaw[2];
  PassTable dense_bf16[2];  // [0] grad_k/grad_v bfloat16, [1] float (GQA)
  PassTable block_sparse_bf16[2];
  FeatureRowsFn feature_rows[2];
  DropoutRowsFn dropout_rows[4];  // float, double, bfloat16, float16
  GeluRowsFn gelu_tanh_rows[4];   // float, double, bfloat16, float16
  LshTable lsh[2];
};

const EngineTable& engine_DEFAULT();
const EngineTable& engine_AVX2();
const EngineTable& engine_AVX512();

}  // namespace attnzoo::cpu
