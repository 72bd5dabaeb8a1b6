// attnzoo-cli: the zoo's checkpoints from C++, without Python.
//
//   attnzoo-cli generate MODEL_DIR (--prompt TEXT | --ids 1,2,3) [--max-new-tokens N]
//                        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--no-cache] [--device D]
//   attnzoo-cli evaluate MODEL_DIR --text FILE [--seq-len N] [--batch-size B] [--max-batches M] [--json OUT]
//                        [--device D]
//   attnzoo-cli transcribe MODEL_DIR FILE.wav... [--beam-size K] [--ctc-weight W] [--max-length N]
//                        [--length-penalty P] [--no-cache] [--json OUT] [--device D]
//
// transcribe takes a speech_seq2seq checkpoint and prints one transcript per
// WAV file (PCM or float, at the model's sample rate), through the
// checkpoint's tokenizer.json labels (label ids without it); greedy unless
// --beam-size > 1, as `model.transcribe` in Python.
//
// generate and evaluate take a GPT checkpoint directory (config.json + model.safetensors, as
// written by `python -m attnzoo pretrain` or save_pretrained in either
// language). Text goes through the checkpoint's byte tokenizer. `evaluate`
// scores next-byte prediction on a text file with the same windows as
// `python -m attnzoo evaluate` (non-overlapping windows of seq_len + 1; with
// --max-batches, evenly spaced ones), so on the KJV split files in the data
// cache it reproduces the Python numbers. Timings are printed with results.
#include <attnzoo/attnzoo.h>
#include <torch/cuda.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

const char* kUsage =
    "usage:\n"
    "  attnzoo-cli generate MODEL_DIR (--prompt TEXT | --ids 1,2,3) [--max-new-tokens N] [--temperature T]\n"
    "                       [--top-k K] [--top-p P] [--seed S] [--no-cache] [--device cpu|cuda[:N]]\n"
    "  attnzoo-cli evaluate MODEL_DIR --text FILE [--seq-len N] [--batch-size B] [--max-batches M] [--json "
    "OUT]\n"
    "                       [--device cpu|cuda[:N]]\n"
    "  attnzoo-cli transcribe MODEL_DIR FILE.wav... [--beam-size K] [--ctc-weight W] [--max-length N]\n"
    "                       [--length-penalty P] [--no-cache] [--json OUT] [--device cpu|cuda[:N]]\n"
    "\n"
    "MODEL_DIR is a GPT checkpoint directory (config.json + model.safetensors). generate continues the\n"
    "prompt, greedy unless --temperature > 0 (then --top-k, --top-p, --seed); --max-new-tokens defaults\n"
    "to 32, as in Python, and to what fits the model's max_position_embeddings when the prompt leaves\n"
    "less room. evaluate scores next-byte prediction on a text file, as `python -m attnzoo evaluate`.\n"
    "transcribe takes a speech_seq2seq checkpoint and prints one transcript per WAV file (greedy unless\n"
    "--beam-size > 1; --ctc-weight W > 0 adds the CTC head's prefix scores to the search).\n";

bool asks_for_help(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") return true;
  return false;
}

struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// --flag value pairs (and the bare flags listed in `switches`) after the command and directory; the
// other words go to `positional` when given, and are refused otherwise.
std::map<std::string, std::string> parse_flags(int argc, char** argv, const std::vector<std::string>& known,
                                               const std::vector<std::string>& switches,
                                               std::vector<std::string>* positional = nullptr) {
  std::map<std::string, std::string> flags;
  for (int i = 3; i < argc; ++i) {
    const std::string flag = argv[i];
    if (positional && flag.rfind("--", 0) != 0) {
      positional->push_back(flag);
      continue;
    }
    bool is_switch = false;
    for (const auto& s : switches) is_switch |= flag == s;
    if (is_switch) {
      flags[flag] = "1";
      continue;
    }
    bool ok = false;
    for (const auto& k : known) ok |= flag == k;
    if (!ok) throw UsageError("unknown option " + flag);
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    flags[flag] = argv[++i];
  }
  return flags;
}

template <typename T>
T number(const std::map<std::string, std::string>& flags, const std::string& name, T fallback) {
  auto it = flags.find(name);
  if (it == flags.end()) return fallback;
  std::istringstream in(it->second);
  T value;
  if (!(in >> value) || !in.eof()) throw UsageError(name + ": not a number: '" + it->second + "'");
  return value;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Only byte-level checkpoints can be fed text from C++: the sentencepiece
// vocabularies are read by the Python tools.
void require_byte_tokenizer(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  std::ifstream in(path);
  if (!in) return;  // no tokenizer saved: bytes
  const auto spec = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!spec.is_object() || !spec.contains("kind") || !spec["kind"].is_string())
    throw std::invalid_argument(path + ": expected a JSON object with a string \"kind\"");
  if (spec["kind"] != "bytes")
    throw std::invalid_argument(path + ": attnzoo-cli reads byte-level checkpoints only (this one has a " +
                                spec["kind"].get<std::string>() + " tokenizer); pass --ids instead of text");
}

