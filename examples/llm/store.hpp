// clang-format off
// KV stores backed by cake::KvCache, and the engine's method names:
//   full          every token (FullStore)
//   cake          cake::methods::Cake          (CakePreference, ProportionalBudget,
//                                               MeanVarianceIndicator)
//   snapkv        cake::methods::SnapKv        (uniform budgets, window-mean indicator)
//   pyramidkv     cake::methods::PyramidKv     (pyramid budgets, window-mean indicator)
//   streamingllm  cake::methods::StreamingLlm  (4 attention sinks + recent tokens)
//   h2o           cake::methods::H2o           (accumulated attention)
//   tova          cake::methods::Tova          (the last query's attention)
//   ada_snapkv    cake::methods::AdaSnapKv     (SnapKV with head-wise budgets)
//   cake_adakv    cake::methods::CakeAdaKv     (CAKE's layer budgets x head-wise budgets)
//   cake_tova     CAKE's layer budgets (CakePreference, ProportionalBudget) with TOVA's
//                 last-query indicator
//   cake_h2o      CAKE's layer budgets with H2O's accumulated-attention indicator
//   cake_adakv_tova  CAKE's layer budgets x head-wise budgets, TOVA's indicator
// The last three are compositions of the library's policies that no published
// method uses.
// clang-format on
#pragma once

#include <cake/cake.hpp>

#include <algorithm>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model.hpp"
#include "paged.hpp"
#include "tokenizer.hpp"

namespace llm {

struct CacheOptions {
  std::string method = "cake";
  int cache_size = 256;  // tokens per layer on average, window included
  int window = 32;
  float tau1 = 1.0f, tau2 = 1.0f, gamma = 200.0f;
  // A paged store's tokens in its blocks: in token order, or in any order within the
  // first slots (a decoding step then moves one K/V row per head; attention here reads
  // every held slot and RoPE is in K already, so the order does not matter to it).
  cake::slot_order paged_slots = cake::slot_order::token;
  // An intervention for the evaluation (--whole-layers): bit l set, layer l keeps every
  // token of the prompt and the method's budget policy shares the rest of the total
  // among the other layers (cake and snapkv only).
  std::uint64_t whole_layers = 0;
};

// A budget policy that gives the layers in `whole` every token (the ceiling) and the
// other layers what Inner gives them from the rest of the total, as if the whole layers
// were not there: the same memory as Inner, moved into those layers. An intervention
// that asks whether a layer's budget is what a method lacks, not a method.
template <class Inner>
struct WholeLayers {
  Inner inner{};
  std::uint64_t whole = 0;  // bit l: layer l keeps everything (layers below 64)
  void operator()(std::span<const float> prefs, cake::index_t num_layers, cake::index_t total,
                  cake::index_t ceiling, std::span<cake::index_t> out) const {
    const auto is_whole = [&](std::size_t l) { return l < 64 && (whole >> l & 1); };
    cake::index_t n_whole = 0;
    for (cake::index_t l = 0; l < num_layers; ++l) n_whole += is_whole(static_cast<std::size_t>(l));
    std::vector<float> p;  // the other layers seen so far, in order
    for (std::size_t l = 0; l < prefs.size(); ++l)
      if (!is_whole(l)) p.push_back(prefs[l]);
    // A whole layer is capped where the total cannot hold them all (the others get 0).
    const cake::index_t each = n_whole ? std::min(ceiling, total / n_whole) : 0;
    std::vector<cake::index_t> o(p.size());
    inner(p, num_layers - n_whole, total - n_whole * each, ceiling, o);
    for (std::size_t l = 0, j = 0; l < prefs.size(); ++l) out[l] = is_whole(l) ? each : o[j++];
  }
  cake::status validate() const { return inner.validate(); }
};

// The layers of a whole-layers mask, ascending.
inline std::vector<int> whole_layer_list(std::uint64_t whole) {
  std::vector<int> out;
  for (int l = 0; l < 64; ++l)
    if (whole >> l & 1) out.push_back(l);
  return out;
}
// Whether `method` on a model of `layers` layers can take the whole-layers mask: throws
// naming what is wrong (make_store calls it; the evaluation before any prompt runs).
inline void check_whole_layers(int layers, std::uint64_t whole, const std::string& method) {
  if (!whole) return;
  if (layers < 64 && (whole >> layers) != 0)
    throw std::runtime_error("--whole-layers: a layer past the model's " + std::to_string(layers));
  if (method != "cake" && method != "snapkv")
    throw std::runtime_error("--whole-layers: only for cake and snapkv, not " + method);
}

// A cake::KvCache of one sequence (batch 1). Dense: the cache holds the K/V. Paged
// (a BlockPool given): the K/V live in the pool's blocks, which this store takes
// from the pool as the sequence needs them and gives back as soon as the cache
// reports them freed; the cache compacts the kept tokens in place.
template <class Cache>
class CakeStore final : public KvStore {
 public:
  CakeStore(const ModelConfig& c, cake::CacheConfig cfg, Cache cache, BlockPool* pool = nullptr)
      : c_(c), cfg_(cfg), cache_(std::move(cache)), pool_(pool) {
    if (pool_) ids_.resize(static_cast<std::size_t>(c.layers));
  }
  CakeStore(const CakeStore&) = delete;
  CakeStore& operator=(const CakeStore&) = delete;
  ~CakeStore() override {
    if (!pool_) return;
    for (int l = 0; l < c_.layers; ++l)  // the sequence is over: its blocks go back
      for (std::int32_t id : ids_[static_cast<std::size_t>(l)]) pool_->release(l, id, false);
  }

