// cake_eval's core: run eviction methods at equal memory on a workload and
// measure how far the attention output of held-out later queries moves from
// the full cache's.
//
//   attention_output(q, k, v)   softmax(q . K^T / sqrt(d)) V per (batch, head, query);
//                               GQA: query head h reads KV head h / (H / Hkv)
//   mean_rel_l2_error(a, full)  mean over (batch, head, query) of ||a - full|| / ||full||
//   evaluate(workload, sizes)   every method x cache size: prefill a KvCache, then the
//                               error per layer, its mean over layers, tokens held;
//                               with Workload::chunk, the prompt goes in chunks through
//                               the method's RaggedKvCache (exact or bounded chunking)
//
// Header-only so that the doctest suite can check it directly.
#pragma once

#include <cake/cake.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace cake_eval {

using cake::index_t;
using cview4 = cake::host_view<const float, 4>;
using cview3 = cake::host_view<const float, 3>;

// ---- the error measure -------------------------------------------------------

// q: (B, H, nq, d); k, v: (B, Hkv, N, d). Returns (B, H, nq, d) row-major, in double.
// Scores and softmax are computed in double so that the measure adds no noise of
// its own; N = 0 gives zeros. lengths, when not empty, is (B * Hkv): row (b, g)
// attends to its first lengths[b * Hkv + g] tokens only (a head-wise cache's rows).
template <class QV, class KV, class VV>
std::vector<double> attention_output(const QV& q, const KV& k, const VV& v,
                                     const std::vector<index_t>& lengths = {}) {
  const index_t B = q.extent(0), H = q.extent(1), nq = q.extent(2), d = q.extent(3);
  const index_t Hkv = k.extent(1), N = k.extent(2);
  if (!lengths.empty() && static_cast<index_t>(lengths.size()) != B * Hkv)
    throw std::invalid_argument("cake_eval: attention_output: lengths must be (B * Hkv)");
  if (k.extent(0) != B || v.extent(0) != B || v.extent(1) != Hkv || v.extent(2) != N ||
      k.extent(3) != d || v.extent(3) != d || Hkv < 1 || H % Hkv != 0)
    throw std::invalid_argument("cake_eval: attention_output: q, k, v shapes do not match");
  const index_t n = H / Hkv;
  const index_t qs = d > 1 ? static_cast<index_t>(q.stride(3)) : 1;  // along head_dim
  const index_t ks = d > 1 ? static_cast<index_t>(k.stride(3)) : 1;
  const index_t vs = d > 1 ? static_cast<index_t>(v.stride(3)) : 1;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(static_cast<std::size_t>(B * H * nq * d), 0.0);
  std::vector<double> s(static_cast<std::size_t>(N));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t g = h / n;
      const index_t N_row =
          lengths.empty() ? N : std::min(N, lengths[static_cast<std::size_t>(b * Hkv + g)]);
      s.resize(static_cast<std::size_t>(N_row));
      for (index_t i = 0; i < nq; ++i) {
        if (N_row == 0) continue;
        const auto* qp = &q(b, h, i, 0);
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t t = 0; t < N_row; ++t) {
          const auto* kp = &k(b, g, t, 0);
          double dot = 0.0;
          for (index_t x = 0; x < d; ++x)
            dot += static_cast<double>(qp[x * qs]) * static_cast<double>(kp[x * ks]);
          s[static_cast<std::size_t>(t)] = dot * scale;
          mx = std::max(mx, dot * scale);
        }
        double den = 0.0;
        for (auto& e : s) {
          e = std::exp(e - mx);
          den += e;
        }
        double* o = out.data() + ((b * H + h) * nq + i) * d;
        for (index_t t = 0; t < N_row; ++t) {
          const double a = s[static_cast<std::size_t>(t)] / den;
          const auto* vp = &v(b, g, t, 0);
          for (index_t x = 0; x < d; ++x) o[x] += a * static_cast<double>(vp[x * vs]);
        }
      }
    }
  return out;
}

