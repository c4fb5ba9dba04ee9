// The eviction methods CAKE is compared against, as compositions of the three
// policy slots (preference, budget, indicator). Each alias is a KvCache; pass the
// policies' hyperparameters to its constructor as usual.
//
//   method        preference         budget (across layers / heads)    indicator (within a row)
//   Cake          CakePreference     ProportionalBudget                MeanVarianceIndicator
//   SnapKv        UniformPreference  UniformBudget                     WindowMeanIndicator
//   PyramidKv     UniformPreference  PyramidBudget                     WindowMeanIndicator
//   StreamingLlm  UniformPreference  UniformBudget                     SinkRecencyIndicator
//   H2o           UniformPreference  UniformBudget                     AccumulatedIndicator
//   Tova          UniformPreference  UniformBudget                     LastQueryIndicator
//   AdaSnapKv     UniformPreference  HeadwiseBudget<UniformBudget>     WindowMeanIndicator
//   CakeAdaKv     CakePreference     HeadwiseBudget<Proportional>      MeanVarianceIndicator
//
// Papers: CAKE (Qin et al., ICLR 2025); SnapKV (Li et al., 2024); PyramidKV (Cai et
// al., 2024); StreamingLLM (Xiao et al., ICLR 2024); H2O (Zhang et al., NeurIPS 2023);
// TOVA (Oren et al., 2024); Ada-KV (Feng et al., 2024). Every method keeps the last
// `window` tokens of the prompt, as the window-based methods do; where the original
// keeps a recent window of its own (StreamingLLM, H2O), that window is this one plus
// the recent tokens its indicator ranks first. CakeAdaKv is a combination none of
// the reference implementations offers.
#pragma once

#include "kv_cache.hpp"
#include "policy/budget/headwise.hpp"
#include "policy/budget/pyramid.hpp"
#include "policy/budget/uniform.hpp"
#include "policy/indicator/accumulated.hpp"
#include "policy/indicator/last_query.hpp"
#include "policy/indicator/sink_recency.hpp"
#include "policy/indicator/window_mean.hpp"
#include "policy/preference/uniform.hpp"

namespace cake::methods {

template <class T = float, class Exec = host_policy>
using Cake = KvCache<CakePreference, ProportionalBudget, MeanVarianceIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using SnapKv = KvCache<UniformPreference, UniformBudget, WindowMeanIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using PyramidKv = KvCache<UniformPreference, PyramidBudget, WindowMeanIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using StreamingLlm = KvCache<UniformPreference, UniformBudget, SinkRecencyIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using H2o = KvCache<UniformPreference, UniformBudget, AccumulatedIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using Tova = KvCache<UniformPreference, UniformBudget, LastQueryIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using AdaSnapKv =
    KvCache<UniformPreference, HeadwiseBudget<UniformBudget>, WindowMeanIndicator, T, Exec>;
template <class T = float, class Exec = host_policy>
using CakeAdaKv =
    KvCache<CakePreference, HeadwiseBudget<ProportionalBudget>, MeanVarianceIndicator, T, Exec>;

}  // namespace cake::methods
