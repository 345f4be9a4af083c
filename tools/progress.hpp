#pragma once
// Progress lines on stderr for commands that can run for seconds: "lora <cmd>:  45%  ...",
// at most one per 5% step or per 2 s, and always the last one. --quiet turns them off.
#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace lora::cli {

class Progress {
 public:
  /// `enabled` false: every call is a no-op.
  Progress(std::string command, bool enabled) : command_(std::move(command)), enabled_(enabled) {}
  /// Reports `done` of `total` units; `what` follows the percentage ("3/10 modules").
  void update(std::uint64_t done, std::uint64_t total, const std::string& what) {
    if (!enabled_) return;
    const int pct = total ? static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total)) : 100;
    const auto now = std::chrono::steady_clock::now();
    const bool last = done >= total;
    if (!last && pct / 5 == last_pct_ / 5 && now - last_time_ < std::chrono::seconds(2)) return;
    if (last && last_pct_ == 100) return;
    last_pct_ = pct;
    last_time_ = now;
    fmt::print(stderr, "lora {}: {:3d}%  {}\n", command_, pct, what);
    std::fflush(stderr);
  }
  bool enabled() const { return enabled_; }

 private:
  std::string command_;
  bool enabled_;
  int last_pct_ = -1;
  std::chrono::steady_clock::time_point last_time_ = std::chrono::steady_clock::now();
};

}  // namespace lora::cli

namespace lora::cli {
/// 1234567 → "1,234,567".
inline std::string thousands(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}
}  // namespace lora::cli
