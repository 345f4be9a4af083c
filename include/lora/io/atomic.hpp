#pragma once
// Atomic outputs: write into a temporary next to the target, then rename, so a
// failed or interrupted write never leaves a half-written file or folder.

#include <lora/error.hpp>
#include <lora/io/file.hpp>

#include <fcntl.h>
#include <stdio.h>  // renameat2 (glibc ≥ 2.28)
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
inline std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

/// Runs `body`; a lora::error or filesystem error from it is rethrown as a lora::error whose
/// message names `target` where it named the temporary (a full disk is reported for --out,
/// not for a hidden file that no longer exists).
template <class F>
void naming_target(const std::filesystem::path& tmp, const std::filesystem::path& target, F&& body) {
  try {
    body();
  } catch (const lora::error& e) {
    throw lora::error(replace_all(e.what(), tmp.string(), target.string()));
  } catch (const std::filesystem::filesystem_error& e) {
    throw lora::error(replace_all(e.what(), tmp.string(), target.string()));
  }
}

inline void fsync_path(const std::filesystem::path& p, int flags) {
  const int fd = ::open(p.c_str(), flags | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}
}  // namespace detail

/// Calls `write(tmp_path)` to produce a file at a temporary path in the
/// target's folder, fsyncs it and renames it over `target`. On any exception
/// the temporary is removed and the exception propagates; `target` is untouched.
/// The temporary is removed on SIGINT/SIGTERM too (see remove_temporaries_on_signal),
/// and one left by a killed run is removed by the next write of the same target.
inline void write_file_atomically(const std::filesystem::path& target,
                                  const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  if (target.has_parent_path() && !fs::is_directory(target.parent_path()))
    lora::detail::fail("{}: cannot write, folder {} does not exist", target.string(), target.parent_path().string());
  detail::Temporary tmp(target, false);
  detail::naming_target(tmp.path(), target, [&] {
    write(tmp.path());
    detail::fsync_path(tmp.path(), O_RDONLY);
    std::error_code ec;
    fs::rename(tmp.path(), target, ec);
    if (ec) lora::detail::fail("{}: cannot move the finished file into place: {}", target.string(), ec.message());
    tmp.release();
  });
}

/// Same for a folder: `write(tmp_dir)` fills a fresh temporary folder, which
/// then replaces `target` (an existing target folder is replaced whole). The swap is one
/// renameat2(RENAME_EXCHANGE) where the file system has it, so concurrent writers of the
/// same folder never see it missing: the last one to finish wins.
inline void write_folder_atomically(const std::filesystem::path& target,
                                    const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (!fs::is_directory(parent))
    lora::detail::fail("{}: cannot write, folder {} does not exist", target.string(), parent.string());
  if (fs::exists(target) && !fs::is_directory(target))
    lora::detail::fail("{}: exists and is not a folder", target.string());
  detail::Temporary tmp(target, true);
  detail::naming_target(tmp.path(), target, [&] { write(tmp.path()); });
  detail::fsync_path(tmp.path(), O_RDONLY | O_DIRECTORY);
  for (int attempt = 0;; ++attempt) {
    // Into place if nothing is there; else swap with what is there (then delete that).
    if (::renameat2(AT_FDCWD, tmp.path().c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) == 0) {
      tmp.release();
      return;
    }
    int e = errno;
    if (e == EEXIST || e == ENOTEMPTY) {
      if (::renameat2(AT_FDCWD, tmp.path().c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
        std::error_code ec;
        fs::remove_all(tmp.path(), ec);  // the previous output, now under the temporary's name
        tmp.release();
        return;
      }
      e = errno;
      if (e == ENOENT && attempt < 100) continue;  // removed meanwhile by another writer: try again
    }
    if (e == EINVAL || e == ENOSYS) {  // no renameat2 flags on this file system: move the old one aside
      std::error_code ec;
      const fs::path old = detail::temp_sibling(target);
      fs::rename(target, old, ec);
      if (ec && ec != std::errc::no_such_file_or_directory && attempt < 100) continue;
      fs::rename(tmp.path(), target, ec);
      if (!ec) {
        tmp.release();
        fs::remove_all(old, ec);
        return;
      }
      if (attempt < 100) continue;
      e = ec.value();
    }
    if (attempt >= 100 || (e != EEXIST && e != ENOTEMPTY && e != ENOENT))
      lora::detail::fail("{}: cannot move the finished folder into place: {}", target.string(), std::strerror(e));
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
