// CUDA backend of cake::window_stats and cake::window_stats_from_attention.
//
// Besides the front-end entry points (which allocate their scratch stream-ordered),
// this header adds, for cake::cuda only:
//   window_stats_workspace_size(...)            bytes of scratch a call needs
//   window_stats(exec, ..., request, workspace) the allocation-free call
//   window_stats_lse(exec, q, k, lse, ...)      with the attention kernel's per-row
//                                               log-sum-exp: one pass over K
//   window_stats_from_attention(exec, ..., request, workspace)
// Nothing is synchronised: the layer's (entropy, variance) land in a device view.
//
// The math is the policy's (cake::cuda.with(cuda_math::tensor_cores)) unless a call
// names one. cuda_math::exact (default) computes Q . K in float on the SIMT cores in
// the host's order and agrees with the host backend to 1e-5. cuda_math::tensor_cores
// (16-bit K with 16-byte aligned rows, head_dim % 16 == 0 and <= 256, window <= 64,
// q_heads / kv_heads <= 8; other shapes use the exact kernels) runs mma.sync with Q in
// K's type (exact when Q has that type, else split in two planes): far faster, agrees
// with the host to about 1e-4 .. 1e-3 (tensor-core sums do not round like sequential
// float additions).
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>

#include "../../algorithm/window_stats.hpp"
#include "detail/dispatch.cuh"
#include "detail/kernels/window_stats.cuh"
#include "detail/kernels/window_stats_mma.cuh"

