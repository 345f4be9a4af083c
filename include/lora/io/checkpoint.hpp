#pragma once
// Hugging Face checkpoints: one `.safetensors` file or a folder, sharded with
// `model.safetensors.index.json` ({"metadata": {"total_size": N}, "weight_map": {name: shard}}).
//
//   auto ck = lora::io::Checkpoint::open("Llama-3.2-1B/");          // file or folder
//   auto W = ck.tensor("model.layers.0.self_attn.q_proj.weight").to_matrix<float>();
//
// Writing streams tensor by tensor (nothing holds the whole model): describe the output
// with a CheckpointLayout, give a producer that returns each tensor's bytes, and
// write_checkpoint writes them, atomically, while the producer computes the next tensor.

#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/json.hpp>
#include <lora/io/safetensors.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace lora::io {

/// The file name of a sharded checkpoint's index.
inline constexpr const char* checkpoint_index_name = "model.safetensors.index.json";

/// A parsed model.safetensors.index.json: the weight_map in the file's order, every shard a
/// plain file name (no path separator, no control character, not "." or ".."), and the
/// "metadata" object.
struct CheckpointIndex {
  std::vector<std::pair<std::string, std::string>> weight_map;  ///< tensor name → shard file name
  nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
};

/// Parses and checks an index's text; `where` names the file in messages. O(n log n) in the
/// number of tensors (nlohmann::json objects, the weight_map's order taken while parsing),
/// depth bounded, a tensor listed twice refused.
inline CheckpointIndex parse_checkpoint_index(std::string_view text, const std::string& where) {
  std::vector<std::string> order;
  std::string top;
  JsonParseOptions popt;
  popt.on_key = [&](int depth, const std::string& key) {
    if (depth == 1) top = key;
    if (depth == 2 && top == "weight_map") order.push_back(key);
  };
  const nlohmann::json j = parse_json(text, where, popt);
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    lora::detail::fail("{}: expected an object with a \"weight_map\" object", where);
  CheckpointIndex out;
  if (j.contains("metadata")) {
    if (!j["metadata"].is_object())
      lora::detail::fail("{}: 'metadata' must be an object, got {}", where, detail::json_type_of(j["metadata"]));
    out.metadata = nlohmann::ordered_json::parse(j["metadata"].dump());
  }
  const nlohmann::json& wm = j["weight_map"];
  out.weight_map.reserve(order.size());
  for (auto& name : order) {
    const auto& v = wm.at(name);
    if (!v.is_string())
      lora::detail::fail("{}: weight_map['{}'] must be a file name, got {}", where, name, detail::json_excerpt(v));
    const std::string& shard = v.get_ref<const std::string&>();
    const bool odd = std::any_of(shard.begin(), shard.end(), [](char ch) {
      return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f || ch == '/' || ch == '\\';
    });
    if (shard.empty() || odd || shard == "." || shard == "..")
      lora::detail::fail("{}: weight_map['{}'] = {} is not a file name in the checkpoint folder", where, name, v.dump());
    out.weight_map.emplace_back(std::move(name), shard);
  }
  return out;
}

