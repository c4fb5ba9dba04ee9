// TOVA's eviction (Oren et al., 2024, "Transformers are Multi-State RNNs"): a token
// is worth its attention from the most recent query. At prefill that is the last
// window row (which sees every key, so no mask is involved); while decoding, the
// new token's query, which is how every attention indicator decodes (spec section 7).
// TOVA averages over the heads of a layer; here, as everywhere in cake, over the
// query heads of each KV head's GQA group.
#pragma once

#include "../../core/concepts.hpp"

namespace cake {

struct LastQueryIndicator {
  int pool_kernel = 1;  // TOVA does not pool; odd kernels pool like SnapKV
  static constexpr bool needs_variance = false;
  static constexpr indicator_source source = indicator_source::last_query;

  CAKE_HOST_DEVICE float score(float attention, float /*var*/) const { return attention; }
  status validate() const {
    CAKE_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "cake.indicator.pool_kernel",
               "pool_kernel must be odd and >= 1, got ", pool_kernel);
    return status::success();
  }
};

}  // namespace cake
