// Differential testing: every method of cake/methods.hpp against a float64 model
// written here from the spec (docs: cake-algorithm.md) and the policy headers'
// documented semantics, without the library's code paths (no window_stats,
// select_k, allocate_*, decode_scores). Many random configurations (shapes, GQA
// groups, windows, budgets, cascade on/off, both token orders), each prefilled
// layer by layer and then decoded for hundreds of steps.
//
// Every decision (a prefill cut, a cascade truncation, a decode eviction, a
// head-wise split) is compared as a set: the positions the library keeps must be
// the model's. Where they differ, the difference must be a tie: every token the
// library kept instead of one the model kept scores within the tie margin of it
// (relative 1e-5: float32 against float64 rounding). Such cases, and the near-ties
// at the boundary of the k-th and (k+1)-th score that did not change the result,
// are counted and printed. After each decision the model adopts the library's
// state (set and cache order), so a tie never cascades into later steps and every
// step is checked on its own.
#include <doctest/doctest.h>

#include <cake/cake.hpp>
#include <cake/methods.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using cake::index_t;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_UNDEFINED__)
constexpr int kScale = 6;  // the sanitized Debug build runs a sixth of the work
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr int kScale = 6;
#else
constexpr int kScale = 1;
#endif
#else
constexpr int kScale = 1;
#endif

constexpr double kTieRel = 1e-5;  // relative margin within which two scores are a tie

bool within_tie(double a, double b) {
  return std::abs(a - b) <= kTieRel * std::max(std::abs(a), std::abs(b)) + 1e-30;
}

enum class Ind { mean_var, window_mean, last_query, accumulated, sink_recency };
enum class Bud { proportional, uniform, pyramid };

struct Method {
  std::string name;
  Ind ind;
  Bud bud;
  bool cake_pref;
  bool headwise;
  float tau1 = 1, tau2 = 1, gamma = 200, beta = 20, min_share = 0.2f;
  int pool = 5;
  index_t sinks = 4;
};

struct Counters {
  long configs = 0, decode_steps = 0, decisions = 0, near_ties = 0, tie_mismatches = 0,
       budget_ties = 0;
};

// ---- the model's arithmetic -------------------------------------------------

// Spec section 4, steps 2-4: clamp at the ceiling and share the excess among the
// layers below it, move the rounding difference onto eligible layers, cap again.
std::vector<index_t> settle(std::vector<index_t> b, index_t total, index_t ceil) {
  index_t excess = 0;
  for (auto& x : b)
    if (x > ceil) excess += x - ceil, x = ceil;
  if (excess > 0) {
    std::vector<std::size_t> below;
    for (std::size_t l = 0; l < b.size(); ++l)
      if (b[l] < ceil) below.push_back(l);
    if (!below.empty()) {
      const index_t cnt = static_cast<index_t>(below.size());
      for (index_t i = 0; i < cnt; ++i)
        b[below[static_cast<std::size_t>(i)]] += excess / cnt + (i < excess % cnt ? 1 : 0);
    }
  }
  const index_t diff = total - std::accumulate(b.begin(), b.end(), index_t{0});
  if (diff != 0) {
    std::vector<std::size_t> elig;
    for (std::size_t l = 0; l < b.size(); ++l)
      if (diff > 0 ? b[l] < ceil : b[l] > 1) elig.push_back(l);
    if (!elig.empty()) {
      const index_t cnt = static_cast<index_t>(elig.size()), mag = std::abs(diff);
      for (index_t i = 0; i < cnt; ++i)
        b[elig[static_cast<std::size_t>(i)]] +=
            (diff > 0 ? 1 : -1) * (mag / cnt + (i < mag % cnt ? 1 : 0));
    }
  }
  for (auto& x : b) x = std::min(x, ceil);
  return b;
}

