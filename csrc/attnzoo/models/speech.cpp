// Speech: log-mel features, convolutional subsampling, the encoder, CTC;
// the encoder-decoder's decoder, greedy transcription and beam search.
#include "attnzoo/models/speech.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace attnzoo::models {

SpeechImpl::SpeechImpl(const ModelConfig& config, ModelType model_type) : ModelBase(config) {
  TORCH_CHECK(config.model_type == model_type, model_type == ModelType::speech ? "Speech" : "SpeechSeq2Seq",
              ": config.model_type is \"", config.model_type, "\"");
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
    layers->push_back(
        nn::TransformerBlock(c, c.attention[i], /*cross_attention=*/std::nullopt, c.conformer_conv));
  final_norm = register_module("final_norm", nn::layer_norm(c));
  ctc_head = register_module("ctc_head", torch::nn::Linear(c.hidden_size, c.vocab_size));
  if (c.model_type == ModelType::speech) init_weights();  // the encoder-decoder does once it is complete
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
  const auto on_input = waveforms.options().dtype(at::kLong);  // lengths live where the audio does
  at::Tensor samples = at::full({B}, S, on_input);
  if (lengths) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && !at::isFloatingType(lengths->scalar_type()),
                "speech: lengths must be (batch,) integers, got ", lengths->sizes(), " ",
                lengths->scalar_type());
    samples = lengths->to(waveforms.device(), at::kLong);
    TORCH_CHECK(samples.min().item<int64_t>() >= 1 && samples.max().item<int64_t>() <= S,
                "speech: lengths must lie in [1, ", S, "]");
  }
  const auto dtype = subsample_proj->weight.scalar_type();
  auto x = waveforms.to(dtype);
  auto spectrum =
      at::stft(x, c.n_fft, c.hop_length, c.n_fft, at::hann_window(c.n_fft, x.options()), /*center=*/true,
               "reflect", /*normalized=*/false, /*onesided=*/true, /*return_complex=*/true);
  auto power = at::real(spectrum * spectrum.conj());  // (B, bins, frames)
  auto mel = at::matmul(mel_filterbank(dtype).to(x.device()), power);
  auto feats = at::log(mel + 1e-6).transpose(1, 2);  // (B, frames, n_mels)
  // Per-utterance mean and variance normalisation, so the model sees the same
  // scale whatever the recording level. The statistics come from the frames
  // whose window lies wholly inside the utterance, so padding after it cannot
  // change them; padding frames become zeros.
  auto frames = at::div(samples, c.hop_length, "floor") + 1;
  auto inside = at::clamp_min(at::div(samples - c.n_fft / 2, c.hop_length, "floor") + 1, 1);
  auto positions = at::arange(feats.size(1), on_input).unsqueeze(0);
  auto in_stats = (positions < inside.unsqueeze(1)).unsqueeze(-1).to(dtype);
  auto count = inside.to(dtype).view({B, 1, 1});
  auto mean = (feats * in_stats).sum(1, true) / count;
  auto var = ((feats - mean).square() * in_stats).sum(1, true) / count;
  auto valid = (positions < frames.unsqueeze(1)).unsqueeze(-1).to(dtype);
  return {(feats - mean) * at::rsqrt(var + 1e-5) * valid, frames};
}

std::tuple<at::Tensor, at::Tensor> SpeechImpl::forward(const at::Tensor& waveforms,
                                                       const std::optional<at::Tensor>& lengths) {
  auto [h, out_lengths] = encode(waveforms, lengths);
  return {at::log_softmax(ctc_head(h), -1), out_lengths};
}

std::tuple<at::Tensor, at::Tensor> SpeechImpl::encode(const at::Tensor& waveforms,
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
      TORCH_CHECK(false, "speech: learned positions are not supported; use sinusoidal, rotary or none");
    case PositionEmbedding::none:
    case PositionEmbedding::rotary:  // the attention layers rotate their queries and keys
      break;
  }
  nn::AttentionInputs inputs;
  inputs.key_padding_mask = at::arange(T, out_lengths.options()).unsqueeze(0) < out_lengths.unsqueeze(1);
  return {final_norm(run_layers(dropout(x), inputs)), out_lengths};
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

