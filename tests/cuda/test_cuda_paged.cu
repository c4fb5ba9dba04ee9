// Paged cake::compact on cake::cuda against the host backend (and so against the dense
// compaction): the same pool bytes after compacting in place, in both pool layouts,
// float and bf16; with a cake::cuda_index_guard, bad indices reported with the host's
// message and the pool untouched; the dense compaction's guard likewise. (main() and
// the no-GPU skip live in test_cuda.cu.) Compiled by nvcc in CI; the same kernels run
// under the CPU emulation in cuda/emulation/test_emulated_compact.cpp.
#include <doctest/doctest.h>

#include <cake/cake.cuh>

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../host/paged_case.hpp"
#include "device_buffer.cuh"

namespace {

using namespace cake_cuda_test;

// c's block table, keep and keep_lens on the device.
struct DeviceTable {
  DeviceBuffer<std::int32_t> indptr, ids, lens, keep_lens;
  DeviceBuffer<std::int64_t> keep;
  const paged_case::Case& c;
  explicit DeviceTable(const paged_case::Case& cs)
      : indptr(cs.indptr),
        ids(cs.ids),
        lens(cs.seq_lens),
        keep_lens(cs.keep_lens),
        keep(cs.keep),
        c(cs) {}
  auto table() const {
    return cake::make_block_table<cake::device_space>(
        indptr.get(), ids.get(), lens.get(), c.num_seqs, static_cast<index_t>(c.ids.size()));
  }
  auto keep_view() const {  // (num_seqs, kv_heads, m)
    return keep.const_view(std::array<index_t, 3>{c.num_seqs, c.Hkv, c.m});
  }
  auto lens_view() const {  // (num_seqs, kv_heads)
    return keep_lens.const_view(std::array<index_t, 2>{c.num_seqs, c.Hkv});
  }
};

// Compacts c's pool on the device (type T, guarded or not) and returns the pool.
template <class T>
std::vector<T> compact_on_device(const paged_case::Case& c, cake::cuda_index_guard* guard) {
  DeviceBuffer<T> pool(convert<T>(c.pool));
  const DeviceTable t(c);
  const auto pv = c.pool_view<cake::device_space>(pool.get());
  if (guard)
    cake::compact(cake::cuda, pv, t.table(), t.keep_view(), t.lens_view(), *guard);
  else
    cake::compact(cake::cuda, pv, t.table(), t.keep_view(), t.lens_view());
  return pool.download();
}

template <class T>
void check_equal_to_host(const paged_case::Case& c) {
  // The host backend on the same T (bit-exact copies, so equal bytes).
  std::vector<T> host = convert<T>(c.pool);
  cake::compact(cake::host, c.pool_view(host.data()), c.table(), c.keep_view(), c.lens_view());
  const std::vector<T> got = compact_on_device<T>(c, nullptr);
  REQUIRE(got.size() == host.size());
  CHECK(std::memcmp(got.data(), host.data(), got.size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE("paged compact on CUDA equals the host backend exactly") {
  std::uint32_t seed = 300;
  for (const auto& sh : paged_case::shapes()) {
    CAPTURE(sh.bs);
    CAPTURE(sh.d);
    CAPTURE(sh.nhd);
    const paged_case::Case c = paged_case::make(sh, ++seed);
    check_equal_to_host<float>(c);
    check_equal_to_host<__nv_bfloat16>(c);
  }
  for (const index_t shift : {1, 16, 17}) {
    CAPTURE(shift);
    check_equal_to_host<float>(paged_case::make({4, 8, 16, 128, 300, true}, 7, shift));
  }
}

TEST_CASE("compact on CUDA with a guard: bad indices throw the host's error, nothing written") {
  cake::cuda_index_guard guard;
  SUBCASE("paged, index past the sequence") {
    paged_case::Case c = paged_case::make({3, 2, 4, 8, 30, true}, 5);
    index_t row = c.num_seqs * c.Hkv - 1;
    while (c.keep_lens[static_cast<std::size_t>(row)] < 1) --row;
    c.keep[static_cast<std::size_t>(row * c.m)] = c.seq_lens[static_cast<std::size_t>(row / c.Hkv)];
    std::string host;
    try {
      std::vector<float> p = c.pool;
      cake::compact(cake::host, c.pool_view(p.data()), c.table(), c.keep_view(), c.lens_view());
    } catch (const cake::invalid_argument& e) {
      host = e.what();
    }
    REQUIRE(!host.empty());
    CHECK(compact_on_device<float>(c, &guard) == c.pool);
    CHECK_THROWS_WITH_AS(guard.throw_if_error(), host.c_str(), cake::invalid_argument);
    CHECK(guard.check_status().ok());  // cleared once reported
  }
  SUBCASE("a valid paged call passes the guard") {
    const paged_case::Case c = paged_case::make({3, 2, 4, 8, 30, false}, 6);
    CHECK(compact_on_device<float>(c, &guard) == c.expected);
    CHECK_NOTHROW(guard.throw_if_error());
  }
  SUBCASE("dense, out of range") {
    const std::vector<float> src{0, 1, 2, 3, 4, 5, 6, 7};  // (1, 1, 4, 2)
    const std::vector<std::int32_t> keep{1, 4};
    DeviceBuffer<float> ds(src), dd(std::vector<float>(4, -1.0f));
    DeviceBuffer<std::int32_t> dk(keep);
    cake::compact(cake::cuda, ds.view(std::array<index_t, 4>{1, 1, 4, 2}),
                  dk.view(std::array<index_t, 3>{1, 1, 2}),
                  dd.view(std::array<index_t, 4>{1, 1, 2, 2}), guard);
    CHECK(dd.download() == std::vector<float>(4, -1.0f));
    CHECK_THROWS_WITH_AS(guard.throw_if_error(),
                         "[cake.compact.keep] keep(0, 0, 1) must be in [0, 4), got 4",
                         cake::invalid_argument);
  }
}

TEST_CASE("paged compact of K and V in one CUDA call, guarded and not, equals the host's") {
  paged_case::Case c = paged_case::make({4, 3, 16, 8, 60, true}, 93);
  std::vector<float> v_host = c.pool;
  for (float& x : v_host) x = -x;
  std::vector<float> k_host = c.pool;
  cake::compact(cake::host, c.pool_view(k_host.data()), c.pool_view(v_host.data()), c.table(),
                c.keep_view(), c.lens_view());
  for (int guarded = 0; guarded < 2; ++guarded) {
    CAPTURE(guarded);
    std::vector<float> v0 = c.pool;
    for (float& x : v0) x = -x;
    DeviceBuffer<float> k_pool(c.pool), v_pool(v0);
    const DeviceTable t(c);
    const auto kp = c.pool_view<cake::device_space>(k_pool.get());
    const auto vp = c.pool_view<cake::device_space>(v_pool.get());
    cake::cuda_index_guard guard;
    if (guarded)
      cake::compact(cake::cuda, kp, vp, t.table(), t.keep_view(), t.lens_view(), guard);
    else
      cake::compact(cake::cuda, kp, vp, t.table(), t.keep_view(), t.lens_view());
    CHECK(k_pool.download() == k_host);
    CHECK(v_pool.download() == v_host);
    CHECK_NOTHROW(guard.throw_if_error());
  }
}
