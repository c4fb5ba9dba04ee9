// cake: configuration macros shared by host and CUDA code.
#pragma once

#define CAKE_VERSION_MAJOR 0
#define CAKE_VERSION_MINOR 1
#define CAKE_VERSION_PATCH 0

// Functions a policy exposes to kernels are compiled for both sides under nvcc
// and are plain functions under a host compiler.
#if defined(__CUDACC__)
#define CAKE_HOST_DEVICE __host__ __device__
#define CAKE_DEVICE __device__
#else
#define CAKE_HOST_DEVICE
#define CAKE_DEVICE
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CAKE_RESTRICT __restrict__
#define CAKE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CAKE_RESTRICT
#define CAKE_ALWAYS_INLINE inline
#endif

// Loop-level vectorisation hint understood by GCC, Clang and ICX; ignored elsewhere.
#if defined(__clang__)
#define CAKE_PRAGMA_SIMD _Pragma("clang loop vectorize(enable)")
#elif defined(__GNUC__)
#define CAKE_PRAGMA_SIMD _Pragma("GCC ivdep")
#else
#define CAKE_PRAGMA_SIMD
#endif

#include <cstdint>

namespace cake {
// Sizes, extents and token positions. Signed, so that differences are safe.
using index_t = std::int64_t;
}  // namespace cake
