#pragma once
// Atomic outputs: write into a temporary next to the target, then rename, so a
// failed or interrupted write never leaves a half-written file or folder.

#include <lora/error.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <string_view>

namespace lora::io {

namespace detail {
inline std::filesystem::path temp_sibling(const std::filesystem::path& target) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  const auto dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  return dir / fmt::format(".{}.tmp-{:x}", target.filename().string(), rng());
}
}  // namespace detail

/// Calls `write(tmp_path)` to produce a file at a temporary path in the
/// target's folder, fsyncs it and renames it over `target`. On any exception
/// the temporary is removed and the exception propagates; `target` is untouched.
inline void write_file_atomically(const std::filesystem::path& target,
                                  const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  if (target.has_parent_path() && !fs::is_directory(target.parent_path()))
    lora::detail::fail("{}: cannot write, folder {} does not exist", target.string(), target.parent_path().string());
  const fs::path tmp = detail::temp_sibling(target);
  try {
    write(tmp);
    int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
    std::error_code ec;
    fs::rename(tmp, target, ec);
    if (ec) lora::detail::fail("{}: cannot move the finished file into place: {}", target.string(), ec.message());
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

/// Same for a folder: `write(tmp_dir)` fills a fresh temporary folder, which
/// then replaces `target` (an existing target folder is replaced whole).
inline void write_folder_atomically(const std::filesystem::path& target,
                                    const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (!fs::is_directory(parent))
    lora::detail::fail("{}: cannot write, folder {} does not exist", target.string(), parent.string());
  if (fs::exists(target) && !fs::is_directory(target))
    lora::detail::fail("{}: exists and is not a folder", target.string());
  const fs::path tmp = detail::temp_sibling(target);
  try {
    fs::create_directory(tmp);
    write(tmp);
    std::error_code ec;
    fs::path old;
    if (fs::exists(target)) {
      old = detail::temp_sibling(target);
      fs::rename(target, old, ec);
      if (ec) lora::detail::fail("{}: cannot replace the existing folder: {}", target.string(), ec.message());
    }
    fs::rename(tmp, target, ec);
    if (ec) {
      if (!old.empty()) fs::rename(old, target);
      lora::detail::fail("{}: cannot move the finished folder into place: {}", target.string(), ec.message());
    }
    if (!old.empty()) fs::remove_all(old);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

/// Writes bytes to `path` (not atomic by itself: use inside write_*_atomically).
inline void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) lora::detail::fail("{}: cannot open for writing: {}", path.string(), std::strerror(errno));
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.flush();
  if (!out) lora::detail::fail("{}: write failed: {}", path.string(), std::strerror(errno));
}

}  // namespace lora::io
