#pragma once
// What the zoo's models share (docs/design.md section 6): the config, the
// stack of transformer blocks, strict state loading, checkpoint directories
// and attention recording. The models: gpt.h, bert.h, vit.h, speech.h.
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attnzoo/io/safetensors.h"
#include "attnzoo/models/config.h"
#include "attnzoo/nn/modules.h"

namespace attnzoo::models {

// What every zoo model shares: its config, strict state loading, and the
// HF-style checkpoint directory (config.json + model.safetensors).
class ModelBase : public torch::nn::Module, public nn::ParameterOwner {
 public:
  // Runs layer i on h (the layers, then a second stack's: a decoder's block
  // j is layer num_layers + j). The Python facade installs one so that each block runs
  // through its nn.Module facade's __call__: its hooks fire (FSDP2 gathers the
  // block's parameters there, activation checkpointing wraps it there, user
  // hooks see it). C++ callers leave it unset and the layers run directly.
  using LayerRunner =
      std::function<at::Tensor(size_t layer, const at::Tensor& h, const nn::AttentionInputs& inputs)>;

  explicit ModelBase(const ModelConfig& config);
  const ModelConfig& config() const { return config_; }

  // Every parameter and buffer by its dotted name.
  io::NamedTensors state() const;
  // Copies tensors into the model (converting dtype). Strict: a missing or
  // unexpected name, or a shape that differs, is an error naming them all.
  void load_state(const io::NamedTensors& tensors);
  // Writes dir/config.json and dir/model.safetensors (each atomically);
  // creates dir when missing.
  void save_pretrained(const std::string& dir) const;

  // While recording, every forward call appends each layer's self-attention
  // probabilities (B, H, N, Nk), the ones that layer attends with (with a KV
  // cache, Nk counts the cached keys too; undefined for kinds that never form
  // them); take_attention_maps() hands them over and clears the record. For
  // inspection: it costs one extra score computation per layer.
  // Blocks with cross-attention record those probabilities (B, H, N, Nk) in
  // a second list, take_cross_attention_maps().
  void record_attention(bool on) { recording_attention_ = on; }
  std::vector<at::Tensor> take_attention_maps() { return std::exchange(attention_maps_, {}); }
  std::vector<at::Tensor> take_cross_attention_maps() { return std::exchange(cross_attention_maps_, {}); }

  void set_layer_runner(LayerRunner runner) { layer_runner_ = std::move(runner); }

 protected:
  // GPT-2/BERT initialisation: normal(0, 0.02) weights, zero biases, unit norms.
  void init_weights();
  // input_ids (B, N) integer ids in [0, vocab_size), from any device;
  // returns them as int64 on `device` (where the embedding lives).
  at::Tensor check_ids(const at::Tensor& ids, const char* name, int64_t vocab,
                       const at::Device& device) const;
  // A (B, N) padding mask (true or nonzero = token) as bool on `device`.
  std::optional<at::Tensor> check_padding_mask(const std::optional<at::Tensor>& mask, int64_t B, int64_t N,
                                               const at::Device& device) const;
  at::Tensor run_layers(at::Tensor h, const nn::AttentionInputs& inputs, nn::KVCache* cache = nullptr);
  // The same over another stack of blocks, whose block i the layer runner
  // sees as layer first_index + i.
  at::Tensor run_stack(torch::nn::ModuleList& stack, size_t first_index, at::Tensor h,
                       const nn::AttentionInputs& inputs, nn::KVCache* cache = nullptr);
  // The token embedding and, with learned positions, the position embedding
  // of a text model (GPT, Bert), registered on this model.
  std::pair<torch::nn::Embedding, torch::nn::Embedding> register_text_embeddings();
  // h + the embedding of positions past .. past + N - 1 (learned or sinusoidal).
  at::Tensor add_positions(const at::Tensor& h, torch::nn::Embedding& learned, int64_t past) const;

  ModelConfig config_;
  torch::nn::ModuleList layers{nullptr};

 private:
  bool recording_attention_ = false;
  std::vector<at::Tensor> attention_maps_, cross_attention_maps_;
  LayerRunner layer_runner_;
};

}  // namespace attnzoo::models
