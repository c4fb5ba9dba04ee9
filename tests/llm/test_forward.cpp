// The Llama forward pass of a tiny random model against a naive double-precision
// reference written here from the definitions, and the cache methods on it.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "store.hpp"
#include "tiny_model.hpp"

using namespace llm;
using namespace tiny_model;

namespace {

// SmolLM2's file formats: embeddings in Q8_0, projections in Q4_1 (blocks of 32
// along each row). The reference then uses the dequantised values, so that both
// sides see the same numbers.
void quantise(Tiny& m) {
  for (auto& [name, v] : m.t) {
    if (name.find("norm") != std::string::npos) continue;
    const bool q8 = name == "token_embd.weight" || name == "output.weight";
    const ggml_type type = q8 ? ggml_type::q8_0 : ggml_type::q4_1;
    std::vector<std::uint8_t> bytes;
    auto put16 = [&](float f) {
      const std::uint16_t h = float_to_fp16(f);
      bytes.push_back(static_cast<std::uint8_t>(h & 0xff));
      bytes.push_back(static_cast<std::uint8_t>(h >> 8));
    };
    REQUIRE(v.size() % 32 == 0);
    for (std::size_t b = 0; b < v.size(); b += 32) {
      const auto first = v.begin() + static_cast<std::ptrdiff_t>(b);
      const auto [lo, hi] = std::minmax_element(first, first + 32);
      if (q8) {
        const double amax = std::max(std::abs(*lo), std::abs(*hi));
        const float d = fp16_to_float(float_to_fp16(static_cast<float>(amax / 127)));
        put16(d);
        for (int j = 0; j < 32; ++j)
          bytes.push_back(static_cast<std::uint8_t>(
              static_cast<std::int8_t>(std::clamp(std::lround(first[j] / d), -127L, 127L))));
      } else {
        const float d = fp16_to_float(float_to_fp16(static_cast<float>((*hi - *lo) / 15)));
        const float mn = fp16_to_float(float_to_fp16(static_cast<float>(*lo)));
        put16(d);
        put16(mn);
        auto q = [&](int j) {
          return static_cast<std::uint8_t>(std::clamp(std::lround((first[j] - mn) / d), 0L, 15L));
        };
        for (int j = 0; j < 16; ++j)
          bytes.push_back(static_cast<std::uint8_t>(q(j) | (q(j + 16) << 4)));
      }
    }
    std::vector<float> back(v.size());
    dequantize(type, bytes.data(), back.data(), v.size());
    v.assign(back.begin(), back.end());
    m.raw[name] = {type, std::move(bytes)};
  }
}

// y = W x for W (rows, cols) row-major.
std::vector<double> mv(const std::vector<double>& W, const std::vector<double>& x) {
  const std::size_t cols = x.size(), rows = W.size() / cols;
  std::vector<double> y(rows, 0.0);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) y[r] += W[r * cols + c] * x[c];
  return y;
}

