#pragma once
// Speech: a log-mel front end in C++, two stride-2 convolutions, an encoder
// (optionally conformer-style), a CTC head and greedy CTC decoding; and the
// encoder-decoder (speech_seq2seq): the same encoder and CTC head under a
// causal character decoder with cross-attention, greedy and beam-search
// transcription with a KV cache.
#include <optional>
#include <tuple>
#include <vector>

#include "attnzoo/models/model_base.h"

namespace attnzoo::models {

class SpeechImpl : public ModelBase {
 public:
  explicit SpeechImpl(const ModelConfig& config) : SpeechImpl(config, ModelType::speech) {}
  // waveforms (B, samples) float at sample_rate, lengths (B,) samples (default:
  // all) -> (CTC log-probabilities (B, T, vocab), frame lengths (B,)).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& waveforms,
                                             const std::optional<at::Tensor>& lengths = std::nullopt);
  // The encoder's output (B, T, hidden), after its final norm, and the frame
  // lengths (B,).
  std::tuple<at::Tensor, at::Tensor> encode(const at::Tensor& waveforms,
                                            const std::optional<at::Tensor>& lengths = std::nullopt);
  // Log-mel filterbank features (B, frames, n_mels) and frame lengths.
  std::tuple<at::Tensor, at::Tensor> features(const at::Tensor& waveforms,
                                              const std::optional<at::Tensor>& lengths = std::nullopt) const;
  // Greedy CTC: best label per frame, repeats merged, blanks removed.
  std::vector<std::vector<int64_t>> greedy_decode(const at::Tensor& log_probs,
                                                  const at::Tensor& lengths) const;

  torch::nn::Conv2d subsample_conv1{nullptr}, subsample_conv2{nullptr};
  torch::nn::Linear subsample_proj{nullptr}, ctc_head{nullptr};
  torch::nn::LayerNorm final_norm{nullptr};

 private:
  at::Tensor mel_filterbank(at::ScalarType dtype) const;

 protected:
  // The encoder and CTC head of a model of type `model_type` (the
  // encoder-decoder builds on it), weights initialised for a plain speech model.
  SpeechImpl(const ModelConfig& config, ModelType model_type);
  nn::Dropout dropout{nullptr};
};
TORCH_MODULE(Speech);

struct TranscribeOptions {
  int64_t beam_size = 1;        // 1: greedy
  int64_t max_length = 0;       // characters at most, the end token included (0: the encoder's frame count)
  double length_penalty = 1.0;  // beam search ranks finished transcripts by log-probability / length^this
  double ctc_weight = 0.0;      // joint CTC/attention beam search: the CTC prefix score's weight, in [0, 1)
  bool use_cache = true;        // KV cache (decoder kinds without one recompute the prefix)
};

class SpeechSeq2SeqImpl : public SpeechImpl {
 public:
  explicit SpeechSeq2SeqImpl(const ModelConfig& config);
  // Teacher forcing: decoder_input_ids (B, N) (the start token, then the
  // transcript) -> (decoder logits (B, N, vocab), CTC log-probabilities
  // (B, T, vocab), frame lengths (B,)).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& waveforms,
                                                         const std::optional<at::Tensor>& lengths,
                                                         const at::Tensor& decoder_input_ids);
  // Decoder logits (B, N, vocab) of ids (B, N) over the encoder's output
  // (B, T, hidden) with frame lengths (B,). With a cache, ids continue the
  // tokens it holds, and the cross-attention keys and values are projected
  // from encoded only on the first call.
  at::Tensor decode(const at::Tensor& ids, const at::Tensor& encoded, const at::Tensor& frames,
                    nn::KVCache* cache = nullptr);
  // Transcripts (label ids, without the start and end tokens) of a batch:
  // greedy, or beam search with options.beam_size beams per utterance,
  // scored by the decoder alone or jointly with the CTC head (ctc_weight).
  std::vector<std::vector<int64_t>> transcribe(const at::Tensor& waveforms,
                                               const std::optional<at::Tensor>& lengths = std::nullopt,
                                               const TranscribeOptions& options = {});
  bool supports_kv_cache() const;

  torch::nn::Embedding decoder_embedding{nullptr};
  torch::nn::ModuleList decoder_layers{nullptr};
  torch::nn::LayerNorm decoder_norm{nullptr};

 private:
  std::vector<std::vector<int64_t>> greedy(const at::Tensor& encoded, const at::Tensor& frames,
                                           int64_t max_length, bool cached);
  std::vector<std::vector<int64_t>> beam_search(const at::Tensor& encoded, const at::Tensor& frames,
                                                const TranscribeOptions& options, int64_t max_length,
                                                bool cached);
};
TORCH_MODULE(SpeechSeq2Seq);

}  // namespace attnzoo::models