at::Tensor bytes_to_ids(const std::string& text) {
  std::vector<int64_t> ids(text.begin(), text.end());
  for (auto& id : ids) id &= 0xff;  // char may be signed
  return torch::tensor(ids, torch::kLong);
}

std::string ids_to_text(const at::Tensor& ids) {
  std::string out;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t id = ids[i].item<int64_t>();
    out += id >= 0 && id < 256 ? static_cast<char>(id) : '?';
  }
  return out;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw UsageError("--ids: not an integer: '" + item + "'");
    }
  }
  return ids;
}

// --device: where the model runs (default cpu).
torch::Device device_of(const std::map<std::string, std::string>& flags) {
  const auto it = flags.find("--device");
  if (it == flags.end()) return torch::kCPU;
  std::optional<torch::Device> device;
  try {
    device = torch::Device(it->second);
  } catch (const c10::Error&) {
    throw UsageError("--device: expected cpu or cuda[:N], got '" + it->second + "'");
  }
  if (!device->is_cpu() && !device->is_cuda())
    throw UsageError("--device: expected cpu or cuda[:N], got '" + it->second + "'");
  if (device->is_cuda() && !torch::cuda::is_available())
    throw std::invalid_argument("--device " + it->second + ": no CUDA device is available here");
  return *device;
}

// A WAV file's samples as floats in [-1, 1) (channels averaged) and its rate.
struct Wav {
  std::vector<float> samples;
  int64_t sample_rate = 0;
};

// Integer PCM of 8 (unsigned), 16, 24 or 32 bits, or 32/64-bit IEEE float,
// also inside WAVE_FORMAT_EXTENSIBLE. 16-bit samples become s / 32768, as
// the Python tools scale them, so both languages hear the same numbers.
Wav read_wav(const std::string& path) {
  const std::string bytes = read_file(path);
  auto fail = [&](const std::string& why) -> void { throw std::invalid_argument(path + ": " + why); };
  auto byte = [&](size_t at) { return uint32_t(static_cast<unsigned char>(bytes[at])); };
  auto u16 = [&](size_t at) { return byte(at) | byte(at + 1) << 8; };
  auto u32 = [&](size_t at) { return u16(at) | u16(at + 2) << 16; };
  if (bytes.size() < 12 || bytes.compare(0, 4, "RIFF") != 0 || bytes.compare(8, 4, "WAVE") != 0)
    fail("not a RIFF/WAVE file");
  uint32_t format = 0, channels = 0, rate = 0, bits = 0;
  size_t data = 0, data_size = 0;
  bool have_data = false;
  for (size_t at = 12; at + 8 <= bytes.size();) {
    const std::string id = bytes.substr(at, 4);
    size_t size = u32(at + 4);
    const size_t body = at + 8;
    if (size > bytes.size() - body) {
      // Streamed WAVs (espeak-ng --stdout, sox to a pipe) leave the data size unset.
      if (id != "data") fail("chunk '" + id + "' runs past the end of the file");
      size = bytes.size() - body;
    }
    if (id == "fmt ") {
      if (size < 16) fail("the fmt chunk is too short");
      format = u16(body);
      channels = u16(body + 2);
      rate = u32(body + 4);
      bits = u16(body + 14);
      if (format == 0xFFFE && size >= 26) format = u16(body + 24);  // WAVE_FORMAT_EXTENSIBLE: the sub-format
    } else if (id == "data") {
      data = body;
      data_size = size;
      have_data = true;
      break;
    }
    at = body + size + (size & 1);
  }
  if (!format) fail("no fmt chunk before the samples");
  if (!have_data) fail("no data chunk");
  const bool pcm = format == 1 && (bits == 8 || bits == 16 || bits == 24 || bits == 32);
  const bool ieee = format == 3 && (bits == 32 || bits == 64);
  if (!pcm && !ieee)
    fail("unsupported encoding (format " + std::to_string(format) + ", " + std::to_string(bits) +
         " bits); use integer PCM or IEEE float");
  if (channels < 1) fail("the fmt chunk declares no channels");
  const size_t width = bits / 8, frame = width * channels, frames = data_size / frame;
  if (frames == 0) fail("holds no samples");
  Wav wav;
  wav.sample_rate = rate;
  wav.samples.assign(frames, 0.0f);
  for (size_t f = 0; f < frames; ++f) {
    float sum = 0.0f;
    for (size_t c = 0; c < channels; ++c) {
      const size_t at = data + f * frame + c * width;
      float value;
      if (ieee && bits == 32) {
        uint32_t raw = u32(at);
        std::memcpy(&value, &raw, sizeof value);
      } else if (ieee) {
        uint64_t raw = uint64_t(u32(at)) | uint64_t(u32(at + 4)) << 32;
        double wide;
        std::memcpy(&wide, &raw, sizeof wide);
        value = float(wide);
      } else if (bits == 8) {
        value = (float(byte(at)) - 128.0f) / 128.0f;
      } else if (bits == 16) {
        value = float(int16_t(u16(at))) / 32768.0f;
      } else if (bits == 24) {
        value = float(int32_t((byte(at) | byte(at + 1) << 8 | byte(at + 2) << 16) << 8) >> 8) / 8388608.0f;
      } else {
        value = float(double(int32_t(u32(at))) / 2147483648.0);
      }
      sum = channels == 1 ? value : sum + value;
    }
    wav.samples[f] = channels == 1 ? sum : sum / float(channels);
  }
  return wav;
}

