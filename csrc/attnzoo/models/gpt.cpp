// GPT: the causal stack, cached and uncached logits, generation.
#include "attnzoo/models/gpt.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

namespace attnzoo::models {

GPTImpl::GPTImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == ModelType::gpt, "GPT: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  std::tie(token_embedding, position_embedding) = register_text_embeddings();
  dropout = register_module("dropout", nn::Dropout(c.dropout));
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(nn::TransformerBlock(c, c.attention[i]));
  final_norm = register_module("final_norm", nn::layer_norm(c));
  if (!c.tie_word_embeddings)
    lm_head = register_module(
        "lm_head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
  init_weights();
}

bool GPTImpl::supports_kv_cache() const {
  for (size_t i = 0; i < layers->size(); ++i)
    if (!layers->ptr<nn::TransformerBlockImpl>(i)->attn->supports_kv_cache()) return false;
  return true;
}

at::Tensor GPTImpl::logits(const at::Tensor& input_ids, const std::optional<at::Tensor>& mask,
                           nn::KVCache* cache) {
  const auto& c = config_;
  const auto device = token_embedding->weight.device();
  auto ids = check_ids(input_ids, "input_ids", c.vocab_size, device);
  const int64_t B = ids.size(0), N = ids.size(1);
  const int64_t past = cache && !cache->empty() ? cache->front().length() : 0;
  if (past > 0)
    TORCH_CHECK(cache->front().k.size(0) == B, "gpt: input_ids has batch ", B,
                " but the KV cache holds batch ", cache->front().k.size(0),
                "; use a fresh cache for a new batch");
  auto h = add_positions(token_embedding(ids), position_embedding, past);
  nn::AttentionInputs inputs;
  inputs.causal = true;
  inputs.key_padding_mask = check_padding_mask(mask, B, N, device);
  h = final_norm(run_layers(dropout(h), inputs, cache));
  return lm_head ? lm_head(h) : at::linear(h, token_embedding->weight);
}

at::Tensor GPTImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask) {
  return logits(input_ids, attention_mask, nullptr);
}

at::Tensor GPTImpl::forward_cached(const at::Tensor& input_ids, nn::KVCache& cache) {
  return logits(input_ids, std::nullopt, &cache);
}

at::Tensor GPTImpl::generate(const at::Tensor& input_ids, const GenerationOptions& options) {
  auto ids = check_ids(input_ids, "input_ids", config_.vocab_size, token_embedding->weight.device());
  const int64_t eos = check_generation(options, ids.size(1));
  std::optional<at::Generator> generator;
  if (options.seed) generator = at::make_generator<at::CPUGeneratorImpl>(*options.seed);

  torch::NoGradGuard no_grad;
  const bool was_training = is_training();
  eval();
  const bool cached = options.use_cache && supports_kv_cache();
  nn::KVCache cache;
  at::Tensor out = ids, new_tokens = ids, done = at::zeros({ids.size(0)}, ids.options().dtype(at::kBool));
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    // With a cache only the new tokens go in; without one, the whole sequence.
    const at::Tensor step_logits =
        cached ? logits(new_tokens, std::nullopt, &cache) : logits(out, std::nullopt, nullptr);
    at::Tensor next = next_token(step_logits.select(1, -1).to(at::kFloat), options, generator);
    if (eos >= 0) {  // a finished row keeps emitting eos
      next = at::where(done, at::full_like(next, eos), next);
      done = done | next.eq(eos);
    }
    new_tokens = next.unsqueeze(1);
    out = at::cat({out, new_tokens}, 1);
    if (eos >= 0 && done.all().item<bool>()) break;
  }
  train(was_training);
  return out;
}

int64_t GPTImpl::check_generation(const GenerationOptions& o, int64_t prompt_length) const {
  const auto& c = config_;
  TORCH_CHECK(o.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens);
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature >= 0,
              "generate: temperature must be >= 0 (0 = greedy), got ", o.temperature);
  TORCH_CHECK(o.top_k >= 0, "generate: top_k must be >= 0 (0 = off), got ", o.top_k);
  TORCH_CHECK(o.top_p > 0 && o.top_p <= 1, "generate: top_p must be in (0, 1], got ", o.top_p);
  const int64_t eos = o.eos_token_id.value_or(c.eos_token_id);
  TORCH_CHECK(eos >= -1 && eos < c.vocab_size, "generate: eos_token_id must be in [-1, ", c.vocab_size,
              "), got ", eos);
  if (position_embedding)
    TORCH_CHECK(prompt_length + o.max_new_tokens <= c.max_position_embeddings, "generate: prompt length ",
                prompt_length, " + max_new_tokens ", o.max_new_tokens,
                " exceeds max_position_embeddings = ", c.max_position_embeddings);
  return eos;
}

at::Tensor GPTImpl::next_token(const at::Tensor& last_logits, const GenerationOptions& o,
                               const std::optional<at::Generator>& generator) {
  if (o.temperature == 0) return last_logits.argmax(-1);  // greedy
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto l = last_logits / o.temperature;
  if (o.top_k > 0 && o.top_k < l.size(-1))  // keep the k most likely
    l = l.masked_fill(l < std::get<0>(l.topk(o.top_k, -1)).narrow(1, o.top_k - 1, 1), neg_inf);
  if (o.top_p < 1) {  // nucleus: drop a token when the more likely ones already reach top_p
    auto [sorted, order] = l.sort(-1, /*descending=*/true);
    auto probs = sorted.softmax(-1);
    auto drop_sorted = (probs.cumsum(-1) - probs) >= o.top_p;
    l = l.masked_fill(at::zeros_like(drop_sorted).scatter(-1, order, drop_sorted), neg_inf);
  }
  // A seeded generator is a CPU one: it samples from the probabilities on the CPU.
  auto probs = generator ? l.softmax(-1).to(at::kCPU) : l.softmax(-1);
  return at::multinomial(probs, 1, false, generator).squeeze(1).to(l.device());
}

}  // namespace attnzoo::models
