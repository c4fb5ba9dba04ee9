// cake: which instruction set the host kernels run on, chosen at run time.
//
// The library is header-only and its users may compile without -march=native, so
// the hot kernels (window statistics, decode scores) are compiled for AVX2 + FMA
// and AVX-512 inside target regions and picked once from what the CPU reports.
// CAKE_HOST_ISA=portable|avx2|avx512 in the environment (read once) or
// cake::force_host_isa() pin a path, so CI can run every path the machine has.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../../../error.hpp"

// x86 GCC/Clang host compilation: the only setting where the target regions exist.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__CUDACC__)
#define CAKE_HOST_X86_DISPATCH 1
#include <cpuid.h>
#else
#define CAKE_HOST_X86_DISPATCH 0
#endif

namespace cake {

enum class host_isa : int {
  portable = 0,  // plain C++ the compiler vectorises for whatever target it was given
  avx2 = 1,      // AVX2 + FMA + F16C, 8 floats per vector
  avx512 = 2,    // AVX-512 F/BW/VL/DQ + FMA, 16 floats per vector
};

inline const char* host_isa_name(host_isa i) noexcept {
  switch (i) {
    case host_isa::avx2:
      return "avx2";
    case host_isa::avx512:
      return "avx512";
    default:
      return "portable";
  }
}

// Whether this CPU (and this build) can run the path.
inline bool host_isa_supported(host_isa i) noexcept {
  if (i == host_isa::portable) return true;
#if CAKE_HOST_X86_DISPATCH
  __builtin_cpu_init();
  // F16C from CPUID leaf 1 (ECX bit 29): not every compiler's __builtin_cpu_supports knows it.
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (i == host_isa::avx2) return avx2;
  if (i == host_isa::avx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

// The best path this CPU supports.
inline host_isa host_isa_best() noexcept {
  if (host_isa_supported(host_isa::avx512)) return host_isa::avx512;
  if (host_isa_supported(host_isa::avx2)) return host_isa::avx2;
  return host_isa::portable;
}

namespace detail {
// -1: not chosen yet; else the host_isa in use.
inline std::atomic<int>& host_isa_state() {
  static std::atomic<int> s{-1};
  return s;
}
// CAKE_HOST_ISA, if set to a path this CPU supports; the best path otherwise (an
// unsupported request falls back to the best path below it).
inline host_isa host_isa_from_env() noexcept {
  const host_isa best = host_isa_best();
  const char* e = std::getenv("CAKE_HOST_ISA");
  if (e == nullptr || *e == '\0') return best;
  host_isa want = best;
  if (std::strcmp(e, "portable") == 0)
    want = host_isa::portable;
  else if (std::strcmp(e, "avx2") == 0)
    want = host_isa::avx2;
  else if (std::strcmp(e, "avx512") == 0)
    want = host_isa::avx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}
}  // namespace detail

// The path the host kernels take: the forced one, else CAKE_HOST_ISA, else the best.
inline host_isa active_host_isa() noexcept {
  std::atomic<int>& s = detail::host_isa_state();
  int v = s.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(detail::host_isa_from_env());
    int expected = -1;
    if (!s.compare_exchange_strong(expected, v, std::memory_order_relaxed)) v = expected;
  }
  return static_cast<host_isa>(v);
}

// Pins the path for every later call (tests, benchmarks). Throws cake::invalid_argument
// when this CPU or build cannot run it; the active path is unchanged then.
inline void force_host_isa(host_isa i) {
  if (!host_isa_supported(i))
    throw invalid_argument("cake.host_isa",
                           std::string("host ISA must be one this CPU supports (best: ") +
                               host_isa_name(host_isa_best()) + "), got " + host_isa_name(i));
  detail::host_isa_state().store(static_cast<int>(i), std::memory_order_relaxed);
}

}  // namespace cake
