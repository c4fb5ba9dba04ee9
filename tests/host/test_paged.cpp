// Paged compaction: an engine's block pool compacted in place equals the dense
// compaction of each row; block accounting; bad tables and indices rejected with
// nothing changed.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <set>
#include <string>
#include <vector>

#include "host/paged_case.hpp"

using cake::index_t;
using paged_case::Case;

namespace {

void compact_case(Case& c, const cake::host_policy& exec = cake::host) {
  cake::compact(exec, c.pool_view(c.pool.data()), c.table(), c.keep_view(), c.lens_view());
}

// Runs the compaction expecting cake::invalid_argument with `id` and `snippet`, and
// checks the pool did not change.
void expect_rejected(Case& c, const std::string& id, const std::string& snippet) {
  const std::vector<float> before = c.pool;
  try {
    compact_case(c);
    FAIL("expected a throw");
  } catch (const cake::invalid_argument& e) {
    CHECK(e.id() == id);
    const std::string msg = e.what();
    CHECK_MESSAGE(msg.find(snippet) != std::string::npos, msg);
  }
  CHECK(c.pool == before);
}

}  // namespace

TEST_CASE("paged compact equals dense compact (both layouts, block sizes 1 .. 32, ragged heads)") {
  std::uint32_t seed = 0;
  for (const auto& sh : paged_case::shapes())
    for (int rep = 0; rep < 4; ++rep) {
      CAPTURE(sh.num_seqs);
      CAPTURE(sh.Hkv);
      CAPTURE(sh.bs);
      CAPTURE(sh.d);
      CAPTURE(sh.nhd);
      CAPTURE(seed);
      Case c = paged_case::make(sh, ++seed);
      compact_case(c);
      REQUIRE(c.pool == c.expected);
    }
}

TEST_CASE("paged compact: overlapping moves (every row shifted by 1 .. 40 tokens)") {
  for (index_t shift : {1, 2, 15, 16, 17, 40})
    for (const auto& sh : paged_case::shapes()) {
      CAPTURE(shift);
      CAPTURE(sh.bs);
      Case c = paged_case::make(sh, static_cast<std::uint32_t>(100 + shift), shift);
      compact_case(c);
      REQUIRE(c.pool == c.expected);
    }
}

TEST_CASE("paged compact: identity keep moves nothing; threads(1) and threads(2) agree") {
  Case c = paged_case::make({4, 3, 16, 8, 60, true}, 7);
  SUBCASE("identity") {
    for (index_t s = 0; s < c.num_seqs; ++s)
      for (index_t h = 0; h < c.Hkv; ++h) {
        const auto len = c.seq_lens[static_cast<std::size_t>(s)];
        c.keep_lens[static_cast<std::size_t>(s * c.Hkv + h)] =
            std::min<std::int32_t>(len, static_cast<std::int32_t>(c.m));
        for (index_t t = 0; t < c.m; ++t)
          c.keep[static_cast<std::size_t>((s * c.Hkv + h) * c.m + t)] = t;
      }
    const auto before = c.pool;
    compact_case(c);
    CHECK(c.pool == before);
  }
  SUBCASE("thread counts") {
    Case c1 = c, c2 = c;
    compact_case(c1, cake::host.threads(1));
    compact_case(c2, cake::host.threads(2).parallel_from(0));
    CHECK(c1.pool == c.expected);
    CHECK(c2.pool == c.expected);
  }
}

