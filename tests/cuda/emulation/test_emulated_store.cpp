// The kernels of the CUDA backend's KvCache primitives (truncate_rows_kernel: a
// prefill's truncations in one launch; move_slots_kernel: a decoding step's commit,
// in place or from the workspace; the index lists, padding and the append) run on
// the CPU from their real source under the emulator, against plain loops over a copy
// of the same rows; on a paged layer's rows (an engine's pool and block table,
// block sizes 1, 3 and 16, HND and NHD) against the host backend's primitives.
#include <cake/cake.hpp>

#include "emulator.hpp"

#include <doctest/doctest.h>

// find_non_finite_kernel (same header) takes the minimum with this atomic.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

using std::isfinite;  // CUDA's, in the kernels
#include <cake/backend/cuda/detail/kernels/store.cuh>

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using cake::index_t;
namespace cd = cake::cuda_detail;
namespace emu = cake_emulation;

// rows of a layer: (rows, cap, d) keys and values, (rows, cap) positions and scores.
struct Rows {
  index_t rows, cap, d;
  std::vector<float> k, v, ind;
  std::vector<index_t> pos;
  Rows(index_t r, index_t c, index_t dd, std::uint32_t seed)
      : rows(r),
        cap(c),
        d(dd),
        k(static_cast<std::size_t>(r * c * dd)),
        v(k.size()),
        ind(static_cast<std::size_t>(r * c)),
        pos(ind.size()) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& x : ind) x = nd(rng);
    for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<index_t>(i) * 3 + 1;
  }
  bool operator==(const Rows&) const = default;
};

using Slots = cake::detail::slots<float>;
// r's rows as the kernels take them (ind: with the scores or without).
Slots slots_of(Rows& r, bool ind = true) {
  return Slots{r.k.data(), r.v.data(), r.pos.data(), ind ? r.ind.data() : nullptr,
               r.rows,     r.cap,      r.d};
}

}  // namespace

TEST_CASE("emulated truncate_rows_kernel: window moves and padding of many rows in one launch") {
  const index_t w = 5;
  for (index_t d : {index_t{8}, index_t{200}}) {
    CAPTURE(d);
    Rows dev(6, 40, d, 3), ref = dev;
    // (row, from, to, pad_end): overlapping and disjoint moves, padding or not.
    const std::vector<std::array<index_t, 4>> spec{
        {0, 30, 10, 15},  // disjoint, no padding (uniform)
        {1, 12, 10, 15},  // overlapping by 3
        {2, 20, 4, 25},   // ragged: the freed slots up to the old length become padding
        {4, 7, 7, 20},    // no move, padding only
        {5, 35, 0, 40}};
    std::vector<cake::detail::window_move<float>> jobs;
    for (const auto& [r, from, to, pad] : spec) {
      const index_t off = r * dev.cap;
      jobs.push_back({dev.k.data() + off * d, dev.v.data() + off * d, dev.pos.data() + off,
                      r == 4 ? nullptr : dev.ind.data() + off, from, to, pad});
      // The reference: move token by token in ascending order, then pad.
      for (index_t t = 0; t < w; ++t) {
        for (index_t x = 0; x < d; ++x) {
          ref.k[static_cast<std::size_t>((off + to + t) * d + x)] =
              ref.k[static_cast<std::size_t>((off + from + t) * d + x)];
          ref.v[static_cast<std::size_t>((off + to + t) * d + x)] =
              ref.v[static_cast<std::size_t>((off + from + t) * d + x)];
        }
        ref.pos[static_cast<std::size_t>(off + to + t)] =
            ref.pos[static_cast<std::size_t>(off + from + t)];
        if (r != 4)
          ref.ind[static_cast<std::size_t>(off + to + t)] =
              ref.ind[static_cast<std::size_t>(off + from + t)];
      }
      for (index_t t = to + w; t < pad; ++t) {
        for (index_t x = 0; x < d; ++x) {
          ref.k[static_cast<std::size_t>((off + t) * d + x)] = 0.0f;
          ref.v[static_cast<std::size_t>((off + t) * d + x)] = 0.0f;
        }
        ref.pos[static_cast<std::size_t>(off + t)] = -1;
        if (r != 4) ref.ind[static_cast<std::size_t>(off + t)] = 0.0f;
      }
    }
    emu::launch({static_cast<unsigned>(jobs.size()), 1, 1}, {128, 1, 1}, 0,
                [&] { cd::truncate_rows_kernel(jobs.data(), d, w); });
    CHECK(dev.k == ref.k);
    CHECK(dev.v == ref.v);
    CHECK(dev.pos == ref.pos);
    CHECK(dev.ind == ref.ind);
  }
}

