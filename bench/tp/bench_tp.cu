// bench_tp [out.csv]: tensor-parallel LoRA over NCCL on 2 GPUs (one host thread per GPU),
// layer 4096 → 14336, r = 16, bf16, T = 16 … 4096 tokens:
//   column-parallel (out split, 7168 rows per GPU): the rank's base GEMM alone vs the shard's
//     fused adapter layer (LowRankAdapter<bf16, cuda>::apply, planned), no collective in either;
//   row-parallel (in split, 2048 columns per GPU): base = GEMM + the layer's all-reduce of
//     T × 14336, vs the adapter folded into it (row_lora_fold; and the fused path + the
//     all-reduce), vs the adapter's own T × r all-reduce (row_lora_separate);
//   the unsharded layer on one GPU (base GEMM, fused adapter layer).
// Medians of CUDA-event-timed batches on rank 0 (bench/cuda/common.cuh's time_all; both ranks
// run the same sequence, so their collectives match). NCCL_NVLS_ENABLE=0 is set before NCCL
// starts. CSV: name,T,ms,ratio (ratio: against the base of the same layout).

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/tp.cuh>
#include <lora/tp/shard.hpp>

#include "cuda/common.cuh"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace lora;
using S = bfloat16;
using tp::TpLayout;

namespace {

constexpr int world = 2;
constexpr Index in = 4096, out = 14336, r = 16;
const Index token_counts[] = {16, 64, 256, 1024, 4096};
FILE* csv = stdout;

void emit(const char* name, Index T, double ms, double ratio) {
  std::fprintf(csv, "%s,%ld,%.5f,%.4f\n", name, static_cast<long>(T), ms, ratio);
  std::fflush(csv);
}

LowRankAdapter<S> host_adapter() {
  Generator g(7);
  return LowRankAdapter<S>::from_factors(bench::random_factor<S>(r, in, g), bench::random_factor<S>(out, r, g),
                                         /*alpha=*/32.0);
}

void unsharded(const LowRankAdapter<S>& host) {
  LORA_CUDA_CHECK(cudaSetDevice(0));
  auto ctx = std::make_shared<CudaContext>();
  Generator g(11);
  DeviceMatrix<S> W(out, in);
  bench::fill_random<S>(W.view(), g, 0.02);
  auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
  auto fw = ad.fuse(W);
  for (Index T : token_counts) {
    ad.plan(fw, T);
    DeviceMatrix<S> X(T, in), Y(T, out);
    bench::fill_random<S>(X.view(), g, 1.0);
    auto Xp = ad.padded_input(T);
    bench::fill_random<S>(Xp.view().col_block(0, in), g, 1.0);
    const auto ms = bench::time_all(*ctx,
                                    {[&](int) {
                                       detail::gemm<S, S, S>(*ctx, false, true, T, out, in, 1.f, X.view(), W.view(),
                                                             0.f, Y.view());
                                     },
                                     [&](int) { ad.apply(fw, Xp.view(), Y.view()); }},
                                    10, 15);
    emit("single_base", T, ms[0], 1.0);
    emit("single_lora_fused", T, ms[1], ms[1] / ms[0]);
  }
}

void rank_main(int rank, const ncclUniqueId& id, const LowRankAdapter<S>& host, std::barrier<>& sync) {
  LORA_CUDA_CHECK(cudaSetDevice(rank));
  auto ctx = std::make_shared<CudaContext>();
  tp::TpGroup group(id, rank, world, ctx->stream());
  Generator g(100 + static_cast<std::uint64_t>(rank));
  const bool lead = rank == 0;
  const float s = static_cast<float>(host.scaling());

  // Column-parallel shard.
  const auto crange = tp::shard_range(out, rank, world);
  auto cad = LowRankAdapter<S, cuda>::from_host(tp::shard(host, TpLayout::column, rank, world), ctx);
  DeviceMatrix<S> Wc(crange.size, in);
  bench::fill_random<S>(Wc.view(), g, 0.02);
  auto cfw = cad.fuse(Wc);
  // Row-parallel shard of the same layer.
  const auto rrange = tp::shard_range(in, rank, world);
  const auto rlocal = tp::shard(host, TpLayout::row, rank, world);
  auto rad = LowRankAdapter<S, cuda>::from_host(rlocal, ctx);
  DeviceMatrix<S> Wr(out, rrange.size);
  bench::fill_random<S>(Wr.view(), g, 0.02);
  auto rfw = rad.fuse(Wr);

  for (Index T : token_counts) {
    cad.plan(cfw, T);
    rad.plan(rfw, T);
    DeviceMatrix<S> X(T, in), Yc(T, crange.size), Xk(T, rrange.size), Y(T, out), xa(T, r);
    bench::fill_random<S>(X.view(), g, 1.0);
    bench::fill_random<S>(Xk.view(), g, 1.0);
    auto Xpc = cad.padded_input(T);
    bench::fill_random<S>(Xpc.view().col_block(0, in), g, 1.0);
    auto Xpr = rad.padded_input(T);
    bench::fill_random<S>(Xpr.view().col_block(0, rrange.size), g, 1.0);
    auto base_col = [&](int) {
      detail::gemm<S, S, S>(*ctx, false, true, T, crange.size, in, 1.f, X.view(), Wc.view(), 0.f, Yc.view());
    };
    auto lora_col = [&](int) { cad.apply(cfw, Xpc.view(), Yc.view()); };
    auto base_row_gemm = [&] {
      detail::gemm<S, S, S>(*ctx, false, true, T, out, rrange.size, 1.f, Xk.view(), Wr.view(), 0.f, Y.view());
    };
    auto base_row = [&](int) {
      base_row_gemm();
      group.all_reduce(Y.view());
    };
    auto fold_row = [&](int) {
      base_row_gemm();
      tp::row_lora_fold<S>(*ctx, group, rad.A(), rad.B(), s, Xk, xa, Y);
    };
    auto fused_row = [&](int) {
      rad.apply(rfw, Xpr.view(), Y.view());
      group.all_reduce(Y.view());
    };
    auto separate_row = [&](int) {
      base_row(0);
      tp::row_lora_separate<S>(*ctx, group, rad.A(), rad.B(), s, Xk, xa, Y);
    };
    sync.arrive_and_wait();
    const auto mc = bench::time_all(*ctx, {base_col, lora_col}, 10, 15);
    sync.arrive_and_wait();
    const auto mr = bench::time_all(*ctx, {base_row, fold_row, fused_row, separate_row}, 10, 15);
    if (lead) {
      emit("column_base", T, mc[0], 1.0);
      emit("column_lora_fused", T, mc[1], mc[1] / mc[0]);
      emit("row_base_allreduce", T, mr[0], 1.0);
      emit("row_lora_fold", T, mr[1], mr[1] / mr[0]);
      emit("row_lora_fused_fold", T, mr[2], mr[2] / mr[0]);
      emit("row_lora_separate", T, mr[3], mr[3] / mr[0]);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast off (the device machines' KINDS.md)
  if (argc > 1) {
    csv = std::fopen(argv[1], "w");
    if (!csv) {
      std::fprintf(stderr, "bench_tp: cannot write %s\n", argv[1]);
      return 1;
    }
  }
  int n = 0;
  LORA_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (n < world) {
    std::fprintf(stderr, "bench_tp: needs %d GPUs, found %d\n", world, n);
    return 1;
  }
  std::fprintf(csv, "name,T,ms,ratio\n");
  const auto host = host_adapter();
  unsharded(host);
  ncclUniqueId id;
  LORA_NCCL_CHECK(ncclGetUniqueId(&id));
  std::barrier<> sync(world);
  std::exception_ptr first;
  std::mutex m;
  std::vector<std::thread> th;
  for (int rank = 0; rank < world; ++rank)
    th.emplace_back([&, rank] {
      try {
        rank_main(rank, id, host, sync);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!first) first = std::current_exception();
      }
    });
  for (auto& t : th) t.join();
  if (first) {
    try {
      std::rethrow_exception(first);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_tp: %s\n", e.what());
    }
    return 1;
  }
  return 0;
}
