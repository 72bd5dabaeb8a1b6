// ViT: patches, CLS token and positions, the encoder, the classifier.
#include "attnzoo/models/vit.h"

namespace attnzoo::models {

ViTImpl::ViTImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == ModelType::vit, "ViT: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  const int64_t patches = (c.image_size / c.patch_size) * (c.image_size / c.patch_size);
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv2d(
          torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size)));
  bind_parameter(*this, "cls_token", at::randn({1, 1, c.hidden_size}) * 0.02, cls_token);
  bind_parameter(*this, "position_embedding", at::randn({1, patches + 1, c.hidden_size}) * 0.02,
                 position_embedding);
  dropout = register_module("dropout", nn::Dropout(c.dropout));
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(nn::TransformerBlock(c, c.attention[i]));
  final_norm = register_module("final_norm", nn::layer_norm(c));
  classifier = register_module("classifier", torch::nn::Linear(c.hidden_size, c.num_labels));
  init_weights();
}

at::Tensor ViTImpl::encode(const at::Tensor& pixel_values) {
  const auto& c = config_;
  TORCH_CHECK(pixel_values.dim() == 4 && pixel_values.size(0) > 0 && pixel_values.size(1) == c.num_channels &&
                  pixel_values.size(2) == c.image_size && pixel_values.size(3) == c.image_size,
              "vit: pixel_values must have shape (batch, ", c.num_channels, ", ", c.image_size, ", ",
              c.image_size, "), got ", pixel_values.sizes());
  TORCH_CHECK(at::isFloatingType(pixel_values.scalar_type()), "vit: pixel_values must be floating, got ",
              pixel_values.scalar_type());
  auto x = patch_embedding(pixel_values.to(cls_token.scalar_type())).flatten(2).transpose(1, 2);
  x = at::cat({cls_token.expand({x.size(0), 1, c.hidden_size}), x}, 1) + position_embedding;
  return final_norm(run_layers(dropout(x), {}));
}

at::Tensor ViTImpl::forward(const at::Tensor& pixel_values) {
  return classifier(encode(pixel_values).select(1, 0));
}

}  // namespace attnzoo::models
