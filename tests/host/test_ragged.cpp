// RaggedKvCache (issue 14, parts 2 and 3): a ragged batch of sequences, each with
// its own prompt length and cache size, equals every sequence run alone in a
// KvCache of batch 1, token for token, on every method; sequences join and leave;
// chunked prefill equals whole-prompt prefill; bad input changes nothing. The same
// on an engine's paged pools (at the end), and sequences run in parallel equal them
// run one after another.
#include "kv_workload.hpp"
#include "support/kv_snapshot.hpp"
#include "support/paged_engine.hpp"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>

namespace ragged_test {

using cake::sequence_id;

template <class Cache>
struct ragged_of;
template <class P, class B, class I, class T, class E>
struct ragged_of<cake::KvCache<P, B, I, T, E>> {
  using type = cake::RaggedKvCache<P, B, I, T, E>;
};

// The model every test uses: 3 layers, GQA (4 query heads over 2 kv-heads), w = 4.
inline cake::CacheConfig model(bool cascade = true,
                               cake::token_order order = cake::token_order::position) {
  cake::CacheConfig c;
  c.layers = 3;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.window = 4;
  c.cache_size = 8;
  c.cascade = cascade;
  c.order = order;
  return c;
}

// One sequence: its id, prompt, cache size and its data (batch 1).
struct Seq {
  sequence_id id;
  index_t S;
  index_t C;
  kv_test::Workload wl;
  std::vector<std::vector<float>> qfull;  // per layer (S, q_heads, head_dim): every query

  cake::CacheConfig cfg() const { return wl.cfg; }
  // What a paged engine writes into its pools (paged_engine::RaggedEngine).
  operator paged_engine::Prompt() const { return {id, S, &wl.k, &wl.v}; }
};

inline Seq make_seq(const cake::CacheConfig& base, sequence_id id, index_t S, index_t C,
                    unsigned seed, int steps) {
  cake::CacheConfig c = base;
  c.cache_size = C;
  Seq s{id, S, C, kv_test::make_workload(c, S, seed, steps), {}};
  // Queries of every token, for chunks: the last w are the workload's window; the
  // others are noise a wrong window would pick up.
  const index_t H = c.q_heads, d = c.head_dim, w = c.window;
  for (index_t l = 0; l < c.layers; ++l) {
    std::vector<float> q(static_cast<std::size_t>(S * H * d));
    for (index_t t = 0; t < S; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t x = 0; x < d; ++x) {
          const auto i = static_cast<std::size_t>((t * H + h) * d + x);
          q[i] = t >= S - w ? s.wl.q[static_cast<std::size_t>(l)]
                                    [static_cast<std::size_t>((h * w + t - (S - w)) * d + x)]
                            : 3.0f * static_cast<float>((t * 7 + h * 3 + x) % 5) - 6.0f;
        }
    s.qfull.push_back(std::move(q));
  }
  return s;
}

// A layer's tensors for a set of sequences, packed as FlashAttention's varlen API
// takes them: tokens [begin, end) of each prompt (whole prompts by default).
struct Packed {
  index_t H = 0, Hkv = 0, d = 0, w = 0, n = 0;
  std::vector<float> qw;    // (n, q_heads, window, head_dim)
  std::vector<float> q;     // (total, q_heads, head_dim)
  std::vector<float> k, v;  // (total, kv_heads, head_dim)
  std::vector<std::int32_t> cu;
  std::vector<sequence_id> ids;

  index_t total() const { return cu.back(); }
  auto q_window() const { return cake::make_view(qw.data(), std::array<index_t, 4>{n, H, w, d}); }
  auto queries() const { return cake::make_view(q.data(), std::array<index_t, 3>{total(), H, d}); }
  auto keys() const { return cake::make_view(k.data(), std::array<index_t, 3>{total(), Hkv, d}); }
  auto values() const { return cake::make_view(v.data(), std::array<index_t, 3>{total(), Hkv, d}); }
};

inline Packed pack(const std::vector<const Seq*>& seqs, index_t l,
                   const std::vector<std::pair<index_t, index_t>>& ranges = {}) {
  const auto& c = seqs.front()->wl.cfg;
  Packed p;
  p.H = c.q_heads;
  p.Hkv = c.kv_heads;
  p.d = c.head_dim;
  p.w = c.window;
  p.n = static_cast<index_t>(seqs.size());
  p.cu.push_back(0);
  const auto L = static_cast<std::size_t>(l);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = *seqs[i];
    p.ids.push_back(s.id);
    const auto [b, e] = ranges.empty() ? std::pair<index_t, index_t>{0, s.S} : ranges[i];
    p.qw.insert(p.qw.end(), s.wl.q[L].begin(), s.wl.q[L].end());
    for (index_t t = b; t < e; ++t) {
      for (index_t h = 0; h < p.H; ++h)
        for (index_t x = 0; x < p.d; ++x)
          p.q.push_back(s.qfull[L][static_cast<std::size_t>((t * p.H + h) * p.d + x)]);
      for (index_t g = 0; g < p.Hkv; ++g)
        for (index_t x = 0; x < p.d; ++x) {
          const auto i0 = static_cast<std::size_t>((g * s.S + t) * p.d + x);
          p.k.push_back(s.wl.k[L][i0]);
          p.v.push_back(s.wl.v[L][i0]);
        }
    }
    p.cu.push_back(p.cu.back() + static_cast<std::int32_t>(e - b));
  }
  return p;
}

// Decode step t of layer l for a set of sequences: (n, heads, head_dim) each.
struct Step {
  index_t H = 0, Hkv = 0, d = 0, n = 0;
  std::vector<float> q, k, v;
  std::vector<sequence_id> ids;
  auto qv() const { return cake::make_view(q.data(), std::array<index_t, 3>{n, H, d}); }
  auto kv() const { return cake::make_view(k.data(), std::array<index_t, 3>{n, Hkv, d}); }
  auto vv() const { return cake::make_view(v.data(), std::array<index_t, 3>{n, Hkv, d}); }
};

// steps[i]: which decode step of sequence i.
inline Step step(const std::vector<const Seq*>& seqs, const std::vector<std::size_t>& steps,
                 index_t l) {
  const auto& c = seqs.front()->wl.cfg;
  Step st{c.q_heads, c.kv_heads, c.head_dim, static_cast<index_t>(seqs.size()), {}, {}, {}, {}};
  const auto L = static_cast<std::size_t>(l);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = *seqs[i];
    st.ids.push_back(s.id);
    st.q.insert(st.q.end(), s.wl.dq[steps[i]][L].begin(), s.wl.dq[steps[i]][L].end());
    st.k.insert(st.k.end(), s.wl.dk[steps[i]][L].begin(), s.wl.dk[steps[i]][L].end());
    st.v.insert(st.v.end(), s.wl.dv[steps[i]][L].begin(), s.wl.dv[steps[i]][L].end());
  }
  return st;
}

// Everything a KvCache reports, equal between a and b (exact: the same operations
// on the same numbers).
template <class A, class B>
void check_same(const A& a, const B& b) {
  REQUIRE(a.layers_prefilled() == b.layers_prefilled());
  REQUIRE(a.prompt_length() == b.prompt_length());
  CHECK(std::vector<index_t>(a.budgets().begin(), a.budgets().end()) ==
        std::vector<index_t>(b.budgets().begin(), b.budgets().end()));
  CHECK(a.stage_budgets() == b.stage_budgets());
  CHECK(a.tokens_held() == b.tokens_held());
  CHECK(a.peak_tokens_held() == b.peak_tokens_held());
  const auto& c = a.config();
  for (index_t l = 0; l < c.layers; ++l) {
    CAPTURE(l);
    REQUIRE(a.row_lengths(l) == b.row_lengths(l));
    const auto pa = a.positions(l), pb = b.positions(l);
    const auto ka = a.keys(l), kb = b.keys(l);
    const auto va = a.values(l), vb = b.values(l);
    REQUIRE(pa.extent(2) == pb.extent(2));
    bool same = true;
    for (index_t g = 0; g < c.kv_heads; ++g)
      for (index_t t = 0; t < pa.extent(2); ++t) {
        same = same && pa(0, g, t) == pb(0, g, t);
        for (index_t x = 0; x < c.head_dim; ++x)
          same = same && ka(0, g, t, x) == kb(0, g, t, x) && va(0, g, t, x) == vb(0, g, t, x);
      }
    CHECK(same);
    if (l < a.layers_prefilled()) CHECK(a.preference(l) == b.preference(l));
  }
}

template <class F>
std::string error_id(F&& f) {
  try {
    f();
  } catch (const cake::error& e) {
    return e.id();
  }
  return "no error";
}

constexpr cake::token_order both_orders[] = {cake::token_order::position,
                                             cake::token_order::reference};

}  // namespace ragged_test

using namespace ragged_test;

