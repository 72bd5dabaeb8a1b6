#pragma once
// The zoo's models, assembled from attnzoo::nn (DESIGN.md section 5):
//   auto gpt = attnzoo::models::GPT(attnzoo::config_from_file("config.json"));
//   auto model = attnzoo::from_pretrained("models/gpt-kjv");   // kind from config.json
// Parameter names are the same in every model ("layers.3.attn.q_proj.weight");
// attnzoo.convert maps HF BERT / GPT-2 / ViT names onto them.
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
class ModelBase : public torch::nn::Module {
 public:
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
  void record_attention(bool on) { recording_attention_ = on; }
  std::vector<at::Tensor> take_attention_maps() { return std::exchange(attention_maps_, {}); }

 protected:
  // GPT-2/BERT initialisation: normal(0, 0.02) weights, zero biases, unit norms.
  void init_weights();
  // input_ids (B, N) integer ids in [0, vocab_size); returns them as int64.
  at::Tensor check_ids(const at::Tensor& ids, const char* name, int64_t vocab) const;
  std::optional<at::Tensor> check_padding_mask(const std::optional<at::Tensor>& mask, int64_t B,
                                               int64_t N) const;
  at::Tensor run_layers(at::Tensor h, const nn::AttentionInputs& inputs, nn::KVCache* cache = nullptr);

  ModelConfig config_;
  torch::nn::ModuleList layers{nullptr};

 private:
  bool recording_attention_ = false;
  std::vector<at::Tensor> attention_maps_;
};

struct GenerationOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;      // 0: greedy; > 0: sample from softmax(logits / temperature)
  int64_t top_k = 0;             // sample among the k most likely tokens (0: all)
  double top_p = 1.0;            // nucleus: the smallest set with probability >= top_p
  int64_t eos_token_id = -2;     // -2: the config's eos_token_id; -1: none
  bool use_cache = true;         // KV cache (kinds without one recompute the prefix)
  std::optional<uint64_t> seed;  // sampling generator seed (default: the global one)
};

class GPTImpl : public ModelBase {
 public:
  explicit GPTImpl(const ModelConfig& config);
  // input_ids (B, N) -> logits (B, N, vocab). attention_mask (B, N) bool: false = padding.
  at::Tensor forward(const at::Tensor& input_ids,
                     const std::optional<at::Tensor>& attention_mask = std::nullopt);
  // The logits of input_ids continuing the sequence held by `cache` (filled in).
  at::Tensor forward_cached(const at::Tensor& input_ids, nn::KVCache& cache);
  // input_ids (B, N) -> (B, N + generated); rows that emit eos are padded with eos.
  at::Tensor generate(const at::Tensor& input_ids, const GenerationOptions& options = {});
  // Whether every layer can decode from a KV cache.
  bool supports_kv_cache() const;

  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  torch::nn::LayerNorm final_norm{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  at::Tensor logits(const at::Tensor& input_ids, const std::optional<at::Tensor>& mask, nn::KVCache* cache);
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(GPT);

class BertImpl : public ModelBase {
 public:
  explicit BertImpl(const ModelConfig& config);
  // Masked-LM logits (B, N, vocab). attention_mask (B, N) bool: false = padding.
  // With predict_mask (B, N) bool, only the logits of the positions marked
  // true, (count, vocab) in row-major order: training needs the masked
  // positions alone, and the head is then applied to those only.
  at::Tensor forward(const at::Tensor& input_ids,
                     const std::optional<at::Tensor>& attention_mask = std::nullopt,
                     const std::optional<at::Tensor>& token_type_ids = std::nullopt,
                     const std::optional<at::Tensor>& predict_mask = std::nullopt);
  // Final hidden states (B, N, C).
  at::Tensor encode(const at::Tensor& input_ids,
                    const std::optional<at::Tensor>& attention_mask = std::nullopt,
                    const std::optional<at::Tensor>& token_type_ids = std::nullopt);
  // Sequence-classification logits (B, num_labels) from the pooled first token.
  at::Tensor classify(const at::Tensor& input_ids,
                      const std::optional<at::Tensor>& attention_mask = std::nullopt,
                      const std::optional<at::Tensor>& token_type_ids = std::nullopt);

  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr}, token_type_embedding{nullptr};
  torch::nn::LayerNorm embedding_norm{nullptr}, mlm_norm{nullptr};
  torch::nn::Linear mlm_transform{nullptr}, mlm_decoder{nullptr}, pooler{nullptr}, classifier{nullptr};
  at::Tensor mlm_bias;

 private:
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(Bert);

class ViTImpl : public ModelBase {
 public:
  explicit ViTImpl(const ModelConfig& config);
  // pixel_values (B, channels, image_size, image_size) -> logits (B, num_labels).
  at::Tensor forward(const at::Tensor& pixel_values);
  // Final hidden states (B, 1 + patches, C); index 0 is the CLS token.
  at::Tensor encode(const at::Tensor& pixel_values);

  torch::nn::Conv2d patch_embedding{nullptr};
  at::Tensor cls_token, position_embedding;
  torch::nn::LayerNorm final_norm{nullptr};
  torch::nn::Linear classifier{nullptr};

 private:
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(ViT);

class SpeechImpl : public ModelBase {
 public:
  explicit SpeechImpl(const ModelConfig& config);
  // waveforms (B, samples) float at sample_rate, lengths (B,) samples (default:
  // all) -> (CTC log-probabilities (B, T, vocab), frame lengths (B,)).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& waveforms,
                                             const std::optional<at::Tensor>& lengths = std::nullopt);
  // Log-mel filterbank features (B, frames, n_mels) and frame lengths.
  std::tuple<at::Tensor, at::Tensor> features(const at::Tensor& waveforms,
                                              const std::optional<at::Tensor>& lengths = std::nullopt) const;
  // Greedy CTC: best label per frame, repeats merged, blanks removed.
  std::vector<std::vector<int64_t>> greedy_decode(const at::Tensor& log_probs,
                                                  const at::Tensor& lengths) const;

  torch::nn::Conv2d subsample_conv1{nullptr}, subsample_conv2{nullptr};
  torch::nn::Linear subsample_proj{nullptr}, ctc_head{nullptr};
  torch::nn::LayerNorm final_norm{nullptr};

 private:
  at::Tensor mel_filterbank(at::ScalarType dtype) const;
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(Speech);

// A model of the kind named by config.model_type.
std::shared_ptr<ModelBase> create_model(const ModelConfig& config);

}  // namespace attnzoo::models

namespace attnzoo {
// Reads dir/config.json and dir/model.safetensors (strictly) into a new
// model, in eval mode (call train() to fine-tune).
std::shared_ptr<models::ModelBase> from_pretrained(const std::string& dir);
// The same, checked to be of kind M (e.g. from_pretrained_as<models::GPTImpl>).
template <typename M>
std::shared_ptr<M> from_pretrained_as(const std::string& dir) {
  auto model = std::dynamic_pointer_cast<M>(from_pretrained(dir));
  if (!model) throw std::invalid_argument(dir + ": the checkpoint holds a different model_type");
  return model;
}
}  // namespace attnzoo
