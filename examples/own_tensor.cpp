// Plugging in your own tensor type: specialise cake::tensor_traits once and pass
// your tensors straight to the cache and the algorithms.
//
// MyTensor is a stand-in for an engine's tensor: a pointer, a runtime dtype, a
// shape and strides in [B, S, H, d] memory order (token-major, as many engines
// store K/V). The adapter presents it as the (B, H, S, d) view cake reads,
// without copying, and rejects a dtype cake cannot read with a clear error.
#include <cake/cake.hpp>

#include <cstdio>
#include <random>
#include <vector>

enum class DType { f32, f16 };

struct MyTensor {
  void* data;
  DType dtype;
  std::array<cake::index_t, 4> shape;    // logical (batch, heads, tokens, head_dim)
  std::array<cake::index_t, 4> strides;  // in elements
};

template <>
struct cake::tensor_traits<MyTensor> {
  static constexpr std::size_t rank = 4;
  static cake::host_view<const float, 4> view(const MyTensor& t) {
    if (t.dtype != DType::f32)
      throw cake::invalid_argument("example.tensor.dtype",
                                   "MyTensor must hold float32 for the host backend, got float16");
    return cake::make_view(static_cast<const float*>(t.data), t.shape, t.strides);
  }
};

int main() {
  using cake::index_t;
  const index_t B = 1, H = 4, Hkv = 2, S = 256, d = 32, w = 8;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Token-major storage: [B, S, Hkv, d] and [B, w, H, d].
  std::vector<float> kbuf(static_cast<std::size_t>(B * S * Hkv * d)), vbuf(kbuf.size()),
      qbuf(static_cast<std::size_t>(B * w * H * d));
  for (auto* t : {&kbuf, &vbuf, &qbuf})
    for (auto& x : *t) x = normal(rng);
  MyTensor k{kbuf.data(), DType::f32, {B, Hkv, S, d}, {S * Hkv * d, d, Hkv * d, 1}};
  MyTensor v{vbuf.data(), DType::f32, {B, Hkv, S, d}, {S * Hkv * d, d, Hkv * d, 1}};
  MyTensor q{qbuf.data(), DType::f32, {B, H, w, d}, {w * H * d, d, H * d, 1}};

  cake::CacheConfig cfg{.layers = 1,
                        .batch = B,
                        .q_heads = H,
                        .kv_heads = Hkv,
                        .head_dim = d,
                        .window = w,
                        .cache_size = 40};
  cake::KvCache<> cache(cfg);
  cache.prefill(0, q, k, v);
  std::printf("held %lld of %lld tokens through the MyTensor adapter\n",
              (long long)cache.tokens_held(0), (long long)S);

  // A dtype the host backend cannot read is refused before the cache changes.
  MyTensor half = k;
  half.dtype = DType::f16;
  cake::KvCache<> other(cfg);
  try {
    other.prefill(0, q, half, v);
    return 1;
  } catch (const cake::invalid_argument& e) {
    std::printf("refused as expected: %s\n", e.what());
  }
  return other.layers_prefilled() == 0 && cache.tokens_held(0) == 40 ? 0 : 1;
}
