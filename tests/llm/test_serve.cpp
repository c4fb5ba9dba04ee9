// The paged store (K/V in a block pool, the cache compacting in place) against the
// dense store, and several prompts served together against each alone, on a tiny
// random model.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "probe.hpp"
#include "store.hpp"
#include "tiny_model.hpp"

using namespace llm;
using namespace tiny_model;

namespace {

// Three layers (cascading moves earlier layers' budgets), head_dim 32 (the AVX2
// attention kernel where the CPU has it), grouped queries.
Model tiny_engine_model(const char* file) {
  Tiny shape;
  shape.L = 3;
  shape.D = 128;
  shape.H = 4;
  shape.Hkv = 2;
  shape.hd = 32;
  shape.F = 64;
  shape.V = 37;
  const std::string path = write_tiny(make_tiny(13u, false, shape), file);
  const GgufFile gguf(path);
  std::remove(path.c_str());
  return Model::load(gguf);
}

std::vector<int> random_prompt(std::mt19937& rng, int n) {
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (auto& x : ids) x = static_cast<int>(rng() % 37);
  return ids;
}

// Every block the stores name is in use in the pool, none is named twice, and the
// pool has no other block in use (none leaked); used + free = total.
void check_accounting(const BlockPool& pool, const std::vector<const KvStore*>& stores) {
  std::int64_t named = 0;
  for (int l = 0; l < pool.layers(); ++l) {
    std::set<std::int32_t> seen;
    for (const KvStore* s : stores)
      for (std::int32_t id : s->blocks(l)) {
        CHECK(pool.in_use(l, id));
        CHECK(seen.insert(id).second);
        ++named;
      }
  }
  std::int64_t held = 0;
  for (const KvStore* s : stores) held += s->blocks_held();
  CHECK(held == named);
  CHECK(pool.in_use() == named);
  CHECK(pool.in_use() + pool.free_blocks() == pool.total());
}

// Twelve greedy steps through a dense and a paged store filled from the same prefill,
// the dense store's token fed to both: check(dense logits, paged logits) after each,
// then the same tokens held and the pool's accounting.
template <class Check>
void decode_beside_dense(Transformer& tf, const PrefillRecord& rec, std::size_t vocab,
                         KvStore& dense, KvStore& paged, const BlockPool& pool,
                         const Check& check) {
  int tok = argmax(rec.last_logits.data(), vocab);
  std::vector<float> ld, lp;
  for (int t = 0; t < 12; ++t) {
    const std::int64_t pos = rec.tokens + t;
    tf.decode({tok}, {pos}, {&dense}, ld);
    tf.decode({tok}, {pos}, {&paged}, lp);
    REQUIRE(lp.size() == ld.size());
    check(ld, lp);
    CHECK(paged.tokens_held() == dense.tokens_held());
    check_accounting(pool, {&paged});
    tok = argmax(ld.data(), vocab);
  }
}

}  // namespace

TEST_CASE("block pool: allocation, release, accounting and misuse") {
  ModelConfig c;
  c.layers = 2;
  c.kv_heads = 2;
  c.head_dim = 4;
  BlockPool pool(c, 3, 8);
  CHECK(pool.total() == 6);
  CHECK(pool.block_stride() == 2 * 8 * 4);
  CHECK(pool.head_stride() == 8 * 4);
  CHECK(pool.k(1) - pool.k(0) == 3 * 2 * 8 * 4);
  CHECK(pool.allocate(0) == 0);
  CHECK(pool.allocate(0) == 1);
  CHECK(pool.allocate(1) == 0);  // layers are apart
  CHECK(pool.allocate(0) == 2);
  CHECK_THROWS_WITH(pool.allocate(0), doctest::Contains("layer 0 has no free block"));
  CHECK(pool.in_use() == 4);
  CHECK(pool.peak() == 4);
  pool.release(0, 1, true);
  CHECK_FALSE(pool.in_use(0, 1));
  CHECK(pool.in_use(0, 2));
  CHECK_THROWS_WITH(pool.release(0, 1, false),
                    doctest::Contains("block 1 of layer 0 is not in use"));
  CHECK_THROWS(pool.release(1, 2, false));  // never allocated
  CHECK(pool.allocate(0) == 1);             // the freed block comes back first
  pool.release(0, 0, false);
  CHECK(pool.evicted() == 1);
  CHECK(pool.in_use() == 3);
  CHECK(pool.free_blocks() == 3);
  CHECK(pool.peak() == 4);
  CHECK_THROWS(BlockPool(c, 0, 8));
}

