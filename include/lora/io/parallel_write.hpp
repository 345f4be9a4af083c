#pragma once
// Writing a checkpoint with several threads: every output file's layout (header, then each
// tensor at its offset) is known before a byte is written, so the file is cut into aligned
// chunks that threads fill and write at their final offsets (pwrite; O_DIRECT for large
// files, where buffered writes + fsync are several times slower, docs/io.md). Filling a
// chunk — copying, converting or merging the tensors it overlaps — runs while other chunks
// are on their way to the disk, so a merge costs about what copying the file does.
//
//   lora::io::write_checkpoint_parallel("out/", layout,
//       [&](const lora::io::TensorSpec& t, std::uint64_t begin, std::uint64_t end, std::byte* dst) {
//         std::memcpy(dst, bytes_of(t.name) + begin, end - begin);  // bytes [begin, end) of t
//       });

#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace lora::io {

/// Writes bytes [begin, end) of tensor `spec`'s data (offsets from its first byte) to dst.
/// Called from several threads at once, for disjoint ranges.
using TensorRangeFill =
    std::function<void(const TensorSpec& spec, std::uint64_t begin, std::uint64_t end, std::byte* dst)>;

struct ParallelWriteOptions {
  unsigned threads = 0;                          ///< threads filling and writing chunks; 0: one per hardware thread
  std::size_t chunk_bytes = std::size_t{8} << 20;  ///< bytes per chunk (rounded to a multiple of 4096)
  std::uint64_t direct_min = std::uint64_t{64} << 20;  ///< files this large are written with O_DIRECT where allowed
};

namespace detail {

struct AlignedFree {
  void operator()(std::byte* p) const { std::free(p); }
};

/// One output file being written in chunks.
struct ChunkedFile {
  std::string path;
  std::string header;                   ///< the 8-byte length and the JSON header
  std::vector<std::uint64_t> begin;     ///< each tensor's first byte in the file
  std::uint64_t size = 0;
  int fd = -1;
  std::atomic<bool> direct{false};
  std::mutex fallback;

  ~ChunkedFile() {
    if (fd >= 0) ::close(fd);
  }

  void open(std::uint64_t direct_min) {
#ifdef O_DIRECT
    if (size >= direct_min) {
      fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
      direct = fd >= 0;
    }
#endif
    if (fd < 0) fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) lora::detail::fail("{}: cannot open for writing: {}", path, std::strerror(errno));
  }

  /// Writes len bytes of buf (4096-aligned, with room up to the next multiple of 4096) at
  /// offset `at` (a multiple of 4096). Direct writes are padded with zeros past the end of
  /// the file; finish() cuts the file to its size.
  void write(std::byte* buf, std::size_t len, std::uint64_t at) {
    for (;;) {
      const bool d = direct.load();
      const std::size_t want = d ? (len + 4095) / 4096 * 4096 : len;
      if (want > len) std::memset(buf + len, 0, want - len);
      std::size_t done = 0;
      int err = 0;
      while (done < want) {
        const ssize_t w = ::pwrite(fd, buf + done, want - done, static_cast<off_t>(at + done));
        if (w < 0) {
          if (errno == EINTR) continue;
          err = errno;
          break;
        }
        if (w == 0) {
          err = EIO;
          break;
        }
        done += static_cast<std::size_t>(w);
      }
      if (!err) return;
      if (err == EINVAL && d) {  // O_DIRECT refused here (tmpfs, some network file systems): go buffered
        std::lock_guard lk(fallback);
        const int fl = ::fcntl(fd, F_GETFL);
        if (fl >= 0) ::fcntl(fd, F_SETFL, fl & ~O_DIRECT);
        direct = false;
        continue;
      }
      lora::detail::fail("{}: write failed: {}", path, std::strerror(err));
    }
  }

  void finish() {
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
      lora::detail::fail("{}: cannot set the file size: {}", path, std::strerror(errno));
    if (::fsync(fd) != 0) lora::detail::fail("{}: fsync failed: {}", path, std::strerror(errno));
    const int fd0 = fd;
    fd = -1;
    if (::close(fd0) != 0) lora::detail::fail("{}: close failed: {}", path, std::strerror(errno));
  }
};

