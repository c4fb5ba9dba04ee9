// A small GGUF (v2/v3) reader: metadata, tensor directory, and dequantisation of
// the tensor types small Llama files use (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, Q4_K, Q6_K) into float.
//
// Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count, metadata
// (key, u32 type, value), tensor infos (name, u32 n_dims, u64 dims[n], u32 type,
// u64 offset), padding to general.alignment (32), then the tensor data.
// dims[0] is the contiguous dimension: a [in, out] matrix is `out` rows of `in`.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace llm {

enum class ggml_type : std::uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  bf16 = 30,
};

struct TypeTraits {
  const char* name;
  std::size_t block;  // elements per block
  std::size_t bytes;  // bytes per block
};

inline TypeTraits type_traits(ggml_type t) {
  switch (t) {
    case ggml_type::f32:
      return {"F32", 1, 4};
    case ggml_type::f16:
      return {"F16", 1, 2};
    case ggml_type::bf16:
      return {"BF16", 1, 2};
    case ggml_type::q4_0:
      return {"Q4_0", 32, 18};
    case ggml_type::q4_1:
      return {"Q4_1", 32, 20};
    case ggml_type::q5_0:
      return {"Q5_0", 32, 22};
    case ggml_type::q5_1:
      return {"Q5_1", 32, 24};
    case ggml_type::q8_0:
      return {"Q8_0", 32, 34};
    case ggml_type::q4_k:
      return {"Q4_K", 256, 144};
    case ggml_type::q6_k:
      return {"Q6_K", 256, 210};
    default:
      return {nullptr, 0, 0};
  }
}

inline float fp16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; used by tests to write F16 data.
inline std::uint16_t float_to_fp16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  std::uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff)
    return static_cast<std::uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<std::uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    std::uint32_t h = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  std::uint32_t h = (static_cast<std::uint32_t>(exp) << 10) | (mant >> 13);
  const std::uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

namespace detail {
inline std::uint16_t rd16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline float rdh(const std::uint8_t* p) { return fp16_to_float(rd16(p)); }

// Q4_K scales: 12 bytes hold eight 6-bit scales and eight 6-bit mins.
inline void q4k_scale_min(int j, const std::uint8_t* q, std::uint8_t& d, std::uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = static_cast<std::uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<std::uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}
}  // namespace detail