// Mean over rows of length d of ||a - full|| / ||full||. A row whose full output
// is exactly zero counts as 0 if a matches it and 1 otherwise.
inline double mean_rel_l2_error(const std::vector<double>& a, const std::vector<double>& full,
                                index_t d) {
  if (a.size() != full.size() || d < 1 || full.size() % static_cast<std::size_t>(d) != 0)
    throw std::invalid_argument("cake_eval: mean_rel_l2_error: sizes do not match");
  const std::size_t rows = full.size() / static_cast<std::size_t>(d);
  if (rows == 0) return 0.0;
  double sum = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    double num = 0.0, den = 0.0;
    for (std::size_t x = 0; x < static_cast<std::size_t>(d); ++x) {
      const std::size_t i = r * static_cast<std::size_t>(d) + x;
      num += (a[i] - full[i]) * (a[i] - full[i]);
      den += full[i] * full[i];
    }
    sum += den > 0.0 ? std::sqrt(num / den) : (num > 0.0 ? 1.0 : 0.0);
  }
  return sum / static_cast<double>(rows);
}

// ---- workloads ----------------------------------------------------------------

// One layer's inputs: the prefill window queries, the whole prompt's keys and
// values, and queries that come after the prompt (held out from the prefill).
struct LayerInput {
  std::vector<float> q_window;  // (B, H, w, d)
  std::vector<float> k, v;      // (B, Hkv, S, d)
  std::vector<float> q_held;    // (B, H, nq, d)
  std::vector<float> q_all;     // (B, H, S, d): every prompt query, for chunked prefill
};

struct Workload {
  std::string name;
  std::string held_source;  // where the held-out queries come from, for the report
  index_t batch = 1, layers = 0, q_heads = 0, kv_heads = 0, head_dim = 0, seq_len = 0;
  index_t window = 32, held_queries = 0;
  float tau1 = 1.0f, tau2 = 1.0f, gamma = 200.0f;  // CAKE's hyperparameters on this workload
  bool cascade = true;
  // Chunked prefill: chunks of `chunk` tokens (0: the whole prompt at once); needs
  // LayerInput::q_all and batch 1.
  index_t chunk = 0;
  cake::chunk_eviction chunking = cake::chunk_eviction::bounded;
  std::function<LayerInput(index_t)> layer;  // called once per layer, in order
};

// ---- methods ------------------------------------------------------------------

// A KvCache of any policy composition behind one interface.
struct CacheRunner {
  virtual ~CacheRunner() = default;
  virtual void prefill(index_t layer, cview4 q, cview4 k, cview4 v) = 0;
  // Chunked runners: the next chunk of the layer, q (n, H, d), k and v (n, Hkv, d).
  virtual void prefill_chunk(index_t, cview3, cview3, cview3) {
    throw std::logic_error("cake_eval: this runner takes whole prompts");
  }
  virtual cview4 keys(index_t layer) const = 0;
  virtual cview4 values(index_t layer) const = 0;
  virtual index_t tokens_held(index_t layer) const = 0;
  virtual index_t tokens_held() const = 0;
  virtual std::vector<index_t> row_lengths(index_t layer) const = 0;
};

template <class Cache>
struct CacheRunnerOf final : CacheRunner {
  Cache cache;
  template <class... A>
  explicit CacheRunnerOf(A&&... a) : cache(std::forward<A>(a)...) {}
  void prefill(index_t l, cview4 q, cview4 k, cview4 v) override { cache.prefill(l, q, k, v); }
  cview4 keys(index_t l) const override { return cache.keys(l); }
  cview4 values(index_t l) const override { return cache.values(l); }
  index_t tokens_held(index_t l) const override { return cache.tokens_held(l); }
  index_t tokens_held() const override { return cache.tokens_held(); }
  std::vector<index_t> row_lengths(index_t l) const override { return cache.row_lengths(l); }
};

