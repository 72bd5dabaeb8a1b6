#pragma once
// The boundary between the Torch-facing CUDA wrappers (attention_cuda.cpp)
// and the kernels (dense_kernels.cuh, instantiated once per input type in
// dense_<type>.cu). Only plain data crosses it, as for the CPU engine
// (cpu/engine_api.h), so the .cu files include no Torch headers and nvcc
// compiles them in seconds.
#include <cstddef>
#include <cstdint>

#include "attnzoo/ops/score_rules.h"

namespace attnzoo::cuda {

// A block-sparse layout: bool (Bl, Hl, rows, cols) as bytes, contiguous, of
// blocks `block` x `block`; (b, h) reads slice b * slice_b + h * slice_h
// (a broadcast dimension contributes 0). mask_index (int32, the layout's
// shape) names a row of masks (uint8, (P, block, block)) that refines a
// marked block, or -1 where the block is whole. The walks are at the
// passes' tile size (DensePasses::block_q, the kernels' kRows, of tiles_q
// query and tiles_k key tiles): the key tiles query tile t of slice s visits
// are tiles q_tiles[q_ptr[s * tiles_q + t] .. q_ptr[s * tiles_q + t + 1]),
// ascending (compressed sparse rows), and k_ptr / k_tiles the same for the
// key-major pass. The tiles may cover unmarked blocks or tokens; the
// per-element rule masks those.
struct BlockLayoutArgs {
  const uint8_t* blocks = nullptr;  // null: no layout
  int64_t block = 0, rows = 0, cols = 0, slice_b = 0, slice_h = 0;
  const int32_t* mask_index = nullptr;
  const uint8_t* masks = nullptr;
  int64_t tiles_q = 0, tiles_k = 0;
  const int32_t* q_ptr = nullptr;
  const int32_t* q_tiles = nullptr;
  const int32_t* k_ptr = nullptr;
  const int32_t* k_tiles = nullptr;
};

// Shaw et al. relative positions, bucket r = clamp(j - p, -K, K) + K of
// query position p and key j. The products with the tables are dense
// (B, H, Nq, 2K+1) matrices the wrapper computes with ATen; the kernels add
// and collect them per element (all Acc, rows of 2K+1):
//   qr           scale * q_i . rel_k[r], added to the scores
//   dor          grad_out_i . rel_v[r], added to dp (backward, with rel_v)
//   probs        forward with rel_v: per bucket the row's dropped
//                probabilities, summed (prefilled with -inf by the caller)
//   grad_scores  grad_q pass: per bucket the row's score gradients (zeroed)
//   grad_probs   grad_q pass with rel_v: per bucket the dropped probabilities
struct ShawArgs {
  int64_t K = -1;  // < 0: no Shaw terms
  const void* qr = nullptr;
  const void* dor = nullptr;
  void* probs = nullptr;
  void* grad_scores = nullptr;
  void* grad_probs = nullptr;
};

// Reformer's LSH attention as the engine runs it: rows and keys are the
// sorted (round, bucket, position) order of all rounds, and the layout is
// each chunk and the chunk before it. positions (B, H, L) holds the original
// position of each sorted row (keys are the same rows). A query's own
// position scores self_logit (a constant: no gradient), allowed only when
// nothing else is; with causal, keys after the query's position are hidden.
// Dropout is keyed by (b, h, round, query position, key position) over
// positions_len (the padded length), as the CPU kernel keys it.
struct LshRuleArgs {
  const int64_t* positions = nullptr;  // null: no LSH rule
  int64_t positions_len = 0;
  bool causal = false;
  double self_logit = -5e4;
};

// Everything one dense-attention call needs. q (B,H,Nq,D), k (B,Hkv,Nk,D),
// v (B,Hkv,Nk,Dv), out (B,H,Nq,Dv) are contiguous in the input type T
// (float, double, half, bfloat16); everything else is in the accumulation
// type Acc (double for double inputs, float otherwise) unless it says so.
struct DenseArgs {
  int64_t B = 0, H = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0, Dv = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  double scale = 1.0;
  // The band (score_rules.h): any value >= Nq + Nk is unbounded.
  int64_t left = 0, right = 0;