TEST_CASE_TEMPLATE("RaggedKvCache: a ragged batch equals each sequence alone, every method", Cache,
                   cake::methods::Cake<>, cake::methods::SnapKv<>, cake::methods::PyramidKv<>,
                   cake::methods::StreamingLlm<>, cake::methods::H2o<>, cake::methods::Tova<>,
                   cake::methods::AdaSnapKv<>, cake::methods::CakeAdaKv<>) {
  using Ragged = typename ragged_of<Cache>::type;
  for (bool cascade : {true, false})
    for (auto order : both_orders) {
      CAPTURE(cascade);
      CAPTURE(static_cast<int>(order));
      const auto base = model(cascade, order);
      // Prompts of different lengths (one exactly the window), cache sizes that differ;
      // the call order is not the id order.
      std::vector<Seq> seqs;
      seqs.push_back(make_seq(base, 7, 4, 8, 11, 3));
      seqs.push_back(make_seq(base, 3, 23, 6, 12, 3));
      seqs.push_back(make_seq(base, 11, 16, 12, 13, 3));
      seqs.push_back(make_seq(base, 5, 9, 8, 14, 3));
      std::vector<const Seq*> all;
      for (const auto& s : seqs) all.push_back(&s);

      Ragged ragged(base);
      std::vector<std::unique_ptr<Cache>> alone;
      for (const auto& s : seqs) {
        ragged.add(s.id, {.cache_size = s.C});
        alone.push_back(std::make_unique<Cache>(s.cfg()));
      }
      for (index_t l = 0; l < base.layers; ++l) {
        const Packed p = pack(all, l);
        ragged.prefill(l, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
        for (std::size_t i = 0; i < seqs.size(); ++i)
          alone[i]->prefill(l, seqs[i].wl.qv(l), seqs[i].wl.kv(l), seqs[i].wl.vv(l));
        for (std::size_t i = 0; i < seqs.size(); ++i) {
          CAPTURE(seqs[i].id);
          check_same(ragged.sequence(seqs[i].id), *alone[i]);
        }
      }
      // The long prompt was evicted, so the comparison compared a choice.
      CHECK(ragged.tokens_held(3, 0) < 23);
      CHECK(ragged.sequence(3).budgets().size() == 3);
      for (std::size_t t = 0; t < 3; ++t)
        for (index_t l = 0; l < base.layers; ++l) {
          const Step st = step(all, std::vector<std::size_t>(all.size(), t), l);
          ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
          for (std::size_t i = 0; i < seqs.size(); ++i) {
            alone[i]->decode(l, seqs[i].wl.dqv(t, l), seqs[i].wl.dkv(t, l), seqs[i].wl.dvv(t, l));
            CAPTURE(seqs[i].id);
            check_same(ragged.sequence(seqs[i].id), *alone[i]);
          }
        }
      index_t total = 0;
      for (const auto& a : alone) total += a->tokens_held();
      CHECK(ragged.tokens_held() == total);
      // The accessors are the sequence's own.
      const auto pos = ragged.positions(11, 1);
      CHECK(pos.extent(2) == alone[2]->positions(1).extent(2));
      CHECK(ragged.keys(11, 1).data_handle() == ragged.sequence(11).keys(1).data_handle());
    }
}

TEST_CASE("RaggedKvCache: sequences join and leave while others decode") {
  const auto base = model();
  const Seq a = make_seq(base, 1, 23, 8, 21, 4);
  const Seq b = make_seq(base, 2, 9, 6, 22, 8);
  const Seq c = make_seq(base, 3, 16, 10, 23, 4);
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg()), rc(c.cfg());
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.cache_size = 8});
  ragged.add(2, {.cache_size = 6});
  for (index_t l = 0; l < 3; ++l) {
    const Packed p = pack({&b, &a}, l);
    ragged.prefill(l, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
    ra.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
    rb.prefill(l, b.wl.qv(l), b.wl.kv(l), b.wl.vv(l));
  }
  std::size_t tb = 0;
  for (std::size_t t = 0; t < 2; ++t, ++tb)
    for (index_t l = 0; l < 3; ++l) {
      const Step st = step({&a, &b}, {t, tb}, l);
      ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
      ra.decode(l, a.wl.dqv(t, l), a.wl.dkv(t, l), a.wl.dvv(t, l));
      rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
    }
  check_same(ragged.sequence(1), ra);
  // 1 leaves, 3 joins: its prefill runs layer by layer beside 2's decode step.
  ragged.remove(1);
  CHECK(!ragged.contains(1));
  CHECK(error_id([&] { (void)ragged.sequence(1); }) == "cake.ragged.id");
  ragged.add(3, {.cache_size = 10});
  CHECK(ragged.ids() == std::vector<sequence_id>{2, 3});
  for (index_t l = 0; l < 3; ++l) {
    const Packed p = pack({&c}, l);
    ragged.prefill(l, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
    rc.prefill(l, c.wl.qv(l), c.wl.kv(l), c.wl.vv(l));
    const Step st = step({&b}, {tb}, l);
    ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
    rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
  }
  ++tb;
  for (std::size_t t = 0; t < 3; ++t, ++tb)
    for (index_t l = 0; l < 3; ++l) {
      const Step st = step({&c, &b}, {t, tb}, l);
      ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
      rc.decode(l, c.wl.dqv(t, l), c.wl.dkv(t, l), c.wl.dvv(t, l));
      rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
    }
  check_same(ragged.sequence(2), rb);
  check_same(ragged.sequence(3), rc);
  CHECK(ragged.tokens_held() == rb.tokens_held() + rc.tokens_held());
  CHECK(ragged.bytes_held() == rb.bytes_held() + rc.bytes_held());
  // A sequence with policies of its own (other CAKE temperatures and gamma) equals a
  // KvCache built with them, and differs from one with the batch's.
  const cake::CakePreference pref{0.3f, 3.0f};
  const cake::MeanVarianceIndicator ind{2.0f, 3};
  ragged.add(4, {.cache_size = 10}, pref, {}, ind);
  cake::methods::Cake<> own(c.cfg(), pref, {}, ind), batch_default(c.cfg());
  for (index_t l = 0; l < 3; ++l) {
    const Packed p = pack({&c}, l);
    const std::vector<sequence_id> four{4};
    CHECK(ragged.validate_prefill(l, four, p.q_window(), p.keys(), p.values(), p.cu).ok());
    ragged.prefill(l, four, p.q_window(), p.keys(), p.values(), p.cu);
    own.prefill(l, c.wl.qv(l), c.wl.kv(l), c.wl.vv(l));
    batch_default.prefill(l, c.wl.qv(l), c.wl.kv(l), c.wl.vv(l));
  }
  check_same(ragged.sequence(4), own);
  CHECK(ragged.sequence(4).preference(0) != batch_default.preference(0));
  // validate_* report without throwing.
  const Packed p = pack({&c}, 0);
  const auto st = ragged.validate_prefill(0, std::vector<sequence_id>{4}, p.q_window(), p.keys(),
                                          p.values(), p.cu);
  CHECK(st.id == "cake.prefill.layer");  // all layers of 4 are prefilled
}

namespace ragged_test {

// Feeds every sequence its prompt in chunks of `chunk` tokens (the last one
// shorter when chunk does not divide S), every layer per chunk; sequences whose
// prompt is complete drop out of the calls. Checks the exact mode's promise on
// the way: nothing is evicted before a layer's last chunk.
template <class Ragged>
void prefill_by_chunks(Ragged& ragged, const std::vector<const Seq*>& seqs, index_t chunk,
                       bool bounded = false) {
  std::vector<index_t> at(seqs.size(), 0);
  // Bounded: what each sequence's layers hold between chunks, all of it until it
  // exceeds C + w, then C.
  std::vector<index_t> held(seqs.size(), 0);
  const index_t w = seqs.front()->wl.cfg.window;
  const index_t L = seqs.front()->wl.cfg.layers;
  for (;;) {
    std::vector<const Seq*> call;
    std::vector<std::pair<index_t, index_t>> ranges;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (at[i] < seqs[i]->S) {
        call.push_back(seqs[i]);
        ranges.push_back({at[i], std::min(seqs[i]->S, at[i] + chunk)});
      }
    if (call.empty()) return;
    std::vector<index_t> want;  // per call entry
    for (std::size_t i = 0, j = 0; i < seqs.size(); ++i)
      if (at[i] < seqs[i]->S) {
        const index_t m = held[i] + ranges[j].second - ranges[j].first;
        held[i] = m <= seqs[i]->C + w ? m : seqs[i]->C;
        want.push_back(bounded ? held[i] : ranges[j].second);
        ++j;
      }
    for (index_t l = 0; l < L; ++l) {
      const Packed p = pack(call, l, ranges);
      ragged.prefill_chunk(l, p.ids, p.queries(), p.keys(), p.values(), p.cu);
      for (std::size_t i = 0; i < call.size(); ++i) {
        const bool last = ranges[i].second == call[i]->S;
        CHECK(ragged.chunk_tokens_received(call[i]->id, l) == ranges[i].second);
        CHECK(ragged.sequence(call[i]->id).layers_prefilled() == (last ? l + 1 : 0));
        // Between chunks a layer holds all it got (exact) or at most C + w (bounded).
        CHECK(ragged.chunk_tokens_held(call[i]->id, l) == (last ? 0 : want[i]));
        if (bounded) CHECK(want[i] <= call[i]->C + w);
      }
    }
    for (std::size_t i = 0; i < seqs.size(); ++i) at[i] = std::min(seqs[i]->S, at[i] + chunk);
  }
}

}  // namespace ragged_test

TEST_CASE_TEMPLATE("RaggedKvCache: chunked prefill equals whole-prompt prefill", Cache,
                   cake::methods::Cake<>, cake::methods::H2o<>, cake::methods::Tova<>,
                   cake::methods::CakeAdaKv<>) {
  using Ragged = typename ragged_of<Cache>::type;
  for (bool cascade : {true, false})
    for (auto order : both_orders)
      // 1 token; < w; not dividing 23 or 9 (the last chunk is shorter than w);
      // the whole prompt at once.
      for (index_t chunk : {1, 3, 5, 23}) {
        CAPTURE(cascade);
        CAPTURE(static_cast<int>(order));
        CAPTURE(chunk);
        const auto base = model(cascade, order);
        std::vector<Seq> seqs;
        seqs.push_back(make_seq(base, 4, 23, 7, 31, 3));
        seqs.push_back(make_seq(base, 9, 9, 8, 32, 3));
        seqs.push_back(make_seq(base, 2, 4, 8, 33, 3));
        std::vector<const Seq*> all;
        for (const auto& s : seqs) all.push_back(&s);
        Ragged ragged(base);
        std::vector<std::unique_ptr<Cache>> alone;
        for (const auto& s : seqs) {
          ragged.add(s.id, {.cache_size = s.C, .prompt_length = s.S});
          alone.push_back(std::make_unique<Cache>(s.cfg()));
          for (index_t l = 0; l < base.layers; ++l)
            alone.back()->prefill(l, s.wl.qv(l), s.wl.kv(l), s.wl.vv(l));
        }
        prefill_by_chunks(ragged, all, chunk);
        for (std::size_t i = 0; i < seqs.size(); ++i)
          check_same(ragged.sequence(seqs[i].id), *alone[i]);
        for (std::size_t t = 0; t < 3; ++t)
          for (index_t l = 0; l < base.layers; ++l) {
            const Step st = step(all, std::vector<std::size_t>(all.size(), t), l);
            ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
            for (std::size_t i = 0; i < seqs.size(); ++i)
              alone[i]->decode(l, seqs[i].wl.dqv(t, l), seqs[i].wl.dkv(t, l), seqs[i].wl.dvv(t, l));
          }
        for (std::size_t i = 0; i < seqs.size(); ++i)
          check_same(ragged.sequence(seqs[i].id), *alone[i]);
      }
}

TEST_CASE("RaggedKvCache: bad input throws a named error and changes no sequence") {
  const auto base = model();
  const Seq a = make_seq(base, 1, 9, 8, 41, 1);
  const Seq b = make_seq(base, 2, 16, 6, 42, 1);
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.cache_size = 8});
  ragged.add(2, {.cache_size = 6});
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg());
  {
    const Packed p = pack({&a, &b}, 0);
    ragged.prefill(0, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
    ra.prefill(0, a.wl.qv(0), a.wl.kv(0), a.wl.vv(0));
    rb.prefill(0, b.wl.qv(0), b.wl.kv(0), b.wl.vv(0));
  }
  const auto unchanged = [&] {
    check_same(ragged.sequence(1), ra);
    check_same(ragged.sequence(2), rb);
  };
  Packed p = pack({&a, &b}, 1);  // layer 1, valid
  const auto prefill = [&](const Packed& x, std::vector<std::int32_t> cu,
                           std::vector<sequence_id> ids) {
    return error_id([&] { ragged.prefill(1, ids, x.q_window(), x.keys(), x.values(), cu); });
  };
  SUBCASE("cu_seqlens") {
    CHECK(prefill(p, {1, 10, 25}, {1, 2}) == "cake.ragged.cu_seqlens");  // not from 0
    CHECK(prefill(p, {0, 10, 9}, {1, 2}) == "cake.ragged.cu_seqlens");   // decreasing
    CHECK(prefill(p, {0, 9, 24}, {1, 2}) == "cake.ragged.cu_seqlens");   // total != keys
    CHECK(prefill(p, {0, 9}, {1, 2}) == "cake.ragged.cu_seqlens");       // one short
    // The right total, split wrongly: 10 and 15 tokens where layer 0 had 9 and 16.
    CHECK(prefill(p, {0, 10, 25}, {1, 2}) == "cake.prefill.keys");
    unchanged();
  }
  SUBCASE("ids") {
    CHECK(prefill(p, p.cu, {1, 99}) == "cake.ragged.ids");
    CHECK(prefill(p, p.cu, {2, 2}) == "cake.ragged.ids");
    CHECK(prefill(p, p.cu, {1}) == "cake.ragged.q_window");  // tensors for two
    CHECK(error_id([&] { ragged.add(2); }) == "cake.ragged.id");
    CHECK(error_id([&] { ragged.remove(99); }) == "cake.ragged.id");
    CHECK(error_id([&] { ragged.add(5, {.cache_size = 3}); }) == "cake.config.cache_size");
    CHECK(!ragged.contains(5));
    CHECK(ragged.size() == 2);
    unchanged();
  }
  SUBCASE("shapes") {
    const auto k = p.keys();
    const auto bad_k = cake::make_view(p.k.data(), std::array<index_t, 3>{p.total(), 1, 16});
    CHECK(error_id([&] { ragged.prefill(1, p.ids, p.q_window(), bad_k, p.values(), p.cu); }) ==
          "cake.ragged.keys");
    const auto short_v = cake::make_view(p.v.data(), std::array<index_t, 3>{p.total() - 1, 2, 8});
    CHECK(error_id([&] { ragged.prefill(1, p.ids, p.q_window(), k, short_v, p.cu); }) ==
          "cake.ragged.values");
    const auto one_q = cake::make_view(p.qw.data(), std::array<index_t, 4>{1, 4, 4, 8});
    CHECK(error_id([&] { ragged.prefill(1, p.ids, one_q, k, p.values(), p.cu); }) ==
          "cake.ragged.q_window");
    unchanged();
  }
  SUBCASE("the second sequence's input is bad: the first does not move") {
    Packed bad = p;
    bad.k[static_cast<std::size_t>((p.cu[1] + 3) * 2 * 8 + 5)] =
        std::numeric_limits<float>::quiet_NaN();
    CHECK(prefill(bad, bad.cu, {1, 2}) == "cake.prefill.keys");
    // A sequence at another layer: 3 is before its layer 0.
    ragged.add(3);
    const Packed three = pack({&a, &b, &a}, 1);
    CHECK(error_id([&] {
            ragged.prefill(1, {std::vector<sequence_id>{1, 2, 3}}, three.q_window(), three.keys(),
                           three.values(), three.cu);
          }) == "cake.prefill.layer");
    unchanged();
    CHECK(ragged.sequence(3).layers_prefilled() == 0);
  }
  SUBCASE("decode before prefill, decode with the wrong count") {
    const Step st = step({&a, &b}, {0, 0}, 0);
    CHECK(error_id([&] { ragged.decode(0, st.ids, st.qv(), st.kv(), st.vv()); }) ==
          "cake.decode.state");
    CHECK(error_id([&] {
            ragged.decode(0, std::vector<sequence_id>{1}, st.qv(), st.kv(), st.vv());
          }) == "cake.ragged.decode");
    unchanged();
  }
  // After any of the above, the valid call still gives what running alone gives.
  ragged.prefill(1, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
  ra.prefill(1, a.wl.qv(1), a.wl.kv(1), a.wl.vv(1));
  rb.prefill(1, b.wl.qv(1), b.wl.kv(1), b.wl.vv(1));
  unchanged();
  const Packed p2 = pack({&a, &b}, 2);
  ragged.prefill(2, p2.ids, p2.q_window(), p2.keys(), p2.values(), p2.cu);
  ra.prefill(2, a.wl.qv(2), a.wl.kv(2), a.wl.vv(2));
  rb.prefill(2, b.wl.qv(2), b.wl.kv(2), b.wl.vv(2));
  // A decode step whose second token is not finite: neither sequence takes it.
  Step st = step({&a, &b}, {0, 0}, 0);
  st.k[2 * 8 + 3] = std::numeric_limits<float>::infinity();  // sequence 2, kv-head 0
  CHECK(error_id([&] { ragged.decode(0, st.ids, st.qv(), st.kv(), st.vv()); }) == "cake.decode.k");
  unchanged();
}

TEST_CASE("RaggedKvCache: chunked prefill rejects chunks out of turn and changes nothing") {
  const auto base = model();
  const Seq a = make_seq(base, 1, 9, 8, 51, 0);
  const Seq b = make_seq(base, 2, 6, 8, 52, 0);
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.prompt_length = 9});
  ragged.add(2, {.prompt_length = 6});
  ragged.add(3);  // no prompt length: whole prompts only
  const auto chunk = [&](index_t l, std::vector<const Seq*> s,
                         std::vector<std::pair<index_t, index_t>> r) {
    const Packed p = pack(s, l, r);
    return error_id(
        [&] { ragged.prefill_chunk(l, p.ids, p.queries(), p.keys(), p.values(), p.cu); });
  };
  // Chunk [0, 5) of both through layer 0 only.
  REQUIRE(chunk(0, {&a, &b}, {{0, 5}, {0, 5}}) == "no error");
  // Layer 0 again before layers 1 and 2 took the chunk.
  CHECK(chunk(0, {&a}, {{5, 9}}) == "cake.ragged.chunk");
  // Layer 2 before layer 1.
  CHECK(chunk(2, {&a}, {{0, 5}}) == "cake.ragged.chunk");
  // Layer 1 with another chunk than layer 0's.
  CHECK(chunk(1, {&a}, {{0, 4}}) == "cake.ragged.chunk");
  // The second sequence's chunk runs past its prompt: the first does not move.
  REQUIRE(chunk(1, {&a, &b}, {{0, 5}, {0, 5}}) == "no error");
  REQUIRE(chunk(2, {&a, &b}, {{0, 5}, {0, 5}}) == "no error");
  {
    Packed p = pack({&a, &b}, 0, {{5, 9}, {5, 6}});
    // b has 1 token left; give it 2 (a's last one twice).
    p.cu = {0, 4, 6};
    p.q.insert(p.q.end(), p.q.end() - 32, p.q.end());
    p.k.insert(p.k.end(), p.k.end() - 16, p.k.end());
    p.v.insert(p.v.end(), p.v.end() - 16, p.v.end());
    CHECK(error_id([&] {
            ragged.prefill_chunk(0, p.ids, p.queries(), p.keys(), p.values(), p.cu);
          }) == "cake.ragged.cu_seqlens");
    // An empty chunk.
    p.cu = {0, 5, 5};
    CHECK(error_id([&] {
            ragged.prefill_chunk(0, p.ids, p.queries(), p.keys(), p.values(), p.cu);
          }) == "cake.ragged.cu_seqlens");
  }
  {
    // A query of the second sequence's chunk is not finite: neither takes the chunk.
    Packed p = pack({&a, &b}, 0, {{5, 6}, {5, 6}});
    p.q[32 + 7] = std::numeric_limits<float>::quiet_NaN();
    CHECK(error_id([&] {
            ragged.prefill_chunk(0, p.ids, p.queries(), p.keys(), p.values(), p.cu);
          }) == "cake.ragged.q");
  }
  CHECK(ragged.chunk_tokens_received(1, 0) == 5);
  CHECK(ragged.chunk_tokens_received(2, 0) == 5);
  // No prompt length; whole prefill of a chunked sequence.
  const Seq c = make_seq(base, 3, 6, 8, 53, 0);
  CHECK(chunk(0, {&c}, {{0, 6}}) == "cake.ragged.prompt_length");
  {
    const Packed p = pack({&a}, 0);
    CHECK(error_id([&] { ragged.prefill(0, p.ids, p.q_window(), p.keys(), p.values(), p.cu); }) ==
          "cake.ragged.chunked");
  }
  // Finish both; then any further chunk is one too many.
  for (index_t l = 0; l < 3; ++l) REQUIRE(chunk(l, {&a, &b}, {{5, 9}, {5, 6}}) == "no error");
  CHECK(ragged.sequence(1).prefilled());
  CHECK(ragged.sequence(2).prefilled());
  CHECK(chunk(0, {&b}, {{5, 6}}) == "cake.ragged.chunk");
  // And the result is whole-prompt prefill's.
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg());
  for (index_t l = 0; l < 3; ++l) {
    ra.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
    rb.prefill(l, b.wl.qv(l), b.wl.kv(l), b.wl.vv(l));
  }
  check_same(ragged.sequence(1), ra);
  check_same(ragged.sequence(2), rb);
}

