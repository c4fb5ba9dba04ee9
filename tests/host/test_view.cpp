// Views: make_view, as_view from a plain mdspan, the tensor_traits customisation
// point, and strided layouts giving the same window statistics as contiguous ones.
#include <doctest/doctest.h>

#include <cake/cake.hpp>

#include <array>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

using cake::index_t;

namespace view_test {

// A user tensor type: owns row-major (batch, heads, tokens, head_dim) floats.
struct MyTensor {
  std::vector<float> data;
  std::array<index_t, 4> shape{};
  MyTensor(std::array<index_t, 4> s)
      : data(static_cast<std::size_t>(s[0] * s[1] * s[2] * s[3])), shape(s) {}
};

struct MyOutput {
  std::vector<float> data;
  std::array<index_t, 3> shape{};
};

inline std::vector<float> random_floats(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

}  // namespace view_test

template <>
struct cake::tensor_traits<view_test::MyTensor> {
  static constexpr std::size_t rank = 4;
  static auto view(view_test::MyTensor& t) { return cake::make_view(t.data.data(), t.shape); }
};
template <>
struct cake::tensor_traits<view_test::MyOutput> {
  static constexpr std::size_t rank = 3;
  static auto view(view_test::MyOutput& t) { return cake::make_view(t.data.data(), t.shape); }
};

static_assert(!cake::tensor_like<int>);
static_assert(!cake::tensor_like<std::vector<float>>);
static_assert(cake::tensor_like<view_test::MyTensor>);
static_assert(cake::tensor_like<cake::host_view<float, 2>>);
static_assert(cake::tensor_like<cuda::std::mdspan<float, cuda::std::dextents<int, 2>>>);

TEST_CASE("make_view: row-major") {
  std::vector<float> buf(2 * 3 * 4);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  auto v = cake::make_view(buf.data(), std::array<index_t, 3>{2, 3, 4});
  static_assert(std::is_same_v<decltype(v), cake::host_view<float, 3>>);
  CHECK(v.extent(0) == 2);
  CHECK(v.extent(1) == 3);
  CHECK(v.extent(2) == 4);
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(1) == 4);
  CHECK(v.stride(2) == 1);
  for (index_t a = 0; a < 2; ++a)
    for (index_t b = 0; b < 3; ++b)
      for (index_t c = 0; c < 4; ++c) CHECK(v(a, b, c) == static_cast<float>(a * 12 + b * 4 + c));
  CHECK(cake::inner_contiguous(v));
  CHECK(cake::shape_of(v) == std::array<index_t, 3>{2, 3, 4});
}

TEST_CASE("make_view: explicit strides") {
  // (B=2, S=3, H=4) memory seen as (B, H, S).
  std::vector<float> buf(2 * 3 * 4);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  auto v = cake::make_view(buf.data(), std::array<index_t, 3>{2, 4, 3},
                           std::array<index_t, 3>{12, 1, 4});
  CHECK(v.stride(0) == 12);
  CHECK(v.stride(1) == 1);
  CHECK(v.stride(2) == 4);
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 4; ++h)
      for (index_t s = 0; s < 3; ++s)
        CHECK(v(b, h, s) == buf[static_cast<std::size_t>(b * 12 + s * 4 + h)]);
  CHECK(!cake::inner_contiguous(v));  // innermost (S) stride is 4
  auto dv = cake::make_view<cake::device_space>(buf.data(), std::array<index_t, 1>{24});
  static_assert(std::is_same_v<cake::memory_space_of<decltype(dv)>, cake::device_space>);
}

TEST_CASE("as_view: plain mdspan with layout_right and the default accessor") {
  std::vector<float> buf(2 * 3 * 5);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i) * 0.5f;
  cuda::std::mdspan<float, cuda::std::dextents<int, 3>> m(buf.data(), 2, 3, 5);
  auto v = cake::as_view(m);
  static_assert(std::is_same_v<decltype(v), cake::host_view<float, 3>>);
  static_assert(std::is_same_v<cake::memory_space_of<decltype(v)>, cake::host_space>);
  CHECK(v.data_handle() == buf.data());
  CHECK(v.extent(0) == 2);
  CHECK(v.extent(1) == 3);
  CHECK(v.extent(2) == 5);
  CHECK(v.stride(0) == 15);
  CHECK(v.stride(1) == 5);
  CHECK(v.stride(2) == 1);
  CHECK(v(1, 2, 3) == m(1, 2, 3));

  // Static extents and const elements work too.
  cuda::std::mdspan<const float, cuda::std::extents<std::size_t, 3, 10>> ms(buf.data());
  auto vs = cake::as_view(ms);
  static_assert(std::is_same_v<decltype(vs), cake::host_view<const float, 2>>);
  CHECK(vs.stride(0) == 10);
  CHECK(vs.stride(1) == 1);
  CHECK(vs(2, 7) == buf[27]);
}

