// A Llama-architecture transformer read from GGUF: RMSNorm, rotary embedding in
// GGUF's layout, grouped-query attention, SwiGLU. Each projection is held twice:
// dequantised to float for the prefill, whose matrix products over the whole
// prompt go through sgemm (BLAS when available), and in the file's own block
// format for decoding, whose matrix-vector products dequantise in registers
// (kernels.hpp) so that a step reads every weight once at its stored width.
//
// The KV cache is pluggable (KvStore): the full cache keeps every token, a
// cake::KvCache-backed store (store.hpp) evicts. The prompt's own attention is
// always full (eviction happens after each layer's prefill); every decoded token
// attends to whatever its store still holds.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention.hpp"
#include "gguf.hpp"
#include "kernels.hpp"
#include "matmul.hpp"

namespace llm {

struct ModelConfig {
  int layers = 0, dim = 0, ffn = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  int context = 0;    // trained context length
  int rope_dims = 0;  // rotated dimensions of each head (head_dim unless the file says less)
  double rope_base = 10000.0;
  float eps = 1e-5f;
  int q_dim() const { return heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
};

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;
  // Floats for sgemm: wqkv (q_dim + 2 kv_dim, dim) = wq, wk, wv stacked; wgu (2 ffn,
  // dim) = gate, up stacked (one product each over the prompt); wo (dim, q_dim);
  // down (dim, ffn).
  std::vector<float> wqkv, wo, wgu, down;
  QWeight qq, qk, qv, qo, qgate, qup, qdown;  // the same projections as stored in the file
};

struct Model {
  ModelConfig cfg;
  std::vector<float> embed;        // (vocab, dim)
  std::vector<float> output_norm;  // (dim)
  std::vector<float> output;       // (vocab, dim); empty when tied to embed
  std::vector<LayerWeights> blocks;
  QWeight qoutput;  // (vocab, dim): output.weight, or token_embd.weight when tied

  const float* output_weights() const { return output.empty() ? embed.data() : output.data(); }