namespace ragged_test {

// Every held token of every layer of sequence s: positions distinct and original
// (the values' channel 0 and the keys are those of that position in the workload),
// the last w up to `last` held.
template <class Ragged>
void check_original_positions(const Ragged& ragged, const Seq& s, index_t last) {
  const auto& c = s.wl.cfg;
  for (index_t l = 0; l < c.layers; ++l) {
    CAPTURE(l);
    const auto P = ragged.positions(s.id, l);
    const auto K = ragged.keys(s.id, l);
    const auto V = ragged.values(s.id, l);
    const auto lens = ragged.sequence(s.id).row_lengths(l);
    REQUIRE(P.extent(2) == K.extent(2));
    for (index_t g = 0; g < c.kv_heads; ++g) {
      CAPTURE(g);
      std::set<index_t> seen;
      for (index_t t = 0; t < lens[static_cast<std::size_t>(g)]; ++t) {
        const index_t p = P(0, g, t);
        REQUIRE(p >= 0);
        REQUIRE(p <= last);
        REQUIRE(seen.insert(p).second);
        REQUIRE(V(0, g, t, 0) == static_cast<float>(p));
        const float* want = s.wl.key_of(l, 0, g, p);
        for (index_t x = 0; x < c.head_dim; ++x) REQUIRE(K(0, g, t, x) == want[x]);
      }
      for (index_t p = last - c.window + 1; p <= last; ++p) CHECK(seen.count(p) == 1);
    }
  }
}

}  // namespace ragged_test

