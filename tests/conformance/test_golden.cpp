// Conformance: every shipped golden case (reference implementation's numbers)
// passes every check of the spec.
#include <doctest/doctest.h>

#include <cake_tools/golden.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

TEST_CASE("golden cases from the reference implementation") {
  std::vector<std::string> dirs;
  for (const auto& e : std::filesystem::directory_iterator(CAKE_GOLDEN_DIR))
    if (e.is_directory() && std::filesystem::exists(e.path() / "meta.json"))
      dirs.push_back(e.path().string());
  std::sort(dirs.begin(), dirs.end());
  REQUIRE(dirs.size() == 5);  // so that the test cannot pass vacuously
  for (const auto& dir : dirs) {
    const std::string name = std::filesystem::path(dir).filename().string();
    SUBCASE(name.c_str()) {
      const cake_tools::GoldenCase gc(dir);
      const auto results = cake_tools::run_golden_case(gc);
      REQUIRE(!results.empty());
      for (const auto& r : results) {
        INFO(gc.name, " / ", r.check, ": ", r.detail);
        CHECK(r.pass);
      }
    }
  }
}