  static Model load(const GgufFile& f) {
    const std::string arch = f.get_string("general.architecture");
    if (arch != "llama")
      throw std::runtime_error("model: architecture '" + arch + "' is not llama");
    Model m;
    ModelConfig& c = m.cfg;
    c.layers = static_cast<int>(f.get_int("llama.block_count"));
    c.dim = static_cast<int>(f.get_int("llama.embedding_length"));
    c.ffn = static_cast<int>(f.get_int("llama.feed_forward_length"));
    c.heads = static_cast<int>(f.get_int("llama.attention.head_count"));
    c.kv_heads = static_cast<int>(f.get_int("llama.attention.head_count_kv", c.heads));
    c.context = static_cast<int>(f.get_int("llama.context_length"));
    c.rope_base = f.get_float("llama.rope.freq_base", 10000.0);
    c.eps = static_cast<float>(f.get_float("llama.attention.layer_norm_rms_epsilon", 1e-5));
    if (c.heads <= 0 || c.kv_heads <= 0 || c.heads % c.kv_heads || c.dim % c.heads)
      throw std::runtime_error("model: inconsistent head counts");
    c.head_dim = c.dim / c.heads;
    c.rope_dims = static_cast<int>(f.get_int("llama.rope.dimension_count", c.head_dim));
    if (c.rope_dims % 2 || c.rope_dims > c.head_dim)
      throw std::runtime_error("model: bad rope dimension count");
    const auto& emb = f.tensor("token_embd.weight");
    c.vocab = static_cast<int>(emb.dims.at(1));
    auto expect = [&](const std::string& name, std::uint64_t d0, std::uint64_t d1) {
      const auto& t = f.tensor(name);
      const std::uint64_t got1 = t.dims.size() > 1 ? t.dims[1] : 1;
      if (t.dims[0] != d0 || got1 != d1)
        throw std::runtime_error("model: tensor " + name + " has an unexpected shape");
      return f.to_float(t);
    };
    auto stored = [&](const std::string& name) {
      const auto& t = f.tensor(name);
      return QWeight::from(t.type, f.data(t), t.dims[1], t.dims[0]);
    };
    const auto D = static_cast<std::uint64_t>(c.dim), F = static_cast<std::uint64_t>(c.ffn),
               Q = static_cast<std::uint64_t>(c.q_dim()),
               K = static_cast<std::uint64_t>(c.kv_dim()), V = static_cast<std::uint64_t>(c.vocab);
    m.embed = expect("token_embd.weight", D, V);
    m.output_norm = expect("output_norm.weight", D, 1);
    if (f.find("output.weight")) m.output = expect("output.weight", D, V);
    m.qoutput = stored(f.find("output.weight") ? "output.weight" : "token_embd.weight");
    for (int l = 0; l < c.layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      LayerWeights w;
      w.attn_norm = expect(p + "attn_norm.weight", D, 1);
      auto stack = [](std::vector<float> a, const std::vector<float>& b,
                      const std::vector<float>& c = {}) {
        a.insert(a.end(), b.begin(), b.end());
        a.insert(a.end(), c.begin(), c.end());
        return a;
      };
      w.wqkv = stack(expect(p + "attn_q.weight", D, Q), expect(p + "attn_k.weight", D, K),
                     expect(p + "attn_v.weight", D, K));
      w.wo = expect(p + "attn_output.weight", Q, D);
      w.ffn_norm = expect(p + "ffn_norm.weight", D, 1);
      w.wgu = stack(expect(p + "ffn_gate.weight", D, F), expect(p + "ffn_up.weight", D, F));
      w.down = expect(p + "ffn_down.weight", F, D);
      w.qq = stored(p + "attn_q.weight");
      w.qk = stored(p + "attn_k.weight");
      w.qv = stored(p + "attn_v.weight");
      w.qo = stored(p + "attn_output.weight");
      w.qgate = stored(p + "ffn_gate.weight");
      w.qup = stored(p + "ffn_up.weight");
      w.qdown = stored(p + "ffn_down.weight");
      m.blocks.push_back(std::move(w));
    }
    return m;
  }
};

// ---- building blocks ------------------------------------------------------------

inline void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

// Rotary embedding in GGUF llama layout ("normal" rope): llama.cpp's converter
// permutes Q and K so that rotation pairs are adjacent, (x[2i], x[2i+1]), with
// angle pos * base^(-2i / rope_dims).
class Rope {
 public:
  Rope(int rope_dims, double base) : dims_(rope_dims), base_(base) {}
  void apply(float* x, int heads, int head_dim, std::int64_t pos) {
    grow(pos);
    const float* cs =
        table_.data() + static_cast<std::size_t>(pos) * static_cast<std::size_t>(dims_);
    for (int h = 0; h < heads; ++h) {
      float* v = x + static_cast<std::ptrdiff_t>(h) * head_dim;
      for (int i = 0; i < dims_ / 2; ++i) {
        const float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
  }

 private:
  int dims_;
  double base_;
  std::vector<float> table_;  // (positions, dims/2 pairs of cos, sin)
  void grow(std::int64_t pos) {
    const auto have = static_cast<std::int64_t>(table_.size()) / dims_;
    if (pos < have) return;
    const std::int64_t want = std::max<std::int64_t>(pos + 1, 2 * have);
    table_.resize(static_cast<std::size_t>(want * dims_));
    for (std::int64_t p = have; p < want; ++p)
      for (int i = 0; i < dims_ / 2; ++i) {
        const double theta = static_cast<double>(p) * std::pow(base_, -2.0 * i / dims_);
        table_[static_cast<std::size_t>(p * dims_ + 2 * i)] = static_cast<float>(std::cos(theta));
        table_[static_cast<std::size_t>(p * dims_ + 2 * i + 1)] =
            static_cast<float>(std::sin(theta));
      }
  }
};

// What a layer's prefill produced: queries and keys with rotary applied, (S, heads*d)
// and (S, kv_heads*d) row-major. Kept whole so that several caches can be filled
// from one prefill.
struct PrefillRecord {
  int tokens = 0;
  std::vector<std::vector<float>> q_tail;  // per layer: the last `tail` query rows
  std::vector<std::vector<float>> k, v;    // per layer: every key and value row
  int tail = 0;
  std::vector<float> last_logits;  // (vocab) after the last prompt token
};

// Keys and values a new token attends to: element (head g, token j, x) is at
// k[g * head_stride + j * token_stride + x], or, paged (blocks set), token j is slot
// j % block_size of block blocks[j / block_size]:
// k[blocks[j / block_size] * block_stride + g * head_stride + (j % block_size) * token_stride + x].
struct AttendSpan {
  const float* k = nullptr;
  const float* v = nullptr;
  std::ptrdiff_t k_head_stride = 0, k_token_stride = 0, v_head_stride = 0, v_token_stride = 0;
  std::int64_t tokens = 0;
  // Tokens of each KV head when they differ (a head-wise cache pads its rows to the
  // longest: head g attends to its first head_tokens[g] only); empty: `tokens` each.
  std::vector<std::int64_t> head_tokens;
  const std::int32_t* blocks = nullptr;  // (ceil(tokens / block_size)) block ids, or null
  std::int64_t block_size = 0;
  std::ptrdiff_t k_block_stride = 0, v_block_stride = 0;
};

class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual void prefill(const PrefillRecord& rec) = 0;
  // Appends the new token (q: heads*d, k and v: kv_heads*d, rotary applied) to
  // layer l and returns what the token attends to, itself included.
  virtual AttendSpan append(int layer, const float* q, const float* k, const float* v) = 0;
  virtual std::int64_t tokens_held() const = 0;  // all layers
  // An independent copy in this store's state, which decodes exactly as this store
  // would (the evaluation fills one store per method and copies it for its second
  // sequence instead of running the prefill's eviction twice); null when the store
  // cannot be copied (its K/V live in a shared pool): prefill another instead.
  virtual std::unique_ptr<KvStore> clone() const { return nullptr; }
  // Blocks of a paged pool the store holds, all layers; 0 for a dense store.
  virtual std::int64_t blocks_held() const { return 0; }
  // The pool blocks of layer l, in token order; empty for a dense store.
  virtual std::vector<std::int32_t> blocks(int layer) const {
    (void)layer;
    return {};
  }
  // What a CAKE-preference cache decided per layer after its prefill (for the
  // evaluation's report); empty for stores without a layer preference.
  struct LayerDecision {
    double entropy = 0, variance = 0, preference = 0;
    std::int64_t budget = 0;  // tokens beyond the window
  };
  virtual std::vector<LayerDecision> layer_decisions() const { return {}; }
  // Per layer, the share of KV-head rows holding at least one token of positions
  // [first, last), or with `every` all of them (the evaluation asks where a needle
  // survived); empty for a store that keeps everything.
  virtual std::vector<double> rows_holding(int first, int last, bool every = false) const {
    (void)first, (void)last, (void)every;
    return {};
  }
  // Per KV-head row of layer l, the positions it holds, in the row's order (the
  // evaluation's attention probe asks what an eviction left); empty for a store that
  // keeps everything.
  virtual std::vector<std::vector<std::int64_t>> positions(int layer) const {
    (void)layer;
    return {};
  }
};

// The full cache: every token of every layer, token-major rows.
class FullStore final : public KvStore {
 public:
  explicit FullStore(const ModelConfig& c) : c_(c) {}
  void prefill(const PrefillRecord& rec) override {
    k_ = rec.k;
    v_ = rec.v;
  }
  AttendSpan append(int l, const float*, const float* k, const float* v) override {
    auto& K = k_.at(static_cast<std::size_t>(l));
    auto& V = v_.at(static_cast<std::size_t>(l));
    K.insert(K.end(), k, k + c_.kv_dim());
    V.insert(V.end(), v, v + c_.kv_dim());
    AttendSpan s;
    s.k = K.data();
    s.v = V.data();
    s.k_head_stride = s.v_head_stride = c_.head_dim;
    s.k_token_stride = s.v_token_stride = c_.kv_dim();
    s.tokens = static_cast<std::int64_t>(K.size()) / c_.kv_dim();
    return s;
  }
  std::int64_t tokens_held() const override {
    std::int64_t n = 0;
    for (const auto& K : k_) n += static_cast<std::int64_t>(K.size()) / c_.kv_dim();
    return n;
  }
  std::unique_ptr<KvStore> clone() const override { return std::make_unique<FullStore>(*this); }