TEST_CASE("emulated move_slots_kernel: an ascending gather in place equals the gather") {
  // d = 8: many slots per chunk, several chunks; d = 1500: one slot per chunk, in sweeps.
  for (index_t d : {index_t{8}, index_t{1500}}) {
    for (bool with_sums : {true, false}) {
      CAPTURE(d);
      CAPTURE(with_sums);
      const index_t rows = 3, held = d == 8 ? 300 : 12, cap = held + 4, w = 4;
      Rows dev(rows, cap, d, 7);
      const Rows before = dev;
      std::mt19937 rng(11);
      // keep: (rows, n) ascending, the last w always kept; rows drop different tokens.
      const index_t n = held - (d == 8 ? 37 : 3);
      std::vector<index_t> keep;
      for (index_t r = 0; r < rows; ++r) {
        std::vector<index_t> cand(static_cast<std::size_t>(held - w));
        for (index_t t = 0; t < held - w; ++t) cand[static_cast<std::size_t>(t)] = t;
        std::shuffle(cand.begin(), cand.end(), rng);
        cand.resize(static_cast<std::size_t>(n - w));
        std::sort(cand.begin(), cand.end());
        for (index_t t = 0; t < w; ++t) cand.push_back(held - w + t);
        keep.insert(keep.end(), cand.begin(), cand.end());
      }
      std::vector<float> sums(static_cast<std::size_t>(rows * held));
      for (std::size_t i = 0; i < sums.size(); ++i) sums[i] = 0.5f * static_cast<float>(i);

      emu::launch({static_cast<unsigned>(rows), 1, 1}, {256, 1, 1}, 0, [&] {
        cd::move_slots_kernel<Slots, 4>(slots_of(dev, with_sums), slots_of(dev),
                                        with_sums ? sums.data() : nullptr, held, keep.data(), n,
                                        nullptr, n);
      });
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < n; ++t) {
          const index_t j = keep[static_cast<std::size_t>(r * n + t)];
          INFO("row ", r, " slot ", t, " from ", j);
          bool same = true;
          for (index_t x = 0; x < d; ++x) {
            same &= dev.k[static_cast<std::size_t>((r * cap + t) * d + x)] ==
                    before.k[static_cast<std::size_t>((r * cap + j) * d + x)];
            same &= dev.v[static_cast<std::size_t>((r * cap + t) * d + x)] ==
                    before.v[static_cast<std::size_t>((r * cap + j) * d + x)];
          }
          CHECK(same);
          CHECK(dev.pos[static_cast<std::size_t>(r * cap + t)] ==
                before.pos[static_cast<std::size_t>(r * cap + j)]);
          CHECK(dev.ind[static_cast<std::size_t>(r * cap + t)] ==
                (with_sums ? sums[static_cast<std::size_t>(r * held + j)]
                           : before.ind[static_cast<std::size_t>(r * cap + t)]));
        }
    }
  }
}