/// A checkpoint opened for reading: a single safetensors file, a folder holding
/// model.safetensors.index.json (every shard mapped), or a folder holding model.safetensors.
class Checkpoint {
 public:
  /// Opens and validates: the index must be a JSON object with a "weight_map" of names to
  /// shard file names in the folder, and every listed tensor must be in its shard.
  static Checkpoint open(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    Checkpoint c;
    c.path_ = path;
    if (!fs::exists(path)) lora::detail::fail("{}: checkpoint does not exist", path.string());
    if (!fs::is_directory(path)) {
      c.shards_.push_back(SafetensorsFile::open(path));
      c.shard_names_.push_back(path.filename().string());
      c.index_all(0);
      return c;
    }
    const fs::path index = path / checkpoint_index_name;
    if (!fs::exists(index)) {
      if (fs::exists(path / "model.safetensors")) {
        c.shards_.push_back(SafetensorsFile::open(path / "model.safetensors"));
        c.shard_names_.push_back("model.safetensors");
        c.index_all(0);
        return c;
      }
      lora::detail::fail("{}: folder has neither {} nor model.safetensors", path.string(), checkpoint_index_name);
    }
    c.sharded_ = true;
    const std::string where = index.string();
    const CheckpointIndex parsed = parse_checkpoint_index(read_regular_file(index), where);
    c.index_metadata_ = parsed.metadata;
    std::map<std::string, std::size_t> shard_ix;
    for (const auto& [name, shard] : parsed.weight_map) {
      auto it = shard_ix.find(shard);
      if (it == shard_ix.end()) {
        if (!fs::exists(fs::symlink_status(path / shard)))
          lora::detail::fail("{}: weight_map['{}'] names shard '{}', which does not exist", where, name, shard);
        it = shard_ix.emplace(shard, c.shards_.size()).first;
        c.shards_.push_back(SafetensorsFile::open(path / shard));
        c.shard_names_.push_back(shard);
      }
      const SafetensorsFile& f = c.shards_[it->second];
      if (!f.contains(name))
        lora::detail::fail("{}: weight_map puts tensor '{}' in {}, which has no such tensor", where, name, f.path());
      c.where_.emplace(name, Location{it->second, &f.tensor(name)});
      c.names_.push_back(name);
    }
    // A tensor in a shard that the index does not list (or lists in another shard) would be
    // silently dropped from every output.
    for (std::size_t s = 0; s < c.shards_.size(); ++s)
      for (const auto& t : c.shards_[s].tensors()) {
        auto w = c.where_.find(t.name);
        if (w == c.where_.end())
          lora::detail::fail("{}: shard {} holds tensor '{}', which the weight_map does not list", where,
                             c.shard_names_[s], t.name);
        if (w->second.shard != s)
          lora::detail::fail("{}: tensor '{}' is in shards {} and {}; the weight_map lists only {}", where, t.name,
                             c.shard_names_[w->second.shard], c.shard_names_[s], c.shard_names_[w->second.shard]);
      }
    return c;
  }

  /// Tensor names: the file's order for one file, the weight_map's order for an index.
  const std::vector<std::string>& names() const { return names_; }
  std::size_t size() const { return names_.size(); }
  bool contains(std::string_view name) const { return where_.find(std::string(name)) != where_.end(); }
  const TensorView& tensor(std::string_view name) const {
    auto it = where_.find(std::string(name));
    if (it == where_.end()) lora::detail::fail("{}: checkpoint has no tensor '{}'", path_.string(), name);
    return *it->second.view;
  }
  /// Index of the shard that holds `name` (0 for a single file).
  std::size_t shard_of(std::string_view name) const {
    auto it = where_.find(std::string(name));
    if (it == where_.end()) lora::detail::fail("{}: checkpoint has no tensor '{}'", path_.string(), name);
    return it->second.shard;
  }
  std::size_t shard_count() const { return shards_.size(); }
  const SafetensorsFile& shard(std::size_t i) const { return shards_.at(i); }
  /// File name of shard i inside the folder ("model-00001-of-00002.safetensors").
  const std::string& shard_name(std::size_t i) const { return shard_names_.at(i); }
  /// Whether the checkpoint came with an index file.
  bool sharded() const { return sharded_; }
  /// The index's "metadata" object (empty unless sharded).
  const nlohmann::ordered_json& index_metadata() const { return index_metadata_; }
  const std::filesystem::path& path() const { return path_; }
  /// Sum of the tensors' byte sizes.
  std::uint64_t total_bytes() const {
    std::uint64_t n = 0;
    for (const auto& [name, loc] : where_) n += loc.view->bytes.size();
    return n;
  }

 private:
  struct Location {
    std::size_t shard;
    const TensorView* view;  // points into shards_[shard], stable (SafetensorsFile is not modified)
  };
  void index_all(std::size_t s) {
    for (const auto& t : shards_[s].tensors()) {
      where_.emplace(t.name, Location{s, &t});
      names_.push_back(t.name);
    }
  }
  std::filesystem::path path_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> shards_;
  std::vector<std::string> shard_names_;
  std::map<std::string, Location> where_;
  std::vector<std::string> names_;
  nlohmann::ordered_json index_metadata_ = nlohmann::ordered_json::object();
};