 private:
  ModelConfig c_;
  std::vector<std::vector<float>> k_, v_;
};

// ---- the forward pass -------------------------------------------------------------

// Where a prefill's time went: wall and process CPU seconds (all threads) per phase.
struct PrefillProfile {
  double wall[3] = {}, cpu[3] = {};  // projections (q|k|v, o, FFN), attention, the rest
  static constexpr const char* names[3] = {"projections", "attention", "other"};
};

// Adds the time since construction (or the last lap) to one phase.
class PhaseClock {
 public:
  explicit PhaseClock(PrefillProfile& p) : p_(p) { lap(); }
  void charge(int phase) {
    const auto w = std::chrono::steady_clock::now();
    const std::clock_t c = std::clock();
    p_.wall[phase] += std::chrono::duration<double>(w - w0_).count();
    p_.cpu[phase] += static_cast<double>(c - c0_) / CLOCKS_PER_SEC;
    w0_ = w;
    c0_ = c;
  }
  void lap() {
    w0_ = std::chrono::steady_clock::now();
    c0_ = std::clock();
  }

 private:
  PrefillProfile& p_;
  std::chrono::steady_clock::time_point w0_;
  std::clock_t c0_ = 0;
};

class Transformer {
 public:
  explicit Transformer(const Model& m) : m_(m), rope_(m.cfg.rope_dims, m.cfg.rope_base) {}
  const ModelConfig& config() const { return m_.cfg; }
  PrefillProfile profile;  // accumulated over every prefill() call
  // Threads of the block-format products (decoding up to fused_rows sequences), each a
  // run of the weight's rows; the same logits on any count. The library's own OpenMP
  // threads are set apart (set_cache_threads).
  int decode_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // Up to this many rows (sequences decoded together) a projection reads the stored
  // blocks (memory-bound), each row computed on its own; more rows reuse each weight
  // enough for sgemm on floats.
  static constexpr std::size_t fused_rows = 8;