// The reference: logits after every token of `ids`, full causal attention,
// rotary on adjacent pairs (x[2i], x[2i+1]) with angle pos * base^(-2i/hd).
std::vector<std::vector<double>> reference(const Tiny& m, const std::vector<int>& ids) {
  const std::size_t S = ids.size();
  auto norm = [&](const std::vector<double>& x, const std::vector<double>& g) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + m.eps);
    std::vector<double> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * g[i];
    return y;
  };
  auto rope = [&](std::vector<double>& v, std::size_t pos) {
    for (std::size_t h = 0; h < v.size() / static_cast<std::size_t>(m.hd); ++h)
      for (int i = 0; i < m.hd / 2; ++i) {
        const double th = static_cast<double>(pos) * std::pow(m.base, -2.0 * i / m.hd);
        double& a = v[h * static_cast<std::size_t>(m.hd) + 2 * static_cast<std::size_t>(i)];
        double& b = v[h * static_cast<std::size_t>(m.hd) + 2 * static_cast<std::size_t>(i) + 1];
        const double na = a * std::cos(th) - b * std::sin(th),
                     nb = a * std::sin(th) + b * std::cos(th);
        a = na;
        b = nb;
      }
  };
  std::vector<std::vector<double>> x(S);
  const auto& E = m.t.at("token_embd.weight");
  for (std::size_t s = 0; s < S; ++s)
    x[s].assign(E.begin() + ids[s] * m.D, E.begin() + (ids[s] + 1) * m.D);
  for (int l = 0; l < m.L; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    std::vector<std::vector<double>> q(S), k(S), v(S);
    for (std::size_t s = 0; s < S; ++s) {
      const auto h = norm(x[s], m.t.at(p + "attn_norm.weight"));
      q[s] = mv(m.t.at(p + "attn_q.weight"), h);
      k[s] = mv(m.t.at(p + "attn_k.weight"), h);
      v[s] = mv(m.t.at(p + "attn_v.weight"), h);
      rope(q[s], s);
      rope(k[s], s);
    }
    for (std::size_t s = 0; s < S; ++s) {
      std::vector<double> o(static_cast<std::size_t>(m.H * m.hd), 0.0);
      for (int h = 0; h < m.H; ++h) {
        const int g = h / (m.H / m.Hkv);
        std::vector<double> sc(s + 1);
        double mx = -1e300, sum = 0;
        for (std::size_t j = 0; j <= s; ++j) {
          double dot = 0;
          for (int e = 0; e < m.hd; ++e)
            dot += q[s][static_cast<std::size_t>(h * m.hd + e)] *
                   k[j][static_cast<std::size_t>(g * m.hd + e)];
          sc[j] = dot / std::sqrt(static_cast<double>(m.hd));
          mx = std::max(mx, sc[j]);
        }
        for (auto& e : sc) sum += (e = std::exp(e - mx));
        for (std::size_t j = 0; j <= s; ++j)
          for (int e = 0; e < m.hd; ++e)
            o[static_cast<std::size_t>(h * m.hd + e)] +=
                sc[j] / sum * v[j][static_cast<std::size_t>(g * m.hd + e)];
      }
      const auto a = mv(m.t.at(p + "attn_output.weight"), o);
      for (int i = 0; i < m.D; ++i)
        x[s][static_cast<std::size_t>(i)] += a[static_cast<std::size_t>(i)];
    }
    for (std::size_t s = 0; s < S; ++s) {
      const auto h = norm(x[s], m.t.at(p + "ffn_norm.weight"));
      auto g = mv(m.t.at(p + "ffn_gate.weight"), h);
      const auto u = mv(m.t.at(p + "ffn_up.weight"), h);
      for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto d = mv(m.t.at(p + "ffn_down.weight"), g);
      for (int i = 0; i < m.D; ++i)
        x[s][static_cast<std::size_t>(i)] += d[static_cast<std::size_t>(i)];
    }
  }
  std::vector<std::vector<double>> logits(S);
  const auto& out = m.t.count("output.weight") ? m.t.at("output.weight") : E;
  for (std::size_t s = 0; s < S; ++s) logits[s] = mv(out, norm(x[s], m.t.at("output_norm.weight")));
  return logits;
}

// Worst |got - want| / (1 + |want|) over the logits.
double worst_error(const float* got, const std::vector<double>& want) {
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
  return worst;
}

void check_close(const float* got, const std::vector<double>& want) {
  CHECK(worst_error(got, want) < 2e-4);
}

}  // namespace

TEST_CASE("tiny model: prefill and decode logits match a double-precision reference") {
  for (bool tied : {false, true}) {
    CAPTURE(tied);
    const Tiny ref = make_tiny(tied ? 11u : 7u, tied);
    const std::string path =
        write_tiny(ref, tied ? "cake_llm_tiny_tied.gguf" : "cake_llm_tiny.gguf");
    const GgufFile file(path);
    std::remove(path.c_str());
    const Model model = Model::load(file);
    CHECK(model.cfg.head_dim == 4);
    CHECK(model.cfg.rope_dims == 4);
    CHECK(model.cfg.context == 256);
    CHECK(model.output.empty() == tied);
    Transformer tf(model);

    std::vector<int> ids{3, 17, 5, 5, 30, 1, 0, 36, 12, 8, 21, 2};
    const auto want = reference(ref, ids);
    const auto rec = tf.prefill(ids, 4);
    CHECK(rec.tokens == 12);
    check_close(rec.last_logits.data(), want.back());

    // Decode three more tokens through the full store; compare after each.
    FullStore store(model.cfg);
    store.prefill(rec);
    std::vector<float> logits;
    for (int next : {9, 14, 33}) {
      tf.decode({next}, {static_cast<std::int64_t>(ids.size())}, {&store}, logits);
      ids.push_back(next);
      check_close(logits.data(), reference(ref, ids).back());
    }
    CHECK(store.tokens_held() == 15 * 2);

    // Batched decoding gives each sequence what it gets alone.
    FullStore a(model.cfg), b(model.cfg);
    a.prefill(rec);
    b.prefill(rec);
    std::vector<float> both, alone;
    tf.decode({9, 20}, {12, 12}, {&a, &b}, both);
    FullStore c(model.cfg);
    c.prefill(rec);
    tf.decode({20}, {12}, {&c}, alone);
    for (int i = 0; i < model.cfg.vocab; ++i)
      CHECK(both[static_cast<std::size_t>(model.cfg.vocab + i)] ==
            doctest::Approx(alone[static_cast<std::size_t>(i)]).epsilon(1e-5));
  }
}

