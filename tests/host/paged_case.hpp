// Random paged-compaction cases shared by the host, emulated-CUDA and CUDA tests: a
// pool in either layout, ragged block tables with spare blocks and unused pool blocks,
// ragged per-head kept lengths, and the expected pool computed with the dense
// cake::compact row by row (so "paged equals dense" is what every test checks).
#pragma once

#include <cake/cake.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace paged_case {

using cake::index_t;

struct Case {
  index_t num_seqs = 0, Hkv = 0, bs = 0, d = 0, N = 0, m = 0;
  bool nhd = false;  // vLLM memory [N, bs, Hkv, d]; else FlashInfer HND [N, Hkv, bs, d]
  std::vector<std::int32_t> indptr, ids, seq_lens, keep_lens;  // keep_lens (num_seqs, Hkv)
  std::vector<std::int64_t> keep;                              // (num_seqs, Hkv, m)
  std::vector<float> pool, expected;                           // N * bs * Hkv * d

  std::array<index_t, 4> extents() const { return {N, Hkv, bs, d}; }
  std::array<index_t, 4> strides() const {
    return nhd ? std::array<index_t, 4>{bs * Hkv * d, d, Hkv * d, 1}
               : std::array<index_t, 4>{Hkv * bs * d, bs * d, d, 1};
  }
  template <class Space = cake::host_space, class T>
  auto pool_view(T* p) const {
    return cake::make_view<Space>(p, extents(), strides());
  }
  cake::block_table<> table() const {
    return cake::make_block_table<cake::host_space>(indptr.data(), ids.data(), seq_lens.data(),
                                                    num_seqs, static_cast<index_t>(ids.size()));
  }
  auto keep_view() const {
    return cake::make_view(keep.data(), std::array<index_t, 3>{num_seqs, Hkv, m});
  }
  auto lens_view() const {
    return cake::make_view(keep_lens.data(), std::array<index_t, 2>{num_seqs, Hkv});
  }
  // Offset in elements of token t of sequence s, head h (the pool's own layout).
  index_t offset(index_t s, index_t h, index_t t) const {
    const auto st = strides();
    return ids[static_cast<std::size_t>(indptr[static_cast<std::size_t>(s)] + t / bs)] * st[0] +
           h * st[1] + (t % bs) * st[2];
  }
};

struct Shape {
  index_t num_seqs, Hkv, bs, d, max_len;
  bool nhd;
};

