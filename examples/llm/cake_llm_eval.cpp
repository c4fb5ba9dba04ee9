// cake_llm_eval: every cache method of store.hpp against the full cache on a real model.
//
//  * Needle in a haystack: a 5-digit pass key hidden at a depth of filler text
//    (several filler texts, a fresh key per prompt), for several context lengths
//    up to the model's own limit. A method scores when its greedy answer contains
//    the key.
//  * Agreement: over a greedy continuation of the full cache (teacher-forced), the
//    fraction of steps whose next token under the compressed cache is the same.
//    The first answer token comes from the prefill, which every method shares, so
//    only decoded steps count.
// Cache sizes are tokens per layer (64 .. 1024) and shares of the prompt (2% ..
// 20%). Every (context, method, cache) cell gets a 95% Wilson interval; agreement's
// steps of one prompt are not independent, so its interval takes the prompts as
// clusters (stats.hpp, wilson_clustered: Wilson's on the effective number of steps).
// Each prompt is prefilled once; every method and cache size is filled from that
// record (once: its teacher-forced twin is a copy) and all of them decode together,
// one batched step per token.
//
// The default is the full run (4 contexts x 110 prompts: many hours on 2 cores);
// --quick is a few-minute run for everyday use.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "journal.hpp"
#include "probe.hpp"
#include "stats.hpp"
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

// Filler texts: prompt i of a context uses filler (i / depths) % 4, so each depth
// sees every filler.
const char* const kFillers[] = {
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
    "A river runs past old stone houses. People talk about the weather, the markets and the "
    "harvest. Evening comes slowly in the valley. ",
    "The committee met on Tuesday to review the budget for the new library. Several members "
    "asked for more details about the heating costs. ",
    "Waves break on the shore while gulls circle above the harbour. Fishing boats return before "
    "the storm, and the lighthouse keeper lights the lamp. ",
};
constexpr int kNumFillers = sizeof(kFillers) / sizeof(kFillers[0]);

// The chat prompt with the needle at `depth` of the filler, at most `target` tokens.
std::vector<int> haystack(const llm::Tokenizer& tok, int target, double depth,
                          const std::string& key, const std::string& filler) {
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
      body += filler;
    }
    if (at >= n) body += needle;
    return tok.encode(llm::chat_prompt(intro + body + question) + answer);
  };
  const int per = static_cast<int>(tok.encode(filler).size());
  const int base = static_cast<int>(build(0).size());
  int n = std::max(0, (target - base) / per);
  auto ids = build(n);
  while (n > 0 && static_cast<int>(ids.size()) > target) ids = build(--n);
  return ids;
}

// A cache size: tokens per layer, or a share of the prompt (percent > 0).
struct CacheSpec {
  int tokens = 0;
  double percent = 0;
  std::string label() const {
    if (percent <= 0) return std::to_string(tokens);
    std::ostringstream o;
    o << percent << "%";
    return o.str();
  }
  int size_for(int prompt, int window) const {
    if (percent <= 0) return tokens;
    return std::max(window + 1, static_cast<int>(percent / 100.0 * prompt + 0.5));
  }
};

struct Cell {  // one (context, method, cache) over its prompts
  long long needles = 0, found = 0, steps = 0, agree = 0;
  double tokens = 0;                        // cache size summed over prompts
  std::vector<long long> agree_k, agree_n;  // (prompts) agreeing steps, steps
};

// A point estimate and its 95% interval.
struct Estimate {
  double p = 0;
  std::pair<double, double> ci{0, 0};
  bool any = false;  // measured at all
};
Estimate needle_rate(const Cell& e) {
  if (e.needles == 0) return {};
  return {static_cast<double>(e.found) / e.needles, llm::wilson(e.found, e.needles), true};
}
// Agreement with the prompts as clusters of steps.
Estimate agreement(const Cell& e) {
  if (e.steps == 0) return {};
  const auto c = llm::wilson_clustered(e.agree_k, e.agree_n);
  return {c.p, c.ci, true};
}

// A string as JSON writes it (also the trace's answers: one line each, whatever the
// model generated).
std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    if (static_cast<unsigned char>(c) < 0x20) {  // other control characters
      char u[8];
      std::snprintf(u, sizeof u, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
      o += u;
      continue;
    }
    o += c;
  }
  return o;
}

using CellKey = std::tuple<int, std::string, std::string>;  // context, method, cache label