TEST_CASE(
    "tiny model: a cache large enough to keep every token gives exactly the full-cache tokens") {
  const Tiny ref = make_tiny(5u, false);
  const std::string path = write_tiny(ref, "cake_llm_tiny_cache.gguf");
  const GgufFile file(path);
  std::remove(path.c_str());
  const Model model = Model::load(file);
  Transformer tf(model);
  std::mt19937 rng(3);
  std::vector<int> ids(40);
  for (auto& x : ids) x = static_cast<int>(rng() % 37);
  const auto rec = tf.prefill(ids, 8);
  const int max_new = 20;

  FullStore full(model.cfg);
  full.prefill(rec);
  const auto want = generate(tf, rec, full, max_new);
  REQUIRE(want.size() == static_cast<std::size_t>(max_new));

  for (const std::string& method : method_names()) {
    if (method == "full") continue;
    CAPTURE(method);
    CacheOptions o;
    o.method = method;
    o.window = 8;
    o.cache_size = 40 + max_new;  // every prompt and generated token fits
    auto store = make_store(model.cfg, o, rec.tokens);
    store->prefill(rec);
    CHECK(generate(tf, rec, *store, max_new) == want);
    CHECK(store->tokens_held() == full.tokens_held());

    // A small cache evicts: bounded memory, finite logits, tokens in range.
    o.cache_size = 16;
    auto small = make_store(model.cfg, o, rec.tokens);
    small->prefill(rec);
    CHECK(small->tokens_held() == 16 * model.cfg.layers);
    const auto got = generate(tf, rec, *small, max_new);
    CHECK(got.size() == static_cast<std::size_t>(max_new));
    CHECK(small->tokens_held() == 16 * model.cfg.layers);
    std::vector<float> logits;
    tf.decode({got.back()}, {static_cast<std::int64_t>(rec.tokens + max_new)}, {small.get()},
              logits);
    for (float x : logits) CHECK(std::isfinite(x));
  }
  CacheOptions bad;
  bad.method = "quest";  // not (yet) a method
  CHECK_THROWS_WITH(make_store(model.cfg, bad, 40),
                    doctest::Contains("unknown method 'quest' (full, cake, snapkv"));
  bad.method = "cake";
  bad.cache_size = 8;  // not above the window
  CHECK_THROWS(make_store(model.cfg, bad, 40));
}

