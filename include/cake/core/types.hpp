// cake: small value types shared by the algorithms and the cache.
#pragma once

#include "../config.hpp"

namespace cake {

// Layer-level statistics of the window attention over the prefix keys (spec section 2),
// summed over batch, heads, window rows and keys.
struct LayerStats {
  double entropy = 0;   // - sum P ln(P + 1e-10)
  double variance = 0;  // sum over keys of the unbiased variance over the window rows
};

// Order in which a selection's indices (and a cache's kept tokens) are written.
enum class select_order {
  descending,  // by score, highest first; ties by lower index (what top-k returns)
  position,    // by index, ascending
};

// How KvCache stores its kept tokens.
enum class token_order {
  position,   // position order (default): what attention kernels and users expect
  reference,  // the reference implementation's order: kept prefix by descending
              // indicator, then the window; reproduces its decoding bit for bit
};

// Where a paged layer's held tokens lie in each row's slots (its sequence's blocks)
// while decoding (CacheConfig::paged_slots). Attention over the slots does not depend
// on their order when positions are in the keys already (RoPE applied before the write).
enum class slot_order {
  token,  // token t in slot t (default): the blocks read in order are the tokens in order;
          // a step that evicts moves the K/V rows after the evicted token
  any,    // a row's n held tokens fill its first n slots in any order (KvCache::token_slots
          // says which token is where): a step moves at most one K/V row per row (host)
};

// What an indicator policy scores tokens from (its static member `source`; an
// indicator without one is a `window` indicator).
enum class indicator_source {
  window,       // mean and variance of the window rows' attention (CAKE, SnapKV);
                // while decoding, the new query's attention alone (spec section 7)
  last_query,   // the last window query's attention (TOVA); while decoding, the new query's
  accumulated,  // attention summed over every query seen (H2O): the window rows at
                // prefill, then each decoded query; the sums are kept per held token
  position,     // the token's position alone, no attention (StreamingLLM)
  custom,       // the indicator's own hooks, prefill_scores and decode_scores (a
                // SourceIndicator, core/concepts.hpp)
};

}  // namespace cake