// tokenizer.json's {"kind": "labels", "labels": [...]}: the text of each label
// id; empty when the checkpoint has none (transcripts print as ids).
std::vector<std::string> read_labels(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  std::ifstream in(path);
  if (!in) return {};
  const auto spec = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!spec.is_object() || spec.value("kind", "") != "labels" || !spec.contains("labels") ||
      !spec["labels"].is_array())
    throw std::invalid_argument(path + ": expected {\"kind\": \"labels\", \"labels\": [...]}");
  std::vector<std::string> labels;
  for (const auto& label : spec["labels"]) {
    if (!label.is_string()) throw std::invalid_argument(path + ": every label must be a string");
    labels.push_back(label.get<std::string>());
  }
  return labels;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int generate(const std::string& dir, const std::map<std::string, std::string>& flags) {
  const bool has_prompt = flags.count("--prompt"), has_ids = flags.count("--ids");
  if (has_prompt == has_ids) throw UsageError("generate takes exactly one of --prompt and --ids");
  const torch::Device device = device_of(flags);
  auto gpt = attnzoo::from_pretrained_as<attnzoo::models::GPTImpl>(dir);  // in eval mode
  gpt->to(device);
  if (has_prompt) require_byte_tokenizer(dir);
  at::Tensor prompt =
      has_prompt ? bytes_to_ids(flags.at("--prompt")) : torch::tensor(parse_ids(flags.at("--ids")));
  if (prompt.numel() == 0) throw UsageError("the prompt is empty");
  attnzoo::models::GenerationOptions options;  // its defaults are Python's too
  const auto& config = gpt->config();
  const int64_t room = config.max_position_embeddings - prompt.numel();
  if (config.position_embedding ==
      attnzoo::PositionEmbedding::learned) {  // learned positions end at max_position_embeddings
    if (room < 0)
      throw std::invalid_argument("the prompt is " + std::to_string(prompt.numel()) +
                                  " tokens; this model reads at most max_position_embeddings = " +
                                  std::to_string(config.max_position_embeddings));
    if (!flags.count("--max-new-tokens") && options.max_new_tokens > room) {
      std::fprintf(stderr,
                   "note: generating %lld tokens, all that fit after the %lld-token prompt "
                   "(max_position_embeddings = %lld)\n",
                   static_cast<long long>(room), static_cast<long long>(prompt.numel()),
                   static_cast<long long>(config.max_position_embeddings));
      options.max_new_tokens = room;
    }
    if (number<int64_t>(flags, "--max-new-tokens", 0) > room)
      throw std::invalid_argument("--max-new-tokens " + flags.at("--max-new-tokens") +
                                  " does not fit: the prompt is " + std::to_string(prompt.numel()) +
                                  " tokens and the model reads at most " +
                                  std::to_string(config.max_position_embeddings) + " (at most " +
                                  std::to_string(room) + " new tokens)");
  }
  options.max_new_tokens = number<int64_t>(flags, "--max-new-tokens", options.max_new_tokens);
  options.temperature = number<double>(flags, "--temperature", options.temperature);
  options.top_k = number<int64_t>(flags, "--top-k", options.top_k);
  options.top_p = number<double>(flags, "--top-p", options.top_p);
  options.use_cache = !flags.count("--no-cache");
  if (flags.count("--seed")) options.seed = number<uint64_t>(flags, "--seed", 0);
  torch::NoGradGuard no_grad;
  const auto start = Clock::now();
  auto out = gpt->generate(prompt.unsqueeze(0).to(device), options)[0].cpu();
  const double elapsed = seconds_since(start);
  const int64_t produced = out.numel() - prompt.numel();
  if (has_prompt) {
    std::cout << ids_to_text(out) << '\n';
  } else {
    for (int64_t t = 0; t < out.numel(); ++t) std::cout << (t ? "," : "") << out[t].item<int64_t>();
    std::cout << '\n';
  }
  std::fprintf(stderr, "generated %lld tokens in %.3f s (%.1f tokens/s, %s)\n",
               static_cast<long long>(produced), elapsed, produced / std::max(elapsed, 1e-9),
               options.use_cache ? "KV cache" : "no cache");
  return 0;
}