TEST_CASE("emulated window_slots_kernel: the window after each row's selection, then padding") {
  const index_t rows = 3, n = 9, w = 3, first = 20;
  const std::vector<index_t> keeps{6, 2, 4};
  for (bool ragged : {true, false}) {
    CAPTURE(ragged);
    std::vector<index_t> sel(static_cast<std::size_t>(rows * n), -7);  // -7: selected, untouched
    emu::launch({1, 1, 1}, {32, 1, 1}, 0, [&] {
      cd::window_slots_kernel<index_t>(sel.data(), rows, n, ragged ? keeps.data() : nullptr,
                                       ragged ? 0 : 6, w, nullptr, first);
    });
    for (index_t r = 0; r < rows; ++r) {
      const index_t kr = ragged ? keeps[static_cast<std::size_t>(r)] : 6;
      for (index_t t = 0; t < n; ++t) {
        const index_t want = t < kr ? -7 : first + std::min(t - kr, w - 1);
        CHECK(sel[static_cast<std::size_t>(r * n + t)] == want);
      }
    }
  }
}

TEST_CASE("emulated find_non_finite_kernel: first element past the bound, NaN and Inf included") {
  // (2, 3, 5, 4) strided with a padded token stride (6): the padding is never read.
  const long long e[4] = {2, 3, 5, 4}, s[4] = {90, 30, 6, 1};
  std::vector<float> t(180, 1.0f);
  for (std::size_t i = 0; i < t.size(); ++i)
    if (i % 6 >= 4) t[i] = std::numeric_limits<float>::quiet_NaN();  // padding
  const auto at = [&](long long a, long long b, long long c, long long x) -> float& {
    return t[static_cast<std::size_t>(a * s[0] + b * s[1] + c * s[2] + x * s[3])];
  };
  const auto first = [&](float bound) {
    unsigned long long f = ~0ull;
    emu::launch({2, 1, 1}, {64, 1, 1}, 0, [&] {
      cd::find_non_finite_kernel<float>(t.data(), e[0], e[1], e[2], e[3], s[0], s[1], s[2], s[3],
                                        bound, &f);
    });
    return f;
  };
  CHECK(first(2.0f) == ~0ull);
  at(1, 2, 3, 1) = -3.0f;  // flat (((1 * 3 + 2) * 5 + 3) * 4 + 1) = 113
  CHECK(first(2.0f) == 113);
  CHECK(first(3.0f) == ~0ull);                              // at the bound passes
  at(0, 1, 0, 2) = std::numeric_limits<float>::infinity();  // flat 22
  CHECK(first(3.0f) == 22);
  CHECK(first(std::numeric_limits<float>::max()) == 22);
  at(0, 0, 4, 3) = std::numeric_limits<float>::quiet_NaN();  // flat 19
  CHECK(first(std::numeric_limits<float>::max()) == 19);
}

