// cake: how many threads a host kernel call uses: none besides the caller's when its
// work is below the policy's min_parallel_work (see execution.hpp).
#pragma once

#include <cstdint>

#include "../../../execution.hpp"

namespace cake::detail {

// The policy a call of about `work` multiply-adds runs under.
inline host_policy for_work(const host_policy& exec, std::int64_t work) noexcept {
  return work < exec.min_parallel_work ? exec.threads(1) : exec;
}

}  // namespace cake::detail
