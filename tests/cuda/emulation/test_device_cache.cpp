// The CUDA launchers' device-attribute, kernel-attribute and occupancy memos
// (detail/device_cache.hpp, detail/dispatch.cuh) on the host: the runtime calls they
// make are faked here with counters, so the tests see how often the device is asked,
// what a machine without a device gets, and that a failed read is not remembered.
#include <cake/backend/cuda/detail/dispatch.cuh>

#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// A fake machine: the current device (-1: none) and, per device, its attributes.
struct fake_device {
  int major, optin, sms;
  bool fails = false;  // cudaDeviceGetAttribute answers an error
};
std::array<fake_device, 3> devices{{{9, 232448, 132}, {8, 166912, 108}, {12, 101376, 84}}};
int current = -1;
int get_device_calls = 0;
std::array<int, 3> attribute_calls{};  // per device
int last_error_clears = 0;

}  // namespace

// The runtime entry points dispatch.cuh's attribute reads use; nothing else in this
// binary links the CUDA runtime.
extern "C" cudaError_t cudaGetDevice(int* device) {
  ++get_device_calls;
  if (current < 0) return cudaErrorNoDevice;
  *device = current;
  return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  ++attribute_calls.at(static_cast<std::size_t>(device));
  const fake_device& d = devices.at(static_cast<std::size_t>(device));
  if (d.fails) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = d.major;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = d.sms;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t cudaGetLastError() {
  ++last_error_clears;
  return cudaSuccess;
}

extern "C" const char* cudaGetErrorString(cudaError_t) { return "fake error"; }

// Two kernels (any function's address serves): kernel_a with 1 KiB of static shared
// memory, kernel_b with 20 KiB.
namespace {
void kernel_a(int) {}
void kernel_b(int) {}
int func_attribute_calls = 0, set_attribute_calls = 0, last_set_bytes = 0, occupancy_calls = 0;
bool occupancy_fails = false;
}  // namespace

extern "C" cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  ++func_attribute_calls;
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = func == reinterpret_cast<const void*>(&kernel_b) ? 20 * 1024 : 1024;
  return cudaSuccess;
}

extern "C" cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  ++set_attribute_calls;
  last_set_bytes = value;
  return cudaSuccess;
}

// Device 0 holds 2 blocks, device 1 holds 3; none with more than 64 KiB of dynamic
// shared memory.
extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int,
                                                                     std::size_t smem) {
  ++occupancy_calls;
  if (occupancy_fails) return cudaErrorInvalidDeviceFunction;
  *blocks = smem > 64 * 1024 ? 0 : 2 + current;
  return cudaSuccess;
}

namespace cd = cake::cuda_detail;

namespace {

struct reads {
  int major;
  std::size_t budget;
  int sms;
};

reads read_all() {
  return {cd::device_compute_major(), cd::shared_memory_budget(std::size_t{1} << 20, 4096),
          cd::multiprocessor_count()};
}

}  // namespace

TEST_CASE("cuda dispatch: device attributes are read once per device, the fallbacks when none") {
  // No device: the fallbacks, the runtime's error cleared each time, nothing remembered.
  current = -1;
  const reads none = read_all();
  CHECK(none.major == 0);
  CHECK(none.budget == 48 * 1024 - 4096);
  CHECK(none.sms == 1);
  CHECK(get_device_calls == 3);
  CHECK(last_error_clears == 3);
  CHECK(attribute_calls == std::array<int, 3>{0, 0, 0});

  // Device 0: its values, one runtime read per attribute however often asked.
  current = 0;
  for (int i = 0; i < 5; ++i) {
    const reads r = read_all();
    CHECK(r.major == 9);
    CHECK(r.budget == 232448 - 4096);
    CHECK(r.sms == 132);
  }
  CHECK(attribute_calls == std::array<int, 3>{3, 0, 0});
  CHECK(cd::shared_memory_budget(64 * 1024, 0) == 64 * 1024);  // the cap, from the memo
  CHECK(cd::shared_memory_budget(1 << 20, 300000) == 0);       // reserve over the budget
  CHECK(attribute_calls == std::array<int, 3>{3, 0, 0});

  // Device 1 has its own entries; going back to device 0 asks nothing again.
  current = 1;
  for (int i = 0; i < 3; ++i) {
    const reads r = read_all();
    CHECK(r.major == 8);
    CHECK(r.budget == 166912 - 4096);
    CHECK(r.sms == 108);
  }
  current = 0;
  CHECK(read_all().sms == 132);
  CHECK(attribute_calls == std::array<int, 3>{3, 3, 0});

  // Device 2 fails to answer: the fallbacks, asked again next time, remembered once it answers.
  current = 2;
  devices[2].fails = true;
  const int clears = last_error_clears;
  for (int i = 0; i < 2; ++i) {
    const reads r = read_all();
    CHECK(r.major == 0);
    CHECK(r.budget == 48 * 1024 - 4096);
    CHECK(r.sms == 1);
  }
  CHECK(attribute_calls[2] == 6);
  CHECK(last_error_clears == clears + 6);
  devices[2].fails = false;
  for (int i = 0; i < 2; ++i) {
    const reads r = read_all();
    CHECK(r.major == 12);
    CHECK(r.budget == 101376 - 4096);
    CHECK(r.sms == 84);
  }
  CHECK(attribute_calls[2] == 9);
  current = -1;
}

