// The CUDA tensor-core statistics feed mma.sync.m16n8k16 from 16-byte pieces of K and Q
// rows in a permuted head_dim order (backend/cuda/detail/mma_layout.hpp). This test runs
// that index math on the host against an emulation of the instruction written from the
// PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16 with floating point
// type"): if the pieces, the fragment assembly or the accumulator map disagreed with
// the hardware's layout, the dot products here would come out wrong. Needs no GPU.
#include <doctest/doctest.h>

#include <cake/backend/cuda/detail/mma_layout.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

namespace {

namespace mma = cake::cuda_detail::mma;
using std::uint32_t;

// 16-bit elements as plain integers (exact products and sums in double).
std::uint16_t elem(uint32_t reg, int half) {
  return static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xffffu);
}

// D += A B for a warp, from each lane's registers, per the PTX tables.
void emulate_mma(std::array<std::array<double, 4>, 32>& d, const uint32_t (&a)[32][4],
                 const uint32_t (&b)[32][2]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {  // a_i: register i / 2, low half first
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = elem(a[lane][i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {  // b_i
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = elem(b[lane][i / 2], i & 1);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (lane >> 2) + (i >= 2 ? 8 : 0), col = (lane & 3) * 2 + (i & 1);
      for (int k = 0; k < 16; ++k)
        d[static_cast<std::size_t>(lane)][static_cast<std::size_t>(i)] += A[row][k] * B[k][col];
    }
}

// A row's piece for lane quad member t, chunk c: elements packed as a little-endian
// 16-byte (or 8-byte) load of the row would pack them.
mma::Piece piece_of(const std::vector<std::uint16_t>& row, int c, int t, bool half) {
  mma::Piece p{};
  for (int e = 0; e < (half ? 4 : 8); ++e)
    p.v[e / 2] |=
        static_cast<uint32_t>(row[static_cast<std::size_t>(mma::piece_dim(c, t, e, half))])
        << (16 * (e & 1));
  return p;
}

std::vector<std::vector<std::uint16_t>> random_rows(int n, int d, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(0, 50);
  std::vector<std::vector<std::uint16_t>> rows(
      static_cast<std::size_t>(n), std::vector<std::uint16_t>(static_cast<std::size_t>(d)));
  for (auto& r : rows)
    for (auto& x : r) x = static_cast<std::uint16_t>(dist(rng));
  return rows;
}

double dot(const std::vector<std::uint16_t>& x, const std::vector<std::uint16_t>& y) {
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += double(x[i]) * double(y[i]);
  return s;
}

// 16 rows (operand A, lane rows g and g + 8) times 8 rows (operand B, lane row g) over
// head_dim, chunk by chunk and step by step as the kernels do.
std::array<std::array<double, 4>, 32> product(const std::vector<std::vector<std::uint16_t>>& arows,
                                              const std::vector<std::vector<std::uint16_t>>& brows,
                                              int d) {
  std::array<std::array<double, 4>, 32> acc{};
  const int chunks = mma::chunks_of(d);
  for (int c = 0; c < chunks; ++c) {
    const bool half = mma::last_chunk_half(d) && c == chunks - 1;
    for (int h = 0; h < mma::piece_steps(half); ++h) {
      uint32_t a[32][4] = {}, b[32][2] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        mma::a_fragment(piece_of(arows[static_cast<std::size_t>(g)], c, t, half),
                        piece_of(arows[static_cast<std::size_t>(g + 8)], c, t, half), h, a[lane]);
        mma::b_fragment(piece_of(brows[static_cast<std::size_t>(g)], c, t, half), h, b[lane]);
      }
      emulate_mma(acc, a, b);
    }
  }
  return acc;
}

}  // namespace

TEST_CASE("mma layout: pieces cover head_dim once, in chunks and steps") {
  for (const int d : {16, 32, 48, 64, 80, 96, 112, 128, 256}) {
    CAPTURE(d);
    std::multiset<int> seen;
    const int chunks = mma::chunks_of(d);
    for (int c = 0; c < chunks; ++c) {
      const bool half = mma::last_chunk_half(d) && c == chunks - 1;
      for (int t = 0; t < 4; ++t)
        for (int e = 0; e < (half ? 4 : 8); ++e) seen.insert(mma::piece_dim(c, t, e, half));
    }
    CHECK(seen.size() == static_cast<std::size_t>(d));
    CHECK(std::set<int>(seen.begin(), seen.end()).size() == static_cast<std::size_t>(d));
    CHECK(*seen.begin() == 0);
    CHECK(*seen.rbegin() == d - 1);
  }
}

TEST_CASE("mma layout: the permuted pieces give the dot products the kernels need") {
  std::mt19937 rng(5);
  for (const int d : {16, 32, 48, 80, 128, 256}) {
    CAPTURE(d);
    const auto keys = random_rows(16, d, rng);    // operand A of the statistics kernel
    const auto queries = random_rows(8, d, rng);  // operand B: 8 window rows
    // Statistics: accumulator (key, window row) = c_row, c_col.
    const auto acc = product(keys, queries, d);
    // Row normaliser: Q as A (16 window rows), K as B (8 keys).
    const auto q16 = random_rows(16, d, rng);
    const auto k8 = random_rows(8, d, rng);
    const auto acc_t = product(q16, k8, d);
    int wrong = 0, wrong_t = 0;
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const auto r = static_cast<std::size_t>(mma::c_row(lane, i));
        const auto c = static_cast<std::size_t>(mma::c_col(lane, i));
        wrong += acc[static_cast<std::size_t>(lane)][static_cast<std::size_t>(i)] !=
                 dot(keys[r], queries[c]);
        wrong_t += acc_t[static_cast<std::size_t>(lane)][static_cast<std::size_t>(i)] !=
                   dot(q16[r], k8[c]);
      }
    CHECK(wrong == 0);
    CHECK(wrong_t == 0);
  }
}

TEST_CASE("mma layout: query pieces index shared memory one to one") {
  for (const auto& [group, planes, w, d] : std::vector<std::array<int, 4>>{
           {4, 2, 32, 128}, {1, 1, 5, 16}, {7, 2, 48, 80}, {8, 1, 64, 256}}) {
    CAPTURE(group);
    CAPTURE(w);
    const int tiles = mma::query_row_tiles(w), chunks = mma::chunks_of(d);
    CHECK(tiles % 2 == 0);  // the normaliser reads tiles in (top, bottom) pairs
    CHECK(tiles * 8 >= w);
    std::vector<int> hits(static_cast<std::size_t>(mma::query_pieces(group, planes, w, d)), 0);
    for (int r = 0; r < group; ++r)
      for (int p = 0; p < planes; ++p)
        for (int rt = 0; rt < tiles; ++rt)
          for (int c = 0; c < chunks; ++c)
            for (int lane = 0; lane < 32; ++lane) {
              const long long at = mma::query_piece_index(r, p, rt, c, lane, planes, tiles, chunks);
              REQUIRE(at >= 0);
              REQUIRE(at < static_cast<long long>(hits.size()));
              ++hits[static_cast<std::size_t>(at)];
            }
    CHECK(std::count(hits.begin(), hits.end(), 1) == static_cast<long>(hits.size()));
  }
}