TEST_CASE("emulated move_slots_kernel: ragged rows in place, and a copy back with padding") {
  // Rows of lengths 7, 4 and 6 (n = 7 slots): an ascending gather in place keeps each
  // row's len_r tokens and pads the rest; then the same rows copied as they are into
  // rows with a different capacity (sel null), the scores from a separate array.
  for (index_t d : {index_t{3}, index_t{700}}) {
    CAPTURE(d);
    const index_t rows = 3, cap = 10, n = 7;
    Rows dev(rows, cap, d, 5);
    const Rows before = dev;
    const std::vector<index_t> lens{7, 4, 6};
    // (rows, n): row r keeps slots sel[r, t] for t < len_r; later entries repeat.
    const std::vector<index_t> sel{0, 1, 2, 4, 5, 6, 7, 1, 3, 8, 9, 9, 9, 9, 0, 2, 3, 5, 6, 8, 8};
    emu::launch({3, 1, 1}, {64, 1, 1}, 0, [&] {
      cd::move_slots_kernel<Slots, 4>(slots_of(dev), slots_of(dev), nullptr, 0, sel.data(), n,
                                      lens.data(), 0);
    });
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < n; ++t) {
        const bool live = t < lens[static_cast<std::size_t>(r)];
        const index_t j = sel[static_cast<std::size_t>(r * n + t)];
        INFO("row ", r, " slot ", t);
        bool same = true;
        for (index_t x = 0; x < d; ++x) {
          const auto at = static_cast<std::size_t>((r * cap + t) * d + x);
          const auto from = static_cast<std::size_t>((r * cap + j) * d + x);
          same &= dev.k[at] == (live ? before.k[from] : 0.0f);
          same &= dev.v[at] == (live ? before.v[from] : 0.0f);
        }
        CHECK(same);
        CHECK(dev.pos[static_cast<std::size_t>(r * cap + t)] ==
              (live ? before.pos[static_cast<std::size_t>(r * cap + j)] : -1));
        // Without source scores a live slot keeps its score; padding reads 0.
        CHECK(dev.ind[static_cast<std::size_t>(r * cap + t)] ==
              (live ? before.ind[static_cast<std::size_t>(r * cap + t)] : 0.0f));
      }
    // Copy back: dst (cap 8) slot t = src slot t for t < len_r (scores from sums), padding after.
    Rows dst(rows, 8, d, 9);
    std::vector<float> sums(static_cast<std::size_t>(rows * n));
    for (std::size_t i = 0; i < sums.size(); ++i) sums[i] = 1.5f * static_cast<float>(i);
    emu::launch({3, 1, 1}, {32, 1, 1}, 0, [&] {
      cd::move_slots_kernel<Slots, 4>(slots_of(dst), slots_of(dev), sums.data(), n, nullptr, n,
                                      lens.data(), 0);
    });
    for (index_t r = 0; r < rows; ++r)
      for (index_t t = 0; t < n; ++t) {
        const bool live = t < lens[static_cast<std::size_t>(r)];
        bool same = true;
        for (index_t x = 0; x < d; ++x)
          same &= dst.k[static_cast<std::size_t>((r * 8 + t) * d + x)] ==
                  (live ? dev.k[static_cast<std::size_t>((r * cap + t) * d + x)] : 0.0f);
        CHECK(same);
        CHECK(dst.pos[static_cast<std::size_t>(r * 8 + t)] ==
              (live ? dev.pos[static_cast<std::size_t>(r * cap + t)] : -1));
        CHECK(dst.ind[static_cast<std::size_t>(r * 8 + t)] ==
              (live ? sums[static_cast<std::size_t>(r * n + t)] : 0.0f));
      }
  }
}

TEST_CASE("emulated window_slots_kernel: per-row window starts") {
  const index_t rows = 2, n = 6, w = 2;
  const std::vector<index_t> keeps{3, 1}, firsts{10, 20};
  std::vector<index_t> sel(static_cast<std::size_t>(rows * n), -7);
  emu::launch({1, 1, 1}, {32, 1, 1}, 0, [&] {
    cd::window_slots_kernel<index_t>(sel.data(), rows, n, keeps.data(), 0, w, firsts.data(), 1);
  });
  CHECK(sel == std::vector<index_t>{-7, -7, -7, 11, 12, 12, -7, 21, 22, 22, 22, 22});
}

TEST_CASE("emulated sort_prefix_kernel: each row's prefix sorted by key, the rest copied") {
  // Rows of 300 entries (more than the block's threads): a shuffled prefix of each
  // row's length, sorted by the entry or by a key (positions in descending order).
  // Lengths of every kind for the bitonic sort: powers of two and not, 0 and 1.
  const index_t rows = 9, n = 300;
  const std::vector<index_t> lens{300, 0, 171, 1, 2, 3, 64, 257, 128};
  std::mt19937 rng(4);
  std::vector<index_t> in(static_cast<std::size_t>(rows * n)), key(in.size());
  for (index_t r = 0; r < rows; ++r) {
    auto* row = in.data() + r * n;
    std::iota(row, row + n, index_t{0});
    std::shuffle(row, row + n, rng);
    for (index_t t = 0; t < n; ++t) key[static_cast<std::size_t>(r * n + t)] = 1000 - 3 * t;
  }
  for (bool by_key : {false, true}) {
    CAPTURE(by_key);
    std::vector<index_t> out(in.size(), -1), want = in;
    for (index_t r = 0; r < rows; ++r) {
      auto* w = want.data() + r * n;
      const auto* kr = key.data() + r * n;
      if (by_key)
        std::sort(w, w + lens[static_cast<std::size_t>(r)],
                  [kr](index_t a, index_t b) { return kr[a] < kr[b]; });
      else
        std::sort(w, w + lens[static_cast<std::size_t>(r)]);
    }
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {128, 1, 1}, 0, [&] {
      cd::sort_prefix_kernel<index_t>(in.data(), out.data(), n, lens.data(),
                                      by_key ? key.data() : nullptr, n);
    });
    CHECK(out == want);
  }
}

