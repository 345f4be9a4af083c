#pragma once
// Files we read and paths we write, when either may be hostile or a mistake:
//  - open_regular_file / read_regular_file: never block (a FIFO given as a model blocks a
//    plain open() forever), and refuse anything but a regular file, naming the path;
//  - check_output: before writing anything, refuse an output that is, contains or lies
//    inside one of the inputs (compared by device and inode, so links and "a/../a" are
//    seen through), or that would replace a folder of unrelated files;
//  - temporaries: the atomic writers (atomic.hpp) name their temporaries
//    ".<name>.tmp-<pid>-<random>", hold an flock on them, register them so that
//    remove_temporaries_on_signal() can delete them on SIGINT/SIGTERM, and remove the ones
//    a killed run left behind (dead pid, lock free) before writing the same output again.

#include <lora/error.hpp>

#include <fmt/format.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace lora::io {

namespace detail {
/// "a folder", "a FIFO (named pipe)", ... for the file type bits of st_mode.
inline const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a folder";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISREG(mode)) return "a regular file";
  return "not a regular file";
}
}  // namespace detail

/// Opens `path` read-only without blocking (O_NONBLOCK: a FIFO without a writer would
/// otherwise block forever) and checks that it is a regular file. Returns the descriptor
/// (the caller closes it) and fills `st`. Throws lora::error naming the path.
inline int open_regular_file(const std::filesystem::path& path, struct stat& st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) lora::detail::fail("{}: cannot open for reading: {}", path.string(), std::strerror(errno));
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    lora::detail::fail("{}: cannot stat: {}", path.string(), std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    lora::detail::fail("{}: is {}, expected a regular file", path.string(), detail::file_kind(st.st_mode));
  }
  return fd;
}

/// The whole content of a regular file of at most `max_bytes` (see open_regular_file).
inline std::string read_regular_file(const std::filesystem::path& path, std::size_t max_bytes = std::size_t{100} << 20) {
  struct stat st {};
  const int fd = open_regular_file(path, st);
  if (static_cast<std::uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    lora::detail::fail("{}: is {} bytes, more than the {} bytes accepted for this file", path.string(),
                       static_cast<std::uint64_t>(st.st_size), max_bytes);
  }
  std::string out(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      lora::detail::fail("{}: read failed: {}", path.string(), std::strerror(e));
    }
    if (n == 0) break;  // shrank while we read
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

// ---- outputs ----------------------------------------------------------------

/// What an output path will be: one file, or a folder (replaced whole).
enum class output_kind { file, folder };

namespace detail {
struct FileId {
  dev_t dev;
  ino_t ino;
  bool operator==(const FileId&) const = default;
};
inline std::optional<FileId> file_id(const std::filesystem::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}
/// The identities of every existing ancestor of p (not p itself), innermost first,
/// with symbolic links resolved.
inline std::vector<FileId> ancestor_ids(const std::filesystem::path& p) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path a = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) a = fs::absolute(p, ec);
  std::vector<FileId> out;
  for (fs::path q = a.parent_path();; q = q.parent_path()) {
    if (auto id = file_id(q)) out.push_back(*id);
    if (q == q.parent_path()) break;
  }
  return out;
}
/// Whether a folder looks like one we (or transformers/PEFT) wrote: only regular files,
/// at least one of them a .safetensors file or adapter_config.json.
inline bool looks_like_model_folder(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  bool model = false;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const auto& e = *it;
    std::error_code ec2;
    if (!e.is_regular_file(ec2) || e.is_symlink(ec2)) return false;
    const std::string name = e.path().filename().string();
    if (e.path().extension() == ".safetensors" || name == "adapter_config.json") model = true;
  }
  return !ec && model;
}
}  // namespace detail