  // Runs the prompt through every layer with full causal attention. Records each
  // layer's rotary keys, values and the last `tail` query rows, and the logits
  // after the last token.
  PrefillRecord prefill(const std::vector<int>& tokens, int tail) {
    const ModelConfig& c = m_.cfg;
    const int S = static_cast<int>(tokens.size());
    if (S < 1) throw std::runtime_error("prefill: empty prompt");
    const auto D = static_cast<std::size_t>(c.dim), Sz = static_cast<std::size_t>(S);
    const auto QD = static_cast<std::size_t>(c.q_dim()), KD = static_cast<std::size_t>(c.kv_dim()),
               F = static_cast<std::size_t>(c.ffn);
    PrefillRecord rec;
    rec.tokens = S;
    rec.tail = std::min(tail, S);
    const std::size_t QKV = QD + 2 * KD;
    std::vector<float> x(Sz * D), h(Sz * D), qkv(Sz * QKV), q(Sz * QD), att(Sz * QD),
        gu(Sz * 2 * F);
    PhaseClock clock(profile);
    embed(tokens, x.data());
    for (int l = 0; l < c.layers; ++l) {
      const LayerWeights& w = m_.blocks[static_cast<std::size_t>(l)];
      std::vector<float> k(Sz * KD), v(Sz * KD);
      for (std::size_t i = 0; i < Sz; ++i)
        rms_norm(&x[i * D], w.attn_norm.data(), &h[i * D], c.dim, c.eps);
      clock.charge(2);
      linear(h.data(), Sz, D, w.wqkv.data(), QKV, qkv.data());  // (S, q | k | v)
      clock.charge(0);
      for (int i = 0; i < S; ++i) {
        const float* row = &qkv[static_cast<std::size_t>(i) * QKV];
        float* qi = &q[static_cast<std::size_t>(i) * QD];
        float* ki = &k[static_cast<std::size_t>(i) * KD];
        std::copy_n(row, QD, qi);
        std::copy_n(row + QD, KD, ki);
        std::copy_n(row + QD + KD, KD, &v[static_cast<std::size_t>(i) * KD]);
        rope_.apply(qi, c.heads, c.head_dim, i);
        rope_.apply(ki, c.kv_heads, c.head_dim, i);
      }
      clock.charge(2);
      causal_attention(q.data(), k.data(), v.data(), S, att.data());
      clock.charge(1);
      linear(att.data(), Sz, QD, w.wo.data(), D, h.data());
      for (std::size_t i = 0; i < Sz * D; ++i) x[i] += h[i];
      feed_forward(w, x.data(), Sz, h.data(), gu.data());
      clock.charge(0);
      rec.q_tail.emplace_back(
          q.end() - static_cast<std::ptrdiff_t>(static_cast<std::size_t>(rec.tail) * QD), q.end());
      rec.k.push_back(std::move(k));
      rec.v.push_back(std::move(v));
    }
    rec.last_logits.resize(static_cast<std::size_t>(c.vocab));
    logits(&x[(Sz - 1) * D], 1, rec.last_logits.data());
    clock.charge(2);
    return rec;
  }