// `shift` > 0 keeps the last tokens (keep(t) = t + shift: every row moves by a fixed
// distance, reads and writes overlap from one token to the next); otherwise a random
// ascending subset per row.
inline Case make(const Shape& sh, std::uint32_t seed, index_t shift = 0) {
  std::mt19937 rng(seed);
  Case c;
  c.num_seqs = sh.num_seqs, c.Hkv = sh.Hkv, c.bs = sh.bs, c.d = sh.d, c.nhd = sh.nhd;
  std::uniform_int_distribution<index_t> len_d(0, sh.max_len), spare_d(0, 2);
  index_t total = 0;
  c.indptr.push_back(0);
  for (index_t s = 0; s < sh.num_seqs; ++s) {
    const index_t len = len_d(rng);
    c.seq_lens.push_back(static_cast<std::int32_t>(len));
    total += (len + sh.bs - 1) / sh.bs + spare_d(rng);
    c.indptr.push_back(static_cast<std::int32_t>(total));
  }
  c.N = total + 3;  // blocks no sequence owns stay untouched
  std::vector<std::int32_t> perm(static_cast<std::size_t>(c.N));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.ids.assign(perm.begin(), perm.begin() + total);
  // Kept lengths: ragged per head, m the longest.
  c.keep_lens.resize(static_cast<std::size_t>(sh.num_seqs * sh.Hkv));
  for (index_t s = 0; s < sh.num_seqs; ++s)
    for (index_t h = 0; h < sh.Hkv; ++h) {
      const index_t len = c.seq_lens[static_cast<std::size_t>(s)];
      const index_t k = shift > 0 ? std::max<index_t>(0, len - shift)
                                  : std::uniform_int_distribution<index_t>(0, len)(rng);
      c.keep_lens[static_cast<std::size_t>(s * sh.Hkv + h)] = static_cast<std::int32_t>(k);
      c.m = std::max(c.m, k);
    }
  c.m = std::max<index_t>(c.m, 1) + 1;  // a padded tail no row reads
  c.keep.assign(static_cast<std::size_t>(sh.num_seqs * sh.Hkv * c.m), 1 << 30);  // never read
  for (index_t s = 0; s < sh.num_seqs; ++s)
    for (index_t h = 0; h < sh.Hkv; ++h) {
      const index_t len = c.seq_lens[static_cast<std::size_t>(s)];
      const index_t k = c.keep_lens[static_cast<std::size_t>(s * sh.Hkv + h)];
      std::vector<std::int64_t> all(static_cast<std::size_t>(len));
      std::iota(all.begin(), all.end(), 0);
      if (shift > 0) {
        all.erase(all.begin(), all.begin() + (len - k));
      } else {
        std::shuffle(all.begin(), all.end(), rng);
        all.resize(static_cast<std::size_t>(k));
        std::sort(all.begin(), all.end());
      }
      std::copy(all.begin(), all.end(), c.keep.begin() + (s * sh.Hkv + h) * c.m);
    }
  std::normal_distribution<float> val(0.0f, 1.0f);
  c.pool.resize(static_cast<std::size_t>(c.N * sh.bs * sh.Hkv * sh.d));
  for (float& x : c.pool) x = val(rng);

  // Expected: each row gathered into a dense (1, 1, len, d) tensor, compacted by the
  // dense cake::compact, and written back to the row's first keep_lens slots.
  c.expected = c.pool;
  for (index_t s = 0; s < sh.num_seqs; ++s)
    for (index_t h = 0; h < sh.Hkv; ++h) {
      const index_t len = c.seq_lens[static_cast<std::size_t>(s)];
      const index_t k = c.keep_lens[static_cast<std::size_t>(s * sh.Hkv + h)];
      std::vector<float> dense(static_cast<std::size_t>(std::max<index_t>(len, 1) * sh.d));
      for (index_t t = 0; t < len; ++t)
        std::copy_n(c.pool.begin() + c.offset(s, h, t), sh.d, dense.begin() + t * sh.d);
      std::vector<float> out(static_cast<std::size_t>(std::max<index_t>(k, 1) * sh.d));
      cake::compact(
          cake::host,
          cake::make_view(static_cast<const float*>(dense.data()),
                          std::array<index_t, 4>{1, 1, len, sh.d}),
          cake::make_view(c.keep.data() + (s * sh.Hkv + h) * c.m, std::array<index_t, 3>{1, 1, k}),
          cake::make_view(out.data(), std::array<index_t, 4>{1, 1, k, sh.d}));
      for (index_t t = 0; t < k; ++t)
        std::copy_n(out.begin() + t * sh.d, sh.d, c.expected.begin() + c.offset(s, h, t));
    }
  // A head shorter than the sequence's longest kept head is padded with zero K/V up to
  // it, as the dense cache pads heads: paged attention reads new_lens(s) slots of every head.
  for (index_t s = 0; s < sh.num_seqs; ++s) {
    index_t longest = 0;
    for (index_t h = 0; h < sh.Hkv; ++h)
      longest = std::max<index_t>(longest, c.keep_lens[static_cast<std::size_t>(s * sh.Hkv + h)]);
    for (index_t h = 0; h < sh.Hkv; ++h)
      for (index_t t = c.keep_lens[static_cast<std::size_t>(s * sh.Hkv + h)]; t < longest; ++t)
        std::fill_n(c.expected.begin() + c.offset(s, h, t), sh.d, 0.0f);
  }
  return c;
}

// Shapes covering block sizes 1, 16 and odd ones, both layouts, head_dim 1 .. 128.
inline std::vector<Shape> shapes() {
  return {{1, 1, 1, 1, 9, false},    {3, 2, 1, 4, 20, true},     {4, 4, 16, 8, 70, false},
          {4, 4, 16, 8, 70, true},   {2, 3, 5, 3, 33, true},     {5, 2, 7, 64, 40, false},
          {3, 8, 16, 128, 50, true}, {2, 1, 32, 16, 100, false}, {6, 2, 2, 5, 15, true}};
}

}  // namespace paged_case