  void prefill(const PrefillRecord& rec) override {
    using cake::index_t;
    const index_t S = rec.tokens, H = c_.heads, Hkv = c_.kv_heads, d = c_.head_dim, w = cfg_.window;
    if (rec.tail < w)
      throw std::runtime_error("store: the prefill kept fewer query rows than the window");
    const index_t QD = c_.q_dim(), KD = c_.kv_dim();
    for (int l = 0; l < c_.layers; ++l) {
      const auto L = static_cast<std::size_t>(l);
      // The record keeps (tokens, heads, d) rows: strided views, nothing copied.
      const float* qt = rec.q_tail[L].data() + static_cast<std::ptrdiff_t>(rec.tail - w) * QD;
      auto q = cake::make_view(qt, std::array<index_t, 4>{1, H, w, d},
                               std::array<index_t, 4>{w * QD, d, QD, 1});
      if (pool_) {
        prefill_paged(l, q, rec);
        continue;
      }
      auto k = cake::make_view(rec.k[L].data(), std::array<index_t, 4>{1, Hkv, S, d},
                               std::array<index_t, 4>{S * KD, d, KD, 1});
      auto v = cake::make_view(rec.v[L].data(), std::array<index_t, 4>{1, Hkv, S, d},
                               std::array<index_t, 4>{S * KD, d, KD, 1});
      cache_.prefill(l, q, k, v);
    }
  }

  AttendSpan append(int l, const float* q, const float* k, const float* v) override {
    using cake::index_t;
    const index_t H = c_.heads, Hkv = c_.kv_heads, d = c_.head_dim;
    const auto qv = cake::make_view(q, std::array<index_t, 3>{1, H, d});
    const auto kv = cake::make_view(k, std::array<index_t, 3>{1, Hkv, d});
    const auto vv = cake::make_view(v, std::array<index_t, 3>{1, Hkv, d});
    AttendSpan s;
    if (pool_) {
      auto& ids = ids_[static_cast<std::size_t>(l)];
      const std::int32_t len = cache_.table(l).seq_lens(0), bs = pool_->block_size();
      if (len + 1 > static_cast<std::int32_t>(ids.size()) * bs)  // room for the new token
        ids.push_back(pool_->allocate(l));
      const std::int32_t indptr[2] = {0, static_cast<std::int32_t>(ids.size())};
      cache_.decode(l, qv, kv, vv, cake::make_block_table(indptr, ids.data(), &len, 1));
      release_freed(l);
      s.k = pool_->k(l);
      s.v = pool_->v(l);
      s.k_head_stride = s.v_head_stride = pool_->head_stride();
      s.k_token_stride = s.v_token_stride = pool_->token_stride();
      s.k_block_stride = s.v_block_stride = pool_->block_stride();
      s.block_size = bs;
      s.blocks = ids.data();
      s.tokens = cache_.table(l).seq_lens(0);
    } else {
      cache_.decode(l, qv, kv, vv);
      const auto K = cache_.keys(l);
      const auto V = cache_.values(l);
      s.k = K.data_handle();
      s.v = V.data_handle();
      s.k_head_stride = static_cast<std::ptrdiff_t>(K.stride(1));
      s.k_token_stride = static_cast<std::ptrdiff_t>(K.stride(2));
      s.v_head_stride = static_cast<std::ptrdiff_t>(V.stride(1));
      s.v_token_stride = static_cast<std::ptrdiff_t>(V.stride(2));
      s.tokens = static_cast<std::int64_t>(K.extent(2));
    }
    if constexpr (cake::is_headwise_budget<typename Cache::budget_policy>)
      for (index_t n : cache_.row_lengths(l)) s.head_tokens.push_back(n);
    return s;
  }