TEST_CASE("paged_plan: new lengths, freed blocks, nothing leaked or both freed and held") {
  std::uint32_t seed = 50;
  for (const auto& sh : paged_case::shapes()) {
    const Case c = paged_case::make(sh, ++seed);
    std::vector<std::int32_t> new_lens(static_cast<std::size_t>(c.num_seqs)),
        freed(new_lens.size());
    cake::paged_plan(c.table(), c.lens_view(), c.bs,
                     cake::make_view(new_lens.data(), std::array<index_t, 1>{c.num_seqs}),
                     cake::make_view(freed.data(), std::array<index_t, 1>{c.num_seqs}));
    std::multiset<std::int32_t> held, released;
    for (index_t s = 0; s < c.num_seqs; ++s) {
      const auto i = static_cast<std::size_t>(s);
      std::int32_t longest = 0;
      for (index_t h = 0; h < c.Hkv; ++h)
        longest = std::max(longest, c.keep_lens[static_cast<std::size_t>(s * c.Hkv + h)]);
      CHECK(new_lens[i] == longest);  // set by the longest head
      const std::int32_t have = c.indptr[i + 1] - c.indptr[i];
      const std::int32_t kept = have - freed[i];
      // Exactly the blocks the longest head needs, no fewer, no more.
      CHECK(static_cast<index_t>(kept) * c.bs >= new_lens[i]);
      CHECK((kept == 0 || static_cast<index_t>(kept - 1) * c.bs < new_lens[i]));
      CHECK(freed[i] >= 0);
      for (std::int32_t e = c.indptr[i]; e < c.indptr[i] + kept; ++e)
        held.insert(c.ids[static_cast<std::size_t>(e)]);
      for (std::int32_t e = c.indptr[i] + kept; e < c.indptr[i + 1]; ++e)
        released.insert(c.ids[static_cast<std::size_t>(e)]);
    }
    // No block both held and freed, none counted twice, none lost.
    for (std::int32_t b : released) CHECK(held.count(b) == 0);
    std::set<std::int32_t> all(held.begin(), held.end());
    all.insert(released.begin(), released.end());
    CHECK(all.size() == held.size() + released.size());
    CHECK(static_cast<std::int32_t>(held.size() + released.size()) == c.indptr.back());
    // Every held slot the compaction wrote lies in a held block.
  }
  SUBCASE("a head with zero tokens and a sequence emptied entirely") {
    // Two sequences of 5 and 3 tokens in blocks of 2; sequence 1 keeps nothing.
    const std::vector<std::int32_t> indptr{0, 3, 5}, ids{4, 0, 2, 1, 3}, lens{5, 3};
    const std::vector<std::int32_t> keep_lens{3, 0, 0, 0};  // (2 seqs, 2 heads)
    std::vector<std::int32_t> new_lens(2), freed(2);
    cake::paged_plan(cake::make_block_table(indptr.data(), ids.data(), lens.data(), 2),
                     cake::make_view(keep_lens.data(), std::array<index_t, 2>{2, 2}), 2,
                     cake::make_view(new_lens.data(), std::array<index_t, 1>{2}),
                     cake::make_view(freed.data(), std::array<index_t, 1>{2}));
    CHECK(new_lens == std::vector<std::int32_t>{3, 0});
    CHECK(freed == std::vector<std::int32_t>{1, 2});
  }
  SUBCASE("kept lengths above the sequence length are rejected") {
    const std::vector<std::int32_t> indptr{0, 1}, ids{0}, lens{2}, keep_lens{3};
    std::vector<std::int32_t> new_lens(1, -5), freed(1, -5);
    CHECK_THROWS_WITH_AS(
        cake::paged_plan(cake::make_block_table(indptr.data(), ids.data(), lens.data(), 1),
                         cake::make_view(keep_lens.data(), std::array<index_t, 2>{1, 1}), 2,
                         cake::make_view(new_lens.data(), std::array<index_t, 1>{1}),
                         cake::make_view(freed.data(), std::array<index_t, 1>{1})),
        doctest::Contains("keep_lens(0, 0) must be in [0, seq_lens(0) = 2], got 3"),
        cake::invalid_argument);
    CHECK(new_lens[0] == -5);
  }
  SUBCASE("a decreasing indptr is rejected (it gave negative freed counts)") {
    // Sequence 1 would own indptr(2) - indptr(1) = -1 blocks.
    const std::vector<std::int32_t> indptr{0, 3, 2}, ids{0, 1, 2}, lens{0, 0}, keep_lens{0, 0};
    std::vector<std::int32_t> new_lens(2, -5), freed(2, -5);
    CHECK_THROWS_WITH_AS(
        cake::paged_plan(cake::make_block_table(indptr.data(), ids.data(), lens.data(), 2, 3),
                         cake::make_view(keep_lens.data(), std::array<index_t, 2>{2, 1}), 2,
                         cake::make_view(new_lens.data(), std::array<index_t, 1>{2}),
                         cake::make_view(freed.data(), std::array<index_t, 1>{2})),
        doctest::Contains("[cake.compact.indptr] indptr must not decrease: indptr(2) = 2 follows "
                          "indptr(1) = 3"),
        cake::invalid_argument);
    CHECK(freed == std::vector<std::int32_t>{-5, -5});
  }
}