TEST_CASE(
    "quantised tiny model (Q8_0 embeddings, Q4_1 projections): prefill and decode on every path "
    "match a double-precision reference") {
  Tiny shape;
  shape.D = 64;
  shape.H = 4;
  shape.Hkv = 2;
  shape.hd = 16;
  shape.F = 96;
  shape.V = 64;
  Tiny ref = make_tiny(21u, true, shape);
  quantise(ref);
  const std::string path = write_tiny(ref, "cake_llm_tiny_q.gguf");
  const GgufFile file(path);
  std::remove(path.c_str());
  const Model model = Model::load(file);
  CHECK(model.qoutput.type == ggml_type::q8_0);
  CHECK(model.blocks[0].qq.type == ggml_type::q4_1);
  CHECK(model.blocks[1].qdown.type == ggml_type::q4_1);
  CHECK(model.blocks[1].qdown.cols == 96);

  std::mt19937 rng(9);
  std::vector<int> ids(150);  // two query blocks of the prefill
  for (auto& x : ids) x = static_cast<int>(rng() % 64);
  for (bool portable : {false, true}) {
    CAPTURE(portable);
    kernels::portable_only() = portable;
    Transformer tf(model);
    auto seq = ids;
    const auto rec = tf.prefill(seq, 8);
    // Logits reach ~10 here; float sums over 64..96 terms stay well within 1e-4.
    const double tol = 1e-4;
    CHECK(worst_error(rec.last_logits.data(), reference(ref, seq).back()) < tol);

    // One sequence: the fused block-format products. Twelve sequences: sgemm on floats.
    FullStore one(model.cfg);
    one.prefill(rec);
    std::vector<FullStore> many(12, FullStore(model.cfg));
    std::vector<KvStore*> ptrs;
    for (auto& st : many) {
      st.prefill(rec);
      ptrs.push_back(&st);
    }
    std::vector<float> logits, batch;
    for (int next : {5, 63, 17}) {
      const auto pos = static_cast<std::int64_t>(seq.size());
      tf.decode({next}, {pos}, {&one}, logits);
      tf.decode(std::vector<int>(12, next), std::vector<std::int64_t>(12, pos), ptrs, batch);
      seq.push_back(next);
      const auto want = reference(ref, seq).back();
      CHECK(worst_error(logits.data(), want) < tol);
      CHECK(worst_error(batch.data() + 11 * 64, want) < tol);
    }
  }
  kernels::portable_only() = false;
}

namespace {
// w (rows x cols) in `type`'s blocks (Q4_1, Q8_0 or F32); w becomes the values the
// blocks hold.
std::vector<std::uint8_t> encode_blocks(ggml_type type, std::vector<float>& w) {
  std::vector<std::uint8_t> bytes;
  if (type == ggml_type::f32) {
    bytes.resize(w.size() * 4);
    std::memcpy(bytes.data(), w.data(), bytes.size());
    return bytes;
  }
  Tiny m;  // quantise() works on named matrices: Q8_0 for the embeddings, Q4_1 for the rest
  const char* name = type == ggml_type::q8_0 ? "token_embd.weight" : "blk.0.attn_q.weight";
  m.t["blk.0.attn_q.weight"].assign(w.begin(), w.end());
  if (type == ggml_type::q8_0) m.t["token_embd.weight"] = m.t["blk.0.attn_q.weight"];
  quantise(m);
  const auto& e = m.raw[name];
  REQUIRE(e.first == type);
  bytes = e.second;
  dequantize(type, bytes.data(), w.data(), w.size());
  return bytes;
}
}  // namespace

