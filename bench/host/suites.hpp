// Registration functions of the host suites, one per operation.
#pragma once

namespace cake_bench {
void register_window_stats();
void register_select_k();
void register_compact();
void register_allocate_budgets();
void register_prefill();
void register_decode();
void register_decode_scores();
void register_ragged();
void register_paged_cache();
void register_storage16();
}  // namespace cake_bench