TEST_CASE("paged store: the dense store's logits, bit for bit, for every eviction method") {
  const Model model = tiny_engine_model("cake_llm_tiny_paged.gguf");
  Transformer tf(model);
  std::mt19937 rng(17);
  const auto ids = random_prompt(rng, 45);
  const auto rec = tf.prefill(ids, 8);
  const auto V = static_cast<std::size_t>(model.cfg.vocab);
  for (const std::string& method : method_names()) {
    if (method == "full") continue;
    for (int block_size : {4, 16}) {
      CAPTURE(method);
      CAPTURE(block_size);
      CacheOptions o;
      o.method = method;
      o.window = 8;
      o.cache_size = 20;  // evicts at prefill and at every step
      BlockPool pool(model.cfg, 40, block_size);
      auto dense = make_store(model.cfg, o, rec.tokens);
      auto paged = make_store(model.cfg, o, rec.tokens, &pool);
      dense->prefill(rec);
      paged->prefill(rec);
      CHECK(paged->tokens_held() == dense->tokens_held());
      CHECK(paged->tokens_held() == 20 * model.cfg.layers);
      CHECK(dense->blocks_held() == 0);
      // The prompt took ceil(45 / block_size) blocks per layer; eviction gave back
      // every one the kept tokens do not need.
      const int prompt_blocks = (45 + block_size - 1) / block_size;
      CHECK(pool.peak() >= prompt_blocks);
      CHECK(pool.evicted() > 0);
      CHECK(pool.evicted() + paged->blocks_held() == model.cfg.layers * prompt_blocks);
      check_accounting(pool, {paged.get()});
      decode_beside_dense(tf, rec, V, *dense, *paged, pool,
                          [](const std::vector<float>& ld, const std::vector<float>& lp) {
                            // the same tokens kept, read through the table: the same floats
                            CHECK(lp == ld);
                          });
      paged.reset();  // the sequence ends: every block goes back
      CHECK(pool.in_use() == 0);
      CHECK(pool.free_blocks() == pool.total());
    }
  }
}

TEST_CASE("paged store in any slot order: the dense store's tokens, logits within float rounding") {
  // Attention reads the same held tokens in another slot order: the sums round
  // differently, so logits agree to float rounding rather than bit for bit.
  const Model model = tiny_engine_model("cake_llm_tiny_any.gguf");
  Transformer tf(model);
  std::mt19937 rng(23);
  const auto ids = random_prompt(rng, 45);
  const auto rec = tf.prefill(ids, 8);
  const auto V = static_cast<std::size_t>(model.cfg.vocab);
  for (const std::string& method : method_names()) {
    if (method == "full") continue;
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 20;  // evicts at prefill and at every step
    BlockPool pool(model.cfg, 40, 4);
    auto dense = make_store(model.cfg, o, rec.tokens);
    o.paged_slots = cake::slot_order::any;
    auto paged = make_store(model.cfg, o, rec.tokens, &pool);
    dense->prefill(rec);
    paged->prefill(rec);
    float worst = 0;
    decode_beside_dense(tf, rec, V, *dense, *paged, pool,
                        [&](const std::vector<float>& ld, const std::vector<float>& lp) {
                          for (std::size_t i = 0; i < V; ++i)
                            worst = std::max(worst, std::abs(lp[i] - ld[i]));
                          CHECK(argmax(lp.data(), V) == argmax(ld.data(), V));
                        });
    CHECK(worst < 1e-4f);
  }
}

