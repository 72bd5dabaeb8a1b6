// Bert, GPT, ViT and Speech: embeddings and heads around a stack of
// nn::TransformerBlock, plus checkpoint directories.
#include "attnzoo/models/models.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/utils.h>

#include <cmath>
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

// The token embedding and, when the config asks for learned positions, the
// position embedding of a text model (GPT, Bert), registered on `model`.
std::pair<torch::nn::Embedding, torch::nn::Embedding> text_embeddings(torch::nn::Module& model,
                                                                      const ModelConfig& c) {
  auto tokens = model.register_module("token_embedding", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  torch::nn::Embedding positions{nullptr};
  if (c.position_embedding == "learned")
    positions = model.register_module("position_embedding",
                                      torch::nn::Embedding(c.max_position_embeddings, c.hidden_size));
  return {tokens, positions};
}

// h + the embedding of positions past .. past + N - 1 (learned or sinusoidal).
at::Tensor add_positions(const ModelConfig& c, const at::Tensor& h, torch::nn::Embedding& learned,
                         int64_t past) {
  const int64_t N = h.size(1);
  if (learned) {
    TORCH_CHECK(past + N <= c.max_position_embeddings, c.model_type, ": input_ids reach position ", past + N,
                ", beyond max_position_embeddings = ", c.max_position_embeddings);
    return h + learned(at::arange(past, past + N, at::kLong));
  }
  if (c.position_embedding == "sinusoidal")
    return h + nn::sinusoidal_positions(N, c.hidden_size, past, h.options());
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------
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
    throw std::invalid_argument("load_state: the checkpoint does not fit the " + config_.model_type +
                                " model:" + problems);
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

at::Tensor ModelBase::check_ids(const at::Tensor& ids, const char* name, int64_t vocab) const {
  TORCH_CHECK(ids.defined() && ids.dim() == 2, config_.model_type, ": ", name,
              " must have shape (batch, length), got ", ids.defined() ? ids.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type()) &&
                  ids.scalar_type() != at::kBool,
              config_.model_type, ": ", name, " must hold integer ids, got ", ids.scalar_type());
  TORCH_CHECK(ids.size(0) > 0 && ids.size(1) > 0, config_.model_type, ": ", name,
              " must hold at least one sequence of at least one token, got ", ids.sizes());
  TORCH_CHECK(ids.device().is_cpu(), config_.model_type, ": ", name, " is on ", ids.device(),
              ", expected cpu");
  auto ids64 = ids.to(at::kLong);
  const int64_t lo = ids64.min().item<int64_t>(), hi = ids64.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < vocab, config_.model_type, ": ", name, " must lie in [0, ", vocab,
              "), got values in [", lo, ", ", hi, "]");
  return ids64;
}

std::optional<at::Tensor> ModelBase::check_padding_mask(const std::optional<at::Tensor>& mask, int64_t B,
                                                        int64_t N) const {
  if (!mask) return std::nullopt;
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N, config_.model_type,
              ": attention_mask must have shape (batch, length) = (", B, ", ", N, "), got ", mask->sizes());
  TORCH_CHECK(!at::isFloatingType(mask->scalar_type()), config_.model_type,
              ": attention_mask must be bool or integer (1 = token, 0 = padding), got ", mask->scalar_type());
  return mask->ne(0);
}

at::Tensor ModelBase::run_layers(at::Tensor h, const nn::AttentionInputs& inputs, nn::KVCache* cache) {
  if (cache) cache->resize(layers->size());
  for (size_t i = 0; i < layers->size(); ++i) {
    nn::AttentionInputs layer_inputs = inputs;
    layer_inputs.cache = cache ? &(*cache)[i] : nullptr;
    layer_inputs.attention_maps = recording_attention_ ? &attention_maps_ : nullptr;
    h = layers->ptr<nn::TransformerBlockImpl>(i)->forward(h, layer_inputs);
  }
  return h;
}

// ---------------------------------------------------------------------------
GPTImpl::GPTImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == "gpt", "GPT: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  std::tie(token_embedding, position_embedding) = text_embeddings(*this, c);
  dropout = register_module("dropout", torch::nn::Dropout(c.dropout));
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
  auto ids = check_ids(input_ids, "input_ids", c.vocab_size);
  const int64_t B = ids.size(0), N = ids.size(1);
  const int64_t past = cache && !cache->empty() ? cache->front().length() : 0;
  if (past > 0)
    TORCH_CHECK(cache->front().k.size(0) == B, "gpt: input_ids has batch ", B,
                " but the KV cache holds batch ", cache->front().k.size(0),
                "; use a fresh cache for a new batch");
  auto h = add_positions(c, token_embedding(ids), position_embedding, past);
  nn::AttentionInputs inputs;
  inputs.causal = true;
  inputs.key_padding_mask = check_padding_mask(mask, B, N);
  h = final_norm(run_layers(dropout(h), inputs, cache));
  return lm_head ? lm_head(h) : at::linear(h, token_embedding->weight);
}

