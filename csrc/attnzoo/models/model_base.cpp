// What every model shares: initialisation, strict state loading, checkpoint
// directories, the layer stack and the text embeddings.
#include "attnzoo/models/model_base.h"

#include <torch/nn/init.h>

#include <filesystem>
#include <map>
#include <set>
#include <sstream>

namespace attnzoo::models {
namespace {

std::string list_names(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < 20; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > 20) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

}  // namespace

ModelBase::ModelBase(const ModelConfig& config) : config_(config) {
  validate(config_);
  layers = register_module("layers", torch::nn::ModuleList());
}

void ModelBase::init_weights() {
  torch::NoGradGuard no_grad;
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* linear = m->as<torch::nn::LinearImpl>()) {
      linear->weight.normal_(0.0, 0.02);
      if (linear->bias.defined()) linear->bias.zero_();
    } else if (auto* embedding = m->as<torch::nn::EmbeddingImpl>()) {
      embedding->weight.normal_(0.0, 0.02);
    } else if (auto* norm = m->as<torch::nn::LayerNormImpl>()) {
      norm->weight.fill_(1.0);
      norm->bias.zero_();
    }
  }
}

io::NamedTensors ModelBase::state() const {
  io::NamedTensors out;
  for (const auto& item : named_parameters(true)) out.emplace_back(item.key(), item.value());
  for (const auto& item : named_buffers(true)) out.emplace_back(item.key(), item.value());
  return out;
}

void ModelBase::load_state(const io::NamedTensors& tensors) {
  std::map<std::string, at::Tensor> given;
  std::vector<std::string> duplicated, unexpected, missing, mismatched;
  for (const auto& [name, t] : tensors)
    if (!given.emplace(name, t).second) duplicated.push_back(name);
  std::set<std::string> known;
  for (const auto& [name, dst] : state()) {
    known.insert(name);
    auto it = given.find(name);
    if (it == given.end()) {
      missing.push_back(name);
    } else if (it->second.sizes() != dst.sizes()) {
      std::ostringstream s;
      s << name << " (checkpoint " << it->second.sizes() << ", model " << dst.sizes() << ")";
      mismatched.push_back(s.str());
    }
  }
  for (const auto& [name, t] : given)
    if (!known.count(name)) unexpected.push_back(name);
  std::string problems;
  if (!duplicated.empty()) problems += "\n  duplicated keys: " + list_names(duplicated);
  if (!missing.empty()) problems += "\n  missing keys: " + list_names(missing);
  if (!unexpected.empty()) problems += "\n  unexpected keys: " + list_names(unexpected);
  if (!mismatched.empty()) problems += "\n  shape mismatch: " + list_names(mismatched);
  if (!problems.empty())
    throw std::invalid_argument("load_state: the checkpoint does not fit the " +
                                std::string(attnzoo::name(config_.model_type)) + " model:" + problems);
  torch::NoGradGuard no_grad;
  for (auto& [name, dst] : state()) {
    const auto& src = given.at(name);
    TORCH_CHECK(at::isFloatingType(src.scalar_type()) == at::isFloatingType(dst.scalar_type()),
                "load_state: ", name, " has dtype ", src.scalar_type(), ", the model holds ",
                dst.scalar_type());
    dst.copy_(src);
  }
}

void ModelBase::save_pretrained(const std::string& dir) const {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw std::runtime_error("save_pretrained: cannot create " + dir + ": " + error.message());
  io::NamedTensors tensors;
  for (const auto& [name, t] : state()) tensors.emplace_back(name, t.detach().to(at::kCPU));
  io::save_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}, {"producer", "attnzoo"}});
  io::write_file_atomic(dir + "/config.json", config_to_json(config_));
}

at::Tensor ModelBase::check_ids(const at::Tensor& ids, const char* name, int64_t vocab,
                                const at::Device& device) const {
  TORCH_CHECK(ids.defined() && ids.dim() == 2, config_.model_type, ": ", name,
              " must have shape (batch, length), got ", ids.defined() ? ids.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type()) &&
                  ids.scalar_type() != at::kBool,
              config_.model_type, ": ", name, " must hold integer ids, got ", ids.scalar_type());
  TORCH_CHECK(ids.size(0) > 0 && ids.size(1) > 0, config_.model_type, ": ", name,
              " must hold at least one sequence of at least one token, got ", ids.sizes());
  auto ids64 = ids.to(device, at::kLong);
  const int64_t lo = ids64.min().item<int64_t>(), hi = ids64.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < vocab, config_.model_type, ": ", name, " must lie in [0, ", vocab,
              "), got values in [", lo, ", ", hi, "]");
  return ids64;
}

std::optional<at::Tensor> ModelBase::check_padding_mask(const std::optional<at::Tensor>& mask, int64_t B,
                                                        int64_t N, const at::Device& device) const {
  if (!mask) return std::nullopt;
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N, config_.model_type,
              ": attention_mask must have shape (batch, length) = (", B, ", ", N, "), got ", mask->sizes());
  TORCH_CHECK(!at::isFloatingType(mask->scalar_type()), config_.model_type,
              ": attention_mask must be bool or integer (1 = token, 0 = padding), got ", mask->scalar_type());
  return mask->to(device).ne(0);
}

at::Tensor ModelBase::run_layers(at::Tensor h, const nn::AttentionInputs& inputs, nn::KVCache* cache) {
  return run_stack(layers, 0, std::move(h), inputs, cache);
}

at::Tensor ModelBase::run_stack(torch::nn::ModuleList& stack, size_t first_index, at::Tensor h,
                                const nn::AttentionInputs& inputs, nn::KVCache* cache) {
  if (cache) cache->resize(stack->size());
  for (size_t i = 0; i < stack->size(); ++i) {
    nn::AttentionInputs layer_inputs = inputs;
    layer_inputs.cache = cache ? &(*cache)[i] : nullptr;
    layer_inputs.attention_maps = recording_attention_ ? &attention_maps_ : nullptr;
    layer_inputs.cross_attention_maps = recording_attention_ ? &cross_attention_maps_ : nullptr;
    h = layer_runner_ ? layer_runner_(first_index + i, h, layer_inputs)
                      : stack->ptr<nn::TransformerBlockImpl>(i)->forward(h, layer_inputs);
  }
  return h;
}

std::pair<torch::nn::Embedding, torch::nn::Embedding> ModelBase::register_text_embeddings() {
  const auto& c = config_;
  auto tokens = register_module("token_embedding", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  torch::nn::Embedding positions{nullptr};
  if (c.position_embedding == PositionEmbedding::learned)
    positions =
        register_module("position_embedding", torch::nn::Embedding(c.max_position_embeddings, c.hidden_size));
  return {tokens, positions};
}

at::Tensor ModelBase::add_positions(const at::Tensor& h, torch::nn::Embedding& learned, int64_t past) const {
  const auto& c = config_;
  const int64_t N = h.size(1);
  switch (c.position_embedding) {
    case PositionEmbedding::learned:
      TORCH_CHECK(past + N <= c.max_position_embeddings, c.model_type, ": input_ids reach position ",
                  past + N, ", beyond max_position_embeddings = ", c.max_position_embeddings);
      return h + learned(at::arange(past, past + N, h.options().dtype(at::kLong)));
    case PositionEmbedding::sinusoidal:
      return h + nn::sinusoidal_positions(N, c.hidden_size, past, h.options());
    case PositionEmbedding::none:
    case PositionEmbedding::rotary:  // the attention layers rotate their queries and keys
      return h;
  }
  TORCH_CHECK(false, "add_positions: unknown position embedding");
}

}  // namespace attnzoo::models
