// Golden conformance cases (../shared/docs/cake-algorithm.md, section 9): load a
// case directory and run every check of the spec against the library. Shared by
// the `cake_conformance` runner and the doctest suite.
#pragma once

#include <cake/cake.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "json.hpp"
#include "npy.hpp"

namespace cake_tools {

struct GoldenCase {
  std::string dir, name;
  Json meta;
  cake::index_t B, L, H, Hkv, S, d, w, C, T;
  float tau1, tau2, gamma;
  bool cascading;

  explicit GoldenCase(const std::string& path) : dir(path) {
    name = std::filesystem::path(path).filename().string();
    if (name.empty()) name = std::filesystem::path(path).parent_path().filename().string();
    std::ifstream f(dir + "/meta.json");
    if (!f) throw std::runtime_error("golden: no meta.json in " + dir);
    std::stringstream ss;
    ss << f.rdbuf();
    meta = Json::parse(ss.str());
    B = meta["batch"].as_int();
    L = meta["layers"].as_int();
    H = meta["q_heads"].as_int();
    Hkv = meta["kv_heads"].as_int();
    S = meta["seq_len"].as_int();
    d = meta["head_dim"].as_int();
    w = meta["window"].as_int();
    C = meta["cache_size"].as_int();
    T = meta["total_budget"].as_int();
    tau1 = static_cast<float>(meta["tau1"].as_double());
    tau2 = static_cast<float>(meta["tau2"].as_double());
    gamma = static_cast<float>(meta["gamma"].as_double());
    cascading = meta["cascading"].as_bool();
  }
  NpyArray array(const std::string& file) const { return load_npy(dir + "/" + file + ".npy"); }
  std::vector<float> floats(const std::string& file) const { return array(file).as<float>(); }
  std::vector<std::int64_t> ints(const std::string& file) const {
    return array(file).as<std::int64_t>();
  }
  cake::CacheConfig config(cake::token_order order) const {
    cake::CacheConfig c;
    c.layers = L;
    c.batch = B;
    c.q_heads = H;
    c.kv_heads = Hkv;
    c.head_dim = d;
    c.window = w;
    c.cache_size = C;
    c.cascade = cascading;
    c.order = order;
    return c;
  }
  cake::CakePreference preference() const { return {tau1, tau2}; }
  cake::MeanVarianceIndicator indicator() const { return {gamma, 5}; }
};

struct CheckResult {
  std::string check;
  bool pass = true;
  std::string detail = {};
};

namespace detail {
inline std::string join(const std::vector<cake::index_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s.append(",");
    s.append(std::to_string(v[i]));
  }
  return s.append("]");
}
inline std::vector<cake::index_t> json_ints(const Json& a) {
  std::vector<cake::index_t> v;
  for (const auto& x : a.arr) v.push_back(x.as_int());
  return v;
}
// Sorted positions held by each (b, g) row of a layer, flattened row by row; with
// skip_window the last w held tokens (the window) are left out.
template <class Cache>
std::vector<std::int64_t> held_positions(const Cache& c, cake::index_t layer, cake::index_t drop) {
  auto p = c.positions(layer);
  std::vector<std::int64_t> out;
  for (cake::index_t b = 0; b < p.extent(0); ++b)
    for (cake::index_t g = 0; g < p.extent(1); ++g) {
      std::vector<std::int64_t> row;
      for (cake::index_t t = 0; t < p.extent(2); ++t) row.push_back(p(b, g, t));
      std::sort(row.begin(), row.end());
      row.resize(row.size() - static_cast<std::size_t>(drop));
      out.insert(out.end(), row.begin(), row.end());
    }
  return out;
}
}  // namespace detail