/// Throws lora::error, before anything is written, when writing `out` (a `kind`) could
/// destroy or change one of `inputs` (files or folders): when `out` is an input, lies
/// inside an input folder, or is a folder that holds an input; compared by device and
/// inode, so symbolic and hard links are seen through. Without `force`, also refuses to
/// replace an existing non-empty folder that does not look like a model or adapter folder
/// (only regular files, at least one .safetensors or adapter_config.json), and a folder
/// given as a file output or a file as a folder output. `flag` names the option ("--out").
inline void check_output(const std::filesystem::path& out, const std::vector<std::filesystem::path>& inputs,
                         output_kind kind, bool force = false, std::string_view flag = "--out") {
  namespace fs = std::filesystem;
  if (out.empty()) lora::detail::fail("{} must not be empty", flag);
  const std::string o = out.string();
  const auto out_id = detail::file_id(out);
  const auto out_up = detail::ancestor_ids(out);
  for (const auto& in : inputs) {
    const auto in_id = detail::file_id(in);
    if (!in_id) continue;  // a missing input fails when it is opened
    if (out_id && *out_id == *in_id)
      lora::detail::fail("{} {} is the input {} itself; write to a new path", flag, o, in.string());
    for (const auto& a : out_up)
      if (a == *in_id)
        lora::detail::fail("{} {} lies inside the input folder {}; write outside it", flag, o, in.string());
    if (out_id)
      for (const auto& a : detail::ancestor_ids(in))
        if (a == *out_id)
          lora::detail::fail("{} {} holds the input {}; replacing it would delete the input", flag, o, in.string());
  }
  if (!out_id) return;
  std::error_code ec;
  const bool is_dir = fs::is_directory(out, ec);
  if (kind == output_kind::file && is_dir)
    lora::detail::fail("{} {} is a folder, expected a file path", flag, o);
  if (kind == output_kind::folder && !is_dir)
    lora::detail::fail("{} {} exists and is not a folder", flag, o);
  if (kind == output_kind::folder && !force && !fs::is_empty(out, ec) && !detail::looks_like_model_folder(out))
    lora::detail::fail("{} {} is a folder of other files, which would be replaced whole; give an empty or new "
                       "folder, or add --force",
                       flag, o);
}

// ---- temporaries ----------------------------------------------------------

namespace detail {

/// Paths being written right now, for the signal handler: fixed storage, no allocation.
struct TempSlot {
  std::atomic<int> state{0};  // 0 free, 1 being filled, 2 live
  bool folder = false;
  char path[PATH_MAX] = {};
};
inline std::array<TempSlot, 32>& temp_slots() {
  static std::array<TempSlot, 32> slots;
  return slots;
}

/// Registers a temporary for removal on SIGINT/SIGTERM; returns its slot or -1 (all busy:
/// the path is then only removed by the next run).
inline int register_temp(const std::filesystem::path& p, bool folder) {
  const std::string s = std::filesystem::absolute(p).string();
  if (s.size() >= PATH_MAX) return -1;
  for (std::size_t i = 0; i < temp_slots().size(); ++i) {
    auto& slot = temp_slots()[i];
    int expect = 0;
    if (!slot.state.compare_exchange_strong(expect, 1)) continue;
    std::memcpy(slot.path, s.c_str(), s.size() + 1);
    slot.folder = folder;
    slot.state.store(2, std::memory_order_release);
    return static_cast<int>(i);
  }
  return -1;
}
inline void unregister_temp(int slot) {
  if (slot >= 0) temp_slots()[static_cast<std::size_t>(slot)].state.store(0, std::memory_order_release);
}

/// Deletes a flat folder (files only, as our temporaries are) with system calls alone,
/// so that it may run in a signal handler.
inline void remove_flat_folder_signal_safe(const char* path) {
  const int fd = ::open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    alignas(8) char buf[4096];
    for (;;) {
      const long n = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
      if (n <= 0) break;
      for (long off = 0; off < n;) {
        // struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        unsigned short reclen;
        std::memcpy(&reclen, buf + off + 16, sizeof reclen);
        const char* name = buf + off + 19;
        if (!(name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0)))) ::unlinkat(fd, name, 0);
        off += reclen;
      }
    }
    ::close(fd);
  }
  ::rmdir(path);
}

