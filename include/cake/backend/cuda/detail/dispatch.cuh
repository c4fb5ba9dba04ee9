// CUDA backend plumbing shared by every launcher: the stream of a cuda_policy,
// turning cudaError_t into cake::cuda_error naming the kernel, caller-provided
// workspaces (the CUB two-phase idiom) carved into aligned pieces, and the device's
// and kernels' attributes and occupancy, asked once per device (device_cache.hpp).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "../../../error.hpp"
#include "../../../execution.hpp"
#include "device_cache.hpp"

namespace cake {

// A caller-owned device buffer for the algorithms that need scratch memory.
// Query the size with the matching *_workspace_size function, allocate once,
// reuse across layers and steps: no allocation happens in the hot path.
// An empty workspace asks the launcher to allocate (stream-ordered, from the policy's pool).
struct cuda_workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

namespace cuda_detail {

inline cudaStream_t stream_of(const cuda_policy& exec) noexcept {
  return reinterpret_cast<cudaStream_t>(exec.stream);
}

// The current device's ordinal, or nullopt (and the runtime's error cleared, not to be
// blamed on the next kernel) when there is none.
inline std::optional<int> current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) return dev;
  (void)cudaGetLastError();
  return std::nullopt;
}

// One attribute of the current device, read once per device (device_cache.hpp), or
// nullopt when there is no device or the runtime cannot say.
template <cudaDeviceAttr Attr>
std::optional<int> device_attribute() {
  static per_device<int> memo;
  const std::optional<int> dev = current_device();
  if (!dev) return std::nullopt;
  return memo.get(*dev, [](int d) -> std::optional<int> {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, Attr, d) == cudaSuccess) return v;
    (void)cudaGetLastError();
    return std::nullopt;
  });
}

// Compute capability major of the current device (0 when it cannot be read): picks
// the paths that need sm_80 (bf16 tensor cores) or sm_90 (thread block clusters).
inline int device_compute_major() {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>().value_or(0);
}

// Dynamic shared memory one block may use on the current device: the opt-in maximum
// (227 KiB on H100/H200, 163 KiB on A100, 99 KiB on sm_86/89/120) less `reserve`
// bytes for the kernel's static shared memory, and at most `cap`. 48 KiB, which
// every device allows, when the device cannot be asked.
inline std::size_t shared_memory_budget(std::size_t cap, std::size_t reserve) {
  const auto avail = static_cast<std::size_t>(
      device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>().value_or(48 * 1024));
  return std::min(cap, avail > reserve ? avail - reserve : 0);
}

inline int multiprocessor_count() {
  return device_attribute<cudaDevAttrMultiProcessorCount>().value_or(1);
}

// Throws cake::cuda_error naming `where` (a kernel or runtime call) when code is an error.
inline void check(cudaError_t code, const char* where) {
  if (code == cudaSuccess) return;
  // A failed call also leaves the error as the thread's "last error": clear it, or the
  // next check_launch() would report it against an innocent kernel.
  (void)cudaGetLastError();
  throw cuda_error(where, static_cast<int>(code), cudaGetErrorString(code));
}

// After a launch: configuration errors (bad grid, too much shared memory) surface here,
// without synchronising the stream.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline constexpr std::size_t workspace_alignment = 256;

constexpr std::size_t align_up(std::size_t x, std::size_t a = workspace_alignment) {
  return (x + a - 1) / a * a;
}

