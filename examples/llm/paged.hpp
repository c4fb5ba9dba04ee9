// The engine's paged KV memory, as serving engines (vLLM, SGLang) keep it: per layer a
// pool of fixed-size blocks for K and one for V, and a block manager (a free list per
// layer). A sequence's layer holds the blocks its block table names, in token order:
// token t is slot t % block_size of its (t / block_size)-th block. Layers are managed
// apart because an evicting cache keeps a different number of tokens in each.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "model.hpp"

namespace llm {

class BlockPool {
 public:
  // blocks: per layer; each block holds block_size tokens of every KV head.
  BlockPool(const ModelConfig& c, int blocks, int block_size)
      : layers_(c.layers),
        kv_heads_(c.kv_heads),
        head_dim_(c.head_dim),
        blocks_(blocks),
        block_size_(block_size) {
    if (blocks < 1 || block_size < 1)
      throw std::runtime_error("block pool: blocks and block size must be >= 1, got " +
                               std::to_string(blocks) + " and " + std::to_string(block_size));
    const auto L = static_cast<std::size_t>(c.layers);
    const std::size_t n = L * static_cast<std::size_t>(blocks) * block_floats();
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
    used_.assign(L * static_cast<std::size_t>(blocks), 0);
    free_.resize(L);
    for (auto& f : free_)  // the lowest id is handed out first
      for (int b = blocks - 1; b >= 0; --b) f.push_back(b);
  }
  BlockPool(const BlockPool&) = delete;  // caches hold views of the pools
  BlockPool& operator=(const BlockPool&) = delete;

  int layers() const { return layers_; }
  int blocks() const { return blocks_; }
  int block_size() const { return block_size_; }
  // Strides of a pool in floats: FlashInfer's HND layout,
  // (blocks, kv_heads, block_size, head_dim) contiguous.
  std::ptrdiff_t block_stride() const { return static_cast<std::ptrdiff_t>(block_floats()); }
  std::ptrdiff_t head_stride() const {
    return static_cast<std::ptrdiff_t>(block_size_) * head_dim_;
  }
  std::ptrdiff_t token_stride() const { return head_dim_; }
  // Layer l's pools: (blocks, kv_heads, block_size, head_dim).
  float* k(int l) { return k_.data() + layer_offset(l); }
  float* v(int l) { return v_.data() + layer_offset(l); }

  // A free block of layer l; throws when the layer has none left.
  std::int32_t allocate(int l) {
    auto& f = free_.at(static_cast<std::size_t>(l));
    if (f.empty())
      throw std::runtime_error("block pool: layer " + std::to_string(l) + " has no free block (" +
                               std::to_string(blocks_) + " blocks of " +
                               std::to_string(block_size_) + " tokens; raise --pool-blocks)");
    const std::int32_t id = f.back();
    f.pop_back();
    used_[index(l, id)] = 1;
    ++in_use_;
    peak_ = std::max(peak_, in_use_);
    return id;
  }
  // Returns block id of layer l to the free list; evicted: the cache let it go (else
  // its sequence ended). A block that is not in use is a bug of the caller.
  void release(int l, std::int32_t id, bool evicted) {
    if (id < 0 || id >= blocks_ || !used_[index(l, id)])
      throw std::logic_error("block pool: block " + std::to_string(id) + " of layer " +
                             std::to_string(l) + " is not in use");
    used_[index(l, id)] = 0;
    free_[static_cast<std::size_t>(l)].push_back(id);
    --in_use_;
    if (evicted) ++evicted_;
  }

  bool in_use(int l, std::int32_t id) const { return used_.at(index(l, id)) != 0; }
  std::int64_t in_use() const { return in_use_; }  // blocks held, all layers
  std::int64_t free_blocks() const {
    std::int64_t n = 0;
    for (const auto& f : free_) n += static_cast<std::int64_t>(f.size());
    return n;
  }
  std::int64_t total() const { return static_cast<std::int64_t>(layers_) * blocks_; }
  std::int64_t peak() const { return peak_; }        // most blocks held at once
  std::int64_t evicted() const { return evicted_; }  // blocks the caches gave back

 private:
  int layers_, kv_heads_, head_dim_, blocks_, block_size_;
  std::vector<float> k_, v_;                     // (layers, blocks, kv_heads, block_size, d)
  std::vector<char> used_;                       // (layers, blocks)
  std::vector<std::vector<std::int32_t>> free_;  // per layer: free block ids, a stack
  std::int64_t in_use_ = 0, peak_ = 0, evicted_ = 0;

  std::size_t block_floats() const {
    return static_cast<std::size_t>(kv_heads_) * static_cast<std::size_t>(block_size_) *
           static_cast<std::size_t>(head_dim_);
  }
  std::size_t layer_offset(int l) const {
    if (l < 0 || l >= layers_) throw std::out_of_range("block pool: layer out of range");
    return static_cast<std::size_t>(l) * static_cast<std::size_t>(blocks_) * block_floats();
  }
  std::size_t index(int l, std::int32_t id) const {
    return static_cast<std::size_t>(l) * static_cast<std::size_t>(blocks_) +
           static_cast<std::size_t>(id);
  }
};

}  // namespace llm
