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

  // Forward outputs: out (T) and lse (Acc, (B, H, Nq)).
  void* out = nullptr;
  void* lse = nullptr;
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

}  // namespace attnzoo::cuda
