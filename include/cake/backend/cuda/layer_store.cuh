// The CUDA backend's primitives of the KvCache layers (detail/layer_ops.hpp lists
// them and writes the cache's data movement over them once): buffers in device
// memory (device_memory.cuh), kernels in detail/kernels/store.cuh, and the CUDA
// algorithms (select_k, compact, decode_scores). A paged layer's K/V are in the
// engine's device pools; the kernels reach them through slots<T>, whose block table
// is the cache's device copy (KvCache uploads it at each call, before any write).
// Nothing here synchronises except download() and the finite check's one flag read;
// the host sees the two layer statistics per prefill and, with head-wise budgets,
// the scores the head lengths are decided from.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "../host/layer_store.hpp"
#include "compact.cuh"
#include "decode_scores.cuh"
#include "detail/dispatch.cuh"
#include "detail/kernels/store.cuh"
#include "device_memory.cuh"
#include "select_k.cuh"

namespace cake::detail {

template <class T>
struct layer_store<T, cuda_policy> {
  template <class U>
  using buffer = cuda_detail::device_buffer<U>;
  using resources = cuda_detail::cache_pool;
  // A prefill's truncations on the device, run by one launch of truncate_rows_kernel.
  struct staged_moves {
    std::vector<window_move<T>> host;
    buffer<window_move<T>> jobs;
  };

  static cudaStream_t stream(const cuda_policy& e) { return cuda_detail::stream_of(e); }
  static unsigned grid(long long work) { return cuda_detail::small_grid(work); }
  static void launched(const char* kernel) { cuda_detail::check_launch(kernel); }