TEST_CASE("paged compact rejects bad block tables and indices, changing nothing") {
  // Sequence 0: 5 tokens in blocks (3, 1, 4) of 2; sequence 1: 3 tokens in (0, 5).
  // Pool of 7 blocks; block 6 unused.
  const auto base = [] {
    Case c;
    c.num_seqs = 2, c.Hkv = 2, c.bs = 2, c.d = 3, c.N = 7, c.m = 3, c.nhd = true;
    c.indptr = {0, 3, 5};
    c.ids = {3, 1, 4, 0, 5};
    c.seq_lens = {5, 3};
    c.keep_lens = {3, 2, 1, 3};
    c.keep = {0, 2, 4, 1, 3, 9, 2, 9, 9, 0, 1, 2};
    c.pool.resize(static_cast<std::size_t>(c.N * c.bs * c.Hkv * c.d));
    for (std::size_t i = 0; i < c.pool.size(); ++i) c.pool[i] = static_cast<float>(i);
    return c;
  };
  SUBCASE("the valid base case compacts") {
    Case c = base();
    const auto before = c.pool;
    compact_case(c);
    // Row (0, 0) keeps tokens 0, 2, 4: token 1 (block 3, slot 1) now holds token 2
    // (block 1, slot 0).
    CHECK(c.pool[static_cast<std::size_t>(c.offset(0, 0, 1))] ==
          before[static_cast<std::size_t>(c.offset(0, 0, 2))]);
    CHECK(c.pool[static_cast<std::size_t>(c.offset(0, 0, 2))] ==
          before[static_cast<std::size_t>(c.offset(0, 0, 4))]);
    CHECK(c.pool != before);
  }
  SUBCASE("block id out of range") {
    Case c = base();
    c.ids[3] = 7;
    expect_rejected(c, "cake.compact.ids",
                    "ids(3) (sequence 1) must be a block of the pool, in [0, 7), got 7");
    c.ids[3] = -1;
    expect_rejected(c, "cake.compact.ids", "got -1");
  }
  SUBCASE("block duplicated within a sequence") {
    Case c = base();
    c.ids[2] = 3;
    expect_rejected(c, "cake.compact.ids", "block 3 appears twice in the table: ids(0) and ids(2)");
  }
  SUBCASE("block duplicated across sequences") {
    Case c = base();
    c.ids[4] = 1;
    expect_rejected(c, "cake.compact.ids",
                    "block 1 appears twice in the table: ids(1) and ids(4) (sequence 1)");
  }
  SUBCASE("table too short for the sequence length") {
    Case c = base();
    c.seq_lens[1] = 5;  // 5 tokens need 3 blocks of 2, the table has 2
    expect_rejected(c, "cake.compact.ids",
                    "the block table of sequence 1 is too short: seq_lens(1) = 5 tokens need 3 "
                    "blocks of 2, got 2");
  }
  SUBCASE("indptr decreasing or past ids") {
    Case c = base();
    c.indptr = {0, 3, 2};
    expect_rejected(c, "cake.compact.indptr", "indptr(2) = 2 follows indptr(1) = 3");
    c.indptr = {0, 3, 6};
    expect_rejected(c, "cake.compact.indptr", "indptr(2) = 6 exceeds the 5 entries of ids");
  }
  SUBCASE("kept indices not ascending") {
    Case c = base();
    c.keep[1] = 0;  // row (0, 0): 0, 0, 4
    expect_rejected(c, "cake.compact.keep",
                    "strictly ascending keep rows; keep(0, 0, 1) = 0 follows 0");
  }
  SUBCASE("kept index past the sequence") {
    Case c = base();
    c.keep[10] = 3;  // row (1, 1) = 0, 3: sequence 1 holds 3 tokens
    expect_rejected(c, "cake.compact.keep", "keep(1, 1, 1) must be in [0, seq_lens = 3), got 3");
  }
  SUBCASE("kept length above m or the sequence") {
    Case c = base();
    c.keep_lens[0] = 4;
    expect_rejected(c, "cake.compact.keep_lens",
                    "keep_lens(0, 0) must be in [0, min(m = 3, seq_lens(0) = 5)], got 4");
    c.keep_lens[0] = 3, c.keep_lens[2] = 4;
    expect_rejected(c, "cake.compact.keep_lens", "keep_lens(1, 0)");
  }
  SUBCASE("shapes") {
    Case c = base();
    const std::vector<float> before = c.pool;
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, c.pool_view(c.pool.data()), c.table(),
                      cake::make_view(c.keep.data(), std::array<index_t, 3>{2, 1, 6}),
                      cake::make_view(c.keep_lens.data(), std::array<index_t, 2>{2, 1})),
        doctest::Contains("[cake.compact.keep] keep must be (num_seqs = 2, kv_heads = 2, m)"),
        cake::invalid_argument);
    CHECK(c.pool == before);
  }
}

