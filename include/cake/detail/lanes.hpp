// cake: host reductions written with a fixed number of independent lanes, so
// that compilers vectorise them without reassociation flags and the result is
// the same on every instruction set and vector width.
#pragma once

#include <bit>
#include <cstdint>
#include <limits>

#include "../config.hpp"

namespace cake::detail {

inline constexpr index_t LANES = 16;  // independent partial sums

// Sum with LANES independent accumulators, so that it vectorises without
// reassociation flags; the result does not depend on the target's vector width.
CAKE_ALWAYS_INLINE float lane_sum(const float* CAKE_RESTRICT x, index_t n) {
  float part[LANES] = {};
  index_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (index_t l = 0; l < LANES; ++l) part[l] += x[j + l];
  for (index_t l = 0; j < n; ++j, ++l) part[l] += x[j];
  float s = 0;
  for (index_t l = 0; l < LANES; ++l) s += part[l];
  return s;
}

// Max of x[0..n) (finite values): taken on the order-preserving integer image of
// the floats with LANES independent lanes, because integer max vectorises
// without -ffast-math and float max does not. Max is exact, so the result does
// not depend on the lane count or the target.
CAKE_ALWAYS_INLINE std::int32_t ordered_int(float x) {
  const std::int32_t v = std::bit_cast<std::int32_t>(x);
  return v ^ ((v >> 31) & 0x7fffffff);
}
CAKE_ALWAYS_INLINE float row_max(const float* CAKE_RESTRICT x, index_t n) {
  std::int32_t part[LANES];
  for (index_t l = 0; l < LANES; ++l) part[l] = ordered_int(-std::numeric_limits<float>::max());
  index_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (index_t l = 0; l < LANES; ++l) {
      const std::int32_t v = ordered_int(x[j + l]);
      part[l] = v > part[l] ? v : part[l];
    }
  std::int32_t m = part[0];
  for (index_t l = 1; l < LANES; ++l) m = part[l] > m ? part[l] : m;
  for (; j < n; ++j) {
    const std::int32_t v = ordered_int(x[j]);
    m = v > m ? v : m;
  }
  return std::bit_cast<float>(m ^ ((m >> 31) & 0x7fffffff));
}

}  // namespace cake::detail
