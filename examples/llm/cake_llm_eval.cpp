// cake_llm_eval: CAKE vs SnapKV vs PyramidKV (and the full cache) on a real model.
//
//  * Needle in a haystack: a 5-digit pass key hidden at several depths of filler
//    text, for several context lengths (up to the model's own limit). A method
//    scores when its greedy answer contains the key.
//  * Agreement: over a greedy continuation of the full cache (teacher-forced), the
//    fraction of steps whose next token under the compressed cache is the same.
//    The first answer token comes from the prefill, which every method shares, so
//    only decoded steps count.
// Each prompt is prefilled once; every method and cache size is filled from that
// record and all of them decode together, one batched step per token.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "store.hpp"

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ','))
    if (!x.empty()) out.push_back(x);
  return out;
}
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

const char* kFiller =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

// The chat prompt with the needle at `depth` of the filler, at most `target` tokens.
std::vector<int> haystack(const llm::Tokenizer& tok, int target, double depth,
                          const std::string& key) {
  const std::string intro =
      "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
      "it. "
      "I will quiz you about the pass key.\n\n";
  const std::string needle =
      "The pass key is " + key + ". Remember it. " + key + " is the pass key. ";
  const std::string question = "\nWhat is the pass key?";
  const std::string answer = "The pass key is";
  auto build = [&](int n) {
    const int at = static_cast<int>(depth * n + 0.5);
    std::string body;
    for (int i = 0; i < n; ++i) {
      if (i == at) body += needle;
      body += kFiller;
    }
    if (at >= n) body += needle;
    return tok.encode(llm::chat_prompt(intro + body + question) + answer);
  };
  const int per = static_cast<int>(tok.encode(kFiller).size());
  const int base = static_cast<int>(build(0).size());
  int n = std::max(0, (target - base) / per);
  auto ids = build(n);
  while (n > 0 && static_cast<int>(ids.size()) > target) ids = build(--n);
  return ids;
}

struct Config {
  std::string method;
  int cache = 0;
};

struct Cell {  // accumulated over prompts
  int needles = 0, found = 0, steps = 0, agree = 0;
  double pct = 0.0;  // cache as % of context, summed
  int n = 0;
};

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

