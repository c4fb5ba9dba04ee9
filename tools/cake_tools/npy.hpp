// Minimal NumPy .npy reader (format 1.0/2.0/3.0, little-endian, C order) for
// float32, float64 and int64 arrays: enough for the golden conformance data.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace cake_tools {

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::string dtype;  // "<f4", "<f8", "<i8"
  std::vector<char> bytes;

  // Elements in the array. A zero dimension empties it whatever the others are
  // (load_npy accepts (10^12, 10^12, 0): no data is needed), so the product is
  // taken only when none is zero, and a product past int64 is an error, not a wrap.
  std::int64_t size() const {
    for (auto s : shape)
      if (s == 0) return 0;
    std::int64_t n = 1;
    for (auto s : shape)
      if (s < 0 || __builtin_mul_overflow(n, s, &n))
        throw std::runtime_error("npy: the shape's element count overflows 64 bits");
    return n;
  }
  std::size_t element_size() const {
    if (dtype == "<f4" || dtype == "<i4") return 4;
    if (dtype == "<f8" || dtype == "<i8") return 8;
    throw std::runtime_error("npy: unsupported dtype " + dtype);
  }
  template <class T>
  std::vector<T> as() const {
    std::vector<T> out(static_cast<std::size_t>(size()));
    auto copy = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < out.size(); ++i) {
        S s;
        std::memcpy(&s, bytes.data() + i * sizeof(S), sizeof(S));
        // A float that no T can hold (NaN, out of range) is an error, not a cast.
        if constexpr (std::is_floating_point_v<S> && std::is_integral_v<T>) {
          if (!(s >= static_cast<S>(std::numeric_limits<T>::min()) &&
                s < -static_cast<S>(std::numeric_limits<T>::min())))
            throw std::runtime_error("npy: value out of range of the integer type");
        }
        out[i] = static_cast<T>(s);
      }
    };
    if (bytes.size() < out.size() * element_size())
      throw std::runtime_error("npy: fewer bytes than the shape needs");
    if (dtype == "<f4")
      copy(float{});
    else if (dtype == "<f8")
      copy(double{});
    else if (dtype == "<i8")
      copy(std::int64_t{});
    else if (dtype == "<i4")
      copy(std::int32_t{});
    else
      throw std::runtime_error("npy: unsupported dtype " + dtype);
    return out;
  }
};

inline NpyArray load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("npy: cannot open " + path);
  char magic[6];
  f.read(magic, 6);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw std::runtime_error("npy: bad magic in " + path);
  unsigned char ver[2];
  f.read(reinterpret_cast<char*>(ver), 2);
  std::uint32_t hlen = 0;
  if (ver[0] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    hlen = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  }
  if (!f) throw std::runtime_error("npy: truncated header in " + path);
  {
    const auto at = f.tellg();
    f.seekg(0, std::ios::end);
    const auto size = f.tellg();
    f.seekg(at);
    if (hlen > static_cast<std::uint64_t>(size - at))
      throw std::runtime_error("npy: header longer than the file: " + path);
  }
  std::string header(hlen, '\0');
  f.read(header.data(), hlen);
  NpyArray a;
  if (!f) throw std::runtime_error("npy: truncated header in " + path);
  // Every search below is checked: a malformed header throws instead of reading
  // past the string, and the data size is checked against the file before any
  // allocation (a fuzzed shape must not allocate gigabytes).
  auto field = [&](const std::string& key) {
    auto p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error("npy: no " + key + " in " + path);
    p = header.find(':', p);
    if (p == std::string::npos)
      throw std::runtime_error("npy: no value for " + key + " in " + path);
    return p + 1;
  };
  {
    auto p = header.find('\'', field("descr"));
    auto q = p == std::string::npos ? p : header.find('\'', p + 1);
    if (q == std::string::npos) throw std::runtime_error("npy: bad descr in " + path);
    a.dtype = header.substr(p + 1, q - p - 1);
  }
  const std::size_t elem = a.element_size();
  if (header.find("True", field("fortran_order")) < header.find(',', field("fortran_order")))
    throw std::runtime_error("npy: Fortran order not supported: " + path);
  {
    auto p = header.find('(', field("shape"));
    auto q = p == std::string::npos ? p : header.find(')', p);
    if (q == std::string::npos) throw std::runtime_error("npy: bad shape in " + path);
    std::string dims = header.substr(p + 1, q - p - 1);
    std::size_t i = 0;
    while (i < dims.size()) {
      while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
      if (i >= dims.size()) break;
      std::size_t j = i;
      while (j < dims.size() && dims[j] >= '0' && dims[j] <= '9') ++j;
      if (j == i || j - i > 12) throw std::runtime_error("npy: bad shape in " + path);
      a.shape.push_back(std::stoll(dims.substr(i, j - i)));
      i = j;
    }
  }
  const auto here = f.tellg();
  f.seekg(0, std::ios::end);
  const auto left = static_cast<std::uint64_t>(f.tellg() - here);
  f.seekg(here);
  std::uint64_t n = 1;
  for (auto s : a.shape) {
    if (s != 0 && n > left / static_cast<std::uint64_t>(s))
      n = left + 1;  // cannot fit
    else
      n *= static_cast<std::uint64_t>(s);
  }
  if (n > left / elem) throw std::runtime_error("npy: truncated data in " + path);
  a.bytes.resize(static_cast<std::size_t>(n * elem));
  f.read(a.bytes.data(), static_cast<std::streamsize>(a.bytes.size()));
  if (!f) throw std::runtime_error("npy: truncated data in " + path);
  return a;
}

}  // namespace cake_tools