TEST_CASE_TEMPLATE(
    "RaggedKvCache: bounded chunking holds at most C + w + chunk per layer and keeps "
    "original positions",
    Cache, cake::methods::Cake<>, cake::methods::StreamingLlm<>, cake::methods::H2o<>,
    cake::methods::CakeAdaKv<>) {
  using Ragged = typename ragged_of<Cache>::type;
  for (auto order : both_orders)
    for (index_t chunk : {1, 3, 5, 23}) {
      CAPTURE(static_cast<int>(order));
      CAPTURE(chunk);
      const auto base = model(true, order);
      std::vector<Seq> seqs;
      seqs.push_back(make_seq(base, 4, 23, 7, 61, 3));
      seqs.push_back(make_seq(base, 9, 9, 8, 62, 3));
      std::vector<const Seq*> all;
      for (const auto& s : seqs) all.push_back(&s);
      Ragged ragged(base);
      for (const auto& s : seqs)
        ragged.add(
            s.id,
            {.cache_size = s.C, .prompt_length = s.S, .chunking = cake::chunk_eviction::bounded});
      // Before any chunk nothing is held (the review found this query reading past
      // the per-layer state, which exists only from the first chunk on).
      for (const auto& s : seqs)
        for (index_t l = 0; l < base.layers; ++l) CHECK(ragged.chunk_tokens_held(s.id, l) == 0);
      prefill_by_chunks(ragged, all, chunk, true);
      for (const auto& s : seqs) {
        CAPTURE(s.id);
        const auto& c = ragged.sequence(s.id);
        REQUIRE(c.prefilled());
        // The cache took what the layers held plus the last chunk as its prompt.
        const index_t last_chunk = s.S % chunk == 0 ? std::min(chunk, s.S) : s.S % chunk;
        index_t held = 0;
        for (index_t at = 0; at < s.S - last_chunk; at += chunk)
          held = held + chunk <= s.C + base.window ? held + chunk : s.C;
        CHECK(c.prompt_length() == held + last_chunk);
        check_original_positions(ragged, s, s.S - 1);
      }
      // One chunk is the whole prompt: bounded is exact.
      if (chunk == 23)
        for (const auto& s : seqs) {
          Cache alone(s.cfg());
          for (index_t l = 0; l < base.layers; ++l)
            alone.prefill(l, s.wl.qv(l), s.wl.kv(l), s.wl.vv(l));
          check_same(ragged.sequence(s.id), alone);
        }
      // Decoding appends at the original positions S, S + 1, ...
      for (std::size_t t = 0; t < 3; ++t) {
        for (index_t l = 0; l < base.layers; ++l) {
          const Step st = step(all, std::vector<std::size_t>(all.size(), t), l);
          ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv());
        }
        for (const auto& s : seqs) {
          CAPTURE(s.id);
          CAPTURE(t);
          check_original_positions(ragged, s, s.S + static_cast<index_t>(t));
        }
      }
    }
}

TEST_CASE("RaggedKvCache: bounded chunking of one layer is SnapKV over held + chunk, repeated") {
  // The definition, step by step, with a KvCache of one layer as the oracle of each
  // step: after a chunk, if held + chunk pass C + w (or at the last chunk), keep what
  // SnapKV keeps of them, scored by the queries of positions [end - w, end) (spanning
  // chunks shorter than w); else keep all.
  cake::CacheConfig base = model();
  base.layers = 1;
  const index_t S = 23, C = 7, w = base.window, H = base.q_heads, Hkv = base.kv_heads,
                d = base.head_dim;
  const Seq s = make_seq(base, 1, S, C, 71, 0);
  using SnapKv = cake::methods::SnapKv<>;
  for (index_t chunk : {3, 5}) {
    CAPTURE(chunk);
    cake::RaggedKvCacheOf<SnapKv> ragged(base);
    ragged.add(1, {.cache_size = C, .prompt_length = S, .chunking = cake::chunk_eviction::bounded});
    prefill_by_chunks(ragged, {&s}, chunk, true);

    std::vector<std::vector<index_t>> held(static_cast<std::size_t>(Hkv));  // positions per row
    for (index_t at = 0; at < S; at += chunk) {
      const index_t to = std::min(S, at + chunk);
      for (auto& row : held)
        for (index_t p = at; p < to; ++p) row.push_back(p);
      const auto m = static_cast<index_t>(held[0].size());
      if (to < S && m <= C + w) continue;
      std::vector<float> q(static_cast<std::size_t>(H * w * d)),
          k(static_cast<std::size_t>(Hkv * m * d)), v(k.size());
      for (index_t h = 0; h < H; ++h)
        for (index_t j = 0; j < w; ++j)
          for (index_t x = 0; x < d; ++x)
            q[static_cast<std::size_t>((h * w + j) * d + x)] =
                s.qfull[0][static_cast<std::size_t>(((to - w + j) * H + h) * d + x)];
      for (index_t g = 0; g < Hkv; ++g)
        for (index_t t = 0; t < m; ++t) {
          const index_t p = held[static_cast<std::size_t>(g)][static_cast<std::size_t>(t)];
          for (index_t x = 0; x < d; ++x) {
            k[static_cast<std::size_t>((g * m + t) * d + x)] = s.wl.key_of(0, 0, g, p)[x];
            v[static_cast<std::size_t>((g * m + t) * d + x)] =
                s.wl.v[0][static_cast<std::size_t>((g * S + p) * d + x)];
          }
        }
      cake::CacheConfig one = s.cfg();
      SnapKv step(one);
      step.prefill(0, cake::make_view(q.data(), std::array<index_t, 4>{1, H, w, d}),
                   cake::make_view(k.data(), std::array<index_t, 4>{1, Hkv, m, d}),
                   cake::make_view(v.data(), std::array<index_t, 4>{1, Hkv, m, d}));
      for (index_t g = 0; g < Hkv; ++g) {
        std::vector<index_t> kept;
        for (index_t i : kv_test::row_positions(step, 0, 0, g))
          kept.push_back(held[static_cast<std::size_t>(g)][static_cast<std::size_t>(i)]);
        std::sort(kept.begin(), kept.end());
        held[static_cast<std::size_t>(g)] = kept;
      }
    }
    const auto P = ragged.positions(1, 0);
    for (index_t g = 0; g < Hkv; ++g) {
      CAPTURE(g);
      std::vector<index_t> got;
      for (index_t t = 0; t < P.extent(2); ++t) got.push_back(P(0, g, t));
      std::sort(got.begin(), got.end());
      CHECK(got == held[static_cast<std::size_t>(g)]);
      // Evicted (a last prompt of up to C + w is kept whole).
      CHECK(got.size() <= static_cast<std::size_t>(C + w));
    }
  }
}

// ---- paged storage -----------------------------------------------------------
// RaggedKvCache on an engine's block pools (one K and one V pool per layer, shared by
// every sequence): equal to the dense RaggedKvCache and to each sequence alone, the
// freed blocks accounted for after every call, bad tables rejected with nothing
// changed.

