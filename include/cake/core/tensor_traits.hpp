// cake: the one customisation point through which a backend's own tensor type
// becomes a cake view.
//
// Specialise cake::tensor_traits<YourTensor> with
//   static constexpr std::size_t rank = R;            // optional, checked
//   static auto view(YourTensor& t);                  // -> cake::view<T, R, Space>
// or `view(const YourTensor& t)` (then const tensors are read too; a view of
// const T can only be read, so outputs need an adapter returning views of T).
// Either or both overloads are found. Views (mdspan) themselves need no adapter;
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

// An adapter reached with an lvalue of T as the caller holds it (T may be const):
// view(T&) or view(const T&), whichever overload resolution picks.
template <class T, class = void>
struct has_tensor_traits : std::false_type {};
template <class T>
struct has_tensor_traits<
    T, std::void_t<decltype(tensor_traits<std::remove_const_t<T>>::view(std::declval<T&>()))>>
    : std::true_type {};

// The rank the adapter declares, or no_rank when it declares none.
inline constexpr std::size_t no_rank = static_cast<std::size_t>(-1);
template <class Traits, class = void>
struct declared_rank : std::integral_constant<std::size_t, no_rank> {};
template <class Traits>
struct declared_rank<Traits, std::void_t<decltype(Traits::rank)>>
    : std::integral_constant<std::size_t, static_cast<std::size_t>(Traits::rank)> {};
}  // namespace detail

// Anything cake can read as a tensor: an mdspan, or a type with a tensor_traits
// adapter that takes it as the caller holds it (const or not).
template <class T>
concept tensor_like = detail::is_mdspan<std::remove_cvref_t<T>>::value ||
    detail::has_tensor_traits<std::remove_reference_t<T>>::value;

// Converts an mdspan or an adapted tensor to the canonical cake::view. Callers
// convert each argument once: an adapter may do work (check a dtype, build strides).
template <class X>
auto as_view(X&& x) {
  using D = std::remove_cvref_t<X>;
  using Held = std::remove_reference_t<X>;  // D, or const D
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
    static_assert(detail::has_tensor_traits<Held>::value,
                  "cake: this type is not a tensor cake can read. Pass a cuda::std::mdspan, or "
                  "specialise cake::tensor_traits<YourTensor> with a static view(YourTensor&) or "
                  "view(const YourTensor&) returning a cake::view (see examples/own_tensor.cpp); "
                  "a const tensor needs the const overload.");
    using Traits = tensor_traits<D>;
    using Out = decltype(Traits::view(static_cast<Held&>(x)));
    static_assert(detail::is_mdspan<std::remove_cvref_t<Out>>::value,
                  "cake::tensor_traits<YourTensor>::view must return a cake::view (an mdspan)");
    static_assert(detail::declared_rank<Traits>::value == detail::no_rank ||
                      detail::declared_rank<Traits>::value == std::remove_cvref_t<Out>::rank(),
                  "cake::tensor_traits<YourTensor>::rank differs from the rank of the view its "
                  "view() returns");
    return Traits::view(static_cast<Held&>(x));
  }
}

}  // namespace cake
