// cake_eval: CAKE and the methods the library expresses (SnapKV, PyramidKV, CAKE's
// indicator with uniform budgets) at equal memory. For every method and cache
// size C in {64, 128, 256, 512, 1024} (below the prompt length), the prompt is
// prefilled into a KvCache; held-out later queries then attend over what each
// layer holds, and the relative L2 distance of that attention output from the
// full cache's is reported per layer and averaged, with the tokens held.
//
//   cake_eval                                  the default synthetic workload
//   cake_eval --golden DIR [--golden DIR ...]  directories in the golden format
//   cake_eval --synthetic --golden DIR ...     both
//   cake_eval --chunk N [--chunk-exact]        the synthetic prompt prefilled in chunks
//                                              of N tokens (bounded chunking by default)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "golden_workload.hpp"
#include "report.hpp"
#include "synthetic.hpp"

namespace {

using cake_eval::index_t;

struct Options {
  cake_eval::SyntheticOptions syn;
  bool synthetic = false;
  std::vector<std::string> golden;
  std::vector<index_t> sizes{64, 128, 256, 512, 1024};
  std::string json, svg;
};

[[noreturn]] void usage(const char* msg, int code = 2) {
  std::fprintf(code ? stderr : stdout,
               "%s\nusage: cake_eval [--golden DIR]... [--synthetic] [--layers N] [--heads N]\n"
               "                 [--kv-heads N] [--head-dim N] [--seq-len N] [--batch N]\n"
               "                 [--window N] [--queries N] [--tau1 X] [--tau2 X] [--gamma X]\n"
               "                 [--no-cascade] [--seed N] [--sizes C1,C2,...]\n"
               "                 [--chunk N [--chunk-exact]] [--json FILE] [--svg FILE]\n"
               "Without --golden, runs the synthetic workload (defaults: --layers 8 --heads 16\n"
               "--kv-heads 4 --head-dim 64 --seq-len 4096 --window 32 --queries 16, CAKE with\n"
               "tau1 1.6, tau2 0.4, gamma 200). Golden cases use their own shapes and CAKE\n"
               "hyperparameters. Cache sizes C >= S or C <= w are skipped. --chunk N prefills\n"
               "the synthetic prompt in chunks of N tokens through RaggedKvCache, evicting\n"
               "after every chunk (bounded) or, with --chunk-exact, after the last.\n",
               msg);
  std::exit(code);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    auto integer_of = [&](const std::string& v) -> index_t {
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || x < 1)
        usage((a + " expects a positive integer, got '" + v + "'").c_str());
      return static_cast<index_t>(x);
    };
    auto integer = [&]() { return integer_of(next()); };
    auto real = [&]() -> float {
      const std::string v = next();
      char* end = nullptr;
      const float x = std::strtof(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0')
        usage((a + " expects a number, got '" + v + "'").c_str());
      return x;
    };
    if (a == "--golden")
      o.golden.push_back(next());
    else if (a == "--synthetic")
      o.synthetic = true;
    else if (a == "--layers")
      o.syn.layers = integer();
    else if (a == "--heads")
      o.syn.heads = integer();
    else if (a == "--kv-heads")
      o.syn.kv_heads = integer();
    else if (a == "--head-dim")
      o.syn.head_dim = integer();
    else if (a == "--seq-len")
      o.syn.seq_len = integer();
    else if (a == "--batch")
      o.syn.batch = integer();
    else if (a == "--window")
      o.syn.window = integer();
    else if (a == "--queries")
      o.syn.queries = integer();
    else if (a == "--tau1")
      o.syn.tau1 = real();
    else if (a == "--tau2")
      o.syn.tau2 = real();
    else if (a == "--gamma")
      o.syn.gamma = real();
    else if (a == "--no-cascade")
      o.syn.cascade = false;
    else if (a == "--chunk")
      o.syn.chunk = integer();
    else if (a == "--chunk-exact")
      o.syn.chunking = cake::chunk_eviction::exact;
    else if (a == "--seed")
      o.syn.seed = static_cast<unsigned>(integer());
    else if (a == "--sizes") {
      o.sizes.clear();
      std::string list = next(), item;
      for (std::size_t p = 0; p <= list.size(); ++p) {
        if (p == list.size() || list[p] == ',') {
          o.sizes.push_back(integer_of(item));
          item.clear();
        } else {
          item += list[p];
        }
      }
      std::sort(o.sizes.begin(), o.sizes.end());
      o.sizes.erase(std::unique(o.sizes.begin(), o.sizes.end()), o.sizes.end());
    } else if (a == "--json")
      o.json = next();
    else if (a == "--svg")
      o.svg = next();
    else if (a == "--help" || a == "-h")
      usage("cake_eval: eviction methods at equal memory, error of held-out attention", 0);
    else
      usage(("unknown argument " + a).c_str());
  }
  if (o.golden.empty()) o.synthetic = true;
  if (o.syn.chunk > 0 && !o.golden.empty())
    usage("--chunk runs the synthetic workload only (golden cases hold only the window's queries)");
  if (o.syn.chunk > 0 && o.syn.batch != 1) usage("--chunk needs --batch 1");
  if (o.syn.heads % o.syn.kv_heads != 0) usage("--kv-heads must divide --heads");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    std::vector<cake_eval::Workload> workloads;
    for (const auto& dir : o.golden) workloads.push_back(cake_eval::golden_workload(dir));
    if (o.synthetic) workloads.push_back(cake_eval::synthetic_workload(o.syn));
    std::printf("cake_eval: %zu workload(s); methods:", workloads.size());
    for (const auto& m : cake_eval::default_methods()) std::printf(" %s", m.name.c_str());
    std::printf(
        "; error = mean over layers of the mean over (batch, head, held-out query) of "
        "||o_C - o_full|| / ||o_full||\n");

    std::vector<cake_eval::Result> results;
    for (const auto& w : workloads) {
      const auto t0 = std::chrono::steady_clock::now();
      cake_eval::Result r = cake_eval::evaluate(w, cake_eval::default_sizes(w, o.sizes));
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      cake_eval::print_table(stdout, r);
      std::fflush(stdout);
      results.push_back(std::move(r));
    }
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw std::runtime_error("cannot write " + o.json);
      cake_eval::write_json(f, results);
      std::printf("wrote %s\n", o.json.c_str());
    }
    if (!o.svg.empty()) {
      std::ofstream f(o.svg);
      if (!f) throw std::runtime_error("cannot write " + o.svg);
      cake_eval::write_svg(f, results);
      std::printf("wrote %s\n", o.svg.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cake_eval: %s\n", e.what());
    return 1;
  }
  return 0;
}