// The same composition as a RaggedKvCache of one sequence fed by chunks.
template <class Cache>
struct ChunkedRunnerOf final : CacheRunner {
  cake::RaggedKvCacheOf<Cache> ragged;
  template <class... A>
  ChunkedRunnerOf(const cake::CacheConfig& c, const Workload& w, A&&... a)
      : ragged(c, std::forward<A>(a)...) {
    ragged.add(0, {.prompt_length = w.seq_len, .chunking = w.chunking});
  }
  void prefill(index_t, cview4, cview4, cview4) override {
    throw std::logic_error("cake_eval: a chunked runner takes chunks");
  }
  void prefill_chunk(index_t l, cview3 q, cview3 k, cview3 v) override {
    const std::int32_t cu[2] = {0, static_cast<std::int32_t>(k.extent(0))};
    const cake::sequence_id id = 0;
    ragged.prefill_chunk(l, std::span(&id, 1), q, k, v, cu);
  }
  cview4 keys(index_t l) const override { return ragged.keys(0, l); }
  cview4 values(index_t l) const override { return ragged.values(0, l); }
  index_t tokens_held(index_t l) const override { return ragged.tokens_held(0, l); }
  index_t tokens_held() const override { return ragged.sequence(0).tokens_held(); }
  std::vector<index_t> row_lengths(index_t l) const override {
    return ragged.sequence(0).row_lengths(l);
  }
};

using MakeRunner =
    std::function<std::unique_ptr<CacheRunner>(const cake::CacheConfig&, const Workload&)>;

struct Method {
  std::string name;
  std::string description;
  MakeRunner make;
  MakeRunner make_chunked;  // the same policies over chunks (Workload::chunk)
};

// Every method of cake/methods.hpp (and the ablation), all at the same cache size C.
// CAKE's hyperparameters come from the workload; the others use their defaults.
inline std::vector<Method> default_methods() {
  using namespace cake;
  namespace m = cake::methods;
  struct Runners {
    MakeRunner whole, chunked;
  };
  const auto make = []<class Cache>(auto... policies) {
    return Runners{[=](const CacheConfig& c, const Workload& w) -> std::unique_ptr<CacheRunner> {
                     return std::make_unique<CacheRunnerOf<Cache>>(c, policies(w)...);
                   },
                   [=](const CacheConfig& c, const Workload& w) -> std::unique_ptr<CacheRunner> {
                     return std::make_unique<ChunkedRunnerOf<Cache>>(c, w, policies(w)...);
                   }};
  };
  std::vector<Method> out;
  const auto add = [&](std::string name, std::string description, Runners r) {
    out.push_back(
        {std::move(name), std::move(description), std::move(r.whole), std::move(r.chunked)});
  };
  const auto cake_pref = [](const Workload& w) { return CakePreference{w.tau1, w.tau2}; };
  const auto cake_ind = [](const Workload& w) { return MeanVarianceIndicator{w.gamma, 5}; };
  const auto uniform_pref = [](const Workload&) { return UniformPreference{}; };
  const auto proportional = [](const Workload&) { return ProportionalBudget{}; };
  const auto uniform = [](const Workload&) { return UniformBudget{}; };
  const auto headwise_prop = [](const Workload&) { return HeadwiseBudget<ProportionalBudget>{}; };
  add("cake", "CakePreference{tau1,tau2} + ProportionalBudget + MeanVarianceIndicator{gamma}",
      make.template operator()<m::Cake<>>(cake_pref, proportional, cake_ind));
  add("snapkv", "UniformPreference + UniformBudget + WindowMeanIndicator",
      make.template operator()<m::SnapKv<>>());
  add("pyramidkv", "UniformPreference + PyramidBudget{beta=20} + WindowMeanIndicator",
      make.template operator()<m::PyramidKv<>>());
  add("streamingllm", "UniformPreference + UniformBudget + SinkRecencyIndicator{sinks=4}",
      make.template operator()<m::StreamingLlm<>>());
  add("h2o", "UniformPreference + UniformBudget + AccumulatedIndicator",
      make.template operator()<m::H2o<>>());
  add("tova", "UniformPreference + UniformBudget + LastQueryIndicator",
      make.template operator()<m::Tova<>>());
  add("ada_snapkv",
      "UniformPreference + HeadwiseBudget<UniformBudget>{min_share=0.2} + "
      "WindowMeanIndicator",
      make.template operator()<m::AdaSnapKv<>>());
  add("cake_adakv",
      "CakePreference{tau1,tau2} + HeadwiseBudget<ProportionalBudget>{min_share=0.2} + "
      "MeanVarianceIndicator{gamma}",
      make.template operator()<m::CakeAdaKv<>>(cake_pref, headwise_prop, cake_ind));
  add("cake_uniform_budget",
      "UniformPreference + UniformBudget + MeanVarianceIndicator{gamma} (ablation)",
      make.template operator()<KvCache<UniformPreference, UniformBudget, MeanVarianceIndicator>>(
          uniform_pref, uniform, cake_ind));
  return out;
}