TEST_CASE("serving several prompts on one pool: each prompt's tokens are those it gets alone") {
  const Model model = tiny_engine_model("cake_llm_tiny_serve.gguf");
  Transformer tf(model);
  std::mt19937 rng(23);
  // Ten prompts of different lengths: two groups of decoding rows (fused_rows is 8).
  std::vector<PrefillRecord> recs;
  for (int n : {40, 27, 55, 33, 61, 24, 48, 36, 29, 52})
    recs.push_back(tf.prefill(random_prompt(rng, n), 8));
  const std::vector<int> stop{5};  // sequences end at different steps
  const int max_new = 16;
  for (const std::string method : {"cake", "cake_adakv", "snapkv", "h2o", "full"}) {
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 20;
    std::vector<std::vector<int>> alone;
    for (const auto& rec : recs) {
      auto store = make_store(model.cfg, o, rec.tokens);
      store->prefill(rec);
      alone.push_back(generate(tf, rec, *store, max_new, stop));
    }
    BlockPool pool(model.cfg, 80, 8);
    std::vector<std::unique_ptr<KvStore>> stores;
    std::vector<const PrefillRecord*> rp;
    std::vector<KvStore*> sp;
    std::vector<const KvStore*> cp;
    for (const auto& rec : recs) {
      stores.push_back(make_store(model.cfg, o, rec.tokens, &pool));
      stores.back()->prefill(rec);
      rp.push_back(&rec);
      sp.push_back(stores.back().get());
      cp.push_back(stores.back().get());
    }
    const auto together = serve(tf, rp, sp, max_new, stop);
    CHECK(together == alone);
    std::size_t ended = 0;
    for (const auto& out : together) ended += out.size() < static_cast<std::size_t>(max_new);
    CHECK(ended > 0);  // the stop token was met, not only max_new
    if (method != "full") {
      CHECK(pool.evicted() > 0);
      CHECK(pool.in_use() > 0);
    } else {
      CHECK(pool.peak() == 0);  // "full" keeps every token in a dense store
    }
    check_accounting(pool, cp);
    stores.clear();
    CHECK(pool.in_use() == 0);
    CHECK(pool.free_blocks() == pool.total());
  }
}

TEST_CASE("paged store: a pool too small is an error, and the blocks taken go back") {
  const Model model = tiny_engine_model("cake_llm_tiny_small_pool.gguf");
  Transformer tf(model);
  std::mt19937 rng(5);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  CacheOptions o;
  o.window = 8;
  o.cache_size = 20;
  BlockPool pool(model.cfg, 5, 8);  // 45 tokens need 6 blocks of 8
  {
    auto store = make_store(model.cfg, o, rec.tokens, &pool);
    CHECK_THROWS_WITH(store->prefill(rec), doctest::Contains("has no free block"));
  }
  CHECK(pool.in_use() == 0);
  CHECK(pool.free_blocks() == pool.total());
}

TEST_CASE("a store's clone decodes as a store filled from the same prefill, and alone") {
  const Model model = tiny_engine_model("cake_llm_tiny_clone.gguf");
  Transformer tf(model);
  std::mt19937 rng(23);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  const auto V = static_cast<std::size_t>(model.cfg.vocab);
  for (const std::string& method : method_names()) {
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 20;  // evicts at prefill and at every step
    auto a = make_store(model.cfg, o, rec.tokens), b = make_store(model.cfg, o, rec.tokens);
    a->prefill(rec);
    b->prefill(rec);
    auto c = a->clone();
    REQUIRE(c != nullptr);
    CHECK(c->tokens_held() == a->tokens_held());
    // The clone steps first, then the original it was copied from, then the store
    // filled separately: the same logits at every step (the copy shares nothing: its
    // eviction moves nothing of a's), over free-running tokens that differ by method.
    int tok = argmax(rec.last_logits.data(), V);
    std::vector<float> la, lb, lc;
    for (int t = 0; t < 12; ++t) {
      const std::int64_t pos = rec.tokens + t;
      tf.decode({tok}, {pos}, {c.get()}, lc);
      tf.decode({tok}, {pos}, {a.get()}, la);
      tf.decode({tok}, {pos}, {b.get()}, lb);
      CHECK(la == lb);
      CHECK(lc == lb);
      CHECK(c->tokens_held() == b->tokens_held());
      tok = argmax(lb.data(), V);
    }
    // A clone taken mid-sequence, then a step on the original only: the clone still
    // holds what the original held before it.
    auto d = a->clone();
    const std::int64_t held = d->tokens_held();
    tf.decode({tok}, {rec.tokens + 12}, {a.get()}, la);
    CHECK(d->tokens_held() == held);
    tf.decode({tok}, {rec.tokens + 12}, {d.get()}, lc);
    CHECK(lc == la);
  }
  // A paged store's blocks belong to its sequence in the pool: no clone.
  BlockPool pool(model.cfg, 40, 16);
  CacheOptions o;
  o.method = "cake";
  o.window = 8;
  o.cache_size = 20;
  auto paged = make_store(model.cfg, o, rec.tokens, &pool);
  paged->prefill(rec);
  CHECK(paged->clone() == nullptr);
}

