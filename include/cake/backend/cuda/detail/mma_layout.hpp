// How cake's tensor-core kernels feed mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}:
// pure index math, shared by the kernels and by a host test that emulates the
// instruction from the PTX ISA's fragment tables (so the mapping is checked on every
// CI run, GPU or not).
//
// A dot product over head_dim does not care in which order its terms are summed, so
// the kernels permute head_dim identically for both operands: lane (g = lane / 4,
// t = lane % 4) loads one contiguous 16-byte *piece* of a row, elements
// c*32 + t*8 .. c*32 + t*8 + 7 of chunk c (32 head_dim elements). That piece feeds the
// two k-steps 2c and 2c + 1: its registers 0, 1 (elements 0..3) are the fragment's
// k = 2t, 2t+1 and k = 2t+8, 2t+9 of step 2c, registers 2, 3 (elements 4..7) the same
// k of step 2c + 1. A final half chunk (head_dim % 32 == 16) is an 8-byte piece,
// elements c*32 + t*4 .. + 3, and one step. Rows are read with 16-byte loads straight
// from global memory into fragments: no shared-memory staging, no ldmatrix.
#pragma once

#include <cstdint>

#include "../../../config.hpp"

namespace cake::cuda_detail::mma {

// One lane's piece of a row: four 32-bit registers, two 16-bit elements each (low
// half = lower head_dim index). A half piece uses v[0], v[1].
struct alignas(16) Piece {
  std::uint32_t v[4];
};

// head_dim index of element e of lane quad member t's piece of chunk c.
CAKE_HOST_DEVICE constexpr int piece_dim(int c, int t, int e, bool half) {
  return half ? c * 32 + t * 4 + e : c * 32 + t * 8 + e;
}

// mma k-steps one chunk feeds.
CAKE_HOST_DEVICE constexpr int piece_steps(bool half) { return half ? 1 : 2; }

// Operand A (16 rows x 16 k, row-major) of step h of a chunk, from the pieces of rows
// g (`top`) and g + 8 (`bottom`) of the m-tile.
CAKE_HOST_DEVICE inline void a_fragment(const Piece& top, const Piece& bottom, int h,
                                        std::uint32_t (&a)[4]) {
  a[0] = top.v[2 * h];         // row g,     k 2t, 2t+1
  a[1] = bottom.v[2 * h];      // row g + 8, k 2t, 2t+1
  a[2] = top.v[2 * h + 1];     // row g,     k 2t+8, 2t+9
  a[3] = bottom.v[2 * h + 1];  // row g + 8, k 2t+8, 2t+9
}

// Operand B (16 k x 8 columns, column-major) of step h, from the piece of column g.
CAKE_HOST_DEVICE inline void b_fragment(const Piece& col, int h, std::uint32_t (&b)[2]) {
  b[0] = col.v[2 * h];      // k 2t, 2t+1
  b[1] = col.v[2 * h + 1];  // k 2t+8, 2t+9
}

// Accumulator element i (0..3) of a lane: row lane / 4 (+ 8 for i >= 2), column
// (lane % 4) * 2 + (i & 1).
CAKE_HOST_DEVICE constexpr int c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
CAKE_HOST_DEVICE constexpr int c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// Chunks of 32 head_dim elements (the last may be a half chunk).
CAKE_HOST_DEVICE constexpr int chunks_of(int head_dim) { return (head_dim + 31) / 32; }
CAKE_HOST_DEVICE constexpr bool last_chunk_half(int head_dim) { return head_dim % 32 == 16; }

// The group's window queries live in shared memory already cut into pieces, in the
// order the warps read them (a warp reads 32 consecutive Pieces: no bank conflicts):
// index ((((r * planes + plane) * row_tiles + rt) * chunks + c) * 32 + lane), rt an
// 8-row tile of head r's window rows (padded with zero rows to a multiple of 16).
// The stats kernel reads tile rt as operand B (8 query rows as columns), the row
// normaliser reads tiles 2m and 2m + 1 as the top and bottom of operand A.
CAKE_HOST_DEVICE constexpr int query_row_tiles(int window) { return (window + 15) / 16 * 2; }
CAKE_HOST_DEVICE constexpr long long query_piece_index(int r, int plane, int rt, int c, int lane,
                                                       int planes, int row_tiles, int chunks) {
  return ((((static_cast<long long>(r) * planes + plane) * row_tiles + rt) * chunks + c) * 32) +
         lane;
}
CAKE_HOST_DEVICE constexpr long long query_pieces(int group, int planes, int window, int head_dim) {
  return static_cast<long long>(group) * planes * query_row_tiles(window) * chunks_of(head_dim) *
         32;
}

}  // namespace cake::cuda_detail::mma
