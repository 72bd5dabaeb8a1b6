// libFuzzer target over the readers of untrusted files: the safetensors
// header (attnzoo::io::read_safetensors_index) and config.json
// (attnzoo::config_from_json). Each input is given to both. The only
// acceptable failure is std::invalid_argument (a clear error); any other
// exception, crash, sanitizer report, leak, hang or huge allocation is a bug.
// Built and run for a bounded time by tests/python/test_fuzz.py.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "attnzoo/io/safetensors_index.h"
#include "attnzoo/models/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  attnzoo::io::ByteSource source;
  source.size = size;
  source.read = [data](uint64_t offset, void* dst, uint64_t n) { std::memcpy(dst, data + offset, n); };
  try {
    attnzoo::io::read_safetensors_index(source, "fuzz");
  } catch (const std::invalid_argument&) {
  }
  try {
    attnzoo::config_from_json(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