TEST_CASE("tensor_traits: a user tensor type works in window_stats") {
  const index_t B = 1, H = 2, Hkv = 1, w = 4, S = 40, d = 8;
  view_test::MyTensor q({B, H, w, d}), k({B, Hkv, S, d});
  q.data = view_test::random_floats(q.data.size(), 1);
  k.data = view_test::random_floats(k.data.size(), 2);
  view_test::MyOutput ind{std::vector<float>(static_cast<std::size_t>(B * Hkv * (S - w))),
                          {B, Hkv, S - w}};
  std::array<float, 2> st{};
  cake::MeanVarianceIndicator mv{};
  cake::window_stats(cake::host, q, k, mv, ind,
                     cake::make_view(st.data(), std::array<index_t, 1>{2}));

  // Same call through plain views.
  std::vector<float> ind2(ind.data.size());
  std::array<float, 2> st2{};
  cake::window_stats(cake::host, cake::make_view(q.data.data(), q.shape),
                     cake::make_view(k.data.data(), k.shape), mv,
                     cake::make_view(ind2.data(), std::array<index_t, 3>{B, Hkv, S - w}),
                     cake::make_view(st2.data(), std::array<index_t, 1>{2}));
  CHECK(std::memcmp(ind.data.data(), ind2.data(), ind2.size() * sizeof(float)) == 0);
  CHECK(st[0] == st2[0]);
  CHECK(st[1] == st2[1]);
  CHECK(st[0] > 0.0f);
  CHECK(st[1] > 0.0f);
  bool any_nonzero = false;
  for (float x : ind.data) any_nonzero |= x != 0.0f;
  CHECK(any_nonzero);
}

TEST_CASE("strided keys: [B,S,Hkv,d] seen as (B,Hkv,S,d) is bit-identical to the copy") {
  const index_t B = 2, H = 4, Hkv = 2, w = 6, S = 70, d = 16;
  auto q = view_test::random_floats(static_cast<std::size_t>(B * H * w * d), 3);
  auto k_bhsd = view_test::random_floats(static_cast<std::size_t>(B * Hkv * S * d), 4);
  std::vector<float> k_bshd(k_bhsd.size());
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < Hkv; ++g)
      for (index_t s = 0; s < S; ++s)
        for (index_t x = 0; x < d; ++x)
          k_bshd[static_cast<std::size_t>(((b * S + s) * Hkv + g) * d + x)] =
              k_bhsd[static_cast<std::size_t>(((b * Hkv + g) * S + s) * d + x)];
  auto qv =
      cake::make_view(static_cast<const float*>(q.data()), std::array<index_t, 4>{B, H, w, d});
  auto kc = cake::make_view(static_cast<const float*>(k_bhsd.data()),
                            std::array<index_t, 4>{B, Hkv, S, d});
  auto ks = cake::make_view(static_cast<const float*>(k_bshd.data()),
                            std::array<index_t, 4>{B, Hkv, S, d},
                            std::array<index_t, 4>{S * Hkv * d, d, Hkv * d, 1});
  for (index_t b = 0; b < B; ++b) CHECK(ks(b, 1, 33, 5) == kc(b, 1, 33, 5));

  std::vector<float> i1(static_cast<std::size_t>(B * Hkv * (S - w))), i2(i1.size());
  std::array<float, 2> s1{}, s2{};
  cake::MeanVarianceIndicator mv{};
  cake::window_stats(cake::host, qv, kc, mv,
                     cake::make_view(i1.data(), std::array<index_t, 3>{B, Hkv, S - w}),
                     cake::make_view(s1.data(), std::array<index_t, 1>{2}));
  cake::window_stats(cake::host, qv, ks, mv,
                     cake::make_view(i2.data(), std::array<index_t, 3>{B, Hkv, S - w}),
                     cake::make_view(s2.data(), std::array<index_t, 1>{2}));
  CHECK(std::memcmp(i1.data(), i2.data(), i1.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(s1.data(), s2.data(), sizeof(s1)) == 0);
  CHECK(s1[0] > 0.0f);
}