namespace ragged_paged_test {

using ragged_test::Seq;

// The toy engine (tests/support/paged_engine.hpp); a Seq converts to the prompt it writes.
using Engine = paged_engine::RaggedEngine;

// A paged sequence (its K/V read through its table from the pools) holds what the
// dense cache `dense` holds: budgets, stages, preferences, lengths, positions and the
// bits of every K and V, padding included; the engine's list is its table.
template <class Dense, class Ragged>
void check_paged(const Dense& dense, const Ragged& r, sequence_id id, Engine& e) {
  const auto& c = r.sequence(id);
  REQUIRE(dense.layers_prefilled() == c.layers_prefilled());
  REQUIRE(dense.prompt_length() == c.prompt_length());
  CHECK(std::vector<index_t>(dense.budgets().begin(), dense.budgets().end()) ==
        std::vector<index_t>(c.budgets().begin(), c.budgets().end()));
  CHECK(dense.stage_budgets() == c.stage_budgets());
  CHECK(dense.tokens_held() == c.tokens_held());
  for (index_t l = 0; l < c.layers_prefilled(); ++l) {
    CAPTURE(l);
    CHECK(dense.preference(l) == c.preference(l));
    REQUIRE(r.paged(id, l));
    const auto len = dense.row_lengths(l);
    REQUIRE(len == c.row_lengths(l));
    const auto t = r.table(id, l);
    const index_t longest = *std::max_element(len.begin(), len.end());
    REQUIRE(t.seq_lens(0) == longest);
    const std::vector<std::int32_t> ids(&t.ids(0), &t.ids(0) + t.indptr(1));
    REQUIRE(ids == e.list(id, l));
    const auto pd = dense.positions(l), pp = c.positions(l);
    const auto kd = dense.keys(l), vd = dense.values(l);
    const auto L_ = static_cast<std::size_t>(l);
    const bool any = c.config().paged_slots == cake::slot_order::any;
    if (any)  // each row's tokens fill its first slots, one token each
      for (index_t h = 0; h < e.Hkv; ++h) {
        std::vector<index_t> slots;
        for (index_t j = 0; j < len[static_cast<std::size_t>(h)]; ++j)
          slots.push_back(r.token_slots(id, l)(0, h, j));
        std::sort(slots.begin(), slots.end());
        std::vector<index_t> first(slots.size());
        std::iota(first.begin(), first.end(), index_t{0});
        CHECK(slots == first);
      }
    bool same = true;
    for (index_t h = 0; h < e.Hkv; ++h)
      for (index_t j = 0; j < longest; ++j) {
        const bool held = j < len[static_cast<std::size_t>(h)];
        if (held) same = same && pd(0, h, j) == pp(0, h, j);
        const index_t at = any && held ? r.token_slots(id, l)(0, h, j) : j;  // padding: slot j
        const float* k = e.at(e.kpool[L_], ids, h, at);
        const float* v = e.at(e.vpool[L_], ids, h, at);
        for (index_t x = 0; x < e.d; ++x)  // bits: a NaN (never written) fails
          same =
              same &&
              std::bit_cast<std::uint32_t>(k[x]) == std::bit_cast<std::uint32_t>(kd(0, h, j, x)) &&
              std::bit_cast<std::uint32_t>(v[x]) == std::bit_cast<std::uint32_t>(vd(0, h, j, x));
      }
    CHECK(same);
  }
}

struct Case {
  bool cascade;
  cake::token_order order;
  index_t bs;
  bool nhd;
  cake::slot_order slots = cake::slot_order::token;
};

// Four sequences (one prompt exactly the window), prefilled whole in one call per
// layer, then three decode steps: paged == dense ragged == alone after every call.
template <class Cache>
void paged_equals_dense(const Case& k, cake::host_policy exec = {}) {
  using Ragged = typename ragged_test::ragged_of<Cache>::type;
  auto base = ragged_test::model(k.cascade, k.order);
  base.paged_slots = k.slots;
  std::vector<Seq> seqs;
  seqs.push_back(ragged_test::make_seq(base, 7, 4, 8, 11, 3));
  seqs.push_back(ragged_test::make_seq(base, 3, 23, 6, 12, 3));
  seqs.push_back(ragged_test::make_seq(base, 11, 16, 12, 13, 3));
  seqs.push_back(ragged_test::make_seq(base, 5, 9, 8, 14, 3));
  std::vector<const Seq*> all;
  for (const auto& s : seqs) all.push_back(&s);
  Engine e(base, k.bs, k.nhd, 4 * (40 / k.bs + 4), 17);
  Ragged dense(base), paged(base, {}, {}, {}, exec), dense_exec(base, {}, {}, {}, exec);
  std::vector<std::unique_ptr<Cache>> alone;
  for (const auto& s : seqs) {
    dense.add(s.id, {.cache_size = s.C});
    paged.add(s.id, {.cache_size = s.C});
    dense_exec.add(s.id, {.cache_size = s.C});
    alone.push_back(std::make_unique<Cache>(s.cfg()));
  }
  const auto check = [&] {
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      CAPTURE(seqs[i].id);
      check_paged(dense.sequence(seqs[i].id), paged, seqs[i].id, e);
      check_paged(*alone[i], paged, seqs[i].id, e);
      ragged_test::check_same(dense_exec.sequence(seqs[i].id), dense.sequence(seqs[i].id));
    }
  };
  for (index_t l = 0; l < base.layers; ++l) {
    const ragged_test::Packed p = ragged_test::pack(all, l);
    for (const auto& s : seqs) e.write(s, l, 0, s.S, s.id % 2);  // odd ids: a spare block
    dense.prefill(l, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
    dense_exec.prefill(l, p.ids, p.q_window(), p.keys(), p.values(), p.cu);
    paged.prefill(l, p.ids, p.q_window(), e.kv(p.ids, l));
    for (std::size_t i = 0; i < seqs.size(); ++i)
      alone[i]->prefill(l, seqs[i].wl.qv(l), seqs[i].wl.kv(l), seqs[i].wl.vv(l));
    e.take_back(paged, p.ids);
    check();
  }
  for (std::size_t t = 0; t < 3; ++t)
    for (index_t l = 0; l < base.layers; ++l) {
      const ragged_test::Step st =
          ragged_test::step(all, std::vector<std::size_t>(all.size(), t), l);
      dense.decode(l, st.ids, st.qv(), st.kv(), st.vv());
      dense_exec.decode(l, st.ids, st.qv(), st.kv(), st.vv());
      e.room(st.ids, l);
      paged.decode(l, st.ids, st.qv(), st.kv(), st.vv(), e.table(st.ids, l));
      for (std::size_t i = 0; i < seqs.size(); ++i)
        alone[i]->decode(l, seqs[i].wl.dqv(t, l), seqs[i].wl.dkv(t, l), seqs[i].wl.dvv(t, l));
      e.take_back(paged, st.ids);
      check();
    }
  CHECK(e.freed_total > 0);  // eviction gave blocks back
}

// Everything of a ragged batch, by value: each sequence's snapshot and its chunk
// progress, and the pools' bits.
struct State {
  std::vector<cake_test::Snapshot> seqs;
  std::vector<index_t> received;
  std::vector<std::uint32_t> pools;
  bool operator==(const State&) const = default;
};
template <class Ragged>
State state(const Ragged& r, const Engine& e) {
  State s;
  for (sequence_id id : r.ids()) {
    s.seqs.push_back(cake_test::snapshot(r.sequence(id)));
    for (index_t l = 0; l < e.L; ++l) s.received.push_back(r.chunk_tokens_received(id, l));
  }
  for (const auto* pools : {&e.kpool, &e.vpool})
    for (const auto& p : *pools)
      for (float f : p) s.pools.push_back(std::bit_cast<std::uint32_t>(f));
  return s;
}
// The call throws a cake::error whose message has `what`, and nothing changes.
template <class Ragged, class F>
void rejects(const Ragged& r, const Engine& e, F&& call, const std::string& what) {
  const State before = state(r, e);
  std::string msg;
  try {
    call();
  } catch (const cake::error& err) {
    msg = err.what();
  }
  CAPTURE(msg);
  REQUIRE(!msg.empty());
  CHECK(msg.find(what) != std::string::npos);
  CHECK(state(r, e) == before);
}

}  // namespace ragged_paged_test

TEST_CASE_TEMPLATE("RaggedKvCache on paged pools equals dense and alone, every method", Cache,
                   cake::methods::Cake<>, cake::methods::SnapKv<>, cake::methods::PyramidKv<>,
                   cake::methods::StreamingLlm<>, cake::methods::H2o<>, cake::methods::Tova<>,
                   cake::methods::AdaSnapKv<>, cake::methods::CakeAdaKv<>) {
  for (bool cascade : {true, false})
    for (auto order : ragged_test::both_orders)
      for (index_t bs : {1, 3, 16})  // 3 divides neither the window (4) nor the prompts
        for (bool nhd : {false, true}) {
          CAPTURE(cascade);
          CAPTURE(static_cast<int>(order));
          CAPTURE(bs);
          CAPTURE(nhd);
          ragged_paged_test::paged_equals_dense<Cache>({cascade, order, bs, nhd});
          if (bs == 3 && nhd)  // tokens in any order within each sequence's first slots
            ragged_paged_test::paged_equals_dense<Cache>(
                {cascade, order, bs, nhd, cake::slot_order::any});
        }
}

TEST_CASE("RaggedKvCache on paged pools: sequences in parallel equal them one after another") {
  // min_parallel_work 0 splits every call with more than one sequence over two threads.
  const cake::host_policy parallel{2, nullptr, 0};
  for (index_t bs : {1, 3})
    for (bool cascade : {true, false})
      ragged_paged_test::paged_equals_dense<cake::methods::CakeAdaKv<>>(
          {cascade, cake::token_order::position, bs, bs == 3}, parallel);
  ragged_paged_test::paged_equals_dense<cake::methods::H2o<>>(
      {true, cake::token_order::reference, 3, false}, parallel);
}

