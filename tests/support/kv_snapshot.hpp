// Every public observer of a KvCache, by value: what the strong-guarantee checks
// (tests/host/test_errors.cpp, tests/reliability/test_fault_injection.cpp,
// tests/fuzz/fuzz_kv_cache.cpp) compare before and after a call that threw.
// Floating-point observers are kept as their bits, so "unchanged" is exact and a
// NaN held in the cache equals itself.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <cake/core/types.hpp>

namespace cake_test {

struct Snapshot {
  cake::index_t prefilled = 0, prompt = 0, tokens = 0, peak = 0;
  std::size_t bytes = 0;
  std::vector<cake::index_t> budgets;
  std::vector<std::vector<cake::index_t>> stages;
  // Per layer.
  std::vector<cake::index_t> layer_tokens;
  std::vector<std::size_t> layer_bytes;
  std::vector<std::uint64_t> prefs;  // prefilled layers only
  std::vector<std::vector<cake::index_t>> lengths;
  // Per layer, flattened in (batch, kv_heads, slots[, head_dim]) order.
  std::vector<std::vector<cake::index_t>> positions;
  std::vector<std::vector<std::uint32_t>> keys, values;  // empty for a paged layer
  // Per paged layer: its table (indptr, ids, seq_lens) and freed (its K/V are the
  // engine's pools, which the caller compares).
  std::vector<std::vector<std::int32_t>> tables;
  bool operator==(const Snapshot&) const = default;
};

template <class Cache>
Snapshot snapshot(const Cache& c) {
  using cake::index_t;
  Snapshot s;
  s.prefilled = c.layers_prefilled();
  s.prompt = c.prompt_length();
  s.tokens = c.tokens_held();
  s.peak = c.peak_tokens_held();
  s.bytes = c.bytes_held();
  s.budgets.assign(c.budgets().begin(), c.budgets().end());
  s.stages = c.stage_budgets();
  for (index_t l = 0; l < c.num_layers(); ++l) {
    s.layer_tokens.push_back(c.tokens_held(l));
    s.layer_bytes.push_back(c.bytes_held(l));
    if (l < c.layers_prefilled()) s.prefs.push_back(std::bit_cast<std::uint64_t>(c.preference(l)));
    s.lengths.push_back(c.row_lengths(l));
    auto p = c.positions(l);  // (batch, kv_heads, slots)
    std::vector<index_t> pv;
    std::vector<std::uint32_t> kv, vv;
    if (c.paged(l)) {
      const auto t = c.table(l);
      std::vector<std::int32_t> tv;
      for (index_t i = 0; i <= t.num_seqs(); ++i) tv.push_back(t.indptr(i));
      for (index_t i = 0; i < t.indptr(t.num_seqs()); ++i) tv.push_back(t.ids(i));
      for (index_t i = 0; i < t.num_seqs(); ++i) tv.push_back(t.seq_lens(i));
      tv.insert(tv.end(), c.freed(l).begin(), c.freed(l).end());
      s.tables.push_back(std::move(tv));
      for (index_t b = 0; b < p.extent(0); ++b)
        for (index_t g = 0; g < p.extent(1); ++g)
          for (index_t t2 = 0; t2 < p.extent(2); ++t2) pv.push_back(p(b, g, t2));
      s.positions.push_back(std::move(pv));
      s.keys.emplace_back();
      s.values.emplace_back();
      continue;
    }
    auto k = c.keys(l);    // (batch, kv_heads, slots, head_dim)
    auto v = c.values(l);  // (batch, kv_heads, slots, head_dim)
    for (index_t b = 0; b < k.extent(0); ++b)
      for (index_t g = 0; g < k.extent(1); ++g)
        for (index_t t = 0; t < k.extent(2); ++t) {
          pv.push_back(p(b, g, t));
          for (index_t x = 0; x < k.extent(3); ++x) {
            kv.push_back(std::bit_cast<std::uint32_t>(static_cast<float>(k(b, g, t, x))));
            vv.push_back(std::bit_cast<std::uint32_t>(static_cast<float>(v(b, g, t, x))));
          }
        }
    s.positions.push_back(std::move(pv));
    s.keys.push_back(std::move(kv));
    s.values.push_back(std::move(vv));
  }
  return s;
}

}  // namespace cake_test