TEST_CASE("emulated pad_rows_kernel and append_token_kernel: per-row slots") {
  const index_t rows = 3, cap = 9, d = 5, Hkv = 3;
  Rows dev(rows, cap, d, 8);
  Rows ref = dev;
  const std::vector<index_t> from{2, 8, 5};
  emu::launch({3, 1, 1}, {32, 1, 1}, 0,
              [&] { cd::pad_rows_kernel(slots_of(dev), from.data(), 1, cap); });
  for (index_t r = 0; r < rows; ++r)
    for (index_t t = from[static_cast<std::size_t>(r)] + 1; t < cap; ++t) {
      for (index_t x = 0; x < d; ++x) {
        ref.k[static_cast<std::size_t>((r * cap + t) * d + x)] = 0.0f;
        ref.v[static_cast<std::size_t>((r * cap + t) * d + x)] = 0.0f;
      }
      ref.pos[static_cast<std::size_t>(r * cap + t)] = -1;
      ref.ind[static_cast<std::size_t>(r * cap + t)] = 0.0f;
    }
  CHECK(dev == ref);
  // The new token (1, Hkv, d) with a padded head stride (8) into slot lens[r] of row r.
  std::vector<float> k(static_cast<std::size_t>(Hkv * 8)), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i) + 0.25f;
    v[i] = -static_cast<float>(i);
  }
  const std::vector<index_t> lens{3, 0, 8};
  emu::launch({3, 1, 1}, {32, 1, 1}, 0, [&] {
    cd::append_token_kernel(slots_of(dev), Hkv, lens.data(), 99, k.data(), Hkv * 8, 8, v.data(),
                            Hkv * 8, 8, 42);
  });
  for (index_t r = 0; r < rows; ++r) {
    const index_t t = lens[static_cast<std::size_t>(r)];
    for (index_t x = 0; x < d; ++x) {
      ref.k[static_cast<std::size_t>((r * cap + t) * d + x)] =
          k[static_cast<std::size_t>(r * 8 + x)];
      ref.v[static_cast<std::size_t>((r * cap + t) * d + x)] =
          v[static_cast<std::size_t>(r * 8 + x)];
    }
    ref.pos[static_cast<std::size_t>(r * cap + t)] = 42;
  }
  CHECK(dev == ref);
}

// ---- paged rows: the kernels against the host backend's primitives --------------

