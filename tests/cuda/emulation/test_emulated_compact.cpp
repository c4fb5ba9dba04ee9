// cake::compact on CUDA (dense in place and out of place, paged in place, and the
// index guard's check kernel) run on the CPU from the real kernel source under the
// emulator, with the launchers' parameters, against the host backend: the same bytes,
// and with a guard, bad indices reported with the host's message and nothing written.
#include <cake/cake.hpp>

#include "emulator.hpp"

#include <atomic>

// The guard's check kernel takes the first bad entry with a 64-bit atomicMin.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

#include <doctest/doctest.h>
#include <cake/backend/cuda/detail/compact_plan.cuh>

#include <array>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../../host/paged_case.hpp"

namespace {

using cake::index_t;
namespace cd = cake::cuda_detail;
namespace emu = cake_emulation;

constexpr unsigned threads = cd::tuning::compact_threads;

unsigned blocks_for(std::int64_t work) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

cd::IndexGuardRecord fresh_guard() {
  cd::IndexGuardRecord r{};
  r.first = cd::IndexGuardRecord::none;
  return r;
}

template <class TI>
void run_check(const cd::KeepRows<TI>& k, std::int64_t rows, cd::IndexGuardRecord* guard) {
  if (guard == nullptr || rows == 0) return;
  const unsigned grid = std::min<unsigned>(blocks_for(cd::check_work(rows, k.m)), 1024u);
  emu::launch({grid, 1, 1}, {threads, 1, 1}, 0,
              [&] { cd::compact_check_kernel<TI>(k, rows, guard); });
}

template <class TI>
void run_seal(const cd::KeepRows<TI>& k, cd::IndexGuardRecord* guard, int paged) {
  if (guard == nullptr) return;
  emu::launch({1, 1, 1}, {32, 1, 1}, 0, [&] { cd::compact_seal_kernel<TI>(k, guard, paged); });
}

// The dense launcher's sequence: check (when guarded), then the gather it picks.
template <class T, class TI>
void emulate_dense(cake::device_view<const T, 4> src, cake::device_view<const TI, 3> keep,
                   cake::device_view<T, 4> dst, cd::IndexGuardRecord* guard) {
  const index_t B = src.extent(0), Hkv = src.extent(1), d = src.extent(3), m = keep.extent(2);
  cd::CompactParams<TI> p = cd::compact_params(src, keep, dst, guard);
  if (B * Hkv == 0) return;
  run_check(p.keep, B * Hkv, guard);
  if (m * d == 0) return run_seal(p.keep, guard, 0);
  const auto gather = [&]<class V>() {
    p.vecs =
        static_cast<int>(d * static_cast<index_t>(sizeof(T)) / static_cast<index_t>(sizeof(V)));
    if (p.keep.ascending) {
      emu::launch({static_cast<unsigned>(B * Hkv), 1, 1}, {threads, 1, 1}, 0,
                  [&] { cd::compact_in_place_kernel<V, TI, 4>(p); });
    } else {
      const std::int64_t total = B * Hkv * m * p.vecs;
      emu::launch({blocks_for(total), 1, 1}, {threads, 1, 1}, 0,
                  [&] { cd::compact_kernel<V, TI>(p, total); });
    }
  };
  if (cd::compact_vec16<T>(p, d))
    gather.template operator()<uint4>();
  else
    gather.template operator()<T>();
}

// emulate_dense on the memory of host views (the emulated device is this process).
template <class T, class TI>
void emulate_dense_on(cake::host_view<const T, 4> src, cake::host_view<const TI, 3> keep,
                      cake::host_view<T, 4> dst, cd::IndexGuardRecord* guard) {
  emulate_dense(cake::device_view<const T, 4>(src.data_handle(), src.mapping()),
                cake::device_view<const TI, 3>(keep.data_handle(), keep.mapping()),
                cake::device_view<T, 4>(dst.data_handle(), dst.mapping()), guard);
}

// The host's message for a dense compaction ("no error" when it succeeds).
template <class T, class TI>
std::string host_error(cake::host_view<const T, 4> src, cake::host_view<const TI, 3> keep,
                       cake::host_view<T, 4> dst) {
  try {
    cake::compact(cake::host, src, keep, dst);
  } catch (const cake::invalid_argument& e) {
    return e.what();
  }
  return "no error";
}

template <class T, class TI>
void emulate_paged(cake::device_view<T, 4> pool, const cake::block_table<cake::device_space>& table,
                   cake::device_view<const TI, 3> keep,
                   cake::device_view<const std::int32_t, 2> lens, cd::IndexGuardRecord* guard,
                   bool expect_vec16) {
  const index_t rows = table.num_seqs() * pool.extent(1), d = pool.extent(3);
  cd::PagedCompactParams<TI> p = cd::paged_params(pool, table, keep, lens, guard);
  if (rows == 0) return;
  run_check(p.keep, rows, guard);
  if (keep.extent(2) * d == 0) return run_seal(p.keep, guard, 1);
  const bool vec16 = cd::paged_vec16<T>(p, d);
  REQUIRE(vec16 == expect_vec16);
  p.vecs = static_cast<int>(vec16 ? d * static_cast<index_t>(sizeof(T)) / 16 : d);
  if (vec16)
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {threads, 1, 1}, 0,
                [&] { cd::compact_paged_kernel<uint4, TI, 4>(p); });
  else
    emu::launch({static_cast<unsigned>(rows), 1, 1}, {threads, 1, 1}, 0,
                [&] { cd::compact_paged_kernel<T, TI, 4>(p); });
}

