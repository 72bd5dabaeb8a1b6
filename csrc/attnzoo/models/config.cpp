// config.json <-> ModelConfig, on nlohmann_json. Every key is declared once
// in a table with the model (or attention) kinds it applies to, its member
// and its type; reading, writing and the "unknown key" check all use it.
#include "attnzoo/models/config.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

namespace attnzoo {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& key, const std::string& what) {
  throw std::invalid_argument("config: '" + key + "' " + what);
}

template <typename T>
T read_value(const json& value, const std::string& key);

template <>
int64_t read_value<int64_t>(const json& value, const std::string& key) {
  if (!value.is_number_integer()) fail(key, "must be an integer, got " + value.dump());
  if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(INT64_MAX)) fail(key, "is too large");
  return value.get<int64_t>();
}
template <>
double read_value<double>(const json& value, const std::string& key) {
  if (!value.is_number()) fail(key, "must be a number, got " + value.dump());
  return value.get<double>();
}
template <>
bool read_value<bool>(const json& value, const std::string& key) {
  if (!value.is_boolean()) fail(key, "must be true or false, got " + value.dump());
  return value.get<bool>();
}
template <>
std::string read_value<std::string>(const json& value, const std::string& key) {
  if (!value.is_string()) fail(key, "must be a string, got " + value.dump());
  return value.get<std::string>();
}
// An enum's config.json words, "bert, gpt, vit, speech, ...", for messages.
template <typename E>
std::string choices() {
  std::string out;
  for (const char* word : EnumWords<E>::words) out += (out.empty() ? "" : ", ") + std::string(word);
  return out;
}

// A choice (ModelType, AttentionKind, ...): its word, checked here, once.
template <typename E>
E read_enum(const json& value, const std::string& key) {
  const auto word = read_value<std::string>(value, key);
  if (auto parsed = from_name<E>(word)) return *parsed;
  fail(key, "must be one of " + choices<E>() + ", got \"" + word + "\"");
}

template <>
std::vector<int64_t> read_value<std::vector<int64_t>>(const json& value, const std::string& key) {
  if (!value.is_array()) fail(key, "must be a list of integers, got " + value.dump());
  std::vector<int64_t> out;
  for (const auto& item : value) out.push_back(read_value<int64_t>(item, key));
  return out;
}

// A key of S: the kinds (model types or attention kinds) it applies to,
// "*" for all, and how to read and write it.
template <typename S>
struct Field {
  std::string key;
  std::string kinds;
  std::function<void(S&, const json&, const std::string&)> read;
  std::function<json(const S&)> write;

  bool applies_to(const std::string& kind) const {
    if (kinds == "*") return true;
    std::istringstream words(kinds);
    std::string word;
    while (words >> word)
      if (word == kind) return true;
    return false;
  }
};

template <typename S, typename T>
Field<S> field(const char* key, const char* kinds, T S::*member) {
  if constexpr (std::is_enum_v<T>) {
    return {
        key, kinds,
        [member](S& s, const json& value, const std::string& path) { s.*member = read_enum<T>(value, path); },
        [member](const S& s) { return json(name(s.*member)); }};
  } else {
    return {key, kinds,
            [member](S& s, const json& value, const std::string& path) {
              s.*member = read_value<T>(value, path);
            },
            [member](const S& s) { return json(s.*member); }};
  }
}

const std::vector<Field<AttentionConfig>>& attention_fields() {
  using A = AttentionConfig;
  static const std::vector<Field<A>> fields = {
      field("num_buckets", "t5", &A::num_buckets),
      field("max_distance", "t5 shaw", &A::max_distance),
      field("rotary_base", "rotary", &A::rotary_base),
      field("rotary_dim", "rotary", &A::rotary_dim),
      field("window", "local longformer", &A::window),
      field("layout", "block_sparse", &A::layout),
      field("block_size", "block_sparse", &A::block_size),
      field("layout_window", "block_sparse", &A::layout_window),
      field("num_global", "block_sparse", &A::num_global),
      field("num_random", "block_sparse", &A::num_random),
      field("stride", "block_sparse", &A::stride),
      field("num_summary", "block_sparse", &A::num_summary),
      field("seed", "block_sparse", &A::seed),
      field("projected_length", "linformer", &A::projected_length),
      field("share_kv_projection", "linformer", &A::share_kv_projection),
      field("chunk_size", "linformer", &A::chunk_size),
      field("bucket_size", "lsh", &A::bucket_size),
      field("n_hashes", "lsh", &A::n_hashes),
      field("feature_map", "linear", &A::feature_map),
      field("global_tokens", "longformer", &A::global_tokens),
  };
  return fields;
}