// ---- writing ---------------------------------------------------------------

/// Name, dtype and shape of a tensor to be written.
struct TensorSpec {
  std::string name;
  dtype type = dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= static_cast<std::uint64_t>(d);
    return n;
  }
  std::uint64_t nbytes() const { return numel() * dtype_size(type); }
};

namespace detail {
/// An allocator that leaves new elements uninitialised (no memset of fresh buffers).
template <class T>
struct default_init_allocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = default_init_allocator<U>;
  };
  default_init_allocator() = default;
  template <class U>
  default_init_allocator(const default_init_allocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
}  // namespace detail

/// A byte buffer whose resize() does not zero the new bytes.
using ByteBuffer = std::vector<std::byte, detail::default_init_allocator<std::byte>>;

/// Reuses large output buffers across tensors, so that their pages stay mapped (a fresh
/// 30 MB allocation costs page faults and zeroing by the kernel). Thread-safe.
class BufferPool {
 public:
  explicit BufferPool(std::size_t keep = 4) : keep_(keep) {}
  /// A buffer of n bytes (contents unspecified).
  ByteBuffer acquire(std::size_t n) {
    ByteBuffer b;
    {
      std::lock_guard lk(mu_);
      if (!free_.empty()) {
        auto best = std::max_element(free_.begin(), free_.end(),
                                     [](const ByteBuffer& x, const ByteBuffer& y) { return x.capacity() < y.capacity(); });
        b = std::move(*best);
        free_.erase(best);
      }
    }
    b.resize(n);
    return b;
  }
  void release(ByteBuffer&& b) {
    std::lock_guard lk(mu_);
    if (free_.size() < keep_) free_.push_back(std::move(b));
  }

 private:
  std::mutex mu_;
  std::vector<ByteBuffer> free_;
  std::size_t keep_;
};

/// The bytes of one tensor, either borrowed (a view that stays valid until written, e.g.
/// into a mapped input file) or owned (optionally handed back to a BufferPool once written).
struct TensorBytes {
  ByteBuffer owned;
  std::span<const std::byte> view;
  bool borrowed = false;
  BufferPool* pool = nullptr;
  std::span<const std::byte> bytes() const { return borrowed ? view : std::span<const std::byte>(owned); }
  static TensorBytes borrow(std::span<const std::byte> v) {
    TensorBytes b;
    b.view = v;
    b.borrowed = true;
    return b;
  }
  static TensorBytes own(ByteBuffer v, BufferPool* pool = nullptr) {
    TensorBytes b;
    b.owned = std::move(v);
    b.pool = pool;
    return b;
  }
  static TensorBytes own(const std::vector<std::byte>& v) { return own(ByteBuffer(v.begin(), v.end())); }
};

/// One output file of a checkpoint: its name in the folder, its tensors in order, its metadata.
struct ShardSpec {
  std::string file;
  std::vector<TensorSpec> tensors;
  std::map<std::string, std::string> metadata;
};

/// What to write: one file, or a folder of shards (with an index when there are several
/// shards or `write_index` is set).
struct CheckpointLayout {
  std::vector<ShardSpec> shards;
  bool single_file = false;                ///< write shards[0] to the output path itself
  bool write_index = false;                ///< write model.safetensors.index.json even for one shard
  nlohmann::ordered_json index_metadata = nlohmann::ordered_json::object();  ///< total_size is filled in