// Budgets of layers 0..prefs.size()-1; *near_integer tells whether a proportional
// raw budget lies so close to an integer that float32 may truncate it differently.
std::vector<index_t> allocate(const Method& m, const std::vector<double>& prefs, index_t L,
                              index_t T, index_t R, bool* near_integer) {
  *near_integer = false;
  const std::size_t n = prefs.size();
  std::vector<index_t> out;
  if (m.bud == Bud::proportional) {
    const double sum = std::accumulate(prefs.begin(), prefs.end(), 0.0);
    for (double p : prefs) {
      const double raw = sum > 0 ? p / sum * static_cast<double>(T) : 0.0;
      if (std::abs(raw - std::round(raw)) <= 1e-4 * std::max(1.0, raw) && std::round(raw) > 0)
        *near_integer = true;
      out.push_back(static_cast<index_t>(raw));
    }
    return settle(out, T, R);
  }
  std::vector<index_t> all(static_cast<std::size_t>(L));
  for (index_t l = 0; l < L; ++l) {
    if (m.bud == Bud::uniform) {
      all[static_cast<std::size_t>(l)] = T / L + (l < T % L ? 1 : 0);
    } else {  // pyramid: linear from 2T/L - T/(beta L) down to T/(beta L)
      const double avg = static_cast<double>(T) / static_cast<double>(L);
      const double low = avg / static_cast<double>(m.beta), high = 2 * avg - low;
      const double frac = L > 1 ? static_cast<double>(l) / static_cast<double>(L - 1) : 0.0;
      all[static_cast<std::size_t>(l)] = static_cast<index_t>(high - (high - low) * frac);
    }
  }
  all = settle(all, T, R);
  return {all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n)};
}

index_t head_floor(const Method& m, index_t b) {
  return static_cast<index_t>(std::floor(m.min_share * static_cast<float>(b)));
}

// A candidate token: its position, its model score and its index in its row's list
// (the tie-break after the score).
struct Cand {
  index_t pos;
  double score;
  index_t idx;
};
bool better(const Cand& a, const Cand& b) {
  return a.score != b.score ? a.score > b.score : a.idx < b.idx;
}

// Ada-KV's split of budget * Hkv tokens over the rows of one batch entry: each row
// first its min(floor, available) best, then the best remaining of any row.
std::vector<index_t> split_heads(std::vector<std::vector<Cand>> rows, index_t budget, index_t floor,
                                 Counters& cnt) {
  struct RC {
    Cand c;
    index_t row;
  };
  std::vector<RC> rest;
  std::vector<index_t> len(rows.size());
  index_t floors = 0;
  for (std::size_t g = 0; g < rows.size(); ++g) {
    auto& r = rows[g];
    std::sort(r.begin(), r.end(), better);
    const index_t f = std::min<index_t>(floor, static_cast<index_t>(r.size()));
    len[g] = f;
    floors += f;
    for (std::size_t i = static_cast<std::size_t>(f); i < r.size(); ++i)
      rest.push_back({r[i], static_cast<index_t>(g)});
  }
  std::sort(rest.begin(), rest.end(), [](const RC& a, const RC& b) {
    if (a.c.score != b.c.score) return a.c.score > b.c.score;
    return a.row != b.row ? a.row < b.row : a.c.idx < b.c.idx;
  });
  const index_t take = std::clamp<index_t>(budget * static_cast<index_t>(rows.size()) - floors, 0,
                                           static_cast<index_t>(rest.size()));
  if (take > 0 && take < static_cast<index_t>(rest.size()) &&
      within_tie(rest[static_cast<std::size_t>(take - 1)].c.score,
                 rest[static_cast<std::size_t>(take)].c.score))
    ++cnt.near_ties;
  for (index_t i = 0; i < take; ++i)
    ++len[static_cast<std::size_t>(rest[static_cast<std::size_t>(i)].row)];
  return len;
}

// The best k of a list (by score, then list index).
std::set<index_t> top(std::vector<Cand> c, index_t k, Counters& cnt) {
  std::sort(c.begin(), c.end(), better);
  k = std::min<index_t>(k, static_cast<index_t>(c.size()));
  if (k > 0 && k < static_cast<index_t>(c.size()) &&
      within_tie(c[static_cast<std::size_t>(k - 1)].score, c[static_cast<std::size_t>(k)].score)) {
    ++cnt.near_ties;
    if (std::getenv("CAKE_DIFF_TRACE") && cnt.near_ties < 20)
      std::printf("near tie k=%ld of %zu: %.17g (pos %ld) vs %.17g (pos %ld)\n",
                  static_cast<long>(k), c.size(), c[static_cast<std::size_t>(k - 1)].score,
                  static_cast<long>(c[static_cast<std::size_t>(k - 1)].pos),
                  c[static_cast<std::size_t>(k)].score,
                  static_cast<long>(c[static_cast<std::size_t>(k)].pos));
  }
  std::set<index_t> out;
  for (index_t i = 0; i < k; ++i) out.insert(c[static_cast<std::size_t>(i)].pos);
  return out;
}

// ---- one configuration --------------------------------------------------------

struct Run {
  cake::CacheConfig cfg;
  Method m;
  index_t S;
  Counters& cnt;
  std::mt19937 rng;
  std::string where;  // for failure messages

