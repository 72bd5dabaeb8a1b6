#pragma once
// The safetensors header alone: every entry's dtype, shape and byte range,
// validated against the file size. Pure C++ (no Torch), so that the reader's
// hostile-input logic can be fuzzed on its own; safetensors.h builds tensors
// from it.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace attnzoo::io {

// The largest header accepted (the format's own reference limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

// Where the bytes come from: a file (read piecewise, never whole) or memory.
struct ByteSource {
  uint64_t size = 0;
  std::function<void(uint64_t offset, void* dst, uint64_t n)> read;
};

struct TensorEntry {
  std::string name;
  std::string dtype;      // "F32", "BF16", "I64", ...
  uint64_t element_size;  // bytes
  std::vector<int64_t> shape;
  uint64_t begin, end;  // byte range within the data section
};

struct SafetensorsIndex {
  std::vector<TensorEntry> tensors;  // header order
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // file offset of the data section
};

// Throws std::invalid_argument (prefixed with `where`) on anything malformed:
// short file, header length beyond the file or 100 MB, malformed or non-UTF-8
// JSON, duplicate keys, unknown dtypes, shapes that overflow or disagree with
// the byte range, ranges outside the data or overlapping each other.
SafetensorsIndex read_safetensors_index(const ByteSource& source, const std::string& where);

}  // namespace attnzoo::io
