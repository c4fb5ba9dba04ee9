// Host backend of cake::select_k: an MSB-first radix select on the order-preserving
// integer image of the floats (11 + 11 + 10 bits). The first pass histograms the
// whole row; later passes touch only the candidates left in the threshold bucket,
// so a row costs about two streaming passes whatever k is. Only the k winners are
// sorted, and only when the caller asks for descending order.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <utility>

#include "../../detail/parallel.hpp"
#include "detail/threads.hpp"
#include "workspace.hpp"

namespace cake {
namespace detail {

// Monotone map float -> uint32: a < b  <=>  ordered_bits(a) < ordered_bits(b), and
// a == b  <=>  equal images (-0.0 maps as +0.0, so the two zeros tie and go by index).
inline std::uint32_t ordered_bits(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  u = u == 0x80000000u ? 0u : u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One worker's buffers (from its workspace block): candidate indices still tied on
// the bits seen so far, the next pass's, and a histogram.
struct SelectScratch {
  std::uint32_t* cand;  // (n)
  std::uint32_t* next;  // (n)
  std::uint32_t* hist;  // (2048)
  static SelectScratch carve(carver& c, index_t n) {
    SelectScratch s{};
    s.cand = c.take<std::uint32_t>(static_cast<std::size_t>(n));
    s.next = c.take<std::uint32_t>(static_cast<std::size_t>(n));
    s.hist = c.take<std::uint32_t>(2048);
    return s;
  }
};

// Writes the indices of the k largest of x[0..n) into out (any order), ties to the
// lower index. Returns nothing; out has exactly k entries.
template <class TI>
void radix_select_row(const float* x, index_t n, index_t k, TI* out, const SelectScratch& s) {
  if (k <= 0) return;
  if (k >= n) {
    for (index_t j = 0; j < n; ++j) out[j] = static_cast<TI>(j);
    return;
  }
  constexpr int shifts[3] = {21, 10, 0};
  constexpr std::uint32_t masks[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  index_t written = 0;
  index_t need = k;  // how many still to take from the threshold bucket
  std::uint32_t* hist = s.hist;
  std::uint32_t* cand = s.cand;
  std::uint32_t* next = s.next;
  index_t n_cand = 0;
  // Pass 1 over the whole row.
  std::fill(hist, hist + 2048, 0u);
  for (index_t j = 0; j < n; ++j) ++hist[ordered_bits(x[j]) >> 21];
  std::uint32_t digit = 2047;
  {
    index_t above = 0;
    for (;; --digit) {
      if (above + hist[digit] >= need) break;
      above += hist[digit];
    }
    need -= above;
  }
  for (index_t j = 0; j < n; ++j) {
    const std::uint32_t top = ordered_bits(x[j]) >> 21;
    if (top > digit)
      out[written++] = static_cast<TI>(j);
    else if (top == digit)
      cand[n_cand++] = static_cast<std::uint32_t>(j);
  }
  for (int pass = 1; pass < 3 && n_cand > need; ++pass) {
    const int sh = shifts[pass];
    const std::uint32_t mask = masks[pass];
    std::fill(hist, hist + mask + 1, 0u);
    for (index_t c = 0; c < n_cand; ++c) ++hist[(ordered_bits(x[cand[c]]) >> sh) & mask];
    std::uint32_t dg = mask;
    index_t above = 0;
    for (;; --dg) {
      if (above + hist[dg] >= need) break;
      above += hist[dg];
    }
    need -= above;
    index_t n_next = 0;
    for (index_t c = 0; c < n_cand; ++c) {
      const std::uint32_t j = cand[c];
      const std::uint32_t v = (ordered_bits(x[j]) >> sh) & mask;
      if (v > dg)
        out[written++] = static_cast<TI>(j);
      else if (v == dg)
        next[n_next++] = j;
    }
    std::swap(cand, next);
    n_cand = n_next;
  }
  // Candidates are in index order: the lowest indices win ties.
  for (index_t t = 0; t < need; ++t) out[written++] = static_cast<TI>(cand[t]);
}

template <class TI>
void order_selection(const float* x, TI* idx, index_t k, select_order order) {
  if (order == select_order::position) {
    std::sort(idx, idx + k);
  } else {
    std::sort(idx, idx + k, [x](TI a, TI b) {
      const float xa = x[a], xb = x[b];
      return xa > xb || (xa == xb && a < b);
    });
  }
}

}  // namespace detail

// Scratch: 2 * n + 2048 32-bit words per worker thread, from the policy's workspace or
// allocated for the call.
template <>
struct select_k_backend<host_policy> {
  template <class TS, class TI>
  static void run(const host_policy& policy, host_view<TS, 2> scores, host_view<TI, 2> out,
                  select_order order) {
    const index_t rows = scores.extent(0), n = scores.extent(1), k = out.extent(1);
    if (k == 0 || rows == 0) return;
    // About two streaming passes over each row, each element worth some tens of
    // multiply-adds of time (a branchy histogram update, not a fused vector op).
    const host_policy exec = detail::for_work(policy, 32 * rows * n);
    const int nt = detail::worker_count(exec, rows);
    host_workspace local;
    host_workspace& ws = detail::workspace_of(exec, local);
    detail::carver sizer;
    detail::SelectScratch::carve(sizer, n);
    ws.prepare(0, nt, sizer.bytes());
    detail::parallel_for(exec, rows, [&](index_t r, int worker) {
      detail::carver c(ws.worker(worker));
      const detail::SelectScratch s = detail::SelectScratch::carve(c, n);
      const float* x = &scores(r, 0);
      TI* o = &out(r, 0);
      detail::radix_select_row(x, n, k, o, s);
      detail::order_selection(x, o, k, order);
    });
  }
};

}  // namespace cake
