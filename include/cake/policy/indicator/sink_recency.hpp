// StreamingLLM's eviction (Xiao et al., 2024, "Efficient Streaming Language Models
// with Attention Sinks"): keep the first `sinks` tokens of the prompt (attention
// sinks) and the most recent ones. As an indicator: sinks score highest, then a
// token scores its position, so the top-k of a budget is the sinks plus the newest
// budget - sinks tokens. It reads no attention, so with a preference that needs no
// statistics (UniformPreference) the cache skips the attention pass altogether.
#pragma once

#include <cfloat>

#include "../../core/concepts.hpp"

namespace cake {

struct SinkRecencyIndicator {
  index_t sinks = 4;  // leading tokens always kept (within the budget)

  // Positions are exact in float up to 2^24 (16M tokens); the sinks tie at the
  // largest float and the selection breaks ties by the lower position.
  CAKE_HOST_DEVICE float score_position(index_t position) const {
    return position < sinks ? FLT_MAX : static_cast<float>(position);
  }
  status validate() const {
    CAKE_CHECK(sinks >= 0, "cake.indicator.sinks", "sinks must be >= 0, got ", sinks);
    return status::success();
  }
};

}  // namespace cake
