// The safetensors header: read and validated against the file size, with no
// Torch involved (so the fuzz target can build it alone).
#include "attnzoo/io/safetensors_index.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace attnzoo::io {
namespace {

using json = nlohmann::json;

struct DtypeSize {
  const char* name;
  uint64_t bytes;
};
constexpr DtypeSize kDtypeSizes[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                     {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};

[[noreturn]] void bad_file(const std::string& where, const std::string& what) {
  throw std::invalid_argument(where + ": " + what);
}

// Parses JSON refusing duplicate keys at any depth (nlohmann would keep the
// last one silently, and a crafted file could then mean two things).
json parse_header(const std::string& text, const std::string& where) {
  std::vector<std::set<std::string>> keys_in_object;
  auto on_event = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start)
      keys_in_object.emplace_back();
    else if (event == json::parse_event_t::object_end)
      keys_in_object.pop_back();
    else if (event == json::parse_event_t::key &&
             !keys_in_object.back().insert(parsed.get<std::string>()).second)
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

std::vector<TensorEntry> read_entries(const json& header, uint64_t data_size, const std::string& where,
                                      std::map<std::string, std::string>& metadata) {
  if (!header.is_object()) bad_file(where, "the header must be a JSON object");
  std::vector<TensorEntry> entries;
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
    const auto* known = dtype.is_string() ? std::find_if(std::begin(kDtypeSizes), std::end(kDtypeSizes),
                                                         [&](const DtypeSize& d) { return dtype == d.name; })
                                          : std::end(kDtypeSizes);
    if (known == std::end(kDtypeSizes)) bad_file(at_name, "unsupported dtype " + dtype.dump());
    TensorEntry entry{name, known->name, known->bytes, {}, 0, 0};
    const json& shape = info.at("shape");
    if (!shape.is_array() || shape.size() > 16) bad_file(at_name, "shape must be a list of at most 16 sizes");
    uint64_t numel = 1;
    for (const auto& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (uint64_t(1) << 48))
        bad_file(at_name, "shape sizes must be non-negative integers below 2^48, got " + shape.dump());
      const uint64_t d = dim.get<uint64_t>();
      if (d != 0 && numel > (uint64_t(1) << 62) / d)
        bad_file(at_name, "shape " + shape.dump() + " is too large");
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
    const uint64_t expected = numel * entry.element_size;
    if (entry.end - entry.begin != expected)
      bad_file(at_name, "holds " + std::to_string(entry.end - entry.begin) + " bytes but dtype " +
                            dtype.dump() + " and shape " + shape.dump() + " need " +
                            std::to_string(expected));
    entries.push_back(std::move(entry));
  }
  std::vector<const TensorEntry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      bad_file(where,
               "tensors \"" + by_offset[i - 1]->name + "\" and \"" + by_offset[i]->name + "\" overlap");
  return entries;
}

}  // namespace

SafetensorsIndex read_safetensors_index(const ByteSource& source, const std::string& where) {
  if (source.size < 8)
    bad_file(where, "too short to be a safetensors file (" + std::to_string(source.size) + " bytes)");
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
  SafetensorsIndex index;
  index.data_start = 8 + header_length;
  index.tensors =
      read_entries(parse_header(header_text, where), source.size - index.data_start, where, index.metadata);
  return index;
}

}  // namespace attnzoo::io