// Dequantises n elements (a multiple of the type's block) from src into dst.
inline void dequantize(ggml_type t, const std::uint8_t* src, float* dst, std::size_t n) {
  using detail::rd16;
  using detail::rdh;
  const TypeTraits tr = type_traits(t);
  if (!tr.name)
    throw std::runtime_error("gguf: unsupported tensor type " +
                             std::to_string(static_cast<unsigned>(t)));
  if (n % tr.block)
    throw std::runtime_error(std::string("gguf: element count not a multiple of the ") + tr.name +
                             " block");
  const std::size_t nb = n / tr.block;
  switch (t) {
    case ggml_type::f32:
      if (n) std::memcpy(dst, src, n * 4);  // an empty tensor's buffers may be null
      return;
    case ggml_type::f16:
      for (std::size_t i = 0; i < n; ++i) dst[i] = fp16_to_float(rd16(src + 2 * i));
      return;
    case ggml_type::bf16:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t bits = static_cast<std::uint32_t>(rd16(src + 2 * i)) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    case ggml_type::q4_0:  // d (f16), 16 bytes of nibbles: x = (q - 8) * d; low nibbles first half
      for (std::size_t b = 0; b < nb; ++b, src += 18, dst += 32) {
        const float d = rdh(src);
        for (int j = 0; j < 16; ++j) {
          dst[j] = static_cast<float>((src[2 + j] & 0xF) - 8) * d;
          dst[j + 16] = static_cast<float>((src[2 + j] >> 4) - 8) * d;
        }
      }
      return;
    case ggml_type::q4_1:  // d, m (f16), nibbles: x = q * d + m
      for (std::size_t b = 0; b < nb; ++b, src += 20, dst += 32) {
        const float d = rdh(src), m = rdh(src + 2);
        for (int j = 0; j < 16; ++j) {
          dst[j] = static_cast<float>(src[4 + j] & 0xF) * d + m;
          dst[j + 16] = static_cast<float>(src[4 + j] >> 4) * d + m;
        }
      }
      return;
    case ggml_type::q5_0:  // d, u32 high bits, nibbles: x = (q5 - 16) * d
    case ggml_type::q5_1:  // d, m, u32 high bits, nibbles: x = q5 * d + m
      for (std::size_t b = 0; b < nb; ++b, src += tr.bytes, dst += 32) {
        const bool one = t == ggml_type::q5_1;
        const float d = rdh(src), m = one ? rdh(src + 2) : 0.0f;
        const std::uint8_t* hp = src + (one ? 4 : 2);
        std::uint32_t qh;
        std::memcpy(&qh, hp, 4);
        const std::uint8_t* qs = hp + 4;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 0xF) | static_cast<int>(((qh >> j) & 1u) << 4);
          const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
          dst[j] = one ? static_cast<float>(lo) * d + m : static_cast<float>(lo - 16) * d;
          dst[j + 16] = one ? static_cast<float>(hi) * d + m : static_cast<float>(hi - 16) * d;
        }
      }
      return;
    case ggml_type::q8_0:  // d (f16), 32 int8: x = q * d
      for (std::size_t b = 0; b < nb; ++b, src += 34, dst += 32) {
        const float d = rdh(src);
        for (int j = 0; j < 32; ++j)
          dst[j] = static_cast<float>(static_cast<std::int8_t>(src[2 + j])) * d;
      }
      return;
    case ggml_type::q4_k:  // d, dmin (f16), 12 bytes scales, 128 bytes nibbles
      for (std::size_t b = 0; b < nb; ++b, src += 144) {
        const float d = rdh(src), dmin = rdh(src + 2);
        const std::uint8_t* sc = src + 4;
        const std::uint8_t* q = src + 16;
        int is = 0;
        for (int j = 0; j < 256; j += 64, q += 32, is += 2) {
          std::uint8_t s0, m0, s1, m1;
          detail::q4k_scale_min(is, sc, s0, m0);
          detail::q4k_scale_min(is + 1, sc, s1, m1);
          const float d1 = d * s0, mm1 = dmin * m0, d2 = d * s1, mm2 = dmin * m1;
          for (int l = 0; l < 32; ++l) *dst++ = d1 * static_cast<float>(q[l] & 0xF) - mm1;
          for (int l = 0; l < 32; ++l) *dst++ = d2 * static_cast<float>(q[l] >> 4) - mm2;
        }
      }
      return;
    case ggml_type::q6_k:  // ql[128], qh[64], int8 scales[16], d (f16)
      for (std::size_t b = 0; b < nb; ++b, src += 210) {
        const std::uint8_t* ql = src;
        const std::uint8_t* qh = src + 128;
        const auto* sc = reinterpret_cast<const std::int8_t*>(src + 192);
        const float d = rdh(src + 208);
        for (int n0 = 0; n0 < 256; n0 += 128, ql += 64, qh += 32, sc += 8, dst += 128) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            dst[l] = d * sc[is] * static_cast<float>(q1);
            dst[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
            dst[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
            dst[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
          }
        }
      }
      return;
    default:
      throw std::runtime_error("gguf: unsupported tensor type");
  }
}

// ---- the file ----------------------------------------------------------------

enum class gguf_kind : std::uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

struct MetaValue {
  gguf_kind kind = gguf_kind::u32;
  gguf_kind elem = gguf_kind::u32;  // for arrays
  std::variant<std::int64_t, double, std::string> scalar;
  std::vector<std::string> strings;  // string arrays
  std::vector<double> numbers;       // numeric arrays
};