TEST_CASE("kernels: block-format matrix-vector products, exp and attention against double") {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (bool portable : {false, true}) {
    CAPTURE(portable);
    kernels::portable_only() = portable;
    for (ggml_type type : {ggml_type::q4_1, ggml_type::q8_0, ggml_type::f32}) {
      CAPTURE(static_cast<int>(type));
      const std::size_t rows = 7, cols = 96;
      std::vector<float> w(rows * cols);
      for (auto& x : w) x = nd(rng);
      const std::vector<std::uint8_t> bytes = encode_blocks(type, w);
      const QWeight q = QWeight::from(type, bytes.data(), rows, cols);
      CHECK(q.type == type);
      for (std::size_t n : {1u, 3u, 4u, 6u}) {
        std::vector<float> x(n * cols), y(n * rows, -1.0f);
        for (auto& v : x) v = nd(rng);
        kernels::qmatvec(q, x.data(), n, y.data());
        for (std::size_t i = 0; i < n; ++i)
          for (std::size_t r = 0; r < rows; ++r) {
            double want = 0;
            for (std::size_t c = 0; c < cols; ++c)
              want += static_cast<double>(w[r * cols + c]) * x[i * cols + c];
            CHECK(y[i * rows + r] == doctest::Approx(want).epsilon(1e-5).scale(10));
          }
      }
    }

    // exp within 2 ulp (relative 2.4e-7) of the exact value, 0 far below the range.
    std::vector<float> xs;
    for (float v = -87.0f; v < 88.3f; v += 0.173f) xs.push_back(v);
    xs.push_back(0.0f);
    xs.push_back(-200.0f);
    auto ex = xs;
    kernels::exp_inplace(ex.data(), ex.size());  // 1020 values: vector body and a tail
    for (std::size_t i = 0; i + 1 < xs.size(); ++i) {
      const double want = std::exp(static_cast<double>(xs[i]));
      CHECK(std::abs(ex[i] - want) <= 2.4e-7 * want);
    }
    CHECK(ex.back() == 0.0f);

    // One head over 37 keys at a token stride of 3 heads, d = 64 and d = 20.
    for (int d : {64, 20}) {
      CAPTURE(d);
      const std::int64_t n = 37;
      const std::ptrdiff_t stride = 3 * d;
      std::vector<float> qv(static_cast<std::size_t>(d)), k(static_cast<std::size_t>(n * stride)),
          v(k.size()), p(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(d));
      for (auto& x : qv) x = nd(rng);
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      const float scale = 0.125f;
      kernels::attend(qv.data(), k.data() + d, stride, v.data() + d, stride, n, d, scale, p.data(),
                      out.data());
      std::vector<double> sc(static_cast<std::size_t>(n));
      double mx = -1e300, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int e = 0; e < d; ++e)
          s += static_cast<double>(qv[static_cast<std::size_t>(e)]) *
               k[static_cast<std::size_t>(j * stride + d + e)];
        sc[static_cast<std::size_t>(j)] = s * scale;
        mx = std::max(mx, s * scale);
      }
      for (auto& e : sc) sum += (e = std::exp(e - mx));
      for (int e = 0; e < d; ++e) {
        double want = 0;
        for (std::int64_t j = 0; j < n; ++j)
          want += sc[static_cast<std::size_t>(j)] / sum *
                  v[static_cast<std::size_t>(j * stride + d + e)];
        CHECK(out[static_cast<std::size_t>(e)] == doctest::Approx(want).epsilon(1e-5).scale(1));
      }
    }
  }
  kernels::portable_only() = false;
}

TEST_CASE("kernels: a block-format product split over threads equals one thread's, bit for bit") {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // 211 rows (runs of uneven length on 2, 3 and 5 threads) x 352 columns: 74 K weights,
  // above the split threshold at one row of X.
  const std::size_t rows = 211, cols = 352;
  REQUIRE(rows * cols >= kernels::kSplitWeights);
  for (bool portable : {false, true}) {
    CAPTURE(portable);
    kernels::portable_only() = portable;
    for (ggml_type type : {ggml_type::q4_1, ggml_type::q8_0, ggml_type::f32}) {
      CAPTURE(static_cast<int>(type));
      std::vector<float> w(rows * cols);
      for (auto& x : w) x = nd(rng);
      const std::vector<std::uint8_t> bytes = encode_blocks(type, w);
      const QWeight q = QWeight::from(type, bytes.data(), rows, cols);
      for (std::size_t n : {1u, 5u}) {
        std::vector<float> x(n * cols), one(n * rows, -1.0f);
        for (auto& v : x) v = nd(rng);
        kernels::qmatvec(q, x.data(), n, one.data(), 1);
        for (int threads : {2, 3, 5}) {
          CAPTURE(threads);
          std::vector<float> split(n * rows, -1.0f);
          kernels::qmatvec(q, x.data(), n, split.data(), threads);
          CHECK(split == one);
        }
      }
    }
  }
  kernels::portable_only() = false;
}

