// CUDA storage of KvCache layers: KvCache<Pref, Budget, Ind, T, cake::cuda_policy>
// keeps its layers in device memory (device_memory.cuh) and moves them with the CUDA
// algorithms (select_k, compact, decode_scores) plus the store kernels
// (detail/kernels/store.cuh). The host only
// sees the two layer statistics per prefill (to compute the budgets), the layer's
// scores when budgets are head-wise (the head lengths are decided on the host) and,
// at the end of a cascading prefill in position order, the positions it sorts.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "../../policy/indicator/window_mean.hpp"
#include "../host/layer_store.hpp"
#include "compact.cuh"
#include "decode_scores.cuh"
#include "detail/dispatch.cuh"
#include "detail/kernels/store.cuh"
#include "device_memory.cuh"
#include "select_k.cuh"

namespace cake {
namespace cuda_detail {

// One layer on the device; the same layout as HostLayer.
template <class T>
struct DeviceLayer {
  index_t rows = 0, d = 0, cap = 0, held = 0;
  device_buffer<T> k, v;       // (rows, cap, d)
  device_buffer<index_t> pos;  // (rows, cap)
  device_buffer<float> ind;    // (rows, cap) score of each held token, or empty
  // (rows) tokens of each row, kept on the host, where lengths are decided; `held` is
  // the longest. Rows differ only with head-wise budgets; slots past a row's length
  // are then padding, as on the host: position -1, zero keys and values.
  std::vector<index_t> len;
  bool by_indicator = false;
  bool cut = false;

  // A layer not prefilled yet has no rows: it holds nothing.
  index_t row_len(index_t r) const { return len.empty() ? 0 : len[static_cast<std::size_t>(r)]; }
  index_t total() const { return std::accumulate(len.begin(), len.end(), index_t{0}); }
  void set_length(index_t n) {
    held = n;
    std::fill(len.begin(), len.end(), n);
  }

  DeviceLayer() = default;
  DeviceLayer(index_t rows_, index_t d_, index_t cap_, bool with_indicator, const cuda_policy& exec)
      : rows(rows_),
        d(d_),
        cap(cap_),
        k(rows_ * cap_ * d_, exec),
        v(rows_ * cap_ * d_, exec),
        pos(rows_ * cap_, exec),
        ind(with_indicator ? rows_ * cap_ : 0, exec),
        len(static_cast<std::size_t>(rows_), 0) {
    // Slots whose token has no score read 0, as on the host.
    if (ind.size() > 0)
      check(cudaMemsetAsync(ind.data(), 0, static_cast<std::size_t>(ind.size()) * sizeof(float),
                            stream_of(exec)),
            "cudaMemsetAsync (KvCache scores)");
  }

  template <class U>
  device_view<U, 4> tokens_view(U* base, index_t B, index_t Hkv, index_t n) const {
    const index_t c = std::max<index_t>(cap, 1), dd = std::max<index_t>(d, 1);
    return make_view<device_space>(base, std::array<index_t, 4>{B, Hkv, n, d},
                                   std::array<index_t, 4>{Hkv * c * dd, c * dd, dd, 1});
  }
};

}  // namespace cuda_detail

namespace detail {

template <class T>
struct layer_store<T, cuda_policy> {
  using layer = cuda_detail::DeviceLayer<T>;
  using space = device_space;
  template <class U>
  using buffer = cuda_detail::device_buffer<U>;
  using resources = cuda_detail::cache_pool;
  // The reorder to position order, truncation included: gathered while planning
  // into a layer of its own, so that committing it is a swap.
  struct permutation {
    layer target;
    bool done = false;
    bool empty() const noexcept { return !done; }
  };
  // Every truncation of a prefill's commit: one launch of truncate_rows_kernel.
  struct truncation {
    buffer<cuda_detail::truncate_job<T>> jobs;
    std::vector<cuda_detail::truncate_job<T>> host_jobs;
    std::vector<std::size_t> layers;        // which layers change
    std::vector<index_t> held;              // their new longest row
    std::vector<std::vector<index_t>> len;  // their new row lengths (ragged)
  };

  static cudaStream_t stream(const cuda_policy& e) { return cuda_detail::stream_of(e); }

  template <class U>
  static buffer<U> make_buffer(const cuda_policy& exec, index_t n) {
    return buffer<U>(n, exec);
  }
  template <class U>
  static U* data(const buffer<U>& b) {
    return b.data();
  }
  template <class U>
  static void fill(const cuda_policy& exec, buffer<U>& b, U value) {
    if (b.size() == 0) return;
    cuda_detail::fill_kernel<U>
        <<<cuda_detail::small_grid(b.size()), 256, 0, stream(exec)>>>(b.data(), b.size(), value);
    cuda_detail::check_launch("fill_kernel");
  }
  static void read(const cuda_policy& exec, const buffer<float>& b, float* out, index_t n) {
    cuda_detail::check(cudaMemcpyAsync(out, b.data(), static_cast<std::size_t>(n) * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream(exec)),
                       "cudaMemcpyAsync (layer statistics)");
    cuda_detail::check(cudaStreamSynchronize(stream(exec)), "window_stats (layer statistics)");
  }