namespace cake {
namespace cuda_detail {

// How a window-statistics call is cut into blocks; a pure function of the shapes,
// so that the size query and the call agree (the workspace does not depend on `tc`).
struct StatsPlan {
  bool tc = false;  // the tensor-core kernels (window_stats_mma.cuh)
  int ld = 0, ss_ld = 0, rows = 0, splits = 1, tiles_all = 0, tiles_prefix = 0;
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

// Shapes the tensor-core kernels take (K's type, alignment and the device are the
// caller's to check): head_dim a multiple of 16 up to 256, window up to 64, at most
// tuning::mma_max_group query heads per KV head, queries within the shared memory.
inline bool mma_stats_fits(index_t group, index_t w, index_t d, int planes) {
  return d % 16 == 0 && d <= 256 && w <= 64 && group <= tuning::mma_max_group &&
         mma_stats_smem(group, w, d, planes) <= static_cast<std::size_t>(tuning::stats_smem_budget);
}

inline StatsPlan plan_stats(index_t B, index_t H, index_t Hkv, index_t w, index_t S, index_t d,
                            bool have_lse, bool tc = false, int planes = 1) {
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
    pl.ss_ld = TILE_N + 1;
    const auto bytes = [&](index_t rows, index_t extra) {
      return static_cast<std::size_t>(
          stats_tile_bytes(pl.ld, pl.ss_ld, static_cast<int>(rows), extra));
    };
    const std::size_t budget = static_cast<std::size_t>(tuning::stats_smem_budget);
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

template <class K>
inline constexpr bool tensor_core_key =
    std::is_same_v<K, __half> || std::is_same_v<K, __nv_bfloat16>;

// The tensor-core kernels of one call (rows = batch * kv_heads); returns the statistics
// kernel's blocks per row. Both launch one wave of resident blocks at most.
template <class Shape, class Q, class K, class Ind>
int launch_mma_stats(const StatsParams<Q, K>& p, unsigned rows, int planes, const StatsPlan& pl,
                     const StatsBuffers& buf, bool have_lse, const Ind& indicator, StatsRequest req,
                     cudaStream_t stream) {
  // Blocks per row for one wave: resident blocks on all SMs shared by the rows.
  const int sms = std::max(1, multiprocessor_count()), row_count = static_cast<int>(rows);
  if (!have_lse) {
    auto* norm = &mma_row_normaliser_kernel<Q, K, Shape>;
    allow_shared_memory(norm, pl.smem_norm, "mma_row_normaliser_kernel");
    const int per_block = std::max(1, tuning::mma_max_group / p.group);  // key streams
    const int threads = 32 * p.group * per_block;
    const int chunks = (p.S + Shape::NK * 8 - 1) / (Shape::NK * 8);
    const int wave =
        resident_blocks(norm, threads, pl.smem_norm, "mma_row_normaliser_kernel") * sms / row_count;
    const int blocks = std::clamp(std::min((chunks + per_block - 1) / per_block, wave), 1,
                                  std::max(1, pl.splits / per_block));
    norm<<<dim3(static_cast<unsigned>(blocks), rows), threads, pl.smem_norm, stream>>>(
        p, planes, per_block, buf.part);
    check_launch("mma_row_normaliser_kernel");
    const int lse_rows = static_cast<int>(rows) * p.group * p.w;
    lse_combine_kernel<<<grid_dim(lse_rows, 256), 256, 0, stream>>>(buf.part, lse_rows,
                                                                    blocks * per_block, buf.lse);
    check_launch("lse_combine_kernel");
  }
  auto* stats = &mma_window_stats_kernel<Q, K, Shape, Ind>;
  allow_shared_memory(stats, pl.smem_stats, "mma_window_stats_kernel");
  constexpr int warps = tuning::mma_threads / 32, keys_per_warp = Shape::MT * 16;
  const int chunks = (p.P + keys_per_warp - 1) / keys_per_warp;
  const int wave =
      resident_blocks(stats, tuning::mma_threads, pl.smem_stats, "mma_window_stats_kernel") * sms /
      row_count;
  const int blocks = std::clamp(std::min((chunks + warps - 1) / warps, wave), 1,
                                std::max(1, pl.tiles_prefix));  // partial holds tiles_prefix
  stats<<<dim3(static_cast<unsigned>(blocks), rows), tuning::mma_threads, pl.smem_stats, stream>>>(
      p, planes, buf.lse, indicator, req.entropy, req.variance, buf.raw, buf.partial);
  check_launch("mma_window_stats_kernel");
  return blocks;
}

template <class TQ, class TK, class Ind>
void launch_window_stats(const cuda_policy& exec, device_view<TQ, 4> q, device_view<TK, 4> k,
                         const float* lse, std::int64_t l_b, std::int64_t l_h, std::int64_t l_i,
                         const Ind& indicator, device_view<float, 3> out,
                         device_view<float, 1> stats, StatsRequest req, cuda_workspace given,
                         cuda_math math) {
  using Q = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
  const index_t Hkv = k.extent(1), S = k.extent(2), P = S - w, group = H / Hkv;
  // Tensor cores when asked for and possible: 16-bit K with 16-byte aligned rows, a
  // shape the kernels take, sm_80+. Q in K's type needs one plane, anything else two.
  const int planes = std::is_same_v<Q, K> ? 1 : 2;
  const bool k_vec16 = reinterpret_cast<std::uintptr_t>(k.data_handle()) % 16 == 0 &&
                       (k.stride(0) * static_cast<index_t>(sizeof(K))) % 16 == 0 &&
                       (k.stride(1) * static_cast<index_t>(sizeof(K))) % 16 == 0 &&
                       (k.stride(2) * static_cast<index_t>(sizeof(K))) % 16 == 0;
  const bool tc = tensor_core_key<K> && math == cuda_math::tensor_cores && k_vec16 &&
                  mma_stats_fits(group, w, d, planes) && device_compute_major() >= 8;
  const StatsPlan pl = plan_stats(B, H, Hkv, w, S, d, lse != nullptr, tc, planes);
  const cudaStream_t stream = stream_of(exec);
  scoped_workspace ws(given, pl.workspace, exec, "window_stats");
  workspace_carver c(ws.get());
  const StatsBuffers buf = carve_stats(c, pl, B, H, Hkv, w, P, lse != nullptr);

  StatsParams<Q, K> p{};
  p.q = q.data_handle();
  p.q_b = q.stride(0), p.q_h = q.stride(1), p.q_i = q.stride(2);
  p.k = k.data_handle();
  p.k_b = k.stride(0), p.k_g = k.stride(1), p.k_j = k.stride(2);
  p.lse = lse, p.l_b = l_b, p.l_h = l_h, p.l_i = l_i;
  p.H = static_cast<int>(H), p.Hkv = static_cast<int>(Hkv), p.group = static_cast<int>(group);
  p.w = static_cast<int>(w), p.S = static_cast<int>(S), p.P = static_cast<int>(P);
  p.d = static_cast<int>(d), p.ld = pl.ld, p.ss_ld = pl.ss_ld;
  p.rows_per_chunk = pl.rows, p.splits = pl.splits;
  p.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  const unsigned bg = static_cast<unsigned>(B * Hkv);
  const int sms = std::max(1, multiprocessor_count());

  int stats_blocks = 0;
  if (P > 0) {
    if constexpr (tensor_core_key<K>) {
      if (tc) {
        const auto run = [&](auto shape) {
          return launch_mma_stats<decltype(shape)>(p, bg, planes, pl, buf, lse != nullptr,
                                                   indicator, req, stream);
        };
        if (w <= 32)
          stats_blocks = d <= 128 ? run(MmaShape<32, 128>{}) : run(MmaShape<32, 256>{});
        else
          stats_blocks = d <= 128 ? run(MmaShape<64, 128>{}) : run(MmaShape<64, 256>{});
      }
    }
    if (!tc) {
      // The exact kernels: a stats block needs most of an SM's shared memory, so blocks in
      // flight = SMs; the workspace was sized for the upper bounds in the plan.
      const int threads = tuning::stats_threads;
      p.splits = std::clamp(sms / static_cast<int>(bg), 1, pl.splits);
      stats_blocks = std::clamp(sms / static_cast<int>(bg), 1, std::max(pl.tiles_prefix, 1));
      if (lse == nullptr) {
        auto* norm = &row_normaliser_kernel<Q, K>;
        allow_shared_memory(norm, pl.smem_norm, "row_normaliser_kernel");
        norm<<<dim3(static_cast<unsigned>(p.splits), bg), threads, pl.smem_norm, stream>>>(
            p, buf.part);
        check_launch("row_normaliser_kernel");
        const int rows = static_cast<int>(B * H * w);
        lse_combine_kernel<<<grid_dim(rows, 256), 256, 0, stream>>>(buf.part, rows, p.splits,
                                                                    buf.lse);
        check_launch("lse_combine_kernel");
      }
      auto* stats_k = &window_stats_kernel<Q, K, Ind>;
      allow_shared_memory(stats_k, pl.smem_stats, "window_stats_kernel");
      stats_k<<<dim3(static_cast<unsigned>(stats_blocks), bg), threads, pl.smem_stats, stream>>>(
          p, buf.lse, indicator, req.entropy, req.variance, buf.raw, buf.partial);
      check_launch("window_stats_kernel");
    }
    const float inv =
        1.0f / (static_cast<float>(indicator.pool_kernel) * static_cast<float>(group));
    pool_groups_kernel<<<dim3(grid_dim(P, tuning::column_threads), bg), tuning::column_threads, 0,
                         stream>>>(buf.raw, p.Hkv, p.P, indicator.pool_kernel, inv,
                                   out.data_handle(), out.stride(0), out.stride(1));
    check_launch("pool_groups_kernel");
  }
  layer_stats_kernel<<<1, tuning::column_threads, 0, stream>>>(
      buf.partial, stats_blocks * static_cast<int>(bg), stats.data_handle(), stats.stride(0));
  check_launch("layer_stats_kernel");
}

inline std::size_t attention_stats_workspace(index_t B, index_t Hkv, index_t P) {
  workspace_carver c;
  c.take<float>(static_cast<std::size_t>(std::max<index_t>(B * Hkv * P, 1)));
  c.take<float2>(static_cast<std::size_t>(
      std::max<index_t>(B * Hkv * ((P + tuning::column_threads - 1) / tuning::column_threads), 1)));
  return c.bytes();
}

template <class TA, class Ind>
void launch_attention_stats(const cuda_policy& exec, device_view<TA, 4> a, const Ind& indicator,
                            device_view<float, 3> out, device_view<float, 1> stats,
                            StatsRequest req, cuda_workspace given) {
  using A = std::remove_const_t<TA>;
  const index_t B = a.extent(0), H = a.extent(1), w = a.extent(2), S = a.extent(3);
  const index_t Hkv = out.extent(1), P = S - w, group = H / Hkv;
  const cudaStream_t stream = stream_of(exec);
  scoped_workspace ws(given, attention_stats_workspace(B, Hkv, P), exec,
                      "window_stats_from_attention");
  workspace_carver c(ws.get());
  float* raw = c.take<float>(static_cast<std::size_t>(std::max<index_t>(B * Hkv * P, 1)));
  const unsigned tiles = grid_dim(P, tuning::column_threads);
  float2* partial = c.take<float2>(static_cast<std::size_t>(std::max<index_t>(B * Hkv * tiles, 1)));
  const unsigned bg = static_cast<unsigned>(B * Hkv);
  int partials = 0;
  if (P > 0) {
    attention_stats_kernel<A, Ind><<<dim3(tiles, bg), tuning::column_threads, 0, stream>>>(
        a.data_handle(), a.stride(0), a.stride(1), a.stride(2), static_cast<int>(Hkv),
        static_cast<int>(group), static_cast<int>(w), static_cast<int>(P), indicator, req.entropy,
        req.variance, raw, partial);
    check_launch("attention_stats_kernel");
    partials = static_cast<int>(tiles * bg);
    const float inv =
        1.0f / (static_cast<float>(indicator.pool_kernel) * static_cast<float>(group));
    pool_groups_kernel<<<dim3(tiles, bg), tuning::column_threads, 0, stream>>>(
        raw, static_cast<int>(Hkv), static_cast<int>(P), indicator.pool_kernel, inv,
        out.data_handle(), out.stride(0), out.stride(1));
    check_launch("pool_groups_kernel");
  }
  layer_stats_kernel<<<1, tuning::column_threads, 0, stream>>>(
      partial, partials, stats.data_handle(), stats.stride(0));
  check_launch("layer_stats_kernel");
}

}  // namespace cuda_detail

template <>
struct window_stats_backend<cuda_policy> {
  template <class TQ, class TK, class Ind>
  static void run(const cuda_policy& exec, device_view<TQ, 4> q, device_view<TK, 4> k,
                  const Ind& indicator, device_view<float, 3> out, device_view<float, 1> stats,
                  StatsRequest req, cuda_workspace ws = {},
                  std::optional<cuda_math> math = std::nullopt) {
    cuda_detail::launch_window_stats(exec, q, k, nullptr, 0, 0, 0, indicator, out, stats, req, ws,
                                     math.value_or(exec.math));
  }
  template <class TA, class Ind>
  static void run_from_attention(const cuda_policy& exec, device_view<TA, 4> a,
                                 const Ind& indicator, device_view<float, 3> out,
                                 device_view<float, 1> stats, StatsRequest req,
                                 cuda_workspace ws = {}) {
    cuda_detail::launch_attention_stats(exec, a, indicator, out, stats, req, ws);
  }
};

// Bytes of scratch cake::window_stats on cake::cuda needs for these shapes
// (have_lse: the call passes the per-row log-sum-exp, window_stats_lse).
inline std::size_t window_stats_workspace_size(index_t batch, index_t q_heads, index_t kv_heads,
                                               index_t window, index_t tokens, index_t head_dim,
                                               bool have_lse = false) {
  return cuda_detail::plan_stats(batch, q_heads, kv_heads, window, tokens, head_dim, have_lse)
      .workspace;
}

inline std::size_t window_stats_from_attention_workspace_size(index_t batch, index_t kv_heads,
                                                              index_t window, index_t tokens) {
  return cuda_detail::attention_stats_workspace(batch, kv_heads, tokens - window);
}

// The allocation-free call: as cake::window_stats, with a workspace of at least
// window_stats_workspace_size(...) bytes (an empty one allocates, stream-ordered).
template <tensor_like Q, tensor_like K, AttentionIndicator Ind, tensor_like IO, tensor_like SO>
void window_stats(const cuda_policy& exec, Q&& q_window, K&& keys, const Ind& indicator,
                  IO&& indicator_out, SO&& stats_out, StatsRequest request,
                  cuda_workspace workspace, std::optional<cuda_math> math = std::nullopt) {
  auto q = as_view(q_window);
  auto k = as_view(keys);
  auto io = as_view(indicator_out);
  auto so = as_view(stats_out);
  detail::check_window_stats_args<cuda_policy>(indicator, q, k, io, so);
  window_stats_backend<cuda_policy>::run(exec, q, k, indicator, io, so, request, workspace, math);
}

// With the per-row log-sum-exp the engine's attention kernel already computed:
// lse(b, h, i) = ln sum_j exp(q_window[b,h,i] . keys[b,h/n,j] / sqrt(head_dim)) over the
// keys row i sees (causal inside the window). Then K is read once.
// lse: (batch, q_heads, window) float.
template <tensor_like Q, tensor_like K, tensor_like L, AttentionIndicator Ind, tensor_like IO,
          tensor_like SO>
void window_stats_lse(const cuda_policy& exec, Q&& q_window, K&& keys, L&& lse,
                      const Ind& indicator, IO&& indicator_out, SO&& stats_out,
                      StatsRequest request = {}, cuda_workspace workspace = {},
                      std::optional<cuda_math> math = std::nullopt) {
  auto q = as_view(q_window);
  auto k = as_view(keys);
  auto l = as_view(lse);
  auto io = as_view(indicator_out);
  auto so = as_view(stats_out);
  require_space<cuda_policy, decltype(l)>();
  static_assert(std::is_same_v<std::remove_const_t<typename decltype(l)::element_type>, float>,
                "cake::window_stats_lse: lse must be float");
  detail::check_window_stats_args<cuda_policy>(indicator, q, k, io, so);
  CAKE_EXPECTS(
      l.extent(0) == q.extent(0) && l.extent(1) == q.extent(1) && l.extent(2) == q.extent(2),
      "cake.lse.shape", "lse must be (batch, q_heads, window) = (", q.extent(0), ", ", q.extent(1),
      ", ", q.extent(2), "), got (", l.extent(0), ", ", l.extent(1), ", ", l.extent(2), ")");
  cuda_detail::launch_window_stats(exec, q, k, l.data_handle(), l.stride(0), l.stride(1),
                                   l.stride(2), indicator, io, so, request, workspace,
                                   math.value_or(exec.math));
}

template <tensor_like A, AttentionIndicator Ind, tensor_like IO, tensor_like SO>
void window_stats_from_attention(const cuda_policy& exec, A&& attention, const Ind& indicator,
                                 IO&& indicator_out, SO&& stats_out, StatsRequest request,
                                 cuda_workspace workspace) {
  auto a = as_view(attention);
  auto io = as_view(indicator_out);
  auto so = as_view(stats_out);
  require_space<cuda_policy, decltype(a), decltype(io), decltype(so)>();
  indicator.validate().throw_if_error();
  validate_window_stats_from_attention(a, io, so).throw_if_error();
  window_stats_backend<cuda_policy>::run_from_attention(exec, a, indicator, io, so, request,
                                                        workspace);
}

}  // namespace cake