// Runs every check on one case. Tolerances are the spec's (section 8).
template <class Exec = cake::host_policy>
std::vector<CheckResult> run_golden_case(const GoldenCase& gc, Exec exec = {}) {
  using cake::index_t;
  std::vector<CheckResult> out;
  const index_t P = gc.S - gc.w;

  // 1. Window statistics: indicator, entropy, variance, preference of every layer.
  {
    CheckResult ind{"indicator"}, pref{"preference"};
    double worst_ind = 0, worst_pref = 0;
    for (index_t l = 0; l < gc.L; ++l) {
      auto q = gc.floats("layer" + std::to_string(l) + "_q_window");
      auto k = gc.floats("layer" + std::to_string(l) + "_k");
      auto want = gc.floats("layer" + std::to_string(l) + "_indicator");
      std::vector<float> got(static_cast<std::size_t>(gc.B * gc.Hkv * P));
      std::array<float, 2> st{};
      cake::window_stats(exec,
                         cake::make_view(static_cast<const float*>(q.data()),
                                         std::array<index_t, 4>{gc.B, gc.H, gc.w, gc.d}),
                         cake::make_view(static_cast<const float*>(k.data()),
                                         std::array<index_t, 4>{gc.B, gc.Hkv, gc.S, gc.d}),
                         gc.indicator(),
                         cake::make_view(got.data(), std::array<index_t, 3>{gc.B, gc.Hkv, P}),
                         cake::make_view(st.data(), std::array<index_t, 1>{2}));
      for (std::size_t i = 0; i < got.size(); ++i) {
        const double err = std::abs(double(got[i]) - double(want[i]));
        const double excess = err / (1e-7 + 1e-5 * std::abs(double(want[i])));
        worst_ind = std::max(worst_ind, excess);
        if (excess > 1.0 && ind.pass) {
          ind.pass = false;
          ind.detail = "layer " + std::to_string(l) + " element " + std::to_string(i) + ": got " +
                       std::to_string(got[i]) + ", want " + std::to_string(want[i]);
        }
      }
      const auto& lm = gc.meta["layer"][static_cast<std::size_t>(l)];
      const cake::LayerStats stats{st[0], st[1]};
      const double p = gc.preference()(stats);
      const double pairs[3][2] = {{stats.entropy, lm["entropy"].as_double()},
                                  {stats.variance, lm["variance"].as_double()},
                                  {p, lm["preference"].as_double()}};
      const char* names[3] = {"entropy", "variance", "preference"};
      for (int i = 0; i < 3; ++i) {
        const double rel =
            std::abs(pairs[i][0] - pairs[i][1]) / std::max(1e-30, std::abs(pairs[i][1]));
        worst_pref = std::max(worst_pref, rel);
        if (rel > 1e-4 && pref.pass) {
          pref.pass = false;
          pref.detail = "layer " + std::to_string(l) + " " + names[i] + ": got " +
                        std::to_string(pairs[i][0]) + ", want " + std::to_string(pairs[i][1]);
        }
      }
    }
    if (ind.pass) ind.detail = "max error / tolerance " + std::to_string(worst_ind);
    if (pref.pass) pref.detail = "max relative error " + std::to_string(worst_pref);
    out.push_back(ind);
    out.push_back(pref);
  }

  const auto final_budgets = detail::json_ints(gc.meta["final_budgets"]);
  std::vector<std::vector<index_t>> stages;
  for (const auto& s : gc.meta["cascade_stage_budgets"].arr) stages.push_back(detail::json_ints(s));

  // 2. Allocation from the recorded preferences (only where the prompt is cut).
  {
    CheckResult r{"allocation"};
    if (gc.S <= gc.C + gc.w) {
      r.detail = "prompt fits (S <= C + w): no allocation, budgets are C - w";
    } else {
      std::vector<float> prefs;
      for (const auto& lm : gc.meta["layer"].arr)
        prefs.push_back(static_cast<float>(lm["preference"].as_double()));
      std::vector<index_t> got(static_cast<std::size_t>(gc.L));
      cake::allocate_budgets(cake::ProportionalBudget{}, prefs, gc.L, gc.T, P, got);
      if (got != final_budgets) {
        r.pass = false;
        r.detail = "final budgets " + detail::join(got) + ", want " + detail::join(final_budgets);
      }
      for (std::size_t m = 0; r.pass && m < stages.size(); ++m) {
        std::vector<index_t> st(m + 1);
        cake::allocate_budgets(cake::ProportionalBudget{},
                               std::span<const float>(prefs).first(m + 1), gc.L, gc.T, P, st);
        if (st != stages[m]) {
          r.pass = false;
          r.detail = "stage " + std::to_string(m) + " budgets " + detail::join(st) + ", want " +
                     detail::join(stages[m]);
        }
      }
      if (r.pass) r.detail = "final " + detail::join(got);
    }
    out.push_back(r);
  }

  // 3. The cache: prefill (budgets, stages, kept positions), then decoding in the
  //    reference's order; the position-order cache must keep the same prefill sets.
  {
    cake::KvCache<> ref(gc.config(cake::token_order::reference), gc.preference(),
                        cake::ProportionalBudget{}, gc.indicator());
    cake::KvCache<> pos(gc.config(cake::token_order::position), gc.preference(),
                        cake::ProportionalBudget{}, gc.indicator());
    for (index_t l = 0; l < gc.L; ++l) {
      const std::string p = "layer" + std::to_string(l);
      auto q = gc.floats(p + "_q_window");
      auto k = gc.floats(p + "_k");
      auto v = gc.floats(p + "_v");
      auto qv = cake::make_view(static_cast<const float*>(q.data()),
                                std::array<index_t, 4>{gc.B, gc.H, gc.w, gc.d});
      auto kv = cake::make_view(static_cast<const float*>(k.data()),
                                std::array<index_t, 4>{gc.B, gc.Hkv, gc.S, gc.d});
      auto vv = cake::make_view(static_cast<const float*>(v.data()),
                                std::array<index_t, 4>{gc.B, gc.Hkv, gc.S, gc.d});
      ref.prefill(l, qv, kv, vv);
      pos.prefill(l, qv, kv, vv);
    }
    CheckResult budgets{"final_budgets"}, stage_r{"cascade_stage_budgets"}, kept{"kept_positions"},
        values{"values_follow_positions"}, orders{"position_order_same_sets"};
    std::vector<index_t> got(ref.budgets().begin(), ref.budgets().end());
    if (got != final_budgets) {
      budgets.pass = false;
      budgets.detail = detail::join(got) + ", want " + detail::join(final_budgets);
    } else {
      budgets.detail = detail::join(got);
    }
    if (gc.cascading) {
      if (ref.stage_budgets() != stages) {
        stage_r.pass = false;
        for (std::size_t m = 0; m < std::max(stages.size(), ref.stage_budgets().size()); ++m) {
          auto a = m < ref.stage_budgets().size() ? ref.stage_budgets()[m] : std::vector<index_t>{};
          auto b = m < stages.size() ? stages[m] : std::vector<index_t>{};
          if (a != b) {
            stage_r.detail =
                "stage " + std::to_string(m) + ": " + detail::join(a) + ", want " + detail::join(b);
            break;
          }
        }
      } else {
        stage_r.detail = std::to_string(stages.size()) + " stages equal";
      }
    } else {
      stage_r.detail = "one-shot case: no stages recorded";
    }
    const auto kept_counts = detail::json_ints(gc.meta["kept_counts"]);
    for (index_t l = 0; l < gc.L && kept.pass; ++l) {
      auto want = gc.ints("layer" + std::to_string(l) + "_kept");
      auto have = detail::held_positions(ref, l, gc.w);
      if (have != want || ref.tokens_held(l) != kept_counts[static_cast<std::size_t>(l)] + gc.w) {
        kept.pass = false;
        kept.detail = "layer " + std::to_string(l) + ": holds " +
                      std::to_string(ref.tokens_held(l)) + " tokens, want " +
                      std::to_string(kept_counts[static_cast<std::size_t>(l)] + gc.w);
      }
      if (detail::held_positions(pos, l, 0) != detail::held_positions(ref, l, 0)) {
        orders.pass = false;
        orders.detail = "layer " + std::to_string(l) + " differs";
      }
      // Values carry their position in channel 0: the rows moved with their positions.
      auto pv = pos.positions(l);
      auto vals = pos.values(l);
      for (index_t b = 0; b < pv.extent(0); ++b)
        for (index_t g = 0; g < pv.extent(1); ++g)
          for (index_t t = 0; t < pv.extent(2); ++t) {
            if (static_cast<std::int64_t>(vals(b, g, t, 0)) != pv(b, g, t)) values.pass = false;
            if (t > 0 && pv(b, g, t) <= pv(b, g, t - 1)) orders.pass = false;
          }
    }
    if (kept.pass) kept.detail = std::to_string(gc.L) + " layers equal";
    out.push_back(budgets);
    out.push_back(stage_r);
    out.push_back(kept);
    out.push_back(values);
    out.push_back(orders);

    CheckResult dec{"decode_held_positions"};
    const auto steps = gc.meta["decode_steps"].as_int();
    for (index_t t = 0; t < steps && dec.pass; ++t) {
      const auto sizes =
          detail::json_ints(gc.meta["decode_cache_sizes"][static_cast<std::size_t>(t)]);
      for (index_t l = 0; l < gc.L && dec.pass; ++l) {
        const std::string p = "decode" + std::to_string(t) + "_layer" + std::to_string(l);
        auto q = gc.floats(p + "_q");
        auto k = gc.floats(p + "_k");
        auto v = gc.floats(p + "_v");
        ref.decode(l,
                   cake::make_view(static_cast<const float*>(q.data()),
                                   std::array<index_t, 3>{gc.B, gc.H, gc.d}),
                   cake::make_view(static_cast<const float*>(k.data()),
                                   std::array<index_t, 3>{gc.B, gc.Hkv, gc.d}),
                   cake::make_view(static_cast<const float*>(v.data()),
                                   std::array<index_t, 3>{gc.B, gc.Hkv, gc.d}));
        pos.decode(l,
                   cake::make_view(static_cast<const float*>(q.data()),
                                   std::array<index_t, 3>{gc.B, gc.H, gc.d}),
                   cake::make_view(static_cast<const float*>(k.data()),
                                   std::array<index_t, 3>{gc.B, gc.Hkv, gc.d}),
                   cake::make_view(static_cast<const float*>(v.data()),
                                   std::array<index_t, 3>{gc.B, gc.Hkv, gc.d}));
        auto want = gc.ints(p + "_held");
        auto have = detail::held_positions(ref, l, 0);
        if (have != want || ref.tokens_held(l) != sizes[static_cast<std::size_t>(l)] ||
            pos.tokens_held(l) != sizes[static_cast<std::size_t>(l)]) {
          dec.pass = false;
          dec.detail = "step " + std::to_string(t) + " layer " + std::to_string(l) + ": holds " +
                       std::to_string(ref.tokens_held(l)) + " (position order " +
                       std::to_string(pos.tokens_held(l)) + "), want " +
                       std::to_string(sizes[static_cast<std::size_t>(l)]) +
                       (have == want ? "" : "; held positions differ");
        }
      }
    }
    if (dec.pass)
      dec.detail = std::to_string(steps) + " steps x " + std::to_string(gc.L) + " layers equal";
    out.push_back(dec);
  }
  return out;
}

}  // namespace cake_tools
