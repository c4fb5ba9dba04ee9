// cake_conformance CASE_DIR...: runs each case in the golden format through the
// library and prints one line per case and check; exits 0 only if all pass.
#include <cstdio>
#include <exception>

#include "golden.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CASE_DIR...\n", argv[0]);
    return 2;
  }
  int failed = 0, passed = 0;
  for (int i = 1; i < argc; ++i) {
    try {
      cake_tools::GoldenCase gc(argv[i]);
      for (const auto& r : cake_tools::run_golden_case(gc)) {
        std::printf("%-4s %-24s %-26s %s\n", r.pass ? "ok" : "FAIL", gc.name.c_str(),
                    r.check.c_str(), r.detail.c_str());
        (r.pass ? passed : failed) += 1;
      }
    } catch (const std::exception& e) {
      std::printf("FAIL %-24s %-26s %s\n", argv[i], "load", e.what());
      ++failed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