void write_svg(const std::string& path, const std::vector<std::string>& methods,
               const std::vector<int>& caches, std::map<std::pair<std::string, int>, Cell>& cells,
               const Cell& full, int ctx_max) {
  // The legend takes one row per 5 entries below the panels.
  const int legend_rows = static_cast<int>(methods.size() + 1 + 4) / 5;
  const int W = 920, Hh = 356 + 22 * legend_rows, pw = 380, ph = 250, top = 60,
            lefts[2] = {70, 520};
  const char* colors[] = {"#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
                          "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"};
  constexpr std::size_t n_colors = sizeof(colors) / sizeof(colors[0]);
  std::ofstream f(path);
  f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << Hh
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
       "fill=\"white\"/>\n";
  f << "<text x=\"" << W / 2
    << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">SmolLM2-135M-Instruct, contexts up to "
    << ctx_max << " tokens: quality vs KV cache size per layer</text>\n";
  const double lx0 = std::log2(static_cast<double>(caches.front())),
               lx1 = std::log2(static_cast<double>(caches.back()));
  auto X = [&](int panel, int c) {
    const double t = lx1 > lx0 ? (std::log2(static_cast<double>(c)) - lx0) / (lx1 - lx0) : 0.5;
    return lefts[panel] + t * pw;
  };
  auto Y = [&](double v) { return top + (1.0 - v) * ph; };
  const char* titles[2] = {"needle retrieval accuracy",
                           "greedy next-token agreement with full cache"};
  for (int p = 0; p < 2; ++p) {
    f << "<text x=\"" << lefts[p] + pw / 2 << "\" y=\"" << top - 12 << "\" text-anchor=\"middle\">"
      << titles[p] << "</text>\n";
    f << "<rect x=\"" << lefts[p] << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"#444\"/>\n";
    for (int i = 0; i <= 4; ++i) {
      const double v = i / 4.0;
      f << "<line x1=\"" << lefts[p] << "\" x2=\"" << lefts[p] + pw << "\" y1=\"" << Y(v)
        << "\" y2=\"" << Y(v) << "\" stroke=\"#ddd\"/><text x=\"" << lefts[p] - 6 << "\" y=\""
        << Y(v) + 4 << "\" text-anchor=\"end\">" << static_cast<int>(v * 100) << "%</text>\n";
    }
    for (int c : caches)
      f << "<text x=\"" << X(p, c) << "\" y=\"" << top + ph + 16 << "\" text-anchor=\"middle\">"
        << c << "</text>\n";
    f << "<text x=\"" << lefts[p] + pw / 2 << "\" y=\"" << top + ph + 34
      << "\" text-anchor=\"middle\">cache size (tokens per layer, log scale)</text>\n";
    const double fv =
        p == 0 ? (full.needles ? static_cast<double>(full.found) / full.needles : 0) : 1.0;
    f << "<line x1=\"" << lefts[p] << "\" x2=\"" << lefts[p] + pw << "\" y1=\"" << Y(fv)
      << "\" y2=\"" << Y(fv) << "\" stroke=\"#000\" stroke-dasharray=\"5,4\"/>\n";
    for (std::size_t m = 0; m < methods.size(); ++m) {
      std::string pts;
      for (int c : caches) {
        const Cell& e = cells[{methods[m], c}];
        const double v = p == 0 ? (e.needles ? static_cast<double>(e.found) / e.needles : 0)
                                : (e.steps ? static_cast<double>(e.agree) / e.steps : 0);
        pts += std::to_string(X(p, c)) + "," + std::to_string(Y(v)) + " ";
        f << "<circle cx=\"" << X(p, c) << "\" cy=\"" << Y(v) << "\" r=\"3\" fill=\""
          << colors[m % n_colors] << "\"/>\n";
      }
      f << "<polyline points=\"" << pts << "\" fill=\"none\" stroke=\"" << colors[m % n_colors]
        << "\" stroke-width=\"2\"/>\n";
    }
  }
  for (std::size_t m = 0; m <= methods.size(); ++m) {
    const bool is_full = m == methods.size();
    const int lx = 120 + static_cast<int>(m % 5) * 150;
    const int ly = top + ph + 58 + static_cast<int>(m / 5) * 22;
    f << "<line x1=\"" << lx << "\" x2=\"" << lx + 24 << "\" y1=\"" << ly << "\" y2=\"" << ly
      << "\" stroke=\"" << (is_full ? "#000" : colors[m % n_colors]) << "\" stroke-width=\"2\""
      << (is_full ? " stroke-dasharray=\"5,4\"" : "") << "/><text x=\"" << lx + 30 << "\" y=\""
      << ly + 4 << "\">" << (is_full ? std::string("full cache") : methods[m]) << "</text>\n";
  }
  f << "</svg>\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path = llm::default_model_path(), json_path, svg_path;
  std::vector<std::string> methods;  // every method of store.hpp but the full cache
  for (const auto& m : llm::method_names())
    if (m != "full") methods.push_back(m);
  std::vector<int> contexts{512, 1024, 2048}, caches{64, 128, 256, 512, 1024};
  std::vector<double> depths{0.1, 0.5, 0.9};
  int steps = 16, cache_threads = 1;
  unsigned seed = 1234;
  llm::CacheOptions base;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--model")
        model_path = next();
      else if (a == "--methods")
        methods = split(next());
      else if (a == "--contexts") {
        contexts.clear();
        for (auto& s : split(next())) contexts.push_back(std::stoi(s));
      } else if (a == "--cache-sizes") {
        caches.clear();
        for (auto& s : split(next())) caches.push_back(std::stoi(s));
      } else if (a == "--depths") {
        depths.clear();
        for (auto& s : split(next())) depths.push_back(std::stod(s));
      } else if (a == "--steps")
        steps = std::stoi(next());
      else if (a == "--seed")
        seed = static_cast<unsigned>(std::stoul(next()));
      else if (a == "--window")
        base.window = std::stoi(next());
      else if (a == "--tau1")
        base.tau1 = std::stof(next());
      else if (a == "--tau2")
        base.tau2 = std::stof(next());
      else if (a == "--gamma")
        base.gamma = std::stof(next());
      else if (a == "--cache-threads")
        cache_threads = std::stoi(next());
      else if (a == "--json")
        json_path = next();
      else if (a == "--svg")
        svg_path = next();
      else if (a == "--help" || a == "-h") {
        std::printf(
            "usage: cake_llm_eval [--model FILE] [--contexts 512,1024,2048|max] [--depths "
            "0.1,0.5,0.9]\n"
            "       [--cache-sizes 64,128,256,512,1024] [--methods cake,snapkv,...] [--steps "
            "16]\n"
            "       [--window 32] [--tau1 X --tau2 X --gamma X] [--seed N] [--json FILE] [--svg "
            "FILE]\n"
            "contexts above the model's trained length (read from the file) are clamped to it.\n");
        return 0;
      } else
        throw std::runtime_error("unknown argument " + a);
    }
    for (const auto& m : methods)
      if (!llm::known_method(m) || m == "full") throw std::runtime_error("bad method " + m);
    if (!std::ifstream(model_path)) {
      std::fprintf(stderr,
                   "cake_llm_eval: model not found at %s\n  fetch it with: scripts/fetch-model\n",
                   model_path.c_str());
      return 3;
    }
    llm::set_cache_threads(cache_threads);
    const auto t_all = std::chrono::steady_clock::now();
    const llm::GgufFile file(model_path);
    const llm::Model model = llm::Model::load(file);
    const llm::Tokenizer tok = llm::load_tokenizer(file);
    const auto& mc = model.cfg;
    const int limit = mc.context - steps - 1;
    for (auto& c : contexts) c = std::min(c, limit);
    std::printf("model %s: %d layers, %d/%d heads, context limit %d tokens (from the file)\n",
                file.get_string("general.name").c_str(), mc.layers, mc.heads, mc.kv_heads,
                mc.context);
    llm::Transformer tf(model);
    const auto V = static_cast<std::size_t>(mc.vocab);

    std::vector<Config> configs;
    for (const auto& m : methods)
      for (int c : caches) configs.push_back({m, c});
    std::map<std::pair<std::string, int>, Cell> cells;
    Cell full;
    std::ostringstream runs;  // JSON records per prompt
    std::mt19937 rng(seed);
    double t_prefill = 0, t_fill = 0, t_decode = 0;

    for (int ctx : contexts)
      for (double depth : depths) {
        const std::string key = std::to_string(10000 + rng() % 90000);
        const auto ids = haystack(tok, ctx, depth, key);
        const int S = static_cast<int>(ids.size());
        auto t0 = std::chrono::steady_clock::now();
        const auto rec = tf.prefill(ids, base.window);
        const double tp = seconds_since(t0);
        t_prefill += tp;

        // Sequences: 0 = full; then per config a free-running and a teacher-forced one.
        t0 = std::chrono::steady_clock::now();
        std::vector<std::unique_ptr<llm::KvStore>> stores;
        llm::CacheOptions fo = base;
        fo.method = "full";
        stores.push_back(llm::make_store(mc, fo, S));
        for (const auto& cf : configs)
          for (int twice = 0; twice < 2; ++twice) {
            llm::CacheOptions o = base;
            o.method = cf.method;
            o.cache_size = cf.cache;
            stores.push_back(llm::make_store(mc, o, S));
          }
        for (auto& s : stores) s->prefill(rec);
        t_fill += seconds_since(t0);

        const std::size_t n = stores.size();
        std::vector<llm::KvStore*> ptrs;
        for (auto& s : stores) ptrs.push_back(s.get());
        const int first = llm::argmax(rec.last_logits.data(), V);
        std::vector<int> input(n, first);
        std::vector<std::vector<int>> gen(n, std::vector<int>{first});
        std::vector<int> agree(n, 0);
        std::vector<float> logits;
        t0 = std::chrono::steady_clock::now();
        for (int t = 0; t + 1 < steps; ++t) {
          tf.decode(input, std::vector<std::int64_t>(n, static_cast<std::int64_t>(S) + t), ptrs,
                    logits);
          std::vector<int> am(n);
          for (std::size_t i = 0; i < n; ++i) am[i] = llm::argmax(&logits[i * V], V);
          for (std::size_t i = 0; i < n; ++i) {
            const bool forced = i > 0 && (i - 1) % 2 == 1;
            agree[i] += am[i] == am[0];
            input[i] = forced ? am[0] : am[i];
            gen[i].push_back(input[i]);  // forced sequences follow the full cache
          }
        }
        const double td = seconds_since(t0);
        t_decode += td;
        auto answer = [&](const std::vector<int>& g) {
          std::string s;
          for (int id : g) {
            if (id == tok.id("<|im_end|>") || id == tok.id("<|endoftext|>")) break;
            s += tok.decode_token(id);
          }
          return s;
        };
        const std::string full_answer = answer(gen[0]);
        const bool full_ok = full_answer.find(key) != std::string::npos;
        full.needles++;
        full.found += full_ok;
        std::printf(
            "context %5d (target %d) depth %3.0f%%: key %s, full cache answers \"%s\" %s  [prefill "
            "%.1f s, decode %.1f s]\n",
            S, ctx, depth * 100, key.c_str(), full_answer.c_str(), full_ok ? "ok" : "MISS", tp, td);
        runs << (runs.tellp() > 0 ? ",\n" : "") << "    {\"context\": " << S
             << ", \"depth\": " << depth << ", \"key\": \"" << key << "\", \"full_answer\": \""
             << json_escape(full_answer) << "\", \"full_found\": " << (full_ok ? "true" : "false")
             << ", \"methods\": [";
        for (std::size_t c = 0; c < configs.size(); ++c) {
          const std::size_t fi = 1 + 2 * c, ti = fi + 1;
          const std::string ans = answer(gen[fi]);
          const bool ok = ans.find(key) != std::string::npos;
          Cell& e = cells[{configs[c].method, configs[c].cache}];
          e.needles++;
          e.found += ok;
          e.steps += steps - 1;
          e.agree += agree[ti];
          e.pct += 100.0 * std::min(configs[c].cache, S) / S;
          e.n++;
          runs << (c ? ", " : "") << "{\"method\": \"" << configs[c].method
               << "\", \"cache_size\": " << configs[c].cache
               << ", \"found\": " << (ok ? "true" : "false")
               << ", \"agreement\": " << static_cast<double>(agree[ti]) / (steps - 1)
               << ", \"tokens_held\": " << stores[fi]->tokens_held() << ", \"answer\": \""
               << json_escape(ans) << "\"}";
        }
        runs << "]}";
        std::fflush(stdout);
      }

    // The table.
    std::printf("\n%-13s %6s %9s %14s %11s\n", "method", "cache", "% of ctx", "needle found",
                "agreement");
    std::printf("%-13s %6s %8s%% %9d/%-4d %10.1f%%\n", "full", "all", "100", full.found,
                full.needles, 100.0);
    for (const auto& m : methods)
      for (int c : caches) {
        const Cell& e = cells[{m, c}];
        std::printf("%-13s %6d %8.1f%% %9d/%-4d %10.1f%%\n", m.c_str(), c, e.pct / std::max(e.n, 1),
                    e.found, e.needles, 100.0 * e.agree / std::max(e.steps, 1));
      }
    std::printf("\n(contexts");
    for (int c : contexts) std::printf(" %d", c);
    std::printf(", depths");
    for (double d : depths) std::printf(" %.0f%%", d * 100);
    std::printf("; agreement over %d decoded steps per prompt; window %d)\n", steps - 1,
                base.window);
    std::printf("time: prefill %.1f s, filling caches %.1f s, decoding %.1f s, total %.1f s\n",
                t_prefill, t_fill, t_decode, seconds_since(t_all));

    if (!json_path.empty()) {
      std::ofstream f(json_path);
      f << "{\n  \"model\": \"" << json_escape(file.get_string("general.name"))
        << "\",\n  \"window\": " << base.window << ",\n  \"steps\": " << steps - 1
        << ",\n  \"full\": {\"found\": " << full.found << ", \"needles\": " << full.needles
        << "},\n  \"summary\": [";
      bool first_row = true;
      for (const auto& m : methods)
        for (int c : caches) {
          const Cell& e = cells[{m, c}];
          f << (first_row ? "\n" : ",\n") << "    {\"method\": \"" << m
            << "\", \"cache_size\": " << c
            << ", \"percent_of_context\": " << e.pct / std::max(e.n, 1)
            << ", \"found\": " << e.found << ", \"needles\": " << e.needles
            << ", \"agreement\": " << static_cast<double>(e.agree) / std::max(e.steps, 1) << "}";
          first_row = false;
        }
      f << "\n  ],\n  \"runs\": [\n" << runs.str() << "\n  ]\n}\n";
      std::printf("wrote %s\n", json_path.c_str());
    }
    if (!svg_path.empty()) {
      write_svg(svg_path, methods, caches, cells, full,
                *std::max_element(contexts.begin(), contexts.end()));
      std::printf("wrote %s\n", svg_path.c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cake_llm_eval: %s\n", e.what());
    return 1;
  }
}
