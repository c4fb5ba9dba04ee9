// cake::decode_scores on CUDA (decode_logits_kernel over key tiles, then
// decode_finish_kernel over candidate chunks) run on the CPU from its real source
// under the emulator, with the launcher's plan and parameters, against the host backend.
#include <cake/cake.hpp>

#include "data.hpp"
#include "emulator.hpp"

#include <doctest/doctest.h>
#include <cake/backend/cuda/detail/decode_plan.cuh>

#include <array>
#include <cmath>
#include <random>
#include <vector>

namespace {

using cake::index_t;
namespace cd = cake::cuda_detail;
namespace emu = cake_emulation;
using cake_emulation_tests::random_values;

// (batch, q_heads, kv_heads, held keys, candidates, head_dim); K of type K.
template <class K, class Ind>
void check(index_t B, index_t H, index_t Hkv, index_t held, index_t c, index_t d,
           const Ind& indicator, std::uint32_t seed) {
  CAPTURE(held);
  CAPTURE(c);
  CAPTURE(d);
  std::mt19937 rng(seed);
  std::vector<float> q = random_values<float>(static_cast<std::size_t>(B * H * d), 1.5f, rng);
  const std::vector<K> k =
      random_values<K>(static_cast<std::size_t>(B * Hkv * held * d), 1.0f, rng);
  std::vector<float> kf(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) kf[i] = static_cast<float>(k[i]);
  const std::array<index_t, 3> qe{B, H, d}, oe{B, Hkv, c};
  const std::array<index_t, 4> ke{B, Hkv, held, d};
  std::vector<float> host(static_cast<std::size_t>(B * Hkv * c));
  cake::decode_scores(cake::host, cake::make_view(q.data(), qe), cake::make_view(kf.data(), ke),
                      indicator, cake::make_view(host.data(), oe));

  std::vector<float> out(host.size(), NAN);
  const cd::DecodePlan pl = cd::plan_decode(B, H, held);
  std::vector<unsigned char> workspace(pl.workspace + 256, 0xFF);  // NaN until written
  cd::workspace_carver carve(workspace.data() +
                             (256 - reinterpret_cast<std::uintptr_t>(workspace.data()) % 256));
  const auto p = cd::decode_params(cake::make_view<cake::device_space>(q.data(), qe),
                                   cake::make_view<cake::device_space>(k.data(), ke),
                                   cake::make_view<cake::device_space>(out.data(), oe), carve, pl);
  const auto rows = static_cast<unsigned>(B * Hkv);
  const int half = indicator.pool_kernel / 2;
  emu::launch({static_cast<unsigned>(pl.tiles), rows, 1},
              {static_cast<unsigned>(cd::tuning::decode_threads), 1, 1},
              static_cast<std::size_t>(cd::decode_logits_smem(p.group, p.d, p.ld)),
              [&] { cd::decode_logits_kernel(p); });
  emu::launch({static_cast<unsigned>((c + cd::tuning::decode_chunk - 1) / cd::tuning::decode_chunk),
               rows, 1},
              {static_cast<unsigned>(cd::tuning::decode_threads), 1, 1},
              static_cast<std::size_t>(cd::decode_finish_smem(p.group, half)),
              [&] { cd::decode_finish_kernel(p, indicator); });
  int wrong = 0;
  for (std::size_t i = 0; i < out.size(); ++i)
    if (!(std::abs(out[i] - host[i]) <= 1e-9 + 1e-5 * std::abs(host[i])) && wrong++ < 3)
      FAIL_CHECK("score " << i << ": emulated " << out[i] << ", host " << host[i]);
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("decode_scores on CUDA, emulated on the CPU, equals the host backend") {
  const cake::MeanVarianceIndicator mv{200.0f, 5};
  SUBCASE("bf16 K, 16-byte loads, tiles with a tail, group 4") {
    check<__nv_bfloat16>(1, 8, 2, 150, 140, 128, mv, 1);
  }
  SUBCASE("half K, rows of 144 bytes, group 10, pool 7, batch 2") {
    check<__half>(2, 10, 1, 70, 70, 72, cake::WindowMeanIndicator{7}, 2);
  }
  SUBCASE("float K, odd head_dim (element loads), candidates over two chunks") {
    check<float>(1, 2, 1, 1100, 1090, 7, mv, 3);
  }
}