/// Writes the shards of `layout` to `files` (one per shard) with `threads` threads, each
/// taking the next chunk, filling it (header bytes, then fill() for every tensor it overlaps)
/// and writing it at its offset. progress() is called in layout order, under a lock, once
/// every chunk of a tensor is written.
inline void write_chunks_parallel(const CheckpointLayout& layout, const std::vector<std::filesystem::path>& files,
                                  const TensorRangeFill& fill, const std::function<void(const WriteProgress&)>& progress,
                                  const ParallelWriteOptions& options) {
  const std::size_t chunk = std::max<std::size_t>(4096, options.chunk_bytes / 4096 * 4096);
  std::vector<std::unique_ptr<ChunkedFile>> out;
  struct Job {
    std::size_t file;
    std::uint64_t at;
  };
  std::vector<Job> jobs;
  struct TensorRef {
    std::size_t file, index, last_job;
  };
  std::vector<TensorRef> order;  // every tensor in layout order, with the last chunk holding its bytes
  for (std::size_t s = 0; s < layout.shards.size(); ++s) {
    const auto& sh = layout.shards[s];
    auto f = std::make_unique<ChunkedFile>();
    f->path = files.at(s).string();
    f->header = safetensors_header(sh.tensors, sh.metadata, [](const TensorSpec& t) { return t.nbytes(); });
    std::uint64_t at = f->header.size();
    for (const auto& t : sh.tensors) {
      f->begin.push_back(at);
      at += t.nbytes();
    }
    f->size = at;
    const std::size_t first_job = jobs.size();
    for (std::uint64_t c = 0; c < f->size; c += chunk) jobs.push_back({s, c});
    for (std::size_t i = 0; i < sh.tensors.size(); ++i) {
      const std::uint64_t end = f->begin[i] + sh.tensors[i].nbytes();
      order.push_back({s, i, first_job + static_cast<std::size_t>((std::max<std::uint64_t>(end, 1) - 1) / chunk)});
    }
    out.push_back(std::move(f));
  }
  for (auto& f : out) f->open(options.direct_min);

  WriteProgress prog;
  prog.tensors_total = layout.tensor_count();
  prog.bytes_total = layout.total_bytes();
  std::mutex mu;
  std::vector<char> done(jobs.size(), 0);
  std::size_t frontier = 0, reported = 0;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  auto work = [&] {
    std::unique_ptr<std::byte, AlignedFree> buf;
    try {
      void* p = nullptr;
      if (::posix_memalign(&p, 4096, chunk) != 0) lora::detail::fail("cannot allocate a {}-byte write buffer", chunk);
      buf.reset(static_cast<std::byte*>(p));
      for (;;) {
        if (failed) return;
        const std::size_t j = next.fetch_add(1);
        if (j >= jobs.size()) return;
        ChunkedFile& f = *out[jobs[j].file];
        const auto& tensors = layout.shards[jobs[j].file].tensors;
        const std::uint64_t a = jobs[j].at, b = std::min<std::uint64_t>(a + chunk, f.size);
        if (a < f.header.size())
          std::memcpy(buf.get(), f.header.data() + a, std::min<std::uint64_t>(b, f.header.size()) - a);
        // the first tensor ending after a
        std::size_t t = static_cast<std::size_t>(
            std::upper_bound(f.begin.begin(), f.begin.end(), a) - f.begin.begin());
        if (t > 0) --t;
        for (; t < tensors.size() && f.begin[t] < b; ++t) {
          const std::uint64_t lo = std::max(a, f.begin[t]), hi = std::min(b, f.begin[t] + tensors[t].nbytes());
          if (hi > lo) fill(tensors[t], lo - f.begin[t], hi - f.begin[t], buf.get() + (lo - a));
        }
        f.write(buf.get(), static_cast<std::size_t>(b - a), a);
        std::lock_guard lk(mu);
        done[j] = 1;
        while (frontier < jobs.size() && done[frontier]) ++frontier;
        for (; reported < order.size() && order[reported].last_job < frontier; ++reported) {
          const TensorSpec& spec = layout.shards[order[reported].file].tensors[order[reported].index];
          prog.tensors_done++;
          prog.bytes_done += spec.nbytes();
          prog.last = spec.name;
          if (progress) progress(prog);
        }
      }
    } catch (...) {
      std::lock_guard lk(mu);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };

  unsigned threads = options.threads ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<std::size_t>(threads, std::max<std::size_t>(1, jobs.size())));
  std::vector<std::thread> pool;
  try {
    for (unsigned i = 1; i < threads; ++i) pool.emplace_back(work);
  } catch (...) {  // no more threads: the ones started and this one do the work
  }
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  for (auto& f : out) f->finish();
}

}  // namespace detail

/// write_checkpoint with the tensors' bytes given by ranges: `fill(spec, begin, end, dst)`
/// writes bytes [begin, end) of a tensor, called from options.threads threads for disjoint
/// chunks, each written at its final offset as soon as it is filled. Same output as
/// write_checkpoint with a producer of the same bytes (file or folder, index, extra_files),
/// atomic the same way; every file is fsynced. `progress` is called in layout order, one
/// call at a time, once a tensor's bytes are all written.
inline void write_checkpoint_parallel(const std::filesystem::path& out, const CheckpointLayout& layout,
                                      const TensorRangeFill& fill,
                                      const std::function<void(const WriteProgress&)>& progress = {},
                                      const std::function<void(const std::filesystem::path&)>& extra_files = {},
                                      const ParallelWriteOptions& options = {}) {
  detail::write_checkpoint_with(
      out, layout,
      [&](const std::vector<std::filesystem::path>& files) {
        detail::write_chunks_parallel(layout, files, fill, progress, options);
      },
      extra_files);
}

}  // namespace lora::io
