// CUDA benchmarks of cake's kernels, each beside the baseline it is judged against:
//   window_stats   Llama-3.1-8B heads (H 32, Hkv 8, d 128, w 32, bf16 K), S 32K / 128K;
//                  baseline: a device-to-device copy of K (the bytes floor)
//   select_k       8 rows x 128K keys; baseline: cub::DeviceSegmentedRadixSort + gather
//   compact        kept K rows (bf16, d 128); baseline: cudaMemcpyAsync of the same bytes
//   decode_scores  one decoding step of one layer; baseline: a device-to-device copy of K
//                  (reads and writes K: the scoring, which only reads it, can beat it)
//   kv_cache_prefill  32 layers through KvCache<..., cuda_policy> (cascading, float K/V);
//                  baseline: the same 32 window-statistics calls alone
//   kv_cache_decode   one decoding step of all 32 layers after a prefill
// Times come from CUDA events around REPS back-to-back calls (UseManualTime).
#include <benchmark/benchmark.h>

#include <cake/cake.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using cake::index_t;

constexpr int REPS = 20;

void must(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <class T>
struct DeviceArray {
  T* p = nullptr;
  std::size_t n = 0;
  explicit DeviceArray(std::size_t count) : n(count) {
    must(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  ~DeviceArray() { cudaFree(p); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  void upload(const std::vector<T>& h) {
    must(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
};

template <class T>
std::vector<T> random_vector(std::size_t n, float scale, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

// Runs f REPS times between two events per benchmark iteration; reports the mean.
template <class F>
void time_loop(benchmark::State& state, cudaStream_t s, F&& f) {
  cudaEvent_t a, b;
  must(cudaEventCreate(&a), "event");
  must(cudaEventCreate(&b), "event");
  f();  // warm-up (and first-launch costs)
  must(cudaStreamSynchronize(s), "warm-up");
  for (auto _ : state) {
    must(cudaEventRecord(a, s), "record");
    for (int r = 0; r < REPS; ++r) f();
    must(cudaEventRecord(b, s), "record");
    must(cudaEventSynchronize(b), "sync");
    float ms = 0;
    must(cudaEventElapsedTime(&ms, a, b), "elapsed");
    state.SetIterationTime(ms / 1e3 / REPS);
  }
  must(cudaGetLastError(), "kernels");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

void set_bytes(benchmark::State& state, double bytes) {
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- window statistics -------------------------------------------------------------
constexpr index_t H = 32, HKV = 8, D = 128, W = 32;

// Q float (two bf16 planes on the tensor cores) or bf16 like K (one plane), as an
// engine running a bf16 model has it.
template <class TQ>
void window_stats_cake(benchmark::State& state, bool with_lse, cake::cuda_math math) {
  const index_t S = state.range(0);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  DeviceArray<TQ> q(static_cast<std::size_t>(H * W * D));
  DeviceArray<float> ind(static_cast<std::size_t>(HKV * (S - W))), st(2),
      lse(static_cast<std::size_t>(H * W));
  DeviceArray<__nv_bfloat16> k(static_cast<std::size_t>(HKV * S * D));
  q.upload(random_vector<TQ>(q.n, 1.0f, 1));
  k.upload(random_vector<__nv_bfloat16>(k.n, 1.0f, 2));
  lse.upload(std::vector<float>(lse.n, 10.0f));  // values only shape the work, not its cost
  const std::size_t bytes = cake::window_stats_workspace_size(1, H, HKV, W, S, D, with_lse);
  DeviceArray<char> ws(bytes);
  const auto qv = cake::make_view<cake::device_space>(q.p, std::array<index_t, 4>{1, H, W, D});
  const auto kv = cake::make_view<cake::device_space>(k.p, std::array<index_t, 4>{1, HKV, S, D});
  const auto iv = cake::make_view<cake::device_space>(ind.p, std::array<index_t, 3>{1, HKV, S - W});
  const auto sv = cake::make_view<cake::device_space>(st.p, std::array<index_t, 1>{2});
  const auto lv = cake::make_view<cake::device_space>(lse.p, std::array<index_t, 3>{1, H, W});
  const cake::MeanVarianceIndicator mv{};
  time_loop(state, s, [&] {
    if (with_lse)
      cake::window_stats_lse(cake::cuda.on(s), qv, kv, lv, mv, iv, sv, {},
                             cake::cuda_workspace{ws.p, bytes}, math);
    else
      cake::window_stats(cake::cuda.on(s), qv, kv, mv, iv, sv, {},
                         cake::cuda_workspace{ws.p, bytes}, math);
  });
  set_bytes(state, static_cast<double>(k.n * sizeof(__nv_bfloat16)));
  state.counters["flops"] =
      benchmark::Counter(2.0 * H * W * static_cast<double>(S) * D * (with_lse ? 1 : 2),
                         benchmark::Counter::kIsIterationInvariantRate);
  cudaStreamDestroy(s);
}

// The bytes floor of reading K once: a device-to-device copy of (HKV, tokens, D) bf16
// keys (it also writes them, so the ratio flatters the copy by up to 2x).
void copy_of_k(benchmark::State& state) {
  const index_t S = state.range(0);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  const std::size_t bytes = static_cast<std::size_t>(HKV * S * D) * sizeof(__nv_bfloat16);
  DeviceArray<char> a(bytes), b(bytes);
  time_loop(state, s,
            [&] { must(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, s), "copy"); });
  set_bytes(state, 2.0 * static_cast<double>(bytes));  // read + write
  cudaStreamDestroy(s);
}

// ---- top-k ---------------------------------------------------------------------------
// order: descending (the reference's order, sorted in the kernel) or position (the
// winners in index order, no sort): the two apart show what the sort costs.
void select_k_cake(benchmark::State& state, cake::select_order order) {
  const index_t rows = state.range(0), n = state.range(1), k = state.range(2);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  DeviceArray<float> sc(static_cast<std::size_t>(rows * n));
  DeviceArray<std::int32_t> out(static_cast<std::size_t>(rows * k));
  sc.upload(random_vector<float>(sc.n, 1.0f, 3));
  const std::size_t bytes = cake::select_k_workspace_size(rows, n, k, order);
  DeviceArray<char> ws(bytes);
  const auto sv = cake::make_view<cake::device_space>(sc.p, std::array<index_t, 2>{rows, n});
  const auto ov = cake::make_view<cake::device_space>(out.p, std::array<index_t, 2>{rows, k});
  time_loop(state, s, [&] {
    cake::select_k(cake::cuda.on(s), sv, ov, order, cake::cuda_workspace{ws.p, bytes});
  });
  set_bytes(state, static_cast<double>(sc.n * sizeof(float)));
  cudaStreamDestroy(s);
}

__global__ void iota_rows_kernel(std::int32_t* v, index_t n, index_t total) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < total) v[e] = static_cast<std::int32_t>(e % n);
}
__global__ void gather_top_kernel(const std::int32_t* sorted, index_t n, index_t k, index_t rows,
                                  std::int32_t* out) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < rows * k) out[e] = sorted[(e / k) * n + e % k];
}
__global__ void offsets_kernel(int* o, int rows, int n) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r <= rows) o[r] = r * n;
}

void select_k_cub_segmented_sort(benchmark::State& state) {
  const index_t rows = state.range(0), n = state.range(1), k = state.range(2);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  const index_t total = rows * n;
  DeviceArray<float> keys_in(static_cast<std::size_t>(total)),
      keys_out(static_cast<std::size_t>(total));
  DeviceArray<std::int32_t> vals_in(static_cast<std::size_t>(total)),
      vals_out(static_cast<std::size_t>(total)), out(static_cast<std::size_t>(rows * k));
  DeviceArray<int> offsets(static_cast<std::size_t>(rows + 1));
  keys_in.upload(random_vector<float>(keys_in.n, 1.0f, 3));
  offsets_kernel<<<1, 256, 0, s>>>(offsets.p, static_cast<int>(rows), static_cast<int>(n));
  std::size_t temp = 0;
  must(cub::DeviceSegmentedRadixSort::SortPairsDescending(
           nullptr, temp, keys_in.p, keys_out.p, vals_in.p, vals_out.p, static_cast<int>(total),
           static_cast<int>(rows), offsets.p, offsets.p + 1, 0, 32, s),
       "size");
  DeviceArray<char> tmp(temp);
  time_loop(state, s, [&] {
    iota_rows_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(vals_in.p, n,
                                                                                total);
    std::size_t t = temp;
    must(cub::DeviceSegmentedRadixSort::SortPairsDescending(
             tmp.p, t, keys_in.p, keys_out.p, vals_in.p, vals_out.p, static_cast<int>(total),
             static_cast<int>(rows), offsets.p, offsets.p + 1, 0, 32, s),
         "sort");
    gather_top_kernel<<<static_cast<unsigned>((rows * k + 255) / 256), 256, 0, s>>>(vals_out.p, n,
                                                                                    k, rows, out.p);
  });
  set_bytes(state, static_cast<double>(total * sizeof(float)));
  cudaStreamDestroy(s);
}

// ---- compaction ----------------------------------------------------------------------
void compact_cake(benchmark::State& state) {
  const index_t S = state.range(0), m = state.range(1);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  DeviceArray<__nv_bfloat16> src(static_cast<std::size_t>(HKV * S * D)),
      dst(static_cast<std::size_t>(HKV * m * D));
  std::vector<std::int64_t> keep(static_cast<std::size_t>(HKV * m));
  std::mt19937 rng(5);
  for (index_t g = 0; g < HKV; ++g)  // ascending, spread over the row like a real cut
    for (index_t t = 0; t < m; ++t) keep[static_cast<std::size_t>(g * m + t)] = t * S / m;
  DeviceArray<std::int64_t> dkeep(keep.size());
  dkeep.upload(keep);
  const auto sv = cake::make_view<cake::device_space>(src.p, std::array<index_t, 4>{1, HKV, S, D});
  const auto kv = cake::make_view<cake::device_space>(dkeep.p, std::array<index_t, 3>{1, HKV, m});
  const auto dv = cake::make_view<cake::device_space>(dst.p, std::array<index_t, 4>{1, HKV, m, D});
  time_loop(state, s, [&] { cake::compact(cake::cuda.on(s), sv, kv, dv); });
  set_bytes(state, 2.0 * static_cast<double>(dst.n * sizeof(__nv_bfloat16)));
  cudaStreamDestroy(s);
}

void compact_memcpy(benchmark::State& state) {
  const index_t m = state.range(1);
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  const std::size_t bytes = static_cast<std::size_t>(HKV * m * D) * sizeof(__nv_bfloat16);
  DeviceArray<char> a(bytes), b(bytes);
  time_loop(state, s,
            [&] { must(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, s), "copy"); });
  set_bytes(state, 2.0 * static_cast<double>(bytes));
  cudaStreamDestroy(s);
}

// ---- decoding ------------------------------------------------------------------------
void decode_scores_cake(benchmark::State& state) {
  const index_t held = state.range(0), c = held - W;
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  DeviceArray<float> q(static_cast<std::size_t>(H * D)), out(static_cast<std::size_t>(HKV * c));
  DeviceArray<__nv_bfloat16> k(static_cast<std::size_t>(HKV * held * D));
  q.upload(random_vector<float>(q.n, 1.0f, 6));
  k.upload(random_vector<__nv_bfloat16>(k.n, 1.0f, 7));
  const auto qv = cake::make_view<cake::device_space>(q.p, std::array<index_t, 3>{1, H, D});
  const auto kv = cake::make_view<cake::device_space>(k.p, std::array<index_t, 4>{1, HKV, held, D});
  const auto ov = cake::make_view<cake::device_space>(out.p, std::array<index_t, 3>{1, HKV, c});
  const std::size_t bytes = cake::decode_scores_workspace_size(1, H, HKV, held);
  DeviceArray<char> ws(bytes);
  time_loop(state, s, [&] {
    cake::decode_scores(cake::cuda.on(s), qv, kv, cake::MeanVarianceIndicator{}, ov,
                        cake::cuda_workspace{ws.p, bytes});
  });
  set_bytes(state, static_cast<double>(k.n * sizeof(__nv_bfloat16)));
  cudaStreamDestroy(s);
}

// ---- KvCache end to end ----------------------------------------------------------------
// Every layer of one prompt through KvCache<..., cake::cuda_policy>::prefill (cascading,
// float K/V, exact statistics), from a fresh cache per iteration, next to the same
// layers' window statistics alone: the ratio is what selection, compaction, the budget
// syncs and the allocations add to the statistics CAKE cannot do without.
constexpr index_t LAYERS = 32;
using CudaCache = cake::KvCache<cake::CakePreference, cake::ProportionalBudget,
                                cake::MeanVarianceIndicator, float, cake::cuda_policy>;

struct PromptOnDevice {
  DeviceArray<float> q, k, v;  // q: (layers, 1, H, W, D); k, v: (1, HKV, S, D), every layer
  explicit PromptOnDevice(index_t S)
      : q(static_cast<std::size_t>(LAYERS * H * W * D)),
        k(static_cast<std::size_t>(HKV * S * D)),
        v(static_cast<std::size_t>(HKV * S * D)) {
    q.upload(random_vector<float>(q.n, 1.0f, 11));
    k.upload(random_vector<float>(k.n, 1.0f, 12));
    v.upload(random_vector<float>(v.n, 1.0f, 13));
  }
  auto qv(index_t l) const {
    return cake::make_view<cake::device_space>(static_cast<const float*>(q.p) + l * H * W * D,
                                               std::array<index_t, 4>{1, H, W, D});
  }
  auto kv(index_t S) const {
    return cake::make_view<cake::device_space>(static_cast<const float*>(k.p),
                                               std::array<index_t, 4>{1, HKV, S, D});
  }
  auto vv(index_t S) const {
    return cake::make_view<cake::device_space>(static_cast<const float*>(v.p),
                                               std::array<index_t, 4>{1, HKV, S, D});
  }
};

cake::CacheConfig llama_config(index_t C) {
  cake::CacheConfig cfg{};
  cfg.layers = LAYERS, cfg.batch = 1, cfg.q_heads = H, cfg.kv_heads = HKV, cfg.head_dim = D;
  cfg.window = W, cfg.cache_size = C, cfg.cascade = true;
  cfg.check_finite = false;  // engines that guarantee finite inputs skip the scan
  return cfg;
}

void kv_cache_prefill_cake(benchmark::State& state) {
  const index_t S = state.range(0), C = state.range(1);
  const PromptOnDevice in(S);
  CudaCache cache(llama_config(C), {}, {}, {}, cake::cuda.on(cudaStreamPerThread));
  time_loop(state, cudaStreamPerThread, [&] {
    cache.reset();
    for (index_t l = 0; l < LAYERS; ++l) cache.prefill(l, in.qv(l), in.kv(S), in.vv(S));
  });
  state.counters["peak_tokens"] = static_cast<double>(cache.peak_tokens_held());
}

void kv_cache_prefill_stats_only(benchmark::State& state) {
  const index_t S = state.range(0);
  const PromptOnDevice in(S);
  const cudaStream_t s = cudaStreamPerThread;
  DeviceArray<float> ind(static_cast<std::size_t>(HKV * (S - W))), st(2);
  const std::size_t bytes = cake::window_stats_workspace_size(1, H, HKV, W, S, D);
  DeviceArray<char> ws(bytes);
  const auto iv = cake::make_view<cake::device_space>(ind.p, std::array<index_t, 3>{1, HKV, S - W});
  const auto sv = cake::make_view<cake::device_space>(st.p, std::array<index_t, 1>{2});
  time_loop(state, s, [&] {
    for (index_t l = 0; l < LAYERS; ++l)
      cake::window_stats(cake::cuda.on(s), in.qv(l), in.kv(S), cake::MeanVarianceIndicator{}, iv,
                         sv, {}, cake::cuda_workspace{ws.p, bytes});
  });
}

// One decoding step of every layer after a prefill of S tokens into a cache of C.
void kv_cache_decode_cake(benchmark::State& state) {
  const index_t S = state.range(0), C = state.range(1);
  const PromptOnDevice in(S);
  CudaCache cache(llama_config(C), {}, {}, {}, cake::cuda.on(cudaStreamPerThread));
  for (index_t l = 0; l < LAYERS; ++l) cache.prefill(l, in.qv(l), in.kv(S), in.vv(S));
  DeviceArray<float> q(static_cast<std::size_t>(H * D)), kv(static_cast<std::size_t>(HKV * D));
  q.upload(random_vector<float>(q.n, 1.0f, 14));
  kv.upload(random_vector<float>(kv.n, 1.0f, 15));
  const auto qv = cake::make_view<cake::device_space>(static_cast<const float*>(q.p),
                                                      std::array<index_t, 3>{1, H, D});
  const auto nv = cake::make_view<cake::device_space>(static_cast<const float*>(kv.p),
                                                      std::array<index_t, 3>{1, HKV, D});
  time_loop(state, cudaStreamPerThread, [&] {
    for (index_t l = 0; l < LAYERS; ++l) cache.decode(l, qv, nv, nv);
  });
  index_t held = 0;
  for (index_t l = 0; l < LAYERS; ++l) held += cache.tokens_held(l);
  state.counters["held_per_layer"] = static_cast<double>(held) / LAYERS;
}

void register_all() {
  for (const index_t S : {32768, 131072}) {
    const std::string a = "/S:" + std::to_string(S) + "/H:32/Hkv:8/d:128/w:32/bf16";
    using M = cake::cuda_math;
    using bf16 = __nv_bfloat16;
    const auto add = [&](const char* name, void (*f)(benchmark::State&)) {
      benchmark::RegisterBenchmark(("window_stats/" + std::string(name) + a).c_str(), f)
          ->Arg(S)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    };
    add("cake", [](benchmark::State& st) { window_stats_cake<float>(st, false, M::exact); });
    add("cake_lse", [](benchmark::State& st) { window_stats_cake<float>(st, true, M::exact); });
    add("cake_tc",
        [](benchmark::State& st) { window_stats_cake<float>(st, false, M::tensor_cores); });
    add("cake_tc_lse",
        [](benchmark::State& st) { window_stats_cake<float>(st, true, M::tensor_cores); });
    add("cake_tc_bf16q",
        [](benchmark::State& st) { window_stats_cake<bf16>(st, false, M::tensor_cores); });
    add("cake_tc_bf16q_lse",
        [](benchmark::State& st) { window_stats_cake<bf16>(st, true, M::tensor_cores); });
    benchmark::RegisterBenchmark(("window_stats/d2d_copy_of_K" + a).c_str(), copy_of_k)
        ->Arg(S)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const index_t k : {256, 1024, 2048}) {
    const std::string a = "/rows:8/n:131072/k:" + std::to_string(k);
    benchmark::RegisterBenchmark(
        ("select_k/cake" + a).c_str(),
        [](benchmark::State& st) { select_k_cake(st, cake::select_order::descending); })
        ->Args({8, 131072, k})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(
        ("select_k/cake_position_order" + a).c_str(),
        [](benchmark::State& st) { select_k_cake(st, cake::select_order::position); })
        ->Args({8, 131072, k})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("select_k/cub_segmented_sort" + a).c_str(),
                                 select_k_cub_segmented_sort)
        ->Args({8, 131072, k})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const index_t m : {1056, 16384}) {
    const std::string a = "/S:131072/m:" + std::to_string(m) + "/Hkv:8/d:128/bf16";
    benchmark::RegisterBenchmark(("compact/cake" + a).c_str(), compact_cake)
        ->Args({131072, m})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("compact/cudaMemcpyAsync" + a).c_str(), compact_memcpy)
        ->Args({131072, m})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const index_t S : {8192, 32768}) {
    const std::string a = "/layers:32/S:" + std::to_string(S) + "/H:32/Hkv:8/d:128/float";
    benchmark::RegisterBenchmark(("kv_cache_prefill/cake" + a + "/C:2048").c_str(),
                                 kv_cache_prefill_cake)
        ->Args({S, 2048})
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(3);
    benchmark::RegisterBenchmark(("kv_cache_prefill/window_stats_only" + a).c_str(),
                                 kv_cache_prefill_stats_only)
        ->Args({S, 2048})
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(3);
  }
  benchmark::RegisterBenchmark(
      "kv_cache_decode/cake/layers:32/S:8192/C:2048/H:32/Hkv:8/d:128/float", kv_cache_decode_cake)
      ->Args({8192, 2048})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->Iterations(5);
  for (const index_t held : {2080, 16416}) {
    const std::string a = "/held:" + std::to_string(held) + "/H:32/Hkv:8/d:128/bf16";
    benchmark::RegisterBenchmark(("decode_scores/cake" + a).c_str(), decode_scores_cake)
        ->Arg(held)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("decode_scores/d2d_copy_of_K" + a).c_str(), copy_of_k)
        ->Arg(held)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