at::Tensor GPTImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask) {
  return logits(input_ids, attention_mask, nullptr);
}

at::Tensor GPTImpl::forward_cached(const at::Tensor& input_ids, nn::KVCache& cache) {
  return logits(input_ids, std::nullopt, &cache);
}

at::Tensor GPTImpl::generate(const at::Tensor& input_ids, const GenerationOptions& o) {
  const auto& c = config_;
  auto ids = check_ids(input_ids, "input_ids", c.vocab_size);
  TORCH_CHECK(o.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens);
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature >= 0,
              "generate: temperature must be >= 0 (0 = greedy), got ", o.temperature);
  TORCH_CHECK(o.top_k >= 0, "generate: top_k must be >= 0 (0 = off), got ", o.top_k);
  TORCH_CHECK(o.top_p > 0 && o.top_p <= 1, "generate: top_p must be in (0, 1], got ", o.top_p);
  const int64_t eos = o.eos_token_id == -2 ? c.eos_token_id : o.eos_token_id;
  TORCH_CHECK(eos >= -1 && eos < c.vocab_size, "generate: eos_token_id must be in [-1, ", c.vocab_size,
              "), got ", eos);
  if (position_embedding)
    TORCH_CHECK(ids.size(1) + o.max_new_tokens <= c.max_position_embeddings, "generate: prompt length ",
                ids.size(1), " + max_new_tokens ", o.max_new_tokens,
                " exceeds max_position_embeddings = ", c.max_position_embeddings);
  std::optional<at::Generator> generator;
  if (o.seed) generator = at::make_generator<at::CPUGeneratorImpl>(*o.seed);

  torch::NoGradGuard no_grad;
  const bool was_training = is_training();
  eval();
  const bool cached = o.use_cache && supports_kv_cache();
  nn::KVCache cache;
  at::Tensor out = ids, next_input = ids;
  at::Tensor done = at::zeros({ids.size(0)}, at::kBool);
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    auto last = (cached ? logits(next_input, std::nullopt, &cache) : logits(out, std::nullopt, nullptr))
                    .select(1, -1)
                    .to(at::kFloat);
    at::Tensor next;
    if (o.temperature == 0) {
      next = last.argmax(-1);
    } else {
      auto l = last / o.temperature;
      const double neg_inf = -std::numeric_limits<double>::infinity();
      if (o.top_k > 0 && o.top_k < l.size(-1))
        l = l.masked_fill(l < std::get<0>(l.topk(o.top_k, -1)).narrow(1, o.top_k - 1, 1), neg_inf);
      if (o.top_p < 1) {
        auto [sorted, order] = l.sort(-1, /*descending=*/true);
        auto probs = sorted.softmax(-1);
        // Drop a token when the more likely ones already reach top_p.
        auto drop_sorted = (probs.cumsum(-1) - probs) >= o.top_p;
        l = l.masked_fill(at::zeros_like(drop_sorted).scatter(-1, order, drop_sorted), neg_inf);
      }
      next = at::multinomial(l.softmax(-1), 1, false, generator).squeeze(1);
    }
    if (eos >= 0) {
      next = at::where(done, at::full_like(next, eos), next);
      done = done | next.eq(eos);
    }
    out = at::cat({out, next.unsqueeze(1)}, 1);
    next_input = next.unsqueeze(1);
    if (eos >= 0 && done.all().item<bool>()) break;
  }
  train(was_training);
  return out;
}

// ---------------------------------------------------------------------------
BertImpl::BertImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == "bert", "Bert: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  std::tie(token_embedding, position_embedding) = text_embeddings(*this, c);
  token_type_embedding =
      register_module("token_type_embedding", torch::nn::Embedding(c.type_vocab_size, c.hidden_size));
  embedding_norm = register_module("embedding_norm", nn::layer_norm(c));
  dropout = register_module("dropout", torch::nn::Dropout(c.dropout));
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(nn::TransformerBlock(c, c.attention[i]));
  mlm_transform = register_module("mlm_transform", torch::nn::Linear(c.hidden_size, c.hidden_size));
  mlm_norm = register_module("mlm_norm", nn::layer_norm(c));
  if (!c.tie_word_embeddings)
    mlm_decoder = register_module(
        "mlm_decoder", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
  mlm_bias = register_parameter("mlm_bias", at::zeros({c.vocab_size}));
  if (c.num_labels > 0) {
    pooler = register_module("pooler", torch::nn::Linear(c.hidden_size, c.hidden_size));
    classifier = register_module("classifier", torch::nn::Linear(c.hidden_size, c.num_labels));
  }
  init_weights();
}

