#pragma once
// The blocked online-softmax attention engine (FlashAttention-2 on a CPU):
// one set of passes and a policy per attention kind, split by concern in
// engine/:
//   row_kernels.h          row-major BLAS tile products, vectorised softmax rows
//   dropout.h              counter-based dropout regenerated from a seed
//   policy.h               every hook a policy may define, documented, and the
//                          compile-time check that a policy defines what it lists
//   dense_policy.h         mask, bias, T5 relative bias, ALiBi, causal / window band
//   block_sparse_policy.h  only the blocks a layout marks
//   shaw_policy.h          Shaw relative keys and values
//   passes.h               forward, probabilities, backward
//
// Included only by attention_kernel.cpp, which is compiled once per
// instruction set with CPU_CAPABILITY set.
#include "attnzoo/ops/cpu/engine/block_sparse_policy.h"
#include "attnzoo/ops/cpu/engine/dense_policy.h"
#include "attnzoo/ops/cpu/engine/passes.h"
#include "attnzoo/ops/cpu/engine/shaw_policy.h"