  // One decoding step for several independent sequences at once (they share the
  // weight reads): sequence i feeds tokens[i] at position positions[i] into
  // stores[i]; logits (n, vocab) come back.
  void decode(const std::vector<int>& tokens, const std::vector<std::int64_t>& positions,
              const std::vector<KvStore*>& stores, std::vector<float>& out_logits) {
    const ModelConfig& c = m_.cfg;
    const std::size_t n = tokens.size();
    const auto D = static_cast<std::size_t>(c.dim), QD = static_cast<std::size_t>(c.q_dim()),
               KD = static_cast<std::size_t>(c.kv_dim()), F = static_cast<std::size_t>(c.ffn);
    std::vector<float> x(n * D), h(n * D), q(n * QD), k(n * KD), v(n * KD), att(n * QD),
        gu(n * 2 * F);
    embed(tokens, x.data());
    for (int l = 0; l < c.layers; ++l) {
      const LayerWeights& w = m_.blocks[static_cast<std::size_t>(l)];
      for (std::size_t i = 0; i < n; ++i)
        rms_norm(&x[i * D], w.attn_norm.data(), &h[i * D], c.dim, c.eps);
      project(w.wqkv, 0, w.qq, h.data(), n, q.data());
      project(w.wqkv, QD, w.qk, h.data(), n, k.data());
      project(w.wqkv, QD + KD, w.qv, h.data(), n, v.data());
      for (std::size_t i = 0; i < n; ++i) {
        rope_.apply(&q[i * QD], c.heads, c.head_dim, positions[i]);
        rope_.apply(&k[i * KD], c.kv_heads, c.head_dim, positions[i]);
        const AttendSpan span = stores[i]->append(l, &q[i * QD], &k[i * KD], &v[i * KD]);
        attend_one(&q[i * QD], span, &att[i * QD]);
      }
      project(w.wo, 0, w.qo, att.data(), n, h.data());
      for (std::size_t i = 0; i < n * D; ++i) x[i] += h[i];
      feed_forward(w, x.data(), n, h.data(), gu.data());
    }
    out_logits.resize(n * static_cast<std::size_t>(c.vocab));
    logits(x.data(), n, out_logits.data());
  }

 private:
  const Model& m_;
  Rope rope_;

