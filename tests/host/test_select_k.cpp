// select_k against a std::sort reference: ties go to the lower index.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

using cake::index_t;

namespace sk_test {

// The top-k of a row: sort by (score desc, index asc), take the first k.
inline std::vector<index_t> reference_desc(const std::vector<float>& x, index_t k) {
  std::vector<index_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), index_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) {
    return x[static_cast<std::size_t>(a)] > x[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

template <class TI = index_t>
std::vector<index_t> select(const std::vector<float>& x, index_t k, cake::select_order order,
                            cake::host_policy exec = cake::host) {
  const index_t n = static_cast<index_t>(x.size());
  std::vector<TI> out(static_cast<std::size_t>(k), TI(-7));
  cake::select_k(exec, cake::make_view(x.data(), std::array<index_t, 2>{1, n}),
                 cake::make_view(out.data(), std::array<index_t, 2>{1, k}), order);
  return std::vector<index_t>(out.begin(), out.end());
}

inline void check_row(const std::vector<float>& x, index_t k) {
  const index_t n = static_cast<index_t>(x.size());
  CAPTURE(n);
  CAPTURE(k);
  const auto ref = reference_desc(x, k);
  const auto desc = select(x, k, cake::select_order::descending);
  const auto pos = select(x, k, cake::select_order::position);
  // Descending order equals the reference exactly: (score desc, index asc).
  REQUIRE(desc == ref);
  // Position order: the same set, ascending.
  auto ref_sorted = ref;
  std::sort(ref_sorted.begin(), ref_sorted.end());
  REQUIRE(pos == ref_sorted);
  // Threshold property: every selected >= every unselected.
  if (k > 0 && k < n) {
    std::vector<char> in(static_cast<std::size_t>(n), 0);
    float min_sel = x[static_cast<std::size_t>(desc[0])];
    for (auto j : desc) {
      in[static_cast<std::size_t>(j)] = 1;
      min_sel = std::min(min_sel, x[static_cast<std::size_t>(j)]);
    }
    float max_unsel = -std::numeric_limits<float>::infinity();
    for (index_t j = 0; j < n; ++j)
      if (!in[static_cast<std::size_t>(j)])
        max_unsel = std::max(max_unsel, x[static_cast<std::size_t>(j)]);
    REQUIRE(min_sel >= max_unsel);
  }
}

}  // namespace sk_test

using namespace sk_test;

TEST_CASE("select_k: random rows vs the sorted reference") {
  std::mt19937 gen(1234);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const index_t sizes[] = {1, 2, 3, 7, 31, 100, 257, 1000, 4099};
  for (index_t n : sizes) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& v : x) v = dist(gen);
    std::set<index_t> ks{0, 1, n / 3, n / 2, n - 1, n};
    for (index_t k : ks)
      if (k >= 0 && k <= n) check_row(x, k);
  }
  SUBCASE("n = 100000") {
    std::vector<float> x(100000);
    for (auto& v : x) v = dist(gen);
    check_row(x, 0);
    check_row(x, 1);
    check_row(x, 777);
    check_row(x, 50000);
    check_row(x, 99999);
    check_row(x, 100000);
  }
}

TEST_CASE("select_k: narrow value ranges (radix passes 2 and 3)") {
  std::mt19937 gen(99);
  // Values that share their top bits: uniform in [1, 1 + 2^-10).
  std::uniform_real_distribution<float> dist(1.0f, 1.0009765625f);
  std::vector<float> x(5000);
  for (auto& v : x) v = dist(gen);
  for (index_t k : {index_t{1}, index_t{10}, index_t{2500}, index_t{4999}}) check_row(x, k);
}

TEST_CASE("select_k: heavy ties") {
  std::mt19937 gen(7);
  std::uniform_int_distribution<int> dist(0, 2);
  for (index_t n : {index_t{10}, index_t{333}, index_t{5000}}) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& v : x) v = static_cast<float>(dist(gen));
    for (index_t k = 0; k <= n; k += std::max<index_t>(1, n / 17)) {
      check_row(x, k);
      // Among the values equal to the threshold, the selection is the lowest indices.
      if (k == 0) continue;
      const auto pos = select(x, k, cake::select_order::position);
      const auto desc = select(x, k, cake::select_order::descending);
      const float thr = x[static_cast<std::size_t>(desc.back())];
      index_t above = 0;
      for (float v : x) above += v > thr;
      std::vector<index_t> tied_sel, tied_all;
      for (auto j : pos)
        if (x[static_cast<std::size_t>(j)] == thr) tied_sel.push_back(j);
      for (index_t j = 0; j < n; ++j)
        if (x[static_cast<std::size_t>(j)] == thr) tied_all.push_back(j);
      REQUIRE(static_cast<index_t>(tied_sel.size()) == k - above);
      REQUIRE(std::equal(tied_sel.begin(), tied_sel.end(), tied_all.begin()));
    }
  }
  SUBCASE("all equal") {
    std::vector<float> x(64, 3.5f);
    const auto desc = select(x, 10, cake::select_order::descending);
    std::vector<index_t> want(10);
    std::iota(want.begin(), want.end(), index_t{0});
    CHECK(desc == want);
  }
}