  /// Splits tensors into shards of at most `max_shard_bytes` (a tensor larger than that gets
  /// its own shard), named like transformers does: model-00001-of-0000N.safetensors, or
  /// model.safetensors when one shard suffices.
  static CheckpointLayout split(const std::vector<TensorSpec>& tensors, std::uint64_t max_shard_bytes,
                                const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
    CheckpointLayout l;
    std::uint64_t cur = 0;
    for (const auto& t : tensors) {
      if (l.shards.empty() || (cur > 0 && cur + t.nbytes() > max_shard_bytes)) {
        l.shards.push_back(ShardSpec{{}, {}, metadata});
        cur = 0;
      }
      l.shards.back().tensors.push_back(t);
      cur += t.nbytes();
    }
    if (l.shards.empty()) l.shards.push_back(ShardSpec{{}, {}, metadata});
    const std::size_t n = l.shards.size();
    for (std::size_t i = 0; i < n; ++i)
      l.shards[i].file = n == 1 ? "model.safetensors" : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, n);
    return l;
  }
  std::uint64_t total_bytes() const {
    std::uint64_t n = 0;
    for (const auto& s : shards)
      for (const auto& t : s.tensors) n += t.nbytes();
    return n;
  }
  std::size_t tensor_count() const {
    std::size_t n = 0;
    for (const auto& s : shards) n += s.tensors.size();
    return n;
  }
};

/// Progress of a write: tensors and bytes done so far, out of the totals.
struct WriteProgress {
  std::size_t tensors_done = 0, tensors_total = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;
  std::string_view last;  ///< name of the tensor just written
};

namespace detail {

/// Sequential writer of one safetensors file whose header is known up front.
///
/// Large files (≥ 64 MiB) are written with O_DIRECT through an aligned staging buffer
/// where the file system allows it: buffered write() + fsync of a multi-GB checkpoint was
/// measured 3–4× slower than O_DIRECT on ext4 (virtio disk; docs/io.md), because the
/// page cache fills with dirty pages that are flushed only at the end. The unaligned tail
/// is written after clearing O_DIRECT. Any EINVAL from O_DIRECT (tmpfs before Linux 6.6,
/// network file systems) falls back to plain buffered writes.
class StreamingFile {
 public:
  static constexpr std::size_t kDirectMin = std::size_t{64} << 20;
  static constexpr std::size_t kAlign = 4096;
  static constexpr std::size_t kStage = std::size_t{8} << 20;

  StreamingFile(const std::filesystem::path& path, const std::vector<TensorSpec>& tensors,
                const std::map<std::string, std::string>& metadata)
      : path_(path.string()), tensors_(&tensors) {
    const std::string header =
        safetensors_header(tensors, metadata, [](const TensorSpec& t) { return t.nbytes(); });
    std::size_t total = header.size();
    for (const auto& t : tensors) total += t.nbytes();
#ifdef O_DIRECT
    if (total >= kDirectMin) {
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
      if (fd_ >= 0) {
        void* p = nullptr;
        if (::posix_memalign(&p, kAlign, kStage) == 0) {
          stage_.reset(static_cast<std::byte*>(p));
        } else {
          ::close(fd_);
          fd_ = -1;
        }
      }
    }
#endif
    if (fd_ < 0) fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) lora::detail::fail("{}: cannot open for writing: {}", path_, std::strerror(errno));
    put(std::as_bytes(std::span(header.data(), header.size())));
  }
  ~StreamingFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  StreamingFile(const StreamingFile&) = delete;
  StreamingFile& operator=(const StreamingFile&) = delete;

  /// Appends the next tensor; its size must match its spec.
  void append(std::span<const std::byte> bytes) {
    if (next_ >= tensors_->size()) lora::detail::fail("{}: more tensors written than declared", path_);
    const TensorSpec& t = (*tensors_)[next_++];
    if (bytes.size() != t.nbytes())
      lora::detail::fail("{}: tensor '{}': {} bytes given, its shape and dtype {} need {}", path_, t.name, bytes.size(),
                         dtype_name(t.type), t.nbytes());
    put(bytes);
  }
  void finish() {
    if (next_ != tensors_->size())
      lora::detail::fail("{}: {} of {} tensors written", path_, next_, tensors_->size());
    if (stage_) {  // the tail (< kStage bytes): aligned part direct, the rest buffered
      const std::size_t aligned = staged_ / kAlign * kAlign;
      if (aligned > 0) write_all(stage_.get(), aligned);
      const std::size_t rest = staged_ - aligned;
      staged_ = 0;
      if (rest > 0) {
        buffered();
        write_all(stage_.get() + aligned, rest);
      }
      stage_.reset();
    }
    if (::close(fd_) != 0) {
      fd_ = -1;
      lora::detail::fail("{}: close failed: {}", path_, std::strerror(errno));
    }
    fd_ = -1;
  }
  bool done() const { return next_ == tensors_->size(); }
  /// Whether this file is being written with O_DIRECT (for tests).
  bool direct() const { return static_cast<bool>(stage_); }

