// cake with its CUDA backend (nvcc). Everything of cake.hpp, plus the cake::cuda
// implementations of window_stats, select_k, compact and decode_scores, which take
// device views (cake::device_view) and run on cake::cuda.on(stream) without
// synchronising it. Host-only programs include <cake/cake.hpp> instead.
#pragma once

#if !defined(__CUDACC__)
#error "cake/cake.cuh needs a CUDA compiler (nvcc); host-only code includes cake/cake.hpp"
#endif

#include "cake.hpp"

#include "backend/cuda/compact.cuh"
#include "backend/cuda/decode_scores.cuh"
#include "backend/cuda/layer_store.cuh"  // KvCache<..., cuda_policy>
#include "backend/cuda/select_k.cuh"
#include "backend/cuda/window_stats.cuh"
