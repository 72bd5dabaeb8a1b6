// The zoo: a model by the type its config names, and checkpoint loading.
#include "attnzoo/models/models.h"

namespace attnzoo::models {

std::shared_ptr<ModelBase> create_model(const ModelConfig& config) {
  validate(config);
  switch (config.model_type) {
    case ModelType::gpt:
      return std::make_shared<GPTImpl>(config);
    case ModelType::bert:
      return std::make_shared<BertImpl>(config);
    case ModelType::vit:
      return std::make_shared<ViTImpl>(config);
    case ModelType::speech:
      return std::make_shared<SpeechImpl>(config);
    case ModelType::speech_seq2seq:
      return std::make_shared<SpeechSeq2SeqImpl>(config);
  }
  throw std::invalid_argument("create_model: unknown model_type " +
                              std::to_string(static_cast<int>(config.model_type)));
}

}  // namespace attnzoo::models

namespace attnzoo {

std::shared_ptr<models::ModelBase> from_pretrained(const std::string& dir) {
  auto model = models::create_model(config_from_file(dir + "/config.json"));
  model->load_state(io::load_safetensors(dir + "/model.safetensors").tensors);
  model->eval();  // as HF's from_pretrained: deterministic until train() is asked for
  return model;
}

}  // namespace attnzoo