TEST_CASE("rows holding a span of positions: any of its tokens, or every one") {
  const Model model = tiny_engine_model("cake_llm_tiny_rows.gguf");
  Transformer tf(model);
  std::mt19937 rng(29);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  for (const std::string method : {"cake", "snapkv", "h2o"}) {
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 20;  // on average 12 of the 37 tokens before the window per row
    auto store = make_store(model.cfg, o, rec.tokens);
    store->prefill(rec);
    const auto layers = static_cast<std::size_t>(model.cfg.layers);
    // The window is held whole in every row; the prompt is not (20 < 45), but some
    // token of it is.
    for (bool every : {false, true}) {
      CHECK(store->rows_holding(37, 45, every) == std::vector<double>(layers, 1.0));
      CHECK(store->rows_holding(0, 45, every) == std::vector<double>(layers, every ? 0.0 : 1.0));
    }
    // Between one token and a span: every <= each token's share <= any.
    for (int first = 0; first + 3 <= 37; first += 3) {
      const auto any = store->rows_holding(first, first + 3, false);
      const auto all = store->rows_holding(first, first + 3, true);
      REQUIRE(any.size() == layers);
      REQUIRE(all.size() == layers);
      for (int t = first; t < first + 3; ++t) {
        const auto one = store->rows_holding(t, t + 1, true);
        CHECK(one == store->rows_holding(t, t + 1, false));
        for (std::size_t l = 0; l < layers; ++l) {
          CHECK(all[l] <= one[l]);
          CHECK(one[l] <= any[l]);
        }
      }
    }
  }
}

TEST_CASE("whole layers: those layers keep every token, the rest share what is left") {
  // The policy alone: 4 layers, T = 40, ceiling 25, layer 1 whole; the uniform split of
  // the other 15 over the other 3 layers, at every cascade stage.
  const WholeLayers<cake::UniformBudget> uni{{}, std::uint64_t{1} << 1};
  const std::vector<float> prefs{1.0f, 5.0f, 2.0f, 3.0f};
  for (std::size_t seen = 1; seen <= 4; ++seen) {
    std::vector<cake::index_t> out(seen, -1);
    uni(std::span<const float>(prefs).first(seen), 4, 40, 25, out);
    const std::vector<cake::index_t> want{5, 25, 5, 5};
    CHECK(out == std::vector<cake::index_t>(want.begin(), want.begin() + seen));
  }
  // CAKE's proportional split: the whole layer at the ceiling, the others in proportion
  // to their preferences (1 : 2 : 3 of 15), the total kept.
  const WholeLayers<cake::ProportionalBudget> prop{{}, std::uint64_t{1} << 1};
  std::vector<cake::index_t> out(4);
  prop(prefs, 4, 40, 25, out);
  CHECK(out == std::vector<cake::index_t>{3, 25, 5, 7});
  // Two whole layers the total cannot hold: each gets half of it, the others nothing.
  const WholeLayers<cake::UniformBudget> two{{}, 0b0110};
  two(prefs, 4, 40, 25, out);
  CHECK(out == std::vector<cake::index_t>{0, 20, 20, 0});

  // Through the store: the whole layer holds the prompt, the cache's total is unchanged.
  const Model model = tiny_engine_model("cake_llm_tiny_whole.gguf");
  Transformer tf(model);
  std::mt19937 rng(31);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  for (const std::string method : {"cake", "snapkv"}) {
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 30;  // T = 66: layer 2 takes its 37, layers 0 and 1 share 29
    const auto plain = make_store(model.cfg, o, rec.tokens);
    o.whole_layers = std::uint64_t{1} << 2;
    const auto whole = make_store(model.cfg, o, rec.tokens);
    plain->prefill(rec);
    whole->prefill(rec);
    CHECK(whole->tokens_held() <= plain->tokens_held());
    const auto held = whole->rows_holding(0, 45, true);  // every prompt token, every row
    REQUIRE(held.size() == 3);
    CHECK(held[0] == 0.0);
    CHECK(held[1] == 0.0);
    CHECK(held[2] == 1.0);
  }
  CacheOptions bad;
  bad.method = "tova";
  bad.window = 8;
  bad.cache_size = 20;
  bad.whole_layers = 1;
  CHECK_THROWS_WITH(make_store(model.cfg, bad, rec.tokens), doctest::Contains("only for cake"));
  bad.method = "cake";
  bad.whole_layers = std::uint64_t{1} << 3;  // the model has 3 layers
  CHECK_THROWS_WITH(make_store(model.cfg, bad, rec.tokens), doctest::Contains("past the model"));
}

