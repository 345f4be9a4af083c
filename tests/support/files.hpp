#pragma once
// Fixture paths and scratch directories shared by the tests.

#include <fmt/format.h>

#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include "support/reference.hpp"

namespace lora::test {

/// Path of a fixture file under tests/data (LORA_TEST_DATA_DIR).
inline std::string data(const std::string& rel) { return std::string(LORA_TEST_DATA_DIR) + "/" + rel; }
/// Path of `rest` inside the PEFT fixture `fixture` (tests/data/peft/<fixture>/<rest>).
inline std::string peft(const std::string& fixture, const std::string& rest) {
  return data("peft/" + fixture + "/" + rest);
}

/// A fresh directory lora-test-<tag>-<random> under the system temp directory, removed with
/// its contents when the object goes out of scope.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(std::string_view tag) {
    path = std::filesystem::temp_directory_path() / fmt::format("lora-test-{}-{:x}", tag, fresh_seed());
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace lora::test
