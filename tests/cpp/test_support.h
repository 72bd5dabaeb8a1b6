#pragma once
// Helpers shared by the C++ test files.
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <string>

namespace attnzoo_test {

namespace fs = std::filesystem;

// A small GPT config.json with the given "attention" entry.
inline std::string gpt_json(const std::string& attention = R"({"kind": "dense"})") {
  return R"({"model_type": "gpt", "vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
             "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0, "attention": )" +
         attention + "}";
}

// The message of what f throws, or "(no error)".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

// A fresh, empty directory under the system's temporary directory.
inline fs::path temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("attnzoo_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

}  // namespace attnzoo_test
