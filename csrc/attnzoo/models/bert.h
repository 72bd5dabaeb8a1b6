#pragma once
// BERT: token, position and token-type embeddings, a post-LN encoder, the
// masked-LM head and an optional sequence-classification head.
#include <optional>
#include <tuple>
#include <vector>

#include "attnzoo/models/model_base.h"

namespace attnzoo::models {

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
  nn::Dropout dropout{nullptr};
};
TORCH_MODULE(Bert);

}  // namespace attnzoo::models
