// BERT: embeddings, the post-LN encoder, the masked-LM and classification heads.
#include "attnzoo/models/bert.h"

namespace attnzoo::models {

BertImpl::BertImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == ModelType::bert, "Bert: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  std::tie(token_embedding, position_embedding) = register_text_embeddings();
  token_type_embedding =
      register_module("token_type_embedding", torch::nn::Embedding(c.type_vocab_size, c.hidden_size));
  embedding_norm = register_module("embedding_norm", nn::layer_norm(c));
  dropout = register_module("dropout", nn::Dropout(c.dropout));
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(nn::TransformerBlock(c, c.attention[i]));
  mlm_transform = register_module("mlm_transform", torch::nn::Linear(c.hidden_size, c.hidden_size));
  mlm_norm = register_module("mlm_norm", nn::layer_norm(c));
  if (!c.tie_word_embeddings)
    mlm_decoder = register_module(
        "mlm_decoder", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
  bind_parameter(*this, "mlm_bias", at::zeros({c.vocab_size}), mlm_bias);
  if (c.num_labels > 0) {
    pooler = register_module("pooler", torch::nn::Linear(c.hidden_size, c.hidden_size));
    classifier = register_module("classifier", torch::nn::Linear(c.hidden_size, c.num_labels));
  }
  init_weights();
}

at::Tensor BertImpl::encode(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& token_type_ids) {
  const auto& c = config_;
  const auto device = token_embedding->weight.device();
  auto ids = check_ids(input_ids, "input_ids", c.vocab_size, device);
  const int64_t B = ids.size(0), N = ids.size(1);
  auto h = add_positions(token_embedding(ids), position_embedding, 0);
  if (token_type_ids) {
    auto types = check_ids(*token_type_ids, "token_type_ids", c.type_vocab_size, device);
    TORCH_CHECK(types.sizes() == ids.sizes(), "bert: token_type_ids must have the shape of input_ids ",
                ids.sizes(), ", got ", types.sizes());
    h = h + token_type_embedding(types);
  } else {
    h = h + token_type_embedding->weight[0];
  }
  nn::AttentionInputs inputs;
  inputs.key_padding_mask = check_padding_mask(attention_mask, B, N, device);
  return run_layers(dropout(embedding_norm(h)), inputs);
}

at::Tensor BertImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                             const std::optional<at::Tensor>& token_type_ids,
                             const std::optional<at::Tensor>& predict_mask) {
  auto h = encode(input_ids, attention_mask, token_type_ids);
  if (predict_mask) {
    TORCH_CHECK(predict_mask->scalar_type() == at::kBool && predict_mask->sizes() == input_ids.sizes(),
                "bert: predict_mask must be a bool tensor of the shape of input_ids ", input_ids.sizes(),
                ", got ", predict_mask->scalar_type(), " ", predict_mask->sizes());
    h = h.index({predict_mask->to(h.device())});
  }
  h = mlm_norm(nn::activation(config_.activation, mlm_transform(h)));
  return at::linear(h, mlm_decoder ? mlm_decoder->weight : token_embedding->weight, mlm_bias);
}

at::Tensor BertImpl::classify(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                              const std::optional<at::Tensor>& token_type_ids) {
  TORCH_CHECK(classifier, "bert: classify needs a classification head (config num_labels > 0)");
  auto h = encode(input_ids, attention_mask, token_type_ids);
  return classifier(dropout(at::tanh(pooler(h.select(1, 0)))));
}

}  // namespace attnzoo::models
