// cake::host_workspace: the scratch memory of the host kernels, owned by the caller
// and lent to them through the execution policy (as thrust's par(alloc)):
//
//   cake::host_workspace ws;                        // empty; grows to the largest call
//   cake::window_stats(cake::host.from(ws), ...);   // reuses ws's buffers
//   ws.release();                                   // hands the memory back
//
// A call under a policy with a workspace allocates nothing once the workspace has
// grown to its shapes (grow-only: one shared block plus one block per worker thread).
// A call without one (plain cake::host) uses a workspace local to the call, so it
// allocates its scratch each time and keeps nothing afterwards. No scratch is kept
// per thread anywhere.
//
// A workspace serves one call at a time: calls that may run concurrently (e.g. from
// two threads) need one workspace each. Its content means nothing between calls;
// every element a kernel reads is written by the same call first.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <vector>

#include "../../config.hpp"

namespace cake {

class host_workspace {
 public:
  host_workspace() = default;
  // A copy starts empty and an assignment keeps the target's own blocks: scratch
  // content is never worth copying (a cache copied with its workspace needs none).
  host_workspace(const host_workspace&) noexcept {}
  host_workspace& operator=(const host_workspace&) noexcept { return *this; }
  host_workspace(host_workspace&&) noexcept = default;
  host_workspace& operator=(host_workspace&&) noexcept = default;

  // Bytes held now, over all blocks.
  std::size_t bytes() const noexcept {
    std::size_t n = shared_.size;
    for (const block& b : workers_) n += b.size;
    return n;
  }
  // Frees every block; the next call grows them again.
  void release() noexcept {
    shared_ = block{};
    std::vector<block>().swap(workers_);
  }

  // For the kernels: makes the shared block at least `shared` bytes and `workers`
  // blocks of at least `per_worker` bytes each, before any parallel region (this is
  // the only place that allocates, and it may throw std::bad_alloc; the blocks held
  // before stay valid then). Contents are not preserved.
  void prepare(std::size_t shared, int workers, std::size_t per_worker) {
    if (workers_.size() < static_cast<std::size_t>(workers))
      workers_.resize(static_cast<std::size_t>(workers));
    shared_.grow(shared);
    for (int t = 0; t < workers; ++t) workers_[static_cast<std::size_t>(t)].grow(per_worker);
  }
  std::byte* shared() noexcept { return shared_.data.get(); }
  std::byte* worker(int t) noexcept { return workers_[static_cast<std::size_t>(t)].data.get(); }

  static constexpr std::size_t alignment = 64;  // a cache line: blocks and pieces start on one

 private:
  struct aligned_delete {
    void operator()(std::byte* p) const noexcept {
      ::operator delete[](p, std::align_val_t{alignment});
    }
  };
  struct block {
    std::unique_ptr<std::byte[], aligned_delete> data;
    std::size_t size = 0;
    void grow(std::size_t n) {
      if (n <= size) return;
      std::unique_ptr<std::byte[], aligned_delete> p(
          static_cast<std::byte*>(::operator new[](n, std::align_val_t{alignment})));
      data = std::move(p);
      size = n;
    }
  };
  block shared_;
  std::vector<block> workers_;
};

namespace detail {

// Lays typed pieces out in one block, each on a cache line. Run once over a null
// base to size the block, then over the block to hand the pieces out: the same
// sequence of take() calls gives the same offsets.
class carver {
 public:
  explicit carver(std::byte* base = nullptr) noexcept : base_(base) {}
  template <class T>
  T* take(std::size_t n) noexcept {
    off_ = (off_ + host_workspace::alignment - 1) / host_workspace::alignment *
           host_workspace::alignment;
    T* p = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += n * sizeof(T);
    return p;
  }
  std::size_t bytes() const noexcept { return off_; }

 private:
  std::byte* base_;
  std::size_t off_ = 0;
};

// The workspace a call uses: the policy's, or `local` (the call's own) when it has none.
template <class Policy>
host_workspace& workspace_of(const Policy& exec, host_workspace& local) noexcept {
  return exec.workspace != nullptr ? *exec.workspace : local;
}

}  // namespace detail
}  // namespace cake