const std::vector<Field<ModelConfig>>& model_fields() {
  using M = ModelConfig;
  static const std::vector<Field<M>> fields = {
      field("vocab_size", "bert gpt speech speech_seq2seq", &M::vocab_size),
      field("hidden_size", "*", &M::hidden_size),
      field("num_layers", "*", &M::num_layers),
      field("num_heads", "*", &M::num_heads),
      field("num_kv_heads", "*", &M::num_kv_heads),
      field("intermediate_size", "*", &M::intermediate_size),
      field("max_position_embeddings", "bert gpt speech speech_seq2seq", &M::max_position_embeddings),
      field("dropout", "*", &M::dropout),
      field("attention_dropout", "*", &M::attention_dropout),
      field("layer_norm_eps", "*", &M::layer_norm_eps),
      field("activation", "*", &M::activation),
      field("norm", "*", &M::norm),
      field("position_embedding", "bert gpt speech speech_seq2seq", &M::position_embedding),
      field("qkv_bias", "*", &M::qkv_bias),
      field("fused_qkv", "*", &M::fused_qkv),
      field("tie_word_embeddings", "bert gpt", &M::tie_word_embeddings),
      field("type_vocab_size", "bert", &M::type_vocab_size),
      field("pad_token_id", "bert gpt", &M::pad_token_id),
      field("num_labels", "bert vit", &M::num_labels),
      field("bos_token_id", "gpt speech_seq2seq", &M::bos_token_id),
      field("eos_token_id", "gpt speech_seq2seq", &M::eos_token_id),
      field("image_size", "vit", &M::image_size),
      field("patch_size", "vit", &M::patch_size),
      field("num_channels", "vit", &M::num_channels),
      field("sample_rate", "speech speech_seq2seq", &M::sample_rate),
      field("n_fft", "speech speech_seq2seq", &M::n_fft),
      field("hop_length", "speech speech_seq2seq", &M::hop_length),
      field("n_mels", "speech speech_seq2seq", &M::n_mels),
      field("subsampling_channels", "speech speech_seq2seq", &M::subsampling_channels),
      field("conformer_conv", "speech speech_seq2seq", &M::conformer_conv),
      field("conv_kernel_size", "speech speech_seq2seq", &M::conv_kernel_size),
      field("blank_id", "speech speech_seq2seq", &M::blank_id),
      field("num_decoder_layers", "speech_seq2seq", &M::num_decoder_layers),
  };
  return fields;
}

void require_range(const std::string& key, double value, double lo, double hi) {
  if (!(value >= lo && value <= hi)) {
    std::ostringstream s;
    s << "must be in [" << lo << ", " << hi << "], got " << value;
    fail(key, s.str());
  }
}

AttentionConfig attention_from_json(const json& object, const std::string& path) {
  if (!object.is_object()) fail(path, "must be an object with a \"kind\", got " + object.dump());
  AttentionConfig config;
  if (object.contains("kind")) config.kind = read_enum<AttentionKind>(object.at("kind"), path + ".kind");
  // Shaw clips at +-16 by default, T5's buckets reach 128.
  if (config.kind == AttentionKind::shaw && !object.contains("max_distance")) config.max_distance = 16;
  for (const auto& item : object.items()) {
    const std::string& key = item.key();
    const json& value = item.value();
    if (key == "kind") continue;
    const std::string key_path = path + "." + key;
    auto it = std::find_if(attention_fields().begin(), attention_fields().end(),
                           [&](const auto& f) { return f.key == key; });
    if (it == attention_fields().end()) fail(key_path, "is not an attention parameter");
    if (!it->applies_to(name(config.kind)))
      fail(key_path, "does not apply to attention kind \"" + std::string(name(config.kind)) + "\"");
    it->read(config, value, key_path);
  }
  return config;
}

json attention_to_json(const AttentionConfig& config) {
  json out = json::object();
  out["kind"] = name(config.kind);
  for (const auto& f : attention_fields())
    if (f.applies_to(name(config.kind))) out[f.key] = f.write(config);
  return out;
}