// The cache sizes of the issue, less those the workload cannot distinguish from
// the full cache (C >= S) or the cache cannot hold (C <= w).
inline std::vector<index_t> default_sizes(const Workload& w, const std::vector<index_t>& sizes = {
                                                                 64, 128, 256, 512, 1024}) {
  std::vector<index_t> out;
  for (index_t c : sizes)
    if (c < w.seq_len && c > w.window) out.push_back(c);
  return out;
}

// ---- evaluation ---------------------------------------------------------------

struct Cell {
  std::string method;
  index_t cache_size = 0;
  std::vector<double> layer_error;    // per layer
  double mean_error = 0.0;            // over layers
  std::vector<index_t> layer_tokens;  // tokens held per (batch, kv-head) row, per layer
  index_t tokens_held = 0;            // summed over layers
};

struct Result {
  Workload workload;  // its layer function is dropped
  std::vector<std::string> methods;
  std::vector<index_t> sizes;
  std::vector<Cell> cells;  // method-major, then size
  double seconds = 0.0;
};

// Feeds every layer once to every (method, C) cache, then compares the held-out
// queries' attention output over what each cache holds with the full prompt's.
inline Result evaluate(const Workload& wl, const std::vector<index_t>& sizes,
                       const std::vector<Method>& methods = default_methods()) {
  using A4 = std::array<index_t, 4>;
  const index_t B = wl.batch, L = wl.layers, H = wl.q_heads, Hkv = wl.kv_heads, d = wl.head_dim,
                S = wl.seq_len, w = wl.window, nq = wl.held_queries;
  if (!wl.layer) throw std::invalid_argument("cake_eval: workload '" + wl.name + "' has no data");
  if (nq < 1)
    throw std::invalid_argument("cake_eval: workload '" + wl.name + "' has no held-out queries");
  const bool chunked = wl.chunk > 0;
  if (chunked && B != 1)
    throw std::invalid_argument("cake_eval: chunked prefill is evaluated with batch 1");

  std::vector<std::unique_ptr<CacheRunner>> runners;
  for (const auto& m : methods)
    for (index_t c : sizes) {
      cake::CacheConfig cfg;
      cfg.layers = L;
      cfg.batch = B;
      cfg.q_heads = H;
      cfg.kv_heads = Hkv;
      cfg.head_dim = d;
      cfg.window = w;
      cfg.cache_size = c;
      cfg.cascade = wl.cascade;
      runners.push_back(chunked ? m.make_chunked(cfg, wl) : m.make(cfg, wl));
    }

  std::vector<std::vector<float>> q_held(static_cast<std::size_t>(L));
  std::vector<std::vector<double>> full(static_cast<std::size_t>(L));
  std::vector<LayerInput> inputs;  // chunked: every layer's, to feed chunk by chunk
  for (index_t l = 0; l < L; ++l) {
    LayerInput in = wl.layer(l);
    const auto sz = [](const std::vector<float>& x) { return static_cast<index_t>(x.size()); };
    if (sz(in.q_window) != B * H * w * d || sz(in.k) != B * Hkv * S * d ||
        sz(in.v) != B * Hkv * S * d || sz(in.q_held) != B * H * nq * d)
      throw std::invalid_argument("cake_eval: workload '" + wl.name + "' layer " +
                                  std::to_string(l) + " has the wrong sizes");
    const cview4 qw =
        cake::make_view(static_cast<const float*>(in.q_window.data()), A4{B, H, w, d});
    const cview4 k = cake::make_view(static_cast<const float*>(in.k.data()), A4{B, Hkv, S, d});
    const cview4 v = cake::make_view(static_cast<const float*>(in.v.data()), A4{B, Hkv, S, d});
    const cview4 qh = cake::make_view(static_cast<const float*>(in.q_held.data()), A4{B, H, nq, d});
    full[static_cast<std::size_t>(l)] = attention_output(qh, k, v);
    q_held[static_cast<std::size_t>(l)] = std::move(in.q_held);
    if (chunked) {
      if (sz(in.q_all) != H * S * d)
        throw std::invalid_argument("cake_eval: workload '" + wl.name +
                                    "' has no queries for every position (chunked prefill)");
      inputs.push_back(std::move(in));
    } else {
      for (auto& r : runners) r->prefill(l, qw, k, v);
    }
  }
  // Chunk c through every layer, then chunk c + 1, as engines do; the (H, S, d) and
  // (Hkv, S, d) buffers are read as the packed (tokens, heads, d) a chunk is.
  using A3 = std::array<index_t, 3>;
  for (index_t at = 0; chunked && at < S; at += wl.chunk) {
    const index_t n = std::min(wl.chunk, S - at);
    for (index_t l = 0; l < L; ++l) {
      const LayerInput& in = inputs[static_cast<std::size_t>(l)];
      const cview3 q = cake::make_view(static_cast<const float*>(in.q_all.data()) + at * d,
                                       A3{n, H, d}, A3{d, S * d, 1});
      const cview3 k = cake::make_view(static_cast<const float*>(in.k.data()) + at * d,
                                       A3{n, Hkv, d}, A3{d, S * d, 1});
      const cview3 v = cake::make_view(static_cast<const float*>(in.v.data()) + at * d,
                                       A3{n, Hkv, d}, A3{d, S * d, 1});
      for (auto& r : runners) r->prefill_chunk(l, q, k, v);
    }
  }

  Result res;
  res.workload = wl;
  res.workload.layer = nullptr;
  for (const auto& m : methods) res.methods.push_back(m.name);
  res.sizes = sizes;
  std::size_t r = 0;
  for (const auto& m : methods)
    for (index_t c : sizes) {
      const CacheRunner& run = *runners[r++];
      Cell cell;
      cell.method = m.name;
      cell.cache_size = c;
      double sum = 0.0;
      for (index_t l = 0; l < L; ++l) {
        const cview4 qh = cake::make_view(
            static_cast<const float*>(q_held[static_cast<std::size_t>(l)].data()), A4{B, H, nq, d});
        const auto out = attention_output(qh, run.keys(l), run.values(l), run.row_lengths(l));
        const double e = mean_rel_l2_error(out, full[static_cast<std::size_t>(l)], d);
        cell.layer_error.push_back(e);
        cell.layer_tokens.push_back(run.tokens_held(l));
        sum += e;
      }
      cell.mean_error = sum / static_cast<double>(L);
      cell.tokens_held = run.tokens_held();
      res.cells.push_back(std::move(cell));
    }
  return res;
}

}  // namespace cake_eval
