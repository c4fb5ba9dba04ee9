// compact: gather kept token rows, in place when the keep rows ascend.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

using cake::index_t;

namespace compact_test {
// src(b, g, t, x) = 1000 b + 100 g + t + x / 100
inline std::vector<float> make_src(index_t B, index_t G, index_t S, index_t d) {
  std::vector<float> v(static_cast<std::size_t>(B * G * S * d));
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < G; ++g)
      for (index_t t = 0; t < S; ++t)
        for (index_t x = 0; x < d; ++x)
          v[static_cast<std::size_t>(((b * G + g) * S + t) * d + x)] =
              static_cast<float>(1000 * b + 100 * g + t) + static_cast<float>(x) / 100.0f;
  return v;
}
inline float expected(index_t b, index_t g, index_t t, index_t x) {
  return static_cast<float>(1000 * b + 100 * g + t) + static_cast<float>(x) / 100.0f;
}
}  // namespace compact_test

using namespace compact_test;

TEST_CASE("compact: gather into a separate buffer") {
  const index_t B = 2, G = 3, S = 20, d = 5, m = 4;
  const auto src = make_src(B, G, S, d);
  // Different, unordered keep per row (repeats allowed out of place).
  std::vector<std::int32_t> keep(static_cast<std::size_t>(B * G * m));
  for (index_t r = 0; r < B * G; ++r) {
    keep[static_cast<std::size_t>(r * m + 0)] = static_cast<std::int32_t>((7 * r + 3) % S);
    keep[static_cast<std::size_t>(r * m + 1)] = 0;
    keep[static_cast<std::size_t>(r * m + 2)] = static_cast<std::int32_t>(S - 1);
    keep[static_cast<std::size_t>(r * m + 3)] = static_cast<std::int32_t>((7 * r + 3) % S);
  }
  std::vector<float> dst(static_cast<std::size_t>(B * G * m * d), -1.0f);
  cake::compact(cake::host, cake::make_view(src.data(), std::array<index_t, 4>{B, G, S, d}),
                cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}),
                cake::make_view(dst.data(), std::array<index_t, 4>{B, G, m, d}));
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < G; ++g)
      for (index_t t = 0; t < m; ++t)
        for (index_t x = 0; x < d; ++x)
          REQUIRE(dst[static_cast<std::size_t>(((b * G + g) * m + t) * d + x)] ==
                  expected(b, g, keep[static_cast<std::size_t>((b * G + g) * m + t)], x));
  SUBCASE("threads(1) and threads(2) agree") {
    std::vector<float> d1(dst.size()), d2(dst.size());
    cake::compact(cake::host.threads(1),
                  cake::make_view(src.data(), std::array<index_t, 4>{B, G, S, d}),
                  cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}),
                  cake::make_view(d1.data(), std::array<index_t, 4>{B, G, m, d}));
    cake::compact(cake::host.threads(2).parallel_from(0),
                  cake::make_view(src.data(), std::array<index_t, 4>{B, G, S, d}),
                  cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}),
                  cake::make_view(d2.data(), std::array<index_t, 4>{B, G, m, d}));
    CHECK(d1 == dst);
    CHECK(d2 == dst);
  }
}

TEST_CASE("compact: in place with ascending keep") {
  const index_t B = 2, G = 2, S = 12, d = 3, m = 5;
  auto buf = make_src(B, G, S, d);
  std::vector<index_t> keep{0, 2, 3, 9, 11, 1, 4, 5, 6, 7, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4};
  auto v = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, S, d});
  // dst: the first m token rows of each (b, g) row of the same buffer.
  auto dst = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, m, d},
                             std::array<index_t, 4>{G * S * d, S * d, d, 1});
  cake::compact(cake::host, v, cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}), dst);
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < G; ++g) {
      for (index_t t = 0; t < m; ++t)
        for (index_t x = 0; x < d; ++x)
          REQUIRE(dst(b, g, t, x) ==
                  expected(b, g, keep[static_cast<std::size_t>((b * G + g) * m + t)], x));
      // Rows past m are untouched.
      for (index_t t = m; t < S; ++t) REQUIRE(v(b, g, t, 0) == expected(b, g, t, 0));
    }
}