TEST_CASE_TEMPLATE("RaggedKvCache on paged pools: chunked prefill equals whole-prompt prefill",
                   Cache, cake::methods::Cake<>, cake::methods::H2o<>, cake::methods::CakeAdaKv<>) {
  using Ragged = typename ragged_test::ragged_of<Cache>::type;
  using ragged_paged_test::Engine;
  for (bool cascade : {true, false})
    for (auto order : ragged_test::both_orders)
      for (index_t chunk : {1, 3, 5, 23})
        for (index_t bs : {1, 4, 5}) {
          CAPTURE(cascade);
          CAPTURE(static_cast<int>(order));
          CAPTURE(chunk);
          CAPTURE(bs);
          const auto base = ragged_test::model(cascade, order);
          std::vector<Seq> seqs;
          seqs.push_back(ragged_test::make_seq(base, 4, 23, 7, 31, 3));
          seqs.push_back(ragged_test::make_seq(base, 9, 9, 8, 32, 3));
          seqs.push_back(ragged_test::make_seq(base, 2, 4, 8, 33, 3));
          std::vector<const Seq*> all;
          for (const auto& s : seqs) all.push_back(&s);
          Engine e(base, bs, bs == 4, 3 * (30 / bs + 3), 19);
          // Block size 4: the sequences of a call in parallel (two threads, every call).
          Ragged ragged(base, {}, {}, {},
                        bs == 4 ? cake::host_policy{2, nullptr, 0} : cake::host_policy{});
          std::vector<std::unique_ptr<Cache>> alone;
          for (const auto& s : seqs) {
            ragged.add(s.id, {.cache_size = s.C, .prompt_length = s.S});
            alone.push_back(std::make_unique<Cache>(s.cfg()));
            for (index_t l = 0; l < base.layers; ++l)
              alone.back()->prefill(l, s.wl.qv(l), s.wl.kv(l), s.wl.vv(l));
          }
          std::vector<index_t> at(seqs.size(), 0);
          for (bool more = true; more;) {
            std::vector<const Seq*> call;
            std::vector<std::pair<index_t, index_t>> ranges;
            for (std::size_t i = 0; i < seqs.size(); ++i)
              if (at[i] < seqs[i].S) {
                call.push_back(&seqs[i]);
                ranges.push_back({at[i], std::min(seqs[i].S, at[i] + chunk)});
              }
            more = !call.empty();
            for (index_t l = 0; more && l < base.layers; ++l) {
              for (std::size_t i = 0; i < call.size(); ++i)  // the engine computes the chunk
                e.write(*call[i], l, ranges[i].first, ranges[i].second);
              const ragged_test::Packed p = ragged_test::pack(call, l, ranges);
              ragged.prefill_chunk(l, p.ids, p.queries(), e.kv(p.ids, l), p.cu);
              e.take_back(ragged, p.ids);
              for (std::size_t i = 0; i < call.size(); ++i) {
                const bool last = ranges[i].second == call[i]->S;
                CHECK(ragged.chunk_tokens_received(call[i]->id, l) == ranges[i].second);
                CHECK(ragged.sequence(call[i]->id).layers_prefilled() == (last ? l + 1 : 0));
                CHECK(ragged.paged(call[i]->id, l) == last);
              }
            }
            for (std::size_t i = 0; i < seqs.size(); ++i)
              at[i] = std::min(seqs[i].S, at[i] + chunk);
          }
          for (std::size_t i = 0; i < seqs.size(); ++i)
            ragged_paged_test::check_paged(*alone[i], ragged, seqs[i].id, e);
          for (std::size_t t = 0; t < 3; ++t)
            for (index_t l = 0; l < base.layers; ++l) {
              const ragged_test::Step st =
                  ragged_test::step(all, std::vector<std::size_t>(all.size(), t), l);
              e.room(st.ids, l);
              ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv(), e.table(st.ids, l));
              e.take_back(ragged, st.ids);
              for (std::size_t i = 0; i < seqs.size(); ++i)
                alone[i]->decode(l, seqs[i].wl.dqv(t, l), seqs[i].wl.dkv(t, l),
                                 seqs[i].wl.dvv(t, l));
            }
          for (std::size_t i = 0; i < seqs.size(); ++i)
            ragged_paged_test::check_paged(*alone[i], ragged, seqs[i].id, e);
        }
}

TEST_CASE("RaggedKvCache on paged pools: sequences join and leave while others decode") {
  using ragged_paged_test::check_paged;
  const auto base = ragged_test::model();
  const Seq a = ragged_test::make_seq(base, 1, 23, 8, 21, 4);
  const Seq b = ragged_test::make_seq(base, 2, 9, 6, 22, 8);
  const Seq c = ragged_test::make_seq(base, 3, 16, 10, 23, 4);
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg()), rc(c.cfg());
  ragged_paged_test::Engine e(base, 3, true, 40, 29);
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.cache_size = 8});
  ragged.add(2, {.cache_size = 6});
  for (index_t l = 0; l < 3; ++l) {
    const ragged_test::Packed p = ragged_test::pack({&b, &a}, l);
    e.write(b, l, 0, b.S);
    e.write(a, l, 0, a.S, 1);
    ragged.prefill(l, p.ids, p.q_window(), e.kv(p.ids, l));
    e.take_back(ragged, p.ids);
    ra.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
    rb.prefill(l, b.wl.qv(l), b.wl.kv(l), b.wl.vv(l));
  }
  const auto decode = [&](const std::vector<const Seq*>& s, const std::vector<std::size_t>& t,
                          index_t l) {
    const ragged_test::Step st = ragged_test::step(s, t, l);
    e.room(st.ids, l);
    ragged.decode(l, st.ids, st.qv(), st.kv(), st.vv(), e.table(st.ids, l));
    e.take_back(ragged, st.ids);
  };
  std::size_t tb = 0;
  for (std::size_t t = 0; t < 2; ++t, ++tb)
    for (index_t l = 0; l < 3; ++l) {
      decode({&a, &b}, {t, tb}, l);
      ra.decode(l, a.wl.dqv(t, l), a.wl.dkv(t, l), a.wl.dvv(t, l));
      rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
    }
  check_paged(ra, ragged, 1, e);
  check_paged(rb, ragged, 2, e);
  // 1 leaves (the engine frees its blocks), 3 joins and takes them: its prefill runs
  // layer by layer beside 2's decode step.
  const std::vector<std::int32_t> was_a = e.list(1, 0);
  e.drop(1);
  ragged.remove(1);
  ragged.add(3, {.cache_size = 10});
  for (index_t l = 0; l < 3; ++l) {
    const ragged_test::Packed p = ragged_test::pack({&c}, l);
    e.write(c, l, 0, c.S);
    ragged.prefill(l, p.ids, p.q_window(), e.kv(p.ids, l));
    e.take_back(ragged, p.ids);
    rc.prefill(l, c.wl.qv(l), c.wl.kv(l), c.wl.vv(l));
    decode({&b}, {tb}, l);
    rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
  }
  ++tb;
  const auto& c0 = e.list(3, 0);
  CHECK(std::any_of(c0.begin(), c0.end(), [&](std::int32_t id) {
    return std::find(was_a.begin(), was_a.end(), id) != was_a.end();
  }));  // 1's blocks went to 3
  for (std::size_t t = 0; t < 3; ++t, ++tb)
    for (index_t l = 0; l < 3; ++l) {
      decode({&c, &b}, {t, tb}, l);
      rc.decode(l, c.wl.dqv(t, l), c.wl.dkv(t, l), c.wl.dvv(t, l));
      rb.decode(l, b.wl.dqv(tb, l), b.wl.dkv(tb, l), b.wl.dvv(tb, l));
    }
  check_paged(rb, ragged, 2, e);
  check_paged(rc, ragged, 3, e);
  CHECK(ragged.tokens_held() == rb.tokens_held() + rc.tokens_held());
}

TEST_CASE("RaggedKvCache on paged pools: bad tables are rejected before any sequence changes") {
  using ragged_paged_test::rejects;
  const auto base = ragged_test::model();
  const Seq a = ragged_test::make_seq(base, 1, 9, 8, 41, 1);
  const Seq b = ragged_test::make_seq(base, 2, 16, 6, 42, 1);
  ragged_paged_test::Engine e(base, 3, false, 30, 43);
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.cache_size = 8});
  ragged.add(2, {.cache_size = 6});
  const std::vector<sequence_id> ab{1, 2};
  for (const Seq* s : {&a, &b})
    for (index_t l = 0; l < 3; ++l) e.write(*s, l, 0, s->S);
  {
    const ragged_test::Packed p = ragged_test::pack({&a, &b}, 0);
    ragged.prefill(0, p.ids, p.q_window(), e.kv(ab, 0));
    e.take_back(ragged, ab);
  }
  const ragged_test::Packed p = ragged_test::pack({&a, &b}, 1);
  const auto prefill = [&](const cake::paged_kv<float>& kv) {
    return [&ragged, &p, kv] { ragged.prefill(1, p.ids, p.q_window(), kv); };
  };
  SUBCASE("an id out of the pool") {
    const auto kv = e.kv(ab, 1);
    e.t_ids[2] = static_cast<std::int32_t>(e.N);
    rejects(ragged, e, prefill(kv), "must be a block of the pool");
  }
  SUBCASE("a block named by two sequences of the call") {
    const auto kv = e.kv(ab, 1);
    e.t_ids.back() = e.t_ids.front();
    rejects(ragged, e, prefill(kv), "appears twice");
  }
  SUBCASE("a block another sequence holds") {
    ragged.add(3);
    const Seq c = ragged_test::make_seq(base, 3, 9, 8, 44, 0);
    e.write(c, 0, 0, c.S);
    const std::vector<sequence_id> three{3};
    const auto kv = e.kv(three, 0);
    e.t_ids[1] = e.list(2, 0)[0];  // sequence 2's first block of layer 0
    const ragged_test::Packed pc = ragged_test::pack({&c}, 0);
    rejects(
        ragged, e, [&] { ragged.prefill(0, three, pc.q_window(), kv); },
        "is a block sequence 2 holds at layer 0");
  }
  SUBCASE("a table too short for its sequence") {
    auto kv = e.kv(ab, 1);
    std::vector<std::int32_t> indptr{0, 2, 0}, ids(e.t_ids.begin(), e.t_ids.begin() + 2);
    ids.insert(ids.end(), e.t_ids.begin() + e.t_indptr[1], e.t_ids.end());
    indptr[2] = static_cast<std::int32_t>(ids.size());
    kv.table = cake::make_block_table(indptr.data(), ids.data(), e.t_lens.data(), 2);
    rejects(ragged, e, prefill(kv), "too short");  // 9 tokens need 3 blocks of 3
  }
  SUBCASE("one sequence per entry of ids") {
    auto kv = e.kv(ab, 1);
    kv.table = cake::make_block_table(e.t_indptr.data(), e.t_ids.data(), e.t_lens.data(), 1);
    rejects(ragged, e, prefill(kv), "one sequence per entry of ids");
  }
  SUBCASE("a prompt of another length than layer 0's") {
    const auto kv = e.kv(ab, 1);
    e.t_lens[1] = 15;
    rejects(ragged, e, prefill(kv), "prompt length of layer 0, S = 16");
  }
  SUBCASE("pools other than the layer's") {
    auto kv = e.kv(ab, 0);  // layer 0's pools are fixed now: 1 and 2 hold blocks there
    kv.k_pool = e.pool(e.kpool[2]);
    kv.v_pool = e.pool(e.vpool[2]);
    ragged.add(3);
    const Seq c = ragged_test::make_seq(base, 3, 9, 8, 45, 0);
    e.write(c, 0, 0, c.S);
    const std::vector<sequence_id> three{3};
    const ragged_test::Packed pc = ragged_test::pack({&c}, 0);
    rejects(
        ragged, e,
        [&] {
          ragged.prefill(0, three, pc.q_window(),
                         cake::paged_kv<float>{kv.k_pool, kv.v_pool, e.table(three, 0)});
        },
        "the pools its first paged call gave");
  }
