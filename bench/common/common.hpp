// Shared pieces of the cake benchmarks: model shapes, synthetic but realistic
// inputs (generated once, outside the timed region), the measured memory
// bandwidth ceiling, and naming helpers.
#pragma once

#include <benchmark/benchmark.h>

#include <cake/cake.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace cake_bench {

using cake::index_t;

struct Shape {
  const char* name;
  index_t layers, q_heads, kv_heads, head_dim;
};

inline constexpr Shape llama{"llama3.1-8b", 32, 32, 8, 128};
inline constexpr Shape qwen{"qwen2.5-7b", 28, 28, 4, 128};
inline constexpr Shape small{"small", 30, 9, 3, 64};
inline constexpr std::array<Shape, 3> all_shapes{llama, qwen, small};
inline constexpr index_t window = 32;

// Set by main: run the full matrix (--cake_full or CAKE_BENCH_FULL=1).
bool full_matrix();

// Threads every implementation (ours and the baselines) may use.
inline int threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Bandwidth of a large multi-threaded memcpy on this machine, in bytes moved
// (read + write) per second; measured once, at start-up.
double memcpy_bandwidth();

// Single-precision FMA peak of the benchmark's threads on this machine (independent
// fused multiply-adds on the widest vectors the CPU has), in FLOP per second;
// measured once, at start-up.
double fma_peak_flops();

// ---------------------------------------------------------------- random data

// splitmix64: fast, seedable, identical on every platform.
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  // Irwin-Hall approximation of N(0, 1): plenty for benchmark inputs.
  float normal() {
    float s4 = uniform() + uniform() + uniform() + uniform();
    return (s4 - 2.0f) * 1.7320508f;
  }
};

// Token structure shared by queries and keys, so that window attention looks like
// a real model's: attention sinks (the first 4 tokens), a recency ramp, and
// sparse "heavy hitters". Returns the logit bias of token j.
inline float token_bias(index_t j, index_t S, std::uint64_t hh_seed) {
  if (j < 4) return 6.0f;
  float b = 3.0f * std::exp(-static_cast<float>(S - 1 - j) / 256.0f);
  Rng r(hh_seed ^ static_cast<std::uint64_t>(j) * 0x2545F4914F6CDD1Dull);
  if (r.uniform() < 0.02f) b += 2.5f + 2.0f * r.uniform();
  return b;
}