TEST_CASE("compact: in place with non-ascending keep throws and leaves dst untouched") {
  const index_t B = 1, G = 2, S = 10, d = 4, m = 3;
  auto buf = make_src(B, G, S, d);
  const auto before = buf;
  std::vector<index_t> keep{1, 2, 3, 4, 3, 5};  // second row descends at t = 1
  auto v = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, S, d});
  auto dst = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, m, d},
                             std::array<index_t, 4>{G * S * d, S * d, d, 1});
  try {
    cake::compact(cake::host, v, cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}),
                  dst);
    FAIL("expected a throw");
  } catch (const cake::invalid_argument& e) {
    CHECK(e.id() == "cake.compact.keep");
    const std::string msg = e.what();
    CHECK(msg.find("[cake.compact.keep]") == 0);
    CHECK(msg.find("keep(0, 1, 1) = 3 follows 4") != std::string::npos);
  }
  CHECK(buf == before);  // the first row (valid) was not compacted either
  SUBCASE("repeated index in place also throws") {
    std::vector<index_t> rep{1, 1, 3, 4, 5, 6};
    CHECK_THROWS_AS(
        cake::compact(cake::host, v, cake::make_view(rep.data(), std::array<index_t, 3>{B, G, m}),
                      dst),
        cake::invalid_argument);
    CHECK(buf == before);
  }
}

TEST_CASE("compact: out-of-range index throws") {
  const index_t B = 1, G = 1, S = 6, d = 2, m = 2;
  const auto src = make_src(B, G, S, d);
  std::vector<float> dst(static_cast<std::size_t>(m * d), -1.0f);
  for (index_t bad : {index_t{6}, index_t{-1}, index_t{100}}) {
    std::vector<index_t> keep{0, bad};
    try {
      cake::compact(cake::host, cake::make_view(src.data(), std::array<index_t, 4>{B, G, S, d}),
                    cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}),
                    cake::make_view(dst.data(), std::array<index_t, 4>{B, G, m, d}));
      FAIL("expected a throw");
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == "cake.compact.keep");
      const std::string msg = e.what();
      CHECK(msg.find("[0, 6)") != std::string::npos);
      CHECK(msg.find("got " + std::to_string(bad)) != std::string::npos);
    }
    CHECK(dst == std::vector<float>(static_cast<std::size_t>(m * d), -1.0f));
  }
  SUBCASE("shape mismatch") {
    std::vector<index_t> keep{0, 1, 2};
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, cake::make_view(src.data(), std::array<index_t, 4>{B, G, S, d}),
                      cake::make_view(keep.data(), std::array<index_t, 3>{B, G, 3}),
                      cake::make_view(dst.data(), std::array<index_t, 4>{B, G, m, d})),
        doctest::Contains("[cake.compact.dst]"), cake::invalid_argument);
  }
}

TEST_CASE("compact: strided src ([B,S,G,d] memory seen as (B,G,S,d))") {
  const index_t B = 2, G = 3, S = 9, d = 4, m = 3;
  std::vector<float> bsgd(static_cast<std::size_t>(B * S * G * d));
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < S; ++s)
      for (index_t g = 0; g < G; ++g)
        for (index_t x = 0; x < d; ++x)
          bsgd[static_cast<std::size_t>(((b * S + s) * G + g) * d + x)] = expected(b, g, s, x);
  auto src =
      cake::make_view(static_cast<const float*>(bsgd.data()), std::array<index_t, 4>{B, G, S, d},
                      std::array<index_t, 4>{S * G * d, d, G * d, 1});
  std::vector<index_t> keep(static_cast<std::size_t>(B * G * m));
  for (std::size_t i = 0; i < keep.size(); ++i) keep[i] = static_cast<index_t>((i * 5) % S);
  // dst strided too: (B, G, m, d) inside a buffer with padding between token rows.
  const index_t ld = d + 2;
  std::vector<float> dst(static_cast<std::size_t>(B * G * m * ld), -1.0f);
  auto dv = cake::make_view(dst.data(), std::array<index_t, 4>{B, G, m, d},
                            std::array<index_t, 4>{G * m * ld, m * ld, ld, 1});
  cake::compact(cake::host, src, cake::make_view(keep.data(), std::array<index_t, 3>{B, G, m}), dv);
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < G; ++g)
      for (index_t t = 0; t < m; ++t) {
        for (index_t x = 0; x < d; ++x)
          REQUIRE(dv(b, g, t, x) ==
                  expected(b, g, keep[static_cast<std::size_t>((b * G + g) * m + t)], x));
        REQUIRE(dst[static_cast<std::size_t>(((b * G + g) * m + t) * ld + d)] ==
                -1.0f);  // padding untouched
      }
}