int transcribe(const std::string& dir, const std::vector<std::string>& files,
               const std::map<std::string, std::string>& flags) {
  if (files.empty()) throw UsageError("transcribe needs at least one WAV file");
  const torch::Device device = device_of(flags);
  auto model = attnzoo::from_pretrained_as<attnzoo::models::SpeechSeq2SeqImpl>(dir);  // in eval mode
  model->to(device);
  const auto labels = read_labels(dir);
  attnzoo::models::TranscribeOptions options;  // its defaults are Python's too
  options.beam_size = number<int64_t>(flags, "--beam-size", options.beam_size);
  options.max_length = number<int64_t>(flags, "--max-length", options.max_length);
  options.length_penalty = number<double>(flags, "--length-penalty", options.length_penalty);
  options.ctc_weight = number<double>(flags, "--ctc-weight", options.ctc_weight);
  options.use_cache = !flags.count("--no-cache");
  if (options.beam_size < 1) throw UsageError("--beam-size must be >= 1");
  if (options.max_length < 0) throw UsageError("--max-length must be >= 0 (0: the encoder's frame count)");
  const int64_t rate = model->config().sample_rate;
  nlohmann::json report = nlohmann::json::array();
  double audio_seconds = 0.0, elapsed = 0.0;
  for (const auto& file : files) {
    const Wav wav = read_wav(file);
    if (wav.sample_rate != rate)
      throw std::invalid_argument(file + ": sampled at " + std::to_string(wav.sample_rate) +
                                  " Hz; the model takes " + std::to_string(rate) + " Hz (resample it first)");
    const auto waveform = torch::from_blob(const_cast<float*>(wav.samples.data()),
                                           {1, int64_t(wav.samples.size())}, torch::kFloat)
                              .to(device);
    const auto start = Clock::now();
    const auto ids = model->transcribe(waveform, std::nullopt, options).front();
    elapsed += seconds_since(start);
    audio_seconds += double(wav.samples.size()) / double(rate);
    std::string text;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (labels.empty()) {
        text += (i ? "," : "") + std::to_string(ids[i]);
      } else {
        if (ids[i] < 0 || size_t(ids[i]) >= labels.size())
          throw std::runtime_error(dir + "/tokenizer.json has no label " + std::to_string(ids[i]));
        text += labels[size_t(ids[i])];
      }
    }
    std::cout << text << '\n';
    report.push_back({{"file", file}, {"text", text}, {"ids", ids}});
  }
  std::string search = options.beam_size > 1 ? "beam " + std::to_string(options.beam_size) : "greedy";
  if (options.ctc_weight > 0) search += ", CTC weight " + std::to_string(options.ctc_weight).substr(0, 4);
  std::fprintf(stderr, "transcribed %zu file(s), %.2f s of audio, in %.3f s (%.1fx real time; %s, %s)\n",
               files.size(), audio_seconds, elapsed, audio_seconds / std::max(elapsed, 1e-9), search.c_str(),
               options.use_cache ? "KV cache" : "no cache");
  if (flags.count("--json")) {
    std::ofstream out(flags.at("--json"));
    out << report.dump(1) << '\n';
    if (!out) throw std::runtime_error("cannot write " + flags.at("--json"));
  }
  return 0;
}