inline void remove_temporaries_now() {
  for (auto& slot : temp_slots()) {
    if (slot.state.load(std::memory_order_acquire) != 2) continue;
    if (slot.folder)
      remove_flat_folder_signal_safe(slot.path);
    else
      ::unlink(slot.path);
  }
}

inline void on_fatal_signal(int sig) {
  remove_temporaries_now();
  ::signal(sig, SIG_DFL);  // then die of the same signal, so the exit status says so
  ::raise(sig);
}

/// ".<name>.tmp-" : the prefix of every temporary written for `target`.
inline std::string temp_prefix(const std::filesystem::path& target) {
  return "." + target.filename().string() + ".tmp-";
}

/// A fresh temporary path next to `target`: ".<name>.tmp-<pid>-<random hex>".
inline std::filesystem::path temp_sibling(const std::filesystem::path& target) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  const auto dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  return dir / fmt::format("{}{}-{:x}", temp_prefix(target), static_cast<long>(::getpid()), rng());
}

/// Removes the temporaries of `target` that a killed run left: their pid is not running
/// and nobody holds their lock. Temporaries of live writers (this process included) stay.
inline void remove_stale_temporaries(const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string prefix = temp_prefix(target);
  std::error_code ec;
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    const auto dash = rest.find('-');
    if (dash == std::string::npos || dash == 0 || dash > 10) continue;
    long pid = 0;
    bool digits = true;
    for (std::size_t i = 0; i < dash; ++i) {
      if (rest[i] < '0' || rest[i] > '9') digits = false;
      else pid = pid * 10 + (rest[i] - '0');
    }
    if (!digits || pid <= 0 || pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive (or not ours to probe)
    const int fd = ::open(it->path().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) continue;
    const bool free = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
    ::close(fd);
    if (free) stale.push_back(it->path());
  }
  for (const auto& p : stale) fs::remove_all(p, ec);
}

/// A temporary being written: created and locked on construction, registered for the
/// signal handler; the destructor removes it unless release() was called after the rename.
class Temporary {
 public:
  Temporary(const std::filesystem::path& target, bool folder) : path_(temp_sibling(target)), folder_(folder) {
    remove_stale_temporaries(target);
    slot_ = register_temp(path_, folder);
    if (folder) {
      if (::mkdir(path_.c_str(), 0755) != 0) fail_create(target);
      fd_ = ::open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } else {
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd_ < 0) fail_create(target);
    }
    if (fd_ >= 0) ::flock(fd_, LOCK_EX | LOCK_NB);
  }
  ~Temporary() {
    if (!released_) {
      std::error_code ec;
      std::filesystem::remove_all(path_, ec);
    }
    unregister_temp(slot_);
    if (fd_ >= 0) ::close(fd_);
  }
  Temporary(const Temporary&) = delete;
  Temporary& operator=(const Temporary&) = delete;
  const std::filesystem::path& path() const { return path_; }
  /// The path no longer needs removing (it was renamed into place).
  void release() { released_ = true; }

 private:
  [[noreturn]] void fail_create(const std::filesystem::path& target) {
    const int e = errno;
    unregister_temp(slot_);
    slot_ = -1;
    released_ = true;
    lora::detail::fail("{}: cannot create a temporary {} next to it: {}", target.string(), folder_ ? "folder" : "file",
                       std::strerror(e));
  }
  std::filesystem::path path_;
  bool folder_;
  int slot_ = -1;
  int fd_ = -1;
  bool released_ = false;
};

}  // namespace detail

/// Installs SIGINT, SIGTERM and SIGHUP handlers that delete the temporaries of every
/// atomic write in progress, then let the signal end the process as it would have. For
/// programs (the `lora` CLI calls it first thing); a library does not install handlers
/// by itself. Signals set to be ignored stay ignored.
inline void remove_temporaries_on_signal() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    struct sigaction sa {};
    sa.sa_handler = detail::on_fatal_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    ::sigaction(sig, &sa, nullptr);
  }
}

}  // namespace lora::io