bool same_attention_everywhere(const std::vector<AttentionConfig>& stack) {
  return std::all_of(stack.begin(), stack.end(),
                     [&](const auto& a) { return attention_to_json(a) == attention_to_json(stack.front()); });
}

// A stack's attention: one JSON object for every layer, or a list with one per layer.
std::vector<AttentionConfig> stack_from_json(const json& value, size_t layers, const std::string& key) {
  std::vector<AttentionConfig> out;
  if (value.is_array()) {
    for (size_t i = 0; i < value.size(); ++i)
      out.push_back(attention_from_json(value[i], key + "[" + std::to_string(i) + "]"));
  } else {
    out.assign(layers, attention_from_json(value, key));
  }
  return out;
}

json stack_to_json(const std::vector<AttentionConfig>& stack) {
  if (same_attention_everywhere(stack) && !stack.empty()) return attention_to_json(stack.front());
  json out = json::array();
  for (const auto& a : stack) out.push_back(attention_to_json(a));
  return out;
}

// `causal`: the layer attends causally (a GPT, a speech_seq2seq decoder).
void validate_attention(const AttentionConfig& a, const ModelConfig& m, const std::string& path,
                        bool causal) {
  switch (a.kind) {
    case AttentionKind::dense:
    case AttentionKind::alibi:
      break;
    case AttentionKind::t5:
      require_range(path + ".num_buckets", double(a.num_buckets), 2, 4096);
      require_range(path + ".max_distance", double(a.max_distance), 1, 1 << 20);
      break;
    case AttentionKind::shaw:
      require_range(path + ".max_distance", double(a.max_distance), 1, 4096);
      break;
    case AttentionKind::rotary: {
      if (!(a.rotary_base > 1.0)) fail(path + ".rotary_base", "must be greater than 1");
      const int64_t dim = a.rotary_dim == 0 ? m.head_dim() : a.rotary_dim;
      if (dim <= 0 || dim > m.head_dim() || dim % 2 != 0)
        fail(path + ".rotary_dim",
             "must be even and at most the head dimension " + std::to_string(m.head_dim()));
      break;
    }
    case AttentionKind::longformer:
      if (causal)
        fail(path + ".kind",
             "\"longformer\" attention is bidirectional and cannot be used in a causal layer (gpt, a "
             "decoder)");
      for (int64_t t : a.global_tokens) require_range(path + ".global_tokens", double(t), 0, 1 << 24);
      [[fallthrough]];
    case AttentionKind::local:
      require_range(path + ".window", double(a.window), 0, 1 << 24);
      break;
    case AttentionKind::block_sparse:
      require_range(path + ".block_size", double(a.block_size), 1, 1 << 16);
      require_range(path + ".layout_window", double(a.layout_window), 0, 1 << 16);
      require_range(path + ".num_global", double(a.num_global), 0, 1 << 16);
      require_range(path + ".num_random", double(a.num_random), 0, 1 << 16);
      require_range(path + ".stride", double(a.stride), 1, 1 << 16);
      require_range(path + ".num_summary", double(a.num_summary), 1, double(a.stride));
      break;
    case AttentionKind::linformer:
      require_range(path + ".projected_length", double(a.projected_length), 1, 1 << 16);
      require_range(path + ".chunk_size", double(a.chunk_size), 1, 1 << 16);
      break;
    case AttentionKind::lsh:
      require_range(path + ".bucket_size", double(a.bucket_size), 1, 1 << 16);
      require_range(path + ".n_hashes", double(a.n_hashes), 1, 64);
      if (m.kv_heads() != m.num_heads)
        fail(path + ".kind", "\"lsh\" shares queries and keys and needs num_kv_heads == num_heads");
      break;
    case AttentionKind::linear:
      break;
  }
}

}  // namespace

ModelConfig default_config(ModelType model_type) {
  ModelConfig c;
  c.model_type = model_type;
  switch (model_type) {
    case ModelType::bert:
      c.norm = Norm::post;
      c.layer_norm_eps = 1e-12;
      c.vocab_size = 256;
      break;
    case ModelType::gpt:
      c.activation = Activation::gelu_tanh;
      c.attention_dropout = 0.1;
      break;
    case ModelType::vit:
      c.layer_norm_eps = 1e-12;
      c.num_labels = 10;
      c.position_embedding = PositionEmbedding::learned;
      break;
    case ModelType::speech:
    case ModelType::speech_seq2seq:
      c.position_embedding = PositionEmbedding::sinusoidal;
      c.vocab_size = 32;
      c.max_position_embeddings = 4096;
      break;
  }
  if (model_type == ModelType::speech_seq2seq) c.bos_token_id = c.eos_token_id = c.blank_id;
  return c;
}