  // Each tensor scanned by one kernel into its own slot; one flag read (one sync)
  // for all of them. Only when one holds a NaN, an Inf or (queries, keys) a value
  // past detail::score_bound is its value read back.
  template <class... V>
  static status check_finite(const cuda_policy& exec, const named_view<V>&... t) {
    constexpr std::size_t N = sizeof...(V);
    buffer<unsigned long long> first(static_cast<index_t>(N), exec);
    cuda_detail::check(
        cudaMemsetAsync(first.data(), 0xff, N * sizeof(unsigned long long), stream(exec)),
        "cudaMemsetAsync (finite check)");
    std::size_t i = 0;
    (launch_find(exec, t.v, t.bound, first.data() + i++), ...);
    std::array<unsigned long long, N> at{};
    cuda_detail::check(cudaMemcpyAsync(at.data(), first.data(), N * sizeof(unsigned long long),
                                       cudaMemcpyDeviceToHost, stream(exec)),
                       "cudaMemcpyAsync (finite check)");
    cuda_detail::check(cudaStreamSynchronize(stream(exec)), "find_non_finite_kernel");
    status st;
    i = 0;
    (void)((st = report_non_finite(t, at[i++])).ok() && ...);
    return st;
  }

  template <class KV, class VV>
  static layer copy_all(const cuda_policy& exec, const LayerShape& sh, const KV& k, const VV& v,
                        token_scores sc) {
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, S = k.extent(2);
    layer out(sh.rows(), d, S + 1, sc.p != nullptr, exec);
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < Hkv; ++g) {
        const index_t r = b * Hkv + g;
        const std::size_t row = static_cast<std::size_t>(d) * sizeof(T);
        cuda_detail::check(
            cudaMemcpy2DAsync(out.k.data() + r * out.cap * d, row, &k(b, g, 0, 0),
                              static_cast<std::size_t>(k.stride(2)) * sizeof(T), row,
                              static_cast<std::size_t>(S), cudaMemcpyDeviceToDevice, stream(exec)),
            "cudaMemcpy2DAsync (KvCache keys)");
        cuda_detail::check(
            cudaMemcpy2DAsync(out.v.data() + r * out.cap * d, row, &v(b, g, 0, 0),
                              static_cast<std::size_t>(v.stride(2)) * sizeof(T), row,
                              static_cast<std::size_t>(S), cudaMemcpyDeviceToDevice, stream(exec)),
            "cudaMemcpy2DAsync (KvCache values)");
      }
    if (sc.p && sc.cols > 0)
      cuda_detail::check(
          cudaMemcpy2DAsync(out.ind.data(), static_cast<std::size_t>(out.cap) * sizeof(float), sc.p,
                            static_cast<std::size_t>(sc.ld) * sizeof(float),
                            static_cast<std::size_t>(sc.cols) * sizeof(float),
                            static_cast<std::size_t>(sh.rows()), cudaMemcpyDeviceToDevice,
                            stream(exec)),
          "cudaMemcpy2DAsync (KvCache indicator)");
    cuda_detail::iota_rows_kernel<<<cuda_detail::small_grid(sh.rows() * S), 256, 0, stream(exec)>>>(
        out.pos.data(), sh.rows(), out.cap, S);
    cuda_detail::check_launch("iota_rows_kernel");
    out.set_length(S);
    return out;
  }

  // The host store's select(): equal rows take one top-k for all of them; ragged
  // rows (head-wise) one each, their window and padding placed by one kernel.
  template <class KV, class VV>
  static layer select(const cuda_policy& exec, const LayerShape& sh, const KV& k, const VV& v,
                      const layer* src, token_scores sc, index_t P, std::span<const index_t> keep,
                      bool position_order, bool keep_scores) {
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window;
    const index_t rows = sh.rows(), most = *std::max_element(keep.begin(), keep.end()),
                  n = most + w;
    const bool ragged = *std::min_element(keep.begin(), keep.end()) != most;
    const cudaStream_t s = stream(exec);
    const auto order = position_order ? select_order::position : select_order::descending;
    buffer<index_t> sel(rows * n, exec);  // (rows, n)
    buffer<index_t> keeps(ragged ? rows : 0, exec);
    layer out(rows, d, n + 1, keep_scores, exec);
    const auto top = [&](index_t r0, index_t nr, index_t kr) {
      select_k(exec,
               make_view<device_space>(sc.p + r0 * sc.ld, std::array<index_t, 2>{nr, P},
                                       std::array<index_t, 2>{sc.ld, 1}),
               make_view<device_space>(sel.data() + r0 * n, std::array<index_t, 2>{nr, kr},
                                       std::array<index_t, 2>{n, 1}),
               order);
    };
    if (!ragged) {
      top(0, rows, most);
    } else {
      for (index_t r = 0; r < rows; ++r) top(r, 1, keep[static_cast<std::size_t>(r)]);
      cuda_detail::check(cudaMemcpyAsync(keeps.data(), keep.data(),
                                         static_cast<std::size_t>(rows) * sizeof(index_t),
                                         cudaMemcpyHostToDevice, s),
                         "cudaMemcpyAsync (head-wise lengths)");
    }
    cuda_detail::window_slots_kernel<<<cuda_detail::small_grid(rows * n), 256, 0, s>>>(
        sel.data(), rows, n, ragged ? keeps.data() : nullptr, most, w, P);
    cuda_detail::check_launch("window_slots_kernel");
    auto keep_v = make_view<device_space>(static_cast<const index_t*>(sel.data()),
                                          std::array<index_t, 3>{B, Hkv, n});
    compact(exec, k, keep_v, out.tokens_view(out.k.data(), B, Hkv, n));
    compact(exec, v, keep_v, out.tokens_view(out.v.data(), B, Hkv, n));
    cuda_detail::gather_meta_kernel<<<cuda_detail::small_grid(rows * n), 256, 0, s>>>(
        out.pos.data(), keep_scores ? out.ind.data() : nullptr, out.cap, sel.data(), rows, n,
        src ? src->pos.data() : nullptr, src ? src->cap : 0, sc.p, sc.ld, sc.cols);
    cuda_detail::check_launch("gather_meta_kernel");
    for (index_t r = 0; r < rows; ++r) {
      out.len[static_cast<std::size_t>(r)] = keep[static_cast<std::size_t>(r)] + w;
      pad_row(exec, out, r, out.row_len(r), n);
    }
    out.by_indicator = !position_order;
    out.cut = true;
    out.held = n;
    if (ragged) cuda_detail::check(cudaStreamSynchronize(s), "select");  // keep's upload
    return out;
  }