namespace {

using Host = cake::detail::layer_store<float, cake::host_policy>;

// A paged layer's rows: B sequences of Hkv heads in pools of N blocks of bs slots
// (HND or NHD), sequence s in blocks[s] scattered blocks (a table naming each once);
// positions and scores (rows, cap) in the cache's memory. Every pool element is
// finite and distinct, so a slot moved from the wrong place shows.
struct Paged {
  index_t B, Hkv, bs, d, N, cap;
  bool nhd;
  std::vector<float> k, v, ind;  // pools: N * Hkv * bs * d; scores (rows, cap)
  std::vector<index_t> pos;      // (rows, cap)
  std::vector<std::int32_t> indptr, ids;
  Paged(index_t b, index_t hkv, index_t block, index_t dd, bool n_hd,
        const std::vector<index_t>& blocks, index_t c, std::uint32_t seed)
      : B(b), Hkv(hkv), bs(block), d(dd), N(0), cap(c), nhd(n_hd) {
    for (index_t x : blocks) N += x;
    N += 3;  // blocks no sequence holds
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    k.resize(static_cast<std::size_t>(N * Hkv * bs * d));
    v.resize(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<float>(i) + 0.5f * nd(rng);
      v[i] = -static_cast<float>(i) + 0.5f * nd(rng);
    }
    ind.resize(static_cast<std::size_t>(B * Hkv * cap));
    pos.resize(ind.size());
    for (std::size_t i = 0; i < ind.size(); ++i) {
      ind[i] = nd(rng);
      pos[i] = static_cast<index_t>(i) * 7 + 2;
    }
    std::vector<std::int32_t> all(static_cast<std::size_t>(N));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    indptr.push_back(0);
    for (index_t x : blocks) {
      ids.insert(ids.end(), all.begin() + indptr.back(), all.begin() + indptr.back() + x);
      indptr.push_back(indptr.back() + static_cast<std::int32_t>(x));
    }
  }
  index_t rows() const { return B * Hkv; }
  cake::detail::paged_rows<float> pool() {
    cake::detail::paged_rows<float> p;
    p.k = k.data();
    p.v = v.data();
    p.k_block = p.v_block = Hkv * bs * d;
    p.k_head = p.v_head = nhd ? d : bs * d;
    p.k_slot = p.v_slot = nhd ? Hkv * d : d;
    p.indptr = indptr.data();
    p.ids = ids.data();
    p.set_block_size(bs);
    p.kv_heads = Hkv;
    p.num_blocks = N;
    return p;
  }
  // The rows: K/V through the table, and the metadata unless kv_only.
  Slots at(bool kv_only = false) {
    Slots s{
        nullptr, nullptr, kv_only ? nullptr : pos.data(), kv_only ? nullptr : ind.data(), rows(),
        cap,     d};
    s.paged = pool();
    return s;
  }
  bool operator==(const Paged& o) const {
    return k == o.k && v == o.v && ind == o.ind && pos == o.pos;
  }
};

// (rows, n): row r's first lens[r] entries an ascending subset of [0, n) (in place:
// entry t >= t), the rest repeating its last; permute: a shuffled subset instead.
std::vector<index_t> selection(index_t rows, index_t n, const std::vector<index_t>& lens,
                               bool permute, std::mt19937& rng) {
  std::vector<index_t> sel;
  for (index_t r = 0; r < rows; ++r) {
    std::vector<index_t> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), index_t{0});
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<std::size_t>(lens[static_cast<std::size_t>(r)]));
    if (!permute) std::sort(all.begin(), all.end());
    while (static_cast<index_t>(all.size()) < n) all.push_back(all.empty() ? 0 : all.back());
    sel.insert(sel.end(), all.begin(), all.end());
  }
  return sel;
}

template <class F>
void every_pool(F&& f) {
  for (index_t bs : {index_t{1}, index_t{3}, index_t{16}})
    for (bool nhd : {false, true})
      for (index_t d : {index_t{8}, index_t{1100}}) {  // 1100: one slot per chunk, in sweeps
        if (d > 8 && bs != 3) continue;  // the sweeps once per layout (the emulation is slow)
        CAPTURE(bs);
        CAPTURE(nhd);
        CAPTURE(d);
        f(bs, nhd, d);
      }
}

void run_move(Slots dst, Slots src, const float* sind, index_t sind_ld, const index_t* sel,
              index_t n, const index_t* lens, index_t base) {
  emu::launch({static_cast<unsigned>(dst.rows), 1, 1}, {256, 1, 1}, 0, [&] {
    cd::move_slots_kernel<Slots, 4>(dst, src, sind, sind_ld, sel, n, lens, base);
  });
}

}  // namespace