namespace {
// One attention spec per layer of a stack (`key`: "attention", "decoder_attention").
void validate_stack(const std::vector<AttentionConfig>& stack, int64_t layers, const std::string& key,
                    const ModelConfig& c, bool causal) {
  if (int64_t(stack.size()) != layers)
    fail(key, "has " + std::to_string(stack.size()) + " entries for " + std::to_string(layers) +
                  " layers (give one object for all layers or a list with one per layer)");
  // One spec for every layer was one JSON object: name it as such.
  const bool uniform = same_attention_everywhere(stack);
  for (size_t i = 0; i < stack.size(); ++i)
    validate_attention(stack[i], c, uniform ? key : key + "[" + std::to_string(i) + "]", causal);
}
}  // namespace

void validate(const ModelConfig& c) {
  const bool text = c.model_type == ModelType::bert || c.model_type == ModelType::gpt;
  require_range("hidden_size", double(c.hidden_size), 1, 1 << 16);
  require_range("num_layers", double(c.num_layers), 1, 1024);
  require_range("num_heads", double(c.num_heads), 1, 1024);
  if (c.hidden_size % c.num_heads != 0)
    fail("num_heads", "must divide hidden_size " + std::to_string(c.hidden_size));
  require_range("num_kv_heads", double(c.num_kv_heads), 0, double(c.num_heads));
  if (c.num_heads % c.kv_heads() != 0)
    fail("num_kv_heads", "must divide num_heads " + std::to_string(c.num_heads));
  require_range("intermediate_size", double(c.intermediate_size), 0, 1 << 18);
  require_range("max_position_embeddings", double(c.max_position_embeddings), 1, 1 << 22);
  require_range("vocab_size", double(c.vocab_size), 1, 1 << 24);
  require_range("dropout", c.dropout, 0.0, 0.99);
  require_range("attention_dropout", c.attention_dropout, 0.0, 0.99);
  require_range("layer_norm_eps", c.layer_norm_eps, 1e-30, 1.0);
  if (text) require_range("pad_token_id", double(c.pad_token_id), 0, double(c.vocab_size - 1));
  if (c.model_type == ModelType::bert) {
    require_range("type_vocab_size", double(c.type_vocab_size), 1, 1024);
    require_range("num_labels", double(c.num_labels), 0, 1 << 16);
  }
  if (c.model_type == ModelType::gpt) {
    require_range("bos_token_id", double(c.bos_token_id), -1, double(c.vocab_size - 1));
    require_range("eos_token_id", double(c.eos_token_id), -1, double(c.vocab_size - 1));
  }
  if (c.model_type == ModelType::vit) {
    require_range("num_labels", double(c.num_labels), 1, 1 << 16);
    require_range("num_channels", double(c.num_channels), 1, 64);
    require_range("patch_size", double(c.patch_size), 1, 1 << 12);
    require_range("image_size", double(c.image_size), double(c.patch_size), 1 << 14);
    if (c.image_size % c.patch_size != 0)
      fail("patch_size", "must divide image_size " + std::to_string(c.image_size));
  }
  const bool speech = c.model_type == ModelType::speech || c.model_type == ModelType::speech_seq2seq;
  if (speech) {
    require_range("sample_rate", double(c.sample_rate), 1000, 192000);
    require_range("n_fft", double(c.n_fft), 16, 1 << 14);
    require_range("hop_length", double(c.hop_length), 1, double(c.n_fft));
    require_range("n_mels", double(c.n_mels), 8, double(c.n_fft / 2 + 1));
    require_range("subsampling_channels", double(c.subsampling_channels), 1, 4096);
    require_range("conv_kernel_size", double(c.conv_kernel_size), 1, 255);
    if (c.conv_kernel_size % 2 == 0) fail("conv_kernel_size", "must be odd");
    require_range("blank_id", double(c.blank_id), 0, double(c.vocab_size - 1));
  }
  if (c.position_embedding == PositionEmbedding::rotary && c.head_dim() % 2 != 0)
    fail("position_embedding",
         "\"rotary\" needs an even head dimension, got " + std::to_string(c.head_dim()));
  validate_stack(c.attention, c.num_layers, "attention", c, c.model_type == ModelType::gpt);
  if (c.model_type == ModelType::speech_seq2seq) {
    require_range("num_decoder_layers", double(c.num_decoder_layers), 1, 1024);
    require_range("bos_token_id", double(c.bos_token_id), 0, double(c.vocab_size - 1));
    require_range("eos_token_id", double(c.eos_token_id), 0, double(c.vocab_size - 1));
    validate_stack(c.decoder_attention, c.num_decoder_layers, "decoder_attention", c, /*causal=*/true);
    // Relative and positional kinds need queries and keys on one axis, and
    // LSH shares them: none applies between characters and frames.
    const auto cross = c.cross_attention.kind;
    if (cross != AttentionKind::dense && cross != AttentionKind::linear)
      fail("cross_attention.kind",
           "must be \"dense\" or \"linear\" (characters and frames share no "
           "positions for the other kinds), got \"" +
               std::string(name(cross)) + "\"");
    validate_attention(c.cross_attention, c, "cross_attention", /*causal=*/false);
  }
}