at::Tensor BertImpl::encode(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                            const std::optional<at::Tensor>& token_type_ids) {
  const auto& c = config_;
  auto ids = check_ids(input_ids, "input_ids", c.vocab_size);
  const int64_t B = ids.size(0), N = ids.size(1);
  auto h = add_positions(c, token_embedding(ids), position_embedding, 0);
  if (token_type_ids) {
    auto types = check_ids(*token_type_ids, "token_type_ids", c.type_vocab_size);
    TORCH_CHECK(types.sizes() == ids.sizes(), "bert: token_type_ids must have the shape of input_ids ",
                ids.sizes(), ", got ", types.sizes());
    h = h + token_type_embedding(types);
  } else {
    h = h + token_type_embedding->weight[0];
  }
  nn::AttentionInputs inputs;
  inputs.key_padding_mask = check_padding_mask(attention_mask, B, N);
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
    h = h.index({*predict_mask});
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

// ---------------------------------------------------------------------------
ViTImpl::ViTImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == "vit", "ViT: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  const int64_t patches = (c.image_size / c.patch_size) * (c.image_size / c.patch_size);
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv2d(
          torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size)));
  cls_token = register_parameter("cls_token", at::randn({1, 1, c.hidden_size}) * 0.02);
  position_embedding =
      register_parameter("position_embedding", at::randn({1, patches + 1, c.hidden_size}) * 0.02);
  dropout = register_module("dropout", torch::nn::Dropout(c.dropout));
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

// ---------------------------------------------------------------------------
SpeechImpl::SpeechImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == "speech", "Speech: config.model_type is \"", config.model_type, "\"");
  const auto& c = config_;
  const int64_t ch = c.subsampling_channels;
  const int64_t f1 = (c.n_mels - 3) / 2 + 1, f2 = (f1 - 3) / 2 + 1;
  subsample_conv1 =
      register_module("subsample_conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, ch, 3).stride(2)));
  subsample_conv2 =
      register_module("subsample_conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(ch, ch, 3).stride(2)));
  subsample_proj = register_module("subsample_proj", torch::nn::Linear(ch * f2, c.hidden_size));
  dropout = register_module("dropout", torch::nn::Dropout(c.dropout));
  for (int64_t i = 0; i < c.num_layers; ++i)
    layers->push_back(nn::TransformerBlock(c, c.attention[i], /*cross_attention=*/false, c.conformer_conv));
  final_norm = register_module("final_norm", nn::layer_norm(c));
  ctc_head = register_module("ctc_head", torch::nn::Linear(c.hidden_size, c.vocab_size));
  init_weights();
}

at::Tensor SpeechImpl::mel_filterbank(at::ScalarType dtype) const {
  // HTK mel scale, triangles between n_mels + 2 equally spaced mel points.
  const auto& c = config_;
  const int64_t bins = c.n_fft / 2 + 1;
  auto mel = [](double hz) { return 2595.0 * std::log10(1.0 + hz / 700.0); };
  auto hz = [](const at::Tensor& m) { return 700.0 * (at::pow(10.0, m / 2595.0) - 1.0); };
  auto points = hz(at::linspace(0.0, mel(c.sample_rate / 2.0), c.n_mels + 2, at::kDouble));
  auto freqs = at::linspace(0.0, c.sample_rate / 2.0, bins, at::kDouble);
  auto lower = points.narrow(0, 0, c.n_mels).unsqueeze(1),
       centre = points.narrow(0, 1, c.n_mels).unsqueeze(1),
       upper = points.narrow(0, 2, c.n_mels).unsqueeze(1);
  auto rising = (freqs - lower) / (centre - lower), falling = (upper - freqs) / (upper - centre);
  return at::clamp_min(at::minimum(rising, falling), 0.0).to(dtype);  // (n_mels, bins)
}

std::tuple<at::Tensor, at::Tensor> SpeechImpl::features(const at::Tensor& waveforms,
                                                        const std::optional<at::Tensor>& lengths) const {
  const auto& c = config_;
  TORCH_CHECK(waveforms.dim() == 2 && waveforms.size(0) > 0,
              "speech: waveforms must have shape (batch, samples), got ", waveforms.sizes());
  TORCH_CHECK(at::isFloatingType(waveforms.scalar_type()), "speech: waveforms must be floating, got ",
              waveforms.scalar_type());
  TORCH_CHECK(waveforms.size(1) >= c.n_fft, "speech: waveforms must have at least n_fft = ", c.n_fft,
              " samples, got ", waveforms.size(1));
  const int64_t B = waveforms.size(0), S = waveforms.size(1);
  at::Tensor samples = at::full({B}, S, at::kLong);
  if (lengths) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && !at::isFloatingType(lengths->scalar_type()),
                "speech: lengths must be (batch,) integers, got ", lengths->sizes(), " ",
                lengths->scalar_type());
    samples = lengths->to(at::kLong);
    TORCH_CHECK(samples.min().item<int64_t>() >= 1 && samples.max().item<int64_t>() <= S,
                "speech: lengths must lie in [1, ", S, "]");
  }
  const auto dtype = subsample_proj->weight.scalar_type();
  auto x = waveforms.to(dtype);
  auto spectrum =
      at::stft(x, c.n_fft, c.hop_length, c.n_fft, at::hann_window(c.n_fft, x.options()), /*center=*/true,
               "reflect", /*normalized=*/false, /*onesided=*/true, /*return_complex=*/true);
  auto power = at::real(spectrum * spectrum.conj());  // (B, bins, frames)
  auto mel = at::matmul(mel_filterbank(dtype), power);
  auto feats = at::log(mel + 1e-6).transpose(1, 2);  // (B, frames, n_mels)
  // Per-utterance mean and variance normalisation, so the model sees the same
  // scale whatever the recording level. The statistics come from the frames
  // whose window lies wholly inside the utterance, so padding after it cannot
  // change them; padding frames become zeros.
  auto frames = at::div(samples, c.hop_length, "floor") + 1;
  auto inside = at::clamp_min(at::div(samples - c.n_fft / 2, c.hop_length, "floor") + 1, 1);
  auto positions = at::arange(feats.size(1), at::kLong).unsqueeze(0);
  auto in_stats = (positions < inside.unsqueeze(1)).unsqueeze(-1).to(dtype);
  auto count = inside.to(dtype).view({B, 1, 1});
  auto mean = (feats * in_stats).sum(1, true) / count;
  auto var = ((feats - mean).square() * in_stats).sum(1, true) / count;
  auto valid = (positions < frames.unsqueeze(1)).unsqueeze(-1).to(dtype);
  return {(feats - mean) * at::rsqrt(var + 1e-5) * valid, frames};
}

