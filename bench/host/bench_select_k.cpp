// select_k: the k highest indicator scores of every (batch, kv-head) row, written
// in descending score order (what eviction needs), rows spread over the threads.
//   cake:             cake::select_k (radix select, then sort of the k winners)
//   std_sort:         full std::sort of each row's indices
//   std_nth_element:  std::nth_element, then std::sort of the k winners
//   std_partial_sort: std::partial_sort of the first k
// decode_sort: a reference-order decoding step's sort of one row's candidates (all but
// the lowest kept, by descending score), the rows of a 8-KV-head step, from a pool of
// 512 rows cycled so that the branch predictor cannot learn the data (a step's scores
// change completely from one step to the next):
//   cake:     layer_store::sort_descending on the active path (AVX-512: the sorting
//             network of simd_sort.hpp; else the counting sort)
//   counting: the same forced onto the portable path (the scalar counting sort)
//   std_sort: std::sort of the indices by (score descending, index)
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

const std::vector<float>& scores_for(index_t rows, index_t n) {
  static std::map<std::pair<index_t, index_t>, std::vector<float>> cache;
  auto& s = cache[{rows, n}];
  if (s.empty()) s = indicator_scores(rows, n, 42);
  return s;
}

struct ByScore {
  const float* x;
  bool operator()(index_t a, index_t b) const { return x[a] > x[b] || (x[a] == x[b] && a < b); }
};

enum class Std { sort, nth_element, partial_sort };

template <Std kind>
void std_topk(const float* scores, index_t rows, index_t n, index_t k, index_t* out,
              std::vector<std::vector<index_t>>& tmp) {
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t r = 0; r < rows; ++r) {
    auto& idx = tmp[static_cast<std::size_t>(r)];
    for (index_t j = 0; j < n; ++j) idx[static_cast<std::size_t>(j)] = j;
    const ByScore cmp{scores + r * n};
    if constexpr (kind == Std::sort) {
      std::sort(idx.begin(), idx.end(), cmp);
    } else if constexpr (kind == Std::nth_element) {
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), cmp);
      std::sort(idx.begin(), idx.begin() + k, cmp);
    } else {
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), cmp);
    }
    std::copy(idx.begin(), idx.begin() + k, out + r * k);
  }
}

void counters(benchmark::State& st, index_t rows, index_t n) {
  st.SetItemsProcessed(st.iterations() * rows * n);
  st.SetBytesProcessed(st.iterations() * rows * n * static_cast<index_t>(sizeof(float)));
}

template <Std kind>
void add_std(const char* impl, index_t rows, index_t n, index_t k, const std::string& args) {
  add(name("select_k", impl, args), [rows, n, k](benchmark::State& st) {
    const auto& s = scores_for(rows, n);
    std::vector<index_t> out(static_cast<std::size_t>(rows * k));
    std::vector<std::vector<index_t>> tmp(static_cast<std::size_t>(rows),
                                          std::vector<index_t>(static_cast<std::size_t>(n)));
    for (auto _ : st) {
      std_topk<kind>(s.data(), rows, n, k, out.data(), tmp);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    counters(st, rows, n);
  })->MinTime(0.2);
}

void add_case(index_t rows, index_t n, index_t k) {
  const std::string args =
      "rows:" + std::to_string(rows) + "/n:" + std::to_string(n) + "/k:" + std::to_string(k);
  add(name("select_k", "cake", args), [rows, n, k](benchmark::State& st) {
    const auto& s = scores_for(rows, n);
    std::vector<index_t> out(static_cast<std::size_t>(rows * k));
    auto sv = cake::make_view(s.data(), std::array<index_t, 2>{rows, n});
    auto ov = cake::make_view(out.data(), std::array<index_t, 2>{rows, k});
    for (auto _ : st) {
      cake::select_k(cake::host, sv, ov, cake::select_order::descending);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    counters(st, rows, n);
  })->MinTime(0.2);
  add_std<Std::sort>("std_sort", rows, n, k, args);
  add_std<Std::nth_element>("std_nth_element", rows, n, k, args);
  add_std<Std::partial_sort>("std_partial_sort", rows, n, k, args);
}

void add_decode_sort(index_t n) {
  constexpr index_t rows = 8, pool = 512;
  const std::string args = "rows:" + std::to_string(rows) + "/n:" + std::to_string(n);
  using Store = cake::detail::layer_store<float, cake::host_policy>;
  const auto run = [n](benchmark::State& st, int how) {
    const auto& s = scores_for(pool, n);
    std::vector<index_t> out(static_cast<std::size_t>(n)), idx(out.size());
    std::vector<std::uint32_t> scratch(static_cast<std::size_t>(Store::sort_words(n)));
    const cake::host_isa saved = cake::active_host_isa();
    if (how == 1) cake::force_host_isa(cake::host_isa::portable);
    index_t r = 0;
    for (auto _ : st) {
      for (index_t i = 0; i < rows; ++i, r = (r + 1) % pool) {
        const float* x = s.data() + r * n;
        if (how == 2) {
          for (index_t j = 0; j < n; ++j) idx[static_cast<std::size_t>(j)] = j;
          std::sort(idx.begin(), idx.end(), ByScore{x});
          std::copy(idx.begin(), idx.end() - 1, out.begin());
        } else {
          Store::sort_descending(x, n, n - 1, out.data(), scratch.data());
        }
        benchmark::DoNotOptimize(out.data());
      }
      benchmark::ClobberMemory();
    }
    cake::force_host_isa(saved);
    counters(st, rows, n);
  };
  add(name("decode_sort", "cake", args), [run](benchmark::State& st) { run(st, 0); })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("decode_sort", "counting", args), [run](benchmark::State& st) { run(st, 1); })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
  add(name("decode_sort", "std_sort", args), [run](benchmark::State& st) { run(st, 2); })
      ->MinTime(0.2)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_select_k() {
  // Cheap: the whole matrix runs by default. rows 8 = Llama B=1 (8 KV heads), 32 = B=4.
  for (index_t rows : {8, 32})
    for (index_t n : {4096, 16384, 32768})
      for (index_t k : {128, 1024, 2048}) add_case(rows, n, k);
  // a step's candidates at C = 256, 1024 (window 32, one token appended) and 4096
  for (index_t n : {225, 993, 4065}) add_decode_sort(n);
}

}  // namespace cake_bench