  // Per layer and row (b * Hkv + g): keys by position (double), the cache order the
  // library holds, and the model's score of each held token (prefill indicator or
  // H2O's running sums).
  struct Layer {
    std::vector<std::vector<double>> keys;  // [row][pos * d + x]
    std::vector<std::vector<index_t>> order;
    std::vector<std::map<index_t, double>> score;
    bool ragged = false;
  };
  std::vector<Layer> layers;
  std::vector<double> prefs;

  index_t rows() const { return cfg.batch * cfg.kv_heads; }
  index_t grp() const { return cfg.q_heads / cfg.kv_heads; }

  std::vector<float> randn(std::size_t n, float scale) {
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
  }

  // Softmax of q . keys[j] / sqrt(d) over j < n (double).
  std::vector<double> attention(const float* q, const std::vector<double>& keys,
                                const std::vector<index_t>& toks) const {
    const index_t d = cfg.head_dim;
    std::vector<double> s(toks.size());
    double mx = -INFINITY;
    for (std::size_t j = 0; j < toks.size(); ++j) {
      double dot = 0;
      for (index_t x = 0; x < d; ++x)
        dot += static_cast<double>(q[x]) * keys[static_cast<std::size_t>(toks[j] * d + x)];
      s[j] = dot / std::sqrt(static_cast<double>(d));
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (auto& x : s) sum += (x = std::exp(x - mx));
    for (auto& x : s) x /= sum;
    return s;
  }

  // Zero-padded average pool (kernel, dividing by the kernel) over a list.
  std::vector<double> pool(const std::vector<double>& a, int kernel) const {
    const int half = kernel / 2;
    std::vector<double> out(a.size());
    for (std::size_t j = 0; j < a.size(); ++j) {
      double s = 0;
      for (int t = -half; t <= half; ++t) {
        const auto i = static_cast<std::ptrdiff_t>(j) + t;
        if (i >= 0 && i < static_cast<std::ptrdiff_t>(a.size()))
          s += a[static_cast<std::size_t>(i)];
      }
      out[j] = s / kernel;
    }
    return out;
  }

  // Prefill scores of every row: the prefix (P columns), or all S for H2O; and the
  // layer's preference.
  std::vector<std::vector<double>> prefill_scores(const std::vector<float>& q, const Layer& ly,
                                                  double* pref) const {
    const index_t B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads, d = cfg.head_dim,
                  w = cfg.window, P = S - w, n = grp();
    std::vector<std::vector<double>> out(static_cast<std::size_t>(rows()));
    double E = 0, V = 0;
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        const auto& keys = ly.keys[static_cast<std::size_t>(r)];
        auto& o = out[static_cast<std::size_t>(r)];
        const index_t cols = m.ind == Ind::accumulated ? S : P;
        o.assign(static_cast<std::size_t>(cols), 0.0);
        if (m.ind == Ind::sink_recency) {
          for (index_t j = 0; j < P; ++j)
            o[static_cast<std::size_t>(j)] = j < m.sinks
                                                 ? static_cast<double>(FLT_MAX)
                                                 : static_cast<double>(static_cast<float>(j));
          continue;
        }
        for (index_t hh = 0; hh < n; ++hh) {
          const index_t h = g * n + hh;
          // A[i][j]: window row i (position P + i) sees keys 0..P+i.
          std::vector<std::vector<double>> A(static_cast<std::size_t>(w));
          for (index_t i = 0; i < w; ++i) {
            std::vector<index_t> toks(static_cast<std::size_t>(P + i + 1));
            std::iota(toks.begin(), toks.end(), index_t{0});
            A[static_cast<std::size_t>(i)] =
                attention(&q[static_cast<std::size_t>(((b * H + h) * w + i) * d)], keys, toks);
            A[static_cast<std::size_t>(i)].resize(static_cast<std::size_t>(S), 0.0);
          }
          std::vector<double> ind(static_cast<std::size_t>(P));
          for (index_t j = 0; j < P; ++j) {
            double mean = 0, var = 0;
            for (index_t i = 0; i < w; ++i)
              mean += A[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
            mean /= static_cast<double>(w);
            for (index_t i = 0; i < w; ++i) {
              const double a = A[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
              var += (a - mean) * (a - mean);
              E -= a * std::log(a + 1e-10);
            }
            var /= static_cast<double>(w - 1);
            V += var;
            ind[static_cast<std::size_t>(j)] =
                m.ind == Ind::mean_var ? mean + static_cast<double>(m.gamma) * var
                : m.ind == Ind::window_mean
                    ? mean
                    : A[static_cast<std::size_t>(w - 1)][static_cast<std::size_t>(j)];
          }
          if (m.ind == Ind::accumulated) {
            for (index_t j = 0; j < S; ++j)
              for (index_t i = 0; i < w; ++i)
                o[static_cast<std::size_t>(j)] +=
                    A[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] /
                    static_cast<double>(n);
          } else {
            const auto pooled = pool(ind, m.pool);
            for (index_t j = 0; j < P; ++j)
              o[static_cast<std::size_t>(j)] +=
                  pooled[static_cast<std::size_t>(j)] / static_cast<double>(n);
          }
        }
      }
    *pref = m.cake_pref ? std::pow(E, 1.0 / m.tau1) * std::pow(V, 1.0 / m.tau2) : 1.0;
    return out;
  }

  // Compare one decision: the set the model keeps against the library's. Tokens
  // are (row, position); score gives the model's score of a token.
  template <class Score>
  void compare(const std::set<std::pair<index_t, index_t>>& model,
               const std::set<std::pair<index_t, index_t>>& lib, Score score, const char* what) {
    ++cnt.decisions;
    if (model == lib) return;
    std::vector<std::pair<index_t, index_t>> in, out;  // kept by the library only / the model only
    std::set_difference(lib.begin(), lib.end(), model.begin(), model.end(), std::back_inserter(in));
    std::set_difference(model.begin(), model.end(), lib.begin(), lib.end(),
                        std::back_inserter(out));
    bool tie = in.size() == out.size();
    for (const auto& p : in)
      for (const auto& q : out) {
        const double sp = score(p), sq = score(q);
        tie = tie && (sp >= sq || within_tie(sp, sq));
      }
    if (!tie) {
      std::string msg = where + " " + what + ": library kept";
      for (const auto& p : in)
        msg += " (" + std::to_string(p.first) + "," + std::to_string(p.second) + ":" +
               std::to_string(score(p)) + ")";
      msg += " instead of";
      for (const auto& q : out)
        msg += " (" + std::to_string(q.first) + "," + std::to_string(q.second) + ":" +
               std::to_string(score(q)) + ")";
      FAIL_CHECK(msg);
    }
    ++cnt.tie_mismatches;
  }

  template <class Cache>
  std::vector<index_t> lib_row(const Cache& c, index_t l, index_t r) const {
    auto p = c.positions(l);
    const index_t n = c.row_lengths(l)[static_cast<std::size_t>(r)];
    std::vector<index_t> out;
    for (index_t t = 0; t < n; ++t) out.push_back(p(r / cfg.kv_heads, r % cfg.kv_heads, t));
    return out;
  }

  // Budgets: the model's against the library's; a mismatch must come from a raw
  // proportional budget within rounding of an integer, and then the model adopts
  // the library's.
  std::vector<index_t> check_budgets(std::vector<index_t> model, std::vector<index_t> lib,
                                     bool near_integer, const char* what) {
    if (model == lib) return model;
    if (!near_integer) {
      std::string msg = where + " " + what + ": budgets differ:";
      for (std::size_t i = 0; i < model.size(); ++i)
        msg += " " + std::to_string(model[i]) + "/" + std::to_string(i < lib.size() ? lib[i] : -1);
      FAIL_CHECK(msg);
    }
    ++cnt.budget_ties;
    return lib;
  }

  template <class Cache>
  void run(Cache& c, int steps) {
    const index_t L = cfg.layers, B = cfg.batch, H = cfg.q_heads, Hkv = cfg.kv_heads,
                  d = cfg.head_dim, w = cfg.window, P = S - w, T = cfg.total_budget();
    const bool uncut = S <= cfg.cache_size + w;
    layers.assign(static_cast<std::size_t>(L), Layer{});
    std::vector<index_t> budgets(static_cast<std::size_t>(L), 0);
    ++cnt.configs;

    // Keep the model's kept sets (prefix only) per layer and row.
    std::vector<std::vector<std::set<index_t>>> kept(static_cast<std::size_t>(L));
    const auto adopt = [&](index_t l) {  // the model takes the library's rows and order
      auto& ly = layers[static_cast<std::size_t>(l)];
      for (index_t r = 0; r < rows(); ++r) ly.order[static_cast<std::size_t>(r)] = lib_row(c, l, r);
    };

    for (index_t m_ = 0; m_ < L; ++m_) {
      auto q = randn(static_cast<std::size_t>(B * H * w * d), 1.0f);
      auto k = randn(static_cast<std::size_t>(B * Hkv * S * d), 1.0f);
      auto v = randn(static_cast<std::size_t>(B * Hkv * S * d), 1.0f);
      c.prefill(m_, cake::make_view(q.data(), std::array<index_t, 4>{B, H, w, d}),
                cake::make_view(k.data(), std::array<index_t, 4>{B, Hkv, S, d}),
                cake::make_view(v.data(), std::array<index_t, 4>{B, Hkv, S, d}));
      auto& ly = layers[static_cast<std::size_t>(m_)];
      ly.keys.assign(static_cast<std::size_t>(rows()), {});
      ly.order.assign(static_cast<std::size_t>(rows()), {});
      ly.score.assign(static_cast<std::size_t>(rows()), {});
      for (index_t r = 0; r < rows(); ++r) {
        ly.keys[static_cast<std::size_t>(r)].assign(k.begin() + r * S * d,
                                                    k.begin() + (r + 1) * S * d);
        auto& ord = ly.order[static_cast<std::size_t>(r)];  // the prompt, in position order
        ord.resize(static_cast<std::size_t>(S));
        std::iota(ord.begin(), ord.end(), index_t{0});
      }
      double pref = 0;
      const auto sc = prefill_scores(q, ly, &pref);
      prefs.push_back(pref);
      if (m.cake_pref)
        CHECK_MESSAGE(
            std::abs(c.preference(m_) - pref) <= 1e-3 * pref + 1e-12,
            where << " preference of layer " << m_ << ": " << c.preference(m_) << " vs " << pref);
      for (index_t r = 0; r < rows(); ++r)
        for (std::size_t j = 0; j < sc[static_cast<std::size_t>(r)].size(); ++j)
          ly.score[static_cast<std::size_t>(r)][static_cast<index_t>(j)] =
              sc[static_cast<std::size_t>(r)][j];

      // Which layers are cut now, to how much.
      std::vector<index_t> stage;
      bool cut_now = false;
      if (uncut) {
        stage.assign(static_cast<std::size_t>(m_ + 1), cfg.cache_size - w);
      } else if (cfg.cascade || m_ == L - 1) {
        bool near = false;
        stage = allocate(m, prefs, L, T, P, &near);
        const std::vector<index_t> lib_stage =
            cfg.cascade ? c.stage_budgets().back()
                        : std::vector<index_t>(c.budgets().begin(), c.budgets().end());
        stage = check_budgets(stage, lib_stage, near, "stage budgets");
        cut_now = true;
      }
      if (cfg.cascade && uncut) CHECK(c.stage_budgets().back() == stage);
      if (!stage.empty())
        for (std::size_t l = 0; l < stage.size(); ++l) budgets[l] = stage[l];

      if (!cut_now) {  // everything held, in position order
        for (index_t r = 0; r < rows(); ++r) {
          std::vector<index_t> all(static_cast<std::size_t>(S));
          std::iota(all.begin(), all.end(), index_t{0});
          CHECK_MESSAGE(lib_row(c, m_, r) == all, where << " uncut layer " << m_);
        }
        adopt(m_);
        continue;
      }
      // Cut layers: the fresh ones (this one; all at one-shot's last layer) from all
      // P prefix tokens, earlier cascade layers from what they hold.
      for (index_t l = 0; l <= m_; ++l) {
        const bool fresh = l == m_ || !cfg.cascade;
        auto& lyl = layers[static_cast<std::size_t>(l)];
        const index_t bud = stage[static_cast<std::size_t>(l)];
        // Candidates of each row: prefix tokens the layer holds, in cache order.
        std::vector<std::vector<Cand>> cands(static_cast<std::size_t>(rows()));
        for (index_t r = 0; r < rows(); ++r) {
          const auto& ord = lyl.order[static_cast<std::size_t>(r)];
          index_t idx = 0;
          for (index_t p : ord)
            if (p < P)
              cands[static_cast<std::size_t>(r)].push_back(
                  {p, lyl.score[static_cast<std::size_t>(r)].at(p), idx++});
          // The stored prefix is in descending-indicator order (fresh: position order).
        }
        std::vector<std::set<index_t>> model(static_cast<std::size_t>(rows()));
        if (m.headwise) {
          const index_t hb = fresh ? std::min(bud, P) : bud;
          for (index_t b = 0; b < B; ++b) {
            std::vector<std::vector<Cand>> br(cands.begin() + b * Hkv,
                                              cands.begin() + (b + 1) * Hkv);
            const auto len = split_heads(br, hb, head_floor(m, hb), cnt);
            for (index_t g = 0; g < Hkv; ++g)
              model[static_cast<std::size_t>(b * Hkv + g)] =
                  top(br[static_cast<std::size_t>(g)], len[static_cast<std::size_t>(g)], cnt);
          }
        } else {
          for (index_t r = 0; r < rows(); ++r)
            model[static_cast<std::size_t>(r)] =
                top(cands[static_cast<std::size_t>(r)], std::min(bud, P), cnt);
        }
        // Compare per batch entry (head-wise rows share a budget) or per row.
        const index_t unit = m.headwise ? Hkv : 1;
        for (index_t r0 = 0; r0 < rows(); r0 += unit) {
          std::set<std::pair<index_t, index_t>> ms, ls;
          for (index_t r = r0; r < r0 + unit; ++r) {
            for (index_t p : model[static_cast<std::size_t>(r)]) ms.insert({r, p});
            const auto row = lib_row(c, l, r);
            for (index_t p : row)
              if (p < P) ls.insert({r, p});
            // The window is kept whole.
            for (index_t p = P; p < S; ++p)
              CHECK_MESSAGE(std::count(row.begin(), row.end(), p) == 1,
                            where << " window of layer " << l);
          }
          compare(
              ms, ls,
              [&](std::pair<index_t, index_t> t) {
                return lyl.score[static_cast<std::size_t>(t.first)].at(t.second);
              },
              "prefill cut");
        }
        if (m.headwise) lyl.ragged = true;
        adopt(l);
      }
    }
    CHECK(std::vector<index_t>(c.budgets().begin(), c.budgets().end()) == budgets);

    // Decoding.
    for (int t = 0; t < steps; ++t) {
      ++cnt.decode_steps;
      const index_t pos = S + t;
      for (index_t l = 0; l < L; ++l) {
        auto q = randn(static_cast<std::size_t>(B * H * d), 1.0f);
        auto k = randn(static_cast<std::size_t>(B * Hkv * d), 1.0f);
        auto v = randn(static_cast<std::size_t>(B * Hkv * d), 1.0f);
        c.decode(l, cake::make_view(q.data(), std::array<index_t, 3>{B, H, d}),
                 cake::make_view(k.data(), std::array<index_t, 3>{B, Hkv, d}),
                 cake::make_view(v.data(), std::array<index_t, 3>{B, Hkv, d}));
        auto& ly = layers[static_cast<std::size_t>(l)];
        const index_t bud = budgets[static_cast<std::size_t>(l)];
        for (index_t r = 0; r < rows(); ++r) {
          auto& keys = ly.keys[static_cast<std::size_t>(r)];
          keys.insert(keys.end(), k.begin() + r * d, k.begin() + (r + 1) * d);
          auto toks = ly.order[static_cast<std::size_t>(r)];
          toks.push_back(pos);
          const index_t n = static_cast<index_t>(toks.size());
          const bool evict = ly.ragged || n > bud + w;
          const index_t cand = n - w, keep = ly.ragged ? cand - 1 : std::min(bud, cand);
          // The new query's attention, averaged over the group, in cache order.
          std::vector<double> a(static_cast<std::size_t>(n), 0.0);
          const index_t b = r / Hkv, g = r % Hkv;
          for (index_t hh = 0; hh < grp(); ++hh) {
            const auto ah =
                attention(&q[static_cast<std::size_t>((b * H + g * grp() + hh) * d)], keys, toks);
            for (index_t j = 0; j < n; ++j)
              a[static_cast<std::size_t>(j)] +=
                  ah[static_cast<std::size_t>(j)] / static_cast<double>(grp());
          }
          auto& score = ly.score[static_cast<std::size_t>(r)];
          std::vector<double> cs(static_cast<std::size_t>(std::max<index_t>(cand, 0)));
          if (m.ind == Ind::accumulated) {
            score[pos] = 0.0;
            for (index_t j = 0; j < n; ++j)
              score[toks[static_cast<std::size_t>(j)]] += a[static_cast<std::size_t>(j)];
            for (index_t j = 0; j < cand; ++j)
              cs[static_cast<std::size_t>(j)] = score.at(toks[static_cast<std::size_t>(j)]);
          } else if (m.ind == Ind::sink_recency) {
            for (index_t j = 0; j < cand; ++j) {
              const index_t p = toks[static_cast<std::size_t>(j)];
              cs[static_cast<std::size_t>(j)] = p < m.sinks
                                                    ? static_cast<double>(FLT_MAX)
                                                    : static_cast<double>(static_cast<float>(p));
            }
          } else {
            const std::vector<double> head(a.begin(), a.begin() + cand);
            cs = pool(head, m.pool);
          }
          const auto lib = lib_row(c, l, r);
          if (!evict) {
            CHECK_MESSAGE(lib == toks, where << " decode without eviction, layer " << l);
            ly.order[static_cast<std::size_t>(r)] = lib;
            continue;
          }
          std::vector<Cand> cl;
          std::map<index_t, double> decided;
          for (index_t j = 0; j < cand; ++j) {
            cl.push_back({toks[static_cast<std::size_t>(j)], cs[static_cast<std::size_t>(j)], j});
            decided[toks[static_cast<std::size_t>(j)]] = cs[static_cast<std::size_t>(j)];
          }
          std::set<std::pair<index_t, index_t>> ms, ls;
          for (index_t p : top(cl, keep, cnt)) ms.insert({r, p});
          const std::set<index_t> window(toks.end() - w, toks.end());
          REQUIRE(static_cast<index_t>(lib.size()) == keep + w);
          for (index_t x = 0; x < w; ++x)
            CHECK_MESSAGE(window.count(lib[static_cast<std::size_t>(keep + x)]) == 1,
                          where << " decode window, layer " << l);
          for (index_t x = 0; x < keep; ++x) ls.insert({r, lib[static_cast<std::size_t>(x)]});
          compare(
              ms, ls,
              [&](std::pair<index_t, index_t> tk) {
                auto it = decided.find(tk.second);
                return it == decided.end() ? -INFINITY : it->second;
              },
              "decode eviction");
          // Order of the kept prefix: positions ascending, or (reference) scores descending.
          for (index_t x = 1; x < keep; ++x) {
            const index_t p0 = lib[static_cast<std::size_t>(x - 1)],
                          p1 = lib[static_cast<std::size_t>(x)];
            if (cfg.order == cake::token_order::position) {
              CHECK_MESSAGE(p0 < p1, where << " position order");
            } else if (decided.count(p0) && decided.count(p1)) {
              const double s0 = decided[p0], s1 = decided[p1];
              CHECK_MESSAGE((s0 >= s1 || within_tie(s0, s1)), where << " reference order");
            }
          }
          ly.order[static_cast<std::size_t>(r)] = lib;
        }
      }
    }
  }
};

template <class Cache, class... Policies>
void run_config(const Method& m, const cake::CacheConfig& cfg, index_t S, int steps,
                std::uint32_t seed, Counters& cnt, Policies... pol) {
  Cache c(cfg, pol...);
  Run r{cfg, m, S, cnt, std::mt19937(seed), {}, {}, {}};
  r.where = m.name + " seed " + std::to_string(seed) + " L" + std::to_string(cfg.layers) + " B" +
            std::to_string(cfg.batch) + " H" + std::to_string(cfg.q_heads) + "/" +
            std::to_string(cfg.kv_heads) + " d" + std::to_string(cfg.head_dim) + " w" +
            std::to_string(cfg.window) + " C" + std::to_string(cfg.cache_size) + " S" +
            std::to_string(S) + (cfg.cascade ? " cascade" : " one-shot") +
            (cfg.order == cake::token_order::position ? " position" : " reference");
  r.run(c, steps);
}

void dispatch(const Method& m, const cake::CacheConfig& cfg, index_t S, int steps,
              std::uint32_t seed, Counters& cnt) {
  namespace me = cake::methods;
  const std::string& n = m.name;
  if (n == "cake")
    run_config<me::Cake<>>(m, cfg, S, steps, seed, cnt, cake::CakePreference{m.tau1, m.tau2},
                           cake::ProportionalBudget{},
                           cake::MeanVarianceIndicator{m.gamma, m.pool});
  else if (n == "snapkv")
    run_config<me::SnapKv<>>(m, cfg, S, steps, seed, cnt, cake::UniformPreference{},
                             cake::UniformBudget{}, cake::WindowMeanIndicator{m.pool});
  else if (n == "pyramidkv")
    run_config<me::PyramidKv<>>(m, cfg, S, steps, seed, cnt, cake::UniformPreference{},
                                cake::PyramidBudget{m.beta}, cake::WindowMeanIndicator{m.pool});
  else if (n == "streamingllm")
    run_config<me::StreamingLlm<>>(m, cfg, S, steps, seed, cnt, cake::UniformPreference{},
                                   cake::UniformBudget{}, cake::SinkRecencyIndicator{m.sinks});
  else if (n == "h2o")
    run_config<me::H2o<>>(m, cfg, S, steps, seed, cnt);
  else if (n == "tova")
    run_config<me::Tova<>>(m, cfg, S, steps, seed, cnt, cake::UniformPreference{},
                           cake::UniformBudget{}, cake::LastQueryIndicator{m.pool});
  else if (n == "ada_snapkv")
    run_config<me::AdaSnapKv<>>(m, cfg, S, steps, seed, cnt, cake::UniformPreference{},
                                cake::HeadwiseBudget<cake::UniformBudget>{{}, m.min_share},
                                cake::WindowMeanIndicator{m.pool});
  else
    run_config<me::CakeAdaKv<>>(m, cfg, S, steps, seed, cnt, cake::CakePreference{m.tau1, m.tau2},
                                cake::HeadwiseBudget<cake::ProportionalBudget>{{}, m.min_share},
                                cake::MeanVarianceIndicator{m.gamma, m.pool});
}

Method method_named(const std::string& name, std::mt19937& rng) {
  auto pick = [&](std::initializer_list<float> v) {
    return *(v.begin() + std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng));
  };
  const int pool = static_cast<int>(pick({1, 3, 5}));
  if (name == "cake")
    return {name,
            Ind::mean_var,
            Bud::proportional,
            true,
            false,
            pick({1.0f, 1.6f, 0.5f}),
            pick({1.0f, 0.4f, 2.0f}),
            pick({200.0f, 0.0f, 5.0f}),
            20,
            0.2f,
            pool};
  if (name == "snapkv")
    return {name, Ind::window_mean, Bud::uniform, false, false, 1, 1, 0, 20, 0.2f, pool};
  if (name == "pyramidkv")
    return {name, Ind::window_mean,          Bud::pyramid, false, false, 1, 1,
            0,    pick({20.0f, 2.0f, 1.0f}), 0.2f,         pool};
  if (name == "streamingllm") {
    Method m{name, Ind::sink_recency, Bud::uniform, false, false};
    m.sinks = static_cast<index_t>(pick({0, 2, 4}));
    return m;
  }
  if (name == "h2o")
    return {name, Ind::accumulated, Bud::uniform, false, false, 1, 1, 0, 20, 0.2f, 1};
  if (name == "tova")
    return {name,
            Ind::last_query,
            Bud::uniform,
            false,
            false,
            1,
            1,
            0,
            20,
            0.2f,
            static_cast<int>(pick({1, 1, 3}))};
  if (name == "ada_snapkv")
    return {name, Ind::window_mean,         Bud::uniform, false, true, 1, 1, 0,
            20,   pick({0.2f, 0.0f, 0.5f}), pool};
  return {name,
          Ind::mean_var,
          Bud::proportional,
          true,
          true,
          pick({1.0f, 1.6f}),
          pick({1.0f, 0.4f}),
          pick({200.0f, 5.0f}),
          20,
          pick({0.2f, 0.0f, 0.5f}),
          pool};
}

void differential(const std::string& name, int configs, int steps) {
  Counters cnt;
  std::mt19937 rng(std::hash<std::string>{}(name)&0xffffffu);
  for (int i = 0; i < configs; ++i) {
    const Method m = method_named(name, rng);
    auto u = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    cake::CacheConfig cfg;
    cfg.layers = u(1, 4);
    cfg.batch = u(1, 2);
    cfg.kv_heads = u(1, 3);
    cfg.q_heads = cfg.kv_heads * (1 << u(0, 2));
    cfg.head_dim = 4 << u(0, 2);
    cfg.window = u(2, 8);
    cfg.cache_size = cfg.window + u(1, 24);
    cfg.cascade = u(0, 1) == 1;
    cfg.order = u(0, 1) ? cake::token_order::position : cake::token_order::reference;
    // Mostly prompts that are cut; one in eight fits and is kept whole, down to S = w
    // (no prefix at all).
    const index_t S = u(0, 7) == 0 ? u(static_cast<int>(cfg.window),
                                       static_cast<int>(cfg.cache_size + cfg.window))
                                   : u(static_cast<int>(cfg.cache_size + cfg.window + 1),
                                       static_cast<int>(cfg.cache_size + cfg.window + 80));
    dispatch(m, cfg, S, steps, static_cast<std::uint32_t>(rng()), cnt);
  }
  std::printf(
      "differential %-13s configurations %4ld  decode steps %6ld  decisions %8ld  near-ties at the "
      "boundary %4ld  mismatches within a tie %3ld  budget ties %ld\n",
      name.c_str(), cnt.configs, cnt.decode_steps, cnt.decisions, cnt.near_ties, cnt.tie_mismatches,
      cnt.budget_ties);
  CHECK(cnt.configs == configs);
}

}  // namespace

TEST_CASE("differential: every method equals its float64 model on random configurations") {
  const int configs = 24 / kScale, steps = 200 / kScale;
  for (const char* name :
       {"cake", "snapkv", "pyramidkv", "streamingllm", "h2o", "tova", "ada_snapkv", "cake_adakv"}) {
    SUBCASE(name) { differential(name, configs, steps); }
  }
}
