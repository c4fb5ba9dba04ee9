// The evaluation's attention probe: of what the full cache's decoding queries read
// among the prompt's tokens, how much lies on tokens another store still holds. It
// asks "what did the eviction leave of what the model reads" without the compared
// store's own (already perturbed) queries: the weights are the full model's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "model.hpp"

namespace llm {

// The pieces (tokens as text, in order) whose text overlaps the first occurrence of
// `key` in their concatenation: [first, last), or {-1, -1} when it is absent.
inline std::pair<int, int> key_span(const std::vector<std::string>& pieces,
                                    const std::string& key) {
  std::string text;
  std::vector<std::size_t> ends;
  for (const auto& p : pieces) ends.push_back((text += p).size());
  const std::size_t at = text.find(key);
  int first = -1, last = -1;
  for (std::size_t i = 0; at != std::string::npos && !key.empty() && i < ends.size(); ++i)
    if (ends[i] > at && (i ? ends[i - 1] : 0) < at + key.size()) {
      if (first < 0) first = static_cast<int>(i);
      last = static_cast<int>(i) + 1;
    }
  return {first, last};
}

// The decoding steps that produced the key in an answer: pieces[0] comes from the
// prefill's logits, pieces[i] from decoding step i - 1 (whose query is token i - 1).
// A key piece from the prefill has no step: every store still held the whole prompt
// when it was decoded. Empty when the key is not in the answer.
inline std::vector<int> key_steps(const std::vector<std::string>& pieces, const std::string& key) {
  const auto [first, last] = key_span(pieces, key);
  std::vector<int> out;
  for (int i = std::max(first, 1); i < last; ++i) out.push_back(i - 1);
  return out;
}

// Wraps the full cache's store (dense, position order, as FullStore). Each of the
// first `steps` appends to a layer scores that step's queries (every head) against
// every key the full cache holds with the model's scaled softmax, and sums the weights
// on the prompt's positions: on the key's positions [key_first, key_last) and on the
// rest, in all, and on the positions each compared store holds in the KV-head row the
// query head reads. The compared stores' rows are taken when the probe is made (after
// their prefill): what they hold while the full cache decodes is what their prefill
// left. Decoding through the probe is decoding through the wrapped store.
class AttentionProbe final : public KvStore {
 public:
  struct Mass {
    double key = 0, rest = 0;  // summed over the query heads
  };

  AttentionProbe(const ModelConfig& c, std::unique_ptr<KvStore> full, std::int64_t prompt_tokens,
                 std::int64_t key_first, std::int64_t key_last,
                 const std::vector<const KvStore*>& compared, int steps)
      : c_(c),
        inner_(std::move(full)),
        S_(prompt_tokens),
        key_first_(key_first),
        key_last_(key_last),
        n_(compared.size()),
        steps_(steps) {
    if (!inner_)
      throw std::invalid_argument("AttentionProbe: full store: expected a store, got null");
    if (prompt_tokens <= 0 || steps < 0 || key_first < 0 || key_last < key_first ||
        key_last > prompt_tokens)
      throw std::invalid_argument(
          "AttentionProbe: expected 0 <= key_first <= key_last <= prompt_tokens > 0 and steps >= "
          "0, got key [" +
          std::to_string(key_first) + ", " + std::to_string(key_last) + "), prompt_tokens " +
          std::to_string(prompt_tokens) + ", steps " + std::to_string(steps));
    const auto L = static_cast<std::size_t>(c.layers), G = static_cast<std::size_t>(c.kv_heads),
               S = static_cast<std::size_t>(S_);
    held_rows_.assign(n_ * L * G, std::vector<std::uint8_t>(S, 0));
    for (std::size_t s = 0; s < n_; ++s)
      for (std::size_t l = 0; l < L; ++l) {
        const auto rows = compared[s]->positions(static_cast<int>(l));
        if (!rows.empty() && rows.size() != G)
          throw std::invalid_argument("AttentionProbe: compared store " + std::to_string(s) +
                                      ", layer " + std::to_string(l) + ": expected " +
                                      std::to_string(G) + " KV-head rows, got " +
                                      std::to_string(rows.size()));
        for (std::size_t g = 0; g < G; ++g) {
          auto& mask = held_rows_[(s * L + l) * G + g];
          if (rows.empty()) {  // a store that keeps everything
            std::fill(mask.begin(), mask.end(), std::uint8_t{1});
            continue;
          }
          for (std::int64_t p : rows[g])
            if (p >= 0 && p < S_) mask[static_cast<std::size_t>(p)] = 1;
        }
      }
    total_.assign(static_cast<std::size_t>(steps) * L, Mass{});
    held_.assign(static_cast<std::size_t>(steps) * L * n_, Mass{});
    appended_.assign(L, 0);
  }

