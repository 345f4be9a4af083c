// lora/cuda/tp.cuh on 2 GPUs: one host thread per GPU joins an NCCL group; the sharded layer
// (column-parallel; row-parallel folded into the layer's all-reduce, with its own T × r
// all-reduce, and through the fused adapter path) and its backward (the shard's own plus the
// all-reduces of docs/tensor-parallel.md) must equal the unsharded layer on one GPU and, in
// float, the float64 CPU reference. NCCL_NVLS_ENABLE=0 is set before NCCL starts.
#include <lora/cuda/adapter.cuh>
#include <lora/cuda/tp.cuh>
#include <lora/tp/shard.hpp>

#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::rel_error;
using tp::TpLayout;

namespace {

constexpr int world = 2;

int devices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// What each rank computed, copied to the host.
template <class S>
struct RankOut {
  Matrix<S> column, fold, separate, fused;
  Matrix<float> col_dA, col_dB, row_dA, row_dB;  // backward: column dA whole, dB rows; row dA columns, dB whole
  Matrix<S> col_dX, row_dX;                      // column dX whole (all-reduced), row dX columns
};

// Runs fn(rank) on one thread per GPU; rethrows the first exception.
template <class F>
void on_ranks(F&& fn) {
  std::exception_ptr first;
  std::mutex m;
  std::vector<std::thread> th;
  for (int r = 0; r < world; ++r)
    th.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!first) first = std::current_exception();
      }
    });
  for (auto& t : th) t.join();
  if (first) std::rethrow_exception(first);
}