// Panels: rows = (needle, agreement) for each kind of cache size the run has (tokens
// per layer, then shares of the prompt), columns = contexts; x = the sizes of that kind
// (log scale), y = 0..100%, 95% Wilson intervals as error bars.
void write_svg(const std::string& path, const std::string& model,
               const std::vector<std::string>& methods, const std::vector<CacheSpec>& caches,
               const std::vector<int>& contexts, std::map<CellKey, Cell>& cells,
               std::map<int, Cell>& full) {
  struct Axis {
    std::vector<CacheSpec> at;  // ascending
    const char* title;
    double value(const CacheSpec& c) const { return c.percent > 0 ? c.percent : c.tokens; }
  };
  std::vector<Axis> axes;
  for (bool shares : {false, true}) {
    Axis a{{}, shares ? "cache (share of the prompt)" : "cache (tokens per layer)"};
    for (const auto& c : caches)
      if ((c.percent > 0) == shares) a.at.push_back(c);
    std::sort(a.at.begin(), a.at.end(),
              [&a](const CacheSpec& x, const CacheSpec& y) { return a.value(x) < a.value(y); });
    if (!a.at.empty()) axes.push_back(std::move(a));
  }
  const int nc = static_cast<int>(contexts.size()), nrows = 2 * static_cast<int>(axes.size());
  const int pw = 250, ph = 190, gap = 60, left = 70, top = 60;
  const int legend_rows = static_cast<int>(methods.size() + 1 + 4) / 5;
  const int W = left + nc * (pw + gap), Hh = top + nrows * (ph + 70) + 22 * legend_rows + 20;
  const char* colors[] = {"#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
                          "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"};
  constexpr std::size_t n_colors = sizeof(colors) / sizeof(colors[0]);
  std::ofstream f(path);
  if (!f) throw std::runtime_error("cannot write the chart to " + path);
  f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << Hh
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
       "fill=\"white\"/>\n";
  f << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" << model
    << ": quality vs KV cache size per layer (95% Wilson intervals; agreement's by "
       "prompt)</text>\n";
  for (int row = 0; row < nrows; ++row) {
    const Axis& ax = axes[static_cast<std::size_t>(row / 2)];
    const bool needle = row % 2 == 0;
    const double lx0 = std::log2(ax.value(ax.at.front())), lx1 = std::log2(ax.value(ax.at.back()));
    for (int ci = 0; ci < nc; ++ci) {
      const int ctx = contexts[static_cast<std::size_t>(ci)];
      const double x0 = left + ci * (pw + gap), y0 = top + row * (ph + 70);
      auto X = [&](const CacheSpec& c, std::size_t m) {
        const double t = lx1 > lx0 ? (std::log2(ax.value(c)) - lx0) / (lx1 - lx0) : 0.5;
        // methods side by side so that their bars do not hide each other
        return x0 + 10 + t * (pw - 20) + (static_cast<double>(m) - methods.size() / 2.0) * 2.0;
      };
      auto Y = [&](double v) { return y0 + (1.0 - v) * ph; };
      f << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 - 10 << "\" text-anchor=\"middle\">"
        << (needle ? "needle found" : "agreement with full cache") << ", context " << ctx
        << "</text>\n<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << pw << "\" height=\""
        << ph << "\" fill=\"none\" stroke=\"#444\"/>\n";
      for (int i = 0; i <= 4; ++i) {
        const double v = i / 4.0;
        f << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << Y(v) << "\" y2=\""
          << Y(v) << "\" stroke=\"#ddd\"/><text x=\"" << x0 - 6 << "\" y=\"" << Y(v) + 4
          << "\" text-anchor=\"end\">" << static_cast<int>(v * 100) << "%</text>\n";
      }
      for (const auto& c : ax.at)
        f << "<text x=\"" << X(c, methods.size() / 2) << "\" y=\"" << y0 + ph + 16
          << "\" text-anchor=\"middle\">" << c.label() << "</text>\n";
      f << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 + ph + 32 << "\" text-anchor=\"middle\">"
        << ax.title << "</text>\n";
      const Cell& fu = full[ctx];
      const double fv =
          needle ? (fu.needles ? static_cast<double>(fu.found) / fu.needles : 0) : 1.0;
      f << "<line x1=\"" << x0 << "\" x2=\"" << x0 + pw << "\" y1=\"" << Y(fv) << "\" y2=\""
        << Y(fv) << "\" stroke=\"#000\" stroke-dasharray=\"5,4\"/>\n";
      for (std::size_t m = 0; m < methods.size(); ++m) {
        const char* col = colors[m % n_colors];
        std::string pts;
        for (const auto& c : ax.at) {
          const Cell& e = cells[{ctx, methods[m], c.label()}];
          const Estimate est = needle ? needle_rate(e) : agreement(e);
          if (!est.any) continue;
          const double v = est.p;
          const auto [lo, hi] = est.ci;
          pts += std::to_string(X(c, m)) + "," + std::to_string(Y(v)) + " ";
          f << "<line x1=\"" << X(c, m) << "\" x2=\"" << X(c, m) << "\" y1=\"" << Y(lo)
            << "\" y2=\"" << Y(hi) << "\" stroke=\"" << col << "\" stroke-width=\"1\"/>"
            << "<circle cx=\"" << X(c, m) << "\" cy=\"" << Y(v) << "\" r=\"2.5\" fill=\"" << col
            << "\"/>\n";
        }
        f << "<polyline points=\"" << pts << "\" fill=\"none\" stroke=\"" << col
          << "\" stroke-width=\"1.5\" opacity=\"0.8\"/>\n";
      }
    }
  }
  for (std::size_t m = 0; m <= methods.size(); ++m) {
    const bool is_full = m == methods.size();
    const int lx = left + static_cast<int>(m % 5) * 150;
    const int ly = top + nrows * (ph + 70) + static_cast<int>(m / 5) * 22;
    f << "<line x1=\"" << lx << "\" x2=\"" << lx + 24 << "\" y1=\"" << ly << "\" y2=\"" << ly
      << "\" stroke=\"" << (is_full ? "#000" : colors[m % n_colors]) << "\" stroke-width=\"2\""
      << (is_full ? " stroke-dasharray=\"5,4\"" : "") << "/><text x=\"" << lx + 30 << "\" y=\""
      << ly + 4 << "\">" << (is_full ? std::string("full cache") : methods[m]) << "</text>\n";
  }
  f << "</svg>\n";
  if (!f) throw std::runtime_error("could not write the chart to " + path);
}

std::string pct(double x) {
  char b[16];
  std::snprintf(b, sizeof b, "%.1f", 100.0 * x);
  return b;
}

// "k/n [lo, hi]" in percent.
std::string interval(long long k, long long n) {
  if (n == 0) return "-";
  const auto [lo, hi] = llm::wilson(k, n);
  return std::to_string(k) + "/" + std::to_string(n) + " [" + pct(lo) + ", " + pct(hi) + "]";
}

