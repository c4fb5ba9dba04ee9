// cake_eval's error measure on hand-computed cases, and the harness end to end:
// a cache that holds the whole prompt (C >= S) reproduces the full output exactly.
#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <vector>

#include "eval/eval.hpp"
#include "eval/golden_workload.hpp"
#include "eval/synthetic.hpp"

using cake::index_t;
using A4 = std::array<index_t, 4>;

namespace {
cake_eval::cview4 v4(const std::vector<float>& x, A4 shape) {
  return cake::make_view(static_cast<const float*>(x.data()), shape);
}
}  // namespace

TEST_CASE("eval: attention output and relative L2 error, d = 1, by hand") {
  // Keys 0 and ln 3, query 1, scale 1/sqrt(1): weights 1/4 and 3/4.
  const std::vector<float> q{1.0f};
  const std::vector<float> k{0.0f, std::log(3.0f)};
  const std::vector<float> v{4.0f, 0.0f};
  const auto full =
      cake_eval::attention_output(v4(q, {1, 1, 1, 1}), v4(k, {1, 1, 2, 1}), v4(v, {1, 1, 2, 1}));
  REQUIRE(full.size() == 1);
  CHECK(full[0] == doctest::Approx(1.0).epsilon(1e-6));  // 4 * 1/4 + 0 * 3/4
  // Only token 0 held: the output is its value, 4; |4 - 1| / |1| = 3.
  const auto held =
      cake_eval::attention_output(v4(q, {1, 1, 1, 1}), v4(k, {1, 1, 1, 1}), v4(v, {1, 1, 1, 1}));
  CHECK(held[0] == 4.0);
  CHECK(cake_eval::mean_rel_l2_error(held, full, 1) == doctest::Approx(3.0).epsilon(1e-6));
  CHECK(cake_eval::mean_rel_l2_error(full, full, 1) == 0.0);
}

TEST_CASE("eval: row lengths keep a head-wise cache's padding out of attention") {
  // Two KV heads (one query head each), q = 0: uniform weights over the tokens a row
  // holds. Row 0 holds 1 of its 2 slots (the second is padding: value 100), row 1 both.
  const std::vector<float> q(2, 0.0f);
  const std::vector<float> k(4, 0.0f);
  const std::vector<float> v{4.0f, 100.0f, 2.0f, 6.0f};
  const auto o = cake_eval::attention_output(v4(q, {1, 2, 1, 1}), v4(k, {1, 2, 2, 1}),
                                             v4(v, {1, 2, 2, 1}), {1, 2});
  CHECK(o[0] == 4.0);                   // not (4 + 100) / 2
  CHECK(o[1] == doctest::Approx(4.0));  // (2 + 6) / 2
  CHECK_THROWS_AS(cake_eval::attention_output(v4(q, {1, 2, 1, 1}), v4(k, {1, 2, 2, 1}),
                                              v4(v, {1, 2, 2, 1}), {1}),
                  std::invalid_argument);
}

TEST_CASE("eval: d = 2, uniform attention, and the mean over rows") {
  // q = 0: every key weighs the same. V = (3,0), (0,3), (0,0): full output (1,1);
  // holding the first two gives (1.5,1.5): error ||(.5,.5)|| / ||(1,1)|| = 0.5.
  const std::vector<float> q{0.0f, 0.0f};
  const std::vector<float> k{1.0f, 2.0f, -3.0f, 0.5f, 7.0f, 1.0f};
  const std::vector<float> v{3.0f, 0.0f, 0.0f, 3.0f, 0.0f, 0.0f};
  const auto full =
      cake_eval::attention_output(v4(q, {1, 1, 1, 2}), v4(k, {1, 1, 3, 2}), v4(v, {1, 1, 3, 2}));
  CHECK(full[0] == doctest::Approx(1.0));
  CHECK(full[1] == doctest::Approx(1.0));
  const auto two =
      cake_eval::attention_output(v4(q, {1, 1, 1, 2}), v4(k, {1, 1, 2, 2}), v4(v, {1, 1, 2, 2}));
  CHECK(two[0] == doctest::Approx(1.5));
  CHECK(cake_eval::mean_rel_l2_error(two, full, 2) == doctest::Approx(0.5));
  // Two rows with errors 0.5 and 3: the mean is 1.75.
  const std::vector<double> a{1.5, 1.5, 4.0, 0.0}, f{1.0, 1.0, 1.0, 0.0};
  CHECK(cake_eval::mean_rel_l2_error(a, f, 2) == doctest::Approx(1.75));
}