  // Bool mask (uint8, true = may attend) and additive bias (Acc), broadcast
  // to (B, H, Nq, Nk) by strides (score_rules.h).
  rules::Broadcast4 mask, bias;
  // T5: the bucket (int32) of each relative position d = j - p, at
  // t5_buckets[d + Nk - 1] (Nq + Nk - 1 entries), and the table (Acc,
  // (num_buckets, H), contiguous).
  const int32_t* t5_buckets = nullptr;
  const void* t5_table = nullptr;
  int64_t t5_num_buckets = 0;
  // ALiBi slope of (b, h) at alibi[b * alibi_sb + h * alibi_sh] (Acc).
  const void* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;

  double dropout_p = 0.0;
  uint64_t seed = 0;

  // A block-sparse layout, with FlexAttention's partial blocks, and its walks.
  BlockLayoutArgs layout;
  // Shaw's relative keys and values (through per-row bucket tables).
  ShawArgs shaw;
  // Reformer's LSH rules over sorted rows (attention_cuda.cpp, lsh_attention).
  LshRuleArgs lsh;

  // Forward outputs: out (T, or Acc when out_in_acc) and lse (Acc, (B, H, Nq)).
  void* out = nullptr;
  void* lse = nullptr;
  bool out_in_acc = false;
  // attention_weights: probs (T, (B, H, Nq, Nk)); lse must hold the forward's.
  void* probs = nullptr;

  // Backward. grad_out (T), delta = rowsum(grad_out * out) - grad_lse (Acc).
  const void* grad_out = nullptr;
  const void* delta = nullptr;
  // grad_q (Acc, (B, H, Nq, D)); grad_k / grad_v (Acc, per query head:
  // (B, H, Nk, D / Dv), summed over GQA groups by the caller).
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  // Score gradient of the bias (Acc, (B, H, Nq, Nk), reduced to the bias's
  // shape by the caller) and per-query-block partial sums of the T5 table's
  // gradient (Acc, (B, H, query blocks, num_buckets)); null when not wanted.
  void* grad_bias = nullptr;
  void* grad_t5_partial = nullptr;
};

// One kernel launch on a stream (a cudaStream_t, passed as void* so that this
// header needs no CUDA headers); returns the launch's cudaError_t (0: success).
using Launch = int (*)(const DenseArgs&, void* stream);

// The passes of the dense policy for one input type and head-dimension tier:
//   forward   out and lse (FlashAttention-2 forward, online softmax)
//   probs     attention_weights from the forward's lse
//   grad_q    dq and the score gradients (bias, T5 table), query-major
//   grad_kv   dk and dv, key-major
// The backward is two kernels so that every gradient element has one owner:
// no atomics, the same bits on every run.
// Dynamic shared memory (bytes per block) a pass asks for with these arguments.
using SharedBytes = size_t (*)(const DenseArgs&);

struct DensePasses {
  Launch forward, probs, grad_q, grad_kv;
  // What forward, grad_q and grad_kv ask for: checked against the device's
  // limit before launching (the T5 gradient adds num_buckets x threads
  // accumulators to grad_q).
  SharedBytes forward_bytes, grad_q_bytes, grad_kv_bytes;
  int64_t block_q;       // query rows per block of forward / grad_q (T5 partials)
  int64_t max_head_dim;  // D and Dv of this tier are at most this
  const char* name;      // the tier: "d64", "d128" or "d256"
};

// The tier for head dimensions D and Dv (nullptr when they exceed the largest:
// 256, or 128 for double). One function per input type, each in its own .cu.
const DensePasses* dense_passes_f32(int64_t D, int64_t Dv);
const DensePasses* dense_passes_f64(int64_t D, int64_t Dv);
const DensePasses* dense_passes_f16(int64_t D, int64_t Dv);
const DensePasses* dense_passes_bf16(int64_t D, int64_t Dv);
// The same passes with the kinds' rules compiled in (block-sparse layouts,
// Shaw, LSH): what a call with any of them runs (kinds_<type>.cu).
const DensePasses* kind_passes_f32(int64_t D, int64_t Dv);
const DensePasses* kind_passes_f64(int64_t D, int64_t Dv);
const DensePasses* kind_passes_f16(int64_t D, int64_t Dv);
const DensePasses* kind_passes_bf16(int64_t D, int64_t Dv);

}  // namespace attnzoo::cuda