int evaluate(const std::string& dir, const std::map<std::string, std::string>& flags) {
  if (!flags.count("--text")) throw UsageError("evaluate needs --text FILE");
  const torch::Device device = device_of(flags);
  auto gpt = attnzoo::from_pretrained_as<attnzoo::models::GPTImpl>(dir);  // in eval mode
  gpt->to(device);
  require_byte_tokenizer(dir);
  const auto& config = gpt->config();
  const int64_t seq_len =
      number<int64_t>(flags, "--seq-len", std::min<int64_t>(config.max_position_embeddings, 256));
  const int64_t batch_size = number<int64_t>(flags, "--batch-size", 32);
  const int64_t max_batches = number<int64_t>(flags, "--max-batches", 0);
  if (seq_len < 1 || seq_len > config.max_position_embeddings)
    throw UsageError("--seq-len must be in [1, " + std::to_string(config.max_position_embeddings) + "]");
  if (batch_size < 1) throw UsageError("--batch-size must be >= 1");
  if (max_batches < 0) throw UsageError("--max-batches must be >= 0");
  const at::Tensor stream = bytes_to_ids(read_file(flags.at("--text")));
  const int64_t window = seq_len + 1, span = stream.numel() - window;
  if (span < 1)
    throw std::invalid_argument("--text: the file has " + std::to_string(stream.numel()) +
                                " bytes, too few for one window of " + std::to_string(window));
  at::Tensor starts = at::arange(0, span, window, torch::kLong);
  if (max_batches && starts.numel() > max_batches * batch_size)
    // float32 as in the Python evaluator (torch.linspace's default), so both pick the same windows.
    starts = at::linspace(0, span - 1, max_batches * batch_size, torch::kFloat).to(torch::kLong);
  torch::NoGradGuard no_grad;
  const auto start = Clock::now();
  double total = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < starts.numel(); b += batch_size) {
    const auto chunk = starts.slice(0, b, std::min(b + batch_size, starts.numel()));
    std::vector<at::Tensor> rows;
    for (int64_t i = 0; i < chunk.numel(); ++i)
      rows.push_back(stream.narrow(0, chunk[i].item<int64_t>(), window));
    const auto x = at::stack(rows).to(device);
    const auto logits = gpt->forward(x.slice(1, 0, seq_len));
    const auto targets = x.slice(1, 1);
    total += at::cross_entropy_loss(logits.flatten(0, 1), targets.flatten(), {}, at::Reduction::Sum)
                 .item<double>();
    count += targets.numel();
  }
  const double elapsed = seconds_since(start), loss = total / count;
  std::printf(
      "metric         value\n"
      "-------------  -----\n"
      "loss           %.4f\n"
      "perplexity     %.4f\n"
      "bits_per_char  %.4f\n"
      "tokens         %lld\n"
      "seconds        %.2f\n"
      "tokens_per_s   %.0f\n",
      loss, std::exp(loss), loss / std::log(2.0), static_cast<long long>(count), elapsed, count / elapsed);
  if (flags.count("--json")) {
    std::ofstream out(flags.at("--json"));
    out.precision(17);
    out << "{\"loss\": " << loss << ", \"perplexity\": " << std::exp(loss)
        << ", \"bits_per_char\": " << loss / std::log(2.0) << ", \"tokens\": " << count
        << ", \"seconds\": " << elapsed << ", \"tokens_per_s\": " << count / elapsed << "}\n";
    if (!out) throw std::runtime_error("cannot write " + flags.at("--json"));
  }
  return 0;
}

}  // namespace

// Errors from the library often begin with the name of the function that
// raised them ("generate: ..."); the CLI already names the command.
std::string without_prefix(const std::string& message, const std::string& command) {
  const std::string prefix = command + ": ";
  return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message;
}

int main(int argc, char** argv) {
  if (asks_for_help(argc, argv)) {
    std::cout << kUsage;
    return 0;
  }
  if (argc < 3) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string command = argv[1], dir = argv[2];
  try {
    if (command == "generate")
      return generate(dir, parse_flags(argc, argv,
                                       {"--prompt", "--ids", "--max-new-tokens", "--temperature", "--top-k",
                                        "--top-p", "--seed", "--device"},
                                       {"--no-cache"}));
    if (command == "evaluate")
      return evaluate(
          dir,
          parse_flags(argc, argv,
                      {"--text", "--seq-len", "--batch-size", "--max-batches", "--json", "--device"}, {}));
    if (command == "transcribe") {
      std::vector<std::string> files;
      const auto flags = parse_flags(
          argc, argv,
          {"--beam-size", "--max-length", "--length-penalty", "--ctc-weight", "--json", "--device"},
          {"--no-cache"}, &files);
      return transcribe(dir, files, flags);
    }
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::cerr << "attnzoo-cli: " << e.what() << '\n' << kUsage;
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "attnzoo-cli " << command << ": " << without_prefix(e.what_without_backtrace(), command)
              << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "attnzoo-cli " << command << ": " << without_prefix(e.what(), command) << '\n';
    return 1;
  }
}