TEST_CASE("eval: GQA, query head h reads KV head h / (H / Hkv)") {
  // H = 4, Hkv = 2, q = 0: each head outputs the mean of its KV head's values.
  const std::vector<float> q(4 * 2, 0.0f);
  const std::vector<float> k{1, 0, 0, 1, 2, 2, -1, 3};   // (1, 2, 2, 2)
  const std::vector<float> v{1, 1, 3, 3, 10, 0, 20, 0};  // head 0 mean (2,2), head 1 (15,0)
  const auto o =
      cake_eval::attention_output(v4(q, {1, 4, 1, 2}), v4(k, {1, 2, 2, 2}), v4(v, {1, 2, 2, 2}));
  const double want[4][2] = {{2, 2}, {2, 2}, {15, 0}, {15, 0}};
  for (int h = 0; h < 4; ++h)
    for (int x = 0; x < 2; ++x)
      CHECK(o[static_cast<std::size_t>(h * 2 + x)] == doctest::Approx(want[h][x]));
}

TEST_CASE("eval: with C >= S every method reproduces the full output exactly") {
  cake_eval::SyntheticOptions o;
  o.layers = 3;
  o.heads = 4;
  o.kv_heads = 2;
  o.head_dim = 16;
  o.seq_len = 200;
  o.window = 8;
  o.queries = 4;
  const auto w = cake_eval::synthetic_workload(o);
  const auto r = cake_eval::evaluate(w, {200, 256, 1024});
  REQUIRE(r.cells.size() == cake_eval::default_methods().size() * 3);
  for (const auto& c : r.cells) {
    CAPTURE(c.method);
    CAPTURE(c.cache_size);
    CHECK(c.mean_error == 0.0);
    for (double e : c.layer_error) CHECK(e == 0.0);
    CHECK(c.tokens_held == o.seq_len * o.layers);
  }
  // The harness skips those sizes; below S the caches evict and the error is > 0.
  CHECK(cake_eval::default_sizes(w) == std::vector<index_t>{64, 128});  // C < S = 200
  const auto cut = cake_eval::evaluate(w, {64});
  for (const auto& c : cut.cells) {
    CAPTURE(c.method);
    CHECK(c.mean_error > 0.0);
    CHECK(c.mean_error < 1.0);
    CHECK(c.tokens_held <= 64 * o.layers);
  }
}

#ifdef CAKE_GOLDEN_DIR
TEST_CASE("eval: golden workloads hold out the recorded decoding queries") {
  const std::string dir = std::string(CAKE_GOLDEN_DIR) + "/mha_small_cascade";
  const auto w = cake_eval::golden_workload(dir);
  CHECK(w.held_queries == 3);  // decode_steps
  CHECK(w.seq_len == 160);
  const auto r = cake_eval::evaluate(w, {w.seq_len});
  for (const auto& c : r.cells) CHECK(c.mean_error == 0.0);
  const auto cut = cake_eval::evaluate(w, cake_eval::default_sizes(w));  // 64, 128
  REQUIRE(cut.sizes.size() == 2);
  for (const auto& c : cut.cells) CHECK(c.mean_error > 0.0);
}
#endif

TEST_CASE("eval: chunked prefill, exact equals the whole prompt, bounded differs") {
  cake_eval::SyntheticOptions o;
  o.layers = 2;
  o.heads = 4;
  o.kv_heads = 2;
  o.head_dim = 16;
  o.seq_len = 256;
  o.window = 8;
  o.queries = 4;
  const std::vector<index_t> sizes{32, 64};
  const auto whole = cake_eval::evaluate(cake_eval::synthetic_workload(o), sizes);
  o.chunk = 48;  // 5 chunks of 48 and one of 16
  o.chunking = cake::chunk_eviction::exact;
  const auto exact = cake_eval::evaluate(cake_eval::synthetic_workload(o), sizes);
  o.chunking = cake::chunk_eviction::bounded;
  const auto bounded = cake_eval::evaluate(cake_eval::synthetic_workload(o), sizes);
  o.chunk = 256;  // one chunk: nothing to bound
  const auto one = cake_eval::evaluate(cake_eval::synthetic_workload(o), sizes);
  REQUIRE(exact.cells.size() == whole.cells.size());
  REQUIRE(bounded.cells.size() == whole.cells.size());
  bool differs = false;
  for (std::size_t i = 0; i < whole.cells.size(); ++i) {
    CAPTURE(whole.cells[i].method);
    CAPTURE(whole.cells[i].cache_size);
    CHECK(exact.cells[i].layer_error == whole.cells[i].layer_error);
    CHECK(exact.cells[i].tokens_held == whole.cells[i].tokens_held);
    CHECK(one.cells[i].layer_error == whole.cells[i].layer_error);
    CHECK(bounded.cells[i].mean_error > 0.0);
    CHECK(bounded.cells[i].tokens_held <= whole.cells[i].cache_size * o.layers);
    differs = differs || bounded.cells[i].layer_error != whole.cells[i].layer_error;
  }
  CHECK(differs);  // evicting per chunk changed what was kept
  // Batch > 1 is not evaluated in chunks.
  o.batch = 2;
  CHECK_THROWS_AS(cake_eval::evaluate(cake_eval::synthetic_workload(o), sizes),
                  std::invalid_argument);
}