TEST_CASE(
    "paged compact: strided keep and keep_lens views; a pool strided along head_dim is rejected") {
  Case c = paged_case::make({3, 2, 4, 6, 25, false}, 77);
  // keep inside a wider (num_seqs, Hkv, m + 3) buffer, keep_lens transposed in memory.
  const index_t ld = c.m + 3;
  std::vector<std::int64_t> wide(static_cast<std::size_t>(c.num_seqs * c.Hkv * ld), -9);
  std::vector<std::int32_t> lens_t(static_cast<std::size_t>(c.num_seqs * c.Hkv));
  for (index_t s = 0; s < c.num_seqs; ++s)
    for (index_t h = 0; h < c.Hkv; ++h) {
      for (index_t t = 0; t < c.m; ++t)
        wide[static_cast<std::size_t>((s * c.Hkv + h) * ld + t)] =
            c.keep[static_cast<std::size_t>((s * c.Hkv + h) * c.m + t)];
      lens_t[static_cast<std::size_t>(h * c.num_seqs + s)] =
          c.keep_lens[static_cast<std::size_t>(s * c.Hkv + h)];
    }
  cake::compact(cake::host, c.pool_view(c.pool.data()), c.table(),
                cake::make_view(wide.data(), std::array<index_t, 3>{c.num_seqs, c.Hkv, c.m},
                                std::array<index_t, 3>{c.Hkv * ld, ld, 1}),
                cake::make_view(lens_t.data(), std::array<index_t, 2>{c.num_seqs, c.Hkv},
                                std::array<index_t, 2>{1, c.num_seqs}));
  CHECK(c.pool == c.expected);
  SUBCASE("head_dim not contiguous") {
    const auto before = c.pool;
    auto st = c.strides();
    st[3] = 2;
    CHECK_THROWS_WITH_AS(
        cake::compact(
            cake::host,
            cake::make_view(c.pool.data(), std::array<index_t, 4>{c.N, c.Hkv, c.bs, 3}, st),
            c.table(), c.keep_view(), c.lens_view()),
        doctest::Contains("[cake.compact.layout] pool must have unit stride along head_dim"),
        cake::invalid_argument);
    CHECK(c.pool == before);
  }
}