  void prefill(const PrefillRecord& rec) override { inner_->prefill(rec); }

  AttendSpan append(int l, const float* q, const float* k, const float* v) override {
    AttendSpan s = inner_->append(l, q, k, v);
    const int step = appended_.at(static_cast<std::size_t>(l))++;
    if (step < steps_) record(step, l, q, s);
    return s;
  }

  std::int64_t tokens_held() const override { return inner_->tokens_held(); }

  int steps() const { return steps_; }
  std::size_t compared() const { return n_; }
  // The weight step `step`'s queries of layer l put on the prompt's tokens.
  Mass total(int step, int l) const { return total_.at(index(step, l)); }
  // Of it, the weight on the tokens compared store `s` holds.
  Mass held(int step, int l, std::size_t s) const {
    if (s >= n_)
      throw std::out_of_range("AttentionProbe::held: store " + std::to_string(s) + " of " +
                              std::to_string(n_));
    return held_.at(index(step, l) * n_ + s);
  }

 private:
  std::size_t index(int step, int l) const {
    if (step < 0 || step >= steps_ || l < 0 || l >= c_.layers)
      throw std::out_of_range("AttentionProbe: step " + std::to_string(step) + " of " +
                              std::to_string(steps_) + ", layer " + std::to_string(l) + " of " +
                              std::to_string(c_.layers));
    return static_cast<std::size_t>(step) * static_cast<std::size_t>(c_.layers) +
           static_cast<std::size_t>(l);
  }

  void record(int step, int l, const float* q, const AttendSpan& s) {
    if (s.blocks || !s.head_tokens.empty() || s.tokens < S_)
      throw std::logic_error(
          "AttentionProbe: the wrapped store must be dense and hold every token");
    const int d = c_.head_dim, group = c_.heads / c_.kv_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    const auto G = static_cast<std::size_t>(c_.kv_heads);
    const auto n = static_cast<std::size_t>(s.tokens);
    std::vector<double> w(n);
    Mass& tot = total_[index(step, l)];
    for (int hd = 0; hd < c_.heads; ++hd) {
      const int g = hd / group;
      const float* qh = q + static_cast<std::ptrdiff_t>(hd) * d;
      double mx = -INFINITY;
      for (std::size_t j = 0; j < n; ++j) {
        const float* kj =
            s.k + g * s.k_head_stride + static_cast<std::ptrdiff_t>(j) * s.k_token_stride;
        double dot = 0;
        for (int x = 0; x < d; ++x) dot += static_cast<double>(qh[x]) * kj[x];
        w[j] = dot * scale;
        mx = std::max(mx, w[j]);
      }
      double sum = 0;
      for (auto& x : w) sum += (x = std::exp(x - mx));
      for (auto& x : w) x /= sum;
      const Mass t = split(w, nullptr);
      tot.key += t.key;
      tot.rest += t.rest;
      for (std::size_t c = 0; c < n_; ++c) {
        const auto& mask =
            held_rows_[(c * static_cast<std::size_t>(c_.layers) + static_cast<std::size_t>(l)) * G +
                       static_cast<std::size_t>(g)];
        const Mass m = split(w, mask.data());
        Mass& h = held_[index(step, l) * n_ + c];
        h.key += m.key;
        h.rest += m.rest;
      }
    }
  }

  // The weights of the prompt's tokens on the key's and on the rest; with a mask, of
  // the tokens it marks only (the same order of sums either way).
  Mass split(const std::vector<double>& w, const std::uint8_t* mask) const {
    const auto sum = [&](std::int64_t a, std::int64_t b) {
      double t = 0;
      for (auto j = static_cast<std::size_t>(a); j < static_cast<std::size_t>(b); ++j)
        if (!mask || mask[j]) t += w[j];
      return t;
    };
    return {sum(key_first_, key_last_), sum(0, key_first_) + sum(key_last_, S_)};
  }

  ModelConfig c_;
  std::unique_ptr<KvStore> inner_;
  std::int64_t S_, key_first_, key_last_;
  std::size_t n_;
  int steps_;
  std::vector<std::vector<std::uint8_t>> held_rows_;  // (compared, layers, kv_heads) masks of S
  std::vector<Mass> total_;                           // (steps, layers)
  std::vector<Mass> held_;                            // (steps, layers, compared)
  std::vector<int> appended_;                         // per layer: appends so far
};

}  // namespace llm
