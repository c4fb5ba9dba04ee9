// RaggedKvCache on cake::cuda against one KvCache per sequence on cake::host: packed
// varlen device tensors in, the same budgets, held positions and held K/V bits out,
// for whole prompts and for exact chunked prefill, then decoding. (main() and the
// no-GPU skip live in test_cuda.cu.)
#include <doctest/doctest.h>

#include <cake/cake.cuh>

#include <array>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "device_buffer.cuh"

namespace {

using namespace cake_cuda_test;

using CudaRagged = cake::RaggedKvCache<cake::CakePreference, cake::ProportionalBudget,
                                       cake::MeanVarianceIndicator, float, cake::cuda_policy>;
using A3 = std::array<index_t, 3>;
using A4 = std::array<index_t, 4>;

cake::CacheConfig ragged_config() {
  return cake::CacheConfig{.layers = 3,
                           .batch = 1,
                           .q_heads = 8,
                           .kv_heads = 2,
                           .head_dim = 64,
                           .window = 16,
                           .cache_size = 80};
}

// Every layer's packed prompt of all sequences: queries (total, H, d), keys and
// values (total, Hkv, d); and decode tokens (steps, num_seqs, heads, d) per layer.
struct RaggedPrompt {
  std::vector<index_t> S;
  std::vector<std::int32_t> cu{0};
  std::vector<std::vector<float>> q, k, v;     // per layer
  std::vector<std::vector<float>> dq, dk, dv;  // per layer: (steps, n, heads, d)
  index_t total = 0;
};

RaggedPrompt make_prompt(const cake::CacheConfig& c, std::vector<index_t> lengths, int steps) {
  RaggedPrompt p;
  p.S = std::move(lengths);
  for (index_t s : p.S) p.cu.push_back(static_cast<std::int32_t>(p.total += s));
  const auto n = static_cast<index_t>(p.S.size());
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto fill = [&](index_t size, float scale) {
    std::vector<float> x(static_cast<std::size_t>(size));
    for (auto& e : x) e = normal(rng) * scale;
    return x;
  };
  for (index_t l = 0; l < c.layers; ++l) {
    const float scale = 1.0f + 0.3f * static_cast<float>(l);
    p.q.push_back(fill(p.total * c.q_heads * c.head_dim, scale));
    p.k.push_back(fill(p.total * c.kv_heads * c.head_dim, scale));
    p.v.push_back(fill(p.total * c.kv_heads * c.head_dim, 1.0f));
    p.dq.push_back(fill(steps * n * c.q_heads * c.head_dim, 1.0f));
    p.dk.push_back(fill(steps * n * c.kv_heads * c.head_dim, 1.0f));
    p.dv.push_back(fill(steps * n * c.kv_heads * c.head_dim, 1.0f));
  }
  return p;
}

// The window queries of every sequence, (num_seqs, H, w, d), from the packed queries.
std::vector<float> windows(const cake::CacheConfig& c, const RaggedPrompt& p, index_t l) {
  const index_t H = c.q_heads, w = c.window, d = c.head_dim;
  std::vector<float> out;
  for (std::size_t i = 0; i < p.S.size(); ++i)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = p.cu[i + 1] - w; t < p.cu[i + 1]; ++t)
        for (index_t x = 0; x < d; ++x)
          out.push_back(
              p.q[static_cast<std::size_t>(l)][static_cast<std::size_t>((t * H + h) * d + x)]);
  return out;
}

// Sequence i of the packed host tensors as a host KvCache reads it: (1, heads, S, d).
cake::host_view<const float, 4> part(const std::vector<float>& x, const RaggedPrompt& p,
                                     std::size_t i, index_t heads, index_t d) {
  return cake::make_view(static_cast<const float*>(x.data()) + p.cu[i] * heads * d,
                         A4{1, heads, p.S[i], d}, A4{p.S[i] * heads * d, d, heads * d, 1});
}

template <class HostC, class CudaC>
void require_same(const HostC& h, const CudaC& c, const std::string& where) {
  INFO(where);
  REQUIRE(h.layers_prefilled() == c.layers_prefilled());
  REQUIRE(std::vector<index_t>(h.budgets().begin(), h.budgets().end()) ==
          std::vector<index_t>(c.budgets().begin(), c.budgets().end()));
  REQUIRE(h.stage_budgets() == c.stage_budgets());
  for (index_t l = 0; l < h.layers_prefilled(); ++l) {
    INFO("layer " << l);
    REQUIRE(h.tokens_held(l) == c.tokens_held(l));
    CHECK(flatten(h.positions(l)) == download(c.positions(l)));
    CHECK(flatten(h.keys(l)) == download(c.keys(l)));
    CHECK(flatten(h.values(l)) == download(c.values(l)));
  }
}