  // Y (n, out) = X (n, in) W^T through whichever copy of W suits n; the float copy
  // is rows [row0, row0 + out) of a stacked matrix.
  void project(const std::vector<float>& w, std::size_t row0, const QWeight& qw, const float* X,
               std::size_t n, float* Y) const {
    if (n <= fused_rows)
      kernels::qmatvec(qw, X, n, Y, decode_threads);
    else
      linear(X, n, qw.cols, w.data() + row0 * qw.cols, qw.rows, Y);
  }

  void embed(const std::vector<int>& tokens, float* x) const {
    const auto D = static_cast<std::size_t>(m_.cfg.dim);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= m_.cfg.vocab)
        throw std::runtime_error("model: token id out of range");
      std::copy_n(&m_.embed[static_cast<std::size_t>(tokens[i]) * D], D, x + i * D);
    }
  }

  // x += down(silu(gate(norm x)) * up(norm x)) for n rows; gu: (n, 2 ffn) scratch.
  void feed_forward(const LayerWeights& w, float* x, std::size_t n, float* h, float* gu) const {
    const ModelConfig& c = m_.cfg;
    const auto D = static_cast<std::size_t>(c.dim), F = static_cast<std::size_t>(c.ffn);
    for (std::size_t i = 0; i < n; ++i)
      rms_norm(&x[i * D], w.ffn_norm.data(), &h[i * D], c.dim, c.eps);
    float* g = gu;  // (n, ffn), then (n, ffn) of up after it when fused
    if (n <= fused_rows) {
      kernels::qmatvec(w.qgate, h, n, g, decode_threads);
      kernels::qmatvec(w.qup, h, n, g + n * F, decode_threads);
      silu_gate(g, g + n * F, n * F);
      kernels::qmatvec(w.qdown, g, n, h, decode_threads);
    } else {
      linear(h, n, D, w.wgu.data(), 2 * F, gu);  // rows (gate | up)
      for (std::size_t i = 0; i < n; ++i) silu_gate(gu + i * 2 * F, gu + i * 2 * F + F, F);
      gemm(true, n, D, F, 1.0f, gu, 2 * F, w.down.data(), F, 0.0f, h, D);
    }
    for (std::size_t i = 0; i < n * D; ++i) x[i] += h[i];
  }

  void logits(const float* x, std::size_t n, float* out) const {
    const ModelConfig& c = m_.cfg;
    const auto D = static_cast<std::size_t>(c.dim);
    std::vector<float> h(n * D);
    for (std::size_t i = 0; i < n; ++i)
      rms_norm(&x[i * D], m_.output_norm.data(), &h[i * D], c.dim, c.eps);
    if (n <= fused_rows)
      kernels::qmatvec(m_.qoutput, h.data(), n, out, decode_threads);
    else
      linear(h.data(), n, D, m_.output_weights(), static_cast<std::size_t>(c.vocab), out);
  }

  // g = silu(g) * u = g / (1 + e^-g) * u.
  static void silu_gate(float* g, const float* u, std::size_t n) {
    std::vector<float> e(n);
    for (std::size_t i = 0; i < n; ++i) e[i] = -g[i];
    kernels::exp_inplace(e.data(), n);
    for (std::size_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + e[i]) * u[i];
  }

