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

namespace {

using cake::index_t;

template <class T>
struct Dev {
  T* p = nullptr;
  std::size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    REQUIRE(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)) == cudaSuccess);
    REQUIRE(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<T> download() const {
    std::vector<T> h(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = static_cast<T>(v[i]);
  return o;
}

// Compacts c's pool on the device (type T, guarded or not) and returns the pool.
template <class T>
std::vector<T> compact_on_device(const paged_case::Case& c, cake::cuda_index_guard* guard) {
  Dev<T> pool(convert<T>(c.pool));
  Dev<std::int32_t> indptr(c.indptr), ids(c.ids), lens(c.seq_lens), keep_lens(c.keep_lens);
  Dev<std::int64_t> keep(c.keep);
  const auto table = cake::make_block_table<cake::device_space>(indptr.p, ids.p, lens.p, c.num_seqs,
                                                                static_cast<index_t>(c.ids.size()));
  const auto pv = c.pool_view<cake::device_space>(pool.p);
  const auto kv = cake::make_view<cake::device_space>(
      static_cast<const std::int64_t*>(keep.p), std::array<index_t, 3>{c.num_seqs, c.Hkv, c.m});
  const auto lv = cake::make_view<cake::device_space>(static_cast<const std::int32_t*>(keep_lens.p),
                                                      std::array<index_t, 2>{c.num_seqs, c.Hkv});
  if (guard)
    cake::compact(cake::cuda, pv, table, kv, lv, *guard);
  else
    cake::compact(cake::cuda, pv, table, kv, lv);
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
    Dev<float> ds(src), dd(std::vector<float>(4, -1.0f));
    Dev<std::int32_t> dk(keep);
    cake::compact(
        cake::cuda, cake::make_view<cake::device_space>(ds.p, std::array<index_t, 4>{1, 1, 4, 2}),
        cake::make_view<cake::device_space>(dk.p, std::array<index_t, 3>{1, 1, 2}),
        cake::make_view<cake::device_space>(dd.p, std::array<index_t, 4>{1, 1, 2, 2}), guard);
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
    Dev<float> k_pool(c.pool), v_pool(v0);
    Dev<std::int32_t> indptr(c.indptr), ids(c.ids), lens(c.seq_lens), keep_lens(c.keep_lens);
    Dev<std::int64_t> keep(c.keep);
    const auto table = cake::make_block_table<cake::device_space>(
        indptr.p, ids.p, lens.p, c.num_seqs, static_cast<index_t>(c.ids.size()));
    const auto kv = cake::make_view<cake::device_space>(
        static_cast<const std::int64_t*>(keep.p), std::array<index_t, 3>{c.num_seqs, c.Hkv, c.m});
    const auto lv = cake::make_view<cake::device_space>(
        static_cast<const std::int32_t*>(keep_lens.p), std::array<index_t, 2>{c.num_seqs, c.Hkv});
    cake::cuda_index_guard guard;
    if (guarded)
      cake::compact(cake::cuda, c.pool_view<cake::device_space>(k_pool.p),
                    c.pool_view<cake::device_space>(v_pool.p), table, kv, lv, guard);
    else
      cake::compact(cake::cuda, c.pool_view<cake::device_space>(k_pool.p),
                    c.pool_view<cake::device_space>(v_pool.p), table, kv, lv);
    CHECK(k_pool.download() == k_host);
    CHECK(v_pool.download() == v_host);
    CHECK_NOTHROW(guard.throw_if_error());
  }
}