  // ---- memory --------------------------------------------------------------------
  template <class U>
  static buffer<U> make(const cuda_policy& exec, index_t n) {
    return buffer<U>(n, exec);
  }
  template <class U>
  static U* ptr(const buffer<U>& b) {
    return b.data();
  }
  template <class U>
  static index_t size(const buffer<U>& b) {
    return b.size();
  }
  template <class U>
  static void fill(const cuda_policy& exec, U* p, index_t n, U value) {
    if (n == 0) return;
    cuda_detail::fill_kernel<U><<<grid(n), 256, 0, stream(exec)>>>(p, n, value);
    launched("fill_kernel");
  }
  template <class U>
  static void upload(const cuda_policy& exec, const U* src, U* dst, index_t n) {
    if (n == 0) return;
    cuda_detail::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(U),
                                       cudaMemcpyHostToDevice, stream(exec)),
                       "cudaMemcpyAsync (KvCache upload)");
  }
  // dst (rows, cols) dense on the host = src (rows, cols), row stride src_ld; syncs.
  template <class U>
  static void download(const cuda_policy& exec, const U* src, index_t src_ld, U* dst, index_t rows,
                       index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::check(
        cudaMemcpy2DAsync(dst, static_cast<std::size_t>(cols) * sizeof(U), src,
                          static_cast<std::size_t>(src_ld) * sizeof(U),
                          static_cast<std::size_t>(cols) * sizeof(U),
                          static_cast<std::size_t>(rows), cudaMemcpyDeviceToHost, stream(exec)),
        "cudaMemcpy2DAsync (KvCache download)");
    cuda_detail::check(cudaStreamSynchronize(stream(exec)), "KvCache download");
  }
  template <class U>
  static void copy_2d(const cuda_policy& exec, const U* src, index_t src_ld, U* dst, index_t dst_ld,
                      index_t rows, index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::check(
        cudaMemcpy2DAsync(dst, static_cast<std::size_t>(dst_ld) * sizeof(U), src,
                          static_cast<std::size_t>(src_ld) * sizeof(U),
                          static_cast<std::size_t>(cols) * sizeof(U),
                          static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, stream(exec)),
        "cudaMemcpy2DAsync (KvCache)");
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

  // ---- tokens --------------------------------------------------------------------

  template <class KV, class VV>
  static void copy_prompt(const cuda_policy& exec, const KV& k, const VV& v, const slots<T>& out,
                          token_scores sc, index_t Hkv) {
    const index_t S = k.extent(2), d = out.d;
    // out.k null: the metadata of a paged layer, its prompt in the engine's pools.
    for (index_t r = 0; out.k && r < out.rows; ++r) {  // each (batch, kv-head) row: S rows of d
      const index_t b = r / Hkv, g = r % Hkv;
      copy_2d(exec, &k(b, g, 0, 0), static_cast<index_t>(k.stride(2)), out.k + r * out.cap * d, d,
              S, d);
      copy_2d(exec, &v(b, g, 0, 0), static_cast<index_t>(v.stride(2)), out.v + r * out.cap * d, d,
              S, d);
    }
    if (sc.p) copy_2d(exec, sc.p, sc.ld, out.ind, out.cap, out.rows, sc.cols);
    if (out.rows * S == 0) return;
    cuda_detail::iota_rows_kernel<<<grid(out.rows * S), 256, 0, stream(exec)>>>(out.pos, out.rows,
                                                                                out.cap, S);
    launched("iota_rows_kernel");
  }

  static void gather_meta(const cuda_policy& exec, const slots<T>& out, const index_t* sel,
                          index_t n, const index_t* src_pos, index_t src_cap, token_scores sc) {
    if (out.rows * n == 0) return;
    cuda_detail::gather_meta_kernel<<<grid(out.rows * n), 256, 0, stream(exec)>>>(
        out.pos, out.ind, out.cap, sel, out.rows, n, src_pos, src_cap, sc.p, sc.ld, sc.cols);
    launched("gather_meta_kernel");
  }

  // One launch (move_slots_kernel): a decoding step's commit, a paged layer's moves
  // (either side paged: its slots<T> carry the device copy of the block table).
  static void move_slots(const cuda_policy& exec, const slots<T>& dst, const slots<T>& src,
                         const float* src_ind, index_t src_ind_ld, const index_t* sel, index_t n,
                         const index_t* lens, index_t base) {
    if (dst.rows * n == 0) return;
    cuda_detail::move_slots_kernel<slots<T>, 4>
        <<<static_cast<unsigned>(dst.rows), 256, 0, stream(exec)>>>(dst, src, src_ind, src_ind_ld,
                                                                    sel, n, lens, base);
    launched("move_slots_kernel");
  }

  static void window_slots(const cuda_policy& exec, index_t* sel, index_t rows, index_t n,
                           const index_t* keeps, index_t keep, index_t w, const index_t* firsts,
                           index_t first) {
    if (rows * n == 0) return;
    cuda_detail::window_slots_kernel<<<grid(rows * n), 256, 0, stream(exec)>>>(
        sel, rows, n, keeps, keep, w, firsts, first);
    launched("window_slots_kernel");
  }

  static void sort_prefixes(const cuda_policy& exec, const index_t* in, index_t* out, index_t n,
                            index_t rows, const index_t* lens, const index_t* key, index_t key_ld) {
    if (rows * n == 0) return;
    cuda_detail::sort_prefix_kernel<<<static_cast<unsigned>(rows), 256, 0, stream(exec)>>>(
        in, out, n, lens, key, key_ld);
    launched("sort_prefix_kernel");
  }

  // The selection of a decoding step's ragged rows, one launch for all (see
  // select_ragged_kernel): row r keeps all but the lowest of its keeps[r] + 1
  // candidates, in the order select_k gives each row alone.
  static void select_ragged(const cuda_policy& exec, const float* ranked, index_t ld, index_t* sel,
                            index_t n, const index_t* keeps, index_t rows, select_order order) {
    if (rows == 0) return;
    cuda_detail::select_ragged_kernel<<<static_cast<unsigned>(rows),
                                        cuda_detail::select_ragged_threads, 0, stream(exec)>>>(
        ranked, ld, sel, n, keeps, order == select_order::descending);
    launched("select_ragged_kernel");
  }

  template <class KV, class VV>
  static void append(const cuda_policy& exec, const slots<T>& s, const KV& k, const VV& v,
                     index_t position, const index_t* lens, index_t slot, index_t Hkv) {
    cuda_detail::append_token_kernel<<<static_cast<unsigned>(s.rows), 128, 0, stream(exec)>>>(
        s, Hkv, lens, slot, k.data_handle(), static_cast<index_t>(k.stride(0)),
        static_cast<index_t>(k.stride(1)), v.data_handle(), static_cast<index_t>(v.stride(0)),
        static_cast<index_t>(v.stride(1)), position);
    launched("append_token_kernel");
  }

  static void pad(const cuda_policy& exec, const slots<T>& s, const index_t* from, index_t base,
                  index_t to) {
    if (s.rows == 0) return;
    cuda_detail::pad_rows_kernel<<<static_cast<unsigned>(s.rows), 128, 0, stream(exec)>>>(s, from,
                                                                                          base, to);
    launched("pad_rows_kernel");
  }

  static staged_moves stage_moves(const cuda_policy& exec, std::vector<window_move<T>>&& jobs) {
    staged_moves st{std::move(jobs), {}};
    st.jobs = buffer<window_move<T>>(static_cast<index_t>(st.host.size()), exec);
    upload(exec, st.host.data(), st.jobs.data(), static_cast<index_t>(st.host.size()));
    return st;
  }
  // The one step of a prefill's commit that can fail: a single launch, which runs
  // nothing when it fails.
  static void move_windows(const cuda_policy& exec, staged_moves& st, index_t d, index_t w) {
    if (st.host.empty()) return;
    cuda_detail::
        truncate_rows_kernel<<<static_cast<unsigned>(st.host.size()), 128, 0, stream(exec)>>>(
            st.jobs.data(), d, w);
    launched("truncate_rows_kernel");
  }

  // ---- scores --------------------------------------------------------------------

  template <class Ind>
  static void position_scores(const cuda_policy& exec, const Ind& indicator, const index_t* pos,
                              index_t pos_ld, float* out, index_t ld, index_t rows, index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::position_scores_kernel<<<grid(rows * cols), 256, 0, stream(exec)>>>(
        indicator, pos, pos_ld, out, ld, rows, cols);
    launched("position_scores_kernel");
  }

  static void accumulate(const cuda_policy& exec, float* dst, index_t dst_ld, const float* src,
                         index_t src_ld, index_t rows, index_t cols) {
    if (rows * cols == 0) return;
    cuda_detail::accumulate_kernel<float>
        <<<grid(rows * cols), 256, 0, stream(exec)>>>(dst, dst_ld, src, src_ld, rows, cols);
    launched("accumulate_kernel");
  }

  // A decoding step's scores in the cache's scratch (grown when a layer outgrows it).
  template <class QV, class KV, class Ind, class Out>
  static void candidates(const cuda_policy& exec, const QV& q, const KV& keys, const Ind& indicator,
                         const Out& out, buffer<char>& scratch) {
    if constexpr (SourceIndicator<Ind>) {
      candidate_scores(exec, q, keys, indicator, out);
    } else {
      reserve_scoring(exec, scratch, q.extent(0), q.extent(1), keys.extent(1), keys.extent(2));
      candidate_scores(exec, q, keys, indicator, out,
                       cuda_workspace{scratch.data(), static_cast<std::size_t>(scratch.size())});
    }
  }
  static void reserve_scoring(const cuda_policy& exec, buffer<char>& scratch, index_t B, index_t H,
                              index_t Hkv, index_t n) {
    const auto bytes = static_cast<index_t>(decode_scores_workspace_size(B, H, Hkv, n));
    if (scratch.size() < bytes) scratch = buffer<char>(bytes, exec);
  }

 private:
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
};

}  // namespace cake::detail
