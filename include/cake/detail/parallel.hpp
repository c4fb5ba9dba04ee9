// cake: host parallelism. OpenMP when the consumer compiles with it (the
// cake::cake target links it when found), a plain loop otherwise; results never
// depend on the thread count because every reduction is finished in a fixed order.
#pragma once

#include <algorithm>

#include "../config.hpp"
#include "../execution.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace cake::detail {

inline int host_threads(const host_policy& p) {
#if defined(_OPENMP)
  return p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#else
  (void)p;
  return 1;
#endif
}

// Threads parallel_for will use for n tasks; scratch is sized by this before the
// parallel region, so nothing inside it allocates (or can throw).
inline int worker_count(const host_policy& p, index_t n) {
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(host_threads(p), n)));
}

// Runs f(i, worker) for i in [0, n), dynamically scheduled; worker < worker_count(p, n).
template <class F>
void parallel_for(const host_policy& p, index_t n, F&& f) {
  const int nt = worker_count(p, n);
  if (nt <= 1) {
    for (index_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (index_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
#endif
}

}  // namespace cake::detail
