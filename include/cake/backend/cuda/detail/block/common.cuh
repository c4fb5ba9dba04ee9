// Device helpers shared by the CUDA kernels: element conversion to float, warp
// reductions, and the order-preserving integer image of a float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// A kernel's dynamic shared memory, `name` aligned to `align` bytes. Under
// CAKE_CUDA_EMULATION (tests/cuda/emulation: kernels run as host threads, so that CI
// without a GPU executes them) the emulator hands out the block's buffer.
#ifdef CAKE_CUDA_EMULATION
#define CAKE_DYNAMIC_SHARED(align, name) unsigned char* name = ::cake_emulation::dynamic_shared()
#else
#define CAKE_DYNAMIC_SHARED(align, name) \
  extern __shared__ __align__(align)     \
  unsigned char name[]
#endif

namespace cake::cuda_detail {

// K and Q may be float, __half or __nv_bfloat16; every kernel accumulates in float.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Monotone map float -> uint32 (same as the host backend's detail::ordered_bits):
// a < b  <=>  ordered_bits(a) < ordered_bits(b) for non-NaN floats.
__device__ __forceinline__ std::uint32_t ordered_bits_dev(float x) {
  std::uint32_t u = __float_as_uint(x);
  u = u == 0x80000000u ? 0u : u;  // -0.0 == +0.0: equal keys, ties go to the lower index
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Merge two (max, sum of exp(x - max)) pairs of a softmax normaliser; either may be empty
// (max = -inf, sum = 0), e.g. a tile whose keys are all masked for this row. BASE2: the
// pairs are (max, sum of 2^(x - max)) of base-2 scores.
template <bool BASE2 = false>
__device__ __forceinline__ void merge_normaliser(float& m, float& l, float m2, float l2) {
  if (l2 == 0.0f) return;
  if (l == 0.0f) {
    m = m2;
    l = l2;
    return;
  }
  const float mm = fmaxf(m, m2);
  if constexpr (BASE2)
    l = l * exp2f(m - mm) + l2 * exp2f(m2 - mm);
  else
    l = l * expf(m - mm) + l2 * expf(m2 - mm);
  m = mm;
}

}  // namespace cake::cuda_detail