struct TensorInfo {
  std::string name;
  std::vector<std::uint64_t> dims;  // dims[0] contiguous
  ggml_type type = ggml_type::f32;
  std::uint64_t offset = 0;  // from the start of the data section
  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
  std::uint64_t bytes() const {
    const auto tr = type_traits(type);
    return tr.name ? elements() / tr.block * tr.bytes : 0;
  }
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("gguf: cannot open " + path);
    in.seekg(0, std::ios::end);
    const auto size = static_cast<std::size_t>(in.tellg());
    in.seekg(0);
    bytes_.resize(size);
    if (!in.read(reinterpret_cast<char*>(bytes_.data()), static_cast<std::streamsize>(size)))
      throw std::runtime_error("gguf: cannot read " + path);
    parse();
  }
  explicit GgufFile(std::vector<std::uint8_t> bytes) : bytes_(std::move(bytes)) { parse(); }

  std::uint32_t version() const { return version_; }
  const std::map<std::string, MetaValue>& metadata() const { return meta_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool has(const std::string& key) const { return meta_.count(key) != 0; }

  const MetaValue& meta(const std::string& key) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) throw std::runtime_error("gguf: missing metadata key " + key);
    return it->second;
  }
  std::int64_t get_int(const std::string& key) const {
    const auto& v = meta(key);
    if (auto* i = std::get_if<std::int64_t>(&v.scalar)) return *i;
    throw std::runtime_error("gguf: " + key + " is not an integer");
  }
  std::int64_t get_int(const std::string& key, std::int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
  }
  double get_float(const std::string& key) const {
    const auto& v = meta(key);
    if (auto* d = std::get_if<double>(&v.scalar)) return *d;
    if (auto* i = std::get_if<std::int64_t>(&v.scalar)) return static_cast<double>(*i);
    throw std::runtime_error("gguf: " + key + " is not a number");
  }
  double get_float(const std::string& key, double fallback) const {
    return has(key) ? get_float(key) : fallback;
  }
  std::string get_string(const std::string& key) const {
    const auto& v = meta(key);
    if (auto* s = std::get_if<std::string>(&v.scalar)) return *s;
    throw std::runtime_error("gguf: " + key + " is not a string");
  }

  const TensorInfo* find(const std::string& name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  const TensorInfo& tensor(const std::string& name) const {
    if (auto* t = find(name)) return *t;
    throw std::runtime_error("gguf: missing tensor " + name);
  }
  const std::uint8_t* data(const TensorInfo& t) const {
    return bytes_.data() + data_start_ + t.offset;
  }

  // The tensor dequantised to float, dims[0] contiguous.
  std::vector<float> to_float(const TensorInfo& t) const {
    std::vector<float> out(static_cast<std::size_t>(t.elements()));
    dequantize(t.type, data(t), out.data(), out.size());
    return out;
  }
  std::vector<float> to_float(const std::string& name) const { return to_float(tensor(name)); }

 private:
  std::vector<std::uint8_t> bytes_;
  std::size_t pos_ = 0, data_start_ = 0;
  std::uint32_t version_ = 0;
  std::map<std::string, MetaValue> meta_;
  std::vector<TensorInfo> tensors_;

  void need(std::size_t n) const {
    if (n > bytes_.size() || pos_ > bytes_.size() - n)
      throw std::runtime_error("gguf: truncated file");
  }
  template <class T>
  T rd() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string rd_string() {
    const auto n = rd<std::uint64_t>();
    need(static_cast<std::size_t>(n));
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }
  double rd_number(gguf_kind k, std::int64_t* as_int) {
    switch (k) {
      case gguf_kind::u8:
        return static_cast<double>(*as_int = rd<std::uint8_t>());
      case gguf_kind::i8:
        return static_cast<double>(*as_int = rd<std::int8_t>());
      case gguf_kind::u16:
        return static_cast<double>(*as_int = rd<std::uint16_t>());
      case gguf_kind::i16:
        return static_cast<double>(*as_int = rd<std::int16_t>());
      case gguf_kind::u32:
        return static_cast<double>(*as_int = rd<std::uint32_t>());
      case gguf_kind::i32:
        return static_cast<double>(*as_int = rd<std::int32_t>());
      case gguf_kind::boolean:
        return static_cast<double>(*as_int = rd<std::uint8_t>() != 0);
      case gguf_kind::u64:
        return static_cast<double>(*as_int = static_cast<std::int64_t>(rd<std::uint64_t>()));
      case gguf_kind::i64:
        return static_cast<double>(*as_int = rd<std::int64_t>());
      case gguf_kind::f32:
        return rd<float>();
      case gguf_kind::f64:
        return rd<double>();
      default:
        throw std::runtime_error("gguf: bad metadata type " +
                                 std::to_string(static_cast<unsigned>(k)));
    }
  }
  static bool is_float(gguf_kind k) { return k == gguf_kind::f32 || k == gguf_kind::f64; }

  void parse() {
    need(4);
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0)
      throw std::runtime_error("gguf: bad magic (not a GGUF file)");
    pos_ = 4;
    version_ = rd<std::uint32_t>();
    if (version_ < 2 || version_ > 3)
      throw std::runtime_error("gguf: unsupported version " + std::to_string(version_));
    const auto n_tensors = rd<std::uint64_t>(), n_kv = rd<std::uint64_t>();
    if (n_tensors > bytes_.size() || n_kv > bytes_.size())
      throw std::runtime_error("gguf: truncated file");
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = rd_string();
      MetaValue v;
      v.kind = static_cast<gguf_kind>(rd<std::uint32_t>());
      if (v.kind == gguf_kind::string) {
        v.scalar = rd_string();
      } else if (v.kind == gguf_kind::array) {
        v.elem = static_cast<gguf_kind>(rd<std::uint32_t>());
        const auto n = rd<std::uint64_t>();
        if (n > bytes_.size()) throw std::runtime_error("gguf: truncated file");
        if (v.elem == gguf_kind::string) {
          v.strings.reserve(static_cast<std::size_t>(n));
          for (std::uint64_t j = 0; j < n; ++j) v.strings.push_back(rd_string());
        } else if (v.elem == gguf_kind::array) {
          throw std::runtime_error("gguf: nested arrays are not supported (" + key + ")");
        } else {
          v.numbers.reserve(static_cast<std::size_t>(n));
          std::int64_t dummy = 0;
          for (std::uint64_t j = 0; j < n; ++j) v.numbers.push_back(rd_number(v.elem, &dummy));
        }
      } else {
        std::int64_t as_int = 0;
        const double d = rd_number(v.kind, &as_int);
        if (is_float(v.kind))
          v.scalar = d;
        else
          v.scalar = as_int;
      }
      meta_[std::move(key)] = std::move(v);
    }
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      TensorInfo t;
      t.name = rd_string();
      const auto nd = rd<std::uint32_t>();
      if (nd < 1 || nd > 4)
        throw std::runtime_error("gguf: tensor " + t.name + " has " + std::to_string(nd) + " dims");
      for (std::uint32_t j = 0; j < nd; ++j) t.dims.push_back(rd<std::uint64_t>());
      t.type = static_cast<ggml_type>(rd<std::uint32_t>());
      t.offset = rd<std::uint64_t>();
      tensors_.push_back(std::move(t));
    }
    std::int64_t align = 32;
    if (has("general.alignment")) align = get_int("general.alignment");
    // Bounded by the file, so the arithmetic below cannot wrap.
    if (align <= 0 || static_cast<std::uint64_t>(align) > bytes_.size())
      throw std::runtime_error("gguf: bad alignment " + std::to_string(align));
    const auto a = static_cast<std::size_t>(align);
    data_start_ = (pos_ + a - 1) / a * a;
    for (const auto& t : tensors_) {
      // Element counts that wrap 64 bits, or offsets past the file, are refused
      // before any sum that could wrap (a wrapped sum passed the range check).
      std::uint64_t n = 1;
      for (auto d : t.dims) {
        if (d != 0 && n > UINT64_MAX / d)
          throw std::runtime_error("gguf: tensor " + t.name + " has too many elements");
        n *= d;
      }
      const std::size_t room = data_start_ <= bytes_.size() ? bytes_.size() - data_start_ : 0;
      if (t.offset > room)
        throw std::runtime_error("gguf: tensor " + t.name + " starts past the end of the file");
      const auto tr = type_traits(t.type);
      if (!tr.name) continue;  // reported when the tensor is read
      if (t.elements() % tr.block)
        throw std::runtime_error("gguf: tensor " + t.name + " is not whole blocks");
      if (t.bytes() > room - t.offset ||
          (tr.bytes > tr.block && t.elements() / tr.block > room / tr.bytes))
        throw std::runtime_error("gguf: tensor " + t.name + " runs past the end of the file");
    }
  }
};