  // Full causal attention over the prompt: tiled with online softmax where the CPU
  // has AVX-512 or AVX2 (attention.hpp), else through sgemm: the query heads sharing a KV
  // head go through one product, their rows gathered as (token, head of the group),
  // so that a block of 64 tokens is 64 * group rows against that head's keys.
  void causal_attention(const float* q, const float* k, const float* v, int S, float* out) const {
    const ModelConfig& c = m_.cfg;
    if (attention::available(c.head_dim))
      return attention::causal(q, k, v, S, c.heads, c.kv_heads, c.head_dim, out,
                               std::max(1u, std::thread::hardware_concurrency()));
    const int d = c.head_dim, G = c.heads / c.kv_heads;
    const auto QD = static_cast<std::size_t>(c.q_dim()), KD = static_cast<std::size_t>(c.kv_dim()),
               Sz = static_cast<std::size_t>(S), Gz = static_cast<std::size_t>(G),
               dz = static_cast<std::size_t>(d);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    constexpr int block = 64;
    std::vector<float> qg(Sz * Gz * dz), og(Sz * Gz * dz);  // (S, group, d) of one KV head
    std::vector<float> p(static_cast<std::size_t>(block) * Gz * Sz);
    for (int g = 0; g < c.kv_heads; ++g) {
      const std::size_t col = static_cast<std::size_t>(g) * Gz * dz;  // first head of the group
      for (std::size_t t = 0; t < Sz; ++t) std::copy_n(q + t * QD + col, Gz * dz, &qg[t * Gz * dz]);
      for (int i0 = 0; i0 < S; i0 += block) {
        const int i1 = std::min(S, i0 + block), cols = i1;
        const auto rows = static_cast<std::size_t>(i1 - i0) * Gz,
                   ld = static_cast<std::size_t>(cols);
        const std::size_t at = static_cast<std::size_t>(i0) * Gz * dz;
        gemm(true, rows, ld, dz, scale, &qg[at], dz, k + static_cast<std::size_t>(g) * dz, KD, 0.0f,
             p.data(), ld);
        for (std::size_t r = 0; r < rows; ++r) {
          float* row = &p[r * ld];
          const int valid = i0 + static_cast<int>(r / Gz) + 1;  // keys 0..token
          float mx = row[0];
          for (int j = 1; j < valid; ++j) mx = std::max(mx, row[j]);
          for (int j = 0; j < valid; ++j) row[j] -= mx;
          kernels::exp_inplace(row, static_cast<std::size_t>(valid));
          float sum = 0.0f;
          for (int j = 0; j < valid; ++j) sum += row[j];
          const float inv = 1.0f / sum;
          for (int j = 0; j < valid; ++j) row[j] *= inv;
          for (int j = valid; j < cols; ++j) row[j] = 0.0f;
        }
        gemm(false, rows, dz, ld, 1.0f, p.data(), ld, v + static_cast<std::size_t>(g) * dz, KD,
             0.0f, &og[at], dz);
      }
      for (std::size_t t = 0; t < Sz; ++t)
        std::copy_n(&og[t * Gz * dz], Gz * dz, out + t * QD + col);
    }
  }

  // One query row (heads*d) against a span.
  void attend_one(const float* q, const AttendSpan& s, float* out) const {
    const ModelConfig& c = m_.cfg;
    const int d = c.head_dim, group = c.heads / c.kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> p(static_cast<std::size_t>(s.tokens));
    for (int hd = 0; hd < c.heads; ++hd) {
      const int g = hd / group;
      const std::int64_t n =
          s.head_tokens.empty() ? s.tokens : s.head_tokens[static_cast<std::size_t>(g)];
      const float* qh = q + static_cast<std::ptrdiff_t>(hd) * d;
      float* oh = out + static_cast<std::ptrdiff_t>(hd) * d;
      if (!s.blocks) {
        kernels::attend(qh, s.k + g * s.k_head_stride, s.k_token_stride, s.v + g * s.v_head_stride,
                        s.v_token_stride, n, d, scale, p.data(), oh);
        continue;
      }
      const float* kh = s.k + g * s.k_head_stride;
      const float* vh = s.v + g * s.v_head_stride;
      const std::int64_t bs = s.block_size;
      kernels::attend_rows(
          qh,
          [&](std::int64_t j) {
            return kh + s.blocks[j / bs] * s.k_block_stride + (j % bs) * s.k_token_stride;
          },
          [&](std::int64_t j) {
            return vh + s.blocks[j / bs] * s.v_block_stride + (j % bs) * s.v_token_stride;
          },
          n, d, scale, p.data(), oh);
    }
  }
};

inline int argmax(const float* x, std::size_t n) {
  return static_cast<int>(std::max_element(x, x + n) - x);
}

}  // namespace llm
