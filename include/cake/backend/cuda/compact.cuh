// CUDA backend of cake::compact: 16-byte vectorised row gathers when the layout
// allows (head_dim * sizeof(T) a multiple of 16, 16-byte aligned rows), element-wise
// otherwise. In place (dst == src, and always for a paged pool) needs strictly
// ascending keep rows, as on the host.
//
// Checking device-resident indices at the call would need a synchronisation, so the
// checks are opt-in and stream-ordered: give the call a cake::cuda_index_guard and a
// check kernel runs before the gather (one small launch, no sync); if any index is
// bad the gather writes nothing, and guard.throw_if_error() (which synchronises the
// stream, when the engine chooses) throws the error the host backend would have
// thrown. Without a guard the indices are trusted: out-of-range ones are skipped,
// never dereferenced. Paged block tables are checked on the host copy the engine
// keeps (cake::validate_block_table): the device checks lengths and indices only.
#pragma once

#include <cstdint>

#include "../../algorithm/compact.hpp"
#include "detail/compact_plan.cuh"
#include "detail/dispatch.cuh"

namespace cake {

// A device-side error record for cake::compact's indices, reused across calls. Once it
// holds an error, every later guarded call writes nothing until throw_if_error() (or
// check_status()) reads and clears it. Not thread-safe: one guard per stream.
class cuda_index_guard {
 public:
  cuda_index_guard() {
    cuda_detail::check(cudaMalloc(&rec_, sizeof(cuda_detail::IndexGuardRecord)),
                       "cudaMalloc (cuda_index_guard)");
    try {
      reset(nullptr);
      cuda_detail::check(cudaStreamSynchronize(nullptr), "cuda_index_guard");
    } catch (...) {
      (void)cudaFree(rec_);
      throw;
    }
  }
  ~cuda_index_guard() { (void)cudaFree(rec_); }
  cuda_index_guard(const cuda_index_guard&) = delete;
  cuda_index_guard& operator=(const cuda_index_guard&) = delete;

