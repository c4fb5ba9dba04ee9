// cake_llm: greedy generation with a CAKE-managed (or SnapKV, PyramidKV, full) KV cache.
//   cake_llm --model FILE --prompt TEXT --cache-size N --method cake --max-new N
// Several --prompt: served together on a paged store (block pools per layer), each
// prompt's text what it gives alone; prints the blocks the caches freed.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "store.hpp"

namespace {
void usage() {
  std::printf(
      "usage: cake_llm [--model FILE] (--prompt TEXT | --prompt-file FILE)... [options]\n"
      "  --model FILE       GGUF model (default $CAKE_MODEL or the scripts/fetch-model cache)\n"
      "  --prompt TEXT      a prompt; several are served together on a paged store\n"
      "  --method M         cake | snapkv | pyramidkv | streamingllm | h2o | tova | ada_snapkv |\n"
      "                     cake_adakv | cake_tova | cake_h2o | cake_adakv_tova | full\n"
      "                     (default cake)\n"
      "  --cache-size N     tokens per layer on average, window included (default 256)\n"
      "  --window N         observation window, always kept (default 32)\n"
      "  --max-new N        tokens to generate (default 64)\n"
      "  --tau1 X --tau2 X  CAKE preference temperatures (default 1, 1)\n"
      "  --gamma X          CAKE variance weight (default 200)\n"
      "  --cache-threads N  OpenMP threads for the cache's kernels (default 1)\n"
      "  --threads N        threads of the decoding step's weight products (default: every\n"
      "                     core; the logits are the same on any count)\n"
      "  --bench N          time a prompt of N tokens of filler text (no --prompt needed) and\n"
      "                     --max-new decoded tokens that ignore end-of-text: prints tok/s\n"
      "  --paged            a paged store for a single prompt too\n"
      "  --block-size N     tokens per block of the paged store (default 16)\n"
      "  --any-order        the paged store keeps tokens in any order in its blocks' first\n"
      "                     slots (cake::slot_order::any): one K/V row moved per eviction\n"
      "  --pool-blocks N    blocks per layer in the pool (default: every prompt whole and\n"
      "                     --max-new tokens more, before any eviction)\n"
      "  --raw              feed the prompt as is (default: SmolLM2's chat template)\n"
      "  --tokens           print the prompt's token ids\n"
      "  --dump-logits FILE write the logits after the prompt, one per line\n");
}
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct ServeOptions {
  int max_new = 64, block_size = 16, pool_blocks = 0;
  bool raw = false;
};

// Several prompts served together: each prefilled on its own, its store paged on one
// block pool per layer, then all decoded step by step together (llm::serve).
int serve_prompts(llm::Transformer& tf, const llm::Tokenizer& tok,
                  const std::vector<std::string>& prompts, const llm::CacheOptions& opt,
                  const ServeOptions& so) {
  const auto& c = tf.config();
  std::vector<std::vector<int>> ids;
  int blocks = 0;  // per layer: every prompt whole plus max_new, the most ever held
  for (const auto& p : prompts) {
    ids.push_back(tok.encode(so.raw ? p : llm::chat_prompt(p)));
    blocks +=
        (static_cast<int>(ids.back().size()) + so.max_new + so.block_size - 1) / so.block_size;
  }
  if (so.pool_blocks > 0) blocks = so.pool_blocks;
  llm::BlockPool pool(c, blocks, so.block_size);
  const double mib = 2.0 * static_cast<double>(pool.total()) *
                     static_cast<double>(pool.block_stride()) * 4.0 / (1024.0 * 1024.0);
  std::printf(
      "serving %zu prompts, %s cache of %d tokens per layer, on a paged store: %d layers x "
      "%d blocks of %d tokens (K and V %.1f MiB)\n",
      prompts.size(), opt.method.c_str(), opt.cache_size, c.layers, blocks, so.block_size, mib);
  if (opt.method == "full")
    std::printf("(--method full keeps every token in dense stores: the pool stays empty)\n");
  std::vector<llm::PrefillRecord> recs;
  std::vector<std::unique_ptr<llm::KvStore>> stores;
  auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    recs.push_back(tf.prefill(ids[i], opt.window));
    stores.push_back(llm::make_store(c, opt, recs.back().tokens, &pool));
    stores.back()->prefill(recs.back());
    std::printf("[%zu] prompt: %d tokens; holds %lld of %lld tokens in %lld blocks\n", i + 1,
                recs.back().tokens, static_cast<long long>(stores.back()->tokens_held()),
                static_cast<long long>(recs.back().tokens) * c.layers,
                static_cast<long long>(stores.back()->blocks_held()));
  }
  const double t_prefill = seconds_since(t0);
  std::printf(
      "after prefill: %lld blocks in use, %lld freed by eviction, pool peak %lld (%.2f s)\n",
      static_cast<long long>(pool.in_use()), static_cast<long long>(pool.evicted()),
      static_cast<long long>(pool.peak()), t_prefill);
  std::vector<const llm::PrefillRecord*> rp;
  std::vector<llm::KvStore*> sp;
  for (std::size_t i = 0; i < recs.size(); ++i) {
    rp.push_back(&recs[i]);
    sp.push_back(stores[i].get());
  }
  const std::vector<int> stop{tok.id("<|im_end|>"), tok.id("<|endoftext|>")};
  t0 = std::chrono::steady_clock::now();
  const auto outs = llm::serve(tf, rp, sp, so.max_new, stop);
  const double t_dec = seconds_since(t0);
  std::size_t generated = 0;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    std::string text;
    for (int id : outs[i])
      if (std::find(stop.begin(), stop.end(), id) == stop.end()) text += tok.decode_token(id);
    generated += outs[i].size();
    const std::string& p = prompts[i];  // the prompt's first line, shortened
    std::string head = p.substr(0, std::min(p.find('\n'), std::size_t{60}));
    if (head.size() < p.size()) head += "...";
    std::printf("--- [%zu] %s\n%s\n", i + 1, head.c_str(), text.c_str());
    std::printf("--- [%zu] %zu tokens generated; holds %lld tokens in %lld blocks\n", i + 1,
                outs[i].size(), static_cast<long long>(stores[i]->tokens_held()),
                static_cast<long long>(stores[i]->blocks_held()));
  }
  std::printf(
      "generated %zu tokens in %.2f s (%.1f tok/s); blocks: %lld in use, %lld free of %lld, "
      "%lld freed by eviction, pool peak %lld\n",
      generated, t_dec, static_cast<double>(generated) / std::max(t_dec, 1e-9),
      static_cast<long long>(pool.in_use()), static_cast<long long>(pool.free_blocks()),
      static_cast<long long>(pool.total()), static_cast<long long>(pool.evicted()),
      static_cast<long long>(pool.peak()));
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  std::string model_path = llm::default_model_path(), prompt;
  std::vector<std::string> prompts;
  llm::CacheOptions opt;
  int max_new = 64, cache_threads = 1, threads = 0, bench = 0, block_size = 16, pool_blocks = 0;
  bool raw = false, show_tokens = false, paged = false;
  std::string dump_logits;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--model")
        model_path = next();
      else if (a == "--prompt")
        prompts.push_back(next());
      else if (a == "--prompt-file") {
        std::ifstream f(next());
        std::stringstream ss;
        ss << f.rdbuf();
        prompts.push_back(ss.str());
      } else if (a == "--paged")
        paged = true;
      else if (a == "--any-order")
        opt.paged_slots = cake::slot_order::any;
      else if (a == "--block-size")
        block_size = std::stoi(next());
      else if (a == "--pool-blocks")
        pool_blocks = std::stoi(next());
      else if (a == "--method")
        opt.method = next();
      else if (a == "--cache-size")
        opt.cache_size = std::stoi(next());
      else if (a == "--window")
        opt.window = std::stoi(next());
      else if (a == "--max-new")
        max_new = std::stoi(next());
      else if (a == "--tau1")
        opt.tau1 = std::stof(next());
      else if (a == "--tau2")
        opt.tau2 = std::stof(next());
      else if (a == "--gamma")
        opt.gamma = std::stof(next());
      else if (a == "--raw")
        raw = true;
      else if (a == "--cache-threads")
        cache_threads = std::stoi(next());
      else if (a == "--threads")
        threads = std::stoi(next());
      else if (a == "--bench")
        bench = std::stoi(next());
      else if (a == "--tokens")
        show_tokens = true;
      else if (a == "--dump-logits")
        dump_logits = next();
      else if (a == "--help" || a == "-h") {
        usage();
        return 0;
      } else
        throw std::runtime_error("unknown argument " + a);
    }
    if (!prompts.empty()) prompt = prompts.front();
    if (prompt.empty() && bench <= 0) {
      usage();
      return 2;
    }
    if (!llm::known_method(opt.method)) throw std::runtime_error("unknown method " + opt.method);
    if (!std::ifstream(model_path)) {
      std::fprintf(stderr,
                   "cake_llm: model not found at %s\n  fetch it with: scripts/fetch-model\n",
                   model_path.c_str());
      return 3;
    }
    llm::set_cache_threads(cache_threads);
    auto t0 = std::chrono::steady_clock::now();
    const llm::GgufFile file(model_path);
    const llm::Model model = llm::Model::load(file);
    const llm::Tokenizer tok = llm::load_tokenizer(file);
    const auto& c = model.cfg;
    std::printf(
        "model: %s, %d layers, %d/%d heads, head_dim %d, context %d, rope base %g (loaded in %.2f "
        "s)\n",
        file.get_string("general.name").c_str(), c.layers, c.heads, c.kv_heads, c.head_dim,
        c.context, c.rope_base, seconds_since(t0));

    std::vector<int> ids;
    if (bench > 0) {  // filler text, repeated to exactly `bench` tokens
      const std::vector<int> unit = tok.encode(
          "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. A river runs past old stone houses where people talk about the weather. ");
      while (static_cast<int>(ids.size()) < bench) ids.push_back(unit[ids.size() % unit.size()]);
    } else {
      ids = tok.encode(raw ? prompt : llm::chat_prompt(prompt));
    }
    if (static_cast<int>(ids.size()) + max_new > c.context)
      std::fprintf(stderr, "warning: %zu prompt + %d new tokens exceed the model's context of %d\n",
                   ids.size(), max_new, c.context);
    if (show_tokens) {
      std::printf("tokens:");
      for (int id : ids) std::printf(" %d", id);
      std::printf("\n");
    }
    llm::Transformer tf(model);
    if (threads > 0) tf.decode_threads = threads;
    if (bench <= 0 && (prompts.size() > 1 || paged)) {
      ServeOptions so{max_new, block_size, pool_blocks, raw};
      return serve_prompts(tf, tok, prompts, opt, so);
    }
    t0 = std::chrono::steady_clock::now();
    const std::clock_t c_pre = std::clock();
    const llm::PrefillRecord rec = tf.prefill(ids, opt.window);
    const double t_prefill = seconds_since(t0);
    const double cpu_prefill = static_cast<double>(std::clock() - c_pre) / CLOCKS_PER_SEC;
    if (!dump_logits.empty()) {
      std::ofstream f(dump_logits);
      f.precision(9);
      for (float x : rec.last_logits) f << x << "\n";
    }
    if (bench > 0) {
      std::printf("prefill phases (wall s / CPU s), attention %s:",
                  llm::attention::route_for(c.head_dim) == llm::attention::route::avx512
                      ? "tiled avx512"
                  : llm::attention::available(c.head_dim) ? "tiled avx2"
                                                          : "sgemm");
      for (int p = 0; p < 3; ++p)
        std::printf(" %s %.2f/%.2f", llm::PrefillProfile::names[p], tf.profile.wall[p],
                    tf.profile.cpu[p]);
      std::printf("\n");
    }
    t0 = std::chrono::steady_clock::now();
    auto store = llm::make_store(c, opt, rec.tokens);
    store->prefill(rec);
    const double t_cache = seconds_since(t0);
    const std::int64_t held_after_prefill = store->tokens_held();
    std::printf(
        "prompt: %d tokens; prefill %.2f s (%.0f tok/s; %.2f CPU s over the BLAS threads); %s "
        "cache %.3f s, holds %lld of %lld tokens (%.1f%%)\n",
        rec.tokens, t_prefill, rec.tokens / t_prefill, cpu_prefill, opt.method.c_str(), t_cache,
        static_cast<long long>(held_after_prefill), static_cast<long long>(rec.tokens) * c.layers,
        100.0 * static_cast<double>(held_after_prefill) /
            (static_cast<double>(rec.tokens) * c.layers));
    t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    std::vector<int> stop{tok.id("<|im_end|>"), tok.id("<|endoftext|>")};
    if (bench > 0) stop.clear();
    const auto out = llm::generate(tf, rec, *store, max_new, stop);
    const double t_dec = seconds_since(t0);
    const double cpu_dec = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    std::string text;
    for (int id : out)
      if (std::find(stop.begin(), stop.end(), id) == stop.end()) text += tok.decode_token(id);
    std::printf("---\n%s\n---\n", text.c_str());
    // CPU time too: on a shared machine it shows what an idle one would give (decoding
    // runs on one thread).
    std::printf(
        "generated %zu tokens in %.2f s (%.1f tok/s; %.2f CPU s, %.1f tok per CPU s); cache "
        "holds %lld tokens\n",
        out.size(), t_dec, static_cast<double>(out.size()) / std::max(t_dec, 1e-9), cpu_dec,
        static_cast<double>(out.size()) / std::max(cpu_dec, 1e-9),
        static_cast<long long>(store->tokens_held()));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cake_llm: %s\n", e.what());
    return 1;
  }
}