TEST_CASE("cuda dispatch: occupancy is read once per (kernel, block, shared memory, device)") {
  const int calls = occupancy_calls;
  current = 0;
  for (int i = 0; i < 3; ++i) CHECK(cd::resident_blocks(&kernel_a, 256, 1024, "kernel_a") == 2);
  CHECK(occupancy_calls == calls + 1);
  CHECK(cd::resident_blocks(&kernel_a, 128, 1024, "kernel_a") == 2);        // another block size
  CHECK(cd::resident_blocks(&kernel_a, 256, 100 * 1024, "kernel_a") == 1);  // 0 reads as 1
  CHECK(cd::resident_blocks(&kernel_b, 256, 1024, "kernel_b") == 2);        // another kernel
  CHECK(occupancy_calls == calls + 4);
  current = 1;
  CHECK(cd::resident_blocks(&kernel_a, 256, 1024, "kernel_a") == 3);  // another device
  current = 0;
  CHECK(cd::resident_blocks(&kernel_a, 256, 1024, "kernel_a") == 2);
  CHECK(occupancy_calls == calls + 5);

  // A failed query throws naming the kernel and is not remembered.
  occupancy_fails = true;
  std::string what;
  try {
    cd::resident_blocks(&kernel_a, 64, 0, "kernel_a");
  } catch (const cake::cuda_error& e) {
    what = e.what();
  }
  CHECK(what.find("kernel_a: fake error") != std::string::npos);
  occupancy_fails = false;
  CHECK(cd::resident_blocks(&kernel_a, 64, 0, "kernel_a") == 2);
  CHECK(cd::resident_blocks(&kernel_a, 64, 0, "kernel_a") == 2);
  CHECK(occupancy_calls == calls + 7);

  // No device: asked every time.
  current = -1;
  cd::resident_blocks(&kernel_a, 256, 1024, "kernel_a");
  cd::resident_blocks(&kernel_a, 256, 1024, "kernel_a");
  CHECK(occupancy_calls == calls + 9);
}

TEST_CASE(
    "cuda dispatch: a kernel's static shared memory is read once per device, the raise every "
    "time") {
  const int reads = func_attribute_calls, raises = set_attribute_calls;
  current = 0;
  cd::allow_shared_memory(&kernel_a, 40 * 1024, "kernel_a");  // 1 + 40 KiB fit in 48 KiB
  CHECK(set_attribute_calls == raises);
  CHECK(func_attribute_calls == reads + 1);
  cd::allow_shared_memory(&kernel_b, 40 * 1024, "kernel_b");  // 20 + 40 KiB do not
  CHECK(set_attribute_calls == raises + 1);
  CHECK(last_set_bytes == 40 * 1024);
  cd::allow_shared_memory(&kernel_b, 40 * 1024, "kernel_b");
  cd::allow_shared_memory(&kernel_a, 60 * 1024, "kernel_a");
  CHECK(set_attribute_calls == raises + 3);  // not memoised: a device reset forgets it
  CHECK(last_set_bytes == 60 * 1024);
  CHECK(func_attribute_calls == reads + 2);  // one read per kernel on device 0
  CHECK(cd::kernel_attributes(cd::kernel_address(&kernel_b), "kernel_b").sharedSizeBytes ==
        20 * 1024);
  CHECK(func_attribute_calls == reads + 2);
  current = 1;
  cd::allow_shared_memory(&kernel_a, 40 * 1024, "kernel_a");
  CHECK(func_attribute_calls == reads + 3);  // device 1 has its own entry
  current = -1;
}

TEST_CASE("cuda dispatch: per_device fills a slot once under concurrent first calls") {
  cd::per_device<int> memo;
  std::atomic<int> queries{0};
  const auto query = [&](int d) -> std::optional<int> {
    queries.fetch_add(1);
    std::this_thread::yield();  // widen the window in which a second filler could enter
    return 100 + d;
  };
  std::vector<std::thread> threads;
  std::array<std::atomic<int>, 8> seen{};
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] { seen[static_cast<std::size_t>(t)] = *memo.get(t % 2, query); });
  for (auto& th : threads) th.join();
  CHECK(queries.load() == 2);  // one per device
  for (int t = 0; t < 8; ++t) CHECK(seen[static_cast<std::size_t>(t)].load() == 100 + t % 2);

  // Ordinals outside the table are answered, not remembered.
  CHECK(memo.get(-1, query) == 99);
  CHECK(memo.get(cd::per_device<int>::max_devices, query) ==
        100 + cd::per_device<int>::max_devices);
  CHECK(memo.get(-1, query) == 99);
  CHECK(queries.load() == 5);
}

TEST_CASE("cuda dispatch: per_key computes once per key, and not at all after a throw") {
  cd::per_key<cd::occupancy_key, int> memo;
  int a = 0, b = 0;  // two kernels' addresses
  int queries = 0;
  const auto key = [](const void* k, int threads, std::size_t smem, int dev) {
    return cd::occupancy_key{k, threads, smem, dev};
  };
  for (int i = 0; i < 3; ++i) {
    CHECK(memo.get(key(&a, 256, 0, 0), [&] { return ++queries, 4; }) == 4);
    CHECK(memo.get(key(&a, 256, 1024, 0), [&] { return ++queries, 3; }) == 3);
    CHECK(memo.get(key(&a, 256, 0, 1), [&] { return ++queries, 2; }) == 2);
    CHECK(memo.get(key(&b, 256, 0, 0), [&] { return ++queries, 1; }) == 1);
  }
  CHECK(queries == 4);

  const auto failing = [&]() -> int {
    ++queries;
    throw std::runtime_error("occupancy");
  };
  CHECK_THROWS_AS(memo.get(key(&b, 128, 0, 0), failing), std::runtime_error);
  CHECK(memo.get(key(&b, 128, 0, 0), [&] { return ++queries, 7; }) == 7);
  CHECK(memo.get(key(&b, 128, 0, 0), [&] { return ++queries, 8; }) == 7);
  CHECK(queries == 6);
}
