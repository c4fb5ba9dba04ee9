// Regression tests for what the fuzzers found (tests/fuzz; README, "Reliability").
// Each input here crashed, read out of bounds or hit undefined behaviour before
// its fix; now each must throw the reader's error.
#include <doctest/doctest.h>

#include <cake/cake.hpp>
#include <cake/methods.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "cake_tools/json.hpp"
#include "cake_tools/npy.hpp"
#include "gguf.hpp"

namespace {

// ---- GGUF images byte by byte (the writer cannot make malformed ones) ----------
struct Image {
  std::vector<std::uint8_t> b;
  template <class T>
  Image& put(T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
    return *this;
  }
  Image& str(const std::string& s) {
    put(static_cast<std::uint64_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  // Header, n_tensors tensors and n_kv metadata entries to follow.
  static Image header(std::uint64_t n_tensors, std::uint64_t n_kv) {
    Image i;
    i.b = {'G', 'G', 'U', 'F'};
    i.put(std::uint32_t{3}).put(n_tensors).put(n_kv);
    return i;
  }
  Image& tensor(const std::string& name, std::vector<std::uint64_t> dims, std::uint32_t type,
                std::uint64_t offset) {
    str(name).put(static_cast<std::uint32_t>(dims.size()));
    for (auto d : dims) put(d);
    return put(type).put(offset);
  }
  Image& data(std::size_t bytes) {
    while (b.size() % 32) b.push_back(0);
    b.resize(b.size() + bytes, 0);
    return *this;
  }
};

std::string temp_file(const std::string& name, const std::string& bytes) {
  const auto p = std::filesystem::temp_directory_path() / name;
  std::ofstream(p, std::ios::binary) << bytes;
  return p.string();
}

std::string npy(const std::string& descr, const std::string& shape, const std::string& payload,
                std::uint16_t header_len_override = 0) {
  std::string h = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  const std::uint16_t n =
      header_len_override ? header_len_override : static_cast<std::uint16_t>(h.size());
  std::string out = "\x93NUMPY\x01";
  out += '\0';
  out += static_cast<char>(n & 0xff);
  out += static_cast<char>(n >> 8);
  return out + h + payload;
}

}  // namespace

TEST_CASE(
    "regression: a GGUF tensor offset near 2^64 is refused, not wrapped past the range check") {
  // Before the fix, data_start + offset + bytes wrapped around and passed the check;
  // to_float then read from a wild pointer.
  auto img = Image::header(1, 0).tensor("w", {8}, 0, UINT64_MAX - 16).data(32);
  CHECK_THROWS_WITH_AS(llm::GgufFile{img.b}, doctest::Contains("past the end"), std::runtime_error);
  // The same for a type the reader does not know (it skipped the range check).
  auto unknown = Image::header(1, 0).tensor("w", {8}, 99, UINT64_MAX - 16).data(32);
  CHECK_THROWS_WITH_AS(llm::GgufFile{unknown.b}, doctest::Contains("past the end"),
                       std::runtime_error);
}

TEST_CASE("regression: GGUF dimensions whose product wraps 64 bits are refused") {
  auto img = Image::header(1, 0).tensor("w", {1ull << 32, 1ull << 32, 2}, 0, 0).data(64);
  CHECK_THROWS_WITH_AS(llm::GgufFile{img.b}, doctest::Contains("too many elements"),
                       std::runtime_error);
  // f32 bytes (elements * 4) that wrap although the element count does not.
  auto wide = Image::header(1, 0).tensor("w", {1ull << 62}, 0, 0).data(64);
  CHECK_THROWS_WITH_AS(llm::GgufFile{wide.b}, doctest::Contains("past the end"),
                       std::runtime_error);
}

TEST_CASE("regression: a GGUF alignment beyond the file is refused") {
  auto img = Image::header(0, 1).str("general.alignment").put(std::uint32_t{10});  // i64 kind
  img.put(std::int64_t{-1}).data(0);
  CHECK_THROWS_WITH_AS(llm::GgufFile{img.b}, doctest::Contains("alignment"), std::runtime_error);
}

TEST_CASE("regression: an empty GGUF tensor dequantises to nothing (no memcpy to null)") {
  auto img = Image::header(1, 0).tensor("w", {0}, 0, 0).data(0);
  const llm::GgufFile f(img.b);
  CHECK(f.to_float("w").empty());
}

TEST_CASE("regression: truncated or deeply nested JSON throws instead of reading past the text") {
  using cake_tools::Json;
  for (const char* bad : {"[", "{\"a\"", "{\"a\":1", "\"abc", "\"\\u12", "[1,", "{", "{\"a\":[1,2",
                          "[\"abc", "{\"a\":\"x", "[\"\\u1", "{\"ab"})
    CHECK_THROWS_AS(Json::parse(bad), std::runtime_error);
  CHECK_THROWS_WITH_AS(Json::parse(std::string(100000, '[')), doctest::Contains("deeply"),
                       std::runtime_error);
  // Still parses what it should.
  const auto j = Json::parse("{\"a\": [1, 2.5], \"b\": \"x\\u0041\"}");
  CHECK(j["a"].arr.size() == 2);
  CHECK(j["a"].arr[1].num == 2.5);
}

TEST_CASE("regression: .npy readers refuse what they cannot hold") {
  using cake_tools::load_npy;
  // A float64 value outside int64 read as integers: was an undefined cast.
  const double huge = -2.5e284;
  std::string payload(reinterpret_cast<const char*>(&huge), sizeof huge);
  auto a = load_npy(temp_file("cake_reg_f8.npy", npy("<f8", "(1,)", payload)));
  CHECK(a.as<double>()[0] == huge);
  CHECK_THROWS_AS(a.as<std::int64_t>(), std::runtime_error);
  // A shape of 10^12 elements in a tiny file: refused before allocating.
  CHECK_THROWS_WITH_AS(
      load_npy(temp_file("cake_reg_big.npy", npy("<f4", "(1000000, 1000000)", ""))),
      doctest::Contains("truncated"), std::runtime_error);
  // Dimensions whose product wraps 64 bits, made empty by a zero last: the reader
  // accepted them (no data is needed) and size() then overflowed a signed product
  // (undefined behaviour; found by fuzz_golden in CI). Now size() is 0.
  auto empty =
      load_npy(temp_file("cake_reg_wrap.npy", npy("<f4", "(999999999999, 999999999999, 0)", "")));
  CHECK(empty.size() == 0);
  CHECK(empty.as<float>().empty());
  // The same dimensions without the zero: refused as truncated, as before.
  CHECK_THROWS_WITH_AS(
      load_npy(temp_file("cake_reg_wrap2.npy", npy("<f4", "(999999999999, 999999999999)", ""))),
      doctest::Contains("truncated"), std::runtime_error);
  // The same product on an array built directly: an error, not a wrapped count.
  cake_tools::NpyArray direct;
  direct.shape = {std::int64_t{1} << 32, std::int64_t{1} << 32, 1};
  CHECK_THROWS_WITH_AS((void)direct.size(), doctest::Contains("overflows"), std::runtime_error);
  direct.shape = {std::int64_t{1} << 32, std::int64_t{1} << 32, 0};
  CHECK(direct.size() == 0);
  // A header length past the end of the file.
  CHECK_THROWS_AS(load_npy(temp_file("cake_reg_hdr.npy", npy("<f4", "(1,)", "", 60000))),
                  std::runtime_error);
  // An unsupported dtype is named before any allocation.
  CHECK_THROWS_WITH_AS(
      load_npy(temp_file("cake_reg_dt.npy", npy("<c8", "(2,)", std::string(16, 'x')))),
      doctest::Contains("dtype"), std::runtime_error);
}

// Finding 7 (fixed): finite keys and queries whose dot products overflow float made a
// score row's maximum +inf; the softmax then evaluated exp_approx(inf - inf), casting
// NaN to int (undefined behaviour) and giving garbage statistics with no error. Found
// by fuzz_kv_cache with values of 3e38. The finite check now also bounds |q| and |k|
// (detail::score_bound), so the call throws cake::error and nothing changes.
TEST_CASE("regression: finite inputs whose attention scores overflow float are refused") {
  cake::CacheConfig cfg{.layers = 1,
                        .batch = 1,
                        .q_heads = 1,
                        .kv_heads = 1,
                        .head_dim = 4,
                        .window = 2,
                        .cache_size = 4};
  const cake::index_t S = 12;
  std::vector<float> q(2 * 4, 3e38f), k(S * 4, 1.0f), v(S * 4, 1.0f);
  for (int x = 0; x < 4; ++x) k[static_cast<std::size_t>(3 * 4 + x)] = 3e38f;  // one huge key
  cake::methods::H2o<> c(cfg);
  auto qv = cake::make_view(q.data(), std::array<cake::index_t, 4>{1, 1, 2, 4});
  auto kv = cake::make_view(k.data(), std::array<cake::index_t, 4>{1, 1, S, 4});
  auto vv = cake::make_view(v.data(), std::array<cake::index_t, 4>{1, 1, S, 4});
  CHECK_THROWS_AS(c.prefill(0, qv, kv, vv), cake::error);
}

// Runs f in a child process; true when the child exits normally with status 0 (an
// assertion or a sanitizer abort in f then fails a check instead of the suite).
template <class F>
bool survives(F f) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    // The child dies by the default action, not through doctest's crash report.
    for (int sig : {SIGABRT, SIGSEGV, SIGILL, SIGFPE, SIGBUS}) std::signal(sig, SIG_DFL);
    f();
    std::_Exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Finding 6 (fixed): a prompt of exactly the window (S = w, accepted by
// validate_prefill) leaves no prefix, P = 0, and KvCache::score_layer built the
// (batch, kv_heads, P) indicator view with strides (0, 0, 1), which violates
// layout_stride's precondition (every stride > 0): Debug builds aborted on CCCL's
// assertion. Found by the differential test under the sanitize preset. Run in a child
// process so that such an abort fails this check instead of the whole suite.
TEST_CASE("regression: a prompt of exactly the window prefills without tripping a precondition") {
  const bool ok = survives([] {
    cake::CacheConfig cfg{.layers = 2,
                          .batch = 1,
                          .q_heads = 2,
                          .kv_heads = 1,
                          .head_dim = 4,
                          .window = 4,
                          .cache_size = 8};
    std::vector<float> q(2 * 4 * 4, 0.5f), k(4 * 4, 0.25f), v(4 * 4, 1.0f);
    cake::methods::SnapKv<> c(cfg);
    for (cake::index_t l = 0; l < 2; ++l)
      c.prefill(l, cake::make_view(q.data(), std::array<cake::index_t, 4>{1, 2, 4, 4}),
                cake::make_view(k.data(), std::array<cake::index_t, 4>{1, 1, 4, 4}),
                cake::make_view(v.data(), std::array<cake::index_t, 4>{1, 1, 4, 4}));
    if (c.tokens_held() != 8) std::_Exit(3);  // both layers hold their 4 window tokens
  });
  CHECK(ok);
}