TEST_CASE("emulated move_slots_kernel on paged rows equals the host's move_slots") {
  every_pool([](index_t bs, bool nhd, index_t d) {
    const index_t B = 2, Hkv = 2, rows = B * Hkv, n = 20;
    // Sequence 1 has a spare block: rows of a sequence may address all its blocks.
    const std::vector<index_t> blocks{(n + bs - 1) / bs, (n + bs - 1) / bs + 1};
    std::mt19937 rng(static_cast<std::uint32_t>(bs * 31 + d));
    const Paged start(B, Hkv, bs, d, nhd, blocks, n + 2, 5);
    const std::vector<index_t> lens{20, 13, 17, 0};  // ragged, one empty row
    std::vector<float> sums(static_cast<std::size_t>(rows * n));
    for (std::size_t i = 0; i < sums.size(); ++i) sums[i] = 0.25f * static_cast<float>(i);
    {
      INFO("in place, ascending, ragged rows padded, scores from sums");
      const auto sel = selection(rows, n, lens, false, rng);
      Paged host = start, dev = start;
      Host::move_slots(cake::host, host.at(), host.at(), sums.data(), n, sel.data(), n, lens.data(),
                       0);
      run_move(dev.at(), dev.at(), sums.data(), n, sel.data(), n, lens.data(), 0);
      CHECK(dev == host);
      CHECK(!(dev == start));
    }
    {
      INFO("keys gathered into dense rows (a paged layer's scoring)");
      Paged dev = start;
      Rows want(rows, n, d, 1), got = want;
      Slots hd{want.k.data(), nullptr, nullptr, nullptr, rows, n, d};
      Slots dd{got.k.data(), nullptr, nullptr, nullptr, rows, n, d};
      Paged host = start;
      Host::move_slots(cake::host, hd, host.at(true), nullptr, 0, nullptr, n, nullptr, n);
      run_move(dd, dev.at(true), nullptr, 0, nullptr, n, nullptr, n);
      CHECK(got == want);
      CHECK(dev == start);
    }
    {
      INFO("a permuting selection through a dense scratch and back (reference order)");
      const auto sel = selection(rows, n, lens, true, rng);
      Paged host = start, dev = start;
      Rows th(rows, n, d, 2), td = th;
      Host::move_slots(cake::host, slots_of(th).kv_only(), host.at(true), nullptr, 0, sel.data(), n,
                       lens.data(), 0);
      Host::move_slots(cake::host, host.at(true), slots_of(th).kv_only(), nullptr, 0, nullptr, n,
                       lens.data(), 0);
      run_move(slots_of(td).kv_only(), dev.at(true), nullptr, 0, sel.data(), n, lens.data(), 0);
      run_move(dev.at(true), slots_of(td).kv_only(), nullptr, 0, nullptr, n, lens.data(), 0);
      CHECK(td == th);
      CHECK(dev == host);
    }
    {
      INFO("dense rows with their metadata into paged rows (a decoding step's commit)");
      Paged host = start, dev = start;
      const Rows src(rows, n + 1, d, 3);
      Rows s1 = src;
      Host::move_slots(cake::host, host.at(), slots_of(s1), s1.ind.data(), s1.cap, nullptr, n,
                       lens.data(), 0);
      run_move(dev.at(), slots_of(s1), s1.ind.data(), s1.cap, nullptr, n, lens.data(), 0);
      CHECK(dev == host);
    }
  });
}

TEST_CASE("emulated truncate_rows_kernel on paged rows equals the host's move_windows") {
  every_pool([](index_t bs, bool nhd, index_t d) {
    const index_t B = 2, Hkv = 2, w = 4, n = 20;
    const std::vector<index_t> blocks{(n + bs - 1) / bs, (n + bs - 1) / bs + 1};
    const Paged start(B, Hkv, bs, d, nhd, blocks, n + 3, 9);
    Paged host = start, dev = start;
    // (row, from, to, pad_end): disjoint, overlapping, padding only, and padding past
    // the row's blocks (not stored: n + 3 slots, fewer in the blocks when bs = 1).
    const std::vector<std::array<index_t, 4>> spec{
        {0, 16, 5, 9}, {1, 10, 8, 20}, {2, 6, 6, 15}, {3, 14, 2, n + 3}};
    const auto jobs = [&](Paged& p) {
      std::vector<cake::detail::window_move<float>> out;
      for (const auto& [r, from, to, pad] : spec)
        out.push_back({nullptr, nullptr, p.pos.data() + r * p.cap,
                       r == 2 ? nullptr : p.ind.data() + r * p.cap, from, to, pad, p.pool(), r});
      return out;
    };
    auto hj = jobs(host), dj = jobs(dev);
    Host::move_windows(cake::host, hj, d, w);
    emu::launch({static_cast<unsigned>(dj.size()), 1, 1}, {128, 1, 1}, 0,
                [&] { cd::truncate_rows_kernel(dj.data(), d, w); });
    CHECK(dev == host);
    CHECK(!(dev == start));
  });
}