TEST_CASE("causal attention over a prompt: the tiled route against double") {
  // Several query and key blocks (64 and 128 tokens), a partial last block, G = 3
  // and G = 1, d = 64 and 128, one and three threads; queries scaled up so that a
  // later key block raises a row's running max (the online rescaling is exercised).
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  if (!attention::available(64)) {
    MESSAGE("no AVX2 here: the tiled route is not taken (the sgemm route is tested via the model)");
    return;
  }
  // Each tile set this CPU has: AVX-512 (where present) and AVX2.
  std::vector<bool> pins{true};
  if (attention::route_for(64) == attention::route::avx512) pins.push_back(false);
  for (bool pin_avx2 : pins)
    for (int d : {48, 64, 128})
      for (int G : {3, 1})
        for (int S : {1, 7, 16, 131, 300}) {
          attention::avx2_only() = pin_avx2;  // d = 48 takes the AVX2 tiles either way
          CAPTURE(pin_avx2);
          CAPTURE(d);
          CAPTURE(G);
          CAPTURE(S);
          const int Hkv = 2, H = Hkv * G;
          const auto Sz = static_cast<std::size_t>(S), dz = static_cast<std::size_t>(d);
          std::vector<float> q(Sz * static_cast<std::size_t>(H) * dz), k(Sz * 2 * dz), v(k.size());
          for (auto& x : q) x = 3.0f * nd(rng);
          for (auto& x : k) x = nd(rng);
          for (auto& x : v) x = nd(rng);
          // Key 200 (when present) is aligned with every query: it is the max of the
          // rows after it, found only in the second key block.
          if (S > 200)
            for (std::size_t x = 0; x < 2 * dz; ++x)
              k[200 * 2 * dz + x] = 4.0f * std::copysign(1.0f, q[x % dz]);
          const double sc = 1.0 / std::sqrt(static_cast<double>(d));
          for (unsigned threads : {1u, 3u}) {
            std::vector<float> out(q.size(), -7.0f);
            attention::causal(q.data(), k.data(), v.data(), S, H, Hkv, d, out.data(), threads);
            double worst = 0;
            for (int t = 0; t < S; ++t)
              for (int h = 0; h < H; ++h) {
                const int g = h / G;
                std::vector<double> p(static_cast<std::size_t>(t) + 1);
                double mx = -1e300, sum = 0;
                for (int j = 0; j <= t; ++j) {
                  double s = 0;
                  for (int x = 0; x < d; ++x)
                    s += static_cast<double>(q[(static_cast<std::size_t>(t) * H + h) * dz + x]) *
                         k[(static_cast<std::size_t>(j) * Hkv + g) * dz + x];
                  p[static_cast<std::size_t>(j)] = s * sc;
                  mx = std::max(mx, s * sc);
                }
                for (auto& e : p) sum += (e = std::exp(e - mx));
                for (int x = 0; x < d; ++x) {
                  double want = 0;
                  for (int j = 0; j <= t; ++j)
                    want += p[static_cast<std::size_t>(j)] / sum *
                            v[(static_cast<std::size_t>(j) * Hkv + g) * dz + x];
                  const double got = out[(static_cast<std::size_t>(t) * H + h) * dz + x];
                  worst = std::max(worst, std::abs(got - want));
                }
              }
            CAPTURE(threads);
            CHECK(worst < 2e-5);  // outputs are O(1): averages of unit normals
          }
        }
  attention::avx2_only() = false;
}

TEST_CASE("a model with head_dim 64: prefill on either attention route matches double") {
  // SmolLM2's head size and grouping (G = 3) on a tiny model, over 150 tokens:
  // three query blocks and two key blocks on the tiled route.
  Tiny shape;
  shape.L = 2;
  shape.D = 192;
  shape.H = 3;
  shape.Hkv = 1;
  shape.hd = 64;
  shape.F = 96;
  shape.V = 37;
  const Tiny ref = make_tiny(21u, false, shape);
  const std::string path = write_tiny(ref, "cake_llm_tiny_d64.gguf");
  const GgufFile file(path);
  std::remove(path.c_str());
  const Model model = Model::load(file);
  REQUIRE(model.cfg.head_dim == 64);
  std::vector<int> ids;
  for (int i = 0; i < 150; ++i) ids.push_back((i * 7 + i / 5) % 37);
  const auto want = reference(ref, ids);
  // Routes: tiled with the CPU's best tiles, tiled with AVX2 tiles, sgemm.
  for (int route : {0, 1, 2}) {
    const bool tiled = route < 2;
    CAPTURE(route);
    attention::tiled_enabled() = tiled;
    attention::avx2_only() = route == 1;
    Transformer tf(model);
    const auto rec = tf.prefill(ids, 4);
    check_close(rec.last_logits.data(), want.back());
    FullStore store(model.cfg);
    store.prefill(rec);
    std::vector<float> logits;
    tf.decode({9}, {150}, {&store}, logits);
    ids.push_back(9);
    check_close(logits.data(), reference(ref, ids).back());
    ids.pop_back();
  }
  attention::tiled_enabled() = true;
  attention::avx2_only() = false;
}
