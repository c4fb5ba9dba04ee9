// cake: tensor views. Every tensor crosses the API as a cuda::std::mdspan with a
// strided layout and an accessor that names the memory space it lives in, so
// that [B,H,S,d] and [B,S,H,d] buffers are both accepted without copies and a
// host view handed to the CUDA backend is a compile error rather than a crash.
#pragma once

#include <cuda/std/mdspan>

#include <array>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"

namespace cake {

// Memory spaces. A backend states which one it reads.
struct host_space {
  static constexpr const char* name = "host";
};
struct device_space {
  static constexpr const char* name = "device";
};

// Plain pointer access (like default_accessor) tagged with a memory space.
template <class T, class Space>
struct space_accessor {
  using offset_policy = space_accessor;
  using element_type = T;
  using reference = T&;
  using data_handle_type = T*;
  using memory_space = Space;

  constexpr space_accessor() noexcept = default;
  // const-adding conversion, as default_accessor has.
  template <class U, std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>, int> = 0>
  CAKE_HOST_DEVICE constexpr space_accessor(space_accessor<U, Space>) noexcept {}

  CAKE_HOST_DEVICE constexpr reference access(data_handle_type p, std::size_t i) const noexcept {
    return p[i];
  }
  CAKE_HOST_DEVICE constexpr data_handle_type offset(data_handle_type p,
                                                     std::size_t i) const noexcept {
    return p + i;
  }
};

template <std::size_t Rank>
using extents = cuda::std::dextents<index_t, Rank>;
using layout = cuda::std::layout_stride;

// The one view type of the library: rank-R strided tensor of T in memory space Space.
template <class T, std::size_t Rank, class Space = host_space>
using view = cuda::std::mdspan<T, extents<Rank>, layout, space_accessor<T, Space>>;

template <class T, std::size_t Rank>
using host_view = view<T, Rank, host_space>;
template <class T, std::size_t Rank>
using device_view = view<T, Rank, device_space>;

template <class V>
using memory_space_of = typename V::accessor_type::memory_space;

// Row-major strides for the given extents. A zero extent counts as 1, so that an
// empty tensor still has the positive strides layout_stride requires.
template <std::size_t Rank>
constexpr std::array<index_t, Rank> row_major_strides(const std::array<index_t, Rank>& ext) {
  std::array<index_t, Rank> s{};
  index_t acc = 1;
  for (std::size_t r = Rank; r-- > 0;) {
    s[r] = acc;
    acc *= ext[r] > 1 ? ext[r] : 1;
  }
  return s;
}

namespace detail {
template <std::size_t Rank>
cuda::std::array<index_t, Rank> to_cuda_array(const std::array<index_t, Rank>& a) {
  cuda::std::array<index_t, Rank> out{};
  for (std::size_t r = 0; r < Rank; ++r) out[r] = a[r];
  return out;
}
}  // namespace detail

// A view of contiguous row-major memory.
template <class Space = host_space, class T, std::size_t Rank>
view<T, Rank, Space> make_view(T* data, const std::array<index_t, Rank>& ext) {
  using map = typename layout::template mapping<extents<Rank>>;
  return view<T, Rank, Space>(data, map(extents<Rank>(detail::to_cuda_array(ext)),
                                        detail::to_cuda_array(row_major_strides(ext))));
}

// A view with explicit strides (in elements), e.g. [B,S,H,d] memory seen as (B,H,S,d).
template <class Space = host_space, class T, std::size_t Rank>
view<T, Rank, Space> make_view(T* data, const std::array<index_t, Rank>& ext,
                               const std::array<index_t, Rank>& strides) {
  using map = typename layout::template mapping<extents<Rank>>;
  return view<T, Rank, Space>(
      data, map(extents<Rank>(detail::to_cuda_array(ext)), detail::to_cuda_array(strides)));
}

// The extents of a view as an array, for messages and comparisons.
template <class V>
std::array<index_t, V::rank()> shape_of(const V& v) {
  std::array<index_t, V::rank()> s{};
  for (std::size_t r = 0; r < V::rank(); ++r) s[r] = static_cast<index_t>(v.extent(r));
  return s;
}

// True when the innermost extent is contiguous (stride 1 or extent <= 1):
// the hot loops read rows of head_dim elements with unit stride.
template <class V>
constexpr bool inner_contiguous(const V& v) {
  return v.extent(V::rank() - 1) <= 1 || v.stride(V::rank() - 1) == 1;
}

}  // namespace cake