TEST_CASE("validate_block_table rejects block_size < 1 and num_blocks < 0 (no division by zero)") {
  const std::vector<std::int32_t> indptr{0, 1}, ids{0}, lens{3};
  const auto t = cake::make_block_table(indptr.data(), ids.data(), lens.data(), 1);
  for (index_t bs : {0, -2}) {
    const cake::status st = cake::validate_block_table(t, 4, bs);
    CHECK(st.id == "cake.compact.block_size");
    CHECK_MESSAGE(
        st.message.find("block_size must be >= 1, got " + std::to_string(bs)) != std::string::npos,
        st.message);
  }
  const cake::status st = cake::validate_block_table(t, -1, 4);
  CHECK(st.id == "cake.compact.num_blocks");
  CHECK_MESSAGE(st.message.find("num_blocks must be >= 0, got -1") != std::string::npos,
                st.message);
  CHECK(cake::validate_block_table(t, 4, 4).ok());
}

TEST_CASE("paged compact: a shorter head's slots up to the sequence's new length are zero K/V") {
  // One sequence of 5 tokens in blocks (2, 0, 1) of 2; head 0 keeps 4 tokens, head 1
  // keeps 1, so new_lens = 4 and head 1's slots 1 .. 3 are padding, read by paged
  // attention (one length per sequence) and so zero, as the dense cache pads heads.
  Case c;
  c.num_seqs = 1, c.Hkv = 2, c.bs = 2, c.d = 2, c.N = 4, c.m = 4, c.nhd = false;
  c.indptr = {0, 3};
  c.ids = {2, 0, 1};
  c.seq_lens = {5};
  c.keep_lens = {4, 1};
  c.keep = {0, 1, 3, 4, 2, 9, 9, 9};
  c.pool.resize(static_cast<std::size_t>(c.N * c.Hkv * c.bs * c.d));
  for (std::size_t i = 0; i < c.pool.size(); ++i) c.pool[i] = static_cast<float>(i + 1);
  const auto before = c.pool;
  compact_case(c);
  const auto at = [&](const std::vector<float>& p, index_t h, index_t t) {
    return p[static_cast<std::size_t>(c.offset(0, h, t))];
  };
  CHECK(at(c.pool, 0, 2) == at(before, 0, 3));
  CHECK(at(c.pool, 0, 3) == at(before, 0, 4));
  CHECK(at(c.pool, 1, 0) == at(before, 1, 2));
  for (index_t t = 1; t < 4; ++t)
    for (index_t x = 0; x < c.d; ++x) {
      CAPTURE(t);
      CHECK(c.pool[static_cast<std::size_t>(c.offset(0, 1, t) + x)] == 0.0f);
    }
  // Past the new length nothing is touched: slot 4 (block 1, slot 0) of both heads.
  CHECK(at(c.pool, 0, 4) == at(before, 0, 4));
  CHECK(at(c.pool, 1, 4) == at(before, 1, 4));
  // The unused block 3 is untouched.
  for (index_t h = 0; h < c.Hkv; ++h)
    for (index_t x = 0; x < c.bs * c.d; ++x) {
      const auto i = static_cast<std::size_t>(3 * c.Hkv * c.bs * c.d + h * c.bs * c.d + x);
      CHECK(c.pool[i] == before[i]);
    }
}

