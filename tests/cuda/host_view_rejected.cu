// Must fail to compile: a host view handed to the CUDA backend (see CMakeLists.txt).
#include <cake/cake.cuh>

#include <vector>

void host_view_on_cuda() {
  std::vector<float> scores(16);
  std::vector<int> out(4);
  auto s = cake::make_view(scores.data(), std::array<cake::index_t, 2>{1, 16});
  auto o = cake::make_view(out.data(), std::array<cake::index_t, 2>{1, 4});
  cake::select_k(cake::cuda, s, o);
}