 private:
  struct FreeDeleter {
    void operator()(std::byte* p) const { std::free(p); }
  };

  void put(std::span<const std::byte> b) {
    if (!stage_) {
      write_all(b.data(), b.size());
      return;
    }
    const std::byte* p = b.data();
    std::size_t left = b.size();
    while (left > 0) {
      const std::size_t n = std::min(left, kStage - staged_);
      std::memcpy(stage_.get() + staged_, p, n);
      staged_ += n;
      p += n;
      left -= n;
      if (staged_ == kStage) {
        staged_ = 0;
        write_all(stage_.get(), kStage);
      }
    }
  }
  // Clears O_DIRECT; the staging buffer stays valid for a caller that still holds data.
  void buffered() {
#ifdef O_DIRECT
    const int fl = ::fcntl(fd_, F_GETFL);
    if (fl >= 0 && (fl & O_DIRECT)) ::fcntl(fd_, F_SETFL, fl & ~O_DIRECT);
#endif
  }
  void write_all(const std::byte* p, std::size_t left) {
    while (left > 0) {
      const ssize_t w = ::write(fd_, p, std::min<std::size_t>(left, std::size_t{1} << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL && stage_ && !fallback_) {  // O_DIRECT refused here: go buffered
          fallback_ = true;
          buffered();
          continue;
        }
        lora::detail::fail("{}: write failed: {}", path_, std::strerror(errno));
      }
      p += w;
      left -= static_cast<std::size_t>(w);
    }
  }
  std::string path_;
  const std::vector<TensorSpec>* tensors_;
  std::size_t next_ = 0;
  int fd_ = -1;
  std::unique_ptr<std::byte, FreeDeleter> stage_;
  std::size_t staged_ = 0;
  bool fallback_ = false;
};