template <class S>
void check_layer(Index T, double tol) {
  const Index in = 512, out = 384, r = 16;
  Generator gen(lora::test::fresh_seed());
  const Matrix<S> W = lora::test::random_matrix<S>(out, in, gen, 0.05);
  const Matrix<S> X = lora::test::random_matrix<S>(T, in, gen);
  const Matrix<S> dY = lora::test::random_matrix<S>(T, out, gen);
  auto host = LowRankAdapter<S>::from_factors(lora::test::random_matrix<S>(r, in, gen, 0.05),
                                              lora::test::random_matrix<S>(out, r, gen, 0.05), /*alpha=*/32.0);

  // The unsharded layer on GPU 0.
  LORA_CUDA_CHECK(cudaSetDevice(0));
  Matrix<S> single, single_dX;
  Matrix<float> single_dA, single_dB;
  {
    auto ctx = std::make_shared<CudaContext>();
    auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
    const auto Wd = DeviceMatrix<S>::from_host(W), Xd = DeviceMatrix<S>::from_host(X);
    const auto dYd = DeviceMatrix<S>::from_host(dY);
    single = ad.apply(Wd, Xd).to_host();
    const auto g = ad.backward(Wd, Xd, dYd);
    single_dA = g.dA.to_host();
    single_dB = g.dB.to_host();
    single_dX = g.dX.to_host();
  }

  ncclUniqueId id;
  LORA_NCCL_CHECK(ncclGetUniqueId(&id));
  std::vector<RankOut<S>> res(world);
  on_ranks([&](int rank) {
    LORA_CUDA_CHECK(cudaSetDevice(rank));
    auto ctx = std::make_shared<CudaContext>();
    tp::TpGroup group(id, rank, world, ctx->stream());
    const float s = static_cast<float>(host.scaling());
    {  // column-parallel: the shard is a plain device adapter, no collective
      const auto local = tp::shard(host, TpLayout::column, rank, world);
      auto ad = LowRankAdapter<S, cuda>::from_host(local, ctx);
      const auto Wk = DeviceMatrix<S>::from_host(tp::shard_weight<S>(W, TpLayout::column, rank, world));
      const auto Xd = DeviceMatrix<S>::from_host(X);
      res[static_cast<std::size_t>(rank)].column = ad.apply(Wk, Xd).to_host();
      // backward: the shard's own, then dA (r × in) and dX (the layer's own) all-reduced
      const auto crange = tp::shard_range(out, rank, world);
      const auto dYk = DeviceMatrix<S>::from_host(Matrix<S>(dY.middleCols(crange.offset, crange.size)));
      auto g = ad.backward(Wk, Xd, dYk);
      group.all_reduce(g.dA.view());
      group.all_reduce(g.dX.view());
      ctx->synchronize();
      res[static_cast<std::size_t>(rank)].col_dA = g.dA.to_host();
      res[static_cast<std::size_t>(rank)].col_dB = g.dB.to_host();
      res[static_cast<std::size_t>(rank)].col_dX = g.dX.to_host();
    }
    // row-parallel
    const auto local = tp::shard(host, TpLayout::row, rank, world);
    const auto range = tp::shard_range(in, rank, world);
    const auto Ak = DeviceMatrix<S>::from_host(local.A()), B = DeviceMatrix<S>::from_host(local.B());
    const auto Wk = DeviceMatrix<S>::from_host(tp::shard_weight<S>(W, TpLayout::row, rank, world));
    const auto Xk = DeviceMatrix<S>::from_host(Matrix<S>(X.middleCols(range.offset, range.size)));
    DeviceMatrix<S> xa(T, r), Y(T, out);
    // fold: the engine's partial X_k·W_kᵀ, the adapter added to it, one all-reduce
    detail::gemm<S, S, S>(*ctx, false, true, T, out, range.size, 1.f, Xk.view(), Wk.view(), 0.f, Y.view());
    tp::row_lora_fold<S>(*ctx, group, Ak, B, s, Xk, xa, Y);
    ctx->synchronize();
    res[static_cast<std::size_t>(rank)].fold = Y.to_host();
    // separate: the layer's all-reduce, then the adapter's own T × r one
    detail::gemm<S, S, S>(*ctx, false, true, T, out, range.size, 1.f, Xk.view(), Wk.view(), 0.f, Y.view());
    group.all_reduce(Y.view());
    tp::row_lora_separate<S>(*ctx, group, Ak, B, s, Xk, xa, Y);
    ctx->synchronize();
    res[static_cast<std::size_t>(rank)].separate = Y.to_host();
    // the fused adapter path on the row shard gives the partial output; the all-reduce completes it
    auto ad = LowRankAdapter<S, cuda>::from_host(local, ctx);
    auto fw = ad.fuse(Wk);
    auto Xp = ad.padded_input(T);
    LORA_CUDA_CHECK(cudaMemcpy2DAsync(Xp.data(), Xp.cols() * sizeof(S), Xk.data(), Xk.cols() * sizeof(S),
                                      Xk.cols() * sizeof(S), T, cudaMemcpyDeviceToDevice, ctx->stream()));
    ad.apply(fw, Xp.view(), Y.view());
    group.all_reduce(Y.view());
    ctx->synchronize();
    res[static_cast<std::size_t>(rank)].fused = Y.to_host();
    // backward with dY whole: dA and dX are the rank's columns, dB (out × r) all-reduced
    const auto dYd = DeviceMatrix<S>::from_host(dY);
    auto g = ad.backward(Wk, Xk, dYd);
    group.all_reduce(g.dB.view());
    ctx->synchronize();
    res[static_cast<std::size_t>(rank)].row_dA = g.dA.to_host();
    res[static_cast<std::size_t>(rank)].row_dB = g.dB.to_host();
    res[static_cast<std::size_t>(rank)].row_dX = g.dX.to_host();
  });

  MatD column(T, out);
  for (int k = 0; k < world; ++k) {
    const auto range = tp::shard_range(out, k, world);
    column.middleCols(range.offset, range.size) = res[static_cast<std::size_t>(k)].column.template cast<double>();
  }
  CHECK(rel_error(column, single) < tol);
  MatD col_dB(out, r), row_dA(r, in), row_dX(T, in);
  for (int k = 0; k < world; ++k) {
    const auto& o = res[static_cast<std::size_t>(k)];
    const auto rr = tp::shard_range(out, k, world), cr = tp::shard_range(in, k, world);
    col_dB.middleRows(rr.offset, rr.size) = o.col_dB.template cast<double>();
    row_dA.middleCols(cr.offset, cr.size) = o.row_dA.template cast<double>();
    row_dX.middleCols(cr.offset, cr.size) = o.row_dX.template cast<double>();
    INFO("rank " << k);
    CHECK(rel_error(o.col_dA, single_dA) < tol);
    CHECK(rel_error(o.col_dX, single_dX) < tol);
    CHECK(rel_error(o.row_dB, single_dB) < tol);
  }
  CHECK(rel_error(col_dB, single_dB) < tol);
  CHECK(rel_error(row_dA, single_dA) < tol);
  CHECK(rel_error(row_dX, single_dX) < tol);
  for (int k = 0; k < world; ++k) {
    INFO("rank " << k);
    CHECK(rel_error(res[static_cast<std::size_t>(k)].fold, single) < tol);
    CHECK(rel_error(res[static_cast<std::size_t>(k)].separate, single) < tol);
    CHECK(rel_error(res[static_cast<std::size_t>(k)].fused, single) < tol);
  }
  if constexpr (std::is_same_v<S, float>) {
    const MatD Xr = X.template cast<double>();
    const MatD ref = Xr * W.template cast<double>().transpose() +
                     host.scaling() * (Xr * host.A().template cast<double>().transpose()) *
                         host.B().template cast<double>().transpose();
    CHECK(rel_error(single, ref) < tol);
    CHECK(rel_error(res[0].fold, ref) < tol);
  }
}

}  // namespace

TEST_CASE("tensor-parallel LoRA over NCCL on 2 GPUs equals the unsharded layer on one", "[tp][cuda]") {
  setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast off (the device machines' KINDS.md)
  if (devices() < world) {
    WARN("fewer than 2 GPUs: the NCCL tensor-parallel test checks nothing here");
    return;
  }
  for (Index T : {Index(1), Index(5), Index(64), Index(300)}) {
    INFO("T = " << T);
    check_layer<float>(T, 1e-5);
    check_layer<bfloat16>(T, 2e-2);
  }
}