TEST_CASE("select_k: negative values, -0.0 and +0.0") {
  SUBCASE("negatives") {
    std::vector<float> x{-1.0f, -3.0f, -0.5f, -2.0f, -0.25f, -100.0f};
    CHECK(select(x, 3, cake::select_order::descending) == std::vector<index_t>{4, 2, 0});
    CHECK(select(x, 3, cake::select_order::position) == std::vector<index_t>{0, 2, 4});
    check_row(x, 4);
  }
  SUBCASE("mixed signs") {
    std::vector<float> x{-1.0f, 2.0f, -3.0f, 0.5f, -0.5f, 1e-30f, -1e-30f};
    CHECK(select(x, 4, cake::select_order::descending) == std::vector<index_t>{1, 3, 5, 6});
  }
  SUBCASE("-0.0 and +0.0 compare equal: ties by index") {
    std::vector<float> x{-0.0f, 0.0f, -0.0f, 0.0f, -1.0f, 1.0f};
    CHECK(select(x, 1, cake::select_order::descending) == std::vector<index_t>{5});
    CHECK(select(x, 2, cake::select_order::descending) == std::vector<index_t>{5, 0});
    CHECK(select(x, 3, cake::select_order::descending) == std::vector<index_t>{5, 0, 1});
    CHECK(select(x, 3, cake::select_order::position) == std::vector<index_t>{0, 1, 5});
    for (index_t k = 0; k <= 6; ++k) check_row(x, k);
  }
  SUBCASE("infinities") {
    const float inf = std::numeric_limits<float>::infinity();
    std::vector<float> x{0.0f, -inf, inf, 1.0f, -inf};
    CHECK(select(x, 2, cake::select_order::descending) == std::vector<index_t>{2, 3});
    CHECK(select(x, 4, cake::select_order::descending) == std::vector<index_t>{2, 3, 0, 1});
  }
}

TEST_CASE("select_k: int32 and int64 outputs, several rows, threads") {
  std::mt19937 gen(5);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const index_t rows = 6, n = 500, k = 37;
  std::vector<float> x(static_cast<std::size_t>(rows * n));
  for (auto& v : x) v = dist(gen);
  std::vector<std::int32_t> o32(static_cast<std::size_t>(rows * k));
  std::vector<std::int64_t> o64(static_cast<std::size_t>(rows * k));
  std::vector<std::int64_t> o64t(static_cast<std::size_t>(rows * k));
  auto sv = cake::make_view(x.data(), std::array<index_t, 2>{rows, n});
  cake::select_k(cake::host, sv, cake::make_view(o32.data(), std::array<index_t, 2>{rows, k}));
  cake::select_k(cake::host.threads(1), sv,
                 cake::make_view(o64.data(), std::array<index_t, 2>{rows, k}));
  cake::select_k(cake::host.threads(2).parallel_from(0), sv,
                 cake::make_view(o64t.data(), std::array<index_t, 2>{rows, k}));
  CHECK(o64 == o64t);
  for (index_t r = 0; r < rows; ++r) {
    std::vector<float> row(x.begin() + r * n, x.begin() + (r + 1) * n);
    const auto ref = reference_desc(row, k);
    for (index_t t = 0; t < k; ++t) {
      CHECK(o32[static_cast<std::size_t>(r * k + t)] == ref[static_cast<std::size_t>(t)]);
      CHECK(o64[static_cast<std::size_t>(r * k + t)] == ref[static_cast<std::size_t>(t)]);
    }
  }
  SUBCASE("strided rows of scores and out") {
    // scores rows with a leading stride larger than n; out rows likewise.
    const index_t ld = n + 13, ldo = k + 3;
    std::vector<float> xs(static_cast<std::size_t>(rows * ld), 1e9f);
    for (index_t r = 0; r < rows; ++r) std::copy_n(x.begin() + r * n, n, xs.begin() + r * ld);
    std::vector<std::int64_t> os(static_cast<std::size_t>(rows * ldo), -5);
    cake::select_k(
        cake::host,
        cake::make_view(xs.data(), std::array<index_t, 2>{rows, n}, std::array<index_t, 2>{ld, 1}),
        cake::make_view(os.data(), std::array<index_t, 2>{rows, k},
                        std::array<index_t, 2>{ldo, 1}));
    for (index_t r = 0; r < rows; ++r) {
      for (index_t t = 0; t < k; ++t)
        CHECK(os[static_cast<std::size_t>(r * ldo + t)] ==
              o64[static_cast<std::size_t>(r * k + t)]);
      for (index_t t = k; t < ldo; ++t) CHECK(os[static_cast<std::size_t>(r * ldo + t)] == -5);
    }
  }
}

TEST_CASE("select_k: errors") {
  std::vector<float> x(10, 1.0f);
  std::vector<index_t> out(11, 0);
  SUBCASE("k > n") {
    try {
      cake::select_k(cake::host, cake::make_view(x.data(), std::array<index_t, 2>{1, 10}),
                     cake::make_view(out.data(), std::array<index_t, 2>{1, 11}));
      FAIL("expected a throw");
    } catch (const cake::invalid_argument& e) {
      CHECK(e.id() == "cake.select_k.k");
      const std::string msg = e.what();
      CHECK(msg.find("[cake.select_k.k]") != std::string::npos);
      CHECK(msg.find("n = 10") != std::string::npos);
      CHECK(msg.find("got 11") != std::string::npos);
    }
    CHECK(std::all_of(out.begin(), out.end(), [](index_t v) { return v == 0; }));
  }
  SUBCASE("rows mismatch") {
    CHECK_THROWS_WITH_AS(
        cake::select_k(cake::host, cake::make_view(x.data(), std::array<index_t, 2>{2, 5}),
                       cake::make_view(out.data(), std::array<index_t, 2>{1, 3})),
        doctest::Contains("[cake.select_k.rows]"), cake::invalid_argument);
  }
  SUBCASE("non-unit stride along a row") {
    CHECK_THROWS_WITH_AS(cake::select_k(cake::host,
                                        cake::make_view(x.data(), std::array<index_t, 2>{1, 5},
                                                        std::array<index_t, 2>{10, 2}),
                                        cake::make_view(out.data(), std::array<index_t, 2>{1, 3})),
                         doctest::Contains("[cake.select_k.layout]"), cake::invalid_argument);
  }
}
