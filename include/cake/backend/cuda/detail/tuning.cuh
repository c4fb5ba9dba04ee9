// Tuning knobs of the CUDA kernels, in one place. Each is a compile-time
// constant the kernels are instantiated with; the comments say why the value.
#pragma once

namespace cake::cuda_detail::tuning {

// window statistics: a block scores TILE_N keys against the window queries of one
// GQA group. 64 keys x 256 threads gives each thread 8 query rows x 2 keys per step,
// and one K tile is reused by every query head of the group (GQA reuse).
inline constexpr int stats_tile_n = 64;
inline constexpr int stats_threads = 256;
inline constexpr int stats_rows_per_thread = 8;
// Dynamic shared memory a stats block may use at most (H100/H200 allow 227 KiB per
// block; a device that allows less gets less, see shared_memory_budget); when the
// group's queries do not fit, the exact kernels stream them in row chunks.
inline constexpr int stats_smem_budget = 160 * 1024;
// Upper bound of the key splits of the row-normaliser pass (split-K over the keys, as
// flash-decoding does), which sizes its workspace; a launch uses one wave of blocks,
// min(this, SMs / (B * kv_heads)) splits, and as many persistent statistics blocks.
inline constexpr int stats_target_blocks = 512;

// tensor-core window statistics (cuda_math::tensor_cores): 8 warps per block, each
// working on its own keys (no barrier after the queries are loaded); the row
// normaliser's block is group * max(1, 8 / group) warps (group <= 8).
inline constexpr int mma_threads = 256;
inline constexpr int mma_max_group = 8;

// from-attention statistics and the pooling epilogue: one thread per key.
inline constexpr int column_threads = 256;

// select_k: one block per row. 11-bit digits (2048 bins) give 3 passes for 32-bit keys.
inline constexpr int select_threads = 1024;
inline constexpr int select_digit_bits = 11;
inline constexpr int select_bins = 1 << select_digit_bits;
// Up to this many winners are put in descending order inside the select kernel
// (BlockRadixSort); larger k goes through cub::DeviceSegmentedRadixSort.
inline constexpr int select_sort_items = 4;
inline constexpr int select_block_sort_max = select_threads * select_sort_items;

// compaction: 16-byte vectors, 256 threads.
inline constexpr int compact_threads = 256;

// decode scores: a block scores a tile of 64 keys against every query head of the
// group (64 x group pairs over 256 threads); a few thousand held keys make tens of
// tiles per (batch, kv-head) row, enough blocks to fill the GPU at batch 1.
inline constexpr int decode_threads = 256;
inline constexpr int decode_tile = 64;
// The finishing pass pools 1024 candidates per block (4 per thread), so that a long
// row still spreads over several SMs.
inline constexpr int decode_chunk = 1024;

}  // namespace cake::cuda_detail::tuning
