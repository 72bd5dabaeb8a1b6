#pragma once
// Model configuration: one struct for every model kind, read from and written
// to HF-style config.json (docs/design.md section 6). Parsing is strict: an unknown
// key, a key that does not apply to the model or attention kind, or a bad value
// is an error that names the key.
#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

namespace attnzoo {

// The words config.json may hold for a choice, as enums: parsed (and an
// unknown word refused, naming the key and the choices) once, when the
// config is read; the code switches on them.
enum class ModelType { bert, gpt, vit, speech, speech_seq2seq };
enum class AttentionKind {
  dense,
  alibi,
  rotary,
  t5,
  shaw,
  local,
  block_sparse,
  linformer,
  lsh,
  linear,
  longformer
};
enum class Activation { gelu, gelu_tanh, relu };
enum class Norm { pre, post };  // LayerNorm before (pre) or after (post) each residual branch
// rotary: no embedding is added; every self-attention layer, whatever its
// kind, rotates its queries and keys by position (RoFormer), with its
// attention config's rotary_base and rotary_dim (defaults 10000, the head dim).
enum class PositionEmbedding { learned, sinusoidal, none, rotary };
enum class BlockLayout { local, bigbird, fixed, strided };
enum class FeatureMap { elu_plus_one, relu };

// Each enum's words in config.json, in the enum's order.
template <typename E>
struct EnumWords;
template <>
struct EnumWords<ModelType> {
  static constexpr std::array<const char*, 5> words = {"bert", "gpt", "vit", "speech", "speech_seq2seq"};
};
template <>
struct EnumWords<AttentionKind> {
  static constexpr std::array<const char*, 11> words = {"dense", "alibi",  "rotary",       "t5",
                                                        "shaw",  "local",  "block_sparse", "linformer",
                                                        "lsh",   "linear", "longformer"};
};
template <>
struct EnumWords<Activation> {
  static constexpr std::array<const char*, 3> words = {"gelu", "gelu_tanh", "relu"};
};
template <>
struct EnumWords<Norm> {
  static constexpr std::array<const char*, 2> words = {"pre", "post"};
};
template <>
struct EnumWords<PositionEmbedding> {
  static constexpr std::array<const char*, 4> words = {"learned", "sinusoidal", "none", "rotary"};
};
template <>
struct EnumWords<BlockLayout> {
  static constexpr std::array<const char*, 4> words = {"local", "bigbird", "fixed", "strided"};
};
template <>
struct EnumWords<FeatureMap> {
  static constexpr std::array<const char*, 2> words = {"elu+1", "relu"};
};

// The config.json word of a value ("gpt", "block_sparse", "elu+1").
template <typename E, typename = decltype(EnumWords<E>::words)>
const char* name(E value) {
  return EnumWords<E>::words[static_cast<size_t>(value)];
}
// The value of a word; nullopt for a word that is not one of the choices.
template <typename E>
std::optional<E> from_name(const std::string& word) {
  for (size_t i = 0; i < EnumWords<E>::words.size(); ++i)
    if (word == EnumWords<E>::words[i]) return static_cast<E>(i);
  return std::nullopt;
}
// Messages print the word.
template <typename E, typename = decltype(EnumWords<E>::words)>
std::ostream& operator<<(std::ostream& out, E value) {
  return out << name(value);
}

// One layer's attention kind and its parameters. Only the fields of the
// chosen kind are read from and written to JSON.
struct AttentionConfig {
  AttentionKind kind = AttentionKind::dense;
  int64_t num_buckets = 32;                   // t5
  int64_t max_distance = 128;                 // t5, shaw (Shaw clips at +-max_distance)
  double rotary_base = 10000.0;               // rotary
  int64_t rotary_dim = 0;                     // rotary; 0 = the head dimension
  int64_t window = 64;                        // local, longformer (tokens each side)
  BlockLayout layout = BlockLayout::bigbird;  // block_sparse
  int64_t block_size = 32;                    // block_sparse
  int64_t layout_window = 1;                  // block_sparse local/bigbird: blocks each side
  int64_t num_global = 1;                     // block_sparse bigbird
  int64_t num_random = 2;                     // block_sparse bigbird
  int64_t stride = 4;                         // block_sparse fixed/strided (blocks)
  int64_t num_summary = 1;                    // block_sparse fixed
  int64_t seed = 0;                           // block_sparse bigbird random blocks
  int64_t projected_length = 64;              // linformer
  bool share_kv_projection = true;            // linformer
  int64_t chunk_size = 64;                    // linformer in causal models: exact attention within a chunk
  int64_t bucket_size = 32;                   // lsh
  int64_t n_hashes = 2;                       // lsh
  FeatureMap feature_map = FeatureMap::elu_plus_one;  // linear
  std::vector<int64_t> global_tokens = {0};           // longformer
};

struct ModelConfig {
  ModelType model_type = ModelType::gpt;
  int64_t vocab_size =
      256;  // bert, gpt, speech (CTC labels incl. blank), speech_seq2seq (also the decoder's)
  int64_t hidden_size = 256;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 0;       // 0 = num_heads (GQA when smaller)
  int64_t intermediate_size = 0;  // 0 = 4 * hidden_size
  int64_t max_position_embeddings = 512;
  double dropout = 0.1;            // embeddings, residual branches, MLP
  double attention_dropout = 0.0;  // on the attention probabilities
  double layer_norm_eps = 1e-5;
  Activation activation = Activation::gelu;
  Norm norm = Norm::pre;
  PositionEmbedding position_embedding = PositionEmbedding::learned;
  bool qkv_bias = true;
  bool fused_qkv = false;                  // one (3C, C) projection instead of three
  bool tie_word_embeddings = true;         // gpt, bert: output layer shares the token embedding
  std::vector<AttentionConfig> attention;  // one per layer (JSON: one object or a list)

