#pragma once
// Building blocks of the zoo's models: the multi-head attention layer (any
// attention kind from AttentionConfig), the feed-forward network, the
// transformer block (pre-LN or post-LN, optional cross-attention and
// conformer-style convolution module) and position embeddings.
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "attnzoo/models/config.h"
#include "attnzoo/ops/attention.h"

namespace attnzoo::nn {

// Keys and values of one layer seen so far, (B, Hkv, T, D) each, for
// incremental decoding; for a block with cross-attention also the context's
// keys and values, projected on the first call and reused after it.
struct LayerCache {
  at::Tensor k, v;
  at::Tensor context_k, context_v;
  int64_t length() const { return k.defined() ? k.size(2) : 0; }
  // Keeps the rows `rows` (B',) of the self-attention keys and values, in
  // that order (beam search); the context's stay as they are.
  void select_rows(const at::Tensor& rows);
};
using KVCache = std::vector<LayerCache>;

// (N, C) sinusoidal position table (Vaswani et al.), positions offset..offset+N-1.
at::Tensor sinusoidal_positions(int64_t n, int64_t channels, int64_t offset, at::TensorOptions options);

// The config's activation ("gelu" exact, "gelu_tanh", "relu") applied to x.
at::Tensor activation(Activation kind, const at::Tensor& x);

// A LayerNorm over hidden_size with the config's epsilon.
torch::nn::LayerNorm layer_norm(const ModelConfig& config);

// Dropout by the attention engine's counter-based rule (score_rules.h): the
// keep decision of element i is a hash of (seed, i), the seed drawn from
// torch's default generator per call (so manual_seed and checkpoint replay
// reproduce it), and the backward regenerates the pattern instead of keeping
// a mask. ATen's CPU dropout draws a Bernoulli tensor element by element,
// about a quarter of a gpt-kjv training forward. CPU tensors only; others
// take torch::dropout.
class DropoutImpl : public torch::nn::Module {
 public:
  explicit DropoutImpl(double p) : p_(p) {}
  at::Tensor forward(const at::Tensor& x);
  double p() const { return p_; }

 private:
  double p_;
};
TORCH_MODULE(Dropout);

// A module's own parameters (those not inside a torch::nn built-in) are
// members that forward() reads. bind_parameter registers one and remembers
// its member, so that replace_parameter can reach it by name.
class ParameterOwner {
 public:
  virtual ~ParameterOwner() = default;
  // The member holding parameter `name`, or nullptr when it is not bound here.
  at::Tensor* parameter_member(const std::string& name);

 protected:
  at::Tensor& bind_parameter(torch::nn::Module& self, const std::string& name, at::Tensor value,
                             at::Tensor& member);

 private:
  std::map<std::string, at::Tensor*> members_;
};

// Makes `value` parameter `name` of `module`: the entry in its parameter list
// and the member its forward() reads, so that the next forward uses `value`
// itself and its gradient reaches `value`. For the Python facade, whose
// parameter slots write through (FSDP2 swaps in sharded and gathered
// parameters; a user may assign a new nn.Parameter). The shape must stay the
// same; an unknown name, or a module whose member cannot be found, is an error.
void replace_parameter(torch::nn::Module& module, const std::string& name, const at::Tensor& value);

// What one attention call needs beyond the input: a key padding mask
// (B, Nk) bool (true = real token), causality, a cache, a context to attend
// to (cross-attention) and its own padding mask. When attention_maps is set,
// the layer appends the probabilities it attends with (B, H, N, Nk), or an
// undefined tensor for a kind that never forms them (for plots, not training);
// a transformer block passes it to its self-attention, and
// cross_attention_maps to its cross-attention.
struct AttentionInputs {
  std::optional<at::Tensor> key_padding_mask;
  bool causal = false;
  LayerCache* cache = nullptr;
  const at::Tensor* context = nullptr;
  std::optional<at::Tensor> context_padding_mask;  // (B, Nk) bool, true = real frame
  std::vector<at::Tensor>* attention_maps = nullptr;
  std::vector<at::Tensor>* cross_attention_maps = nullptr;
};

class MultiHeadAttentionImpl : public torch::nn::Module, public ParameterOwner {
 public:
  MultiHeadAttentionImpl(const ModelConfig& config, const AttentionConfig& attention, bool cross = false);

