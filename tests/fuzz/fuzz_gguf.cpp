// libFuzzer target: the example engine's GGUF reader and dequantisers
// (examples/llm/gguf.hpp). Odd first byte: the rest is a GGUF image, parsed from
// memory, every scalar read back and every tensor of a known type dequantised.
// Even first byte: the rest is raw blocks of the tensor type the second byte
// names, dequantised. Bad input must throw std::runtime_error; a crash, a
// sanitizer report or any other exception aborts.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "gguf.hpp"

namespace {
constexpr std::uint32_t kTypes[] = {0, 1, 2, 3, 6, 7, 8, 12, 14, 30, 9, 99};

void parse_image(const std::uint8_t* data, std::size_t size) {
  llm::GgufFile f(std::vector<std::uint8_t>(data, data + size));
  for (const auto& [key, v] : f.metadata()) {
    if (std::holds_alternative<std::int64_t>(v.scalar)) (void)f.get_int(key);
    if (std::holds_alternative<double>(v.scalar)) (void)f.get_float(key);
    if (std::holds_alternative<std::string>(v.scalar)) (void)f.get_string(key);
  }
  for (const auto& t : f.tensors()) {
    // Bounded work per input: the reader has checked that the tensor lies in the file.
    if (t.elements() > (1u << 20)) continue;
    try {
      (void)f.to_float(t);
    } catch (const std::runtime_error&) {
      // an unsupported type is reported when the tensor is read
    }
  }
}

void dequantize_blocks(std::uint8_t type_byte, const std::uint8_t* data, std::size_t size) {
  const auto t = static_cast<llm::ggml_type>(kTypes[type_byte % std::size(kTypes)]);
  const auto tr = llm::type_traits(t);
  std::size_t n = tr.name ? size / tr.bytes * tr.block : size;
  // Not whole blocks (types with blocks > 1): must be refused.
  if ((type_byte & 0x80) && tr.name && tr.block > 1) n += 1;
  std::vector<float> out(n + 1);
  llm::dequantize(t, data, out.data(), n);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  try {
    if (data[0] & 1)
      parse_image(data + 1, size - 1);
    else
      dequantize_blocks(data[1], data + 2, size - 2);
  } catch (const std::runtime_error&) {
  }
  return 0;
}