/// Runs `produce` for every tensor on the calling thread and writes the results on a
/// second thread, so computing tensor k+1 overlaps writing tensor k.
inline void stream_tensors(const CheckpointLayout& layout, const std::vector<std::filesystem::path>& files,
                           const std::function<TensorBytes(const TensorSpec&)>& produce,
                           const std::function<void(const WriteProgress&)>& progress, std::size_t max_queued = 2) {
  struct Item {
    std::size_t shard;
    TensorBytes bytes;
    const TensorSpec* spec;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> queue;
  bool closed = false;
  std::exception_ptr writer_error;
  WriteProgress prog;
  prog.tensors_total = layout.tensor_count();
  prog.bytes_total = layout.total_bytes();

  std::thread writer([&] {
    std::vector<std::unique_ptr<StreamingFile>> open(layout.shards.size());
    try {
      for (;;) {
        Item item;
        {
          std::unique_lock lk(mu);
          cv.wait(lk, [&] { return !queue.empty() || closed; });
          if (queue.empty()) break;
          item = std::move(queue.front());
          queue.pop_front();
        }
        cv.notify_all();
        auto& f = open[item.shard];
        if (!f) f = std::make_unique<StreamingFile>(files[item.shard], layout.shards[item.shard].tensors,
                                                    layout.shards[item.shard].metadata);
        const std::size_t size = item.bytes.bytes().size();
        f->append(item.bytes.bytes());
        if (f->done()) f->finish();
        if (item.bytes.pool) item.bytes.pool->release(std::move(item.bytes.owned));
        prog.tensors_done++;
        prog.bytes_done += size;
        prog.last = item.spec->name;
        if (progress) progress(prog);
      }
      // shards without tensors still get a (header-only) file
      for (std::size_t s = 0; s < open.size(); ++s)
        if (!open[s]) {
          StreamingFile f(files[s], layout.shards[s].tensors, layout.shards[s].metadata);
          f.finish();
        }
    } catch (...) {
      std::lock_guard lk(mu);
      writer_error = std::current_exception();
      queue.clear();
      closed = true;
      cv.notify_all();
    }
  });

  std::exception_ptr producer_error;
  try {
    for (std::size_t s = 0; s < layout.shards.size(); ++s)
      for (const auto& spec : layout.shards[s].tensors) {
        {
          std::unique_lock lk(mu);
          cv.wait(lk, [&] { return queue.size() < max_queued || writer_error; });
          if (writer_error) break;
        }
        TensorBytes b = produce(spec);
        if (b.bytes().size() != spec.nbytes())
          lora::detail::fail("tensor '{}': producer gave {} bytes, its shape and dtype {} need {}", spec.name,
                             b.bytes().size(), dtype_name(spec.type), spec.nbytes());
        {
          std::lock_guard lk(mu);
          if (writer_error) break;
          queue.push_back(Item{s, std::move(b), &spec});
        }
        cv.notify_all();
      }
  } catch (...) {
    producer_error = std::current_exception();
  }
  {
    std::lock_guard lk(mu);
    closed = true;
    if (producer_error) queue.clear();
  }
  cv.notify_all();
  writer.join();
  if (producer_error) std::rethrow_exception(producer_error);
  if (writer_error) std::rethrow_exception(writer_error);
}

/// write_checkpoint's frame: checks the layout, makes the output atomically (a file, or a
/// folder with the index and extra_files) and lets `write_data(files)` write the shards'
/// safetensors files (one path per shard, in layout order).
inline void write_checkpoint_with(const std::filesystem::path& out, const CheckpointLayout& layout,
                                  const std::function<void(const std::vector<std::filesystem::path>&)>& write_data,
                                  const std::function<void(const std::filesystem::path&)>& extra_files) {
  namespace fs = std::filesystem;
  if (layout.shards.empty()) lora::detail::fail("{}: checkpoint layout has no shards", out.string());
  if (layout.single_file) {
    if (layout.shards.size() != 1)
      lora::detail::fail("{}: a single-file checkpoint needs exactly one shard, layout has {}", out.string(),
                         layout.shards.size());
    if (fs::is_directory(out)) lora::detail::fail("{}: is a folder, expected a file path", out.string());
    write_file_atomically(out, [&](const fs::path& tmp) { write_data({tmp}); });
    return;
  }
  std::map<std::string, std::size_t> seen;
  for (std::size_t i = 0; i < layout.shards.size(); ++i) {
    const auto& f = layout.shards[i].file;
    if (f.empty() || f.find('/') != std::string::npos || f == checkpoint_index_name)
      lora::detail::fail("{}: invalid shard file name '{}'", out.string(), f);
    if (!seen.emplace(f, i).second) lora::detail::fail("{}: shard file '{}' appears twice", out.string(), f);
  }
  write_folder_atomically(out, [&](const fs::path& tmp) {
    std::vector<fs::path> files;
    for (const auto& s : layout.shards) files.push_back(tmp / s.file);
    write_data(files);
    if (layout.shards.size() > 1 || layout.write_index) {
      nlohmann::ordered_json idx = nlohmann::ordered_json::object();
      nlohmann::ordered_json meta = layout.index_metadata.is_object() ? layout.index_metadata
                                                                      : nlohmann::ordered_json::object();
      meta["total_size"] = layout.total_bytes();
      idx["metadata"] = meta;
      std::vector<std::pair<std::string_view, std::string_view>> entries;
      for (const auto& s : layout.shards)
        for (const auto& t : s.tensors) entries.emplace_back(t.name, s.file);
      std::sort(entries.begin(), entries.end());  // transformers writes the weight_map sorted by name
      // The weight_map by hand: ordered_json's linear key lookups made 200,000 names quadratic.
      // Same text as ordered_json::dump(2).
      idx["weight_map"] = nlohmann::ordered_json::object();
      std::string text = idx.dump(2);
      if (!entries.empty()) {
        text.resize(text.size() - 4);  // "{}\n}"
        text += "{";
        for (std::size_t i = 0; i < entries.size(); ++i)
          text += fmt::format("{}\n    {}: {}", i ? "," : "", nlohmann::json(entries[i].first).dump(),
                              nlohmann::json(entries[i].second).dump());
        text += "\n  }\n}";
      }
      write_bytes(tmp / checkpoint_index_name, text + "\n");
    }
    if (extra_files) extra_files(tmp);
  });
}

}  // namespace detail

