// allocate_budgets: slice the total budget over L layers by preference (exact
// integer rules of the reference), L = 32..128.
//   cake:  cake::allocate_budgets(ProportionalBudget)
//   naive: the reference's steps written plainly (fresh lists at every step, as
//          the Python code does)
#include "common/common.hpp"
#include "host/suites.hpp"

namespace cake_bench {

namespace {

std::vector<index_t> naive_allocate(const std::vector<float>& prefs, index_t total,
                                    index_t ceiling) {
  float sum = 0;
  for (float p : prefs) sum += p;
  std::vector<float> raw;
  for (float p : prefs) raw.push_back(p / sum * static_cast<float>(total));
  std::vector<index_t> b;
  for (float r : raw) b.push_back(static_cast<index_t>(r));
  std::vector<index_t> over;
  for (index_t x : b) over.push_back(std::max<index_t>(x - ceiling, 0));
  index_t excess = 0;
  for (index_t x : over) excess += x;
  std::vector<index_t> capped;
  for (index_t x : b) capped.push_back(std::min(x, ceiling));
  b = capped;
  if (excess > 0) {
    std::vector<std::size_t> under;
    for (std::size_t l = 0; l < b.size(); ++l)
      if (b[l] < ceiling) under.push_back(l);
    if (!under.empty()) {
      const index_t cnt = static_cast<index_t>(under.size());
      for (std::size_t i = 0; i < under.size(); ++i)
        b[under[i]] += excess / cnt + (static_cast<index_t>(i) < excess % cnt ? 1 : 0);
    }
  }
  index_t s = 0;
  for (index_t x : b) s += x;
  const index_t diff = total - s;
  std::vector<std::size_t> elig;
  for (std::size_t l = 0; l < b.size(); ++l)
    if (diff > 0 ? b[l] < ceiling : b[l] > 1) elig.push_back(l);
  if (diff != 0 && !elig.empty()) {
    const index_t mag = diff > 0 ? diff : -diff, cnt = static_cast<index_t>(elig.size());
    for (std::size_t i = 0; i < elig.size(); ++i)
      b[elig[i]] +=
          (diff > 0 ? 1 : -1) * (mag / cnt + (static_cast<index_t>(i) < mag % cnt ? 1 : 0));
  }
  std::vector<index_t> fin;
  for (index_t x : b) fin.push_back(std::min(x, ceiling));
  return fin;
}

void add_case(index_t L) {
  const std::string args = "L:" + std::to_string(L) + "/C:1024/S:32768";
  const index_t total = (1024 - window) * L, ceiling = 32768 - window;
  std::vector<float> prefs(static_cast<std::size_t>(L));
  Rng g(static_cast<std::uint64_t>(L));
  for (auto& p : prefs) p = std::exp(2.0f * g.normal());
  add(name("allocate_budgets", "cake", args),
      [=](benchmark::State& st) {
        std::vector<index_t> out(static_cast<std::size_t>(L));
        for (auto _ : st) {
          cake::allocate_budgets(cake::ProportionalBudget{}, prefs, L, total, ceiling, out);
          benchmark::DoNotOptimize(out.data());
          benchmark::ClobberMemory();
        }
        st.SetItemsProcessed(st.iterations() * L);
      })
      ->MinTime(0.1)
      ->Unit(benchmark::kMicrosecond);
  add(name("allocate_budgets", "naive", args),
      [=](benchmark::State& st) {
        for (auto _ : st) {
          auto out = naive_allocate(prefs, total, ceiling);
          benchmark::DoNotOptimize(out.data());
          benchmark::ClobberMemory();
        }
        st.SetItemsProcessed(st.iterations() * L);
      })
      ->MinTime(0.1)
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_allocate_budgets() {
  for (index_t L : {32, 64, 96, 128}) add_case(L);
}

}  // namespace cake_bench
