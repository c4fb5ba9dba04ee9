// cake: the one customisation point through which a backend's own tensor type
// becomes a cake view.
//
// Specialise cake::tensor_traits<YourTensor> with
//   static constexpr std::size_t rank = R;            // optional, checked
//   static auto view(YourTensor& t);                  // -> cake::view<T, R, Space>
// (a const overload for const tensors). Views (mdspan) themselves need no adapter;
// an mdspan with the default accessor is taken to live in host memory.
#pragma once

#include <type_traits>

#include "view.hpp"

namespace cake {

template <class Tensor, class Enable = void>
struct tensor_traits;  // intentionally undefined: specialise it for your tensor type

namespace detail {
template <class T>
struct is_mdspan : std::false_type {};
template <class T, class E, class L, class A>
struct is_mdspan<cuda::std::mdspan<T, E, L, A>> : std::true_type {};

template <class A>
struct accessor_space {
  using type = host_space;  // default_accessor and other plain accessors
};
template <class T, class S>
struct accessor_space<space_accessor<T, S>> {
  using type = S;
};

template <class T, class = void>
struct has_tensor_traits : std::false_type {};
template <class T>
struct has_tensor_traits<T, std::void_t<decltype(tensor_traits<T>::view(std::declval<T&>()))>>
    : std::true_type {};
}  // namespace detail

// Anything cake can read as a tensor: an mdspan, or a type with a tensor_traits adapter.
template <class T>
concept tensor_like = detail::is_mdspan<std::remove_cvref_t<T>>::value ||
    detail::has_tensor_traits<std::remove_cvref_t<T>>::value;

// Converts an mdspan or an adapted tensor to the canonical cake::view.
template <class X>
auto as_view(X&& x) {
  using D = std::remove_cvref_t<X>;
  if constexpr (detail::is_mdspan<D>::value) {
    using S = typename detail::accessor_space<typename D::accessor_type>::type;
    constexpr std::size_t R = D::rank();
    std::array<index_t, R> ext{}, str{};
    for (std::size_t r = 0; r < R; ++r) {
      ext[r] = static_cast<index_t>(x.extent(r));
      str[r] = static_cast<index_t>(x.stride(r));
    }
    return make_view<S>(x.data_handle(), ext, str);
  } else {
    static_assert(detail::has_tensor_traits<D>::value,
                  "cake: this type is not a tensor cake can read. Pass a cuda::std::mdspan, or "
                  "specialise cake::tensor_traits<YourTensor> with a static view() returning a "
                  "cake::view (see examples/own_tensor.cpp).");
    return tensor_traits<D>::view(x);
  }
}

}  // namespace cake