  static device_view<const T, 4> keys(const layer& ly, const LayerShape& sh) {
    return ly.tokens_view(static_cast<const T*>(ly.k.data()), sh.batch, sh.kv_heads, ly.held);
  }
  static device_view<const T, 4> values(const layer& ly, const LayerShape& sh) {
    return ly.tokens_view(static_cast<const T*>(ly.v.data()), sh.batch, sh.kv_heads, ly.held);
  }
  static device_view<const index_t, 3> positions(const layer& ly, const LayerShape& sh) {
    const index_t c = std::max<index_t>(ly.cap, 1);
    return make_view<device_space>(static_cast<const index_t*>(ly.pos.data()),
                                   std::array<index_t, 3>{sh.batch, sh.kv_heads, ly.held},
                                   std::array<index_t, 3>{sh.kv_heads * c, c, 1});
  }
  static token_scores scores(const layer& ly) { return {ly.ind.data(), ly.cap, ly.held}; }

  template <class Ind>
  static void position_scores(const cuda_policy& exec, const Ind& indicator, float* out, index_t ld,
                              index_t rows, index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::
        position_scores_kernel<<<cuda_detail::small_grid(rows * cols), 256, 0, stream(exec)>>>(
            indicator, nullptr, 0, out, ld, rows, cols);
    cuda_detail::check_launch("position_scores_kernel");
  }

  // The host store's attention_sums(): here window row by window row, each one the
  // decode-time scoring of that row against the keys it sees, added to the sums.
  template <class QV, class KV>
  static void attention_sums(const cuda_policy& exec, const QV& q, const KV& k, float* out,
                             index_t ld) {
    const index_t B = q.extent(0), H = q.extent(1), w = q.extent(2), d = q.extent(3);
    const index_t Hkv = k.extent(1), S = k.extent(2), P = S - w, rows = B * Hkv;
    const cudaStream_t s = stream(exec);
    buffer<float> row(rows * S, exec);
    // One workspace for every window row (the longest row's size): one allocation.
    const std::size_t ws_bytes = decode_scores_workspace_size(B, H, Hkv, S);
    buffer<char> ws(static_cast<index_t>(ws_bytes), exec);
    cuda_detail::check(cudaMemset2DAsync(out, static_cast<std::size_t>(ld) * sizeof(float), 0,
                                         static_cast<std::size_t>(S) * sizeof(float),
                                         static_cast<std::size_t>(rows), s),
                       "cudaMemset2DAsync (attention sums)");
    for (index_t i = 0; i < w; ++i) {
      const index_t seen = P + i + 1;
      decode_scores(
          exec,
          make_view<device_space>(q.data_handle() + i * static_cast<index_t>(q.stride(2)),
                                  std::array<index_t, 3>{B, H, d},
                                  std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                         static_cast<index_t>(q.stride(1)), 1}),
          make_view<device_space>(k.data_handle(), std::array<index_t, 4>{B, Hkv, seen, d},
                                  std::array<index_t, 4>{static_cast<index_t>(k.stride(0)),
                                                         static_cast<index_t>(k.stride(1)),
                                                         static_cast<index_t>(k.stride(2)), 1}),
          WindowMeanIndicator{1},
          make_view<device_space>(row.data(), std::array<index_t, 3>{B, Hkv, seen},
                                  std::array<index_t, 3>{Hkv * S, S, 1}),
          cuda_workspace{ws.data(), ws_bytes});
      accumulate(exec, out, ld, row.data(), S, rows, seen);
    }
  }

  static void accumulate(const cuda_policy& exec, float* dst, index_t dst_ld, const float* src,
                         index_t src_ld, index_t rows, index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::accumulate_kernel<float>
        <<<cuda_detail::small_grid(rows * cols), 256, 0, stream(exec)>>>(dst, dst_ld, src, src_ld,
                                                                         rows, cols);
    cuda_detail::check_launch("accumulate_kernel");
  }