template <class Space>
cake::block_table<Space> table_of(const paged_case::Case& c) {
  return cake::make_block_table<Space>(c.indptr.data(), c.ids.data(), c.seq_lens.data(), c.num_seqs,
                                       static_cast<index_t>(c.ids.size()));
}

void paged_case_on_device(paged_case::Case& c, cd::IndexGuardRecord* guard) {
  const bool vec16 = c.d % 4 == 0;  // float rows of 16 bytes, and so every stride
  emulate_paged(
      c.pool_view<cake::device_space>(c.pool.data()), table_of<cake::device_space>(c),
      cake::make_view<cake::device_space>(static_cast<const std::int64_t*>(c.keep.data()),
                                          std::array<index_t, 3>{c.num_seqs, c.Hkv, c.m}),
      cake::make_view<cake::device_space>(static_cast<const std::int32_t*>(c.keep_lens.data()),
                                          std::array<index_t, 2>{c.num_seqs, c.Hkv}),
      guard, vec16);
}

// The host's message for the same bad input.
std::string host_error(paged_case::Case c) {
  try {
    cake::compact(cake::host, c.pool_view(c.pool.data()), c.table(), c.keep_view(), c.lens_view());
  } catch (const cake::invalid_argument& e) {
    return e.what();
  }
  return "no error";
}

// The guarded emulation of a paged call the host rejects with `host`: the pool
// untouched and the host's message reported.
void check_guard_rejects(paged_case::Case& c, const std::string& host) {
  const auto before = c.pool;
  cd::IndexGuardRecord g = fresh_guard();
  paged_case_on_device(c, &g);
  CHECK(c.pool == before);
  CHECK(cd::guard_status(g).message == host);
}

}  // namespace

TEST_CASE("paged compact on CUDA, emulated on the CPU, equals the dense compaction") {
  std::uint32_t seed = 200;
  for (const auto& sh : paged_case::shapes()) {
    CAPTURE(sh.bs);
    CAPTURE(sh.d);
    CAPTURE(sh.nhd);
    paged_case::Case c = paged_case::make(sh, ++seed);
    paged_case_on_device(c, nullptr);
    REQUIRE(c.pool == c.expected);
  }
  SUBCASE("rows shifted by one token (every read overlaps the next write), guarded") {
    for (const index_t shift : {1, 16, 17}) {
      paged_case::Case c = paged_case::make({3, 2, 16, 8, 70, true}, 9, shift);
      cd::IndexGuardRecord g = fresh_guard();
      paged_case_on_device(c, &g);
      CHECK(g.first == cd::IndexGuardRecord::none);
      REQUIRE(c.pool == c.expected);
    }
  }
  SUBCASE("a row longer than one sweep of the block (1025 uint4 per row, block size 1)") {
    paged_case::Case c = paged_case::make({2, 1, 1, 4100, 6, false}, 11, 1);
    paged_case_on_device(c, nullptr);
    REQUIRE(c.pool == c.expected);
  }
}

