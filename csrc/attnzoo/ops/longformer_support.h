#pragma once
// What the Longformer files share (not installed). longformer_attention is
// two engine calls: a block-sparse call for every query over its window and
// the global keys (gathered after the sequence), and a dense call for the
// global queries over every key. Its forward (attention_variants.cpp) merges
// the two outputs in place, and its autograd node (autograd/
// attention_autograd.cpp) runs the two engine backwards and merges their
// gradients in place, so no N-sized temporary is made besides the engine's
// own buffers and the gathered keys.
#include "attnzoo/ops/attention.h"
#include "attnzoo/ops/op_support.h"

namespace attnzoo::ops::detail {

// longformer_attention(q, k, v, window, global_tokens, key_mask, dropout_p, scale) -> out
using LongformerSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 const at::Tensor&, const OptTensor&, double, std::optional<double>);

// The checked arguments of one call, as the engine gets them.
struct LongformerCall {
  at::Tensor global;        // int64 positions on q's device, (G,)
  at::Tensor k_ext, v_ext;  // the sequence, then the global tokens' keys / values: (B, Hkv, N + G, D)
  AttentionOptions window;  // the block-sparse call over the window and the gathered global keys
  AttentionOptions rows;    // the global queries' dense call over every key
};
LongformerCall longformer_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                               const at::Tensor& global_tokens, const OptTensor& key_mask, double dropout_p,
                               std::optional<double> scale);

// What the forward leaves for the backward. window_lse has -inf on the global
// rows: the window call's outputs there are replaced by the dense call's, so
// the backward must treat them as rows that see nothing.
struct LongformerForward {
  at::Tensor out, window_lse, rows_out, rows_lse;
};
// Seeds are undefined without dropout.
LongformerForward longformer_forward(const LongformerCall& call, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& window_seed,
                                     const at::Tensor& rows_seed);
Tensor3 longformer_backward(const LongformerCall& call, const LongformerForward& saved,
                            const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& window_seed, const at::Tensor& rows_seed);

}  // namespace attnzoo::ops::detail