  std::int64_t tokens_held() const override {
    return static_cast<std::int64_t>(cache_.tokens_held());
  }
  // A dense store's cache copied (cake::KvCache copies deeply); a paged one's blocks
  // belong to one sequence of the pool: not copied.
  std::unique_ptr<KvStore> clone() const override {
    if (pool_) return nullptr;
    return std::make_unique<CakeStore>(c_, cfg_, Cache(cache_));
  }
  std::int64_t blocks_held() const override {
    std::int64_t n = 0;
    for (const auto& ids : ids_) n += static_cast<std::int64_t>(ids.size());
    return n;
  }
  // Paged: the cache's table(l) after every call.
  std::vector<std::int32_t> blocks(int l) const override {
    return pool_ ? ids_.at(static_cast<std::size_t>(l)) : std::vector<std::int32_t>{};
  }
  const Cache& cache() const { return cache_; }

  std::vector<double> rows_holding(int first, int last, bool every = false) const override {
    std::vector<double> out;
    for (int l = 0; l < c_.layers; ++l) {
      const auto rows = positions(l);
      int n = 0;
      for (const auto& row : rows) {
        std::int64_t hits = 0;  // positions are distinct within a row
        for (std::int64_t p : row) hits += p >= first && p < last;
        n += every ? hits == last - first : hits > 0;
      }
      out.push_back(static_cast<double>(n) / static_cast<double>(rows.size()));
    }
    return out;
  }

  std::vector<std::vector<std::int64_t>> positions(int l) const override {
    const auto pos = cache_.positions(l);  // (1, kv_heads, held); padding is -1
    std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(pos.extent(1)));
    for (cake::index_t h = 0; h < pos.extent(1); ++h)
      for (cake::index_t j = 0; j < pos.extent(2); ++j)
        if (pos(0, h, j) >= 0) out[static_cast<std::size_t>(h)].push_back(pos(0, h, j));
    return out;
  }

  std::vector<LayerDecision> layer_decisions() const override {
    std::vector<LayerDecision> out;
    if constexpr (std::is_same_v<typename Cache::preference_policy, cake::CakePreference>)
      for (int l = 0; l < c_.layers; ++l) {
        const cake::LayerStats st = cache_.stats(l);
        out.push_back({st.entropy, st.variance, cache_.preference(l),
                       static_cast<std::int64_t>(cache_.budget(l))});
      }
    return out;
  }

 private:
  ModelConfig c_;
  cake::CacheConfig cfg_;
  Cache cache_;
  BlockPool* pool_ = nullptr;
  std::vector<std::vector<std::int32_t>> ids_;  // paged: per layer, the blocks held

  // Layer l's prompt goes into fresh blocks of the pool (its K/V rows from the
  // record), then the cache selects in place; with cascading it may shrink the
  // earlier layers too.
  template <class QView>
  void prefill_paged(int l, const QView& q, const PrefillRecord& rec) {
    using cake::index_t;
    const auto L = static_cast<std::size_t>(l);
    const int S = rec.tokens, bs = pool_->block_size(), Hkv = c_.kv_heads, d = c_.head_dim;
    const auto KD = static_cast<std::size_t>(c_.kv_dim());
    auto& ids = ids_[L];
    while (static_cast<std::int64_t>(ids.size()) * bs < S) ids.push_back(pool_->allocate(l));
    float* kp = pool_->k(l);
    float* vp = pool_->v(l);
    for (int t = 0; t < S; ++t)
      for (int g = 0; g < Hkv; ++g) {
        const std::ptrdiff_t at = ids[static_cast<std::size_t>(t / bs)] * pool_->block_stride() +
                                  g * pool_->head_stride() + (t % bs) * pool_->token_stride();
        const std::size_t from = static_cast<std::size_t>(t) * KD + static_cast<std::size_t>(g * d);
        std::copy_n(rec.k[L].data() + from, d, kp + at);
        std::copy_n(rec.v[L].data() + from, d, vp + at);
      }
    const std::array<index_t, 4> ext{pool_->blocks(), Hkv, bs, d};
    const std::int32_t indptr[2] = {0, static_cast<std::int32_t>(ids.size())}, lens[1] = {S};
    const cake::paged_kv<float> kv{cake::make_view(kp, ext), cake::make_view(vp, ext),
                                   cake::make_block_table(indptr, ids.data(), lens, 1)};
    cache_.prefill(l, q, kv);
    for (int m = 0; m <= l; ++m) release_freed(m);
  }