// Decodes `steps` tokens into every sequence (ragged on the device, alone on the host).
void decode_both(CudaRagged& dev, std::vector<std::unique_ptr<cake::KvCache<>>>& host,
                 const cake::CacheConfig& c, const RaggedPrompt& p,
                 const std::vector<cake::sequence_id>& ids, int steps) {
  const auto n = static_cast<index_t>(ids.size());
  const index_t H = c.q_heads, Hkv = c.kv_heads, d = c.head_dim;
  for (int t = 0; t < steps; ++t)
    for (index_t l = 0; l < c.layers; ++l) {
      const auto L = static_cast<std::size_t>(l);
      const float* q = p.dq[L].data() + t * n * H * d;
      const float* k = p.dk[L].data() + t * n * Hkv * d;
      const float* v = p.dv[L].data() + t * n * Hkv * d;
      DeviceBuffer<float> dq(std::vector<float>(q, q + n * H * d)),
          dk(std::vector<float>(k, k + n * Hkv * d)), dv(std::vector<float>(v, v + n * Hkv * d));
      dev.decode(l, ids, dq.const_view(A3{n, H, d}), dk.const_view(A3{n, Hkv, d}),
                 dv.const_view(A3{n, Hkv, d}));
      for (index_t i = 0; i < n; ++i)
        host[static_cast<std::size_t>(i)]->decode(l, cake::make_view(q + i * H * d, A3{1, H, d}),
                                                  cake::make_view(k + i * Hkv * d, A3{1, Hkv, d}),
                                                  cake::make_view(v + i * Hkv * d, A3{1, Hkv, d}));
    }
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("RaggedKvCache on CUDA refuses slot_order::any when constructed, not at add()") {
    cake::CacheConfig c = ragged_config();
    c.paged_slots = cake::slot_order::any;
    CHECK_THROWS_WITH_AS(CudaRagged{c}, doctest::Contains("needs a backend with slot maps"),
                         cake::invalid_argument);
  }

  TEST_CASE("RaggedKvCache on CUDA equals each sequence alone on the host, whole and chunked") {
    const auto c = ragged_config();
    const index_t H = c.q_heads, Hkv = c.kv_heads, d = c.head_dim, w = c.window;
    // One prompt exactly the window, two evicted ones; cache sizes differ.
    const RaggedPrompt p = make_prompt(c, {16, 200, 131}, 2);
    const std::vector<cake::sequence_id> ids{3, 1, 2};
    const std::vector<index_t> sizes{80, 48, 100};
    for (bool chunked : {false, true}) {
      CAPTURE(chunked);
      CudaRagged dev(c, {}, {}, {}, cake::cuda);
      std::vector<std::unique_ptr<cake::KvCache<>>> host;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        dev.add(ids[i], {.cache_size = sizes[i], .prompt_length = chunked ? p.S[i] : 0});
        cake::CacheConfig one = c;
        one.cache_size = sizes[i];
        host.push_back(std::make_unique<cake::KvCache<>>(one));
      }
      for (index_t l = 0; l < c.layers; ++l) {
        const auto L = static_cast<std::size_t>(l);
        for (std::size_t i = 0; i < ids.size(); ++i) {
          const std::vector<float> qw = windows(c, p, l);
          host[i]->prefill(
              l,
              cake::make_view(static_cast<const float*>(qw.data()) + i * H * w * d, A4{1, H, w, d}),
              part(p.k[L], p, i, Hkv, d), part(p.v[L], p, i, Hkv, d));
        }
      }
      if (!chunked) {
        for (index_t l = 0; l < c.layers; ++l) {
          const auto L = static_cast<std::size_t>(l);
          const auto n = static_cast<index_t>(ids.size());
          DeviceBuffer<float> dq(windows(c, p, l)), dk(p.k[L]), dv(p.v[L]);
          dev.prefill(l, ids, dq.const_view(A4{n, H, w, d}), dk.const_view(A3{p.total, Hkv, d}),
                      dv.const_view(A3{p.total, Hkv, d}), p.cu);
        }
      } else {
        // Chunks of 37 tokens (the 16-token prompt in one): every sequence named while
        // its prompt lasts; the last chunks are shorter than the window.
        for (index_t at = 0; at < 200; at += 37)
          for (index_t l = 0; l < c.layers; ++l) {
            const auto L = static_cast<std::size_t>(l);
            std::vector<cake::sequence_id> call;
            std::vector<std::int32_t> cu{0};
            std::vector<float> q, k, v;
            for (std::size_t i = 0; i < ids.size(); ++i) {
              if (at >= p.S[i]) continue;
              const index_t b = p.cu[i] + at, e = p.cu[i] + std::min(p.S[i], at + 37);
              call.push_back(ids[i]);
              cu.push_back(cu.back() + static_cast<std::int32_t>(e - b));
              q.insert(q.end(), p.q[L].begin() + b * H * d, p.q[L].begin() + e * H * d);
              k.insert(k.end(), p.k[L].begin() + b * Hkv * d, p.k[L].begin() + e * Hkv * d);
              v.insert(v.end(), p.v[L].begin() + b * Hkv * d, p.v[L].begin() + e * Hkv * d);
            }
            const index_t tokens = cu.back();
            DeviceBuffer<float> dq(q), dk(k), dv(v);
            dev.prefill_chunk(l, call, dq.const_view(A3{tokens, H, d}),
                              dk.const_view(A3{tokens, Hkv, d}), dv.const_view(A3{tokens, Hkv, d}),
                              cu);
          }
      }
      for (std::size_t i = 0; i < ids.size(); ++i)
        require_same(*host[i], dev.sequence(ids[i]), "sequence " + std::to_string(ids[i]));
      decode_both(dev, host, c, p, ids, 2);
      for (std::size_t i = 0; i < ids.size(); ++i)
        require_same(*host[i], dev.sequence(ids[i]),
                     "sequence " + std::to_string(ids[i]) + ", decoded");
      CHECK(dev.tokens_held(1, 0) < 200);  // evicted
      // Bounded chunking runs on the host only.
      CHECK_THROWS_AS(dev.add(9, {.prompt_length = 40, .chunking = cake::chunk_eviction::bounded}),
                      cake::invalid_argument);
    }
  }
}