// One layer's prefill inputs, row-major:
//   q: (B, H, w, d)   k, v: (B, Hkv, S, d)
// q . k / sqrt(d) ~ N(0, 1) noise + token_bias(j) * head_scale(h).
struct LayerInputs {
  index_t B = 0, H = 0, Hkv = 0, S = 0, d = 0, w = window;
  std::vector<float> q, k, v;
  auto qv() const { return cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}); }
  auto kv() const { return cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
  auto vv() const { return cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
  std::size_t kv_bytes() const { return k.size() * sizeof(float); }
};

inline void fill_keys(std::vector<float>& k, index_t B, index_t Hkv, index_t S, index_t d,
                      std::uint64_t seed, bool values) {
  k.resize(static_cast<std::size_t>(B * Hkv * S * d));
  // The shared direction u has |u|^2 = sqrt(d), so bias * scale * |u|^2 / sqrt(d)
  // adds bias * scale to the logit.
  const float u = std::pow(static_cast<float>(d), -0.25f);
#pragma omp parallel for schedule(static)
  for (index_t row = 0; row < B * Hkv * S; ++row) {
    const index_t j = row % S;
    Rng r(seed * 1000003ull + static_cast<std::uint64_t>(row));
    const float bias = values ? 0.0f : token_bias(j, S, seed);
    float* p = k.data() + row * d;
    for (index_t x = 0; x < d; ++x) p[x] = r.normal() + bias * u;
  }
}

inline void fill_queries(std::vector<float>& q, index_t B, index_t H, index_t w, index_t d,
                         std::uint64_t seed, float temperature) {
  q.resize(static_cast<std::size_t>(B * H * w * d));
  const float u = std::pow(static_cast<float>(d), -0.25f);
  Rng r(seed);
  for (index_t bh = 0; bh < B * H; ++bh) {
    const float scale = temperature * (0.5f + r.uniform());  // per-head sharpness
    for (index_t i = 0; i < w; ++i) {
      float* p = q.data() + (bh * w + i) * d;
      for (index_t x = 0; x < d; ++x) p[x] = r.normal() + scale * u;
    }
  }
}

// The most recently requested inputs are kept, so a group of benchmarks on one
// shape pays for generation once; at most one large set lives at a time.
inline const LayerInputs& layer_inputs(const Shape& sh, index_t B, index_t S) {
  static std::unique_ptr<LayerInputs> cur;
  static std::tuple<const char*, index_t, index_t> key{nullptr, 0, 0};
  if (!cur || key != std::make_tuple(sh.name, B, S)) {
    cur.reset();
    auto in = std::make_unique<LayerInputs>();
    in->B = B;
    in->H = sh.q_heads;
    in->Hkv = sh.kv_heads;
    in->S = S;
    in->d = sh.head_dim;
    fill_queries(in->q, B, sh.q_heads, window, sh.head_dim, 7, 1.0f);
    fill_keys(in->k, B, sh.kv_heads, S, sh.head_dim, 11, false);
    fill_keys(in->v, B, sh.kv_heads, S, sh.head_dim, 13, true);
    cur = std::move(in);
    key = std::make_tuple(sh.name, B, S);
  }
  return *cur;
}

// Indicator-like scores (rows, n): sinks, recency, heavy hitters, log-normal noise.
inline std::vector<float> indicator_scores(index_t rows, index_t n, std::uint64_t seed) {
  std::vector<float> s(static_cast<std::size_t>(rows * n));
  for (index_t r = 0; r < rows; ++r) {
    Rng g(seed + static_cast<std::uint64_t>(r));
    for (index_t j = 0; j < n; ++j)
      s[static_cast<std::size_t>(r * n + j)] =
          1e-4f * std::exp(token_bias(j, n, seed + static_cast<std::uint64_t>(r)) + g.normal());
  }
  return s;
}

// ---------------------------------------------------------------- naming

inline std::string name(const std::string& op, const std::string& impl, const std::string& args) {
  return op + "/" + impl + "/" + args;
}
inline std::string shape_args(const Shape& sh, index_t B, index_t S) {
  return std::string(sh.name) + "/B:" + std::to_string(B) + "/S:" + std::to_string(S);
}

// Registers a benchmark measured in wall-clock time (the work is multi-threaded).
template <class F>
benchmark::internal::Benchmark* add(const std::string& n, F&& f) {
  return benchmark::RegisterBenchmark(n.c_str(), std::forward<F>(f))
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

// bytes_per_second and bw_fraction (of the measured memcpy bandwidth) for an op
// that moves `bytes` (read + write) per iteration.
inline void set_bandwidth(benchmark::State& st, double bytes) {
  st.SetBytesProcessed(static_cast<std::int64_t>(bytes * static_cast<double>(st.iterations())));
  st.counters["bw_fraction"] =
      benchmark::Counter(bytes / memcpy_bandwidth() * static_cast<double>(st.iterations()),
                         benchmark::Counter::kIsRate);
}

// A softmax exp that is honest for the naive route: std::exp, as a framework's
// element-wise kernel would compute it.
inline float naive_exp(float x) { return std::exp(x); }

// ---------------------------------------------------------------- naive route

// The reference route for one layer's statistics: repeat K for every query head,
// materialise the [B,H,w,S] scores, masked softmax, then entropy, variance,
// indicator, pooling and the GQA mean as separate passes over the materialised
// attention. Writes ind (B, Hkv, S-w) and stats {entropy, variance}.
// The dot product is written with 8 independent partial sums so that it
// vectorises: a fair baseline, not a crippled one.
struct NaiveStats {
  std::vector<float> kexp;   // (B, H, S, d): K repeated for every query head
  std::vector<float> attn;   // (B, H, w, S)
  std::vector<float> ind_h;  // (B, H, S-w)

  void run(const LayerInputs& in, float gamma, int kernel, std::vector<float>& ind,
           double stats[2]) {
    const index_t B = in.B, H = in.H, Hkv = in.Hkv, S = in.S, d = in.d, w = in.w, n = H / Hkv;
    const index_t P = S - w;
    kexp.resize(static_cast<std::size_t>(B * H * S * d));
    attn.resize(static_cast<std::size_t>(B * H * w * S));
    ind_h.resize(static_cast<std::size_t>(B * H * P));
    ind.resize(static_cast<std::size_t>(B * Hkv * P));
    // repeat_kv
#pragma omp parallel for schedule(static)
    for (index_t bh = 0; bh < B * H; ++bh) {
      const index_t b = bh / H, g = (bh % H) / n;
      std::memcpy(kexp.data() + bh * S * d, in.k.data() + (b * Hkv + g) * S * d,
                  static_cast<std::size_t>(S * d) * sizeof(float));
    }
    const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
    // scores = Q K^T / sqrt(d) + causal mask
#pragma omp parallel for schedule(static)
    for (index_t bhi = 0; bhi < B * H * w; ++bhi) {
      const index_t bh = bhi / w, i = bhi % w;
      const float* q = in.q.data() + bhi * d;
      const float* kb = kexp.data() + bh * S * d;
      float* a = attn.data() + bhi * S;
      for (index_t j = 0; j < S; ++j) {
        const float* k = kb + j * d;
        float part[8] = {};
        for (index_t x = 0; x + 8 <= d; x += 8)
          for (int l = 0; l < 8; ++l) part[l] += q[x + l] * k[x + l];
        float s = 0;
        for (int l = 0; l < 8; ++l) s += part[l];
        a[j] = j > P + i ? std::numeric_limits<float>::lowest() : s * inv_sqrt_d;
      }
    }
    // softmax along keys
#pragma omp parallel for schedule(static)
    for (index_t row = 0; row < B * H * w; ++row) {
      float* a = attn.data() + row * S;
      float m = std::numeric_limits<float>::lowest();
      for (index_t j = 0; j < S; ++j) m = std::max(m, a[j]);
      float sum = 0;
      for (index_t j = 0; j < S; ++j) sum += (a[j] = naive_exp(a[j] - m));
      for (index_t j = 0; j < S; ++j) a[j] /= sum;
    }
    // entropy, variance, indicator per head over the prefix columns
    double ent = 0, var = 0;
#pragma omp parallel for schedule(static) reduction(+ : ent, var)
    for (index_t bh = 0; bh < B * H; ++bh) {
      const float* a = attn.data() + bh * w * S;
      float* o = ind_h.data() + bh * P;
      for (index_t i = 0; i < w; ++i)
        for (index_t j = 0; j < P; ++j) ent -= a[i * S + j] * std::log(a[i * S + j] + 1e-10f);
      for (index_t j = 0; j < P; ++j) {
        float mean = 0;
        for (index_t i = 0; i < w; ++i) mean += a[i * S + j];
        mean /= static_cast<float>(w);
        float m2 = 0;
        for (index_t i = 0; i < w; ++i) m2 += (a[i * S + j] - mean) * (a[i * S + j] - mean);
        const float v = m2 / static_cast<float>(w - 1);
        var += v;
        o[j] = mean + gamma * v;
      }
    }
    stats[0] = ent;
    stats[1] = var;
    // avg pool (kernel, zero padding, divide by kernel), then mean over the group
    const index_t half = kernel / 2;
#pragma omp parallel for schedule(static)
    for (index_t bg = 0; bg < B * Hkv; ++bg) {
      float* o = ind.data() + bg * P;
      for (index_t j = 0; j < P; ++j) o[j] = 0;
      for (index_t r = 0; r < n; ++r) {
        const float* src = ind_h.data() + (bg * n + r) * P;
        for (index_t j = 0; j < P; ++j) {
          float acc = 0;
          for (index_t t = -half; t <= half; ++t)
            if (j + t >= 0 && j + t < P) acc += src[j + t];
          o[j] += acc / static_cast<float>(kernel);
        }
      }
      for (index_t j = 0; j < P; ++j) o[j] /= static_cast<float>(n);
    }
  }
};

// Full std::sort of each row's indices by descending score; the first k are kept.
inline void naive_topk_sort(const float* scores, index_t rows, index_t n, index_t k,
                            std::vector<index_t>& out, std::vector<std::vector<index_t>>& tmp) {
  out.resize(static_cast<std::size_t>(rows * k));
  tmp.resize(static_cast<std::size_t>(rows));
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t r = 0; r < rows; ++r) {
    auto& idx = tmp[static_cast<std::size_t>(r)];
    idx.resize(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) idx[static_cast<std::size_t>(j)] = j;
    const float* x = scores + r * n;
    std::sort(idx.begin(), idx.end(),
              [x](index_t a, index_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    std::copy(idx.begin(), idx.begin() + k, out.begin() + r * k);
  }
}

}  // namespace cake_bench