TEST_CASE("validate_compact reports bad host indices without throwing or writing") {
  // The checks live in the front-end, shared by every backend reading host memory
  // (they used to run inside the host backend only, so validate_compact passed them).
  const index_t B = 1, G = 2, S = 5, d = 2, m = 2;
  auto buf = make_src(B, G, S, d);
  const auto before = buf;
  const auto src =
      cake::make_view(static_cast<const float*>(buf.data()), std::array<index_t, 4>{B, G, S, d});
  std::vector<float> out(static_cast<std::size_t>(B * G * m * d), -1.0f);
  const auto dst = cake::make_view(out.data(), std::array<index_t, 4>{B, G, m, d});
  std::vector<std::int32_t> keep{0, 4, 2, 5};
  const auto kv = cake::make_view(static_cast<const std::int32_t*>(keep.data()),
                                  std::array<index_t, 3>{B, G, m});
  cake::status st = cake::validate_compact(src, kv, dst);
  CHECK_FALSE(st.ok());
  CHECK(st.message == "[cake.compact.keep] keep(0, 1, 1) must be in [0, 5), got 5");
  keep[3] = 4;
  CHECK(cake::validate_compact(src, kv, dst).ok());
  SUBCASE("in place: the aliasing view must ascend") {
    keep = {3, 1, 0, 1};
    const auto self = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, m, d},
                                      std::array<index_t, 4>{G * S * d, S * d, d, 1});
    st = cake::validate_compact(src, kv, self);
    CHECK(st.message ==
          "[cake.compact.keep] in-place compaction needs strictly ascending keep rows; "
          "keep(0, 0, 1) = 1 follows 3");
    CHECK(buf == before);
  }
  CHECK(out == std::vector<float>(out.size(), -1.0f));
}

TEST_CASE(
    "compact: dst overlapping src other than as its row prefix is rejected, nothing written") {
  const index_t B = 1, G = 2, S = 4, d = 3;
  auto buf = make_src(B, G, S, d);
  const auto before = buf;
  auto src = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, S, d});
  SUBCASE("same start, dst contiguous (1, 2, 2, d): row 1 of dst is tokens 2, 3 of src row 0") {
    // Each row ascends, and the base pointers are equal, yet dst row (0, 1) overwrites
    // the src tokens row (0, 0) reads.
    std::vector<index_t> keep{2, 3, 0, 1};
    auto dst = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, 2, d});
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, src,
                      cake::make_view(keep.data(), std::array<index_t, 3>{B, G, 2}), dst),
        doctest::Contains("[cake.compact.layout] dst overlaps src, so it must be src's first m "
                          "tokens of each row (same data pointer and strides); src strides (24, "
                          "12, 3, 1), dst strides (12, 6, 3, 1)"),
        cake::invalid_argument);
    CHECK(buf == before);
  }
  SUBCASE("dst one token after src, same strides") {
    std::vector<index_t> keep{0, 1, 2, 0, 1, 2};
    auto dst = cake::make_view(buf.data() + d, std::array<index_t, 4>{B, G, 3, d},
                               std::array<index_t, 4>{G * S * d, S * d, d, 1});
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, src,
                      cake::make_view(keep.data(), std::array<index_t, 3>{B, G, 3}), dst),
        doctest::Contains("dst starts 12 bytes after src"), cake::invalid_argument);
    CHECK(buf == before);
    // The same rule holds for device views (checked from pointers alone, nothing read).
    const cake::status st = cake::validate_compact(
        cake::make_view<cake::device_space>(static_cast<const float*>(buf.data()),
                                            std::array<index_t, 4>{B, G, S, d}),
        cake::make_view<cake::device_space>(static_cast<const index_t*>(keep.data()),
                                            std::array<index_t, 3>{B, G, 3}),
        cake::make_view<cake::device_space>(buf.data() + d, std::array<index_t, 4>{B, G, 3, d},
                                            std::array<index_t, 4>{G * S * d, S * d, d, 1}));
    CHECK(st.id == "cake.compact.layout");
  }
  SUBCASE("the row prefix (same start and strides) and disjoint buffers still pass") {
    std::vector<index_t> keep{1, 3, 0, 2};
    auto dst = cake::make_view(buf.data(), std::array<index_t, 4>{B, G, 2, d},
                               std::array<index_t, 4>{G * S * d, S * d, d, 1});
    cake::compact(cake::host, src, cake::make_view(keep.data(), std::array<index_t, 3>{B, G, 2}),
                  dst);
    for (index_t x = 0; x < d; ++x) {
      CHECK(buf[static_cast<std::size_t>(1 * d + x)] == expected(0, 0, 3, x));
      CHECK(buf[static_cast<std::size_t>((S + 1) * d + x)] == expected(0, 1, 2, x));
    }
    std::vector<float> out(static_cast<std::size_t>(B * G * 2 * d));
    cake::compact(cake::host, cake::make_view(before.data(), std::array<index_t, 4>{B, G, S, d}),
                  cake::make_view(keep.data(), std::array<index_t, 3>{B, G, 2}),
                  cake::make_view(out.data(), std::array<index_t, 4>{B, G, 2, d}));
    CHECK(out[0] == expected(0, 0, 1, 0));
  }
}

