// Memos for what the CUDA runtime answers the same way for the life of the process:
// a device's attributes, a kernel's occupancy and static shared memory. The launchers
// asked on every call; a query is a driver round trip, a lookup here is a load (per
// device) or a short lock (per kernel). Plain C++ over a query callable, so the host
// compiler can test the caching with a counting fake (tests/cuda/emulation).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace cake::cuda_detail {

// One value per device ordinal, filled by the first successful query and read
// lock-free afterwards. A failed query (nullopt) is not remembered: the caller
// falls back for that call and the next call asks again. Ordinals past the table
// (more than max_devices GPUs) are asked every time rather than refused.
template <class T>
class per_device {
 public:
  static constexpr int max_devices = 64;

  template <class Query>  // std::optional<T>(int device)
  std::optional<T> get(int device, Query&& query) {
    if (device < 0 || device >= max_devices) return query(device);
    slot& s = slots_[static_cast<std::size_t>(device)];
    if (s.ready.load(std::memory_order_acquire)) return s.value;
    const std::lock_guard lock(fill_);
    if (s.ready.load(std::memory_order_relaxed)) return s.value;
    std::optional<T> v = query(device);
    if (v) {
      s.value = *v;
      s.ready.store(true, std::memory_order_release);
    }
    return v;
  }

 private:
  struct slot {
    std::atomic<bool> ready{false};
    T value{};
  };
  std::array<slot, max_devices> slots_{};
  std::mutex fill_;  // one filler at a time, so a slot is written once
};

// One value per key (a kernel, its launch shape and the device), for answers that
// depend on the kernel: the set of keys is the launchers' kernels and shapes, small
// and fixed, so the map does not grow with the number of calls.
template <class Key, class T>
class per_key {
 public:
  // The value for `key`, computed by query() on the first call (a throwing query
  // leaves nothing behind: the next call asks again).
  template <class Query>  // T()
  T get(const Key& key, Query&& query) {
    const std::lock_guard lock(mutex_);
    if (auto it = values_.find(key); it != values_.end()) return it->second;
    T v = query();
    values_.emplace(key, v);
    return v;
  }

 private:
  std::map<Key, T> values_;
  std::mutex mutex_;
};

// Occupancy of one kernel: (kernel, threads per block, dynamic shared memory, device).
using occupancy_key = std::tuple<const void*, int, std::size_t, int>;
// One kernel on one device: (kernel, device).
using kernel_key = std::tuple<const void*, int>;

}  // namespace cake::cuda_detail
