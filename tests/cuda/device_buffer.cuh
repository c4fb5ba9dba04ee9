// What the CUDA tests (test_cuda.cu, test_cuda_kv_cache.cu, test_cuda_paged.cu) share:
// device memory freed at scope exit, and host copies of device or strided views.
#pragma once

#include <doctest/doctest.h>

#include <cake/cake.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace cake_cuda_test {

using cake::index_t;

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) FAIL(what << ": " << cudaGetErrorString(e));
}

// Device memory for a test, freed at scope exit.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    cuda_ok(cudaMalloc(&ptr_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(h.size()) { upload(h); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& h) {
    cuda_ok(cudaMemcpy(ptr_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    cuda_ok(cudaDeviceSynchronize(), "kernel");
    cuda_ok(cudaMemcpy(h.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
  T* get() const { return ptr_; }
  template <std::size_t R>
  cake::device_view<T, R> view(const std::array<index_t, R>& ext) const {
    return cake::make_view<cake::device_space>(ptr_, ext);
  }
  template <std::size_t R>
  cake::device_view<const T, R> const_view(const std::array<index_t, R>& ext) const {
    return cake::make_view<cake::device_space>(static_cast<const T*>(ptr_), ext);
  }

 private:
  T* ptr_ = nullptr;
  std::size_t n_;
};

// Elements converted one by one (float to a 16-bit type and back, for instance).
template <class To, class From>
std::vector<To> convert(const std::vector<From>& v) {
  std::vector<To> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = static_cast<To>(v[i]);
  return o;
}

// A strided view's elements in row-major order: copy_row(dst, src, n) copies each
// innermost row of n elements (a host copy, or a device-to-host memcpy).
template <class V, class CopyRow>
auto dense_copy(const V& v, CopyRow copy_row) {
  using T = std::remove_const_t<typename V::element_type>;
  constexpr std::size_t R = V::rank();
  std::size_t total = 1;
  for (std::size_t r = 0; r < R; ++r) total *= static_cast<std::size_t>(v.extent(r));
  std::vector<T> out(total);
  if (total == 0) return out;
  const auto inner = static_cast<std::size_t>(v.extent(R - 1));
  for (std::size_t o = 0; o < total / inner; ++o) {
    std::array<index_t, R> idx{};
    std::size_t rem = o;
    for (std::size_t r = R - 1; r-- > 0;) {
      idx[r] = static_cast<index_t>(rem % static_cast<std::size_t>(v.extent(r)));
      rem /= static_cast<std::size_t>(v.extent(r));
    }
    copy_row(out.data() + o * inner, cake::detail::element_ptr(v, idx), inner);
  }
  return out;
}

// A strided device view copied to a dense host vector (after the device finished).
template <class V>
auto download(const V& v) {
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return dense_copy(v, [](auto* dst, const auto* src, std::size_t n) {
    REQUIRE(cudaMemcpy(dst, src, n * sizeof(*dst), cudaMemcpyDeviceToHost) == cudaSuccess);
  });
}

// A strided host view copied to a dense vector.
template <class V>
auto flatten(const V& v) {
  return dense_copy(
      v, [](auto* dst, const auto* src, std::size_t n) { std::copy(src, src + n, dst); });
}

}  // namespace cake_cuda_test