#if !defined(CCCL_ENABLE_HOST_ASSERTIONS)  // checked CCCL refuses such a view when it is made
  SUBCASE("pools whose strides alias tokens") {
    auto kv = e.kv(ab, 1);  // layer 1 has no pools yet: these would be its
    auto st = e.strides();
    st[2] = 0;  // every slot of a block the same memory
    kv.v_pool =
        cake::make_view(e.vpool[1].data(), std::array<index_t, 4>{e.N, e.Hkv, e.bs, e.d}, st);
    rejects(ragged, e, prefill(kv),
            "[cake.compact.pool] v_pool must give every (block, kv_head, slot, x) element its own "
            "memory: stride(2) must be >= 1");
  }
#endif
  SUBCASE("a value in the pool not finite") {
    const auto kv = e.kv(ab, 1);
    float& x = e.vpool[1][static_cast<std::size_t>(e.offset(e.list(2, 1)[5], 1, 15) + 2)];
    const float was = x;
    x = std::numeric_limits<float>::infinity();
    rejects(ragged, e, prefill(kv), "v_pool");
    x = was;
  }

  // Decoding: finish the prefill first.
  for (index_t l = 1; l < 3; ++l) {
    const ragged_test::Packed pl = ragged_test::pack({&a, &b}, l);
    ragged.prefill(l, pl.ids, pl.q_window(), e.kv(ab, l));
    e.take_back(ragged, ab);
  }
  const ragged_test::Step st = ragged_test::step({&a, &b}, {0, 0}, 0);
  const auto decode = [&](const cake::block_table<>& t) {
    return [&ragged, &st, t] { ragged.decode(0, st.ids, st.qv(), st.kv(), st.vv(), t); };
  };
  SUBCASE("decode: a table without a block the sequence holds") {
    // Sequence 1's blocks but its last, then sequence 2's.
    std::vector<std::int32_t> ids = e.list(1, 0);
    ids.pop_back();
    const auto n1 = static_cast<std::int32_t>(ids.size());
    ids.insert(ids.end(), e.list(2, 0).begin(), e.list(2, 0).end());
    const std::int32_t indptr[3] = {0, n1, static_cast<std::int32_t>(ids.size())};
    const std::int32_t lens[2] = {e.len(1, 0), e.len(2, 0)};
    rejects(ragged, e, decode(cake::make_block_table(indptr, ids.data(), lens, 2)),
            "the block table of sequence 0 is too short");
  }
  e.room(ab, 0);
  SUBCASE("decode: a held block replaced") {
    const auto t = e.table(ab, 0);
    std::swap(e.t_ids[0], e.t_ids[1]);
    rejects(ragged, e, decode(t), "which holds tokens of sequence 0");
  }
  SUBCASE("decode: the new block is one another sequence holds") {
    // Sequence 2's blocks, then sequence 1's first as its room.
    const std::vector<sequence_id> two{2};
    const ragged_test::Step s2 = ragged_test::step({&b}, {0}, 0);
    std::vector<std::int32_t> ids = e.list(2, 0);
    const std::int32_t held = static_cast<std::int32_t>(ids.size()), len = e.len(2, 0);
    ids.push_back(e.list(1, 0)[0]);
    const std::int32_t indptr[2] = {0, held + 1};
    const auto t = cake::make_block_table(indptr, ids.data(), &len, 1);
    rejects(
        ragged, e, [&] { ragged.decode(0, two, s2.qv(), s2.kv(), s2.vv(), t); },
        "is a block sequence 1 holds at layer 0");
  }
  SUBCASE("decode: a paged layer needs its table") {
    rejects(
        ragged, e, [&] { ragged.decode(0, st.ids, st.qv(), st.kv(), st.vv()); },
        "pass its block table");
  }
  // The good table after the rejected ones: equal to the sequences alone.
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg());
  for (index_t l = 0; l < 3; ++l) {
    ra.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
    rb.prefill(l, b.wl.qv(l), b.wl.kv(l), b.wl.vv(l));
  }
  CHECK(ragged.validate_decode(0, st.ids, st.qv(), st.kv(), st.vv(), e.table(ab, 0)).ok());
  ragged.decode(0, st.ids, st.qv(), st.kv(), st.vv(), e.table(ab, 0));
  e.take_back(ragged, ab);
  ra.decode(0, a.wl.dqv(0, 0), a.wl.dkv(0, 0), a.wl.dvv(0, 0));
  rb.decode(0, b.wl.dqv(0, 0), b.wl.dkv(0, 0), b.wl.dvv(0, 0));
  ragged_paged_test::check_paged(ra, ragged, 1, e);
  ragged_paged_test::check_paged(rb, ragged, 2, e);
}

TEST_CASE("RaggedKvCache on paged pools: chunks out of turn or off their blocks change nothing") {
  using ragged_paged_test::rejects;
  const auto base = ragged_test::model();
  const Seq a = ragged_test::make_seq(base, 1, 9, 8, 51, 0);
  const Seq b = ragged_test::make_seq(base, 2, 6, 8, 52, 0);
  ragged_paged_test::Engine e(base, 2, false, 20, 53);
  cake::RaggedKvCache<> ragged(base);
  ragged.add(1, {.prompt_length = 9});
  ragged.add(2, {.prompt_length = 6});
  ragged.add(3, {.prompt_length = 9, .chunking = cake::chunk_eviction::bounded});
  const std::vector<sequence_id> ab{1, 2};
  const auto chunk = [&](index_t l, std::vector<std::pair<index_t, index_t>> r) {
    e.write(a, l, r[0].first, r[0].second);
    e.write(b, l, r[1].first, r[1].second);
    const ragged_test::Packed p = ragged_test::pack({&a, &b}, l, r);
    ragged.prefill_chunk(l, ab, p.queries(), e.kv(ab, l), p.cu);
  };
  for (index_t l = 0; l < 3; ++l) chunk(l, {{0, 5}, {0, 3}});
  CHECK(!ragged.paged(1, 0));  // between chunks the blocks are the engine's
  // The next chunk, [5, 9) and [3, 6), written by the engine.
  for (const Seq* s : {&a, &b}) e.write(*s, 0, s == &a ? 5 : 3, s->S);
  const ragged_test::Packed p = ragged_test::pack({&a, &b}, 0, {{5, 9}, {3, 6}});
  const auto call = [&](const cake::paged_kv<float>& kv) {
    return [&ragged, &p, &ab, kv] { ragged.prefill_chunk(0, ab, p.queries(), kv, p.cu); };
  };
  SUBCASE("an earlier chunk's block replaced") {
    const auto kv = e.kv(ab, 0);
    std::swap(e.t_ids[0], e.t_ids[1]);
    rejects(ragged, e, call(kv), "which holds tokens [0, 2) of sequence 1's earlier chunks");
  }
  SUBCASE("seq_lens other than the prompt so far") {
    const auto kv = e.kv(ab, 0);
    e.t_lens[1] = 5;
    rejects(ragged, e, call(kv), "must be the tokens sequence 2 holds, then its chunk's, 3 + 3");
  }
  SUBCASE("a block of another sequence's earlier chunk") {
    // Sequence 2 alone, its new block (its third) one that holds sequence 1's chunk.
    const std::vector<sequence_id> two{2};
    const ragged_test::Packed pb = ragged_test::pack({&b}, 0, {{3, 6}});
    const auto kv = e.kv(two, 0);
    REQUIRE(e.t_ids.size() == 3);
    e.t_ids[2] = e.list(1, 0)[0];
    rejects(
        ragged, e, [&] { ragged.prefill_chunk(0, two, pb.queries(), kv, pb.cu); },
        "is a block sequence 1 holds at layer 0");
  }
  SUBCASE("a dense chunk after paged ones") {
    rejects(
        ragged, e, [&] { ragged.prefill_chunk(0, ab, p.queries(), p.keys(), p.values(), p.cu); },
        "took its earlier chunks in the pools");
  }
  SUBCASE("bounded chunking: seq_lens other than held + chunk") {
    const Seq c = ragged_test::make_seq(base, 3, 9, 8, 54, 0);
    e.write(c, 0, 0, 4);
    const std::vector<sequence_id> three{3};
    const ragged_test::Packed pc = ragged_test::pack({&c}, 0, {{0, 3}});
    rejects(
        ragged, e, [&] { ragged.prefill_chunk(0, three, pc.queries(), e.kv(three, 0), pc.cu); },
        "must be the tokens sequence 3 holds, then its chunk's, 0 + 3, got 4");
  }
  // The valid chunk completes both prompts: equal to whole-prompt prefill.
  ragged.prefill_chunk(0, ab, p.queries(), e.kv(ab, 0), p.cu);
  e.take_back(ragged, ab);
  for (index_t l = 1; l < 3; ++l) {
    chunk(l, {{5, 9}, {3, 6}});
    e.take_back(ragged, ab);
  }
  cake::methods::Cake<> ra(a.cfg()), rb(b.cfg());
  for (index_t l = 0; l < 3; ++l) {
    ra.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
    rb.prefill(l, b.wl.qv(l), b.wl.kv(l), b.wl.vv(l));
  }
  ragged_paged_test::check_paged(ra, ragged, 1, e);
  ragged_paged_test::check_paged(rb, ragged, 2, e);
}