namespace compact_test {
// 16-bit rows gathered as float rows are: the same kept values, bit for bit once
// widened (make_src's values x / 100 round to T, then widen exactly).
template <class T>
void check_16bit_gather() {
  const index_t B = 1, G = 2, S = 40, d = 24, m = 9;
  const auto ref = make_src(B, G, S, d);
  std::vector<T> src(ref.size());
  std::vector<float> srcf(ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) {
    src[i] = static_cast<T>(ref[i]);
    srcf[i] = static_cast<float>(src[i]);  // the same values, as float
  }
  std::vector<std::int32_t> keep(static_cast<std::size_t>(B * G * m));
  for (std::size_t i = 0; i < keep.size(); ++i)
    keep[i] = static_cast<std::int32_t>((7 * i + 3) % static_cast<std::size_t>(S));
  std::vector<T> dst(static_cast<std::size_t>(B * G * m * d));
  std::vector<float> dstf(dst.size());
  const auto kv = cake::make_view(static_cast<const std::int32_t*>(keep.data()),
                                  std::array<index_t, 3>{B, G, m});
  cake::compact(
      cake::host.parallel_from(0),
      cake::make_view(static_cast<const T*>(src.data()), std::array<index_t, 4>{B, G, S, d}), kv,
      cake::make_view(dst.data(), std::array<index_t, 4>{B, G, m, d}));
  cake::compact(
      cake::host,
      cake::make_view(static_cast<const float*>(srcf.data()), std::array<index_t, 4>{B, G, S, d}),
      kv, cake::make_view(dstf.data(), std::array<index_t, 4>{B, G, m, d}));
  for (std::size_t i = 0; i < dst.size(); ++i) REQUIRE(static_cast<float>(dst[i]) == dstf[i]);
  // and the values are the kept rows' (to T's precision: 8 bits for bf16, 11 for half)
  const float rel = std::is_same_v<T, cake::bfloat16> ? 1.0f / 256 : 1.0f / 2048;
  for (index_t g = 0; g < G; ++g)
    for (index_t t = 0; t < m; ++t)
      for (index_t x = 0; x < d; ++x) {
        const float want = expected(0, g, keep[static_cast<std::size_t>(g * m + t)], x);
        CHECK(std::abs(dstf[static_cast<std::size_t>((g * m + t) * d + x)] - want) <=
              rel * std::abs(want));
      }
}
}  // namespace compact_test

TEST_CASE("compact: 16-bit K/V rows (bfloat16, _Float16) gather as their float values do") {
  check_16bit_gather<cake::bfloat16>();
#if defined(__FLT16_MAX__)
  check_16bit_gather<_Float16>();
#endif
}
