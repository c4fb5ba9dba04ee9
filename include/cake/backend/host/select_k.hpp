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
#include <vector>

#include "../../detail/parallel.hpp"

namespace cake {
namespace detail {

// Monotone map float -> uint32: a < b  <=>  ordered_bits(a) < ordered_bits(b), and
// a == b  <=>  equal images (-0.0 maps as +0.0, so the two zeros tie and go by index).
inline std::uint32_t ordered_bits(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  u = u == 0x80000000u ? 0u : u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct SelectScratch {
  std::vector<std::uint32_t> cand;  // candidate indices still tied on the bits seen so far
  std::vector<std::uint32_t> next;
  std::array<std::uint32_t, 2048> hist{};
};

// Writes the indices of the k largest of x[0..n) into out (any order), ties to the
// lower index. Returns nothing; out has exactly k entries.
template <class TI>
void radix_select_row(const float* x, index_t n, index_t k, TI* out, SelectScratch& s) {
  if (k <= 0) return;
  if (k >= n) {
    for (index_t j = 0; j < n; ++j) out[j] = static_cast<TI>(j);
    return;
  }
  constexpr int shifts[3] = {21, 10, 0};
  constexpr std::uint32_t masks[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  index_t written = 0;
  index_t need = k;  // how many still to take from the threshold bucket
  auto& hist = s.hist;
  // Pass 1 over the whole row.
  std::fill(hist.begin(), hist.end(), 0u);
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
  s.cand.clear();
  for (index_t j = 0; j < n; ++j) {
    const std::uint32_t top = ordered_bits(x[j]) >> 21;
    if (top > digit)
      out[written++] = static_cast<TI>(j);
    else if (top == digit)
      s.cand.push_back(static_cast<std::uint32_t>(j));
  }
  for (int pass = 1; pass < 3 && static_cast<index_t>(s.cand.size()) > need; ++pass) {
    const int sh = shifts[pass];
    const std::uint32_t mask = masks[pass];
    std::fill(hist.begin(), hist.begin() + mask + 1, 0u);
    for (std::uint32_t j : s.cand) ++hist[(ordered_bits(x[j]) >> sh) & mask];
    std::uint32_t dg = mask;
    index_t above = 0;
    for (;; --dg) {
      if (above + hist[dg] >= need) break;
      above += hist[dg];
    }
    need -= above;
    s.next.clear();
    for (std::uint32_t j : s.cand) {
      const std::uint32_t v = (ordered_bits(x[j]) >> sh) & mask;
      if (v > dg)
        out[written++] = static_cast<TI>(j);
      else if (v == dg)
        s.next.push_back(j);
    }
    s.cand.swap(s.next);
  }
  // Candidates are in index order: the lowest indices win ties.
  for (index_t t = 0; t < need; ++t)
    out[written++] = static_cast<TI>(s.cand[static_cast<std::size_t>(t)]);
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

template <>
struct select_k_backend<host_policy> {
  template <class TS, class TI>
  static void run(const host_policy& exec, host_view<TS, 2> scores, host_view<TI, 2> out,
                  select_order order) {
    const index_t rows = scores.extent(0), n = scores.extent(1), k = out.extent(1);
    if (k == 0 || rows == 0) return;
    const int nt = detail::worker_count(exec, rows);
    std::vector<detail::SelectScratch> scratch(static_cast<std::size_t>(nt));
    for (auto& s : scratch) {
      s.cand.reserve(static_cast<std::size_t>(n));
      s.next.reserve(static_cast<std::size_t>(n));
    }
    detail::parallel_for(exec, rows, [&](index_t r, int worker) {
      const float* x = &scores(r, 0);
      TI* o = &out(r, 0);
      detail::radix_select_row(x, n, k, o, scratch[static_cast<std::size_t>(worker)]);
      detail::order_selection(x, o, k, order);
    });
  }
};

}  // namespace cake
