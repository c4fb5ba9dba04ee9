// KvCache on cake::cuda against KvCache on cake::host: the same budgets, cascade
// stages, held positions and held K/V bits after prefill and after every decoding
// step, on the golden cases and on a synthetic workload, in both token orders and
// both cut modes. (main() and the no-GPU skip live in test_cuda.cu.)
#include <doctest/doctest.h>

#include <cake/cake.cuh>
#include <cake_tools/golden.hpp>

#include <algorithm>
#include <array>
#include <filesystem>
#include <iterator>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "device_buffer.cuh"

namespace {

using namespace cake_cuda_test;

// The values a cache storing T holds for x (identity for float).
template <class T>
void round_to(std::vector<float>& v) {
  for (auto& x : v) x = static_cast<float>(static_cast<T>(x));
}

using HostCache = cake::KvCache<>;
using CudaCache = cake::KvCache<cake::CakePreference, cake::ProportionalBudget,
                                cake::MeanVarianceIndicator, float, cake::cuda_policy>;

template <class HostC, class CudaC>
void require_same(const HostC& h, const CudaC& c, const std::string& where) {
  INFO(where);
  REQUIRE(std::vector<index_t>(h.budgets().begin(), h.budgets().end()) ==
          std::vector<index_t>(c.budgets().begin(), c.budgets().end()));
  REQUIRE(h.stage_budgets() == c.stage_budgets());
  for (index_t l = 0; l < h.layers_prefilled(); ++l) {
    INFO("layer " << l);
    REQUIRE(h.tokens_held(l) == c.tokens_held(l));
    CHECK(h.preference(l) == doctest::Approx(c.preference(l)).epsilon(1e-4));
    // Each row's held tokens, as (position, key row, value row) sorted by position: in
    // the reference order, decode scores that differ in the last bits between the
    // backends may order near-equal tokens differently, never hold different ones.
    // n: the stored extent (the longest row when head-wise rows differ; padding
    // slots, position -1 and zeros, compare like tokens).
    const index_t rows = h.config().batch * h.config().kv_heads, n = h.positions(l).extent(2),
                  d = h.config().head_dim;
    REQUIRE(h.row_lengths(l) == c.row_lengths(l));
    auto tokens = [&](std::vector<index_t> pos, std::vector<float> k, std::vector<float> v) {
      std::vector<std::tuple<index_t, std::vector<float>, std::vector<float>>> out;
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < n; ++t) {
          const auto at = static_cast<std::size_t>((r * n + t) * d);
          out.emplace_back(r * (index_t{1} << 40) + pos[static_cast<std::size_t>(r * n + t)],
                           std::vector<float>(k.begin() + at, k.begin() + at + d),
                           std::vector<float>(v.begin() + at, v.begin() + at + d));
        }
      std::sort(out.begin(), out.end());
      return out;
    };
    CHECK(tokens(flatten(h.positions(l)), flatten(h.keys(l)), flatten(h.values(l))) ==
          tokens(download(c.positions(l)), convert<float>(download(c.keys(l))),
                 convert<float>(download(c.values(l)))));
    if (h.config().order == cake::token_order::position)  // here the order itself is defined
      CHECK(flatten(h.positions(l)) == download(c.positions(l)));
  }
}

// Layer l of the same prompt into a host cache and a CUDA cache (the latter from
// device copies, K and V in the CUDA cache's element type TD: k and v must already
// hold values TD represents). qs: (batch, q_heads, window, head_dim);
// ks: (batch, kv_heads, S, head_dim).
template <class HostC, class CudaC>
void prefill_both(HostC& host, CudaC& dev, index_t l, const std::vector<float>& q,
                  const std::vector<float>& k, const std::vector<float>& v,
                  const std::array<index_t, 4>& qs, const std::array<index_t, 4>& ks) {
  using TD = typename CudaC::value_type;
  DeviceBuffer<float> dq(q);
  DeviceBuffer<TD> dk(convert<TD>(k)), dv(convert<TD>(v));
  host.prefill(l, cake::make_view(q.data(), qs), cake::make_view(k.data(), ks),
               cake::make_view(v.data(), ks));
  dev.prefill(l, dq.const_view(qs), dk.const_view(ks), dv.const_view(ks));
}

