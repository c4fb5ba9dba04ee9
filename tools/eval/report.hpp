// cake_eval's outputs: the table (stdout), JSON, and a hand-written SVG chart of
// error versus cache size (log2 x axis), one panel per workload, one line per method.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "eval.hpp"

namespace cake_eval {

inline void print_table(std::FILE* f, const Result& r) {
  const Workload& w = r.workload;
  std::fprintf(
      f,
      "\n== %s: B=%lld L=%lld H=%lld Hkv=%lld d=%lld S=%lld w=%lld, %s; held-out: %lld x %s; "
      "cake tau1=%.2f tau2=%.2f gamma=%.0f (%.1f s)\n",
      w.name.c_str(), (long long)w.batch, (long long)w.layers, (long long)w.q_heads,
      (long long)w.kv_heads, (long long)w.head_dim, (long long)w.seq_len, (long long)w.window,
      w.cascade ? "cascading" : "one-shot", (long long)w.held_queries, w.held_source.c_str(),
      w.tau1, w.tau2, w.gamma, r.seconds);
  if (r.cells.empty()) {
    std::fprintf(f, "   (no cache size C with w < C < S = %lld: nothing to compare)\n",
                 (long long)w.seq_len);
    return;
  }
  std::fprintf(f, "%-20s %6s %14s %14s %9s\n", "method", "C", "rel_l2_error", "tokens/layer",
               "% prompt");
  for (const auto& c : r.cells) {
    const double per_layer = static_cast<double>(c.tokens_held) / static_cast<double>(w.layers);
    std::fprintf(f, "%-20s %6lld %14.6f %14.1f %8.2f%%\n", c.method.c_str(),
                 (long long)c.cache_size, c.mean_error, per_layer,
                 100.0 * per_layer / static_cast<double>(w.seq_len));
  }
}

namespace detail {
inline std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      o += ' ';
      continue;
    }
    o += ch;
  }
  return o + "\"";
}
inline std::string xml(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '<')
      o += "&lt;";
    else if (ch == '>')
      o += "&gt;";
    else if (ch == '&')
      o += "&amp;";
    else if (ch == '"')
      o += "&quot;";
    else
      o += ch;
  }
  return o;
}
}  // namespace detail

inline void write_json(std::ostream& f, const std::vector<Result>& results) {
  using detail::json_string;
  f.precision(10);
  f << "{\"workloads\": [";
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const Workload& w = r.workload;
    f << (i ? ",\n  " : "\n  ") << "{\"name\": " << json_string(w.name)
      << ", \"batch\": " << w.batch << ", \"layers\": " << w.layers
      << ", \"q_heads\": " << w.q_heads << ", \"kv_heads\": " << w.kv_heads
      << ", \"head_dim\": " << w.head_dim << ", \"seq_len\": " << w.seq_len
      << ", \"window\": " << w.window << ", \"cascade\": " << (w.cascade ? "true" : "false")
      << ", \"tau1\": " << w.tau1 << ", \"tau2\": " << w.tau2 << ", \"gamma\": " << w.gamma
      << ", \"held_out_queries\": " << w.held_queries
      << ", \"held_out_source\": " << json_string(w.held_source) << ", \"seconds\": " << r.seconds
      << ", \"cache_sizes\": [";
    for (std::size_t k = 0; k < r.sizes.size(); ++k) f << (k ? ", " : "") << r.sizes[k];
    f << "], \"results\": [";
    for (std::size_t k = 0; k < r.cells.size(); ++k) {
      const Cell& c = r.cells[k];
      f << (k ? ",\n    " : "\n    ") << "{\"method\": " << json_string(c.method)
        << ", \"cache_size\": " << c.cache_size << ", \"mean_rel_l2_error\": " << c.mean_error
        << ", \"tokens_held\": " << c.tokens_held << ", \"tokens_held_per_layer\": "
        << static_cast<double>(c.tokens_held) / static_cast<double>(w.layers)
        << ", \"layer_rel_l2_error\": [";
      for (std::size_t l = 0; l < c.layer_error.size(); ++l)
        f << (l ? ", " : "") << c.layer_error[l];
      f << "], \"layer_tokens_held\": [";
      for (std::size_t l = 0; l < c.layer_tokens.size(); ++l)
        f << (l ? ", " : "") << c.layer_tokens[l];
      f << "]}";
    }
    f << "]}";
  }
  f << "\n]}\n";
}

