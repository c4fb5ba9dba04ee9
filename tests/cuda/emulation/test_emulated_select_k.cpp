// cake::select_k on CUDA (the radix select kernel, one block per row: the cluster path
// needs sm_90 hardware) run on the CPU from its real source under the emulator, with
// the launcher's plan and parameters, against the host backend: the same indices,
// ties included, in both orders.
#include <cake/cake.hpp>

#include "emulator.hpp"

#include <doctest/doctest.h>
#include <cake/backend/cuda/detail/select_plan.cuh>

#include <array>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using cake::index_t;
namespace cd = cake::cuda_detail;
namespace emu = cake_emulation;

// rows x n scores with row stride `stride` (>= n), drawn from `levels` distinct values
// (few levels: many ties at the threshold).
std::vector<float> scores_with_ties(index_t rows, index_t n, index_t stride, int levels,
                                    std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(0, levels - 1);
  std::vector<float> s(static_cast<std::size_t>(rows * stride), -1e30f);
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < n; ++j)
      s[static_cast<std::size_t>(r * stride + j)] = 0.001f * static_cast<float>(dist(rng)) - 0.3f;
  return s;
}

void check(index_t rows, index_t n, index_t stride, index_t k, cake::select_order order, int levels,
           std::size_t cache_budget, bool vec4, std::uint32_t seed) {
  CAPTURE(n);
  CAPTURE(stride);
  CAPTURE(k);
  CAPTURE(levels);
  std::mt19937 rng(seed);
  std::vector<float> s = scores_with_ties(rows, n, stride, levels, rng);
  const std::array<index_t, 2> se{rows, n}, oe{rows, k};
  const float* sp = s.data();
  const std::array<index_t, 2> strides{stride, 1};
  const auto hs = cake::make_view(sp, se, strides);
  std::vector<std::int64_t> host(static_cast<std::size_t>(rows * k)), out(host.size(), -1);
  cake::select_k(cake::host, hs, cake::make_view(host.data(), oe), order);

  const cd::SelectPlan pl = cd::plan_select_blocks(n, k, order, false, cache_budget);
  REQUIRE_FALSE(pl.device_sort);
  const auto ds = cake::make_view<cake::device_space>(sp, se, strides);
  const auto p = cd::select_params(ds, cake::make_view<cake::device_space>(out.data(), oe), pl);
  REQUIRE(p.vec4 == vec4);
  const auto run = [&]<int SORT>() {
    emu::launch({static_cast<unsigned>(rows), 1, 1},
                {static_cast<unsigned>(cd::tuning::select_threads), 1, 1}, pl.smem,
                [&] { cd::select_k_kernel<std::int64_t, 1, SORT>(p); });
  };
  if (!pl.block_sort)
    run.template operator()<0>();
  else if (pl.sort_items == 1)
    run.template operator()<1>();
  else
    run.template operator()<cd::tuning::select_sort_items>();
  CHECK(out == host);
}

}  // namespace

TEST_CASE("select_k on CUDA, emulated on the CPU, returns the host's indices") {
  using O = cake::select_order;
  const std::size_t cached = cd::select_cache_cap, uncached = 0;
  SUBCASE("cached rows, float4 loads, descending, ties at the threshold") {
    check(3, 2000, 2000, 300, O::descending, 40, cached, true, 1);
  }
  SUBCASE("position order, rows not 16-byte aligned (element loads)") {
    check(2, 1500, 1501, 700, O::position, 25, cached, false, 2);
  }
  SUBCASE("uncached slices (keys read from global memory each pass), k = n") {
    check(2, 900, 904, 900, O::descending, 1000, uncached, true, 3);
  }
  SUBCASE("k above the block size: four sort items per thread") {
    check(1, 3000, 3000, 1500, O::descending, 3000, cached, true, 4);
  }
  SUBCASE("k = 1 and every score equal") {
    check(2, 600, 600, 1, O::descending, 1, cached, true, 5);
  }
}
