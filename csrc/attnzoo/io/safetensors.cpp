// safetensors reader and writer. The reader validates the whole header
// against the file size (safetensors_index.cpp) before it allocates a single
// tensor; the writer builds its header with nlohmann_json.
#include "attnzoo/io/safetensors.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "attnzoo/io/safetensors_index.h"

namespace attnzoo::io {
namespace {

using json = nlohmann::json;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

SafetensorsFile parse(const ByteSource& source, const std::string& where) {
  auto index = read_safetensors_index(source, where);
  SafetensorsFile file;
  file.metadata = std::move(index.metadata);
  for (const auto& e : index.tensors) {
    const auto* known = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                                     [&](const DtypeName& d) { return e.dtype == d.name; });
    auto tensor = at::empty(e.shape, at::TensorOptions().dtype(known->type));
    if (e.end > e.begin) source.read(index.data_start + e.begin, tensor.data_ptr(), e.end - e.begin);
    file.tensors.emplace_back(e.name, std::move(tensor));
  }
  return file;
}

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

// Writes chunks to `path` through a temporary file in the same directory,
// flushed to disk before the rename.
void write_atomic(const std::string& path, const std::vector<std::pair<const void*, size_t>>& chunks) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) io_error("cannot write", tmp);
  bool ok = true;
  for (const auto& [data, n] : chunks) ok = ok && (n == 0 || std::fwrite(data, 1, n, f) == n);
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int saved = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    errno = saved ? saved : errno;
    io_error("failed writing", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    io_error("cannot rename onto", path);
  }
}

}  // namespace

SafetensorsFile load_safetensors(const std::string& path) {
  auto in = std::make_shared<std::ifstream>(path, std::ios::binary);
  if (!*in) throw std::invalid_argument("cannot open safetensors file " + path);
  in->seekg(0, std::ios::end);
  ByteSource source;
  source.size = uint64_t(in->tellg());
  source.read = [in, &path](uint64_t offset, void* dst, uint64_t n) {
    in->seekg(std::streamoff(offset));
    in->read(static_cast<char*>(dst), std::streamsize(n));
    if (uint64_t(in->gcount()) != n)
      throw std::invalid_argument(path + ": read failed (file changed while loading?)");
  };
  return parse(source, path);
}

SafetensorsFile parse_safetensors(const uint8_t* data, size_t size) {
  ByteSource source;
  source.size = size;
  source.read = [data](uint64_t offset, void* dst, uint64_t n) { std::memcpy(dst, data + offset, n); };
  return parse(source, "safetensors");
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, at::Tensor>> sorted(tensors.begin(), tensors.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<at::Tensor> data;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const auto& [name, tensor] = sorted[i];
    if (i > 0 && name == sorted[i - 1].first)
      throw std::invalid_argument("save_safetensors: duplicate name \"" + name + "\"");
    if (name == "__metadata__") throw std::invalid_argument("save_safetensors: \"__metadata__\" is reserved");
    if (!tensor.defined() || tensor.device().type() != at::kCPU)
      throw std::invalid_argument("save_safetensors: tensor \"" + name + "\" must be a defined CPU tensor");
    const auto* known = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                                     [&](const DtypeName& d) { return d.type == tensor.scalar_type(); });
    if (known == std::end(kDtypes))
      throw std::invalid_argument("save_safetensors: tensor \"" + name + "\" has unsupported dtype " +
                                  std::string(c10::toString(tensor.scalar_type())));
    auto contiguous = tensor.detach().contiguous();
    const uint64_t nbytes = contiguous.nbytes();
    header[name] = {
        {"dtype", known->name}, {"shape", tensor.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(contiguous));
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  uint8_t length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = uint8_t(uint64_t(header_text.size()) >> (8 * i));
  std::vector<std::pair<const void*, size_t>> chunks = {{length_bytes, 8},
                                                        {header_text.data(), header_text.size()}};
  for (const auto& t : data) chunks.emplace_back(t.data_ptr(), t.nbytes());
  write_atomic(path, chunks);
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_atomic(path, {{text.data(), text.size()}});
}

}  // namespace attnzoo::io