// The methods of one (context, cache) column whose interval lies above every other
// method's, or the tie of those overlapping the best.
std::string leaders(const std::vector<std::string>& methods, const std::vector<Estimate>& est) {
  std::size_t best = 0;
  for (std::size_t m = 1; m < methods.size(); ++m)
    if (est[m].any && (!est[best].any || est[m].p > est[best].p)) best = m;
  if (!est[best].any) return "-";
  std::string tied;
  std::size_t n_tied = 0;
  for (std::size_t m = 0; m < methods.size(); ++m)
    if (m != best && est[m].any && !llm::apart(est[best].ci, est[m].ci)) {
      tied += (tied.empty() ? "" : ", ") + methods[m];
      ++n_tied;
    }
  if (methods.size() > 1 && n_tied + 1 == methods.size()) return "all tied";
  return tied.empty() ? methods[best] + " (apart from all)"
                      : methods[best] + " (tied with " + tied + ")";
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path = llm::default_model_path(), json_path, svg_path, journal_path;
  std::vector<std::string> methods;  // every method of store.hpp but the full cache
  for (const auto& m : llm::method_names())
    if (m != "full") methods.push_back(m);
  // The full run; --quick replaces these before the other flags apply.
  std::vector<int> contexts{1024, 2048, 4096, 8192};
  std::vector<CacheSpec> caches{{64, 0},  {128, 0}, {256, 0},  {512, 0}, {1024, 0},
                                {0, 2.0}, {0, 5.0}, {0, 10.0}, {0, 20.0}};
  std::vector<double> depths;
  for (int i = 0; i <= 10; ++i) depths.push_back(i / 10.0);
  int trials = 110, steps = 21, cache_threads = 1;
  unsigned seed = 1234;
  bool quick = false, trace = false, copy_attention = false;
  llm::CacheOptions base;
  try {
    for (int i = 1; i < argc; ++i)
      if (std::string(argv[i]) == "--quick") {
        quick = true;
        contexts = {512, 1024, 2048};
        caches = {{64, 0}, {128, 0}, {256, 0}, {512, 0}, {1024, 0}, {0, 5.0}, {0, 20.0}};
        depths = {0.1, 0.5, 0.9};
        trials = 3;
        steps = 16;
      }
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--quick")
        continue;
      else if (a == "--model")
        model_path = next();
      else if (a == "--methods")
        methods = split(next());
      else if (a == "--contexts") {
        contexts.clear();
        for (auto& s : split(next())) contexts.push_back(std::stoi(s));
      } else if (a == "--cache-sizes" || a == "--cache-shares") {
        const bool share = a == "--cache-shares";
        std::erase_if(caches, [&](const CacheSpec& c) { return (c.percent > 0) == share; });
        for (auto& s : split(next()))
          caches.push_back(share ? CacheSpec{0, std::stod(s)} : CacheSpec{std::stoi(s), 0});
      } else if (a == "--depths") {
        depths.clear();
        for (auto& s : split(next())) depths.push_back(std::stod(s));
      } else if (a == "--trials")
        trials = std::stoi(next());
      else if (a == "--steps")
        steps = std::stoi(next());
      else if (a == "--trace")
        trace = true;
      else if (a == "--copy-attention")
        copy_attention = true;
      else if (a == "--whole-layers") {
        for (auto& l : split(next())) {
          std::size_t used = 0;
          const int layer = l.empty() ? -1 : std::stoi(l, &used);
          if (used != l.size() || layer < 0 || layer > 63)
            throw std::runtime_error("--whole-layers: expected layers 0..63, got '" + l + "'");
          base.whole_layers |= std::uint64_t{1} << layer;
        }
        if (!base.whole_layers) throw std::runtime_error("--whole-layers: no layer given");
      } else if (a == "--seed")
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
      else if (a == "--journal")
        journal_path = next();
      else if (a == "--help" || a == "-h") {
        std::printf(
            "usage: cake_llm_eval [--quick] [--model FILE] [--contexts 1024,2048,4096,8192]\n"
            "       [--depths 0,0.1,...,1] [--trials 110] [--steps 21]\n"
            "       [--cache-sizes 64,128,256,512,1024] [--cache-shares 2,5,10,20]\n"
            "       [--methods cake,snapkv,...] [--window 32] [--tau1 X --tau2 X --gamma X]\n"
            "       [--seed N] [--json FILE] [--svg FILE] [--journal FILE] [--trace]\n"
            "       [--whole-layers 20,...] [--copy-attention]\n"
            "The default is the full run: 110 prompts per context (each depth with every filler\n"
            "text), 20 agreement steps each; it takes many hours on 2 cores. --quick: contexts\n"
            "512,1024,2048, depths 10/50/90%%, 3 prompts per context, caches 64..1024, 5%%, 20%%,\n"
            "15 steps: minutes. Flags after --quick override it. Contexts above the model's\n"
            "trained length (read from the file) are clamped to it. --journal FILE records each\n"
            "prompt as it finishes; run again with the same flags and it resumes from there.\n"
            "--trace prints, for each prompt run (not read from the journal) and configuration,\n"
            "the KV-head rows holding every token of the key per layer after the prefill and\n"
            "after decoding, and the answer; then how the needles the full cache found were\n"
            "missed (the answer's first number starts like the key, or not). --whole-layers:\n"
            "those layers keep every prompt token (decoding still evicts one a step) and the\n"
            "method's budgets share the rest of the total among the others (an intervention\n"
            "at equal memory; cake and snapkv only). --copy-attention: for the needles the\n"
            "full cache finds (prompts run now), the full cache's attention on the prompt at\n"
            "the steps that decoded the key (after the answer's first token), per layer: the\n"
            "share on the key's tokens, and the shares of the key's and\n"
            "of the other prompt tokens' attention that fall on tokens each configuration\n"
            "holds after its prefill, for the needles it found and those it missed.\n");
        return 0;
      } else
        throw std::runtime_error("unknown argument " + a);
    }
    for (const auto& m : methods)
      if (!llm::known_method(m) || m == "full") throw std::runtime_error("bad method " + m);
    if (depths.empty() || trials < 1 || steps < 2 || caches.empty())
      throw std::runtime_error("need depths, --trials >= 1, --steps >= 2 and a cache size");
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
    // Contexts clamped to the same limit are one context (their cells would mix).
    {
      std::vector<int> once;
      for (int c : contexts)
        if (std::find(once.begin(), once.end(), c) == once.end()) once.push_back(c);
      contexts = once;
    }
    const std::string model_name = file.get_string("general.name");
    std::printf("model %s: %d layers, %d/%d heads, context limit %d tokens (from the file)\n",
                model_name.c_str(), mc.layers, mc.heads, mc.kv_heads, mc.context);
    std::printf(
        "%s run: %zu contexts x %d prompts, %zu methods x %zu cache sizes, %d agreement steps per "
        "prompt%s\n",
        quick ? "quick" : "full", contexts.size(), trials, methods.size(), caches.size(), steps - 1,
        quick ? "" : "; this takes many hours on 2 cores (--quick: minutes)");
    for (const auto& m : methods) llm::check_whole_layers(mc.layers, base.whole_layers, m);
    if (base.whole_layers) {  // an intervention: say so where the results are
      std::printf("intervention (--whole-layers): layers");
      for (int l : llm::whole_layer_list(base.whole_layers)) std::printf(" %d", l);
      std::printf(" keep every token; the others share the rest of the total\n");
    }
    std::fflush(stdout);
    llm::Transformer tf(model);
    const auto V = static_cast<std::size_t>(mc.vocab);

    std::map<CellKey, Cell> cells;
    std::map<int, Cell> full;                     // per context
    std::map<int, std::pair<double, int>> spent;  // per context: seconds, prompts
    struct LayerAcc {                             // sums over prompts of one layer's decision
      double entropy = 0, variance = 0, pref_share = 0, budget_share = 0;
      int n = 0;
    };
    std::map<CellKey, std::vector<LayerAcc>> decisions;  // CAKE-preference methods only
    std::map<CellKey, std::vector<double>> retained;     // per layer: rows holding the key, summed
    std::map<CellKey, int> retained_n;                   // prompts summed there
    // --trace: per configuration, of the prompts run now whose needle the full cache
    // found: found, missed with an answer starting like the key (its first two digits
    // or more), missed otherwise.
    std::map<CellKey, std::array<int, 3>> traced;
    // --copy-attention: per configuration and outcome (missed, found), per layer, sums
    // over the prompts of the held shares of the key's and the rest's attention; per
    // context, per layer, the sum of the key's share of the attention.
    struct CopyAcc {
      std::array<std::vector<double>, 2> key_held, rest_held;
      std::array<int, 2> n{};
    };
    std::map<CellKey, CopyAcc> copies;
    std::map<int, std::pair<std::vector<double>, int>> copy_key_share;
    std::ostringstream runs;  // JSON records per prompt
    std::mt19937 rng(seed);
    double t_prefill = 0, t_fill = 0, t_decode = 0;
    const int total = static_cast<int>(contexts.size()) * trials;
    int done = 0, run_now = 0;
    const int im_end = tok.id("<|im_end|>"), eot = tok.id("<|endoftext|>");
    // Every prompt runs every (method, cache) configuration, in this order.
    std::vector<std::pair<std::string, CacheSpec>> configs;
    for (const auto& m : methods)
      for (const auto& cs : caches) configs.push_back({m, cs});

    // What the report takes from one prompt, whether run now or read from the journal.
    const auto absorb = [&](const llm::PromptRecord& r) {
      const std::size_t nc = configs.size();
      if (r.found.size() != nc || r.agree.size() != nc || r.cache_tokens.size() != nc ||
          (!r.held.empty() && r.held.size() != nc) || r.decisions.size() != nc)
        throw std::runtime_error(
            "prompt record of context " + std::to_string(r.context) + ", trial " +
            std::to_string(r.trial) + ": expected " + std::to_string(nc) +
            " configurations in found, agree, cache_tokens, decisions (and held, or none), got " +
            std::to_string(r.found.size()) + ", " + std::to_string(r.agree.size()) + ", " +
            std::to_string(r.cache_tokens.size()) + ", " + std::to_string(r.decisions.size()) +
            " (held " + std::to_string(r.held.size()) + ")");
      const int ctx = r.context;
      for (std::size_t c = 0; c < r.held.size(); ++c) {
        const CellKey k{ctx, configs[c].first, configs[c].second.label()};
        auto& acc = retained[k];
        acc.resize(r.held[c].size());
        for (std::size_t l = 0; l < r.held[c].size(); ++l) acc[l] += r.held[c][l];
        retained_n[k]++;
      }
      for (std::size_t c = 0; c < nc; ++c) {  // CAKE's per-layer decisions
        const auto& dec = r.decisions[c];
        if (dec.empty()) continue;
        auto& acc = decisions[{ctx, configs[c].first, configs[c].second.label()}];
        acc.resize(dec.size());
        double pref_sum = 0, budget_sum = 0;
        for (const auto& d : dec) {
          pref_sum += d.preference;
          budget_sum += static_cast<double>(d.budget);
        }
        for (std::size_t l = 0; l < dec.size(); ++l) {
          acc[l].entropy += dec[l].entropy;
          acc[l].variance += dec[l].variance;
          acc[l].pref_share += pref_sum > 0 ? dec[l].preference / pref_sum : 0;
          acc[l].budget_share += budget_sum > 0 ? dec[l].budget / budget_sum : 0;
          acc[l].n++;
        }
      }
      full[ctx].needles++;
      full[ctx].found += r.full_found;
      runs << (runs.tellp() > 0 ? ",\n" : "") << "    {\"context\": " << r.tokens
           << ", \"depth\": " << r.depth << ", \"filler\": " << r.filler << ", \"key\": \"" << r.key
           << "\", \"full_answer\": \"" << json_escape(r.full_answer)
           << "\", \"full_found\": " << (r.full_found ? "true" : "false") << ", \"found\": [";
      for (std::size_t c = 0; c < nc; ++c) {
        Cell& e = cells[{ctx, configs[c].first, configs[c].second.label()}];
        e.needles++;
        e.found += r.found[c];
        e.steps += steps - 1;
        e.agree += r.agree[c];
        e.agree_k.push_back(r.agree[c]);
        e.agree_n.push_back(steps - 1);
        e.tokens += r.cache_tokens[c];
        runs << (c ? "," : "") << r.found[c];
      }
      runs << "], \"agree\": [";  // agreeing steps per config, as "found"
      for (std::size_t c = 0; c < nc; ++c) runs << (c ? "," : "") << r.agree[c];
      runs << "]}";
      auto& sp = spent[ctx];
      sp.first += r.seconds;
      sp.second++;
      ++done;
    };

    // The journal: prompts it holds are read back, the others appended as they finish.
    std::unique_ptr<llm::Journal> journal;
    if (!journal_path.empty()) {
      std::ostringstream settings;  // what makes a prompt's results what they are
      settings.precision(17);       // reals that differ print differently
      settings << "build=" << llm::executable_id() << " model=" << model_name
               << " model_bytes=" << std::filesystem::file_size(model_path) << " contexts=";
      for (int c : contexts) settings << c << ',';
      settings << " trials=" << trials << " depths=";
      for (double d : depths) settings << d << ',';
      settings << " steps=" << steps << " seed=" << seed << " window=" << base.window
               << " tau1=" << base.tau1 << " tau2=" << base.tau2 << " gamma=" << base.gamma
               << (base.whole_layers ? " whole_layers=" + std::to_string(base.whole_layers) : "")
               << " configs=";
      for (const auto& [m, cs] : configs) settings << m << '/' << cs.label() << ',';
      journal = std::make_unique<llm::Journal>(journal_path, settings.str());
      std::printf("journal %s: %zu prompts recorded%s\n", journal_path.c_str(), journal->size(),
                  journal->dropped_a_cut_line() ? " (a last line cut short was dropped)" : "");
      std::fflush(stdout);
    }

    for (int ctx : contexts)
      for (int trial = 0; trial < trials; ++trial) {
        const auto t_prompt = std::chrono::steady_clock::now();
        llm::PromptRecord r;
        r.context = ctx;
        r.trial = trial;
        r.depth = depths[static_cast<std::size_t>(trial) % depths.size()];
        r.filler = static_cast<int>(trial / depths.size()) % kNumFillers;
        r.key = std::to_string(10000 + rng() % 90000);  // drawn for every prompt, run or not
        if (const llm::PromptRecord* was = journal ? journal->find(ctx, trial) : nullptr) {
          if (was->key != r.key || was->depth != r.depth || was->filler != r.filler) {
            const auto what = [](const std::string& k, double depth, int filler) {
              return "key " + k + ", depth " + std::to_string(depth) + ", filler " +
                     std::to_string(filler);
            };
            throw std::runtime_error("journal " + journal->path() + ": context " +
                                     std::to_string(ctx) + ", trial " + std::to_string(trial) +
                                     " has " + what(was->key, was->depth, was->filler) +
                                     "; this run's prompt has " + what(r.key, r.depth, r.filler));
          }
          absorb(*was);
          continue;
        }
        const auto ids = haystack(tok, ctx, r.depth, r.key, kFillers[r.filler]);
        int key_first = -1, key_last = -1;  // the key's tokens [first, last), -1 if cut apart
        const int S = static_cast<int>(ids.size());
        r.tokens = S;
        auto t0 = std::chrono::steady_clock::now();
        const auto rec = tf.prefill(ids, base.window);
        const double tp = seconds_since(t0);
        t_prefill += tp;

        // Sequences: 0 = full; then per (method, cache) a free-running and a
        // teacher-forced one.
        t0 = std::chrono::steady_clock::now();
        std::vector<std::unique_ptr<llm::KvStore>> stores;
        llm::CacheOptions fo = base;
        fo.method = "full";
        stores.push_back(llm::make_store(mc, fo, S));
        for (const auto& [m, cs] : configs) {
          llm::CacheOptions o = base;
          o.method = m;
          o.cache_size = cs.size_for(S, std::min(base.window, S));
          r.cache_tokens.push_back(o.cache_size);
          // The teacher-forced sequence starts from the same state: a copy of the
          // filled store (the prefill's eviction once per configuration).
          auto filled = llm::make_store(mc, o, S);
          filled->prefill(rec);
          auto twin = filled->clone();
          if (!twin) {
            twin = llm::make_store(mc, o, S);
            twin->prefill(rec);
          }
          stores.push_back(std::move(filled));
          stores.push_back(std::move(twin));
        }
        stores[0]->prefill(rec);
        t_fill += seconds_since(t0);
        // Where the needle's key survived the prefill: its tokens are those whose
        // text overlaps the key's first occurrence.
        {
          std::vector<std::string> pieces;
          for (int id : ids) pieces.push_back(tok.decode_token(id));
          std::tie(key_first, key_last) = llm::key_span(pieces, r.key);
          for (std::size_t c = 0; key_first >= 0 && c < configs.size(); ++c)
            r.held.push_back(stores[1 + 2 * c]->rows_holding(key_first, key_last));
        }
        llm::AttentionProbe* probe = nullptr;  // the full cache's store, watched
        if (copy_attention && key_first >= 0) {
          std::vector<const llm::KvStore*> compared;
          for (std::size_t c = 0; c < configs.size(); ++c)
            compared.push_back(stores[1 + 2 * c].get());
          auto p = std::make_unique<llm::AttentionProbe>(mc, std::move(stores[0]), S, key_first,
                                                         key_last, compared, steps - 1);
          probe = p.get();
          stores[0] = std::move(p);
        }
        // --trace: per layer, the KV-head rows of a free-running sequence holding every
        // token of the key (one digit a layer when there are at most 9 KV heads).
        const auto key_rows = [&](std::size_t c) {
          std::string out;
          if (key_first < 0) return out;
          for (double share : stores[1 + 2 * c]->rows_holding(key_first, key_last, true)) {
            const long rows = std::lround(share * mc.kv_heads);
            out += mc.kv_heads <= 9 ? std::to_string(rows) : std::to_string(rows) + ",";
          }
          return out;
        };
        std::vector<std::string> rows_after_prefill;
        for (std::size_t c = 0; trace && c < configs.size(); ++c)
          rows_after_prefill.push_back(key_rows(c));
        for (std::size_t c = 0; c < configs.size(); ++c)
          r.decisions.push_back(stores[1 + 2 * c]->layer_decisions());

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
            if (id == im_end || id == eot) break;
            s += tok.decode_token(id);
          }
          return s;
        };
        r.full_answer = answer(gen[0]);
        r.full_found = r.full_answer.find(r.key) != std::string::npos;
        for (std::size_t c = 0; c < configs.size(); ++c) {
          const std::size_t fi = 1 + 2 * c, ti = fi + 1;
          r.found.push_back(answer(gen[fi]).find(r.key) != std::string::npos ? 1 : 0);
          r.agree.push_back(agree[ti]);
        }
        if (probe && r.full_found) {
          std::vector<std::string> pieces;  // the full answer's tokens, to its end
          for (int id : gen[0]) {
            if (id == im_end || id == eot) break;
            pieces.push_back(tok.decode_token(id));
          }
          std::vector<int> copy_steps;
          for (int st : llm::key_steps(pieces, r.key))
            if (st < probe->steps()) copy_steps.push_back(st);
          auto& ks = copy_key_share[ctx];
          ks.first.resize(static_cast<std::size_t>(mc.layers));
          const auto over_steps = [&](auto&& mass) {  // summed over the copy steps
            llm::AttentionProbe::Mass m;
            for (int st : copy_steps) {
              const auto x = mass(st);
              m.key += x.key;
              m.rest += x.rest;
            }
            return m;
          };
          std::vector<llm::AttentionProbe::Mass> tot(static_cast<std::size_t>(mc.layers));
          for (int l = 0; l < mc.layers && !copy_steps.empty(); ++l) {
            auto& t = tot[static_cast<std::size_t>(l)];
            t = over_steps([&](int st) { return probe->total(st, l); });
            ks.first[static_cast<std::size_t>(l)] += t.key / (t.key + t.rest);
          }
          ks.second += !copy_steps.empty();
          for (std::size_t c = 0; c < configs.size() && !copy_steps.empty(); ++c) {
            CopyAcc& acc = copies[{ctx, configs[c].first, configs[c].second.label()}];
            const int f = r.found[c];
            acc.key_held[f].resize(static_cast<std::size_t>(mc.layers));
            acc.rest_held[f].resize(static_cast<std::size_t>(mc.layers));
            for (int l = 0; l < mc.layers; ++l) {
              const auto h = over_steps([&](int st) { return probe->held(st, l, c); });
              const auto& t = tot[static_cast<std::size_t>(l)];
              acc.key_held[f][static_cast<std::size_t>(l)] += t.key > 0 ? h.key / t.key : 1.0;
              acc.rest_held[f][static_cast<std::size_t>(l)] += t.rest > 0 ? h.rest / t.rest : 1.0;
            }
            acc.n[f]++;
          }
        }
        if (trace) {
          std::printf("trace context %d trial %d key %s tokens [%d, %d): full \"%s\" %s\n", S,
                      trial, r.key.c_str(), key_first, key_last, json_escape(r.full_answer).c_str(),
                      r.full_found ? "found" : "missed");
          for (std::size_t c = 0; c < configs.size(); ++c) {
            const std::string a = answer(gen[1 + 2 * c]);
            std::printf("  %-15s %6s  key rows per layer: prefill %s decoded %s  \"%s\"\n",
                        configs[c].first.c_str(), configs[c].second.label().c_str(),
                        rows_after_prefill[c].c_str(), key_rows(c).c_str(), json_escape(a).c_str());
            if (!r.full_found || key_first < 0) continue;  // as scripts/llm_eval_trace.py
            // The answer's first number: does it start with the key's first two digits?
            const auto d0 = a.find_first_of("0123456789");
            const auto d1 = d0 == std::string::npos ? d0 : a.find_first_not_of("0123456789", d0);
            const std::string num = d0 == std::string::npos ? "" : a.substr(d0, d1 - d0);
            const int kind = r.found[c]                                               ? 0
                             : num.size() >= 2 && num.compare(0, 2, r.key, 0, 2) == 0 ? 1
                                                                                      : 2;
            ++traced[{ctx, configs[c].first, configs[c].second.label()}][kind];
          }
        }
        r.seconds = seconds_since(t_prompt);
        if (journal) journal->append(r);
        ++run_now;
        absorb(r);
        // Remaining time: this context's mean per prompt; later contexts scaled from
        // it by length^1.5 (prefill grows faster than linearly, decoding slower).
        const auto& sp = spent[ctx];
        double eta = 0;
        for (int c2 : contexts) {
          const int left = c2 == ctx ? trials - trial - 1 : (c2 > ctx ? trials : 0);
          eta += left * sp.first / sp.second * std::pow(static_cast<double>(c2) / ctx, 1.5);
        }
        std::printf(
            "[%d/%d] context %5d depth %3.0f%% filler %d key %s: full cache \"%s\" %s  [prefill "
            "%.1f s, decode %.1f s; elapsed %.0f s, about %.0f s left]\n",
            done, total, S, r.depth * 100, r.filler, r.key.c_str(), r.full_answer.c_str(),
            r.full_found ? "ok" : "MISS", tp, td, seconds_since(t_all), eta);
        std::fflush(stdout);
      }

    if (trace && !traced.empty()) {
      std::printf(
          "\ntrace: needles the full cache found, by how each configuration answered (prompts "
          "run now):\n%-15s %6s %7s %6s %13s %6s\n",
          "method", "cache", "context", "found", "starts right", "other");
      for (const auto& [k, n] : traced)
        std::printf("%-15s %6s %7d %6d %13d %6d\n", std::get<1>(k).c_str(), std::get<2>(k).c_str(),
                    std::get<0>(k), n[0], n[1], n[2]);
    }
    if (!copies.empty()) {
      std::printf(
          "\ncopy attention: the full cache's queries that decoded the key (needles it found, "
          "prompts run now), per layer, %% (all: the mean over layers)\n");
      const auto row = [&](const char* what, const std::vector<double>& sum, int n) {
        double all = 0;
        for (double x : sum) all += x;
        std::printf("%-38s %5.1f ", what, 100 * all / static_cast<double>(sum.size() * n));
        for (double x : sum) std::printf(" %3.0f", 100 * x / n);
        std::printf("\n");
      };
      for (const auto& [ctx, ks] : copy_key_share) {
        char head[64];
        std::snprintf(head, sizeof head, "context %d, %d needles", ctx, ks.second);
        std::printf("%-38s %5s ", head, "all");
        for (int l = 0; l < mc.layers; ++l) std::printf(" %3d", l);
        std::printf("\n");
        if (ks.second) row("on the key's tokens", ks.first, ks.second);
        for (const auto& [k, acc] : copies) {
          if (std::get<0>(k) != ctx) continue;
          for (int f : {1, 0}) {
            if (!acc.n[f]) continue;
            char what[96];
            std::snprintf(what, sizeof what, "%s %s %s %d: key held", std::get<1>(k).c_str(),
                          std::get<2>(k).c_str(), f ? "found" : "missed", acc.n[f]);
            row(what, acc.key_held[f], acc.n[f]);
            std::snprintf(what, sizeof what, "%s %s %s %d: rest held", std::get<1>(k).c_str(),
                          std::get<2>(k).c_str(), f ? "found" : "missed", acc.n[f]);
            row(what, acc.rest_held[f], acc.n[f]);
          }
        }
      }
    }
    // The tables, one per context.
    for (int ctx : contexts) {
      const Cell& fu = full[ctx];
      std::printf("\ncontext %d: %lld prompts, %lld agreement steps per cell\n", ctx, fu.needles,
                  fu.needles * (steps - 1));
      std::printf("%-13s %6s %7s  %-26s %-30s\n", "method", "cache", "% ctx",
                  "needle found [95% CI]", "agreement % [95% CI]");
      std::printf("%-13s %6s %7s  %-26s %-30s\n", "full", "all", "100",
                  interval(fu.found, fu.needles).c_str(), "100");
      for (const auto& m : methods)
        for (const auto& cs : caches) {
          const Cell& e = cells[{ctx, m, cs.label()}];
          if (e.needles == 0) continue;
          const Estimate a = agreement(e);
          const std::string ag = pct(a.p) + " [" + pct(a.ci.first) + ", " + pct(a.ci.second) + "]";
          std::printf("%-13s %6s %6.1f%%  %-26s %-30s\n", m.c_str(), cs.label().c_str(),
                      100.0 * std::min(e.tokens / e.needles, static_cast<double>(ctx)) / ctx,
                      interval(e.found, e.needles).c_str(), ag.c_str());
        }
    }
    if (contexts.size() > 1) {  // every context together: one row per method, one column per cache
      std::printf(
          "\nall contexts pooled (%lld prompts); needle found %% [95%% CI] / agreement %%:\n",
          static_cast<long long>(contexts.size()) * trials);
      std::printf("%-16s", "method");
      for (const auto& cs : caches) std::printf(" %-22s", cs.label().c_str());
      std::printf("\n");
      for (const auto& m : methods) {
        std::printf("%-16s", m.c_str());
        for (const auto& cs : caches) {
          Cell p;
          for (int ctx : contexts) {
            const Cell& e = cells[{ctx, m, cs.label()}];
            p.found += e.found;
            p.needles += e.needles;
            p.agree += e.agree;
            p.steps += e.steps;
          }
          if (p.needles == 0) {
            std::printf(" %-22s", "-");
            continue;
          }
          const auto [lo, hi] = llm::wilson(p.found, p.needles);
          const std::string v = pct(static_cast<double>(p.found) / p.needles) + " [" + pct(lo) +
                                "," + pct(hi) + "]/" + pct(static_cast<double>(p.agree) / p.steps);
          std::printf(" %-22s", v.c_str());
        }
        std::printf("\n");
      }
    }
    // What CAKE's preference saw and how it split the cache, per layer (means over the
    // prompts; shares of the layers' total; the budget is beyond the window).
    for (int ctx : contexts) {
      std::vector<std::string> labels;
      for (const auto& cs : caches)
        if (decisions.count({ctx, "cake", cs.label()})) labels.push_back(cs.label());
      if (labels.empty()) continue;
      const auto& first = decisions[{ctx, "cake", labels[0]}];
      std::printf(
          "\ncake's layer decisions, context %d (mean over %d prompts; tau1 %g, tau2 %g):\n", ctx,
          first.empty() ? 0 : first[0].n, base.tau1, base.tau2);
      std::printf("%5s %9s %10s %7s", "layer", "entropy", "variance", "pref%");
      for (const auto& lb : labels) std::printf(" %7s", ("C=" + lb).c_str());
      std::printf("   (budget share %% at each cache size)\n");
      for (std::size_t l = 0; l < first.size(); ++l) {
        const double n = first[l].n;
        std::printf("%5zu %9.3f %10.4f %7.2f", l, first[l].entropy / n, first[l].variance / n,
                    100 * first[l].pref_share / n);
        for (const auto& lb : labels) {
          const auto& a = decisions[{ctx, "cake", lb}][l];
          std::printf(" %7.2f", 100 * a.budget_share / a.n);
        }
        std::printf("\n");
      }
    }

    // The needle's key after the prefill: % of KV-head rows holding one of its
    // tokens, over all layers and by thirds of the depth.
    for (int ctx : contexts) {
      std::printf(
          "\nneedle key held after the prefill, context %d (%% of KV-head rows; all "
          "layers / first, middle, last third):\n",
          ctx);
      for (const auto& cs : caches) {
        std::printf("  cache %5s:", cs.label().c_str());
        for (const auto& m : methods) {
          const CellKey k{ctx, m, cs.label()};
          if (!retained_n.count(k)) continue;
          const auto& r = retained[k];
          const double n = retained_n[k];
          double all = 0, third[3] = {};
          for (std::size_t l = 0; l < r.size(); ++l) {
            all += r[l];
            third[std::min<std::size_t>(2, 3 * l / r.size())] += r[l];
          }
          const double per = static_cast<double>(r.size()) / 3;
          std::printf(" %s %.0f/%.0f,%.0f,%.0f;", m.c_str(), 100 * all / (n * r.size()),
                      100 * third[0] / (n * per), 100 * third[1] / (n * per),
                      100 * third[2] / (n * per));
        }
        std::printf("\n");
      }
    }

    std::printf(
        "\nbest per column (\"apart from all\": its 95%% interval misses every other's):\n");
    for (int ctx : contexts)
      for (const auto& cs : caches) {
        std::vector<Estimate> nd, ag;
        for (const auto& m : methods) {
          const Cell& e = cells[{ctx, m, cs.label()}];
          nd.push_back(needle_rate(e));
          ag.push_back(agreement(e));
        }
        std::printf("  context %5d cache %5s: needle %s; agreement %s\n", ctx, cs.label().c_str(),
                    leaders(methods, nd).c_str(), leaders(methods, ag).c_str());
      }
    std::printf("\n(depths");
    for (double d : depths) std::printf(" %.0f%%", d * 100);
    std::printf(
        "; %d filler texts; agreement over %d decoded steps per prompt, its intervals by "
        "prompt; window %d)\n",
        std::min<int>(kNumFillers, (trials + static_cast<int>(depths.size()) - 1) /
                                       static_cast<int>(depths.size())),
        steps - 1, base.window);
    std::printf(
        "time: prefill %.1f s, filling caches %.1f s, decoding %.1f s, total %.1f s (the %d "
        "prompts run now%s)\n",
        t_prefill, t_fill, t_decode, seconds_since(t_all), run_now,
        journal && journal->size() > 0 ? "; the others read from the journal" : "");

    if (!json_path.empty()) {
      std::ofstream f(json_path);
      f << "{\n  \"model\": \"" << json_escape(model_name)
        << "\",\n  \"quick\": " << (quick ? "true" : "false") << ",\n  \"window\": " << base.window
        << ",\n  \"steps\": " << steps - 1 << ",\n  \"tau1\": " << base.tau1
        << ",\n  \"tau2\": " << base.tau2 << ",\n  \"gamma\": " << base.gamma
        << ",\n  \"whole_layers\": [";
      for (int n = 0; int l : llm::whole_layer_list(base.whole_layers)) f << (n++ ? ", " : "") << l;
      f << "],\n  \"configs\": [";
      bool first_cfg = true;
      for (const auto& m : methods)
        for (const auto& cs : caches) {
          f << (first_cfg ? "" : ", ") << "[\"" << m << "\", \"" << cs.label() << "\"]";
          first_cfg = false;
        }
      f << "],\n  \"summary\": [";
      bool first_row = true;
      for (int ctx : contexts) {
        const Cell& fu = full[ctx];
        for (const auto& m : methods)
          for (const auto& cs : caches) {
            const Cell& e = cells[{ctx, m, cs.label()}];
            if (e.needles == 0) continue;
            const auto [nlo, nhi] = llm::wilson(e.found, e.needles);
            const auto ac = llm::wilson_clustered(e.agree_k, e.agree_n);
            const auto [alo, ahi] = ac.ci;
            const auto [ilo, ihi] = llm::wilson(e.agree, e.steps);  // as if steps were independent
            f << (first_row ? "\n" : ",\n") << "    {\"context\": " << ctx << ", \"method\": \""
              << m << "\", \"cache\": \"" << cs.label()
              << "\", \"mean_cache_tokens\": " << e.tokens / e.needles << ", \"found\": " << e.found
              << ", \"needles\": " << e.needles << ", \"found_ci95\": [" << nlo << ", " << nhi
              << "], \"agree\": " << e.agree << ", \"steps\": " << e.steps
              << ", \"agreement_ci95\": [" << alo << ", " << ahi
              << "], \"agreement_effective_steps\": " << ac.n_eff << ", \"agreement_ci95_iid\": ["
              << ilo << ", " << ihi << "], \"full_found\": " << fu.found << "}";
            first_row = false;
          }
      }
      f << "\n  ],\n  \"layer_decisions\": [";
      bool first_dec = true;
      for (const auto& [key, acc] : decisions) {
        f << (first_dec ? "\n" : ",\n") << "    {\"context\": " << std::get<0>(key)
          << ", \"method\": \"" << std::get<1>(key) << "\", \"cache\": \"" << std::get<2>(key)
          << "\", \"entropy\": [";
        for (std::size_t l = 0; l < acc.size(); ++l)
          f << (l ? ", " : "") << acc[l].entropy / acc[l].n;
        f << "], \"variance\": [";
        for (std::size_t l = 0; l < acc.size(); ++l)
          f << (l ? ", " : "") << acc[l].variance / acc[l].n;
        f << "], \"preference_share\": [";
        for (std::size_t l = 0; l < acc.size(); ++l)
          f << (l ? ", " : "") << acc[l].pref_share / acc[l].n;
        f << "], \"budget_share\": [";
        for (std::size_t l = 0; l < acc.size(); ++l)
          f << (l ? ", " : "") << acc[l].budget_share / acc[l].n;
        f << "]}";
        first_dec = false;
      }
      f << "\n  ],\n  \"runs\": [\n" << runs.str() << "\n  ]\n}\n";
      std::printf("wrote %s\n", json_path.c_str());
    }
    if (!svg_path.empty()) {
      write_svg(svg_path, model_name, methods, caches, contexts, cells, full);
      std::printf("wrote %s\n", svg_path.c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cake_llm_eval: %s\n", e.what());
    return 1;
  }
}
