#pragma once
// ViT: convolutional patch embedding, a CLS token, learned positions and a
// classifier on the CLS token.
#include <optional>
#include <tuple>
#include <vector>

#include "attnzoo/models/model_base.h"

namespace attnzoo::models {

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
  nn::Dropout dropout{nullptr};
};
TORCH_MODULE(ViT);

}  // namespace attnzoo::models