namespace attnzoo::models {

SpeechSeq2SeqImpl::SpeechSeq2SeqImpl(const ModelConfig& config)
    : SpeechImpl(config, ModelType::speech_seq2seq) {
  const auto& c = config_;
  decoder_embedding = register_module("decoder_embedding", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  decoder_layers = register_module("decoder_layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_decoder_layers; ++i)
    decoder_layers->push_back(nn::TransformerBlock(c, c.decoder_attention[i], c.cross_attention));
  decoder_norm = register_module("decoder_norm", nn::layer_norm(c));
  init_weights();
}

bool SpeechSeq2SeqImpl::supports_kv_cache() const {
  for (size_t i = 0; i < decoder_layers->size(); ++i)
    if (!decoder_layers->ptr<nn::TransformerBlockImpl>(i)->attn->supports_kv_cache()) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> SpeechSeq2SeqImpl::forward(
    const at::Tensor& waveforms, const std::optional<at::Tensor>& lengths,
    const at::Tensor& decoder_input_ids) {
  auto [encoded, frames] = encode(waveforms, lengths);
  auto logits = decode(decoder_input_ids, encoded, frames);
  return {logits, at::log_softmax(ctc_head(encoded), -1), frames};
}

at::Tensor SpeechSeq2SeqImpl::decode(const at::Tensor& ids, const at::Tensor& encoded,
                                     const at::Tensor& frames, nn::KVCache* cache) {
  const auto& c = config_;
  const auto device = decoder_embedding->weight.device();
  auto tokens = check_ids(ids, "decoder_input_ids", c.vocab_size, device);
  const int64_t B = tokens.size(0);
  TORCH_CHECK(encoded.dim() == 3 && encoded.size(0) == B && encoded.size(2) == c.hidden_size,
              "speech_seq2seq: encoded must have shape (", B, ", frames, ", c.hidden_size, "), got ",
              encoded.sizes());
  TORCH_CHECK(frames.dim() == 1 && frames.size(0) == B && !at::isFloatingType(frames.scalar_type()),
              "speech_seq2seq: frames must be (", B, ",) integers, got ", frames.sizes(), " ",
              frames.scalar_type());
  const int64_t past = cache && !cache->empty() ? cache->front().length() : 0;
  if (past > 0)
    TORCH_CHECK(cache->front().k.size(0) == B, "speech_seq2seq: decoder_input_ids has batch ", B,
                " but the KV cache holds batch ", cache->front().k.size(0), "; use a fresh cache per batch");
  torch::nn::Embedding no_learned{nullptr};  // speech models take sinusoidal or rotary positions, or none
  auto h = add_positions(decoder_embedding(tokens), no_learned, past);
  nn::AttentionInputs inputs;
  inputs.causal = true;
  inputs.context = &encoded;
  inputs.context_padding_mask =
      at::arange(encoded.size(1), frames.options().dtype(at::kLong)).unsqueeze(0) < frames.unsqueeze(1);
  h = decoder_norm(run_stack(decoder_layers, layers->size(), dropout(h), inputs, cache));
  return at::linear(h, decoder_embedding->weight);  // tied with the decoder's embedding
}

std::vector<std::vector<int64_t>> SpeechSeq2SeqImpl::transcribe(const at::Tensor& waveforms,
                                                                const std::optional<at::Tensor>& lengths,
                                                                const TranscribeOptions& options) {
  TORCH_CHECK(options.beam_size >= 1, "transcribe: beam_size must be >= 1, got ", options.beam_size);
  TORCH_CHECK(options.max_length >= 0, "transcribe: max_length must be >= 0 (0 = the frame count), got ",
              options.max_length);
  TORCH_CHECK(std::isfinite(options.length_penalty), "transcribe: length_penalty must be finite, got ",
              options.length_penalty);
  TORCH_CHECK(options.ctc_weight >= 0 && options.ctc_weight < 1,
              "transcribe: ctc_weight must be in [0, 1), got ", options.ctc_weight);
  torch::NoGradGuard no_grad;
  const bool was_training = is_training();
  eval();
  auto [encoded, frames] = encode(waveforms, lengths);
  const int64_t max_length = options.max_length > 0 ? options.max_length : encoded.size(1);
  const bool cached = options.use_cache && supports_kv_cache();
  auto out = options.beam_size == 1 && options.ctc_weight == 0
                 ? greedy(encoded, frames, max_length, cached)
                 : beam_search(encoded, frames, options, max_length, cached);
  train(was_training);
  return out;
}

std::vector<std::vector<int64_t>> SpeechSeq2SeqImpl::greedy(const at::Tensor& encoded,
                                                            const at::Tensor& frames, int64_t max_length,
                                                            bool cached) {
  const auto& c = config_;
  const int64_t B = encoded.size(0);
  nn::KVCache cache;
  at::Tensor tokens = at::full({B, 1}, c.bos_token_id, at::kLong), step_tokens = tokens;
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(B));
  std::vector<bool> done(static_cast<size_t>(B), false);
  int64_t finished = 0;
  for (int64_t step = 0; step < max_length && finished < B; ++step) {
    // With a cache only the newest token goes in; without one, the whole prefix.
    auto logits = cached ? decode(step_tokens, encoded, frames, &cache) : decode(tokens, encoded, frames);
    auto next = logits.select(1, -1).argmax(-1).to(at::kCPU).contiguous();
    const int64_t* best = next.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      if (done[size_t(b)]) continue;
      if (best[b] == c.eos_token_id) {
        done[size_t(b)] = true;
        ++finished;
      } else {
        out[size_t(b)].push_back(best[b]);
      }
    }
    step_tokens = next.unsqueeze(1);
    tokens = at::cat({tokens, step_tokens}, 1);
  }
  return out;
}

namespace {

double log_add(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  return std::max(a, b) + std::log1p(std::exp(-std::abs(a - b)));
}

// CTC prefix scores of one utterance (Watanabe et al. 2017, "Hybrid
// CTC/attention architecture for end-to-end speech recognition", Algorithm
// 2): the log-probability that the CTC head's output begins with a prefix,
// summed over its alignments, extended one label at a time in O(frames).
class CtcPrefixScorer {
 public:
  // Per frame t, the log-probability that the prefix has been emitted by
  // frame t with the last frame a label (n) or a blank (b).
  struct State {
    std::vector<double> n, b;
  };

  // log_probs (T, V) of the utterance, its first `frames` frames valid.
  CtcPrefixScorer(const at::Tensor& log_probs, int64_t frames, int64_t blank, int64_t eos)
      : x_(log_probs.narrow(0, 0, frames).to(at::kDouble).contiguous()),
        T_(frames),
        V_(log_probs.size(1)),
        blank_(blank),
        eos_(eos) {}

  State empty() const {
    State s{std::vector<double>(size_t(T_), kNegInf), std::vector<double>(size_t(T_))};
    double sum = 0.0;
    for (int64_t t = 0; t < T_; ++t) s.b[size_t(t)] = sum += x(t, blank_);
    return s;
  }

  // The prefix score of g + c for every label c (for the end token: the
  // probability of exactly g; the blank, when it is not the end token, -inf).
  // last: g's last label, -1 when g is empty.
  std::vector<double> scores(const State& g, int64_t last) const {
    std::vector<double> out(size_t(V_), kNegInf);
    for (int64_t c = 0; c < V_; ++c) {
      if (c == eos_) {
        out[size_t(c)] = log_add(g.n.back(), g.b.back());
        continue;
      }
      if (c == blank_) continue;
      double psi = last < 0 ? x(0, c) : kNegInf;
      for (int64_t t = 1; t < T_; ++t) psi = log_add(psi, phi(g, last, c, t - 1) + x(t, c));
      out[size_t(c)] = psi;
    }
    return out;
  }

  State extend(const State& g, int64_t last, int64_t c) const {
    State h{std::vector<double>(size_t(T_)), std::vector<double>(size_t(T_))};
    h.n[0] = last < 0 ? x(0, c) : kNegInf;
    h.b[0] = kNegInf;
    for (int64_t t = 1; t < T_; ++t) {
      const size_t i = size_t(t);
      h.n[i] = log_add(h.n[i - 1], phi(g, last, c, t - 1)) + x(t, c);
      h.b[i] = log_add(h.b[i - 1], h.n[i - 1]) + x(t, blank_);
    }
    return h;
  }

 private:
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  double x(int64_t t, int64_t c) const { return x_.data_ptr<double>()[t * V_ + c]; }
  // Where c may start after frame t: a repeated label needs a blank between.
  static double phi(const State& g, int64_t last, int64_t c, int64_t t) {
    return c == last ? g.b[size_t(t)] : log_add(g.n[size_t(t)], g.b[size_t(t)]);
  }

  at::Tensor x_;
  int64_t T_, V_, blank_, eos_;
};

}  // namespace

std::vector<std::vector<int64_t>> SpeechSeq2SeqImpl::beam_search(const at::Tensor& encoded,
                                                                 const at::Tensor& frames,
                                                                 const TranscribeOptions& options,
                                                                 int64_t max_length, bool cached) {
  // All utterances' beams decode as one batch of B * K rows, utterance b's in
  // rows b*K .. b*K+K-1. Every step extends each live beam by every label,
  // keeps the K best continuations that do not end, and sets aside those that
  // end. A continuation's score is (1 - w) * its decoder log-probability +
  // w * its CTC prefix score (w = ctc_weight; joint CTC/attention decoding);
  // ended transcripts rank by score / length^penalty (the end token
  // counted), and the best is returned. Scores never rise as a transcript
  // grows (both are log-probabilities of ever narrower sets), so a live beam
  // can at best end with its score now over the most favourable length; an
  // utterance is done, and its rows idle, once no live beam could outrank
  // its best ended transcript. (Stopping at the first K ended transcripts
  // instead returns short poor ones that ended early while the best was
  // still growing: it made beam search worse than greedy on speech-digits.)
  const auto& c = config_;
  const int64_t B = encoded.size(0), K = options.beam_size;
  const double w = options.ctc_weight, neg_inf = -std::numeric_limits<double>::infinity();
  auto rows_encoded = encoded.repeat_interleave(K, 0);
  auto rows_frames = frames.repeat_interleave(K, 0);
  std::vector<CtcPrefixScorer> ctc;
  if (w > 0) {
    auto log_probs = at::log_softmax(ctc_head(encoded).to(at::kDouble), -1).to(at::kCPU);
    auto lengths = frames.to(at::kCPU, at::kLong);
    for (int64_t b = 0; b < B; ++b)
      ctc.emplace_back(log_probs[b], lengths[b].item<int64_t>(), c.blank_id, c.eos_token_id);
  }
  nn::KVCache cache;
  std::vector<std::vector<int64_t>> beams(size_t(B * K));  // each row's labels so far
  std::vector<double> decoder_scores(size_t(B * K), neg_inf), ctc_scores(size_t(B * K), 0.0);
  std::vector<CtcPrefixScorer::State> ctc_states(size_t(B * K));
  for (int64_t b = 0; b < B; ++b) {
    decoder_scores[size_t(b * K)] = 0.0;  // one live beam to start from
    if (w > 0) ctc_states[size_t(b * K)] = ctc[size_t(b)].empty();
  }
  struct Ended {
    double rank;
    std::vector<int64_t> labels;
  };
  std::vector<std::optional<Ended>> best(static_cast<size_t>(B));  // each utterance's best ended transcript
  std::vector<bool> done(static_cast<size_t>(B), false);
  const double penalty = options.length_penalty;
  auto rank = [&](double score, size_t length) { return score / std::pow(double(length), penalty); };
  auto offer = [&](int64_t b, double rank_, const std::vector<int64_t>& labels) {
    auto& e = best[size_t(b)];
    if (!e || rank_ > e->rank) e = Ended{rank_, labels};
  };
  // The best rank a live beam of `length` labels and `score` could still end
  // with: at most max_length labels + the end token.
  auto best_possible = [&](double score, size_t length) {
    const size_t final_length = penalty > 0 ? size_t(max_length) + 1 : std::max<size_t>(length, 1);
    return rank(score, final_length);
  };
  auto last_label = [&](size_t row) { return beams[row].empty() ? int64_t(-1) : beams[row].back(); };
  at::Tensor step_tokens = at::full({B * K, 1}, c.bos_token_id, at::kLong);
  at::Tensor tokens = step_tokens;
  for (int64_t step = 0; step < max_length; ++step) {
    auto logits = cached ? decode(step_tokens, rows_encoded, rows_frames, &cache)
                         : decode(tokens, rows_encoded, rows_frames);
    auto log_probs = at::log_softmax(logits.select(1, -1).to(at::kDouble), -1).to(at::kCPU);
    const int64_t V = log_probs.size(1);
    auto decoder_total = log_probs + at::tensor(decoder_scores, at::kDouble).unsqueeze(1);  // (B*K, V)
    at::Tensor ctc_total;  // (B*K, V): the prefix score of each continuation
    if (w > 0) {
      ctc_total = at::full({B * K, V}, neg_inf, at::kDouble);
      for (int64_t r = 0; r < B * K; ++r)
        if (decoder_scores[size_t(r)] != neg_inf) {
          auto row = ctc[size_t(r / K)].scores(ctc_states[size_t(r)], last_label(size_t(r)));
          ctc_total[r].copy_(at::tensor(row, at::kDouble));
        }
    }
    auto joint = w > 0 ? (1 - w) * decoder_total + w * ctc_total : decoder_total;
    auto [top_scores, top_index] = joint.view({B, K * V}).topk(std::min(2 * K, K * V), 1);
    const auto best_scores = top_scores.accessor<double, 2>();
    const auto best_index = top_index.accessor<int64_t, 2>();
    const auto decoder_at = decoder_total.accessor<double, 2>();
    std::vector<int64_t> source(size_t(B * K)), next(size_t(B * K), c.eos_token_id);
    std::vector<double> next_decoder(size_t(B * K), neg_inf), next_ctc(size_t(B * K), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < K; ++j) source[size_t(b * K + j)] = b * K + j;  // idle rows stay put
      if (done[size_t(b)]) continue;
      int64_t kept = 0;
      for (int64_t j = 0; j < top_scores.size(1); ++j) {  // an end past the K-th kept still counts
        const double score = best_scores[b][j];
        if (score == neg_inf) break;
        const int64_t index = best_index[b][j];
        const int64_t row = b * K + index / V, label = index % V;
        if (label == c.eos_token_id) {
          offer(b, rank(score, beams[size_t(row)].size() + 1), beams[size_t(row)]);
          continue;
        }
        if (kept == K) continue;
        const size_t slot = size_t(b * K + kept);
        source[slot] = row;
        next[slot] = label;
        next_decoder[slot] = decoder_at[row][label];
        if (w > 0) next_ctc[slot] = ctc_total[row][label].item<double>();
        ++kept;
      }
      const auto& top = best[size_t(b)];
      bool could_win = !top;  // with nothing ended yet, any live beam could
      for (int64_t j = 0; j < kept && !could_win; ++j) {
        const size_t slot = size_t(b * K + j);
        const double live = (1 - w) * next_decoder[slot] + w * next_ctc[slot];
        could_win = best_possible(live, beams[size_t(source[slot])].size() + 1) > top->rank;
      }
      if (kept == 0 || !could_win) done[size_t(b)] = true;
    }
    std::vector<std::vector<int64_t>> reordered(size_t(B * K));
    std::vector<CtcPrefixScorer::State> next_states(size_t(B * K));
    for (size_t r = 0; r < reordered.size(); ++r) {
      const size_t from = size_t(source[r]);
      reordered[r] = beams[from];
      if (next_decoder[r] == neg_inf) continue;
      if (w > 0) next_states[r] = ctc[r / size_t(K)].extend(ctc_states[from], last_label(from), next[r]);
      reordered[r].push_back(next[r]);
    }
    beams = std::move(reordered);
    ctc_states = std::move(next_states);
    decoder_scores = next_decoder;
    ctc_scores = next_ctc;
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    auto rows = at::tensor(source, at::kLong);
    step_tokens = at::tensor(next, at::kLong).unsqueeze(1);
    if (cached) {
      for (auto& layer : cache) layer.select_rows(rows);
    } else {
      tokens = at::cat({tokens.index_select(0, rows), step_tokens}, 1);
    }
  }
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    if (!best[size_t(b)])  // max_length reached, nothing ended: the live beams compete as they stand
      for (int64_t j = 0; j < K; ++j) {
        const size_t r = size_t(b * K + j);
        if (decoder_scores[r] != neg_inf)
          offer(b, rank((1 - w) * decoder_scores[r] + w * ctc_scores[r], beams[r].size()), beams[r]);
      }
    if (best[size_t(b)]) out[size_t(b)] = best[size_t(b)]->labels;
  }
  return out;
}

}  // namespace attnzoo::models
