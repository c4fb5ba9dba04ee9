// The CUDA KvCache store kernels that commit changes (truncate_rows_kernel: a
// prefill's truncations in one launch; evict_in_place_kernel: a decoding step's
// eviction in place) run on the CPU from their real source under the emulator,
// against plain loops over a copy of the same rows.
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

#include <limits>
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
    std::vector<cd::truncate_job<float>> jobs;
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
                [&] { cd::truncate_rows_kernel<float>(jobs.data(), d, w); });
    CHECK(dev.k == ref.k);
    CHECK(dev.v == ref.v);
    CHECK(dev.pos == ref.pos);
    CHECK(dev.ind == ref.ind);
  }
}

TEST_CASE("emulated evict_in_place_kernel: an ascending gather in place equals the gather") {
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
        cd::evict_in_place_kernel<float, 4>(
            dev.k.data(), dev.v.data(), dev.pos.data(), with_sums ? dev.ind.data() : nullptr,
            with_sums ? sums.data() : nullptr, held, cap, d, keep.data(), n);
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
      cd::window_slots_kernel<index_t>(sel.data(), rows, n, ragged ? keeps.data() : nullptr, 6, w,
                                       first);
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