  // The truncations a prefill plan asks for (row r of layer l keeps prefix[r]
  // prefix tokens), as jobs on the device; layers that a permutation replaces are
  // left out (their target holds them truncated already).
  static truncation prepare_truncate(const cuda_policy& exec, std::span<const layer> layers,
                                     const LayerShape& sh, std::span<const layer_plan> plan,
                                     std::span<const permutation> perms) {
    const index_t w = sh.window;
    truncation tr;
    for (std::size_t l = 0; l < plan.size() && l < layers.size(); ++l) {
      if (plan[l].action != layer_action::truncate || !perms[l].empty()) continue;
      const layer& ly = layers[l];
      index_t longest = 0;
      std::vector<index_t> len;
      for (index_t r = 0; r < ly.rows; ++r) longest = std::max(longest, row_prefix(plan[l], r) + w);
      for (index_t r = 0; r < ly.rows; ++r) {
        const index_t p = row_prefix(plan[l], r), old = ly.row_len(r);
        if (p + w != old) {  // freed slots below the new longest row become padding
          const index_t off = r * ly.cap;
          tr.host_jobs.push_back({ly.k.data() + off * ly.d, ly.v.data() + off * ly.d,
                                  ly.pos.data() + off,
                                  ly.ind.size() ? ly.ind.data() + off : nullptr, old - w, p,
                                  std::max(p + w, std::min(old, longest))});
        }
        len.push_back(p + w);
      }
      tr.layers.push_back(l);
      tr.held.push_back(longest);
      tr.len.push_back(std::move(len));
    }
    tr.jobs = buffer<cuda_detail::truncate_job<T>>(static_cast<index_t>(tr.host_jobs.size()), exec);
    if (!tr.host_jobs.empty())
      cuda_detail::check(cudaMemcpyAsync(tr.jobs.data(), tr.host_jobs.data(),
                                         tr.host_jobs.size() * sizeof(tr.host_jobs[0]),
                                         cudaMemcpyHostToDevice, stream(exec)),
                         "cudaMemcpyAsync (truncation jobs)");
    return tr;
  }

  // The one step of a prefill's commit that can fail: a single launch. A launch that
  // fails runs nothing, so it throws with every layer as it was; after it, only
  // host bookkeeping changes.
  static void truncate(const cuda_policy& exec, std::span<layer> layers, const LayerShape& sh,
                       truncation& tr) {
    if (!tr.host_jobs.empty()) {
      cuda_detail::truncate_rows_kernel<T>
          <<<static_cast<unsigned>(tr.host_jobs.size()), 128, 0, stream(exec)>>>(
              tr.jobs.data(), layers.empty() ? 0 : layers[0].d, sh.window);
      cuda_detail::check_launch("truncate_rows_kernel");
    }
    for (std::size_t i = 0; i < tr.layers.size(); ++i) {
      layer& ly = layers[tr.layers[i]];
      ly.held = tr.held[i];
      ly.len.swap(tr.len[i]);
    }
  }

  // The layer truncated to prefix[r] per row and its prefix sorted by position,
  // gathered into a new layer while planning (positions read back to the host, a few
  // KiB): the new order of each row's first prefix[r] slots, then its window from
  // its current slots; a ragged row's padding gathers its last token, then is cleared.
  static permutation position_permutation(const cuda_policy& exec, const layer& ly,
                                          const LayerShape& sh, std::span<const index_t> prefix) {
    const cudaStream_t s = stream(exec);
    const index_t rows = ly.rows, w = sh.window;
    std::vector<index_t> pos(static_cast<std::size_t>(rows * ly.cap));
    cuda_detail::check(cudaMemcpyAsync(pos.data(), ly.pos.data(), pos.size() * sizeof(index_t),
                                       cudaMemcpyDeviceToHost, s),
                       "cudaMemcpyAsync (positions)");
    cuda_detail::check(cudaStreamSynchronize(s), "position_permutation");
    index_t n = 0;
    for (index_t p : prefix) n = std::max(n, p + w);
    std::vector<index_t> keep(static_cast<std::size_t>(rows * n));
    permutation perm;
    perm.target = layer(rows, ly.d, n + 1, ly.ind.size() > 0, exec);
    for (index_t r = 0; r < rows; ++r) {
      const index_t pr = prefix[static_cast<std::size_t>(r)], old = ly.row_len(r) - w;
      index_t* kr = keep.data() + r * n;
      std::iota(kr, kr + pr, index_t{0});
      const index_t* p = pos.data() + r * ly.cap;
      std::sort(kr, kr + pr, [p](index_t a, index_t b) { return p[a] < p[b]; });
      for (index_t t = pr; t < n; ++t) kr[t] = old + std::min(t - pr, w - 1);
      perm.target.len[static_cast<std::size_t>(r)] = pr + w;
    }
    buffer<index_t> dkeep(rows * n, exec);
    cuda_detail::check(cudaMemcpyAsync(dkeep.data(), keep.data(), keep.size() * sizeof(index_t),
                                       cudaMemcpyHostToDevice, s),
                       "cudaMemcpyAsync (permutation)");
    auto keep_v = make_view<device_space>(static_cast<const index_t*>(dkeep.data()),
                                          std::array<index_t, 3>{sh.batch, sh.kv_heads, n});
    layer& out = perm.target;
    compact(exec, keys(ly, sh), keep_v, out.tokens_view(out.k.data(), sh.batch, sh.kv_heads, n));
    compact(exec, values(ly, sh), keep_v, out.tokens_view(out.v.data(), sh.batch, sh.kv_heads, n));
    cuda_detail::gather_meta_kernel<<<cuda_detail::small_grid(rows * n), 256, 0, s>>>(
        out.pos.data(), out.ind.size() ? out.ind.data() : nullptr, out.cap, dkeep.data(), rows, n,
        ly.pos.data(), ly.cap, ly.ind.data(), ly.cap, ly.held);
    cuda_detail::check_launch("gather_meta_kernel");
    for (index_t r = 0; r < rows; ++r) pad_row(exec, out, r, out.row_len(r), n);
    out.held = n;
    out.cut = true;
    // The host copy of keep must outlive the upload before it goes.
    cuda_detail::check(cudaStreamSynchronize(s), "position_permutation");
    perm.done = true;
    return perm;
  }