TEST_CASE("RaggedKvCache: chunks (exact and bounded) in parallel equal them one after another") {
  const cake::host_policy parallel{2, nullptr, 0};  // two threads, every call
  for (bool bounded : {false, true})
    for (index_t chunk : {3, 5}) {
      CAPTURE(bounded);
      CAPTURE(chunk);
      const auto base = model();
      std::vector<Seq> seqs;
      seqs.push_back(make_seq(base, 4, 23, 7, 81, 3));
      seqs.push_back(make_seq(base, 9, 9, 8, 82, 3));
      seqs.push_back(make_seq(base, 2, 17, 6, 83, 3));
      std::vector<const Seq*> all;
      for (const auto& s : seqs) all.push_back(&s);
      cake::RaggedKvCache<> serial(base), par(base, {}, {}, {}, parallel);
      for (auto* r : {&serial, &par})
        for (const auto& s : seqs)
          r->add(s.id, {.cache_size = s.C,
                        .prompt_length = s.S,
                        .chunking =
                            bounded ? cake::chunk_eviction::bounded : cake::chunk_eviction::exact});
      prefill_by_chunks(serial, all, chunk, bounded);
      prefill_by_chunks(par, all, chunk, bounded);
      for (std::size_t t = 0; t < 3; ++t)
        for (index_t l = 0; l < base.layers; ++l) {
          const Step st = step(all, std::vector<std::size_t>(all.size(), t), l);
          serial.decode(l, st.ids, st.qv(), st.kv(), st.vv());
          par.decode(l, st.ids, st.qv(), st.kv(), st.vv());
        }
      for (const auto& s : seqs) {
        CAPTURE(s.id);
        check_same(par.sequence(s.id), serial.sequence(s.id));
        for (index_t l = 0; l < base.layers; ++l) {
          const auto a = par.positions(s.id, l), b = serial.positions(s.id, l);
          REQUIRE(a.extent(2) == b.extent(2));
          for (index_t g = 0; g < base.kv_heads; ++g)
            for (index_t t = 0; t < a.extent(2); ++t) CHECK(a(0, g, t) == b(0, g, t));
        }
      }
    }
}

TEST_CASE_TEMPLATE("RaggedKvCache on paged pools: bounded chunking equals it on dense memory",
                   Cache, cake::methods::Cake<>, cake::methods::StreamingLlm<>,
                   cake::methods::H2o<>, cake::methods::CakeAdaKv<>) {
  using Ragged = typename ragged_test::ragged_of<Cache>::type;
  using ragged_paged_test::Engine;
  for (auto order : ragged_test::both_orders)
    for (index_t chunk : {1, 3, 5, 23})
      for (index_t bs : {1, 4, 5}) {
        CAPTURE(static_cast<int>(order));
        CAPTURE(chunk);
        CAPTURE(bs);
        const auto base = ragged_test::model(true, order);
        std::vector<Seq> seqs;
        seqs.push_back(ragged_test::make_seq(base, 4, 23, 7, 61, 3));
        seqs.push_back(ragged_test::make_seq(base, 9, 9, 8, 62, 3));
        std::vector<const Seq*> all;
        for (const auto& s : seqs) all.push_back(&s);
        Engine e(base, bs, bs == 4, 2 * (30 / bs + 3), 23);
        Ragged dense(base);
        Ragged paged(base, {}, {}, {},
                     bs == 4 ? cake::host_policy{2, nullptr, 0} : cake::host_policy{});
        for (auto* r : {&dense, &paged})
          for (const auto& s : seqs)
            r->add(s.id, {.cache_size = s.C,
                          .prompt_length = s.S,
                          .chunking = cake::chunk_eviction::bounded});
        ragged_test::prefill_by_chunks(dense, all, chunk, true);
        std::vector<index_t> at(seqs.size(), 0);
        for (bool more = true; more;) {
          std::vector<const Seq*> call;
          std::vector<std::pair<index_t, index_t>> ranges;
          for (std::size_t i = 0; i < seqs.size(); ++i)
            if (at[i] < seqs[i].S) {
              call.push_back(&seqs[i]);
              ranges.push_back({at[i], std::min(seqs[i].S, at[i] + chunk)});
            }
          more = !call.empty();
          for (index_t l = 0; more && l < base.layers; ++l) {
            for (std::size_t i = 0; i < call.size(); ++i)
              e.write_after(*call[i], l, ranges[i].first, ranges[i].second,
                            paged.chunk_tokens_held(call[i]->id, l));
            const ragged_test::Packed p = ragged_test::pack(call, l, ranges);
            paged.prefill_chunk(l, p.ids, p.queries(), e.kv(p.ids, l), p.cu);
            e.take_chunk_back(paged, p.ids, l);
            e.take_back(paged, p.ids);
          }
          for (std::size_t i = 0; i < seqs.size(); ++i) at[i] = std::min(seqs[i].S, at[i] + chunk);
        }
        CHECK(e.freed_total > 0);
        const auto same = [&] {
          for (const auto& s : seqs) {
            CAPTURE(s.id);
            ragged_paged_test::check_paged(dense.sequence(s.id), paged, s.id, e);
            for (index_t l = 0; l < base.layers; ++l) {
              const auto a = dense.positions(s.id, l), b = paged.positions(s.id, l);
              REQUIRE(a.extent(2) == b.extent(2));
              for (index_t g = 0; g < base.kv_heads; ++g)
                for (index_t t = 0; t < a.extent(2); ++t) CHECK(a(0, g, t) == b(0, g, t));
            }
          }
        };
        same();
        for (std::size_t t = 0; t < 3; ++t)
          for (index_t l = 0; l < base.layers; ++l) {
            const ragged_test::Step st =
                ragged_test::step(all, std::vector<std::size_t>(all.size(), t), l);
            dense.decode(l, st.ids, st.qv(), st.kv(), st.vv());
            e.room(st.ids, l);
            paged.decode(l, st.ids, st.qv(), st.kv(), st.vv(), e.table(st.ids, l));
            e.take_back(paged, st.ids);
          }
        same();
      }
}

// A sequence's first chunk call that fails late, in the check its own cache runs when
// the chunk is its whole prompt (the last chunk: the cache prefills the layer), after
// the call made the sequence's chunk state: the sequence is left as it was, so a
// whole-prompt prefill of it is then accepted and equals one that never failed.
namespace ragged_test {
// A preference that fails every layer (a negative value) while *fail is set.
struct FailingPreference {
  static constexpr bool needs_entropy = true;
  static constexpr bool needs_variance = true;
  const bool* fail = nullptr;
  double operator()(const cake::LayerStats& s) const {
    return *fail ? -1.0 : cake::CakePreference{}(s);
  }
  cake::status validate() const { return cake::status::success(); }
};
}  // namespace ragged_test

TEST_CASE("RaggedKvCache: a first chunk that fails late leaves no chunk state (dense and paged)") {
  using ragged_test::error_id;
  using ragged_test::FailingPreference;
  const auto base = ragged_test::model();
  const Seq a = ragged_test::make_seq(base, 1, 9, 8, 55, 0);
  const std::vector<sequence_id> ids{1};
  bool fail = false;
  using Ragged = cake::RaggedKvCache<FailingPreference>;
  cake::KvCache<FailingPreference> alone(a.cfg(), FailingPreference{&fail});
  for (index_t l = 0; l < 3; ++l) alone.prefill(l, a.wl.qv(l), a.wl.kv(l), a.wl.vv(l));
  for (const auto mode : {cake::chunk_eviction::exact, cake::chunk_eviction::bounded})
    for (const bool paged : {false, true}) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(paged);
      Ragged ragged(base, FailingPreference{&fail});
      ragged.add(1, {.prompt_length = a.S, .chunking = mode});
      ragged_paged_test::Engine e(base, 2, false, 20, 56);
      const ragged_test::Packed p = ragged_test::pack({&a}, 0, {{0, a.S}});
      fail = true;
      const std::string got = error_id([&] {
        if (paged) {
          e.write(a, 0, 0, a.S);
          ragged.prefill_chunk(0, ids, p.queries(), e.kv(ids, 0), p.cu);
        } else {
          ragged.prefill_chunk(0, ids, p.queries(), p.keys(), p.values(), p.cu);
        }
      });
      fail = false;
      CHECK(got == "cake.preference.value");
      CHECK(ragged.sequence(1).layers_prefilled() == 0);
      for (index_t l = 0; l < 3; ++l) {
        CHECK(ragged.chunk_tokens_received(1, l) == 0);
        CHECK(ragged.chunk_tokens_held(1, l) == 0);
      }
      for (index_t l = 0; l < 3; ++l) {
        const ragged_test::Packed w = ragged_test::pack({&a}, l);
        REQUIRE(error_id([&] {
                  ragged.prefill(l, w.ids, w.q_window(), w.keys(), w.values(), w.cu);
                }) == "no error");
      }
      ragged_test::check_same(ragged.sequence(1), alone);
    }
}