// Layer l's prompt: q (batch, q_heads, window, head_dim), k and v (batch, kv_heads, S,
// head_dim), normal with a scale growing by layer; with `sinks`, the first 4 keys of
// row (0, 0) lifted (attention sinks). K and V hold values TD represents.
template <class TD>
std::array<std::vector<float>, 3> random_prompt(const cake::CacheConfig& cfg, index_t S, index_t l,
                                                bool sinks, std::mt19937& rng,
                                                std::normal_distribution<float>& normal) {
  const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                w = cfg.window;
  std::vector<float> q(static_cast<std::size_t>(B * H * w * d)),
      k(static_cast<std::size_t>(B * Hkv * S * d)), v(k.size());
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = normal(rng) * (1.0f + 0.3f * static_cast<float>(l));
  if (sinks)
    for (index_t j = 0; j < 4; ++j)
      for (index_t x = 0; x < d; ++x) k[static_cast<std::size_t>(j * d + x)] += 2.0f;
  round_to<TD>(k);
  round_to<TD>(v);
  return {std::move(q), std::move(k), std::move(v)};
}

// 3 layers of a small GQA model (8 query / 2 KV heads, d 64, w 16) into 80 tokens.
cake::CacheConfig small_gqa_config(bool cascade, cake::token_order order) {
  return cake::CacheConfig{.layers = 3,
                           .batch = 2,
                           .q_heads = 8,
                           .kv_heads = 2,
                           .head_dim = 64,
                           .window = 16,
                           .cache_size = 80,
                           .cascade = cascade,
                           .order = order};
}

std::string mode_name(bool cascade, cake::token_order order) {
  return std::string(cascade ? "cascading" : "one-shot") +
         (order == cake::token_order::position ? ", position order" : ", reference order");
}

