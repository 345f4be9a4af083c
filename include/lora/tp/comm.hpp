#pragma once
// The collective that tensor-parallel LoRA needs (a sum all-reduce), as a concept, and an
// in-process group whose ranks are threads: the CPU stand-in for an NCCL communicator, used
// to check the sharded math against the unsharded layer without GPUs.
//
//   lora::tp::LocalGroup group(/*world=*/4);
//   group.run([&](lora::tp::LocalComm& comm) {
//     auto local = lora::tp::shard(adapter, lora::tp::TpLayout::row, comm.rank(), comm.world());
//     auto Y = lora::tp::apply(local, lora::tp::TpLayout::row, W_k, X_k, comm);
//   });

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <concepts>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

namespace lora::tp {

/// A communicator: rank(), world(), and an in-place sum all-reduce over float and double
/// (every rank passes the same number of elements; afterwards each holds the sum over ranks).
template <class C>
concept Communicator = requires(C& c, std::span<float> f, std::span<double> d) {
  { c.rank() } -> std::convertible_to<int>;
  { c.world() } -> std::convertible_to<int>;
  c.all_reduce(f);
  c.all_reduce(d);
};

/// The trivial communicator of a world of one (no communication).
struct SelfComm {
  int rank() const { return 0; }
  int world() const { return 1; }
  template <class T>
  void all_reduce(std::span<T>) const {}
};

class LocalGroup;

/// One rank's handle on a LocalGroup.
class LocalComm {
 public:
  int rank() const { return rank_; }
  int world() const;
  /// Sum over ranks, in rank order on every rank (so every rank gets the same bits).
  template <class T>
  void all_reduce(std::span<T> data);

 private:
  friend class LocalGroup;
  LocalComm(LocalGroup& g, int rank) : group_(&g), rank_(rank) {}
  LocalGroup* group_;
  int rank_;
};

/// `world` threads as ranks, with a barrier-based all-reduce: each rank publishes its buffer,
/// waits for all, sums every rank's buffer in rank order into a scratch copy, waits again
/// (nobody still reads), then writes its result. If one rank throws, it leaves the barrier
/// and the others fail at their next all-reduce instead of waiting forever; run() rethrows
/// the first exception.
class LocalGroup {
 public:
  explicit LocalGroup(int world) : world_(world), slots_(static_cast<std::size_t>(world < 1 ? 0 : world)) {
    if (world < 1) fail("tp::LocalGroup: world size must be at least 1, got {}", world);
  }
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;

  int world() const { return world_; }

  /// Runs fn(LocalComm&) on `world` threads, one per rank, and waits for all of them.
  void run(const std::function<void(LocalComm&)>& fn) {
    // A fresh barrier per run: a failed rank's arrive_and_drop lowers the count for good.
    barrier_ = std::make_unique<std::barrier<>>(world_);
    failed_ = false;
    std::exception_ptr first;
    std::mutex m;
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(world_));
    for (int r = 0; r < world_; ++r)
      threads.emplace_back([&, r] {
        LocalComm comm(*this, r);
        try {
          fn(comm);
        } catch (...) {
          {
            std::lock_guard<std::mutex> lock(m);
            if (!first) first = std::current_exception();
          }
          failed_ = true;
          barrier_->arrive_and_drop();
        }
      });
    for (auto& t : threads) t.join();
    if (first) std::rethrow_exception(first);
  }

 private:
  friend class LocalComm;
  struct Slot {
    const void* data = nullptr;
    std::size_t size = 0;
    std::size_t elem = 0;
  };

  template <class T>
  void all_reduce(int rank, std::span<T> data) {
    slots_[static_cast<std::size_t>(rank)] = {data.data(), data.size(), sizeof(T)};
    sync();
    for (int k = 0; k < world_; ++k) {
      const Slot& s = slots_[static_cast<std::size_t>(k)];
      if (s.size != data.size() || s.elem != sizeof(T))
        fail("tp::LocalGroup: all-reduce mismatch: rank {} passed {} elements of {} bytes, rank {} passed {} of {}",
             rank, data.size(), sizeof(T), k, s.size, s.elem);
    }
    std::vector<T> sum(data.size(), T(0));
    for (int k = 0; k < world_; ++k) {
      const T* p = static_cast<const T*>(slots_[static_cast<std::size_t>(k)].data);
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += p[i];
    }
    sync();
    std::copy(sum.begin(), sum.end(), data.begin());
  }
  void sync() {
    barrier_->arrive_and_wait();
    if (failed_) fail("tp::LocalGroup: another rank failed; this all-reduce cannot complete");
  }

  int world_;
  std::unique_ptr<std::barrier<>> barrier_;
  std::vector<Slot> slots_;
  std::atomic<bool> failed_{false};
};

inline int LocalComm::world() const { return group_->world(); }
template <class T>
void LocalComm::all_reduce(std::span<T> data) {
  group_->all_reduce(rank_, data);
}

static_assert(Communicator<LocalComm>);
static_assert(Communicator<SelfComm>);

/// All-reduces a contiguous Eigen matrix or vector in place.
template <Communicator Comm, class Derived>
void all_reduce(Comm& comm, Eigen::PlainObjectBase<Derived>& m) {
  using T = typename Derived::Scalar;
  comm.all_reduce(std::span<T>(m.data(), static_cast<std::size_t>(m.size())));
}

}  // namespace lora::tp