  // x (B, N, C) -> (B, N, C). A cross-attention layer attends to
  // inputs.context, or with a cache that holds them, to the context's cached
  // keys and values (the context may then be absent).
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& inputs = {});
  // Whether this layer's kind forms the full probability matrix, so that
  // record_attention can record it.
  bool forms_probabilities() const;

  // Whether forward() with a cache computes exactly what the full forward does.
  bool supports_kv_cache() const;
  const AttentionConfig& attention_config() const { return attention_; }

 private:
  std::tuple<at::Tensor, at::Tensor, at::Tensor> project(const at::Tensor& x, const AttentionInputs& inputs);
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const AttentionInputs& inputs);
  at::Tensor block_layout(int64_t nq, int64_t nk, bool causal, const at::Device& device);
  at::Tensor causal_linformer(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& key_padding_mask, double p);
  std::pair<at::Tensor, at::Tensor> rotate(const at::Tensor& q, const at::Tensor& k, int64_t past) const;
  // Dense-family options: the padding mask (B, Nk) as (B, 1, 1, Nk), causality, the kind's bias.
  ops::AttentionOptions dense_options(const at::Tensor& q, const at::Tensor& k,
                                      const AttentionInputs& inputs) const;

  AttentionConfig attention_;
  int64_t hidden_, heads_, kv_heads_, head_dim_, max_positions_;
  double dropout_p_;
  bool cross_;
  bool rotate_;  // queries and keys rotated by position: the rotary kind, or rotary positions for every kind
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, qkv_proj{nullptr}, out_proj{nullptr};
  at::Tensor t5_bias, shaw_rel_k, shaw_rel_v, linformer_e, linformer_f;
  at::Tensor
      layout_;  // block_sparse: built for the longest sequence (on the inputs' device), sliced per call
  bool layout_causal_ = false;
  std::mutex layout_mutex_;
};
TORCH_MODULE(MultiHeadAttention);

class FeedForwardImpl : public torch::nn::Module {
 public:
  explicit FeedForwardImpl(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& x);

 private:
  Activation activation_;
  torch::nn::Linear fc_in{nullptr}, fc_out{nullptr};
};
TORCH_MODULE(FeedForward);

// Conformer's convolution module (Gulati et al. 2020) with LayerNorm in place
// of BatchNorm: pointwise conv + GLU, depthwise conv, SiLU, pointwise conv.
class ConvModuleImpl : public torch::nn::Module {
 public:
  explicit ConvModuleImpl(const ModelConfig& config);
  // x (B, N, C); padded frames (mask false) are zeroed before the depthwise conv.
  at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask);

 private:
  torch::nn::Conv1d pointwise_in{nullptr}, depthwise{nullptr}, pointwise_out{nullptr};
  torch::nn::LayerNorm depthwise_norm{nullptr};
  Dropout dropout{nullptr};
};
TORCH_MODULE(ConvModule);

class TransformerBlockImpl : public torch::nn::Module {
 public:
  // cross_attention: the kind of a cross-attention sublayer (dense or
  // linear), none without one.
  TransformerBlockImpl(const ModelConfig& config, const AttentionConfig& attention,
                       const std::optional<AttentionConfig>& cross_attention = std::nullopt,
                       bool conv_module = false);
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& inputs = {});

  MultiHeadAttention attn{nullptr};

 private:
  // x + f(norm(x)) (pre-LN) or norm(x + f(x)) (post-LN).
  template <typename F>
  at::Tensor residual(const at::Tensor& x, torch::nn::LayerNorm& norm, F&& f);

  bool pre_norm_;
  torch::nn::LayerNorm attn_norm{nullptr}, cross_attn_norm{nullptr}, conv_norm{nullptr}, mlp_norm{nullptr};
  MultiHeadAttention cross_attn{nullptr};
  ConvModule conv_module{nullptr};
  FeedForward mlp{nullptr};
  Dropout dropout{nullptr};
};
TORCH_MODULE(TransformerBlock);

}  // namespace attnzoo::nn