TEST_CASE("a store's positions: each KV-head row's, as many as it holds, the window in each") {
  const Model model = tiny_engine_model("cake_llm_tiny_positions.gguf");
  Transformer tf(model);
  std::mt19937 rng(37);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  for (const std::string method : {"cake", "ada_snapkv", "streamingllm"}) {
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 20;
    auto store = make_store(model.cfg, o, rec.tokens);
    store->prefill(rec);
    std::int64_t held = 0;
    for (int l = 0; l < model.cfg.layers; ++l) {
      const auto rows = store->positions(l);
      REQUIRE(rows.size() == static_cast<std::size_t>(model.cfg.kv_heads));
      for (const auto& row : rows) {
        held += static_cast<std::int64_t>(row.size());
        const std::set<std::int64_t> distinct(row.begin(), row.end());
        CHECK(distinct.size() == row.size());
        CHECK(*distinct.begin() >= 0);
        CHECK(*distinct.rbegin() == 44);
        for (std::int64_t p = 37; p < 45; ++p) CHECK(distinct.count(p) == 1);
      }
    }
    CHECK(held == store->tokens_held() * model.cfg.kv_heads);  // tokens_held: per row, summed
  }
  // The full cache keeps everything: no rows to list.
  CacheOptions full;
  full.method = "full";
  CHECK(make_store(model.cfg, full, rec.tokens)->positions(0).empty());
}

