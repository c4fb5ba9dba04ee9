// libFuzzer target: the conformance runner's readers (tools/cake_tools): the .npy
// reader (through a file, as the runner reads it), the JSON parser, and a golden
// case directory's meta.json (GoldenCase). The first byte picks which; the rest is
// the file. Bad input must throw an exception derived from std::exception (the
// runner reports it and moves on); a crash or sanitizer report aborts.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "cake_tools/golden.hpp"

namespace {
const std::string& scratch_dir() {
  // Never destroyed: the exit handler below still needs it.
  static const std::string* dir = [] {
    // A memory file system where there is one: the readers take paths, and a
    // disk-backed /tmp costs an order of magnitude in executions.
    const std::filesystem::path base = std::filesystem::is_directory("/dev/shm")
                                           ? std::filesystem::path("/dev/shm")
                                           : std::filesystem::temp_directory_path();
    auto p = base / ("cake_fuzz_golden_" + std::to_string(::getpid()));
    std::filesystem::create_directories(p);
    std::atexit([] {  // libFuzzer exits through exit() when its time is up
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    return new std::string(p.string());
  }();
  return *dir;
}
void write_file(const std::string& path, const std::uint8_t* data, std::size_t size) {
  std::ofstream o(path, std::ios::binary | std::ios::trunc);
  o.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const int mode = data[0] % 3;
  ++data;
  --size;
  try {
    if (mode == 0) {
      const std::string path = scratch_dir() + "/a.npy";
      write_file(path, data, size);
      const auto a = cake_tools::load_npy(path);
      if (a.size() <= (1 << 20)) {
        (void)a.as<float>();
        (void)a.as<std::int64_t>();
      }
    } else if (mode == 1) {
      const auto j =
          cake_tools::Json::parse(std::string(reinterpret_cast<const char*>(data), size));
      (void)j;
    } else {
      write_file(scratch_dir() + "/meta.json", data, size);
      const cake_tools::GoldenCase gc(scratch_dir());
      (void)gc.config(cake::token_order::position);
    }
  } catch (const std::exception&) {
  }
  return 0;
}
