// A directory in the golden format (shared/docs/cake-algorithm.md, section 9) as
// a workload: the window queries, keys and values of every layer; the held-out
// queries are the recorded decoding queries decode{t}_layer{l}_q (positions S+t),
// or, where a case has none, its last window rows.
#pragma once

#include <filesystem>
#include <string>

#include "../cake_tools/golden.hpp"
#include "eval.hpp"

namespace cake_eval {

inline Workload golden_workload(const std::string& dir) {
  const cake_tools::GoldenCase gc(dir);
  index_t steps = 0;
  while (std::filesystem::exists(gc.dir + "/decode" + std::to_string(steps) + "_layer0_q.npy"))
    ++steps;
  Workload w;
  w.name = gc.name;
  w.batch = gc.B;
  w.layers = gc.L;
  w.q_heads = gc.H;
  w.kv_heads = gc.Hkv;
  w.head_dim = gc.d;
  w.seq_len = gc.S;
  w.window = gc.w;
  w.tau1 = gc.tau1;
  w.tau2 = gc.tau2;
  w.gamma = gc.gamma;
  w.cascade = gc.cascading;
  const index_t rows = steps > 0 ? steps : gc.w;
  w.held_queries = rows;
  w.held_source = steps > 0
                      ? "recorded decoding queries decode{0.." + std::to_string(steps - 1) + "}_q"
                      : "last " + std::to_string(rows) + " window query rows (no decoding queries)";
  w.layer = [gc, steps](index_t l) {
    const std::string p = "layer" + std::to_string(l);
    LayerInput in;
    in.q_window = gc.floats(p + "_q_window");
    in.k = gc.floats(p + "_k");
    in.v = gc.floats(p + "_v");
    if (steps == 0) {
      in.q_held = in.q_window;
      return in;
    }
    // decode{t}_layer{l}_q is (B, H, 1, d): interleave the steps into (B, H, steps, d).
    const std::size_t d = static_cast<std::size_t>(gc.d);
    const std::size_t BH = static_cast<std::size_t>(gc.B * gc.H);
    const std::size_t T = static_cast<std::size_t>(steps);
    in.q_held.resize(BH * T * d);
    for (std::size_t t = 0; t < T; ++t) {
      const auto q = gc.floats("decode" + std::to_string(t) + "_" + p + "_q");
      if (q.size() != BH * d)
        throw std::runtime_error("cake_eval: " + gc.dir + ": decode" + std::to_string(t) + "_" + p +
                                 "_q has " + std::to_string(q.size()) + " values, expected " +
                                 std::to_string(BH * d));
      for (std::size_t r = 0; r < BH; ++r)
        std::copy(q.begin() + static_cast<std::ptrdiff_t>(r * d),
                  q.begin() + static_cast<std::ptrdiff_t>((r + 1) * d),
                  in.q_held.begin() + static_cast<std::ptrdiff_t>((r * T + t) * d));
    }
    return in;
  };
  return w;
}

}  // namespace cake_eval
