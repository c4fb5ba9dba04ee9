// The GGUF reader and the dequantisers, on files these tests write themselves.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "gguf.hpp"

using namespace llm;

namespace {
void put16(std::vector<std::uint8_t>& b, std::uint16_t v) {
  b.push_back(static_cast<std::uint8_t>(v & 0xff));
  b.push_back(static_cast<std::uint8_t>(v >> 8));
}
std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() / (std::string("cake_llm_test_") + name)).string();
}
}  // namespace

TEST_CASE("fp16 conversion: exact values, subnormals, infinities") {
  CHECK(fp16_to_float(0x3C00) == 1.0f);
  CHECK(fp16_to_float(0xC000) == -2.0f);
  CHECK(fp16_to_float(0x7BFF) == 65504.0f);
  CHECK(fp16_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(fp16_to_float(0x0400) == std::ldexp(1.0f, -14));
  CHECK(std::isinf(fp16_to_float(0x7C00)));
  CHECK(std::isnan(fp16_to_float(0x7E00)));
  for (float f :
       {0.0f, 1.0f, -0.5f, 3.140625f, 65504.0f, std::ldexp(1.0f, -24), -std::ldexp(3.0f, -20)})
    CHECK(fp16_to_float(float_to_fp16(f)) == f);
}

TEST_CASE("GGUF round trip: metadata of every kind and tensors of every supported type") {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 7);
  w.add_f32("llama.rope.freq_base", 100000.0f);
  w.add_bool("tokenizer.ggml.add_bos_token", false);
  w.add_strings("tokenizer.ggml.tokens", {"a", "b",
                                          "\xC4\xA0"
                                          "c"});
  w.add_i32s("tokenizer.ggml.token_type", {1, 3, 1});

  // F32 and F16.
  const std::vector<float> f32{1.5f, -2.25f, 0.0f, 1e-3f};
  w.add_f32_tensor("t.f32", {2, 2}, f32);
  std::vector<std::uint8_t> f16;
  const std::vector<float> f16v{0.5f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)};
  for (float x : f16v) put16(f16, float_to_fp16(x));
  w.add_tensor("t.f16", {4}, ggml_type::f16, f16);

  // Q8_0: d = 0.5, q_j = j*8 - 128 (clamped to int8), x = q * d.
  std::vector<std::uint8_t> q8;
  put16(q8, float_to_fp16(0.5f));
  std::vector<float> q8v;
  for (int j = 0; j < 32; ++j) {
    const int q = std::min(j * 8 - 128, 127);
    q8.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(q)));
    q8v.push_back(q * 0.5f);
  }
  w.add_tensor("t.q8_0", {32}, ggml_type::q8_0, q8);

  // Q4_0: d = 0.25; element j < 16 is byte j's low nibble, j + 16 its high nibble; x = (q - 8) d.
  std::vector<std::uint8_t> q40;
  put16(q40, float_to_fp16(0.25f));
  std::vector<float> q40v(32);
  for (int j = 0; j < 16; ++j) {
    const int lo = j, hi = 15 - j;
    q40.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
    q40v[static_cast<std::size_t>(j)] = (lo - 8) * 0.25f;
    q40v[static_cast<std::size_t>(j + 16)] = (hi - 8) * 0.25f;
  }
  w.add_tensor("t.q4_0", {32}, ggml_type::q4_0, q40);

  // Q4_1 (two blocks): d, m; x = q d + m.
  std::vector<std::uint8_t> q41;
  std::vector<float> q41v(64);
  for (int b = 0; b < 2; ++b) {
    const float d = b ? 0.5f : 0.125f, m = b ? -1.0f : 3.0f;
    put16(q41, float_to_fp16(d));
    put16(q41, float_to_fp16(m));
    for (int j = 0; j < 16; ++j) {
      const int lo = (j * 3) % 16, hi = (j * 7 + 1) % 16;
      q41.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
      q41v[static_cast<std::size_t>(32 * b + j)] = lo * d + m;
      q41v[static_cast<std::size_t>(32 * b + j + 16)] = hi * d + m;
    }
  }
  w.add_tensor("t.q4_1", {64}, ggml_type::q4_1, q41);

  // Q6_K: 6-bit q in ql (low 4 bits) and qh (high 2 bits), 16 int8 scales, d last.
  // Element e = 128 h + 32 k + l (h half, k quarter, l < 32) uses ql[64h + l + 32 (k odd)]
  // nibble (k >= 2 ? high : low), qh[32h + l] bits 2k..2k+1, scale 8h + l/16 + 2k.
  std::vector<int> q6(256), sc6(16);
  for (int e = 0; e < 256; ++e) q6[static_cast<std::size_t>(e)] = (e * 37 + 11) % 64;
  for (int s = 0; s < 16; ++s) sc6[static_cast<std::size_t>(s)] = s - 8;
  std::vector<std::uint8_t> q6k(210, 0);
  std::vector<float> q6v(256);
  const float d6 = 0.0625f;
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const int e = 128 * h + 32 * k + l, q = q6[static_cast<std::size_t>(e)];
        auto& qlb = q6k[static_cast<std::size_t>(64 * h + l + (k % 2 ? 32 : 0))];
        qlb = static_cast<std::uint8_t>(qlb | ((q & 0xF) << (k >= 2 ? 4 : 0)));
        auto& qhb = q6k[static_cast<std::size_t>(128 + 32 * h + l)];
        qhb = static_cast<std::uint8_t>(qhb | ((q >> 4) << (2 * k)));
        q6v[static_cast<std::size_t>(e)] =
            d6 * static_cast<float>(sc6[static_cast<std::size_t>(8 * h + l / 16 + 2 * k)]) *
            static_cast<float>(q - 32);
      }
  for (int s = 0; s < 16; ++s)
    q6k[static_cast<std::size_t>(192 + s)] =
        static_cast<std::uint8_t>(static_cast<std::int8_t>(sc6[static_cast<std::size_t>(s)]));
  const std::uint16_t dh = float_to_fp16(d6);
  q6k[208] = static_cast<std::uint8_t>(dh & 0xff);
  q6k[209] = static_cast<std::uint8_t>(dh >> 8);
  w.add_tensor("t.q6_k", {256}, ggml_type::q6_k, q6k);

  // Q4_K with 6-bit scales below 16 (so the packing's high bits are zero):
  // sub-block j (32 elements) has scale s_j, min m_j; x = d s_j q - dmin m_j;
  // sub-blocks 2i and 2i+1 share bytes 32i.. as low and high nibbles.
  std::vector<std::uint8_t> q4k;
  const float d4 = 0.5f, dmin4 = 0.25f;
  put16(q4k, float_to_fp16(d4));
  put16(q4k, float_to_fp16(dmin4));
  int s4[8], m4[8];
  for (int j = 0; j < 8; ++j) {
    s4[j] = j + 1;
    m4[j] = 15 - j;
  }
  std::uint8_t scales[12] = {};
  for (int j = 0; j < 4; ++j) {
    scales[j] = static_cast<std::uint8_t>(s4[j]);
    scales[j + 4] = static_cast<std::uint8_t>(m4[j]);
    scales[j + 8] = static_cast<std::uint8_t>(s4[j + 4] | (m4[j + 4] << 4));
  }
  q4k.insert(q4k.end(), scales, scales + 12);
  std::vector<float> q4kv(256);
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      const int lo = (l + i) % 16, hi = (3 * l + i) % 16;
      q4k.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
      q4kv[static_cast<std::size_t>(64 * i + l)] = d4 * s4[2 * i] * lo - dmin4 * m4[2 * i];
      q4kv[static_cast<std::size_t>(64 * i + 32 + l)] =
          d4 * s4[2 * i + 1] * hi - dmin4 * m4[2 * i + 1];
    }
  w.add_tensor("t.q4_k", {256}, ggml_type::q4_k, q4k);

  const std::string path = temp_path("roundtrip.gguf");
  w.write(path);
  const GgufFile f(path);
  std::remove(path.c_str());

  CHECK(f.version() == 3);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_int("llama.block_count") == 7);
  CHECK(f.get_float("llama.rope.freq_base") == 100000.0);
  CHECK(f.get_int("tokenizer.ggml.add_bos_token") == 0);
  CHECK(f.get_int("missing.key", 42) == 42);
  CHECK_THROWS(f.get_int("missing.key"));
  CHECK(f.meta("tokenizer.ggml.tokens").strings == std::vector<std::string>{"a", "b",
                                                                            "\xC4\xA0"
                                                                            "c"});
  CHECK(f.meta("tokenizer.ggml.token_type").numbers == std::vector<double>{1, 3, 1});
  CHECK(f.tensors().size() == 7);
  CHECK(f.tensor("t.f32").dims == std::vector<std::uint64_t>{2, 2});
  CHECK(f.to_float("t.f32") == f32);
  CHECK(f.to_float("t.f16") == f16v);
  CHECK(f.to_float("t.q8_0") == q8v);
  CHECK(f.to_float("t.q4_0") == q40v);
  CHECK(f.to_float("t.q4_1") == q41v);
  CHECK(f.to_float("t.q6_k") == q6v);
  CHECK(f.to_float("t.q4_k") == q4kv);
  CHECK(f.find("nope") == nullptr);
  CHECK_THROWS(f.tensor("nope"));
}

