// storage16_prefill, storage16_decode: a KvCache holding K and V as 16-bit values
// (cake::bfloat16, _Float16) next to one holding float, fed the same values (the
// inputs rounded to the 16-bit type, widened back for the float cache), so that both
// keep the same tokens and do the same work.
//   cake:  KvCache<..., T> with T = bf16 or half (the args say which); queries of T
//   float: KvCache<..., float> on the same values
// storage16_prefill: one layer's whole prefill eviction (reset, then prefill of a
//   1-layer cache: statistics, top-k, gather of the kept K and V into the cache).
// storage16_decode: one decoding step of that layer at steady state (append, score,
//   evict one).
// Both report ns_per_token_held: wall time over the tokens the layer holds after the
// call (every (batch, kv-head) row), equal for both caches; ratio float / cake above
// 1: the 16-bit cache is faster.
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

template <class T>
std::vector<T> rounded(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<T>(x[i]);
  return out;
}
template <class T>
std::vector<float> widened(const std::vector<T>& x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(x[i]);
  return out;
}

constexpr index_t kTokens = 16;  // distinct decode tokens, cycled

// One layer's prompt and kTokens decode tokens, in U, holding values of T.
template <class U>
struct Inputs {
  index_t B, H, Hkv, S, d;
  std::vector<U> q, k, v;     // (B, H, w, d), (B, Hkv, S, d) x2
  std::vector<U> dq, dk, dv;  // (kTokens, B, H, d), (kTokens, B, Hkv, d) x2
  auto qv() const { return cake::make_view(q.data(), std::array<index_t, 4>{B, H, window, d}); }
  auto kv() const { return cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
  auto vv() const { return cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}); }
  auto dqv(index_t t) const {
    return cake::make_view(dq.data() + (t % kTokens) * B * H * d, std::array<index_t, 3>{B, H, d});
  }
  auto dkv(index_t t) const {
    return cake::make_view(dk.data() + (t % kTokens) * B * Hkv * d,
                           std::array<index_t, 3>{B, Hkv, d});
  }
  auto dvv(index_t t) const {
    return cake::make_view(dv.data() + (t % kTokens) * B * Hkv * d,
                           std::array<index_t, 3>{B, Hkv, d});
  }
};

// The shared inputs rounded to T, as U (T itself, or float holding T's values).
template <class T, class U>
Inputs<U> make_inputs(const Shape& sh, index_t B, index_t S) {
  const LayerInputs& in = layer_inputs(sh, B, S);
  const auto conv = [](const std::vector<float>& x) {
    if constexpr (std::is_same_v<U, float>)
      return widened(rounded<T>(x));
    else
      return rounded<T>(x);
  };
  Inputs<U> out{B, sh.q_heads, sh.kv_heads, S, sh.head_dim, {}, {}, {}, {}, {}, {}};
  out.q = conv(in.q);
  out.k = conv(in.k);
  out.v = conv(in.v);
  Rng g(77);
  std::vector<float> dq(static_cast<std::size_t>(kTokens * B * sh.q_heads * sh.head_dim)),
      dk(static_cast<std::size_t>(kTokens * B * sh.kv_heads * sh.head_dim)), dv(dk.size());
  for (auto& x : dq) x = g.normal();
  for (auto& x : dk) x = g.normal();
  for (auto& x : dv) x = g.normal();
  out.dq = conv(dq);
  out.dk = conv(dk);
  out.dv = conv(dv);
  return out;
}

cake::CacheConfig one_layer(const Shape& sh, index_t B, index_t C) {
  cake::CacheConfig cfg{};
  cfg.layers = 1;
  cfg.batch = B;
  cfg.q_heads = sh.q_heads;
  cfg.kv_heads = sh.kv_heads;
  cfg.head_dim = sh.head_dim;
  cfg.window = window;
  cfg.cache_size = C;
  return cfg;
}

// ns per token held, from the wall time (the cases use real time).
void per_token(benchmark::State& st, index_t tokens) {
  st.SetItemsProcessed(st.iterations() * tokens);
  st.counters["ns_per_token_held"] = benchmark::Counter(
      1e-9 * static_cast<double>(tokens),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  st.counters["tokens_held"] = static_cast<double>(tokens);
}

template <class T, class U>
void add_case(bool decode, const char* type, const char* impl, const Shape& sh, index_t B,
              index_t S, index_t C) {
  const std::string args =
      std::string(type) + "/" + shape_args(sh, B, S) + "/C:" + std::to_string(C);
  using Cache =
      cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::MeanVarianceIndicator, U>;
  if (!decode) {
    add(name("storage16_prefill", impl, args), [=](benchmark::State& st) {
      const Inputs<U> in = make_inputs<T, U>(sh, B, S);
      Cache cache(one_layer(sh, B, C));
      for (auto _ : st) {
        cache.reset();
        cache.prefill(0, in.qv(), in.kv(), in.vv());
        benchmark::DoNotOptimize(cache.tokens_held(0));
      }
      per_token(st, cache.tokens_held(0) * B * sh.kv_heads);
    })->MinTime(0.3);
    return;
  }
  add(name("storage16_decode", impl, args),
      [=](benchmark::State& st) {
        const Inputs<U> in = make_inputs<T, U>(sh, B, S);
        Cache cache(one_layer(sh, B, C));
        cache.prefill(0, in.qv(), in.kv(), in.vv());
        index_t t = 0;
        for (; t < kTokens; ++t) cache.decode(0, in.dqv(t), in.dkv(t), in.dvv(t));  // steady state
        for (auto _ : st) {
          cache.decode(0, in.dqv(t), in.dkv(t), in.dvv(t));
          ++t;
          benchmark::DoNotOptimize(cache.tokens_held(0));
        }
        per_token(st, cache.tokens_held(0) * B * sh.kv_heads);
      })
      ->MinTime(0.3)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_storage16() {
  // Llama-3.1-8B heads (32 query, 8 KV, d = 128), S = 4K, C = 1024; each 16-bit
  // type next to float in the same run.
  for (bool decode : {false, true}) {
    add_case<cake::bfloat16, cake::bfloat16>(decode, "bf16", "cake", llama, 1, 4096, 1024);
    add_case<cake::bfloat16, float>(decode, "bf16", "float", llama, 1, 4096, 1024);
#if defined(__FLT16_MAX__)  // the compiler has _Float16
    add_case<_Float16, _Float16>(decode, "half", "cake", llama, 1, 4096, 1024);
    add_case<_Float16, float>(decode, "half", "float", llama, 1, 4096, 1024);
#endif
  }
}

}  // namespace cake_bench