/// Writes a checkpoint described by `layout` to `out` (a file when layout.single_file, else
/// a folder), calling `produce(spec)` for each tensor in layout order. Atomic: on any error
/// nothing appears at `out` (an existing output is replaced only on success). `progress`
/// is called (from the writing thread) after each tensor. For a folder, `extra_files(tmp)`
/// (optional) writes further files (config.json, tokenizer, …) into the temporary folder
/// before it is renamed into place, so they appear atomically with the weights.
///
///   auto layout = lora::io::CheckpointLayout::split(specs, 5'000'000'000);
///   lora::io::write_checkpoint("out/", layout, [&](const lora::io::TensorSpec& t) { ... });
inline void write_checkpoint(const std::filesystem::path& out, const CheckpointLayout& layout,
                             const std::function<TensorBytes(const TensorSpec&)>& produce,
                             const std::function<void(const WriteProgress&)>& progress = {},
                             const std::function<void(const std::filesystem::path&)>& extra_files = {}) {
  detail::write_checkpoint_with(
      out, layout,
      [&](const std::vector<std::filesystem::path>& files) { detail::stream_tensors(layout, files, produce, progress); },
      extra_files);
}

/// write_checkpoint for outputs whose tensor sizes are known only once computed (an NF4
/// quant_state blob's length depends on the data): the layout gives the shards' files and
/// metadata, and `make_shard(s)` returns shard s's tensors, bytes included, just before that
/// shard is written (one shard's tensors are in memory at a time). The shard index and
/// total_size then list what was made. The same atomic frame and file writer as
/// write_checkpoint: on any error, `make_shard`'s included, nothing appears at `out`.
///
///   lora::io::write_checkpoint_by_shard("out.safetensors", layout, [&](std::size_t) { return tensors(); });
inline void write_checkpoint_by_shard(const std::filesystem::path& out, CheckpointLayout layout,
                                      const std::function<std::vector<TensorData>(std::size_t shard)>& make_shard,
                                      const std::function<void(const std::filesystem::path&)>& extra_files = {}) {
  for (std::size_t s = 0; s < layout.shards.size(); ++s)
    if (!layout.shards[s].tensors.empty())
      lora::detail::fail("{}: shard '{}' lists tensors; write_checkpoint_by_shard takes them from make_shard",
                         out.string(), layout.shards[s].file);
  // write_checkpoint_with reads `layout` again for the index after write_data has filled it in.
  detail::write_checkpoint_with(
      out, layout,
      [&](const std::vector<std::filesystem::path>& files) {
        for (std::size_t s = 0; s < layout.shards.size(); ++s) {
          const std::vector<TensorData> tensors = make_shard(s);
          ShardSpec& shard = layout.shards[s];
          for (const auto& t : tensors) shard.tensors.push_back(TensorSpec{t.name, t.type, t.shape});
          detail::StreamingFile f(files[s], shard.tensors, shard.metadata);
          for (const auto& t : tensors) f.append(t.bytes);
          f.finish();
        }
      },
      extra_files);
}

/// The layout of an existing checkpoint (same files, tensors, order and metadata), for
/// writing a modified copy; `retype(spec)` may change each tensor's dtype.
inline CheckpointLayout layout_of(const Checkpoint& ck, const std::function<dtype(const TensorView&)>& retype = {}) {
  CheckpointLayout l;
  l.shards.resize(ck.shard_count());
  for (std::size_t s = 0; s < ck.shard_count(); ++s) {
    l.shards[s].file = ck.shard_name(s);
    l.shards[s].metadata = ck.shard(s).metadata();
  }
  for (const auto& name : ck.names()) {
    const TensorView& v = ck.tensor(name);
    l.shards[ck.shard_of(name)].tensors.push_back(TensorSpec{name, retype ? retype(v) : v.type, v.shape});
  }
  l.write_index = ck.sharded();
  l.index_metadata = ck.index_metadata();
  return l;
}

}  // namespace lora::io