TEST_CASE("attention probe: the full model's weights on the prompt, and on what each store holds") {
  const Model model = tiny_engine_model("cake_llm_tiny_probe.gguf");
  const ModelConfig& c = model.cfg;
  Transformer tf(model);
  std::mt19937 rng(41);
  const auto rec = tf.prefill(random_prompt(rng, 45), 8);
  const int S = rec.tokens, d = c.head_dim, KD = c.kv_dim(), QD = c.q_dim();
  CacheOptions o;
  o.method = "cake";
  o.window = 8;
  o.cache_size = 20;
  auto cake_store = make_store(c, o, S);
  cake_store->prefill(rec);
  CacheOptions fo;
  fo.method = "full";
  auto full_cmp = make_store(c, fo, S);
  full_cmp->prefill(rec);
  const int key_first = 10, key_last = 13, steps = 2;
  AttentionProbe probe(c, make_store(c, fo, S), S, key_first, key_last,
                       {cake_store.get(), full_cmp.get()}, steps);
  probe.prefill(rec);
  auto plain = make_store(c, fo, S);  // what the probe wraps, unwatched
  plain->prefill(rec);

  // Three appends per layer of random rows (the third past the probe's steps), each
  // checked against double-precision weights computed here from the record's keys.
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::vector<float>> keys(rec.k.begin(), rec.k.end());  // per layer (tokens, KD)
  for (int step = 0; step < 3; ++step)
    for (int l = 0; l < c.layers; ++l) {
      CAPTURE(step);
      CAPTURE(l);
      std::vector<float> q(static_cast<std::size_t>(QD)), k(static_cast<std::size_t>(KD)),
          v(static_cast<std::size_t>(KD));
      for (auto* x : {&q, &k, &v})
        for (auto& e : *x) e = nd(rng);
      const AttendSpan a = probe.append(l, q.data(), k.data(), v.data());
      const AttendSpan b = plain->append(l, q.data(), k.data(), v.data());
      REQUIRE(a.tokens == b.tokens);
      CHECK(a.tokens == S + step + 1);
      CHECK(std::equal(a.k, a.k + a.tokens * KD, b.k));  // the wrapped store's rows, as they are
      auto& K = keys[static_cast<std::size_t>(l)];
      K.insert(K.end(), k.begin(), k.end());
      if (step >= steps) {
        CHECK_THROWS_AS(probe.total(step, l), std::out_of_range);
        continue;
      }
      const auto rows = cake_store->positions(l);
      double key = 0, rest = 0, held_key = 0, held_rest = 0;
      for (int h = 0; h < c.heads; ++h) {
        const int g = h / (c.heads / c.kv_heads);
        std::vector<double> w(static_cast<std::size_t>(S + step + 1));
        for (std::size_t j = 0; j < w.size(); ++j) {
          double dot = 0;
          for (int x = 0; x < d; ++x)
            dot += double(q[static_cast<std::size_t>(h * d + x)]) * K[j * KD + g * d + x];
          w[j] = std::exp(dot / std::sqrt(double(d)));
        }
        double sum = 0;
        for (double x : w) sum += x;
        const std::set<std::int64_t> held(rows[static_cast<std::size_t>(g)].begin(),
                                          rows[static_cast<std::size_t>(g)].end());
        for (int j = 0; j < S; ++j) {
          const bool in_key = j >= key_first && j < key_last;
          (in_key ? key : rest) += w[static_cast<std::size_t>(j)] / sum;
          if (held.count(j))
            (in_key ? held_key : held_rest) += w[static_cast<std::size_t>(j)] / sum;
        }
      }
      const auto t = probe.total(step, l), hc = probe.held(step, l, 0), hf = probe.held(step, l, 1);
      CHECK(t.key == doctest::Approx(key).epsilon(1e-12));
      CHECK(t.rest == doctest::Approx(rest).epsilon(1e-12));
      CHECK(hc.key == doctest::Approx(held_key).epsilon(1e-12));
      CHECK(hc.rest == doctest::Approx(held_rest).epsilon(1e-12));
      CHECK(hc.rest < t.rest);  // the cake store left out prompt tokens of every row
      CHECK(hf.key == t.key);   // the full cache holds all: the same sums, in the same order
      CHECK(hf.rest == t.rest);
      CHECK(t.key + t.rest < c.heads);  // the appended tokens take their share too
    }
  CHECK(probe.tokens_held() == plain->tokens_held());
  CHECK_THROWS_AS(probe.held(0, 0, 2), std::out_of_range);
  CHECK_THROWS_AS(probe.total(0, c.layers), std::out_of_range);
  CHECK_THROWS_WITH(AttentionProbe(c, make_store(c, fo, S), S, 13, 10, {}, 2),
                    doctest::Contains("key [13, 10)"));
  CHECK_THROWS_WITH(AttentionProbe(c, nullptr, S, 10, 13, {}, 2), doctest::Contains("full store"));

  // Decoding through the probe is decoding through the store it wraps, bit for bit.
  AttentionProbe watched(c, make_store(c, fo, S), S, key_first, key_last, {cake_store.get()}, 4);
  watched.prefill(rec);
  auto alone = make_store(c, fo, S);
  alone->prefill(rec);
  const auto V = static_cast<std::size_t>(c.vocab);
  int tok = argmax(rec.last_logits.data(), V);
  std::vector<float> lw, la;
  for (int t = 0; t < 6; ++t) {
    tf.decode({tok}, {rec.tokens + t}, {&watched}, lw);
    tf.decode({tok}, {rec.tokens + t}, {alone.get()}, la);
    CHECK(lw == la);
    tok = argmax(la.data(), V);
  }
  CHECK(watched.total(3, 0).key + watched.total(3, 0).rest > 0);
}

TEST_CASE("key steps: the decoding steps whose token overlaps the key in the answer") {
  // A space from the prefill, then one digit a step: steps 0..4 decoded the key.
  CHECK(key_steps({" ", "6", "9", "7", "7", "5", "."}, "69775") == std::vector<int>{0, 1, 2, 3, 4});
  // The prefill's token holds the key's first digit: it has no step; pieces that only
  // touch the key's edges do not count.
  CHECK(key_steps({" 6", "97", "75", ".", " 69775"}, "69775") == std::vector<int>{0, 1});
  CHECK(key_steps({"The key is", " ", "123", "45", " and"}, "12345") == std::vector<int>{1, 2});
  // Its first occurrence only; none when it is absent or cut.
  CHECK(key_steps({"1", "2", "3", "x", "1", "2", "3"}, "123") == std::vector<int>{0, 1});
  CHECK(key_steps({" 6", "97", "7"}, "69775").empty());
  CHECK(key_steps({}, "1").empty());
  // The span itself (the evaluation locates the key in the prompt with it): the prefill's
  // piece included.
  CHECK(key_span({" 6", "97", "75", "."}, "69775") == std::pair<int, int>{0, 3});
  CHECK(key_span({"a", "b", "12", "345", "c"}, "12345") == std::pair<int, int>{2, 4});
  CHECK(key_span({"1", "2"}, "3") == std::pair<int, int>{-1, -1});
}
