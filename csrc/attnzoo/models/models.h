#pragma once
// The zoo's models, assembled from attnzoo::nn (docs/design.md section 6):
//   auto gpt = attnzoo::models::GPT(attnzoo::config_from_file("config.json"));
//   auto model = attnzoo::from_pretrained("models/gpt-kjv");   // kind from config.json
// Parameter names are the same in every model ("layers.3.attn.q_proj.weight");
// attnzoo.convert maps HF BERT / GPT-2 / ViT names onto them.
#include <memory>
#include <stdexcept>
#include <string>

#include "attnzoo/models/bert.h"
#include "attnzoo/models/gpt.h"
#include "attnzoo/models/model_base.h"
#include "attnzoo/models/speech.h"
#include "attnzoo/models/vit.h"

namespace attnzoo::models {

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
