// decode_step: one generated token through every layer: append its K and V and
// evict one token when the layer is over budget.
//   cake:  cake::KvCache::decode per layer (in-place slot reuse)
//   naive: the reference route: concatenate (rewrite) the cache, score all held
//          keys with a materialised softmax, pool, full std::sort of the
//          candidates, gather the kept rows into a fresh cache
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

constexpr index_t kTokens = 16;  // distinct decode tokens, cycled

struct DecodeTokens {
  index_t B, H, Hkv, d;
  std::vector<float> q, k, v;  // (kTokens, B, H, d), (kTokens, B, Hkv, d) x2
  DecodeTokens(const Shape& sh, index_t B_)
      : B(B_), H(sh.q_heads), Hkv(sh.kv_heads), d(sh.head_dim) {
    Rng g(77);
    q.resize(static_cast<std::size_t>(kTokens * B * H * d));
    k.resize(static_cast<std::size_t>(kTokens * B * Hkv * d));
    v.resize(k.size());
    for (auto& x : q) x = g.normal();
    for (auto& x : k) x = g.normal();
    for (auto& x : v) x = g.normal();
  }
  const float* qp(index_t t) const { return q.data() + (t % kTokens) * B * H * d; }
  const float* kp(index_t t) const { return k.data() + (t % kTokens) * B * Hkv * d; }
  const float* vp(index_t t) const { return v.data() + (t % kTokens) * B * Hkv * d; }
};

// One naive layer: rows of `held` tokens, rewritten at every step.
struct NaiveLayer {
  index_t rows, held, d;
  std::vector<float> k, v;
};

void naive_step(NaiveLayer& ly, const float* q, const float* kn, const float* vn, index_t H,
                index_t Hkv, index_t budget) {
  const index_t rows = ly.rows, n = ly.held + 1, d = ly.d, grp = H / Hkv;
  const index_t cand = n - window, keep = std::min(budget, cand), m = keep + window;
  // torch.cat: a new cache with the token appended
  std::vector<float> k2(static_cast<std::size_t>(rows * n * d)), v2(k2.size());
  std::vector<float> k3(static_cast<std::size_t>(rows * m * d)), v3(k3.size());
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t r = 0; r < rows; ++r) {
    std::memcpy(k2.data() + r * n * d, ly.k.data() + r * ly.held * d,
                static_cast<std::size_t>(ly.held * d) * sizeof(float));
    std::memcpy(v2.data() + r * n * d, ly.v.data() + r * ly.held * d,
                static_cast<std::size_t>(ly.held * d) * sizeof(float));
    std::memcpy(k2.data() + (r * n + n - 1) * d, kn + r * d,
                static_cast<std::size_t>(d) * sizeof(float));
    std::memcpy(v2.data() + (r * n + n - 1) * d, vn + r * d,
                static_cast<std::size_t>(d) * sizeof(float));
    // attention of each query head of the group over all held keys
    std::vector<float> a(static_cast<std::size_t>(grp * n)), sc(static_cast<std::size_t>(cand));
    const index_t b = r / Hkv, g = r % Hkv;
    for (index_t h = 0; h < grp; ++h) {
      const float* qr = q + (b * H + g * grp + h) * d;
      float* ar = a.data() + h * n;
      for (index_t j = 0; j < n; ++j) {
        const float* kr = k2.data() + (r * n + j) * d;
        float part[8] = {};
        for (index_t x = 0; x + 8 <= d; x += 8)
          for (int l = 0; l < 8; ++l) part[l] += qr[x + l] * kr[x + l];
        float s = 0;
        for (int l = 0; l < 8; ++l) s += part[l];
        ar[j] = s * inv_sqrt_d;
      }
      float mx = std::numeric_limits<float>::lowest(), sum = 0;
      for (index_t j = 0; j < n; ++j) mx = std::max(mx, ar[j]);
      for (index_t j = 0; j < n; ++j) sum += (ar[j] = naive_exp(ar[j] - mx));
      for (index_t j = 0; j < n; ++j) ar[j] /= sum;
    }
    // pool (kernel 5) each head's candidate scores, then the group mean
    for (index_t j = 0; j < cand; ++j) {
      float acc = 0;
      for (index_t h = 0; h < grp; ++h)
        for (index_t t = -2; t <= 2; ++t)
          if (j + t >= 0 && j + t < cand) acc += a[static_cast<std::size_t>(h * n + j + t)];
      sc[static_cast<std::size_t>(j)] = acc / (5.0f * static_cast<float>(grp));
    }
    std::vector<index_t> idx(static_cast<std::size_t>(cand));
    for (index_t j = 0; j < cand; ++j) idx[static_cast<std::size_t>(j)] = j;
    std::sort(idx.begin(), idx.end(), [&](index_t x, index_t y) {
      return sc[static_cast<std::size_t>(x)] > sc[static_cast<std::size_t>(y)] ||
             (sc[static_cast<std::size_t>(x)] == sc[static_cast<std::size_t>(y)] && x < y);
    });
    for (index_t t = 0; t < m; ++t) {
      const index_t j = t < keep ? idx[static_cast<std::size_t>(t)] : cand + (t - keep);
      std::memcpy(k3.data() + (r * m + t) * d, k2.data() + (r * n + j) * d,
                  static_cast<std::size_t>(d) * sizeof(float));
      std::memcpy(v3.data() + (r * m + t) * d, v2.data() + (r * n + j) * d,
                  static_cast<std::size_t>(d) * sizeof(float));
    }
  }
  ly.k.swap(k3);
  ly.v.swap(v3);
  ly.held = m;
}

