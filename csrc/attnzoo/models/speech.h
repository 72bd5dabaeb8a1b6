#pragma once
// Speech: a log-mel front end in C++, two stride-2 convolutions, an encoder
// (optionally conformer-style), a CTC head and greedy CTC decoding.
#include <optional>
#include <tuple>
#include <vector>

#include "attnzoo/models/model_base.h"

namespace attnzoo::models {

class SpeechImpl : public ModelBase {
 public:
  explicit SpeechImpl(const ModelConfig& config);
  // waveforms (B, samples) float at sample_rate, lengths (B,) samples (default:
  // all) -> (CTC log-probabilities (B, T, vocab), frame lengths (B,)).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& waveforms,
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
  nn::Dropout dropout{nullptr};
};
TORCH_MODULE(Speech);

}  // namespace attnzoo::models
