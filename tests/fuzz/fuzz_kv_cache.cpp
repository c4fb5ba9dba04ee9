// libFuzzer target: KvCache's public front-end. The input decodes to a cache
// configuration, a method (cake::methods) with its policy parameters, and a
// sequence of prefill / decode / reset calls on tensors of fuzzed shapes, strides
// and contents (NaN, Inf and huge finite values included). Every call either
//   - succeeds, and then the cache's invariants hold: every held token's keys and
//     values are the source's at its position, positions are unique, in range and
//     include the window, rows hold what the budgets say; or
//   - throws cake::error, and then every public observer equals its value before
//     the call (the strong guarantee).
// Anything else (another exception, a sanitizer report, a broken invariant) aborts.
#include <fuzzer/FuzzedDataProvider.h>

#include <cake/cake.hpp>
#include <cake/methods.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include "../support/kv_snapshot.hpp"

namespace {

using cake::index_t;

[[noreturn]] void fail(const char* what, long a = 0, long b = 0) {
  std::fprintf(stderr, "fuzz_kv_cache: invariant broken: %s (%ld, %ld)\n", what, a, b);
  std::abort();
}
#define REQUIRE_FUZZ(cond, ...)                          \
  do {                                                   \
    if (!(cond)) fail(#cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

using cake_test::Snapshot;
using cake_test::snapshot;

// Keys and values must match bit for bit (NaN-safe).
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// A rank-R tensor with fuzzed layout: the logical dimensions stored in a fuzzed
// order, each with fuzzed padding; occasionally a non-unit innermost stride (which
// the cache must reject) or a perturbed extent (likewise).
template <std::size_t R>
struct Tensor {
  std::array<index_t, R> ext{}, stride{};
  std::vector<float> buf;
  bool bad_inner = false;

  Tensor(FuzzedDataProvider& in, std::array<index_t, R> logical, std::mt19937& rng,
         const std::vector<float>& specials, bool allow_special) {
    ext = logical;
    if (in.ConsumeIntegralInRange<int>(0, 15) == 0) {  // a wrong extent
      const auto r = in.ConsumeIntegralInRange<std::size_t>(0, R - 1);
      ext[r] = std::max<index_t>(0, ext[r] + in.ConsumeIntegralInRange<int>(-1, 1));
    }
    std::array<std::size_t, R> order;  // order[0] outermost in memory
    for (std::size_t r = 0; r < R; ++r) order[r] = r;
    if (in.ConsumeBool()) {  // storage order other than the logical one, inner dim kept last
      for (std::size_t r = 0; r + 2 < R; ++r)
        std::swap(order[r], order[r + in.ConsumeIntegralInRange<std::size_t>(0, R - 2 - r)]);
    }
    bad_inner = in.ConsumeIntegralInRange<int>(0, 31) == 0;
    index_t s = bad_inner ? 2 : 1;
    for (std::size_t i = R; i-- > 0;) {
      const std::size_t r = order[i];
      stride[r] = s;
      const index_t pad =
          in.ConsumeIntegralInRange<int>(0, 3) == 0 ? in.ConsumeIntegralInRange<int>(0, 3) : 0;
      s *= std::max<index_t>(ext[r], 1);
      s += pad * stride[r];
    }
    buf.resize(static_cast<std::size_t>(s));
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (auto& x : buf) x = u(rng);
    // A few fuzzed values at fuzzed places.
    const int n_special = in.ConsumeIntegralInRange<int>(0, 3);
    for (int i = 0; i < n_special && !buf.empty() && allow_special; ++i) {
      const auto at = in.ConsumeIntegralInRange<std::size_t>(0, buf.size() - 1);
      buf[at] = specials[in.ConsumeIntegralInRange<std::size_t>(0, specials.size() - 1)];
    }
  }
  auto view() const { return cake::make_view(static_cast<const float*>(buf.data()), ext, stride); }
  // A non-unit innermost stride is harmless (and accepted) when that extent is <= 1.
  bool logical_is(const std::array<index_t, R>& want) const {
    return ext == want && (!bad_inner || ext[R - 1] <= 1);
  }
  template <class... I>
  float at(I... i) const {
    const std::array<index_t, R> idx{static_cast<index_t>(i)...};
    index_t off = 0;
    for (std::size_t r = 0; r < R; ++r) off += idx[r] * stride[r];
    return buf[static_cast<std::size_t>(off)];
  }
};

float fuzz_float(FuzzedDataProvider& in, std::initializer_list<float> usual) {
  static const float odd[] = {0.0f,
                              -1.0f,
                              std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              1e-30f,
                              1e30f};
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0)
    return odd[in.ConsumeIntegralInRange<std::size_t>(0, std::size(odd) - 1)];
  return *(usual.begin() + in.ConsumeIntegralInRange<std::size_t>(0, usual.size() - 1));
}
int fuzz_kernel(FuzzedDataProvider& in) {
  return in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<int>(-1, 4)
                                                   : 1 + 2 * in.ConsumeIntegralInRange<int>(0, 2);
}

// What the test knows about each layer's source tokens: prompt K/V and decoded ones.
struct Source {
  index_t S = 0, B = 0, Hkv = 0, d = 0;
  std::vector<float> k, v;  // (B, Hkv, S + decoded, d), logical, grown as tokens come
  index_t tokens = 0;
  float key(index_t b, index_t g, index_t p, index_t x) const {
    return k[static_cast<std::size_t>(((b * Hkv + g) * tokens + p) * d + x)];
  }
  float value(index_t b, index_t g, index_t p, index_t x) const {
    return v[static_cast<std::size_t>(((b * Hkv + g) * tokens + p) * d + x)];
  }
  void append(const std::vector<float>& nk, const std::vector<float>& nv) {  // (B, Hkv, d)
    std::vector<float> k2, v2;
    for (index_t r = 0; r < B * Hkv; ++r) {
      k2.insert(k2.end(), k.begin() + r * tokens * d, k.begin() + (r + 1) * tokens * d);
      v2.insert(v2.end(), v.begin() + r * tokens * d, v.begin() + (r + 1) * tokens * d);
      k2.insert(k2.end(), nk.begin() + r * d, nk.begin() + (r + 1) * d);
      v2.insert(v2.end(), nv.begin() + r * d, nv.begin() + (r + 1) * d);
    }
    k = std::move(k2);
    v = std::move(v2);
    ++tokens;
  }
};

template <class Cache>
void check_invariants(const Cache& c, const std::vector<Source>& src, bool headwise,
                      const std::vector<index_t>& expect_len) {
  const auto& cfg = c.config();
  const index_t w = cfg.window;
  for (index_t l = 0; l < c.layers_prefilled(); ++l) {
    const Source& s = src[static_cast<std::size_t>(l)];
    const auto lens = c.row_lengths(l);
    auto p = c.positions(l);
    auto k = c.keys(l);
    auto v = c.values(l);
    REQUIRE_FUZZ(p.extent(0) == cfg.batch && p.extent(1) == cfg.kv_heads);
    index_t longest = 0, total = 0;
    for (auto x : lens) longest = std::max(longest, x), total += x;
    REQUIRE_FUZZ(p.extent(2) == longest, p.extent(2), longest);
    REQUIRE_FUZZ(static_cast<index_t>(c.bytes_held(l)) ==
                 2 * total * cfg.head_dim * static_cast<index_t>(sizeof(float)));
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t g = 0; g < cfg.kv_heads; ++g) {
        const index_t r = b * cfg.kv_heads + g, n = lens[static_cast<std::size_t>(r)];
        REQUIRE_FUZZ(n >= std::min(w, s.tokens) && n <= s.tokens, n, s.tokens);
        if (!headwise) REQUIRE_FUZZ(n == longest, n, longest);
        if (!expect_len.empty() && expect_len[static_cast<std::size_t>(l)] >= 0)
          REQUIRE_FUZZ(n == expect_len[static_cast<std::size_t>(l)], n,
                       expect_len[static_cast<std::size_t>(l)]);
        std::set<index_t> seen;
        for (index_t t = 0; t < longest; ++t) {
          const index_t pos = p(b, g, t);
          if (t >= n) {  // padding
            REQUIRE_FUZZ(pos == -1, pos, t);
            for (index_t x = 0; x < cfg.head_dim; ++x)
              REQUIRE_FUZZ(k(b, g, t, x) == 0.0f && v(b, g, t, x) == 0.0f);
            continue;
          }
          REQUIRE_FUZZ(pos >= 0 && pos < s.tokens, pos, s.tokens);
          REQUIRE_FUZZ(seen.insert(pos).second, pos, t);
          for (index_t x = 0; x < cfg.head_dim; ++x) {
            REQUIRE_FUZZ(same_bits(k(b, g, t, x), s.key(b, g, pos, x)), pos, x);
            REQUIRE_FUZZ(same_bits(v(b, g, t, x), s.value(b, g, pos, x)), pos, x);
          }
        }
        // The window (the newest w tokens) is always held.
        for (index_t pos = std::max<index_t>(0, s.tokens - w); pos < s.tokens; ++pos)
          REQUIRE_FUZZ(seen.count(pos) == 1, pos, s.tokens);
        // Position order once prefill is over.
        if (c.prefilled() && cfg.order == cake::token_order::position)
          for (index_t t = 1; t < n; ++t) REQUIRE_FUZZ(p(b, g, t - 1) < p(b, g, t), t);
      }
  }
}

// The row length a non-head-wise layer must have after a completed prefill: what
// its cuts left (every stage's budget, capped at the prefix), or the whole prompt.
template <class Cache>
std::vector<index_t> lengths_after_prefill(const Cache& c, index_t S) {
  const auto& cfg = c.config();
  const index_t w = cfg.window, P = S - w, L = cfg.layers;
  std::vector<index_t> out(static_cast<std::size_t>(L));
  for (index_t l = 0; l < L; ++l) {
    if (S <= cfg.cache_size + w) {
      out[static_cast<std::size_t>(l)] = S;
      continue;
    }
    index_t keep = std::min(c.budget(l), P);
    if (cfg.cascade)
      for (const auto& stage : c.stage_budgets())
        if (static_cast<index_t>(stage.size()) > l)
          keep = std::min(keep, stage[static_cast<std::size_t>(l)]);
    out[static_cast<std::size_t>(l)] = keep + w;
  }
  return out;
}

template <class Cache, class... Policies>
void run(FuzzedDataProvider& in, const cake::CacheConfig& cfg, Policies... policies) {
  constexpr bool headwise = cake::is_headwise_budget<typename Cache::budget_policy>;
  std::optional<Cache> made;
  try {
    made.emplace(cfg, policies...);
  } catch (const cake::error&) {
    return;  // bad configuration or hyperparameters, rejected up front
  }
  Cache& c = *made;
  std::mt19937 rng(in.ConsumeIntegral<std::uint32_t>());
  // Finite values whose products would overflow float (3e38) must be rejected by the
  // finite check (finding 7 in tests/reliability/test_regressions.cpp); without the
  // check the caller promises sane values, and 1e18 keeps every score finite at
  // these head sizes.
  const float big = cfg.check_finite && in.ConsumeBool() ? 3e38f : 1e18f;
  std::vector<float> specials = {big, -big, 0.0f, 1e-40f};
  if (cfg.check_finite)
    specials.insert(specials.end(), {std::numeric_limits<float>::quiet_NaN(),
                                     std::numeric_limits<float>::infinity()});
  const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                w = cfg.window, L = cfg.layers;
  std::vector<Source> src(static_cast<std::size_t>(L));
  std::vector<index_t> expect;  // row length per layer once prefilled (non-head-wise)
  index_t S = in.ConsumeIntegralInRange<int>(0, 48);

  for (int call = 0; call < 24 && in.remaining_bytes() > 0; ++call) {
    const int op = in.ConsumeIntegralInRange<int>(0, 15);
    const Snapshot before = snapshot(c);
    if (op == 0) {  // reset, maybe with a new prompt length
      c.reset();
      src.assign(static_cast<std::size_t>(L), Source{});
      expect.clear();
      S = in.ConsumeIntegralInRange<int>(0, 48);
      continue;
    }
    if (op <= 6 && !c.prefilled()) {
      index_t layer = c.layers_prefilled();
      if (in.ConsumeIntegralInRange<int>(0, 15) == 0)
        layer += in.ConsumeIntegralInRange<int>(-2, 2);
      index_t Sl = S;
      if (in.ConsumeIntegralInRange<int>(0, 31) == 0) Sl += in.ConsumeIntegralInRange<int>(-2, 2);
      Sl = std::max<index_t>(Sl, 0);
      const bool special = in.ConsumeIntegralInRange<int>(0, 7) == 0;
      Tensor<4> q(in, {B, H, w, d}, rng, specials, special);
      Tensor<4> k(in, {B, Hkv, Sl, d}, rng, specials, special);
      Tensor<4> v(in, {B, Hkv, Sl, d}, rng, specials, special);
      try {
        c.prefill(layer, q.view(), k.view(), v.view());
      } catch (const cake::error&) {
        REQUIRE_FUZZ(snapshot(c) == before, layer, Sl);
        continue;
      }
      // Accepted: the arguments were well formed (a fuzzed prompt length is fine
      // for layer 0 when keys and values agree).
      Sl = k.ext[2];
      REQUIRE_FUZZ(k.logical_is({B, Hkv, Sl, d}) && v.logical_is({B, Hkv, Sl, d}), Sl);
      REQUIRE_FUZZ(q.logical_is({B, H, w, d}));
      REQUIRE_FUZZ(layer == before.prefilled && (layer == 0 || Sl == before.prompt), layer, Sl);
      REQUIRE_FUZZ(Sl >= w, Sl, w);
      Source& s = src[static_cast<std::size_t>(layer)];
      s = Source{Sl, B, Hkv, d, {}, {}, Sl};
      for (index_t b = 0; b < B; ++b)
        for (index_t g = 0; g < Hkv; ++g)
          for (index_t t = 0; t < Sl; ++t)
            for (index_t x = 0; x < d; ++x) {
              s.k.push_back(k.at(b, g, t, x));
              s.v.push_back(v.at(b, g, t, x));
            }
      // Head-wise layers that were cut hold rows of their own lengths (-1: not checked).
      if (c.prefilled()) {
        expect = lengths_after_prefill(c, Sl);
        if (headwise && Sl > cfg.cache_size + w) expect.assign(expect.size(), -1);
      }
      check_invariants(c, src, headwise, c.prefilled() ? expect : std::vector<index_t>{});
    } else {
      index_t layer = in.ConsumeIntegralInRange<int>(0, static_cast<int>(L) - 1);
      if (in.ConsumeIntegralInRange<int>(0, 31) == 0) layer += in.ConsumeBool() ? L : -L;
      const bool special = in.ConsumeIntegralInRange<int>(0, 7) == 0;
      Tensor<3> q(in, {B, H, d}, rng, specials, special);
      Tensor<3> k(in, {B, Hkv, d}, rng, specials, special);
      Tensor<3> v(in, {B, Hkv, d}, rng, specials, special);
      const index_t before_len =
          c.prefilled() && layer >= 0 && layer < L ? c.row_lengths(layer)[0] : -1;
      try {
        c.decode(layer, q.view(), k.view(), v.view());
      } catch (const cake::error&) {
        REQUIRE_FUZZ(snapshot(c) == before, layer);
        continue;
      }
      std::vector<float> nk, nv;
      for (index_t b = 0; b < B; ++b)
        for (index_t g = 0; g < Hkv; ++g)
          for (index_t x = 0; x < d; ++x) {
            nk.push_back(k.at(b, g, x));
            nv.push_back(v.at(b, g, x));
          }
      src[static_cast<std::size_t>(layer)].append(nk, nv);
      REQUIRE_FUZZ(q.logical_is({B, H, d}) && k.logical_is({B, Hkv, d}) &&
                   v.logical_is({B, Hkv, d}));
      auto& e = expect[static_cast<std::size_t>(layer)];
      if (e >= 0) {
        // Append, then evict one when over budget + window.
        e = std::min(before_len + 1, c.budget(layer) + w);
      } else {
        // Cut head-wise rows keep their lengths: each appends one and evicts one.
        REQUIRE_FUZZ(c.row_lengths(layer) == before.lengths[static_cast<std::size_t>(layer)]);
      }
      check_invariants(c, src, headwise, expect);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  cake::CacheConfig cfg;
  const bool odd_cfg = in.ConsumeIntegralInRange<int>(0, 15) == 0;
  cfg.layers = in.ConsumeIntegralInRange<int>(odd_cfg ? -1 : 1, 4);
  cfg.batch = in.ConsumeIntegralInRange<int>(odd_cfg ? 0 : 1, 2);
  cfg.kv_heads = in.ConsumeIntegralInRange<int>(odd_cfg ? 0 : 1, 3);
  cfg.q_heads = cfg.kv_heads * in.ConsumeIntegralInRange<int>(1, 3) +
                (odd_cfg ? in.ConsumeIntegralInRange<int>(-1, 1) : 0);
  cfg.head_dim = in.ConsumeIntegralInRange<int>(odd_cfg ? 0 : 1, 8);
  cfg.window = in.ConsumeIntegralInRange<int>(odd_cfg ? 0 : 2, 8);
  cfg.cache_size = cfg.window + in.ConsumeIntegralInRange<int>(odd_cfg ? -1 : 1, 24);
  cfg.cascade = in.ConsumeBool();
  cfg.order = in.ConsumeBool() ? cake::token_order::position : cake::token_order::reference;
  cfg.check_finite = in.ConsumeIntegralInRange<int>(0, 7) != 0;

  namespace m = cake::methods;
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0:
      run<m::Cake<>>(
          in, cfg,
          cake::CakePreference{fuzz_float(in, {1.0f, 1.6f, 0.4f}),
                               fuzz_float(in, {1.0f, 0.4f, 2.3f})},
          cake::ProportionalBudget{},
          cake::MeanVarianceIndicator{fuzz_float(in, {200.0f, 0.0f, 1.0f}), fuzz_kernel(in)});
      break;
    case 1:
      run<m::SnapKv<>>(in, cfg, cake::UniformPreference{}, cake::UniformBudget{},
                       cake::WindowMeanIndicator{fuzz_kernel(in)});
      break;
    case 2:
      run<m::PyramidKv<>>(in, cfg, cake::UniformPreference{},
                          cake::PyramidBudget{fuzz_float(in, {20.0f, 1.0f, 3.0f})},
                          cake::WindowMeanIndicator{fuzz_kernel(in)});
      break;
    case 3:
      run<m::StreamingLlm<>>(in, cfg, cake::UniformPreference{}, cake::UniformBudget{},
                             cake::SinkRecencyIndicator{in.ConsumeIntegralInRange<int>(-1, 12)});
      break;
    case 4:
      run<m::H2o<>>(in, cfg);
      break;
    case 5:
      run<m::Tova<>>(in, cfg, cake::UniformPreference{}, cake::UniformBudget{},
                     cake::LastQueryIndicator{fuzz_kernel(in)});
      break;
    case 6:
      run<m::AdaSnapKv<>>(
          in, cfg, cake::UniformPreference{},
          cake::HeadwiseBudget<cake::UniformBudget>{{}, fuzz_float(in, {0.2f, 0.0f, 1.0f, 0.5f})},
          cake::WindowMeanIndicator{fuzz_kernel(in)});
      break;
    default:
      run<m::CakeAdaKv<>>(
          in, cfg, cake::CakePreference{fuzz_float(in, {1.0f, 1.6f}), fuzz_float(in, {1.0f, 0.4f})},
          cake::HeadwiseBudget<cake::ProportionalBudget>{{},
                                                         fuzz_float(in, {0.2f, 0.0f, 1.0f, 0.5f})},
          cake::MeanVarianceIndicator{fuzz_float(in, {200.0f, 1.0f}), fuzz_kernel(in)});
      break;
  }
  return 0;
}