  int64_t type_vocab_size = 2;        // bert
  int64_t pad_token_id = 0;           // bert, gpt
  int64_t num_labels = 0;             // bert (classification head when > 0), vit
  int64_t bos_token_id = -1;          // gpt (-1 = none); speech_seq2seq: the decoder's start token
  int64_t eos_token_id = -1;          // gpt (-1 = none); speech_seq2seq: the decoder's end token
  int64_t image_size = 8;             // vit
  int64_t patch_size = 2;             // vit
  int64_t num_channels = 1;           // vit
  int64_t sample_rate = 16000;        // speech
  int64_t n_fft = 400;                // speech
  int64_t hop_length = 160;           // speech
  int64_t n_mels = 80;                // speech
  int64_t subsampling_channels = 64;  // speech
  bool conformer_conv = false;        // speech: a convolution module in every block
  int64_t conv_kernel_size = 15;      // speech
  int64_t blank_id = 0;               // speech

  // speech_seq2seq: a causal text decoder over the speech encoder (the
  // speech fields above; `attention` is the encoder's). Its blocks have
  // self-attention of any causal kind and cross-attention to the encoder.
  int64_t num_decoder_layers = 2;
  std::vector<AttentionConfig> decoder_attention;  // one per decoder layer (JSON: one object or a list)
  AttentionConfig cross_attention;                 // dense or linear: queries and keys share no positions

  int64_t head_dim() const { return hidden_size / num_heads; }
  int64_t kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
  int64_t ffn_size() const { return intermediate_size > 0 ? intermediate_size : 4 * hidden_size; }
};

// The defaults of a model kind (BERT: post-LN, eps 1e-12, exact GELU; GPT:
// pre-LN, tanh GELU; ViT: pre-LN, eps 1e-12; speech: sinusoidal positions;
// speech_seq2seq: as speech, the blank also starting and ending transcripts).
ModelConfig default_config(ModelType model_type);

// Parse config.json text. Throws std::invalid_argument naming the key.
ModelConfig config_from_json(const std::string& text);
ModelConfig config_from_file(const std::string& path);
// The complete config as JSON (every field of the model kind, sorted keys).
std::string config_to_json(const ModelConfig& config);

// Checks value ranges and cross-field rules (head counts divide, kinds that
// apply to the model, ...); throws std::invalid_argument naming the key.
void validate(const ModelConfig& config);

}  // namespace attnzoo