// Hands out aligned sub-buffers of a workspace in a fixed order. Run once with a null
// base to measure (the size query) and once with the real buffer: both walk the same
// sequence, so the size and the layout cannot drift apart.
class workspace_carver {
 public:
  explicit workspace_carver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(std::size_t count) {
    const std::size_t at = offset_;
    offset_ = align_up(offset_ + count * sizeof(T));
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  std::size_t bytes() const noexcept { return offset_; }

 private:
  char* base_;
  std::size_t offset_ = 0;
};

// Stream-ordered allocation on the policy's stream, from its memory pool when it
// names one (cake::cuda.from(pool), or the pool a KvCache owns), else from the
// device's current pool.
inline void* allocate_async(const cuda_policy& exec, std::size_t bytes, const char* what) {
  void* p = nullptr;
  if (exec.pool != nullptr)
    check(
        cudaMallocFromPoolAsync(&p, bytes, static_cast<cudaMemPool_t>(exec.pool), stream_of(exec)),
        what);
  else
    check(cudaMallocAsync(&p, bytes, stream_of(exec)), what);
  return p;
}

// The workspace of one call: the caller's when large enough, otherwise a
// stream-ordered allocation freed (stream-ordered) when the call returns.
class scoped_workspace {
 public:
  scoped_workspace(cuda_workspace given, std::size_t need, const cuda_policy& exec,
                   const char* where)
      : stream_(stream_of(exec)) {
    if (need == 0) return;
    if (given.data != nullptr) {
      CAKE_EXPECTS(given.bytes >= need, "cake.cuda.workspace", where, ": workspace of ",
                   given.bytes, " bytes is too small, need ", need);
      CAKE_EXPECTS(reinterpret_cast<std::uintptr_t>(given.data) % workspace_alignment == 0,
                   "cake.cuda.workspace", where, ": workspace must be ", workspace_alignment,
                   "-byte aligned (cudaMalloc's alignment), got address ", given.data);
      ptr_ = given.data;
      return;
    }
    ptr_ = allocate_async(exec, need, "cudaMallocAsync (workspace)");
    owned_ = true;
  }
  ~scoped_workspace() {
    if (owned_) (void)cudaFreeAsync(ptr_, stream_);
  }
  scoped_workspace(const scoped_workspace&) = delete;
  scoped_workspace& operator=(const scoped_workspace&) = delete;
  void* get() const noexcept { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
  bool owned_ = false;
};

// A kernel as the runtime's C API takes it (what its C++ templates pass on), so that
// this file also compiles, and is tested, with a host compiler.
template <class Kernel>
const void* kernel_address(Kernel kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// A kernel's attributes on the current device (its cubin differs by architecture, so
// per device), read once. Only the fields fixed by the binary are meant (static shared
// memory, registers, PTX and binary versions): maxDynamicSharedSizeBytes is the value
// before any allow_shared_memory.
inline cudaFuncAttributes kernel_attributes(const void* kernel, const char* name) {
  const auto query = [&] {
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, kernel), name);
    return attr;
  };
  static per_key<kernel_key, cudaFuncAttributes> memo;
  const std::optional<int> dev = current_device();
  if (!dev) return query();  // throws, naming the kernel
  return memo.get(kernel_key{kernel, *dev}, query);
}

// Opt a kernel into more than 48 KiB of dynamic shared memory when it needs it.
// The 48 KiB default limit applies to static plus dynamic shared memory together.
// The raise itself is not memoised: cudaDeviceReset forgets it, and it costs no
// round trip to the device.
template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t bytes, const char* name) {
  const void* f = kernel_address(kernel);
  if (kernel_attributes(f, name).sharedSizeBytes + bytes > 48 * 1024)
    check(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes)),
          name);
}

// Blocks of `kernel` one SM holds at once with this block size and dynamic shared
// memory (at least 1), computed once per kernel, shape and device.
inline int resident_blocks(const void* kernel, int threads, std::size_t smem, const char* name) {
  const auto query = [&] {
    int n = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem), name);
    return std::max(n, 1);
  };
  static per_key<occupancy_key, int> memo;
  const std::optional<int> dev = current_device();
  if (!dev) return query();
  return memo.get(occupancy_key{kernel, threads, smem, *dev}, query);
}

template <class Kernel>
int resident_blocks(Kernel kernel, int threads, std::size_t smem, const char* name) {
  return resident_blocks(kernel_address(kernel), threads, smem, name);
}

inline unsigned grid_dim(std::int64_t work, std::int64_t per_block) {
  return static_cast<unsigned>((work + per_block - 1) / per_block);
}

}  // namespace cuda_detail
}  // namespace cake
