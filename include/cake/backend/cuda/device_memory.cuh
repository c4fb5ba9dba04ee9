// Device memory of the CUDA KvCache: a move-only, stream-ordered allocation and the
// memory pool a cache owns when the engine names none.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "detail/dispatch.cuh"

namespace cake::cuda_detail {

// A stream-ordered device allocation owned by one object (move-only), from the
// policy's memory pool.
template <class U>
class device_buffer {
 public:
  device_buffer() = default;
  device_buffer(index_t n, const cuda_policy& exec) : n_(n), stream_(stream_of(exec)) {
    if (n > 0)
      p_ = static_cast<U*>(allocate_async(exec, static_cast<std::size_t>(n) * sizeof(U),
                                          "cudaMallocAsync (KvCache layer)"));
  }
  device_buffer(device_buffer&& o) noexcept { swap(o); }
  device_buffer& operator=(device_buffer&& o) noexcept {
    device_buffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (p_) (void)cudaFreeAsync(p_, stream_);
  }
  U* data() const noexcept { return p_; }
  index_t size() const noexcept { return n_; }
  void swap(device_buffer& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(stream_, o.stream_);
  }

 private:
  U* p_ = nullptr;
  index_t n_ = 0;
  cudaStream_t stream_ = nullptr;
};

// The memory pool a KvCache allocates from when the engine names none: its layers
// and every prefill's and decoding step's scratch. Freed memory stays reserved
// (release threshold: unlimited), so the per-layer host syncs of a prefill do not
// hand it back to the driver only for the next layer to map it again; after the
// last layer's prefill the pool is trimmed to what the layers hold. Move-only;
// destroyed with the cache (the driver frees it once the stream-ordered frees of
// the cache's buffers have run).
class cache_pool {
 public:
  cache_pool() = default;
  cache_pool(cache_pool&& o) noexcept : pool_(std::exchange(o.pool_, nullptr)) {}
  cache_pool& operator=(cache_pool&& o) noexcept {
    std::swap(pool_, o.pool_);
    return *this;
  }
  cache_pool(const cache_pool&) = delete;
  cache_pool& operator=(const cache_pool&) = delete;
  ~cache_pool() {
    if (pool_) (void)cudaMemPoolDestroy(pool_);
  }

  // The policy the cache runs with: the engine's pool when it names one, else ours.
  cuda_policy adopt(const cuda_policy& exec) {
    if (exec.pool != nullptr) return exec;
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice (KvCache memory pool)");
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    check(cudaMemPoolCreate(&pool_, &props), "cudaMemPoolCreate (KvCache memory pool)");
    std::uint64_t keep = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep),
          "cudaMemPoolSetAttribute (KvCache memory pool)");
    return exec.from(pool_);
  }
  // The policy of one call: the pool is named once, in adopt().
  cuda_policy bind(const cuda_policy& exec) const noexcept { return exec; }
  // Hands back the prefill's scratch (only memory no live allocation uses). Called
  // after the prefill committed: a failure here loses nothing, so it is not reported.
  void after_prefill() noexcept {
    if (pool_) (void)cudaMemPoolTrimTo(pool_, 0);
  }

 private:
  cudaMemPool_t pool_ = nullptr;
};

}  // namespace cake::cuda_detail