ModelConfig config_from_json(const std::string& text) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {  // parse errors, and numbers beyond double (out_of_range)
    throw std::invalid_argument(std::string("config: malformed JSON: ") + e.what());
  }
  if (!root.is_object()) throw std::invalid_argument("config: the top level must be a JSON object");
  if (!root.contains("model_type")) fail("model_type", "is missing (one of " + choices<ModelType>() + ")");
  ModelConfig config = default_config(read_enum<ModelType>(root.at("model_type"), "model_type"));
  const bool seq2seq = config.model_type == ModelType::speech_seq2seq;
  json attention = json::object(), decoder_attention = json::object();
  for (const auto& item : root.items()) {
    const std::string& key = item.key();
    const json& value = item.value();
    if (key == "model_type") continue;
    if (key == "attention") {
      attention = value;
      continue;
    }
    if ((key == "decoder_attention" || key == "cross_attention") && !seq2seq)
      fail(key, "does not apply to model_type \"" + std::string(name(config.model_type)) + "\"");
    if (key == "decoder_attention") {
      decoder_attention = value;
      continue;
    }
    if (key == "cross_attention") {
      config.cross_attention = attention_from_json(value, key);
      continue;
    }
    auto it = std::find_if(model_fields().begin(), model_fields().end(),
                           [&](const auto& f) { return f.key == key; });
    if (it == model_fields().end()) fail(key, "is not a config key");
    if (!it->applies_to(name(config.model_type)))
      fail(key, "does not apply to model_type \"" + std::string(name(config.model_type)) + "\"");
    it->read(config, value, key);
  }
  require_range("num_layers", double(config.num_layers), 1, 1024);
  config.attention = stack_from_json(attention, size_t(config.num_layers), "attention");
  if (seq2seq) {
    // The blank also starts and ends transcripts unless the config says otherwise.
    if (!root.contains("bos_token_id")) config.bos_token_id = config.blank_id;
    if (!root.contains("eos_token_id")) config.eos_token_id = config.blank_id;
    require_range("num_decoder_layers", double(config.num_decoder_layers), 1, 1024);
    config.decoder_attention =
        stack_from_json(decoder_attention, size_t(config.num_decoder_layers), "decoder_attention");
  }
  validate(config);
  return config;
}

ModelConfig config_from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument("config: cannot open " + path);
  std::ostringstream text;
  text << in.rdbuf();
  try {
    return config_from_json(text.str());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
}

std::string config_to_json(const ModelConfig& config) {
  json out = json::object();
  out["model_type"] = name(config.model_type);
  for (const auto& f : model_fields())
    if (f.applies_to(name(config.model_type))) out[f.key] = f.write(config);
  out["attention"] = stack_to_json(config.attention);
  if (config.model_type == ModelType::speech_seq2seq) {
    out["decoder_attention"] = stack_to_json(config.decoder_attention);
    out["cross_attention"] = attention_to_json(config.cross_attention);
  }
  return out.dump(2) + "\n";
}

}  // namespace attnzoo
