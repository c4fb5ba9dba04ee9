// cake::bfloat16: the brain-float 16-bit format (a float's sign, 8-bit exponent and
// top 7 mantissa bits), as host caches store K and V. The host kernels read it as
// float (exact: a shift) and accumulate in float; the CUDA backend takes
// __nv_bfloat16, which has the same bits.
#pragma once

#include <bit>
#include <cstdint>

namespace cake {

struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  // Round to nearest, ties to even; NaN stays NaN (quiet).
  constexpr explicit bfloat16(float f) noexcept : bits(round(f)) {}
  // Exact.
  constexpr operator float() const noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }
  static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 x;
    x.bits = b;
    return x;
  }

 private:
  static constexpr std::uint16_t round(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
    return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};
static_assert(sizeof(bfloat16) == 2);

}  // namespace cake