// One panel per workload, stacked; x = log2(C), y = mean relative L2 error from 0.
inline void write_svg(std::ostream& f, const std::vector<Result>& results) {
  using detail::xml;
  static const char* colors[] = {"#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd",
                                 "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  // Dashes keep coinciding lines (e.g. snapkv and cake_uniform_budget) both visible.
  static const char* dashes[] = {"none",    "none", "none", "7,4", "2,3",
                                 "9,3,2,3", "none", "7,4",  "2,3", "none"};
  const double W = 720, PH = 380;  // panel size
  const double ml = 70, mr = 190, mt = 40, mb = 50;
  const double H = PH * static_cast<double>(std::max<std::size_t>(results.size(), 1));
  auto num = [](double x, int prec) {
    std::ostringstream s;
    s.precision(prec);
    s << x;
    return s.str();
  };
  f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (std::size_t p = 0; p < results.size(); ++p) {
    const Result& r = results[p];
    const Workload& w = r.workload;
    const double y0 = PH * static_cast<double>(p);
    const double x_left = ml, x_right = W - mr, y_top = y0 + mt, y_bot = y0 + PH - mb;
    std::ostringstream title;
    title << w.name << ": L=" << w.layers << " H=" << w.q_heads << " Hkv=" << w.kv_heads
          << " d=" << w.head_dim << " S=" << w.seq_len << " w=" << w.window;
    f << "<text x=\"" << (x_left + x_right) / 2 << "\" y=\"" << y0 + 24
      << "\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">" << xml(title.str())
      << "</text>\n";
    if (r.cells.empty()) {
      f << "<text x=\"" << (x_left + x_right) / 2 << "\" y=\"" << (y_top + y_bot) / 2
        << "\" text-anchor=\"middle\">no cache size below the prompt length</text>\n";
      continue;
    }
    double lo = std::log2(static_cast<double>(r.sizes.front()));
    double hi = std::log2(static_cast<double>(r.sizes.back()));
    if (hi - lo < 1e-9) {
      lo -= 0.5;
      hi += 0.5;
    }
    double ymax = 0;
    for (const auto& c : r.cells) ymax = std::max(ymax, c.mean_error);
    // A round top for the y axis: 1, 2 or 5 times a power of ten, above the data.
    double top = 1.0;  // all errors zero: a 0..1 axis
    if (ymax > 0) {
      const double e = std::pow(10.0, std::floor(std::log10(ymax)));
      top = ymax <= e ? e : ymax <= 2 * e ? 2 * e : ymax <= 5 * e ? 5 * e : 10 * e;
    }
    auto X = [&](double c) {
      return x_left + (std::log2(c) - lo) / (hi - lo) * (x_right - x_left);
    };
    auto Y = [&](double e) { return y_bot - e / top * (y_bot - y_top); };
    // Axes, grid and ticks.
    for (int t = 0; t <= 5; ++t) {
      const double v = top * t / 5.0, y = Y(v);
      f << "<line x1=\"" << x_left << "\" y1=\"" << y << "\" x2=\"" << x_right << "\" y2=\"" << y
        << "\" stroke=\"#ddd\"/>\n<text x=\"" << x_left - 6 << "\" y=\"" << y + 4
        << "\" text-anchor=\"end\">" << num(v, 3) << "</text>\n";
    }
    for (index_t c : r.sizes) {
      const double x = X(static_cast<double>(c));
      f << "<line x1=\"" << x << "\" y1=\"" << y_top << "\" x2=\"" << x << "\" y2=\"" << y_bot
        << "\" stroke=\"#eee\"/>\n<text x=\"" << x << "\" y=\"" << y_bot + 16
        << "\" text-anchor=\"middle\">" << c << "</text>\n";
    }
    f << "<rect x=\"" << x_left << "\" y=\"" << y_top << "\" width=\"" << x_right - x_left
      << "\" height=\"" << y_bot - y_top << "\" fill=\"none\" stroke=\"#333\"/>\n"
      << "<text x=\"" << (x_left + x_right) / 2 << "\" y=\"" << y_bot + 36
      << "\" text-anchor=\"middle\">cache size C (tokens per layer, log2 scale)</text>\n"
      << "<text transform=\"translate(" << 18 << "," << (y_top + y_bot) / 2
      << ") rotate(-90)\" text-anchor=\"middle\">mean relative L2 error</text>\n";
    // One polyline per method, with markers, and the legend.
    for (std::size_t m = 0; m < r.methods.size(); ++m) {
      const char* col = colors[m % (sizeof(colors) / sizeof(colors[0]))];
      const char* dash = dashes[m % (sizeof(dashes) / sizeof(dashes[0]))];
      std::ostringstream pts;
      std::vector<std::pair<double, double>> xy;
      for (const auto& c : r.cells)
        if (c.method == r.methods[m])
          xy.emplace_back(X(static_cast<double>(c.cache_size)), Y(c.mean_error));
      for (const auto& [x, y] : xy) pts << x << "," << y << " ";
      f << "<polyline fill=\"none\" stroke=\"" << col << "\" stroke-dasharray=\"" << dash
        << "\" stroke-width=\"2\" points=\"" << pts.str() << "\"/>\n";
      for (const auto& [x, y] : xy)
        f << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"3.5\" fill=\"" << col << "\"/>\n";
      const double ly = y_top + 16 + 20 * static_cast<double>(m);
      f << "<line x1=\"" << x_right + 14 << "\" y1=\"" << ly - 4 << "\" x2=\"" << x_right + 38
        << "\" y2=\"" << ly - 4 << "\" stroke=\"" << col << "\" stroke-dasharray=\"" << dash
        << "\" stroke-width=\"2\"/>\n<text x=\"" << x_right + 44 << "\" y=\"" << ly << "\">"
        << xml(r.methods[m]) << "</text>\n";
    }
  }
  f << "</svg>\n";
}

}  // namespace cake_eval