TEST_CASE("GGUF reader rejects malformed files") {
  GgufWriter w;
  w.add_u32("a", 1);
  w.add_f32_tensor("t", {8}, std::vector<float>(8, 1.0f));
  auto good = w.bytes();
  CHECK_NOTHROW(GgufFile{good});

  auto bad_magic = good;
  bad_magic[0] = 'X';
  CHECK_THROWS_WITH(GgufFile{bad_magic}, doctest::Contains("magic"));
  auto bad_version = good;
  bad_version[4] = 9;
  CHECK_THROWS_WITH(GgufFile{bad_version}, doctest::Contains("version"));
  for (std::size_t cut : {std::size_t{3}, std::size_t{20}, std::size_t{40}, good.size() - 1}) {
    std::vector<std::uint8_t> t(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut));
    CHECK_THROWS(GgufFile{t});
  }
  CHECK_THROWS(GgufFile{std::string("/nonexistent/model.gguf")});
  std::vector<float> out(32);
  const std::vector<std::uint8_t> junk(64, 0);
  CHECK_THROWS_WITH(dequantize(static_cast<ggml_type>(99), junk.data(), out.data(), 32),
                    doctest::Contains("unsupported"));
  CHECK_THROWS_WITH(dequantize(ggml_type::q8_0, junk.data(), out.data(), 31),
                    doctest::Contains("multiple"));
}