  // The blocks the cache's latest call let go of in layer l (the tail of the table
  // it was given) go back to the pool; what stays is the cache's table(l).
  void release_freed(int l) {
    auto& ids = ids_[static_cast<std::size_t>(l)];
    const std::int32_t n = cache_.freed(l)[0];
    for (std::int32_t e = 0; e < n; ++e) {
      pool_->release(l, ids.back(), true);
      ids.pop_back();
    }
    const auto t = cache_.table(l);
    bool same = t.indptr(1) == static_cast<std::int32_t>(ids.size());
    for (std::size_t e = 0; same && e < ids.size(); ++e)
      same = t.ids(static_cast<cake::index_t>(e)) == ids[e];
    if (!same)
      throw std::logic_error("paged store: layer " + std::to_string(l) +
                             "'s blocks differ from the cache's table");
  }
};

// The library's host kernels use OpenMP; at batch 1 their work per call is small,
// and OpenMP threads spinning beside BLAS threads on a small machine cost far more
// than they give (10x slower decoding on 2 busy cores). One thread unless asked.
inline void set_cache_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(std::max(n, 1));
#else
  (void)n;
#endif
}

inline const std::vector<std::string>& method_names() {
  static const std::vector<std::string> names{
      "full", "cake",       "snapkv",     "pyramidkv", "streamingllm", "h2o",
      "tova", "ada_snapkv", "cake_adakv", "cake_tova", "cake_h2o",     "cake_adakv_tova"};
  return names;
}

inline bool known_method(const std::string& m) {
  const auto& n = method_names();
  return std::find(n.begin(), n.end(), m) != n.end();
}

// A store for `method`, sized for a prompt of `prompt_tokens` tokens. The window is
// shortened for prompts shorter than it (the library needs S >= window).
// With a pool, the cache works on the pool's blocks (paged); "full" (and a prompt too
// short to evict from) keeps every token in a dense FullStore either way.
inline std::unique_ptr<KvStore> make_store(const ModelConfig& c, const CacheOptions& o,
                                           int prompt_tokens, BlockPool* pool = nullptr) {
  if (!known_method(o.method)) {
    std::string all;
    for (const auto& n : method_names()) all += (all.empty() ? "" : ", ") + n;
    throw std::runtime_error("unknown method '" + o.method + "' (" + all + ")");
  }
  const int w = std::min(o.window, prompt_tokens);
  if (o.method == "full" || w < 2 || o.cache_size <= w) {
    if (o.method != "full" && o.cache_size <= w)
      throw std::runtime_error("cache size must exceed the window (" + std::to_string(w) + ")");
    return std::make_unique<FullStore>(c);
  }
  cake::CacheConfig cfg;
  cfg.layers = c.layers;
  cfg.batch = 1;
  cfg.q_heads = c.heads;
  cfg.kv_heads = c.kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.window = w;
  cfg.cache_size = o.cache_size;
  cfg.cascade = true;
  cfg.paged_slots = o.paged_slots;
  namespace m = cake::methods;
  const auto store = [&]<class C>(C cache) -> std::unique_ptr<KvStore> {
    return std::make_unique<CakeStore<C>>(c, cfg, std::move(cache), pool);
  };
  const cake::CakePreference pref{o.tau1, o.tau2};
  const cake::MeanVarianceIndicator ind{o.gamma, 5};
  check_whole_layers(c.layers, o.whole_layers, o.method);
  if (o.whole_layers) {
    if (o.method == "cake")
      return store(
          cake::KvCache<cake::CakePreference, WholeLayers<cake::ProportionalBudget>,
                        cake::MeanVarianceIndicator>(cfg, pref, {{}, o.whole_layers}, ind));
    if (o.method == "snapkv")
      return store(cake::KvCache<cake::UniformPreference, WholeLayers<cake::UniformBudget>,
                                 cake::WindowMeanIndicator>(cfg, {}, {{}, o.whole_layers}));
  }
  if (o.method == "cake") return store(m::Cake<>(cfg, pref, {}, ind));
  if (o.method == "snapkv") return store(m::SnapKv<>(cfg));
  if (o.method == "pyramidkv") return store(m::PyramidKv<>(cfg));
  if (o.method == "streamingllm") return store(m::StreamingLlm<>(cfg));
  if (o.method == "h2o") return store(m::H2o<>(cfg));
  if (o.method == "tova") return store(m::Tova<>(cfg));
  if (o.method == "ada_snapkv") return store(m::AdaSnapKv<>(cfg));
  if (o.method == "cake_adakv") return store(m::CakeAdaKv<>(cfg, pref, {}, ind));
  if (o.method == "cake_tova")
    return store(
        cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::LastQueryIndicator>(
            cfg, pref));
  if (o.method == "cake_h2o")
    return store(
        cake::KvCache<cake::CakePreference, cake::ProportionalBudget, cake::AccumulatedIndicator>(
            cfg, pref));
  return store(cake::KvCache<cake::CakePreference, cake::HeadwiseBudget<cake::ProportionalBudget>,
                             cake::LastQueryIndicator>(cfg, pref));
}