std::tuple<at::Tensor, at::Tensor> SpeechImpl::forward(const at::Tensor& waveforms,
                                                       const std::optional<at::Tensor>& lengths) {
  const auto& c = config_;
  auto [feats, frames] = features(waveforms, lengths);
  TORCH_CHECK(feats.size(1) >= 7, "speech: the input is too short for two stride-2 convolutions (",
              feats.size(1), " frames, need 7)");
  auto x = at::relu(subsample_conv2(at::relu(subsample_conv1(feats.unsqueeze(1)))));  // (B, ch, T', F')
  x = subsample_proj(x.transpose(1, 2).flatten(2));
  auto out_lengths = at::clamp_min(at::div(at::div(frames - 3, 2, "floor") + 1 - 3, 2, "floor") + 1, 1);
  const int64_t T = x.size(1);
  if (c.position_embedding == "sinusoidal") {
    x = x + nn::sinusoidal_positions(T, c.hidden_size, 0, x.options());
  } else if (c.position_embedding == "learned") {
    TORCH_CHECK(false, "speech: learned positions are not supported; use sinusoidal or none");
  }
  nn::AttentionInputs inputs;
  inputs.key_padding_mask = at::arange(T, at::kLong).unsqueeze(0) < out_lengths.unsqueeze(1);
  auto h = final_norm(run_layers(dropout(x), inputs));
  return {at::log_softmax(ctc_head(h), -1), out_lengths};
}

std::vector<std::vector<int64_t>> SpeechImpl::greedy_decode(const at::Tensor& log_probs,
                                                            const at::Tensor& lengths) const {
  TORCH_CHECK(log_probs.dim() == 3 && lengths.dim() == 1 && lengths.size(0) == log_probs.size(0),
              "speech: greedy_decode takes log_probs (B, T, vocab) and lengths (B,)");
  auto best = log_probs.argmax(-1).to(at::kLong).contiguous();
  auto lens = lengths.to(at::kLong).contiguous();
  std::vector<std::vector<int64_t>> out(size_t(best.size(0)));
  for (int64_t b = 0; b < best.size(0); ++b) {
    const int64_t* row = best[b].data_ptr<int64_t>();
    const int64_t n = std::min(lens[b].item<int64_t>(), best.size(1));
    for (int64_t t = 0; t < n; ++t)
      if (row[t] != config_.blank_id && (t == 0 || row[t] != row[t - 1])) out[b].push_back(row[t]);
  }
  return out;
}

// ---------------------------------------------------------------------------
std::shared_ptr<ModelBase> create_model(const ModelConfig& config) {
  validate(config);
  if (config.model_type == "gpt") return std::make_shared<GPTImpl>(config);
  if (config.model_type == "bert") return std::make_shared<BertImpl>(config);
  if (config.model_type == "vit") return std::make_shared<ViTImpl>(config);
  return std::make_shared<SpeechImpl>(config);
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
