// safetensors reader and writer on nlohmann_json. The reader validates the
// whole header against the file size before it allocates a single tensor.
#include "attnzoo/io/safetensors.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace attnzoo::io {
namespace {

using json = nlohmann::json;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

[[noreturn]] void bad_file(const std::string& where, const std::string& what) {
  throw std::invalid_argument(where + ": " + what);
}

// Where the bytes come from: a file (read piecewise, never whole) or memory.
struct ByteSource {
  uint64_t size = 0;
  std::function<void(uint64_t offset, void* dst, uint64_t n)> read;
};

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

// Parses JSON refusing duplicate keys at any depth (nlohmann would keep the
// last one silently, and a crafted file could then mean two things).
json parse_header(const std::string& text, const std::string& where) {
  std::vector<std::set<std::string>> keys_in_object;
  auto on_event = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys_in_object.emplace_back();
    else if (event == json::parse_event_t::object_end) keys_in_object.pop_back();
    else if (event == json::parse_event_t::key && !keys_in_object.back().insert(parsed.get<std::string>()).second)
      bad_file(where, "duplicate key \"" + parsed.get<std::string>() + "\" in the header");
    return true;
  };
  try {
    return json::parse(text, on_event);
  } catch (const json::exception& e) {
    bad_file(where, std::string("malformed JSON header: ") + e.what());
  }
}

uint64_t checked_offset(const json& value, const std::string& where) {
  if (!value.is_number_unsigned()) bad_file(where, "data_offsets must be non-negative integers");
  return value.get<uint64_t>();
}

std::vector<Entry> read_entries(const json& header, uint64_t data_size, const std::string& where,
                                std::map<std::string, std::string>& metadata) {
  if (!header.is_object()) bad_file(where, "the header must be a JSON object");
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    const std::string at_name = where + ": tensor \"" + name + "\"";
    if (name == "__metadata__") {
      if (!info.is_object()) bad_file(where, "__metadata__ must be an object of strings");
      for (const auto& [k, v] : info.items()) {
        if (!v.is_string()) bad_file(where, "__metadata__[\"" + k + "\"] must be a string");
        metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!info.is_object() || info.size() != 3 || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets"))
      bad_file(at_name, "entry must have exactly dtype, shape and data_offsets");
    const json& dtype = info.at("dtype");
    const auto* known = dtype.is_string() ? std::find_if(std::begin(kDtypes), std::end(kDtypes),
                                                         [&](const DtypeName& d) { return dtype == d.name; })
                                          : std::end(kDtypes);
    if (known == std::end(kDtypes)) bad_file(at_name, "unsupported dtype " + dtype.dump());
    Entry entry{name, known->type, {}, 0, 0};
    const json& shape = info.at("shape");
    if (!shape.is_array() || shape.size() > 16) bad_file(at_name, "shape must be a list of at most 16 sizes");
    uint64_t numel = 1;
    for (const auto& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (uint64_t(1) << 48))
        bad_file(at_name, "shape sizes must be non-negative integers below 2^48, got " + shape.dump());
      const uint64_t d = dim.get<uint64_t>();
      if (d != 0 && numel > (uint64_t(1) << 62) / d) bad_file(at_name, "shape " + shape.dump() + " is too large");
      numel *= d;
      entry.shape.push_back(int64_t(d));
    }
    const json& offsets = info.at("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2) bad_file(at_name, "data_offsets must be [begin, end]");
    entry.begin = checked_offset(offsets[0], at_name);
    entry.end = checked_offset(offsets[1], at_name);
    if (entry.begin > entry.end || entry.end > data_size)
      bad_file(at_name, "data_offsets [" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) +
                            "] run outside the " + std::to_string(data_size) + " data bytes");
    const uint64_t expected = numel * uint64_t(c10::elementSize(entry.dtype));
    if (entry.end - entry.begin != expected)
      bad_file(at_name, "holds " + std::to_string(entry.end - entry.begin) + " bytes but dtype " + dtype.dump() +
                            " and shape " + shape.dump() + " need " + std::to_string(expected));
    entries.push_back(std::move(entry));
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      bad_file(where, "tensors \"" + by_offset[i - 1]->name + "\" and \"" + by_offset[i]->name + "\" overlap");
  return entries;
}

SafetensorsFile parse(const ByteSource& source, const std::string& where) {
  if (source.size < 8) bad_file(where, "too short to be a safetensors file (" + std::to_string(source.size) + " bytes)");
  uint8_t length_bytes[8];
  source.read(0, length_bytes, 8);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  if (header_length > kMaxHeaderBytes)
    bad_file(where, "header length " + std::to_string(header_length) + " exceeds the 100 MB limit");
  if (header_length > source.size - 8)
    bad_file(where, "header length " + std::to_string(header_length) + " runs past the end of the " +
                        std::to_string(source.size) + "-byte file (truncated?)");
  std::string header_text(header_length, '\0');
  source.read(8, header_text.data(), header_length);
  SafetensorsFile file;
  const uint64_t data_start = 8 + header_length;
  const auto entries = read_entries(parse_header(header_text, where), source.size - data_start, where, file.metadata);
  for (const auto& e : entries) {
    auto tensor = at::empty(e.shape, at::TensorOptions().dtype(e.dtype));
    if (e.end > e.begin) source.read(data_start + e.begin, tensor.data_ptr(), e.end - e.begin);
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
    if (uint64_t(in->gcount()) != n) bad_file(path, "read failed (file changed while loading?)");
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
    if (i > 0 && name == sorted[i - 1].first) throw std::invalid_argument("save_safetensors: duplicate name \"" + name + "\"");
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
    header[name] = {{"dtype", known->name}, {"shape", tensor.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(contiguous));
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  uint8_t length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = uint8_t(uint64_t(header_text.size()) >> (8 * i));
  std::vector<std::pair<const void*, size_t>> chunks = {{length_bytes, 8}, {header_text.data(), header_text.size()}};
  for (const auto& t : data) chunks.emplace_back(t.data_ptr(), t.nbytes());
  write_atomic(path, chunks);
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_atomic(path, {{text.data(), text.size()}});
}

}  // namespace attnzoo::io