  // Synchronises the stream of the last guarded call, reads the record and clears it.
  status check_status() {
    cuda_detail::IndexGuardRecord r{};
    cuda_detail::check(cudaMemcpyAsync(&r, rec_, sizeof r, cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (cuda_index_guard)");
    cuda_detail::check(cudaStreamSynchronize(stream_), "cuda_index_guard");
    status st = cuda_detail::guard_status(r);
    if (!st.ok()) reset(stream_);
    return st;
  }
  void throw_if_error() { check_status().throw_if_error(); }

  // For the launchers: the record, used on `stream` from now on.
  cuda_detail::IndexGuardRecord* use_on(cudaStream_t stream) noexcept {
    stream_ = stream;
    return rec_;
  }

 private:
  void reset(cudaStream_t stream) {
    cuda_detail::check(cudaMemsetAsync(rec_, 0, sizeof(cuda_detail::IndexGuardRecord), stream),
                       "cudaMemsetAsync (cuda_index_guard)");
    cuda_detail::check(cudaMemsetAsync(&rec_->first, 0xFF, sizeof rec_->first, stream),
                       "cudaMemsetAsync (cuda_index_guard)");
  }
  cuda_detail::IndexGuardRecord* rec_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

namespace cuda_detail {

template <class TI>
void launch_compact_check(const KeepRows<TI>& k, std::int64_t rows, IndexGuardRecord* guard,
                          cudaStream_t stream) {
  if (guard == nullptr || rows == 0) return;
  const unsigned grid =
      std::min<unsigned>(grid_dim(check_work(rows, k.m), tuning::compact_threads), 1024u);
  compact_check_kernel<TI><<<grid, tuning::compact_threads, 0, stream>>>(k, rows, guard);
  check_launch("compact_check_kernel");
}

// A guarded call with no gather to run still seals what its check recorded.
template <class TI>
void launch_compact_seal(const KeepRows<TI>& k, IndexGuardRecord* guard, int paged,
                         cudaStream_t stream) {
  if (guard == nullptr) return;
  compact_seal_kernel<TI><<<1, 32, 0, stream>>>(k, guard, paged);
  check_launch("compact_seal_kernel");
}

template <class V, class T, class TI>
void launch_compact_as(const CompactParams<TI>& base, index_t B, index_t Hkv, index_t m, index_t d,
                       bool in_place, cudaStream_t stream) {
  CompactParams<TI> p = base;
  p.vecs = static_cast<int>(d * static_cast<index_t>(sizeof(T)) / static_cast<index_t>(sizeof(V)));
  if (in_place) {
    compact_in_place_kernel<V, TI, 4>
        <<<static_cast<unsigned>(B * Hkv), tuning::compact_threads, 0, stream>>>(p);
    check_launch("compact_in_place_kernel");
  } else {
    const std::int64_t total = B * Hkv * m * p.vecs;
    compact_kernel<V, TI>
        <<<grid_dim(total, tuning::compact_threads), tuning::compact_threads, 0, stream>>>(p,
                                                                                           total);
    check_launch("compact_kernel");
  }
}

template <class T, class TI>
void launch_compact(const cuda_policy& exec, device_view<const T, 4> src,
                    device_view<const TI, 3> keep, device_view<T, 4> dst, IndexGuardRecord* guard) {
  const index_t B = src.extent(0), Hkv = src.extent(1), d = src.extent(3);
  const index_t m = keep.extent(2);
  if (B * Hkv == 0) return;
  const CompactParams<TI> p = compact_params(src, keep, dst, guard);
  const bool in_place = p.keep.ascending;
  const bool vec16 = compact_vec16<T>(p, d);
  const cudaStream_t stream = stream_of(exec);
  // The indices are checked even when there is nothing to move (head_dim = 0).
  launch_compact_check(p.keep, B * Hkv, guard, stream);
  if (m * d == 0) return launch_compact_seal(p.keep, guard, 0, stream);
  if (vec16)
    launch_compact_as<uint4, T>(p, B, Hkv, m, d, in_place, stream);
  else
    launch_compact_as<T, T>(p, B, Hkv, m, d, in_place, stream);
}

template <class T, class TI>
void launch_compact_paged(const cuda_policy& exec, device_view<T, 4> pool,
                          const block_table<device_space>& table, device_view<const TI, 3> keep,
                          device_view<const std::int32_t, 2> keep_lens, IndexGuardRecord* guard) {
  const index_t rows = table.num_seqs() * pool.extent(1), d = pool.extent(3);
  if (rows == 0) return;
  PagedCompactParams<TI> p = paged_params(pool, table, keep, keep_lens, guard);
  const cudaStream_t stream = stream_of(exec);
  // The lengths are checked even when there is nothing to move (m = 0 or head_dim = 0).
  launch_compact_check(p.keep, rows, guard, stream);
  if (keep.extent(2) * d == 0) return launch_compact_seal(p.keep, guard, 1, stream);
  const bool vec16 = paged_vec16<T>(p, d);
  p.vecs = static_cast<int>(vec16 ? d * static_cast<index_t>(sizeof(T)) / 16 : d);
  if (vec16)
    compact_paged_kernel<uint4, TI, 4>
        <<<static_cast<unsigned>(rows), tuning::compact_threads, 0, stream>>>(p);
  else
    compact_paged_kernel<T, TI, 4>
        <<<static_cast<unsigned>(rows), tuning::compact_threads, 0, stream>>>(p);
  check_launch("compact_paged_kernel");
}

}  // namespace cuda_detail

template <>
struct compact_backend<cuda_policy> {
  template <class T, class TI>
  static void run(const cuda_policy& exec, device_view<const T, 4> src,
                  device_view<const TI, 3> keep, device_view<T, 4> dst,
                  cuda_detail::IndexGuardRecord* guard = nullptr) {
    cuda_detail::launch_compact(exec, src, keep, dst, guard);
  }
  template <class T, class TI>
  static void run_paged(const cuda_policy& exec, device_view<T, 4> pool,
                        const block_table<device_space>& table, device_view<const TI, 3> keep,
                        device_view<const std::int32_t, 2> keep_lens,
                        cuda_detail::IndexGuardRecord* guard = nullptr) {
    cuda_detail::launch_compact_paged(exec, pool, table, keep, keep_lens, guard);
  }
};

// Guarded compactions: the indices are checked on the device before the gather, which
// writes nothing if one is bad; guard.throw_if_error() reports it (see above). The same
// front-ends as the plain calls (algorithm/compact.hpp), with the guard's record.
template <tensor_like Src, tensor_like Keep, tensor_like Dst>
void compact(const cuda_policy& exec, Src&& src, Keep&& keep, Dst&& dst, cuda_index_guard& guard) {
  detail::compact_dense(exec, src, keep, dst, guard.use_on(cuda_detail::stream_of(exec)));
}

template <tensor_like Pool, tensor_like Keep, tensor_like Lens>
void compact(const cuda_policy& exec, Pool&& pool, const block_table<device_space>& table,
             Keep&& keep, Lens&& keep_lens, cuda_index_guard& guard) {
  detail::compact_paged(exec, pool, table, keep, keep_lens,
                        guard.use_on(cuda_detail::stream_of(exec)));
}

// A layer's K and V, guarded: both pools checked before either moves (the host-side
// checks), then each pool's gather behind the same device check.
template <tensor_like KPool, tensor_like VPool, tensor_like Keep, tensor_like Lens>
void compact(const cuda_policy& exec, KPool&& k_pool, VPool&& v_pool,
             const block_table<device_space>& table, Keep&& keep, Lens&& keep_lens,
             cuda_index_guard& guard) {
  detail::compact_paged_kv(exec, k_pool, v_pool, table, keep, keep_lens,
                           guard.use_on(cuda_detail::stream_of(exec)));
}

}  // namespace cake
