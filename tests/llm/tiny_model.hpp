// A tiny random Llama model for the engine's tests, written as a GGUF file: weights
// rounded to float (the tests' double-precision references see the same numbers).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gguf.hpp"

namespace tiny_model {

using llm::ggml_type;
using llm::GgufWriter;

struct Tiny {
  int L = 2, D = 16, H = 4, Hkv = 2, hd = 4, F = 24, V = 37;
  double base = 10000.0, eps = 1e-5;
  std::map<std::string, std::vector<double>> t;
  // Tensors written in a block format (quantise()); the rest are written as F32.
  std::map<std::string, std::pair<ggml_type, std::vector<std::uint8_t>>> raw;
};

inline std::vector<float> to_f(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// Random weights, rounded to float so that both sides see the same numbers.
inline Tiny make_tiny(unsigned seed, bool tied, Tiny m = {}) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  auto mat = [&](int rows, int cols, double scale) {
    std::vector<double> v(static_cast<std::size_t>(rows * cols));
    for (auto& x : v) x = static_cast<float>(n(rng) * scale);
    return v;
  };
  auto normw = [&](int d) {
    std::vector<double> v(static_cast<std::size_t>(d));
    for (auto& x : v) x = static_cast<float>(1.0 + 0.1 * n(rng));
    return v;
  };
  m.t["token_embd.weight"] = mat(m.V, m.D, 1.0);
  m.t["output_norm.weight"] = normw(m.D);
  if (!tied) m.t["output.weight"] = mat(m.V, m.D, 0.3);
  for (int l = 0; l < m.L; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    m.t[p + "attn_norm.weight"] = normw(m.D);
    m.t[p + "attn_q.weight"] = mat(m.H * m.hd, m.D, 0.5);
    m.t[p + "attn_k.weight"] = mat(m.Hkv * m.hd, m.D, 0.5);
    m.t[p + "attn_v.weight"] = mat(m.Hkv * m.hd, m.D, 0.5);
    m.t[p + "attn_output.weight"] = mat(m.D, m.H * m.hd, 0.3);
    m.t[p + "ffn_norm.weight"] = normw(m.D);
    m.t[p + "ffn_gate.weight"] = mat(m.F, m.D, 0.3);
    m.t[p + "ffn_up.weight"] = mat(m.F, m.D, 0.3);
    m.t[p + "ffn_down.weight"] = mat(m.D, m.F, 0.3);
  }
  return m;
}

inline std::string write_tiny(const Tiny& m, const char* name) {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", "tiny");
  w.add_u32("llama.block_count", static_cast<std::uint32_t>(m.L));
  w.add_u32("llama.embedding_length", static_cast<std::uint32_t>(m.D));
  w.add_u32("llama.feed_forward_length", static_cast<std::uint32_t>(m.F));
  w.add_u32("llama.attention.head_count", static_cast<std::uint32_t>(m.H));
  w.add_u32("llama.attention.head_count_kv", static_cast<std::uint32_t>(m.Hkv));
  w.add_u32("llama.context_length", 256);
  w.add_f32("llama.rope.freq_base", static_cast<float>(m.base));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(m.eps));
  for (const auto& [k, v] : m.t) {
    // Matrices are (rows, cols) here; GGUF lists the contiguous dimension first.
    std::vector<std::uint64_t> dims;
    if (k.find("norm") != std::string::npos)
      dims = {v.size()};
    else if (k == "token_embd.weight" || k == "output.weight")
      dims = {static_cast<std::uint64_t>(m.D), static_cast<std::uint64_t>(m.V)};
    else {
      const auto rows =
          k.find("attn_q") != std::string::npos ? m.H * m.hd
          : (k.find("attn_k") != std::string::npos || k.find("attn_v") != std::string::npos)
              ? m.Hkv * m.hd
          : (k.find("ffn_gate") != std::string::npos || k.find("ffn_up") != std::string::npos)
              ? m.F
              : m.D;
      dims = {v.size() / static_cast<std::size_t>(rows), static_cast<std::uint64_t>(rows)};
    }
    if (const auto r = m.raw.find(k); r != m.raw.end())
      w.add_tensor(k, dims, r->second.first, r->second.second);
    else
      w.add_f32_tensor(k, dims, to_f(v));
  }
  const std::string path = (std::filesystem::temp_directory_path() / name).string();
  w.write(path);
  return path;
}

}  // namespace tiny_model
