// How a window-statistics call on CUDA is cut into blocks: pure functions of the
// shapes (and of the device's figures, passed in), shared by the launcher, the
// workspace-size query and the kernel emulation tests (tests/cuda/emulation), so that
// what is tested is what is launched. No launches here: host compilers parse it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../../core/types.hpp"
#include "../../../core/view.hpp"
#include "../../../error.hpp"
#include "dispatch.cuh"
#include "kernels/window_stats.cuh"
#include "kernels/window_stats_mma.cuh"
#include "mma_layout.hpp"
#include "tuning.cuh"

namespace cake::cuda_detail {

// How a window-statistics call is cut into blocks; a pure function of the shapes,
// so that the size query and the call agree (the workspace does not depend on `tc`).
struct StatsPlan {
  bool tc = false;  // the tensor-core kernels (window_stats_mma.cuh)
  int ld = 0, ldq = 0, ss_ld = 0, rows = 0, splits = 1, tiles_all = 0, tiles_prefix = 0;
  std::size_t smem_norm = 0, smem_stats = 0;
  std::size_t workspace = 0;
};

// Workspace pieces, in carving order.
struct StatsBuffers {
  float2* part = nullptr;     // (batch, kv_heads, group * window, splits)
  float* lse = nullptr;       // (batch, q_heads, window)
  float* raw = nullptr;       // (batch, kv_heads, P)
  float2* partial = nullptr;  // (batch, kv_heads, tiles of P) per-block (entropy, variance)
};

inline StatsBuffers carve_stats(workspace_carver& c, const StatsPlan& pl, index_t B, index_t H,
                                index_t Hkv, index_t w, index_t P, bool have_lse) {
  StatsBuffers s;
  if (!have_lse) {
    s.part = c.take<float2>(static_cast<std::size_t>(B * H * w * pl.splits));
    s.lse = c.take<float>(static_cast<std::size_t>(B * H * w));
  }
  s.raw = c.take<float>(static_cast<std::size_t>(std::max<index_t>(B * Hkv * P, 1)));
  s.partial =
      c.take<float2>(static_cast<std::size_t>(std::max<index_t>(B * Hkv * pl.tiles_prefix, 1)));
  return s;
}

// Shared memory of the tensor-core kernels: the group's queries as fragments (`planes`
// planes of K's type) and, for the statistics kernel, the rows' log-sum-exp.
inline std::size_t mma_stats_smem(index_t group, index_t w, index_t d, int planes) {
  return static_cast<std::size_t>(mma::query_pieces(static_cast<int>(group), planes,
                                                    static_cast<int>(w), static_cast<int>(d))) *
             sizeof(mma::Piece) +
         static_cast<std::size_t>(group * w) * sizeof(float);
}

// Dynamic shared memory a statistics block may use on this device (the kernels' static
// shared memory, a block reduction, fits in the reserve).
inline std::size_t stats_smem_budget_here() {
  return shared_memory_budget(static_cast<std::size_t>(tuning::stats_smem_budget), 4096);
}

// Shapes the tensor-core kernels take (K's type, alignment and the device are the
// caller's to check): head_dim a multiple of 16 up to 256, window up to 64, at most
// tuning::mma_max_group query heads per KV head, queries within `budget` bytes of
// shared memory.
inline bool mma_stats_fits(index_t group, index_t w, index_t d, int planes, std::size_t budget) {
  return d % 16 == 0 && d <= 256 && w <= 64 && group <= tuning::mma_max_group &&
         mma_stats_smem(group, w, d, planes) <= budget;
}

// `budget`: dynamic shared memory per block (the workspace does not depend on it).
inline StatsPlan plan_stats(
    index_t B, index_t H, index_t Hkv, index_t w, index_t S, index_t d, bool have_lse,
    bool tc = false, int planes = 1,
    std::size_t budget = static_cast<std::size_t>(tuning::stats_smem_budget)) {
  constexpr int TILE_N = tuning::stats_tile_n;
  StatsPlan pl;
  const index_t group = H / Hkv, gw = group * w, P = S - w;
  pl.tc = tc;
  pl.tiles_all = static_cast<int>((S + TILE_N - 1) / TILE_N);
  pl.tiles_prefix = static_cast<int>((P + TILE_N - 1) / TILE_N);
  // Upper bound of the normaliser's key splits (the launch uses one wave: fewer when the
  // GPU is smaller); at least 8, the tensor-core normaliser's streams per block.
  const index_t want = (tuning::stats_target_blocks + B * Hkv - 1) / (B * Hkv);
  pl.splits = static_cast<int>(
      std::max<index_t>(std::clamp<index_t>(want, 1, std::max(pl.tiles_all, 1)), 8));
  if (tc) {
    pl.smem_norm = mma_stats_smem(group, w, d, planes) - static_cast<std::size_t>(gw * 4);
    pl.smem_stats = mma_stats_smem(group, w, d, planes);
  } else {
    pl.ld = static_cast<int>(d % 2 == 0 ? d + 1 : d);
    pl.ldq = stats_query_pitch(static_cast<int>(d));
    pl.ss_ld = TILE_N + 1;
    const auto bytes = [&](index_t rows, index_t extra) {
      return static_cast<std::size_t>(
          stats_tile_bytes(pl.ld, pl.ldq, pl.ss_ld, static_cast<int>(rows), extra));
    };
    // All the group's window rows at once when they fit (Q read once per block),
    // otherwise chunks of 64 rows.
    index_t rows = gw;
    const index_t extra = std::max(2 * gw, gw + group * TILE_N);  // either pass's scalars
    if (bytes(rows, extra) > budget) rows = 64;
    CAKE_EXPECTS(bytes(rows, extra) <= budget, "cake.keys.head_dim",
                 "the CUDA window statistics need at most ", budget,
                 " bytes of shared memory per block; head_dim = ", d,
                 " and q_heads / kv_heads * window = ", gw, " need ", bytes(rows, extra));
    pl.rows = static_cast<int>(rows);
    pl.smem_norm = bytes(rows, 2 * gw);
    pl.smem_stats = bytes(rows, gw + group * TILE_N);  // lse rows + per-head scores
  }
  workspace_carver c;
  carve_stats(c, pl, B, H, Hkv, w, P, have_lse);
  pl.workspace = c.bytes();
  return pl;
}

// The kernels' view of one call (strides in elements; head_dim has unit stride).
template <class TQ, class TK>
StatsParams<std::remove_const_t<TQ>, std::remove_const_t<TK>> stats_params(
    device_view<TQ, 4> q, device_view<TK, 4> k, const float* lse, std::int64_t l_b,
    std::int64_t l_h, std::int64_t l_i, const StatsPlan& pl) {
  StatsParams<std::remove_const_t<TQ>, std::remove_const_t<TK>> p{};
  const index_t H = q.extent(1), Hkv = k.extent(1), w = q.extent(2), S = k.extent(2);
  p.q = q.data_handle();
  p.q_b = q.stride(0), p.q_h = q.stride(1), p.q_i = q.stride(2);
  p.k = k.data_handle();
  p.k_b = k.stride(0), p.k_g = k.stride(1), p.k_j = k.stride(2);
  p.lse = lse, p.l_b = l_b, p.l_h = l_h, p.l_i = l_i;
  p.H = static_cast<int>(H), p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(H / Hkv);
  p.w = static_cast<int>(w), p.S = static_cast<int>(S), p.P = static_cast<int>(S - w);
  p.d = static_cast<int>(q.extent(3)), p.ld = pl.ld, p.ldq = pl.ldq, p.ss_ld = pl.ss_ld;
  p.rows_per_chunk = pl.rows, p.splits = pl.splits;
  p.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(q.extent(3))));
  return p;
}

