// Minimal NumPy .npy reader (format 1.0/2.0/3.0, little-endian, C order) for
// float32, float64 and int64 arrays: enough for the golden conformance data.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cake_tools {

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::string dtype;  // "<f4", "<f8", "<i8"
  std::vector<char> bytes;

  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  template <class T>
  std::vector<T> as() const {
    std::vector<T> out(static_cast<std::size_t>(size()));
    auto copy = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < out.size(); ++i) {
        S s;
        std::memcpy(&s, bytes.data() + i * sizeof(S), sizeof(S));
        out[i] = static_cast<T>(s);
      }
    };
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
  std::string header(hlen, '\0');
  f.read(header.data(), hlen);
  NpyArray a;
  auto field = [&](const std::string& key) {
    auto p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error("npy: no " + key + " in " + path);
    return header.find(':', p) + 1;
  };
  {
    auto p = header.find('\'', field("descr"));
    auto q = header.find('\'', p + 1);
    a.dtype = header.substr(p + 1, q - p - 1);
  }
  if (header.find("True", field("fortran_order")) < header.find(',', field("fortran_order")))
    throw std::runtime_error("npy: Fortran order not supported: " + path);
  {
    auto p = header.find('(', field("shape"));
    auto q = header.find(')', p);
    std::string dims = header.substr(p + 1, q - p - 1);
    std::size_t i = 0;
    while (i < dims.size()) {
      while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
      if (i >= dims.size()) break;
      std::size_t j = i;
      while (j < dims.size() && dims[j] >= '0' && dims[j] <= '9') ++j;
      a.shape.push_back(std::stoll(dims.substr(i, j - i)));
      i = j;
    }
  }
  const std::size_t elem = a.dtype.size() >= 3 ? static_cast<std::size_t>(a.dtype[2] - '0') : 0;
  a.bytes.resize(static_cast<std::size_t>(a.size()) * elem);
  f.read(a.bytes.data(), static_cast<std::streamsize>(a.bytes.size()));
  if (!f) throw std::runtime_error("npy: truncated data in " + path);
  return a;
}

}  // namespace cake_tools