TEST_CASE("CUDA compact with a guard: bad indices reported as on the host, nothing written") {
  SUBCASE("dense, out of range (unguarded CUDA used to write the valid rows)") {
    const index_t B = 1, G = 2, S = 6, d = 4, m = 2;
    std::vector<float> src(static_cast<std::size_t>(B * G * S * d));
    std::iota(src.begin(), src.end(), 0.0f);
    const std::vector<std::int64_t> keep{0, 3, 5, 6};  // row (0, 1), position 1: 6 >= S
    std::vector<float> dst(static_cast<std::size_t>(B * G * m * d), -1.0f);
    const std::array<index_t, 4> se{B, G, S, d}, de{B, G, m, d};
    const std::array<index_t, 3> ke{B, G, m};
    const auto sv = cake::make_view(static_cast<const float*>(src.data()), se);
    const auto dv = cake::make_view(dst.data(), de);
    const std::string host = host_error(sv, cake::make_view(keep.data(), ke), dv);
    CHECK(host == "[cake.compact.keep] keep(0, 1, 1) must be in [0, 6), got 6");
    cd::IndexGuardRecord g = fresh_guard();
    emulate_dense_on(sv, cake::make_view(keep.data(), ke), dv, &g);
    CHECK(dst == std::vector<float>(dst.size(), -1.0f));
    const cake::status st = cd::guard_status(g);
    CHECK(st.message == host);
    SUBCASE("the guard is sticky: a later valid call writes nothing either") {
      const std::vector<std::int64_t> good{0, 1, 2, 3};
      emulate_dense_on(sv, cake::make_view(good.data(), ke), dv, &g);
      CHECK(dst == std::vector<float>(dst.size(), -1.0f));
      CHECK(cd::guard_status(g).message == host);
    }
    SUBCASE("unguarded, the bad index is skipped and the rest written") {
      emulate_dense_on(sv, cake::make_view(keep.data(), ke), dv, nullptr);
      CHECK(dst[0] == 0.0f);    // row (0, 0) token 0 <- 0
      CHECK(dst[12] == -1.0f);  // row (0, 1) token 1: skipped
    }
  }
  SUBCASE("dense in place, not ascending") {
    const index_t B = 2, G = 1, S = 8, d = 3, m = 3;
    std::vector<float> buf(static_cast<std::size_t>(B * G * S * d));
    std::iota(buf.begin(), buf.end(), 0.0f);
    const auto before = buf;
    const std::vector<std::int64_t> keep{1, 2, 3, 0, 4, 4};
    const std::array<index_t, 4> se{B, G, S, d}, de{B, G, m, d}, ds{G * S * d, S * d, d, 1};
    const std::array<index_t, 3> ke{B, G, m};
    const auto sv = cake::make_view(static_cast<const float*>(buf.data()), se);
    const auto kv = cake::make_view(keep.data(), ke);
    const auto dv = cake::make_view(buf.data(), de, ds);
    const std::string host = host_error(sv, kv, dv);
    CHECK(host.find("keep(1, 0, 2) = 4 follows 4") != std::string::npos);
    cd::IndexGuardRecord g = fresh_guard();
    emulate_dense_on(sv, kv, dv, &g);
    CHECK(buf == before);
    CHECK(cd::guard_status(g).message == host);
  }
  SUBCASE("paged: index past the sequence, not ascending, length too long") {
    for (int kind = 0; kind < 3; ++kind) {
      CAPTURE(kind);
      paged_case::Case c = paged_case::make({3, 2, 4, 4, 30, true}, 21);
      // The last row with tokens gets the bad entry; an earlier valid row must not move.
      index_t row = c.num_seqs * c.Hkv - 1;
      while (c.keep_lens[static_cast<std::size_t>(row)] < 2) --row;
      REQUIRE(row > 0);
      const auto at = static_cast<std::size_t>(row * c.m + 1);
      const index_t s = row / c.Hkv;
      if (kind == 0) c.keep[at] = c.seq_lens[static_cast<std::size_t>(s)];
      if (kind == 1) c.keep[at] = c.keep[at - 1];
      if (kind == 2)
        c.keep_lens[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(c.m + 1);
      const std::string host = host_error(c);
      REQUIRE(host != "no error");
      check_guard_rejects(c, host);
    }
  }
}

TEST_CASE("CUDA compact with a guard checks lengths and indices even when nothing moves") {
  SUBCASE("paged, m = 0 and keep_lens(0, 1) = 3: the host's error, not success") {
    paged_case::Case c;
    c.num_seqs = 1, c.Hkv = 2, c.bs = 2, c.d = 4, c.N = 2, c.m = 0, c.nhd = false;
    c.indptr = {0, 2};
    c.ids = {1, 0};
    c.seq_lens = {4};
    c.keep_lens = {0, 3};
    c.pool.resize(static_cast<std::size_t>(c.N * c.Hkv * c.bs * c.d));
    std::iota(c.pool.begin(), c.pool.end(), 0.0f);
    const std::string host = host_error(c);
    CHECK(host ==
          "[cake.compact.keep_lens] keep_lens(0, 1) must be in [0, min(m = 0, seq_lens(0) = 4)], "
          "got 3");
    check_guard_rejects(c, host);
  }
  SUBCASE("dense, head_dim = 0 and an index out of range") {
    const index_t B = 1, G = 1, S = 3, m = 2;
    std::vector<float> src(1), dst(1);
    const std::vector<std::int64_t> keep{0, 3};
    const std::array<index_t, 4> se{B, G, S, 0}, de{B, G, m, 0};
    const std::array<index_t, 3> ke{B, G, m};
    const auto sv = cake::make_view(static_cast<const float*>(src.data()), se);
    const auto kv = cake::make_view(keep.data(), ke);
    const auto dv = cake::make_view(dst.data(), de);
    const std::string host = host_error(sv, kv, dv);
    CHECK(host == "[cake.compact.keep] keep(0, 0, 1) must be in [0, 3), got 3");
    cd::IndexGuardRecord g = fresh_guard();
    emulate_dense_on(sv, kv, dv, &g);
    CHECK(cd::guard_status(g).message == host);
  }
}

TEST_CASE("CUDA guard: an error recorded by the check but never sealed is still an error") {
  // The check kernel ran and recorded keep(0, 1, 1) = 6 >= S, then the gather's launch
  // failed (not run here): the record is set but not sealed.
  const index_t B = 1, G = 2, S = 6, m = 2;
  const std::vector<std::int64_t> keep{0, 3, 5, 6};
  cd::CompactParams<std::int64_t> p{};
  p.keep.keep = keep.data();
  p.keep.k_b = G * m, p.keep.k_g = m, p.keep.k_t = 1;
  p.keep.heads = static_cast<int>(G), p.keep.S = static_cast<int>(S);
  p.keep.m = static_cast<int>(m);
  cd::IndexGuardRecord g = fresh_guard();
  run_check(p.keep, B * G, &g);
  REQUIRE(g.first != cd::IndexGuardRecord::none);
  REQUIRE(g.sealed == 0);
  const cake::status st = cd::guard_status(g);
  CHECK_FALSE(st.ok());
  CHECK(st.id == "cake.compact.keep");
  CHECK(st.message.find("did not run") != std::string::npos);
}