// Every row of K starts on a 16-byte boundary (the tensor-core kernels load pieces).
template <class TK>
bool rows_16_byte_aligned(device_view<TK, 4> k) {
  constexpr auto e = static_cast<index_t>(sizeof(TK));
  return reinterpret_cast<std::uintptr_t>(k.data_handle()) % 16 == 0 &&
         (k.stride(0) * e) % 16 == 0 && (k.stride(1) * e) % 16 == 0 && (k.stride(2) * e) % 16 == 0;
}

template <class K>
inline constexpr bool tensor_core_key =
    std::is_same_v<K, __half> || std::is_same_v<K, __nv_bfloat16>;

// Threads of a row-normaliser block: tuning::mma_max_group / group key streams of
// `group` warps (one per query head of the group).
inline int mma_norm_threads(int group) {
  return 32 * group * std::max(1, tuning::mma_max_group / group);
}

// Blocks of the tensor-core kernels per (batch, kv-head) row: at most one wave of
// resident blocks (`*_resident` blocks per SM), no more than there is work for, and
// within the workspace the plan sized (pl.splits key streams, pl.tiles_prefix
// partials).
struct MmaStatsGrid {
  int streams_per_block = 1, norm_blocks = 1, stats_blocks = 1;
  int streams() const { return norm_blocks * streams_per_block; }
};

template <class Shape, class Q, class K>
MmaStatsGrid mma_stats_grid(const StatsParams<Q, K>& p, int rows, int sms, int norm_resident,
                            int stats_resident, const StatsPlan& pl) {
  MmaStatsGrid gr;
  gr.streams_per_block = std::max(1, tuning::mma_max_group / p.group);
  const int key_chunks = (p.S + Shape::NK * 8 - 1) / (Shape::NK * 8);
  gr.norm_blocks =
      std::clamp(std::min((key_chunks + gr.streams_per_block - 1) / gr.streams_per_block,
                          norm_resident * sms / rows),
                 1, std::max(1, pl.splits / gr.streams_per_block));
  constexpr int warps = tuning::mma_threads / 32, keys_per_warp = Shape::MT * 16;
  const int prefix_chunks = (p.P + keys_per_warp - 1) / keys_per_warp;
  gr.stats_blocks =
      std::clamp(std::min((prefix_chunks + warps - 1) / warps, stats_resident * sms / rows), 1,
                 std::max(1, pl.tiles_prefix));
  return gr;
}

// Blocks per row of the exact kernels: a statistics block needs most of an SM's shared
// memory, so one wave is about as many blocks as SMs, shared by the rows; within the
// workspace the plan sized.
struct ExactStatsGrid {
  int splits = 1, stats_blocks = 1;
};
inline ExactStatsGrid exact_stats_grid(int rows, int sms, const StatsPlan& pl) {
  ExactStatsGrid gr;
  gr.splits = std::clamp(sms / rows, 1, std::min(pl.splits, std::max(pl.tiles_all, 1)));
  gr.stats_blocks = std::clamp(sms / rows, 1, std::max(pl.tiles_prefix, 1));
  return gr;
}

}  // namespace cake::cuda_detail