  // Commits a planned permutation: the layer becomes its gathered copy.
  static void permute(const cuda_policy&, layer& ly, const LayerShape&,
                      permutation& perm) noexcept {
    ly = std::move(perm.target);
  }

  static void finish_prefill(layer& ly, bool keep_scores) noexcept {
    if (!keep_scores) ly.ind = buffer<float>();
  }

  // One decoding step; the host store's decode() says what it does. As there,
  // everything that can fail runs before a visible write: every buffer is allocated
  // first, the new token waits in the spare slot past `held` and new sums go to a
  // scratch buffer. Position order then evicts in place, in one launch
  // (evict_in_place_kernel: the kept slots are ascending); reference order permutes
  // the kept tokens, so they are gathered into a fresh layer.
  template <class Ind, class QV, class KV, class VV>
  static void decode(const cuda_policy& exec, layer& ly, const LayerShape& sh, const QV& q,
                     const KV& k, const VV& v, index_t position, index_t budget,
                     const Ind& indicator, bool reference, bool keep_lengths) {
    if (keep_lengths || !uniform(ly))
      return decode_rows(exec, ly, sh, q, k, v, position, indicator, reference);
    constexpr indicator_source source = indicator_source_of<Ind>;
    constexpr bool accumulates = source == indicator_source::accumulated;
    const index_t B = sh.batch, Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window;
    const index_t rows = sh.rows(), held = ly.held + 1;
    const bool evict = held > budget + w;
    const index_t cand = held - w, keep = std::min(budget, cand), n = keep + w;
    const cudaStream_t s = stream(exec);

    if (held > ly.cap) ly = regrow(exec, ly, std::max(held, std::min(2 * ly.cap, budget + w + 1)));
    // (rows, held): the candidates' scores, or (accumulating) the new query's
    // attention to every held token; sums: the updated sums, (rows, held).
    buffer<float> scores(evict || accumulates ? rows * held : 0, exec);
    buffer<float> sums(accumulates ? rows * held : 0, exec);
    buffer<index_t> sel(evict ? rows * n : 0, exec);
    constexpr bool attends =
        source != indicator_source::position && source != indicator_source::custom;
    const std::size_t ws_bytes = attends && (evict || accumulates)
                                     ? decode_scores_workspace_size(B, q.extent(1), Hkv, held)
                                     : 0;
    buffer<char> ws(static_cast<index_t>(ws_bytes), exec);
    const cuda_workspace dws{ws.data(), ws_bytes};
    layer next;
    if (evict && reference) next = layer(rows, d, ly.cap, accumulates, exec);

    cuda_detail::append_token_kernel<T><<<static_cast<unsigned>(rows), 128, 0, s>>>(
        ly.k.data(), ly.v.data(), ly.pos.data(), ly.cap, d, Hkv, held - 1, k.data_handle(),
        k.stride(0), k.stride(1), v.data_handle(), v.stride(0), v.stride(1), position);
    cuda_detail::check_launch("append_token_kernel");
    const auto all_keys = ly.tokens_view(static_cast<const T*>(ly.k.data()), B, Hkv, held);
    const auto all_values = ly.tokens_view(static_cast<const T*>(ly.v.data()), B, Hkv, held);

    const float* ranked = scores.data();
    index_t ranked_ld = cand;
    if constexpr (accumulates) {
      // sums = the held sums, 0 for the new token, plus every token's new attention.
      cuda_detail::check(
          cudaMemcpy2DAsync(sums.data(), static_cast<std::size_t>(held) * sizeof(float),
                            ly.ind.data(), static_cast<std::size_t>(ly.cap) * sizeof(float),
                            static_cast<std::size_t>(held - 1) * sizeof(float),
                            static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
          "cudaMemcpy2DAsync (accumulated scores)");
      cuda_detail::check(cudaMemset2DAsync(sums.data() + (held - 1),
                                           static_cast<std::size_t>(held) * sizeof(float), 0,
                                           sizeof(float), static_cast<std::size_t>(rows), s),
                         "cudaMemset2DAsync (accumulated scores)");
      decode_scores(exec, q, all_keys, indicator,
                    make_view<device_space>(scores.data(), std::array<index_t, 3>{B, Hkv, held}),
                    dws);
      accumulate(exec, sums.data(), held, scores.data(), held, rows, held);
      ranked = sums.data();
      ranked_ld = held;
    }
    if (!evict) {
      if constexpr (accumulates)
        cuda_detail::check(
            cudaMemcpy2DAsync(ly.ind.data(), static_cast<std::size_t>(ly.cap) * sizeof(float),
                              sums.data(), static_cast<std::size_t>(held) * sizeof(float),
                              static_cast<std::size_t>(held) * sizeof(float),
                              static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
            "cudaMemcpy2DAsync (accumulated scores)");
      ly.set_length(held);
      return;
    }
    if constexpr (source == indicator_source::position) {
      cuda_detail::position_scores_kernel<<<cuda_detail::small_grid(rows * cand), 256, 0, s>>>(
          indicator, ly.pos.data(), ly.cap, scores.data(), cand, rows, cand);
      cuda_detail::check_launch("position_scores_kernel");
    } else if constexpr (!accumulates) {
      candidate_scores(exec, q, all_keys, indicator,
                       make_view<device_space>(scores.data(), std::array<index_t, 3>{B, Hkv, cand}),
                       dws);
    }
    select_k(exec,
             make_view<device_space>(ranked, std::array<index_t, 2>{rows, cand},
                                     std::array<index_t, 2>{ranked_ld, 1}),
             make_view<device_space>(sel.data(), std::array<index_t, 2>{rows, keep},
                                     std::array<index_t, 2>{n, 1}),
             reference ? select_order::descending : select_order::position);
    cuda_detail::window_slots_kernel<<<cuda_detail::small_grid(rows * n), 256, 0, s>>>(
        sel.data(), rows, n, nullptr, keep, w, cand);
    cuda_detail::check_launch("window_slots_kernel");
    if (!reference) {
      // A failed launch runs nothing: the layer is unchanged (the new token sits past
      // `held`). After it, only `held` changes.
      cuda_detail::evict_in_place_kernel<T, 4><<<static_cast<unsigned>(rows), 256, 0, s>>>(
          ly.k.data(), ly.v.data(), ly.pos.data(), accumulates ? ly.ind.data() : nullptr,
          accumulates ? sums.data() : nullptr, held, ly.cap, d, sel.data(), n);
      cuda_detail::check_launch("evict_in_place_kernel");
      ly.set_length(n);
      return;
    }
    auto keep_v = make_view<device_space>(static_cast<const index_t*>(sel.data()),
                                          std::array<index_t, 3>{B, Hkv, n});
    compact(exec, all_keys, keep_v, next.tokens_view(next.k.data(), B, Hkv, n));
    compact(exec, all_values, keep_v, next.tokens_view(next.v.data(), B, Hkv, n));
    cuda_detail::gather_meta_kernel<<<cuda_detail::small_grid(rows * n), 256, 0, s>>>(
        next.pos.data(), accumulates ? next.ind.data() : nullptr, next.cap, sel.data(), rows, n,
        ly.pos.data(), ly.cap, sums.data(), held, held);
    cuda_detail::check_launch("gather_meta_kernel");
    next.set_length(n);
    next.by_indicator = ly.by_indicator;
    next.cut = ly.cut;  // a replacement keeps what the layer is (head-wise decode reads it)
    ly = std::move(next);
  }

  // ---- ragged layers (head-wise allocation): the host store's counterparts, row
  // by row with the same kernels as the uniform path ------------------------------

  // Scores as a dense host array (rows, cols): head-wise lengths are decided on the host.
  static std::vector<float> download(const cuda_policy& exec, token_scores sc, index_t rows,
                                     index_t cols) {
    std::vector<float> out(static_cast<std::size_t>(rows * cols));
    if (rows * cols == 0) return out;
    cuda_detail::check(
        cudaMemcpy2DAsync(out.data(), static_cast<std::size_t>(cols) * sizeof(float), sc.p,
                          static_cast<std::size_t>(sc.ld) * sizeof(float),
                          static_cast<std::size_t>(cols) * sizeof(float),
                          static_cast<std::size_t>(rows), cudaMemcpyDeviceToHost, stream(exec)),
        "cudaMemcpy2DAsync (head-wise scores)");
    cuda_detail::check(cudaStreamSynchronize(stream(exec)), "head-wise allocation");
    return out;
  }

 private:
  static bool uniform(const layer& ly) {
    return std::all_of(ly.len.begin(), ly.len.end(), [&](index_t x) { return x == ly.held; });
  }

  template <class V>
  static void launch_find(const cuda_policy& exec, const V& v, float bound,
                          unsigned long long* first) {
    constexpr std::size_t R = V::rank();
    long long e[4] = {1, 1, 1, 1}, s[4] = {0, 0, 0, 0};
    for (std::size_t r = 0; r < R; ++r) {
      e[4 - R + r] = v.extent(r);
      s[4 - R + r] = v.stride(r);
    }
    const long long n = e[0] * e[1] * e[2] * e[3];
    if (n == 0) return;
    cuda_detail::find_non_finite_kernel<<<cuda_detail::small_grid(n), 256, 0, stream(exec)>>>(
        v.data_handle(), e[0], e[1], e[2], e[3], s[0], s[1], s[2], s[3], bound, first);
    cuda_detail::check_launch("find_non_finite_kernel");
  }
  // A status naming the first non-finite element, flat index `at` (~0: none).
  template <class V>
  static status report_non_finite(const named_view<V>& t, unsigned long long at) {
    if (at == ~0ull) return status::success();
    constexpr std::size_t R = V::rank();
    std::array<index_t, R> idx{};
    auto rem = static_cast<long long>(at);
    for (std::size_t r = R; r-- > 0;) {
      idx[r] = rem % t.v.extent(r);
      rem /= t.v.extent(r);
    }
    std::remove_const_t<typename V::element_type> bad{};
    cuda_detail::check(cudaMemcpy(&bad, element_ptr(t.v, idx), sizeof(bad), cudaMemcpyDeviceToHost),
                       "cudaMemcpy (finite check)");
    std::string coords;
    for (std::size_t r = 0; r < R; ++r) coords.append(r ? ", " : "").append(std::to_string(idx[r]));
    return out_of_bound_status(t, static_cast<float>(bad), coords);
  }

  // A copy of ly with a larger capacity (every slot up to ly.held, scores and row
  // lengths included).
  static layer regrow(const cuda_policy& exec, const layer& ly, index_t cap) {
    const cudaStream_t s = stream(exec);
    const index_t rows = ly.rows, d = ly.d;
    layer grown(rows, d, cap, ly.ind.size() > 0, exec);
    const std::size_t row = static_cast<std::size_t>(ly.held * d) * sizeof(T);
    if (ly.held > 0) {
      cuda_detail::check(
          cudaMemcpy2DAsync(grown.k.data(), static_cast<std::size_t>(cap * d) * sizeof(T),
                            ly.k.data(), static_cast<std::size_t>(ly.cap * d) * sizeof(T), row,
                            static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
          "cudaMemcpy2DAsync (KvCache regrow)");
      cuda_detail::check(
          cudaMemcpy2DAsync(grown.v.data(), static_cast<std::size_t>(cap * d) * sizeof(T),
                            ly.v.data(), static_cast<std::size_t>(ly.cap * d) * sizeof(T), row,
                            static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
          "cudaMemcpy2DAsync (KvCache regrow)");
      cuda_detail::check(
          cudaMemcpy2DAsync(grown.pos.data(), static_cast<std::size_t>(cap) * sizeof(index_t),
                            ly.pos.data(), static_cast<std::size_t>(ly.cap) * sizeof(index_t),
                            static_cast<std::size_t>(ly.held) * sizeof(index_t),
                            static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
          "cudaMemcpy2DAsync (KvCache regrow)");
      if (ly.ind.size() > 0)
        cuda_detail::check(
            cudaMemcpy2DAsync(grown.ind.data(), static_cast<std::size_t>(cap) * sizeof(float),
                              ly.ind.data(), static_cast<std::size_t>(ly.cap) * sizeof(float),
                              static_cast<std::size_t>(ly.held) * sizeof(float),
                              static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, s),
            "cudaMemcpy2DAsync (KvCache regrow)");
    }
    grown.held = ly.held;
    grown.len = ly.len;
    grown.by_indicator = ly.by_indicator;
    grown.cut = ly.cut;
    return grown;
  }

  // Slots [from, to) of row r become padding.
  static void pad_row(const cuda_policy& exec, layer& ly, index_t r, index_t from, index_t to) {
    if (from >= to) return;
    const index_t off = r * ly.cap;
    cuda_detail::pad_slots_kernel<T>
        <<<cuda_detail::small_grid((to - from) * ly.d), 256, 0, stream(exec)>>>(
            ly.k.data() + off * ly.d, ly.v.data() + off * ly.d, ly.pos.data() + off,
            ly.ind.size() ? ly.ind.data() + off : nullptr, ly.d, from, to);
    cuda_detail::check_launch("pad_slots_kernel");
  }

  // decode() on a ragged layer: every row keeps its length, appends the new token and
  // evicts one candidate, row by row; the kept tokens and their sums are gathered into
  // a fresh layer, so the layer changes only at the end. The new token waits in each
  // row's first padding slot, cleared again if anything fails.
  template <class Ind, class QV, class KV, class VV>
  static void decode_rows(const cuda_policy& exec, layer& ly, const LayerShape& sh, const QV& q,
                          const KV& k, const VV& v, index_t position, const Ind& indicator,
                          bool reference) {
    constexpr indicator_source source = indicator_source_of<Ind>;
    constexpr bool accumulates = source == indicator_source::accumulated;
    const index_t Hkv = sh.kv_heads, d = sh.head_dim, w = sh.window, rows = sh.rows();
    const index_t grp = q.extent(1) / Hkv;
    const cudaStream_t s = stream(exec);
    index_t longest = 0;
    for (index_t x : ly.len) longest = std::max(longest, x + 1);
    if (longest > ly.cap) ly = regrow(exec, ly, longest);
    buffer<float> scores(longest, exec);
    buffer<float> sums(accumulates ? longest : 0, exec);  // one row's updated sums
    buffer<index_t> sel(longest, exec);
    const std::size_t ws_bytes =
        source != indicator_source::position && source != indicator_source::custom
            ? decode_scores_workspace_size(1, grp, 1, longest)
            : 0;
    buffer<char> ws(static_cast<index_t>(ws_bytes), exec);  // every row's decode scores
    const cuda_workspace dws{ws.data(), ws_bytes};
    layer next(rows, d, ly.cap, accumulates, exec);
    next.len = ly.len;
    index_t written = 0;  // rows whose first padding slot holds the new token
    try {
      for (index_t r = 0; r < rows; ++r) {
        const index_t b = r / Hkv, g = r % Hkv;
        const index_t n = ly.row_len(r) + 1, cand = n - w, keep = cand - 1;
        T* kr = ly.k.data() + r * ly.cap * d;
        T* vr = ly.v.data() + r * ly.cap * d;
        index_t* pr = ly.pos.data() + r * ly.cap;
        const float* sr = accumulates ? ly.ind.data() + r * ly.cap : nullptr;
        // append_token_kernel writes row blockIdx.x = 0 of the pointers it is given.
        cuda_detail::append_token_kernel<T><<<1, 128, 0, s>>>(
            kr, vr, pr, ly.cap, d, Hkv, n - 1, k.data_handle() + b * k.stride(0) + g * k.stride(1),
            k.stride(0), k.stride(1), v.data_handle() + b * v.stride(0) + g * v.stride(1),
            v.stride(0), v.stride(1), position);
        written = r + 1;
        cuda_detail::check_launch("append_token_kernel");
        const auto qv =
            make_view<device_space>(q.data_handle() + b * q.stride(0) + g * grp * q.stride(1),
                                    std::array<index_t, 3>{1, grp, d},
                                    std::array<index_t, 3>{static_cast<index_t>(q.stride(0)),
                                                           static_cast<index_t>(q.stride(1)), 1});
        const auto kv =
            make_view<device_space>(static_cast<const T*>(kr), std::array<index_t, 4>{1, 1, n, d},
                                    std::array<index_t, 4>{n * d, n * d, d, 1});
        const float* ranked = scores.data();
        if constexpr (accumulates) {
          cuda_detail::check(
              cudaMemcpyAsync(sums.data(), sr, static_cast<std::size_t>(n - 1) * sizeof(float),
                              cudaMemcpyDeviceToDevice, s),
              "cudaMemcpyAsync (accumulated scores)");
          cuda_detail::check(cudaMemsetAsync(sums.data() + n - 1, 0, sizeof(float), s),
                             "cudaMemsetAsync (accumulated scores)");
          decode_scores(exec, qv, kv, indicator,
                        make_view<device_space>(scores.data(), std::array<index_t, 3>{1, 1, n}),
                        dws);
          accumulate(exec, sums.data(), n, scores.data(), n, 1, n);
          ranked = sums.data();
        } else if constexpr (source == indicator_source::position) {
          cuda_detail::position_scores_kernel<<<cuda_detail::small_grid(cand), 256, 0, s>>>(
              indicator, pr, cand, scores.data(), cand, 1, cand);
          cuda_detail::check_launch("position_scores_kernel");
        } else {
          candidate_scores(
              exec, qv, kv, indicator,
              make_view<device_space>(scores.data(), std::array<index_t, 3>{1, 1, cand}), dws);
        }
        select_k(exec, make_view<device_space>(ranked, std::array<index_t, 2>{1, cand}),
                 make_view<device_space>(sel.data(), std::array<index_t, 2>{1, keep}),
                 reference ? select_order::descending : select_order::position);
        cuda_detail::window_slots_kernel<<<1, 256, 0, s>>>(sel.data(), 1, n - 1, nullptr, keep, w,
                                                           cand);
        cuda_detail::check_launch("window_slots_kernel");
        const auto keep_v = make_view<device_space>(static_cast<const index_t*>(sel.data()),
                                                    std::array<index_t, 3>{1, 1, n - 1});
        const auto row_out = [&](T* base) {
          return make_view<device_space>(base + r * next.cap * d,
                                         std::array<index_t, 4>{1, 1, n - 1, d},
                                         std::array<index_t, 4>{next.cap * d, next.cap * d, d, 1});
        };
        compact(exec, kv, keep_v, row_out(next.k.data()));
        compact(
            exec,
            make_view<device_space>(static_cast<const T*>(vr), std::array<index_t, 4>{1, 1, n, d},
                                    std::array<index_t, 4>{n * d, n * d, d, 1}),
            keep_v, row_out(next.v.data()));
        cuda_detail::gather_meta_kernel<<<cuda_detail::small_grid(n - 1), 256, 0, s>>>(
            next.pos.data() + r * next.cap, accumulates ? next.ind.data() + r * next.cap : nullptr,
            next.cap, sel.data(), 1, n - 1, pr, ly.cap, sums.data(), longest, n);
        cuda_detail::check_launch("gather_meta_kernel");
        pad_row(exec, next, r, n - 1, ly.held);
      }
    } catch (...) {
      try {
        for (index_t r = 0; r < written; ++r)
          pad_row(exec, ly, r, ly.row_len(r), ly.row_len(r) + 1);
      } catch (...) {  // the first failure is the one to report
      }
      throw;
    }
    next.held = ly.held;
    next.by_indicator = ly.by_indicator;
    next.cut = ly.cut;  // else the next step would take the uniform path and grow the rows
    ly = std::move(next);
  }
};

}  // namespace detail
}  // namespace cake
