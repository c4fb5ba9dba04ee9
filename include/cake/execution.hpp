// cake: execution policies, passed first to every algorithm, as in Thrust.
//   cake::host                 host backend, all hardware threads
//   cake::host.threads(1)      host backend, one thread
//   cake::host.from(ws)        host backend, scratch from a cake::host_workspace
//                              (backend/host/workspace.hpp) instead of per call
//   cake::cuda.on(stream)      CUDA backend (include <cake/cake.cuh>)
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/view.hpp"

namespace cake {

class host_workspace;  // backend/host/workspace.hpp

struct host_policy {
  using memory_space = host_space;
  // 0 means "as many as the OpenMP runtime offers" (1 without OpenMP).
  int num_threads = 0;
  // Scratch the host kernels reuse between calls (not owned; must outlive the calls
  // under this policy and serve one call at a time); null: each call allocates its own.
  host_workspace* workspace = nullptr;
  // A call whose work (about one multiply-add per unit) is below this runs on the
  // calling thread. Splitting pays when half the work outlasts waking and joining the
  // OpenMP workers: tens of microseconds on two idle cores, but about 16 ms on this
  // project's loaded 2-core machine (bench: decode_scores/split at C = 256 took 16.5 ms
  // for 0.13 ms of work, and split lost to serial up to C = 16384). 2^25 is about one
  // millisecond of one core: a decode step's scoring at Llama-3.1-8B heads stays on
  // one thread up to about 8K held tokens (4.3 M at 1K), and so do a prefill's top-k
  // and gathers, while window statistics (0.5 G at 4K tokens) split.
  // 0 splits every call.
  std::int64_t min_parallel_work = std::int64_t{1} << 25;

  constexpr host_policy threads(int n) const noexcept {
    return host_policy{n, workspace, min_parallel_work};
  }
  constexpr host_policy from(host_workspace& ws) const noexcept {
    return host_policy{num_threads, &ws, min_parallel_work};
  }
  constexpr host_policy parallel_from(std::int64_t work) const noexcept {
    return host_policy{num_threads, workspace, work};
  }
};
inline constexpr host_policy host{};

// How the CUDA window statistics compute Q . K: in float on the SIMT cores (exact:
// agrees with the host backend to 1e-5, the same kept tokens) or on tensor cores
// (16-bit K, head_dim % 16 == 0, sm_80+; about 1e-4 .. 1e-3, so tokens whose scores
// nearly tie may be kept differently from the host). Other K types stay exact.
enum class cuda_math { exact, tensor_cores };

// The CUDA policy is declared here so that host code can name it in templates;
// its algorithms live in cake.cuh. The stream is kept as an opaque handle so
// this header needs no CUDA headers.
//   cake::cuda.on(stream)                              exact statistics
//   cake::cuda.on(stream).with(cuda_math::tensor_cores)  every call under it, a
//                                                        KvCache's too, on tensor cores
//   cake::cuda.on(stream).from(pool)                   cake's device allocations (scratch,
//                                                        a KvCache's layers) from the
//                                                        engine's cudaMemPool_t
struct cuda_policy {
  using memory_space = device_space;
  void* stream = nullptr;  // cudaStream_t
  cuda_math math = cuda_math::exact;
  // cudaMemPool_t, or null: free functions allocate from the device's current pool and
  // a KvCache from a pool of its own.
  void* pool = nullptr;
  template <class Stream>
  constexpr cuda_policy on(Stream s) const noexcept {
    return cuda_policy{reinterpret_cast<void*>(s), math, pool};
  }
  constexpr cuda_policy with(cuda_math m) const noexcept { return cuda_policy{stream, m, pool}; }
  template <class Pool>
  constexpr cuda_policy from(Pool p) const noexcept {
    return cuda_policy{stream, math, reinterpret_cast<void*>(p)};
  }
};
inline constexpr cuda_policy cuda{};

template <class E>
concept execution_policy = requires {
  typename std::remove_cvref_t<E>::memory_space;
};

// A view is usable by policy E only if it lives in E's memory space. The check is a
// static_assert with a sentence, not a template dump.
template <class E, class... V>
constexpr void require_space() {
  static_assert(
      (std::is_same_v<typename std::remove_cvref_t<E>::memory_space, memory_space_of<V>> && ...),
      "cake: a tensor's memory space does not match the execution policy: host views "
      "go with cake::host, device views (cake::device_view) with cake::cuda.");
}

}  // namespace cake