// ---- paged compaction ----------------------------------------------------------------
// cake::compact on a paged pool in vLLM's layout [blocks, 16, Hkv, d] (bf16), one
// sequence of S tokens whose blocks lie at random places of the pool, in place, the
// same kept rows as compact/cake; next to it the same with a cuda_index_guard (its
// check kernel), compact/cake and compact/cudaMemcpyAsync of the same arguments.
namespace {

void compact_paged(benchmark::State& state, bool guarded) {
  const index_t S = state.range(0), m = state.range(1), bs = 16, N = (S + bs - 1) / bs;
  cudaStream_t s;
  must(cudaStreamCreate(&s), "stream");
  DeviceArray<__nv_bfloat16> pool(static_cast<std::size_t>(N * bs * HKV * D));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(N));
  for (index_t i = 0; i < N; ++i) ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(7));  // <algorithm> comes with cake
  const std::vector<std::int32_t> indptr{0, static_cast<std::int32_t>(N)},
      lens{static_cast<std::int32_t>(S)}, keep_lens(HKV, static_cast<std::int32_t>(m));
  std::vector<std::int64_t> keep(static_cast<std::size_t>(HKV * m));
  for (index_t g = 0; g < HKV; ++g)
    for (index_t t = 0; t < m; ++t) keep[static_cast<std::size_t>(g * m + t)] = t * S / m;
  DeviceArray<std::int32_t> dptr(2), dids(ids.size()), dlens(1), dkl(keep_lens.size());
  DeviceArray<std::int64_t> dkeep(keep.size());
  dptr.upload(indptr), dids.upload(ids), dlens.upload(lens), dkl.upload(keep_lens);
  dkeep.upload(keep);
  const auto table = cake::make_block_table<cake::device_space>(
      static_cast<const std::int32_t*>(dptr.p), static_cast<const std::int32_t*>(dids.p),
      static_cast<const std::int32_t*>(dlens.p), 1, N);
  const auto pv =
      cake::make_view<cake::device_space>(pool.p, std::array<index_t, 4>{N, HKV, bs, D},
                                          std::array<index_t, 4>{bs * HKV * D, D, HKV * D, 1});
  const auto kv = cake::make_view<cake::device_space>(static_cast<const std::int64_t*>(dkeep.p),
                                                      std::array<index_t, 3>{1, HKV, m});
  const auto lv = cake::make_view<cake::device_space>(static_cast<const std::int32_t*>(dkl.p),
                                                      std::array<index_t, 2>{1, HKV});
  cake::cuda_index_guard guard;
  if (guarded)
    time_loop(state, s, [&] { cake::compact(cake::cuda.on(s), pv, table, kv, lv, guard); });
  else
    time_loop(state, s, [&] { cake::compact(cake::cuda.on(s), pv, table, kv, lv); });
  if (guarded) guard.throw_if_error();
  set_bytes(state, 2.0 * static_cast<double>(HKV * m * D) * sizeof(__nv_bfloat16));
  cudaStreamDestroy(s);
}

void register_paged() {
  for (const index_t m : {1056, 16384}) {
    const std::string a = "/S:131072/m:" + std::to_string(m) + "/Hkv:8/d:128/bf16";
    benchmark::RegisterBenchmark(("compact/paged" + a + "/block:16").c_str(),
                                 [](benchmark::State& st) { compact_paged(st, false); })
        ->Args({131072, m})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("compact/paged_guarded" + a + "/block:16").c_str(),
                                 [](benchmark::State& st) { compact_paged(st, true); })
        ->Args({131072, m})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipping the CUDA benchmarks\n");
    return 0;
  }
  register_all();
  register_paged();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
