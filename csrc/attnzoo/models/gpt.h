#pragma once
// GPT: token and position embeddings, pre-LN causal blocks, a tied LM head,
// and generation with a KV cache (greedy or sampled).
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attnzoo/models/model_base.h"

namespace attnzoo::models {

struct GenerationOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;             // 0: greedy; > 0: sample from softmax(logits / temperature)
  int64_t top_k = 0;                    // sample among the k most likely tokens (0: all)
  double top_p = 1.0;                   // nucleus: the smallest set with probability >= top_p
  std::optional<int64_t> eos_token_id;  // default: the config's; -1: none
  bool use_cache = true;                // KV cache (kinds without one recompute the prefix)
  std::optional<uint64_t> seed;         // sampling generator seed (default: the global one)
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
  // Checks the options against the config and the prompt; returns the eos id
  // in effect (-1: none).
  int64_t check_generation(const GenerationOptions& options, int64_t prompt_length) const;
  // The next token of each row from its last logits (B, vocab): greedy, or
  // sampled with temperature, top-k and top-p.
  static at::Tensor next_token(const at::Tensor& last_logits, const GenerationOptions& options,
                               const std::optional<at::Generator>& generator);
  nn::Dropout dropout{nullptr};
};
TORCH_MODULE(GPT);

}  // namespace attnzoo::models
