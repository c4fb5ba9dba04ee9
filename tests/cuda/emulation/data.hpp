// Inputs shared by the emulation tests.
#pragma once

#include <cstddef>
#include <random>
#include <vector>

namespace cake_emulation_tests {

// n values of type T drawn from N(0, scale^2) (rounded to T as a cache would store them).
template <class T>
std::vector<T> random_values(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

}  // namespace cake_emulation_tests
