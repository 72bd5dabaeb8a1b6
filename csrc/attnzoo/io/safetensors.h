#pragma once
// safetensors files (https://github.com/huggingface/safetensors, format only):
// 8-byte little-endian header length, a JSON header mapping each name to
// {dtype, shape, data_offsets}, then the raw little-endian bytes.
//
// Files are treated as hostile: every size, offset, dtype and shape is checked
// against the file before anything is allocated, overlapping or duplicate
// entries and malformed JSON are refused, and every failure is an
// std::invalid_argument that says what is wrong and where.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "attnzoo/io/safetensors_index.h"

namespace attnzoo::io {

// Tensors in file order (sorted by name when written here).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;
  std::map<std::string, std::string> metadata;  // the optional "__metadata__"
};

SafetensorsFile load_safetensors(const std::string& path);
// The same checks on bytes in memory (used by the fuzz target).
SafetensorsFile parse_safetensors(const uint8_t* data, size_t size);

// Writes CPU tensors (any supported dtype, made contiguous) to a temporary
// file beside `path` and renames it over `path`, so a reader never sees a
// half-written file.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Writes `text` to `path` atomically (temporary file + rename).
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace attnzoo::io