// Prefills both caches with the same random GQA layers (4 attention-sink keys in
// each), compares them, decodes 3 steps in every layer and compares again.
template <class HostC, class CudaC>
void run_synthetic(HostC& host, CudaC& dev, unsigned seed, const std::string& where,
                   index_t S = 700) {
  using TD = typename CudaC::value_type;
  const auto& cfg = host.config();
  const index_t L = cfg.layers, B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads,
                d = cfg.head_dim, w = cfg.window;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (index_t l = 0; l < L; ++l) {
    const auto [q, k, v] = random_prompt<TD>(cfg, S, l, true, rng, normal);
    prefill_both(host, dev, l, q, k, v, {B, H, w, d}, {B, Hkv, S, d});
  }
  require_same(host, dev, where);
  for (int step = 0; step < 3; ++step)
    for (index_t l = 0; l < L; ++l) {
      std::vector<float> q(static_cast<std::size_t>(B * H * d)),
          k(static_cast<std::size_t>(B * Hkv * d)), v(k.size());
      for (auto* t : {&q, &k, &v})
        for (auto& x : *t) x = normal(rng);
      round_to<TD>(k);
      round_to<TD>(v);
      DeviceBuffer<float> dq(q);
      DeviceBuffer<TD> dk(convert<TD>(k)), dv(convert<TD>(v));
      host.decode(
          l, cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 3>{B, H, d}),
          cake::make_view(static_cast<const float*>(k.data()), std::array<index_t, 3>{B, Hkv, d}),
          cake::make_view(static_cast<const float*>(v.data()), std::array<index_t, 3>{B, Hkv, d}));
      dev.decode(l, dq.const_view(std::array<index_t, 3>{B, H, d}),
                 dk.const_view(std::array<index_t, 3>{B, Hkv, d}),
                 dv.const_view(std::array<index_t, 3>{B, Hkv, d}));
    }
  require_same(host, dev, where + ", decoded");
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("KvCache on CUDA equals KvCache on the host on every golden case") {
    int cases = 0;
    for (const auto& entry : std::filesystem::directory_iterator(CAKE_GOLDEN_DIR)) {
      if (!entry.is_directory()) continue;
      const cake_tools::GoldenCase gc(entry.path().string());
      ++cases;
      for (auto order : {cake::token_order::reference, cake::token_order::position}) {
        const std::string where =
            gc.name +
            (order == cake::token_order::reference ? " (reference order)" : " (position order)");
        HostCache host(gc.config(order), gc.preference(), {}, gc.indicator());
        CudaCache dev(gc.config(order), gc.preference(), {}, gc.indicator(),
                      cake::cuda.on(cudaStreamPerThread));
        for (index_t l = 0; l < gc.L; ++l) {
          const std::string p = "layer" + std::to_string(l);
          auto q = gc.floats(p + "_q_window");
          auto k = gc.floats(p + "_k");
          auto v = gc.floats(p + "_v");
          prefill_both(host, dev, l, q, k, v, {gc.B, gc.H, gc.w, gc.d}, {gc.B, gc.Hkv, gc.S, gc.d});
          require_same(host, dev, where + " after prefill of layer " + std::to_string(l));
        }
        for (index_t t = 0; t < gc.meta["decode_steps"].as_int(); ++t)
          for (index_t l = 0; l < gc.L; ++l) {
            const std::string p = "decode" + std::to_string(t) + "_layer" + std::to_string(l);
            auto q = gc.floats(p + "_q");
            auto k = gc.floats(p + "_k");
            auto v = gc.floats(p + "_v");
            DeviceBuffer<float> dq(q), dk(k), dv(v);
            const std::array<index_t, 3> qs{gc.B, gc.H, gc.d}, ks{gc.B, gc.Hkv, gc.d};
            host.decode(l, cake::make_view(static_cast<const float*>(q.data()), qs),
                        cake::make_view(static_cast<const float*>(k.data()), ks),
                        cake::make_view(static_cast<const float*>(v.data()), ks));
            dev.decode(l, dq.const_view(qs), dk.const_view(ks), dv.const_view(ks));
            if (order == cake::token_order::reference) {
              // The reference's held positions, from the golden data.
              auto want = gc.ints(p + "_held");
              auto have = download(dev.positions(l));
              std::vector<std::int64_t> sorted;
              const index_t n = dev.tokens_held(l);
              for (index_t r = 0; r < gc.B * gc.Hkv; ++r) {
                std::vector<std::int64_t> row(have.begin() + r * n, have.begin() + (r + 1) * n);
                std::sort(row.begin(), row.end());
                sorted.insert(sorted.end(), row.begin(), row.end());
              }
              CHECK(sorted == want);
            }
          }
        require_same(host, dev, where + " after decoding");
      }
    }
    REQUIRE(cases == 5);
  }

  TEST_CASE("KvCache on CUDA: synthetic GQA workload, cascading and one-shot, bad input") {
    const index_t L = 4, B = 2, H = 8, Hkv = 2, d = 64, w = 16;
    for (bool cascade : {true, false}) {
      cake::CacheConfig cfg{.layers = L,
                            .batch = B,
                            .q_heads = H,
                            .kv_heads = Hkv,
                            .head_dim = d,
                            .window = w,
                            .cache_size = 80,
                            .cascade = cascade};
      HostCache host(cfg, cake::CakePreference{1.6f, 0.4f});
      CudaCache dev(cfg, cake::CakePreference{1.6f, 0.4f}, {}, {}, cake::cuda);
      run_synthetic(host, dev, 5, cascade ? "cascading" : "one-shot");
    }
    // A NaN in device keys is found and reported with its coordinates; nothing changes.
    cake::CacheConfig cfg{.layers = 1,
                          .batch = 1,
                          .q_heads = 2,
                          .kv_heads = 1,
                          .head_dim = 8,
                          .window = 4,
                          .cache_size = 12};
    CudaCache dev(cfg, {}, {}, {}, cake::cuda);
    std::vector<float> q(2 * 4 * 8, 0.5f), k(40 * 8, 0.25f), v(40 * 8, 1.0f);
    k[static_cast<std::size_t>(17 * 8 + 3)] = std::nanf("");
    DeviceBuffer<float> dq(q), dk(k), dv(v);
    try {
      dev.prefill(0, dq.const_view(std::array<index_t, 4>{1, 2, 4, 8}),
                  dk.const_view(std::array<index_t, 4>{1, 1, 40, 8}),
                  dv.const_view(std::array<index_t, 4>{1, 1, 40, 8}));
      FAIL("a NaN key was accepted");
    } catch (const cake::invalid_argument& e) {
      CHECK(std::string(e.what()).find("[cake.prefill.keys]") != std::string::npos);
      CHECK(std::string(e.what()).find("(0, 0, 17, 3)") != std::string::npos);
    }
    CHECK(dev.layers_prefilled() == 0);
  }
  TEST_CASE(
      "KvCache on CUDA with bf16 and fp16 storage equals a float host cache of the same values") {
    // Engines keep K/V in 16 bits: the CUDA cache stores them as given and scores them
    // in float, so a host cache fed the same (rounded) values keeps the same tokens.
    for (bool cascade : {true, false})
      for (auto order : {cake::token_order::position, cake::token_order::reference}) {
        const cake::CacheConfig cfg = small_gqa_config(cascade, order);
        const std::string where = mode_name(cascade, order);
        HostCache hb(cfg, cake::CakePreference{1.6f, 0.4f});
        cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::MeanVarianceIndicator,
                      __nv_bfloat16, cake::cuda_policy>
            db(cfg, cake::CakePreference{1.6f, 0.4f}, {}, {}, cake::cuda);
        run_synthetic(hb, db, 21, "bf16, " + where);
        cake::KvCache<cake::UniformPreference, cake::ProportionalBudget, cake::AccumulatedIndicator>
            hh(cfg);
        cake::KvCache<cake::UniformPreference, cake::ProportionalBudget, cake::AccumulatedIndicator,
                      __half, cake::cuda_policy>
            dh(cfg, {}, {}, {}, cake::cuda);
        run_synthetic(hh, dh, 22, "fp16 h2o, " + where);
      }
  }
  TEST_CASE("KvCache on CUDA allocates from its own memory pool, or from the engine's") {
    const cake::CacheConfig cfg{.layers = 2,
                                .batch = 1,
                                .q_heads = 4,
                                .kv_heads = 2,
                                .head_dim = 32,
                                .window = 8,
                                .cache_size = 64};
    const index_t S = 500;
    std::mt19937 rng(41);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(static_cast<std::size_t>(4 * 8 * 32)),
        k(static_cast<std::size_t>(2 * S * 32));
    for (auto* t : {&q, &k})
      for (auto& x : *t) x = normal(rng);
    DeviceBuffer<float> dq(q), dk(k);
    const auto prefill = [&](auto& cache) {
      for (index_t l = 0; l < 2; ++l)
        cache.prefill(l, dq.const_view(std::array<index_t, 4>{1, 4, 8, 32}),
                      dk.const_view(std::array<index_t, 4>{1, 2, S, 32}),
                      dk.const_view(std::array<index_t, 4>{1, 2, S, 32}));
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    };
    const auto used = [](cudaMemPool_t pool) {
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      std::uint64_t bytes = 0;
      REQUIRE(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &bytes) == cudaSuccess);
      return bytes;
    };
    int dev = 0;
    REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
    cudaMemPool_t device_pool = nullptr;
    REQUIRE(cudaDeviceGetDefaultMemPool(&device_pool, dev) == cudaSuccess);
    SUBCASE("the engine's pool: the layers live there until the cache goes") {
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = dev;
      cudaMemPool_t pool = nullptr;
      REQUIRE(cudaMemPoolCreate(&pool, &props) == cudaSuccess);
      {
        CudaCache cache(cfg, {}, {}, {}, cake::cuda.from(pool));
        prefill(cache);
        CHECK(used(pool) >= static_cast<std::uint64_t>(cache.bytes_held()));
      }
      CHECK(used(pool) == 0);
      REQUIRE(cudaMemPoolDestroy(pool) == cudaSuccess);
    }
    SUBCASE("no pool named: a pool of the cache's own, not the device's") {
      const std::uint64_t before = used(device_pool);
      CudaCache cache(cfg, {}, {}, {}, cake::cuda);
      prefill(cache);
      CHECK(cache.bytes_held() > 0);
      CHECK(used(device_pool) == before);
      // Moved, the cache keeps its pool (and its layers) alive.
      CudaCache moved(std::move(cache));
      CHECK(moved.tokens_held(1) > 0);
      CHECK(download(moved.positions(1)).size() ==
            static_cast<std::size_t>(2 * moved.positions(1).extent(2)));
    }
  }
  TEST_CASE("KvCache on CUDA with tensor-core statistics stays close to the host") {
    // cake::cuda.with(tensor_cores): scores agree to ~1e-3, so budgets may move by one
    // token and near-tied tokens may swap; everything else must hold.
    const index_t L = 4, B = 1, H = 32, Hkv = 8, d = 128, w = 32, S = 1500;
    const cake::CacheConfig cfg{.layers = L,
                                .batch = B,
                                .q_heads = H,
                                .kv_heads = Hkv,
                                .head_dim = d,
                                .window = w,
                                .cache_size = 256};
    HostCache host(cfg);
    cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::MeanVarianceIndicator,
                  __nv_bfloat16, cake::cuda_policy>
        dev(cfg, {}, {}, {}, cake::cuda.with(cake::cuda_math::tensor_cores));
    std::mt19937 rng(31);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (index_t l = 0; l < L; ++l) {
      const auto [q, k, v] = random_prompt<__nv_bfloat16>(cfg, S, l, false, rng, normal);
      prefill_both(host, dev, l, q, k, v, {B, H, w, d}, {B, Hkv, S, d});
    }
    index_t sum_host = 0, sum_dev = 0;
    for (index_t l = 0; l < L; ++l) {
      INFO("layer " << l);
      const index_t bh = host.budgets()[static_cast<std::size_t>(l)],
                    bd = dev.budgets()[static_cast<std::size_t>(l)];
      sum_host += bh;
      sum_dev += bd;
      CHECK(std::abs(bh - bd) <= 1);
      CHECK(dev.preference(l) == doctest::Approx(host.preference(l)).epsilon(5e-3));
      // Per row, at least 95% of the host's kept positions are kept on the device.
      const std::vector<index_t> ph = flatten(host.positions(l)), pd = download(dev.positions(l));
      const index_t nh = host.positions(l).extent(2), nd = dev.positions(l).extent(2);
      for (index_t r = 0; r < B * Hkv; ++r) {
        std::vector<index_t> a(ph.begin() + r * nh, ph.begin() + (r + 1) * nh),
            b(pd.begin() + r * nd, pd.begin() + (r + 1) * nd), both;
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
        CHECK(static_cast<double>(both.size()) >= 0.95 * static_cast<double>(nh));
      }
    }
    CHECK(sum_host == sum_dev);
  }
  TEST_CASE("KvCache on CUDA equals the host for StreamingLLM, TOVA, H2O and head-wise budgets") {
    for (bool cascade : {true, false})
      for (auto order : {cake::token_order::position, cake::token_order::reference}) {
        const cake::CacheConfig cfg = small_gqa_config(cascade, order);
        const std::string where = mode_name(cascade, order);
        auto both = [&]<class Pref, class Budget = cake::ProportionalBudget>(
            const char* name, auto ind, index_t S = 700) {
          using Ind = decltype(ind);
          cake::KvCache<Pref, Budget, Ind> host(cfg, {}, {}, ind);
          cake::KvCache<Pref, Budget, Ind, float, cake::cuda_policy> dev(cfg, {}, {}, ind,
                                                                         cake::cuda);
          run_synthetic(host, dev, 11, std::string(name) + ", " + where, S);
        };
        both.template operator()<cake::UniformPreference>("streamingllm",
                                                          cake::SinkRecencyIndicator{4});
        both.template operator()<cake::UniformPreference>("tova", cake::LastQueryIndicator{});
        both.template operator()<cake::UniformPreference>("h2o", cake::AccumulatedIndicator{});
        both.template operator()<cake::CakePreference>("cake x tova", cake::LastQueryIndicator{});
        both.template operator()<cake::CakePreference>("cake x h2o", cake::AccumulatedIndicator{});
        // Head-wise rows (ragged, padded): Ada-SnapKV and CAKE x Ada-KV, also with H2O sums.
        both.template
        operator()<cake::UniformPreference, cake::HeadwiseBudget<cake::UniformBudget>>(
            "ada_snapkv", cake::WindowMeanIndicator{});
        both.template operator()<cake::CakePreference, cake::HeadwiseBudget<>>(
            "cake_adakv", cake::MeanVarianceIndicator{});
        both.template operator()<cake::UniformPreference, cake::HeadwiseBudget<>>(
            "h2o x head-wise", cake::AccumulatedIndicator{});
        // An uncut prompt (S <= C + w): decoding regrows the layer, sums included.
        both.template operator()<cake::UniformPreference>("h2o, uncut",
                                                          cake::AccumulatedIndicator{}, 60);
      }
  }
}  // TEST_SUITE