TEST_CASE("paged compact of K and V in one call: planned and validated before either moves") {
  Case k = paged_case::make({4, 3, 16, 8, 60, true}, 91);
  Case v = paged_case::make({4, 3, 16, 8, 60, true}, 91);
  for (float& x : v.pool) x = -x;  // V differs from K; same table and indices
  for (float& x : v.expected) x = -x;
  const index_t n = k.num_seqs;
  std::vector<std::int32_t> new_lens(static_cast<std::size_t>(n), -7), freed(new_lens);
  const auto out = [&](std::vector<std::int32_t>& x, index_t len) {
    return cake::make_view(x.data(), std::array<index_t, 1>{len});
  };
  const auto k_before = k.pool, v_before = v.pool;
  const auto expect_unchanged = [&] {
    CHECK(k.pool == k_before);
    CHECK(v.pool == v_before);
    CHECK(new_lens == std::vector<std::int32_t>(static_cast<std::size_t>(n), -7));
  };
  SUBCASE("valid: both compacted, the plan as paged_plan's with the pools' block_size") {
    cake::compact(cake::host, k.pool_view(k.pool.data()), v.pool_view(v.pool.data()), k.table(),
                  k.keep_view(), k.lens_view(), out(new_lens, n), out(freed, n));
    CHECK(k.pool == k.expected);
    CHECK(v.pool == v.expected);
    std::vector<std::int32_t> nl(static_cast<std::size_t>(n)), fr(nl);
    cake::paged_plan(k.table(), k.lens_view(), k.bs, out(nl, n), out(fr, n));
    CHECK(new_lens == nl);
    CHECK(freed == fr);
  }
  SUBCASE("V's pool has another block_size: rejected, K not compacted") {
    // The same memory seen as blocks of 8: two separate calls would compact K first.
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, k.pool_view(k.pool.data()),
                      cake::make_view(v.pool.data(), std::array<index_t, 4>{2 * v.N, v.Hkv, 8, v.d},
                                      std::array<index_t, 4>{8 * v.Hkv * v.d, v.d, v.Hkv * v.d, 1}),
                      k.table(), k.keep_view(), k.lens_view(), out(new_lens, n), out(freed, n)),
        doctest::Contains(("[cake.compact.pool] k_pool and v_pool must have the same (num_blocks, "
                           "kv_heads, block_size, head_dim), got (" +
                           std::to_string(k.N) + ", 3, 16, 8) and (" + std::to_string(2 * k.N) +
                           ", 3, 8, 8)")
                              .c_str()),
        cake::invalid_argument);
    expect_unchanged();
  }
  SUBCASE("V's pool strided along head_dim: rejected, K not compacted") {
    std::vector<float> wide(v.pool.size() * 2);
    const auto wide_before = wide;
    auto st = v.strides();
    for (auto& x : st) x *= 2;
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, k.pool_view(k.pool.data()),
                      cake::make_view(wide.data(), v.extents(), st), k.table(), k.keep_view(),
                      k.lens_view()),
        doctest::Contains("[cake.compact.layout] v_pool must have unit stride along head_dim"),
        cake::invalid_argument);
    expect_unchanged();
    CHECK(wide == wide_before);
  }
  SUBCASE("K and V the same pool: rejected") {
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, k.pool_view(k.pool.data()), k.pool_view(k.pool.data()), k.table(),
                      k.keep_view(), k.lens_view()),
        doctest::Contains("k_pool and v_pool must not overlap"), cake::invalid_argument);
    expect_unchanged();
  }
  SUBCASE("plan outputs of the wrong length: rejected before anything moves") {
    CHECK_THROWS_WITH_AS(
        cake::compact(cake::host, k.pool_view(k.pool.data()), v.pool_view(v.pool.data()), k.table(),
                      k.keep_view(), k.lens_view(), out(new_lens, n - 1), out(freed, n)),
        doctest::Contains("[cake.compact.new_lens] new_lens and freed must have num_seqs"),
        cake::invalid_argument);
    expect_unchanged();
  }
  SUBCASE("a bad index: rejected, neither pool moves") {
    k.keep[1] = k.keep[0];
    k.keep_lens[0] = std::max<std::int32_t>(k.keep_lens[0], 2);
    CHECK_THROWS_AS(
        cake::compact(cake::host, k.pool_view(k.pool.data()), v.pool_view(v.pool.data()), k.table(),
                      k.keep_view(), k.lens_view(), out(new_lens, n), out(freed, n)),
        cake::invalid_argument);
    expect_unchanged();
  }
}

TEST_CASE("validate_block_table needs memory in the table's size, not the pool's") {
  // A pool of 2^40 blocks: a check sized by the pool (one owner per block) cannot run.
  const std::vector<std::int32_t> indptr{0, 2, 3}, ids{7, 1 << 30, 5}, lens{5, 1};
  const auto t = cake::make_block_table(indptr.data(), ids.data(), lens.data(), 2);
  const index_t huge = index_t{1} << 40;
  CHECK(cake::validate_block_table(t, huge, 4).ok());
  const std::vector<std::int32_t> dup{7, 5, 7};
  const cake::status st = cake::validate_block_table(
      cake::make_block_table(indptr.data(), dup.data(), lens.data(), 2), huge, 4);
  CHECK(st.message ==
        "[cake.compact.ids] block 7 appears twice in the table: ids(0) and ids(2) "
        "(sequence 1)");
}

