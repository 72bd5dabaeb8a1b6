// Speech: log-mel features, convolutional subsampling, the encoder, CTC.
#include "attnzoo/models/speech.h"

#include <cmath>

namespace attnzoo::models {

SpeechImpl::SpeechImpl(const ModelConfig& config) : ModelBase(config) {
  TORCH_CHECK(config.model_type == ModelType::speech, "Speech: config.model_type is \"", config.model_type,
              "\"");
  const auto& c = config_;
  const int64_t ch = c.subsampling_channels;
  const int64_t f1 = (c.n_mels - 3) / 2 + 1, f2 = (f1 - 3) / 2 + 1;
  subsample_conv1 =
      register_module("subsample_conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, ch, 3).stride(2)));
  subsample_conv2 =
      register_module("subsample_conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(ch, ch, 3).stride(2)));
  subsample_proj = register_module("subsample_proj", torch::nn::Linear(ch * f2, c.hidden_size));
  dropout = register_module("dropout", nn::Dropout(c.dropout));
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
  switch (c.position_embedding) {
    case PositionEmbedding::sinusoidal:
      x = x + nn::sinusoidal_positions(T, c.hidden_size, 0, x.options());
      break;
    case PositionEmbedding::learned:
      TORCH_CHECK(false, "speech: learned positions are not supported; use sinusoidal or none");
    case PositionEmbedding::none:
      break;
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

}  // namespace attnzoo::models
