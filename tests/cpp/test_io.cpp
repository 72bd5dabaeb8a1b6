// The C++ readers: config.json parsing and the safetensors reader on honest
// and hostile files.
#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "attnzoo/attnzoo.h"
#include "test_support.h"

namespace {

using namespace attnzoo_test;
using attnzoo::io::parse_safetensors;

std::vector<uint8_t> bytes_of(const std::string& header, size_t data_bytes, int64_t header_length = -1) {
  const uint64_t n = header_length < 0 ? header.size() : uint64_t(header_length);
  std::vector<uint8_t> out(8);
  for (int i = 0; i < 8; ++i) out[i] = uint8_t(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 7);
  return out;
}

std::string parse_error(const std::vector<uint8_t>& bytes) {
  return error_of([&] { parse_safetensors(bytes.data(), bytes.size()); });
}

}  // namespace

TEST_CASE("config.json: defaults, round trip and errors that name the key", "[io]") {
  auto config = attnzoo::config_from_json(gpt_json(R"([{"kind": "t5"}, {"kind": "lsh", "bucket_size": 8}])"));
  REQUIRE(config.attention.size() == 2);
  CHECK(config.attention[1].bucket_size == 8);
  CHECK(config.activation == attnzoo::Activation::gelu_tanh);  // the GPT default
  auto again = attnzoo::config_from_json(attnzoo::config_to_json(config));
  CHECK(attnzoo::config_to_json(again) == attnzoo::config_to_json(config));

  CHECK_THAT(error_of([] { attnzoo::config_from_json("{\"model_type\": \"gpt\", \"hiden_size\": 3}"); }),
             Catch::Contains("'hiden_size' is not a config key"));
  CHECK_THAT(error_of([] { attnzoo::config_from_json("{\"model_type\": \"gpt\""); }),
             Catch::Contains("malformed JSON"));
  CHECK_THAT(error_of([] { attnzoo::config_from_json("{\"model_type\": \"gpt\", \"num_heads\": 1.5}"); }),
             Catch::Contains("'num_heads' must be an integer"));
  CHECK_THAT(error_of([] { attnzoo::config_from_json(gpt_json(R"({"kind": "local", "bucket_size": 4})")); }),
             Catch::Contains("'attention.bucket_size' does not apply to attention kind \"local\""));
  CHECK_THAT(error_of([] { attnzoo::config_from_json("{\"model_type\": \"vit\", \"patch_size\": 3}"); }),
             Catch::Contains("'patch_size' must divide image_size"));
  CHECK_THAT(
      error_of([] { attnzoo::config_from_json("{\"model_type\": \"gpt\", \"vocab_size\": 99999999999}"); }),
      Catch::Contains("'vocab_size' must be in"));
}

TEST_CASE("safetensors: write, read back, and the same bytes parse from memory", "[io]") {
  auto dir = temp_dir("st");
  attnzoo::io::NamedTensors tensors = {{"b.f64", at::randn({3, 2}, at::kDouble)},
                                       {"a.i64", at::randint(-5, 5, {4}, at::kLong)},
                                       {"c.bool", at::rand({2, 2}) > 0.5},
                                       {"d.bf16", at::randn({5}).to(at::kBFloat16)},
                                       {"e.empty", at::empty({0, 3})},
                                       {"f.strided", at::randn({4, 4}).t()}};
  const auto path = (dir / "x.safetensors").string();
  attnzoo::io::save_safetensors(path, tensors, {{"note", "hi"}});
  auto file = attnzoo::io::load_safetensors(path);
  REQUIRE(file.tensors.size() == tensors.size());
  CHECK(file.metadata.at("note") == "hi");
  for (const auto& [name, t] : tensors) {
    auto it = std::find_if(file.tensors.begin(), file.tensors.end(),
                           [&](const auto& e) { return e.first == name; });
    REQUIRE(it != file.tensors.end());
    CHECK(it->second.scalar_type() == t.scalar_type());
    CHECK(at::equal(it->second, t));
  }
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(parse_safetensors(bytes.data(), bytes.size()).tensors.size() == tensors.size());
  // Truncating the file anywhere is an error, never a crash.
  for (size_t cut : {size_t(0), size_t(5), size_t(8), size_t(20), bytes.size() / 2, bytes.size() - 1}) {
    std::vector<uint8_t> head(bytes.begin(), bytes.begin() + cut);
    CHECK_THAT(parse_error(head), Catch::Contains("safetensors"));
  }
  fs::remove_all(dir);
}

TEST_CASE("safetensors: hostile headers are refused before any allocation", "[io]") {
  const std::string ok = R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})";
  CHECK(parse_safetensors(bytes_of(ok, 16).data(), bytes_of(ok, 16).size()).tensors.size() == 1);
  const std::vector<std::pair<std::vector<uint8_t>, std::string>> cases = {
      {bytes_of(ok, 16, int64_t(1) << 40), "exceeds the 100 MB limit"},
      {bytes_of(ok, 16, int64_t(ok.size()) + 100), "runs past the end"},
      {bytes_of(ok, 8), "run outside the 8 data bytes"},
      {bytes_of(R"({"w": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 16]}})", 16), "need 32"},
      {bytes_of(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})", 2), "unsupported dtype"},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}})", 1), "non-negative"},
      {bytes_of(
           R"({"w": {"dtype": "U8", "shape": [281474976710656, 281474976710656], "data_offsets": [0, 1]}})",
           1),
       "too large"},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [2], "data_offsets": [1, 0]}})", 2), "run outside"},
      {bytes_of(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}})",
                3),
       "overlap"},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                    "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})",
                1),
       "duplicate key \"w\""},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 1}})", 1),
       "exactly dtype"},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [1]}})", 1), "exactly dtype"},
      {bytes_of(R"({"w": 5})", 1), "exactly dtype"},
      {bytes_of(R"([1, 2])", 0), "must be a JSON object"},
      {bytes_of(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1])", 1), "malformed JSON"},
      {bytes_of("{\"\xff\xfe\": {}}", 0), "malformed JSON"},  // not UTF-8
      {bytes_of(R"({"__metadata__": {"a": 1}})", 0), "must be a string"},
      {std::vector<uint8_t>{1, 2, 3}, "too short"},
  };
  for (const auto& [bytes, expected] : cases) {
    INFO(std::string(bytes.begin() + std::min<size_t>(8, bytes.size()), bytes.end()));
    CHECK_THAT(parse_error(bytes), Catch::Contains(expected));
  }
}