TEST_CASE(
    "validate_pool_strides: a pool whose strides alias elements is rejected before it moves") {
  using A = std::array<index_t, 4>;
  std::vector<float> mem(4 * 3 * 5 * 8);
  const auto check = [&](A ext, A st) {
    return cake::validate_pool_strides(cake::make_view(mem.data(), ext, st), "cake.compact.pool",
                                       "k_pool");
  };
  // HND, NHD, and a pool padded between blocks: every element its own.
  CHECK(check({4, 3, 5, 8}, {3 * 5 * 8, 5 * 8, 8, 1}).ok());
  CHECK(check({4, 3, 5, 8}, {5 * 3 * 8, 8, 3 * 8, 1}).ok());
  CHECK(check({2, 3, 5, 8}, {2 * 3 * 5 * 8, 5 * 8, 8, 1}).ok());
  CHECK(check({1, 1, 1, 8}, {1, 1, 1, 1}).ok());  // extents of 1: their strides are not used
  // CCCL's checked builds (CCCL_ENABLE_HOST_ASSERTIONS: the sanitized build) abort when a
  // layout_stride view with a zero or aliasing stride is made, so such a pool reaches cake
  // only in builds without them; its rejection is tested there.
#if !defined(CCCL_ENABLE_HOST_ASSERTIONS)
  // A slot stride of 0: the block's tokens would be one.
  const cake::status zero = check({4, 3, 5, 8}, {3 * 5 * 8, 5 * 8, 0, 1});
  CHECK(zero.message ==
        "[cake.compact.pool] k_pool must give every (block, kv_head, slot, x) element its own "
        "memory: stride(2) must be >= 1, the span of the dimensions with smaller strides, got 0 "
        "(strides (120, 40, 0, 1))");
  // Slots overlapping along head_dim (stride 4 < head_dim 8).
  const cake::status half = check({4, 3, 5, 8}, {3 * 5 * 8, 5 * 8, 4, 1});
  CHECK(half.message.find("stride(2) must be >= 8, the span of the dimensions with smaller "
                          "strides, got 4") != std::string::npos);
  // Blocks overlapping the heads of the block before (stride one head short).
  const cake::status blocks = check({4, 3, 5, 8}, {2 * 5 * 8, 5 * 8, 8, 1});
  CHECK(blocks.message.find("stride(0) must be >= 120, the span of the dimensions with smaller "
                            "strides, got 80") != std::string::npos);

  // compact with such a pool (and the K/V call with such a V pool) throws, nothing moved.
  Case c = paged_case::make({2, 2, 4, 8, 20, false}, 17);
  auto st = c.strides();
  st[2] = 0;
  const auto before = c.pool;
  CHECK_THROWS_WITH_AS(cake::compact(cake::host, cake::make_view(c.pool.data(), c.extents(), st),
                                     c.table(), c.keep_view(), c.lens_view()),
                       doctest::Contains("[cake.compact.pool] pool must give every (block, "
                                         "kv_head, slot, x) element its own memory: stride(2)"),
                       cake::invalid_argument);
  CHECK(c.pool == before);
  Case v = paged_case::make({2, 2, 4, 8, 20, false}, 17);
  const auto v_before = v.pool;
  CHECK_THROWS_WITH_AS(
      cake::compact(cake::host, c.pool_view(c.pool.data()),
                    cake::make_view(v.pool.data(), v.extents(), st), c.table(), c.keep_view(),
                    c.lens_view()),
      doctest::Contains("[cake.compact.pool] v_pool must give every (block, kv_head, slot, x) "
                        "element its own memory: stride(2)"),
      cake::invalid_argument);
  CHECK(c.pool == before);
  CHECK(v.pool == v_before);
#endif
}