// ---- writing (tests, tools) ----------------------------------------------------

// Builds a GGUF v3 image in memory; tensors are given already encoded.
class GgufWriter {
 public:
  void add_u32(const std::string& k, std::uint32_t v) {
    kv(k, gguf_kind::u32);
    put(v);
  }
  void add_f32(const std::string& k, float v) {
    kv(k, gguf_kind::f32);
    put(v);
  }
  void add_bool(const std::string& k, bool v) {
    kv(k, gguf_kind::boolean);
    put(static_cast<std::uint8_t>(v));
  }
  void add_string(const std::string& k, const std::string& v) {
    kv(k, gguf_kind::string);
    str(meta_, v);
  }
  void add_strings(const std::string& k, const std::vector<std::string>& v) {
    kv(k, gguf_kind::array);
    put(static_cast<std::uint32_t>(gguf_kind::string));
    put(static_cast<std::uint64_t>(v.size()));
    for (const auto& s : v) str(meta_, s);
  }
  void add_i32s(const std::string& k, const std::vector<std::int32_t>& v) {
    kv(k, gguf_kind::array);
    put(static_cast<std::uint32_t>(gguf_kind::i32));
    put(static_cast<std::uint64_t>(v.size()));
    for (auto x : v) put(x);
  }
  void add_tensor(const std::string& name, std::vector<std::uint64_t> dims, ggml_type t,
                  const std::vector<std::uint8_t>& data) {
    while (data_.size() % 32) data_.push_back(0);
    std::vector<std::uint8_t>& o = infos_;
    str(o, name);
    append(o, static_cast<std::uint32_t>(dims.size()));
    for (auto d : dims) append(o, d);
    append(o, static_cast<std::uint32_t>(t));
    append(o, static_cast<std::uint64_t>(data_.size()));
    data_.insert(data_.end(), data.begin(), data.end());
    ++n_tensors_;
  }
  void add_f32_tensor(const std::string& name, std::vector<std::uint64_t> dims,
                      const std::vector<float>& v) {
    std::vector<std::uint8_t> b(v.size() * 4);
    std::memcpy(b.data(), v.data(), b.size());
    add_tensor(name, std::move(dims), ggml_type::f32, b);
  }
  std::vector<std::uint8_t> bytes() const {
    std::vector<std::uint8_t> out;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    append(out, std::uint32_t{3});
    append(out, static_cast<std::uint64_t>(n_tensors_));
    append(out, static_cast<std::uint64_t>(n_kv_));
    out.insert(out.end(), meta_.begin(), meta_.end());
    out.insert(out.end(), infos_.begin(), infos_.end());
    while (out.size() % 32) out.push_back(0);
    out.insert(out.end(), data_.begin(), data_.end());
    return out;
  }
  void write(const std::string& path) const {
    const auto b = bytes();
    std::ofstream o(path, std::ios::binary);
    o.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    if (!o) throw std::runtime_error("gguf: cannot write " + path);
  }

 private:
  std::vector<std::uint8_t> meta_, infos_, data_;
  std::size_t n_kv_ = 0, n_tensors_ = 0;
  template <class T>
  static void append(std::vector<std::uint8_t>& o, T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    o.insert(o.end(), p, p + sizeof(T));
  }
  template <class T>
  void put(T v) {
    append(meta_, v);
  }
  static void str(std::vector<std::uint8_t>& o, const std::string& s) {
    append(o, static_cast<std::uint64_t>(s.size()));
    o.insert(o.end(), s.begin(), s.end());
  }
  void kv(const std::string& k, gguf_kind t) {
    str(meta_, k);
    put(static_cast<std::uint32_t>(t));
    ++n_kv_;
  }
};

}  // namespace llm