TEST_CASE("emulated pad_rows_kernel and append_token_kernel on paged rows equal the host's") {
  every_pool([](index_t bs, bool nhd, index_t d) {
    const index_t B = 2, Hkv = 2, rows = B * Hkv, n = 20;
    const std::vector<index_t> blocks{(n + bs - 1) / bs, (n + bs - 1) / bs + 1};
    const Paged start(B, Hkv, bs, d, nhd, blocks, n + 2, 13);
    Paged host = start, dev = start;
    const std::vector<index_t> from{3, 19, 0, 11};
    Host::pad(cake::host, host.at(), from.data(), 1, n + 2);  // past the blocks: not stored
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {128, 1, 1}, 0,
                [&] { cd::pad_rows_kernel(dev.at(), from.data(), 1, n + 2); });
    CHECK(dev == host);
    CHECK(!(dev == start));
    // The new token (B, Hkv, d) into slot lens[r] of each row.
    std::vector<float> kn(static_cast<std::size_t>(rows * d)), vn(kn.size());
    for (std::size_t i = 0; i < kn.size(); ++i) {
      kn[i] = 1000.0f + static_cast<float>(i);
      vn[i] = -1000.0f - static_cast<float>(i);
    }
    const std::vector<index_t> lens{0, 7, 19, 12};
    const std::array<index_t, 3> ext{B, Hkv, d};
    Host::append(cake::host, host.at(), cake::make_view(kn.data(), ext),
                 cake::make_view(vn.data(), ext), 42, lens.data(), 0, Hkv);
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {128, 1, 1}, 0, [&] {
      cd::append_token_kernel(dev.at(), Hkv, lens.data(), 0, kn.data(), Hkv * d, d, vn.data(),
                              Hkv * d, d, 42);
    });
    CHECK(dev == host);
  });
}

TEST_CASE("emulated select_ragged_kernel: each ragged row's selection, as select_k alone") {
  // Rows keeping 0, 1, 2, 5, 40, 300, 17 and 520 of one more candidate; scores with
  // many ties (multiples of 0.5 in a small range) and -inf, so the tie rule decides;
  // the last row all equal (a thread sees three candidates: its own ties, too).
  const std::vector<index_t> keeps{0, 1, 2, 5, 40, 300, 17, 520};
  const index_t rows = static_cast<index_t>(keeps.size()), ld = 530, n = 525;
  std::mt19937 rng(21);
  std::uniform_int_distribution<int> level(-4, 4);
  std::vector<float> scores(static_cast<std::size_t>(rows * ld), 1.0f);
  for (std::size_t i = 0; i < static_cast<std::size_t>((rows - 1) * ld); ++i)
    scores[i] = level(rng) == -4 ? -std::numeric_limits<float>::infinity() : 0.5f * level(rng);
  for (auto order : {cake::select_order::position, cake::select_order::descending}) {
    CAPTURE(static_cast<int>(order));
    std::vector<index_t> sel(static_cast<std::size_t>(rows * n), -7), want = sel;
    for (index_t r = 0; r < rows; ++r) {
      const index_t k = keeps[static_cast<std::size_t>(r)];
      if (k == 0) continue;
      cake::select_k(cake::host,
                     cake::make_view(static_cast<const float*>(scores.data() + r * ld),
                                     std::array<index_t, 2>{1, k + 1}),
                     cake::make_view(want.data() + r * n, std::array<index_t, 2>{1, k}), order);
    }
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {cd::select_ragged_threads, 1, 1}, 0, [&] {
      cd::select_ragged_kernel<index_t>(scores.data(), ld, sel.data(), n, keeps.data(),
                                        order == cake::select_order::descending);
    });
    CHECK(sel == want);
  }
}