inline Tokenizer load_tokenizer(const GgufFile& f) {
  const std::string model = f.get_string("tokenizer.ggml.model");
  if (model != "gpt2")
    throw std::runtime_error("tokenizer: model '" + model + "' is not byte-level BPE (gpt2)");
  std::vector<int> types;
  if (f.has("tokenizer.ggml.token_type"))
    for (double t : f.meta("tokenizer.ggml.token_type").numbers)
      types.push_back(static_cast<int>(t));
  return Tokenizer(f.meta("tokenizer.ggml.tokens").strings, f.meta("tokenizer.ggml.merges").strings,
                   types);
}

// SmolLM2's chat template with its default system prompt.
inline std::string chat_prompt(const std::string& user) {
  return "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
         "Face<|im_end|>\n"
         "<|im_start|>user\n" +
         user + "<|im_end|>\n<|im_start|>assistant\n";
}

// The model file: --model, else $CAKE_MODEL, else where scripts/fetch-model caches it.
inline std::string default_model_path() {
  if (const char* m = std::getenv("CAKE_MODEL"); m && *m) return m;
  std::string base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x)
    base = x;
  else if (const char* h = std::getenv("HOME"); h && *h)
    base = std::string(h) + "/.cache";
  else
    base = ".cache";
  return base + "/cake/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// Greedy decoding of up to max_new tokens after a prefill, into one store; stops
// at an end-of-text token. The first token comes from the prefill's logits.
inline std::vector<int> generate(Transformer& tf, const PrefillRecord& rec, KvStore& store,
                                 int max_new, const std::vector<int>& stop = {}) {
  std::vector<int> out;
  if (max_new <= 0) return out;
  const auto V = static_cast<std::size_t>(tf.config().vocab);
  int tok = argmax(rec.last_logits.data(), V);
  out.push_back(tok);
  std::vector<float> logits;
  for (int t = 1; t < max_new; ++t) {
    if (std::find(stop.begin(), stop.end(), tok) != stop.end()) break;
    tf.decode({tok}, {static_cast<std::int64_t>(rec.tokens) + t - 1}, {&store}, logits);
    tok = argmax(logits.data(), V);
    out.push_back(tok);
  }
  return out;
}

// Greedy decoding of several prompts at once, sequence i in stores[i] after its
// prefill recs[i]: every step decodes the sequences still running, in groups of up
// to Transformer::fused_rows, whose products compute each row on its own, so every
// sequence's tokens are the ones generate() gives it alone. A sequence stops at an
// end-of-text token or after max_new tokens.
inline std::vector<std::vector<int>> serve(Transformer& tf,
                                           const std::vector<const PrefillRecord*>& recs,
                                           const std::vector<KvStore*>& stores, int max_new,
                                           const std::vector<int>& stop = {}) {
  if (recs.size() != stores.size())
    throw std::runtime_error("serve: one store per prompt is needed");
  const std::size_t n = recs.size();
  std::vector<std::vector<int>> out(n);
  if (max_new <= 0) return out;
  const auto V = static_cast<std::size_t>(tf.config().vocab);
  for (std::size_t i = 0; i < n; ++i) out[i].push_back(argmax(recs[i]->last_logits.data(), V));
  std::vector<float> logits;
  for (int t = 1; t < max_new; ++t) {
    std::vector<std::size_t> live;
    for (std::size_t i = 0; i < n; ++i)
      if (std::find(stop.begin(), stop.end(), out[i].back()) == stop.end()) live.push_back(i);
    for (std::size_t a = 0; a < live.size(); a += Transformer::fused_rows) {
      const std::size_t b = std::min(live.size(), a + Transformer::fused_rows);
      std::vector<int> toks;
      std::vector<std::int64_t> pos;
      std::vector<KvStore*> group;
      for (std::size_t j = a; j < b; ++j) {
        const std::size_t i = live[j];
        toks.push_back(out[i].back());
        pos.push_back(static_cast<std::int64_t>(recs[i]->tokens) + t - 1);
        group.push_back(stores[i]);
      }
      tf.decode(toks, pos, group, logits);
      for (std::size_t j = a; j < b; ++j)
        out[live[j]].push_back(argmax(logits.data() + (j - a) * V, V));
    }
  }
  return out;
}

}  // namespace llm
