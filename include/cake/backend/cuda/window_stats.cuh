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
#include "detail/window_stats_plan.cuh"

namespace cake {
namespace cuda_detail {

// Whether the tensor-core kernels were compiled for sm_80+ (a build whose only target
// is older, e.g. compute_75 PTX JIT-compiled on a newer GPU, has no bf16 mma.sync: it
// takes the exact kernels instead of trapping).
template <class Q, class K, class Ind>
bool mma_compiled_for_sm80() {
  return kernel_attributes(kernel_address(&mma_window_stats_kernel<Q, K, MmaShape<32, 128>, Ind>),
                           "mma_window_stats_kernel")
             .ptxVersion >= 80;
}

// The tensor-core kernels of one call (rows = batch * kv_heads); returns the statistics
// kernel's blocks per row. Both launch one wave of resident blocks at most.
template <class Shape, class Q, class K, class Ind>
int launch_mma_stats(const StatsParams<Q, K>& p, unsigned rows, int planes, const StatsPlan& pl,
                     const StatsBuffers& buf, bool have_lse, const Ind& indicator, StatsRequest req,
                     cudaStream_t stream) {
  auto* norm = &mma_row_normaliser_kernel<Q, K, Shape>;
  auto* stats = &mma_window_stats_kernel<Q, K, Shape, Ind>;
  const int norm_threads = mma_norm_threads(p.group);
  if (!have_lse) allow_shared_memory(norm, pl.smem_norm, "mma_row_normaliser_kernel");
  allow_shared_memory(stats, pl.smem_stats, "mma_window_stats_kernel");
  const MmaStatsGrid gr = mma_stats_grid<Shape>(
      p, static_cast<int>(rows), std::max(1, multiprocessor_count()),
      have_lse ? 1 : resident_blocks(norm, norm_threads, pl.smem_norm, "mma_row_normaliser_kernel"),
      resident_blocks(stats, tuning::mma_threads, pl.smem_stats, "mma_window_stats_kernel"), pl);
  if (!have_lse) {
    norm<<<dim3(static_cast<unsigned>(gr.norm_blocks), rows), norm_threads, pl.smem_norm, stream>>>(
        p, planes, gr.streams_per_block, buf.part);
    check_launch("mma_row_normaliser_kernel");
    const int lse_rows = static_cast<int>(rows) * p.group * p.w;
    lse_combine_kernel<<<grid_dim(lse_rows, 256), 256, 0, stream>>>(buf.part, lse_rows,
                                                                    gr.streams(), buf.lse);
    check_launch("lse_combine_kernel");
  }
  stats<<<dim3(static_cast<unsigned>(gr.stats_blocks), rows), tuning::mma_threads, pl.smem_stats,
          stream>>>(p, planes, buf.lse, indicator, req.entropy, req.variance, buf.raw, buf.partial);
  check_launch("mma_window_stats_kernel");
  return gr.stats_blocks;
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
  const std::size_t budget = stats_smem_budget_here();
  bool tc = false;
  if constexpr (tensor_core_key<K>)
    tc = math == cuda_math::tensor_cores && rows_16_byte_aligned(k) &&
         mma_stats_fits(group, w, d, planes, budget) && device_compute_major() >= 8 &&
         mma_compiled_for_sm80<Q, K, Ind>();
  const StatsPlan pl = plan_stats(B, H, Hkv, w, S, d, lse != nullptr, tc, planes, budget);
  const cudaStream_t stream = stream_of(exec);
  scoped_workspace ws(given, pl.workspace, exec, "window_stats");
  workspace_carver c(ws.get());
  const StatsBuffers buf = carve_stats(c, pl, B, H, Hkv, w, P, lse != nullptr);

  StatsParams<Q, K> p = stats_params(q, k, lse, l_b, l_h, l_i, pl);
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
      const ExactStatsGrid gr = exact_stats_grid(static_cast<int>(bg), sms, pl);
      p.splits = gr.splits;
      stats_blocks = gr.stats_blocks;
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