void add_case(const Shape& sh, index_t B, index_t C) {
  const std::string args =
      std::string(sh.name) + "/B:" + std::to_string(B) + "/C:" + std::to_string(C);
  const index_t S = 2 * C + 64;  // prompt longer than the cache, so prefill cuts
  const index_t H = sh.q_heads, Hkv = sh.kv_heads, d = sh.head_dim, L = sh.layers;
  auto counters = [=](benchmark::State& st) {
    st.SetItemsProcessed(st.iterations() * L);  // layers stepped
    // bytes the step must read at least: every held key once
    st.SetBytesProcessed(st.iterations() * L * B * Hkv * C * d *
                         static_cast<index_t>(sizeof(float)));
  };
  add(name("decode_step", "cake", args),
      [=](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        cake::CacheConfig cfg{};
        cfg.layers = L;
        cfg.batch = B;
        cfg.q_heads = H;
        cfg.kv_heads = Hkv;
        cfg.head_dim = d;
        cfg.window = window;
        cfg.cache_size = C;
        cake::KvCache<> cache(cfg);
        for (index_t l = 0; l < L; ++l) cache.prefill(l, in.qv(), in.kv(), in.vv());
        const DecodeTokens tok(sh, B);
        index_t t = 0;
        for (auto _ : st) {
          for (index_t l = 0; l < L; ++l)
            cache.decode(l, cake::make_view(tok.qp(t), std::array<index_t, 3>{B, H, d}),
                         cake::make_view(tok.kp(t), std::array<index_t, 3>{B, Hkv, d}),
                         cake::make_view(tok.vp(t), std::array<index_t, 3>{B, Hkv, d}));
          ++t;
          benchmark::DoNotOptimize(cache.tokens_held(L - 1));
        }
        counters(st);
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
  add(name("decode_step", "naive", args),
      [=](benchmark::State& st) {
        const LayerInputs& in = layer_inputs(sh, B, S);
        std::vector<NaiveLayer> layers(static_cast<std::size_t>(L));
        for (auto& ly : layers) {  // C tokens held per layer: the last C of the prompt
          ly.rows = B * Hkv;
          ly.held = C;
          ly.d = d;
          ly.k.resize(static_cast<std::size_t>(ly.rows * C * d));
          ly.v.resize(ly.k.size());
          for (index_t r = 0; r < ly.rows; ++r) {
            std::memcpy(ly.k.data() + r * C * d, in.k.data() + (r * S + S - C) * d,
                        static_cast<std::size_t>(C * d) * sizeof(float));
            std::memcpy(ly.v.data() + r * C * d, in.v.data() + (r * S + S - C) * d,
                        static_cast<std::size_t>(C * d) * sizeof(float));
          }
        }
        const DecodeTokens tok(sh, B);
        index_t t = 0;
        for (auto _ : st) {
          for (auto& ly : layers)
            naive_step(ly, tok.qp(t), tok.kp(t), tok.vp(t), H, Hkv, C - window);
          ++t;
          benchmark::DoNotOptimize(layers.back().k.data());
        }
        counters(st);
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_decode() {
  if (full_matrix()) {
    for (const Shape& sh : all_shapes)
      for (index_t B : {1, 4})
        for (index_t C : {128, 1024, 2048}) add_case(sh, B, C);
    return;
  }
  for (index_t C : {128, 1024, 2048}) add_case(llama, 1, C);
  add_case(llama, 4, 1024);
  add_case(qwen, 1, 1024);
  add_case(small, 1, 1024);
}

}  // namespace cake_bench
