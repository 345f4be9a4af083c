// lora/cuda/multi.cuh: the mixed-adapter forward on the GPU against a float64
// reference that loops over tokens one at a time and against the CPU
// batched_apply; hot-swap and errors. Fresh random inputs, outputs poisoned
// with NaN before each run.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

using namespace lora;
using lora::test::MatD;

namespace {

using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;

/// Float64, one token at a time: y_t = x_t·Wᵀ + s_i·(x_t·A_iᵀ)·B_iᵀ (no term for id −1).
template <class S>
MatD reference(const multi::AdapterSet<S>& set, const Matrix<S>* W, const Matrix<S>& X, const std::vector<int>& ids) {
  const MatD Xd = X.template cast<double>();
  MatD Y = MatD::Zero(X.rows(), set.out_features());
  if (W) Y = Xd * W->template cast<double>().transpose();
  for (Index t = 0; t < X.rows(); ++t) {
    const int id = ids[static_cast<std::size_t>(t)];
    if (id < 0) continue;
    const auto& a = set.at(id);
    const MatD h = Xd.row(t) * a.A.template cast<double>().transpose();
    Y.row(t) += a.scaling * h * a.B.template cast<double>().transpose();
  }
  return Y;
}

/// A set of `n` adapters with ranks drawn from `ranks`, standard and rsLoRA scalings mixed.
template <class S>
multi::AdapterSet<S> random_set(Index in, Index out, int n, const std::vector<Index>& ranks, Generator& g) {
  multi::AdapterSet<S> set(in, out);
  for (int i = 0; i < n; ++i) {
    const Index r = std::min(ranks[static_cast<std::size_t>(i) % ranks.size()], std::min(in, out));
    const double alpha = 2.0 * r * g.uniform(0.5, 1.5);
    const double s = i % 2 == 0 ? standard_scaling::factor(alpha, static_cast<int>(r))
                                : rslora_scaling::factor(alpha, static_cast<int>(r));
    set.add("ad" + std::to_string(i), rand_s<S>(r, in, g, 0.1), rand_s<S>(out, r, g, 0.1), s);
  }
  return set;
}

struct Case {
  const char* what;
  Index in, out, tokens;
  int adapters;
};

/// ids for a case: random (with −1 and unused adapters), one token per adapter,
/// all on one adapter, all −1.
std::vector<int> make_ids(const std::string& kind, Index T, int n, Generator& g) {
  std::vector<int> ids(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    int& id = ids[static_cast<std::size_t>(t)];
    if (kind == "random")
      id = g.uniform() < 0.15 ? -1 : static_cast<int>(g.uniform() * (n - 1));  // adapter n-1 never used
    else if (kind == "one_per_adapter")
      id = static_cast<int>(t % n);
    else if (kind == "all_one")
      id = n / 2;
    else
      id = -1;
  }
  if (kind == "one_per_adapter")  // shuffled, so segments are not runs of tokens
    for (std::size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[static_cast<std::size_t>(g.uniform() * i)]);
  return ids;
}

}  // namespace

TEMPLATE_TEST_CASE("cuda multi: mixed-adapter apply and forward match float64 and the CPU", "[cuda][multi]", bfloat16,
                   lora::half, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const std::vector<Index> ranks = {8, 16, 128, 32, 64, 24, 8, 96};
  // Aligned shapes take the 16-byte kernels (and K-splits at in = 2048); the odd one the scalar path.
  const Case cases[] = {{"aligned", 256, 192, 37, 6},  {"wide K", 2048, 256, 21, 5}, {"many", 512, 384, 300, 24},
                        {"odd", 100, 70, 29, 5}};
  for (const Case& c : cases) {
    auto set = random_set<S>(c.in, c.out, c.adapters, ranks, g);
    auto dev = multi::AdapterSet<S, cuda>::from_host(set);
    REQUIRE(dev.size() == set.size());
    const Matrix<S> W = rand_s<S>(c.out, c.in, g, 0.05);
    const auto dW = DeviceMatrix<S>::from_host(W);
    for (const std::string kind : {"random", "one_per_adapter", "all_one", "none"}) {
      for (Index T : {c.tokens, Index(1)}) {
        if (kind == "one_per_adapter") T = c.adapters;
        INFO(c.what << ": in " << c.in << " out " << c.out << " T " << T << " ids " << kind);
        const auto ids = make_ids(kind, T, c.adapters, g);
        const Matrix<S> X = rand_s<S>(T, c.in, g);
        const auto dX = DeviceMatrix<S>::from_host(X);
        const MatD ref = reference(set, &W, X, ids);
        const MatD ref_paths = reference<S>(set, nullptr, X, ids);
        const auto seg = dev.segments(ids);
        // Both shrink kernels (tensor cores where bf16/half and in % 32 == 0, CUDA cores) under
        // every schedule, and the adapter paths alone.
        for (bool tc : {true, false}) {
          INFO("tensor_core_shrink " << tc);
          dev.tensor_core_shrink = tc;
          using Sc = multi::SgmvSchedule;
          using Ex = multi::SgmvExpand;
          Matrix<S> y_token;  // this schedule's output with the per-token expand
          for (auto [sched, ex] : {std::pair{Sc::serial, Ex::per_token}, std::pair{Sc::serial, Ex::per_tile},
                                   std::pair{Sc::serial, Ex::per_chunk}, std::pair{Sc::overlap, Ex::per_token},
                                   std::pair{Sc::overlap, Ex::per_tile}, std::pair{Sc::overlap, Ex::per_chunk},
                                   std::pair{Sc::delta, Ex::per_token}, std::pair{Sc::delta, Ex::per_tile},
                                   std::pair{Sc::delta, Ex::per_chunk}}) {
            INFO("schedule " << static_cast<int>(sched) << " expand " << static_cast<int>(ex));
            dev.schedule = sched;
            dev.expand_kernel = ex;
            DeviceMatrix<S> Y(T, c.out);
            poison(Y.view());
            dev.apply(dW.view(), dX.view(), seg, Y.view());
            const Matrix<S> y = Y.to_host();
            REQUIRE(y.allFinite());
            CHECK(lora::test::rel_error(y, ref) < tol<S>());
            // the per-chunk expand is the per-token one's arithmetic per position: the same bits
            if (ex == Ex::per_token) y_token = y;
            if (ex == Ex::per_chunk) CHECK(std::memcmp(y.data(), y_token.data(), sizeof(S) * y.size()) == 0);
          }
          for (auto ex : {multi::SgmvExpand::per_token, multi::SgmvExpand::per_tile, multi::SgmvExpand::per_chunk}) {
            INFO("adapter paths alone, expand " << static_cast<int>(ex));
            dev.expand_kernel = ex;
            const Matrix<S> paths = dev.forward(dX.view(), ids).to_host();
            if (ref_paths.norm() > 0)
              CHECK(lora::test::rel_error(paths, ref_paths) < tol<S>());
            else
              CHECK(paths.template cast<double>().norm() == 0.0);
          }
        }
        dev.tensor_core_shrink = true;
        dev.expand_kernel = multi::SgmvExpand::per_token;
        // GPU against the CPU batched_apply (float accumulation there too).
        const auto cpu = multi::batched_apply(set, W, X, ids);
        CHECK(lora::test::rel_error(dev.apply(dW.view(), dX.view(), ids).to_host(), cpu) < tol<S>());
      }
    }
  }
}

TEST_CASE("cuda multi: strided X and Y views", "[cuda][multi]") {
  Generator g(lora::test::fresh_seed());
  auto set = random_set<bfloat16>(256, 128, 4, {16, 8, 64}, g);
  auto dev = multi::AdapterSet<bfloat16, cuda>::from_host(set);
  const Matrix<bfloat16> W = rand_s<bfloat16>(128, 256, g, 0.05), X = rand_s<bfloat16>(19, 256, g);
  const std::vector<int> ids = make_ids("random", 19, 4, g);
  const auto dW = DeviceMatrix<bfloat16>::from_host(W);
  DeviceMatrix<bfloat16> Xp(19, 256 + 24), Yp(19, 128 + 8);  // ld 280 / 136: vector path, strided rows
  poison(Xp.view());
  poison(Yp.view());
  upload<bfloat16>(X, Xp.view().col_block(0, 256));
  dev.apply(dW.view(), DeviceView<const bfloat16>(Xp.view()).col_block(0, 256), dev.segments(ids),
            Yp.view().col_block(0, 128));
  const Matrix<bfloat16> y = to_host(Yp.view().col_block(0, 128));
  CHECK(lora::test::rel_error(y, reference(set, &W, X, ids)) < 1e-2);
}

// QLoRA serving: a mixed batch over an NF4 base (apply(Nf4Tensor<cuda>, …)) against float64 on
// the dequantised weight. Shapes for the one-pass kernel (in = 4096, out % 8 == 0 but not % 16:
// up to 11 pieces of 16 ranks, ranks 8 and 5 partial pieces, the WIDE table at T ≤ 8), the
// copy-ring kernel with the adapters' paths after it (out % 8 != 0), the other fused kernels
// (in = 96) and dequantise + cuBLAS (T > 16); every schedule; the adapters' terms alone (Y minus
// the NF4 product); apply_over with a caller's base product (here the dense GEMM) against
// apply(W, …).
// bf16 and float only: half takes bf16's kernels (tests/cuda/nf4.cu covers them), and each type
// instantiates the whole NF4 kernel family in this file again (half: 28 s of nvcc on 2 cores).
TEMPLATE_TEST_CASE("cuda multi: mixed adapters over an NF4 base match float64 on the dequantised weight",
                   "[cuda][multi][nf4]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const std::vector<Index> ranks = {16, 8, 32, 5};
  for (auto [in, out, n] : {std::tuple<Index, Index, int>{4096, 200, 10}, {1024, 130, 6}, {96, 70, 3}}) {
    auto set = random_set<S>(in, out, n, ranks, g);
    auto dev = multi::AdapterSet<S, cuda>::from_host(set);
    const Matrix<float> W = rand_s<float>(out, in, g, 0.5);
    const auto q = Nf4Tensor::quantize(W, {64, true});
    const auto Wq = quant::Nf4Tensor<cuda>::from_host(q);
    const Matrix<float> Wf = q.template dequantize<float>();
    const Matrix<S> Wd = Wf.template cast<S>();  // the dense base of the apply_over check below
    const MatD Wdd = Wf.template cast<double>();
    const auto dWd = DeviceMatrix<S>::from_host(Wd);
    for (Index T : {Index(1), Index(5), Index(16), Index(37)}) {
      for (const std::string kind : {"random", "all_one"}) {
        INFO("in " << in << " out " << out << " T " << T << " ids " << kind);
        const auto ids = make_ids(kind, T, n, g);
        const Matrix<S> X = rand_s<S>(T, in, g);
        const auto dX = DeviceMatrix<S>::from_host(X);
        const MatD paths = reference<S>(set, nullptr, X, ids);
        const MatD ref = X.template cast<double>() * Wdd.transpose() + paths;
        const auto seg = dev.segments(ids);
        for (auto sched : {multi::SgmvSchedule::serial, multi::SgmvSchedule::overlap, multi::SgmvSchedule::delta}) {
          INFO("schedule " << static_cast<int>(sched));
          dev.schedule = sched;
          DeviceMatrix<S> Y(T, out);
          poison(Y.view());
          dev.apply(Wq, dX.view(), seg, Y.view());
          const Matrix<S> y = Y.to_host();
          REQUIRE(y.allFinite());
          CHECK(lora::test::rel_error(y, ref) < tol<S>());
          if (sched == multi::SgmvSchedule::serial && paths.cwiseAbs().maxCoeff() > 0) {
            DeviceMatrix<S> Yb(T, out);
            quant::nf4_matmul<S>(Wq, dX.view(), Yb.view());
            const MatD terms = y.template cast<double>() - Yb.to_host().template cast<double>();
            CHECK(lora::test::rel_error(terms, paths) < 5 * tol<S>());
          }
        }
        // A caller's base product: the dense GEMM on the rounded dequantised weight, which must
        // give what apply(W, …) gives, to the last bit (the same kernels in the same order).
        DeviceMatrix<S> Y1(T, out), Y2(T, out);
        poison(Y1.view());
        poison(Y2.view());
        dev.apply(dWd.view(), dX.view(), seg, Y1.view());
        dev.apply_over(
            [&](DeviceView<S> y) {
              lora::detail::gemm<S, S, S>(*CudaContext::thread_default(), false, true, T, out, in, 1.f, dX.view(),
                                          dWd.view(), 0.f, y);
            },
            dX.view(), seg, Y2.view());
        const Matrix<S> y1 = Y1.to_host(), y2 = Y2.to_host();
        REQUIRE(y1.allFinite());
        CHECK(std::memcmp(y1.data(), y2.data(), sizeof(S) * static_cast<std::size_t>(y1.size())) == 0);
      }
    }
  }
  // The NF4 base's shape and context are checked by name.
  auto set = random_set<S>(256, 64, 2, ranks, g);
  auto dev = multi::AdapterSet<S, cuda>::from_host(set);
  const auto X = DeviceMatrix<S>::from_host(rand_s<S>(3, 256, g));
  const std::vector<int> ids = {0, 1, -1};
  DeviceMatrix<S> Y(3, 64);
  const auto Wt = quant::Nf4Tensor<cuda>::from_host(Nf4Tensor::quantize(rand_s<float>(256, 64, g), {64, false}));
  using Catch::Matchers::ContainsSubstring;
  CHECK_THROWS_WITH(dev.apply(Wt, X.view(), dev.segments(ids), Y.view()),
                    ContainsSubstring("NF4 base weight has shape [256 x 64], expected [64 x 256]"));
  const auto other = quant::Nf4Tensor<cuda>::from_host(Nf4Tensor::quantize(rand_s<float>(64, 256, g), {64, false}),
                                                       std::make_shared<CudaContext>());
  CHECK_THROWS_WITH(dev.apply(other, X.view(), dev.segments(ids), Y.view()),
                    ContainsSubstring("different CUDA contexts"));
}

TEMPLATE_TEST_CASE("cuda multi: hot-swap (replace, remove, add) while others stay loaded", "[cuda][multi]", bfloat16,
                   float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, out = 256, T = 40;
  auto host = random_set<S>(in, out, 3, {16, 32, 8}, g);
  auto dev = multi::AdapterSet<S, cuda>::from_host(host);
  const Matrix<S> W = rand_s<S>(out, in, g, 0.05), X = rand_s<S>(T, in, g);
  const auto dW = DeviceMatrix<S>::from_host(W);
  const auto dX = DeviceMatrix<S>::from_host(X);
  std::vector<int> ids(T);
  for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<int>(t % 4) - 1;  // -1, 0, 1, 2
  auto check = [&](const char* when) {
    INFO(when);
    const Matrix<S> y = dev.apply(dW.view(), dX.view(), ids).to_host();
    CHECK(lora::test::rel_error(y, reference(host, &W, X, ids)) < tol<S>());
  };
  check("loaded");
  const auto seg_before = dev.segments(ids);

  // Replace id 1 with a new rank and scaling; ids 0 and 2 untouched.
  const Matrix<S> A1 = rand_s<S>(64, in, g, 0.1), B1 = rand_s<S>(out, 64, g, 0.1);
  host.replace(1, "swapped", A1, B1, 0.75);
  dev.replace(1, "swapped", A1, B1, 0.75);
  CHECK(dev.rank(1) == 64);
  CHECK(dev.name(1) == "swapped");
  check("after replace");
  {  // segments built before the swap stay valid (they hold ids, not factors)
    DeviceMatrix<S> Y(T, out);
    dev.apply(dW.view(), dX.view(), seg_before, Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), reference(host, &W, X, ids)) < tol<S>());
  }

  // Remove id 0: batches naming it fail, others still run.
  dev.remove(0);
  host.remove(0);
  CHECK_FALSE(dev.contains(0));
  CHECK_THROWS_WITH(dev.apply(dW.view(), dX.view(), ids), Catch::Matchers::ContainsSubstring("adapter id 0"));
  {
    DeviceMatrix<S> Y(T, out);
    CHECK_THROWS_WITH(dev.apply(dW.view(), dX.view(), seg_before, Y.view()),
                      Catch::Matchers::ContainsSubstring("no longer loaded"));
  }
  for (int& id : ids)
    if (id == 0) id = 2;
  check("after remove");

  // A new adapter takes the free id 0.
  const Matrix<S> A0 = rand_s<S>(8, in, g, 0.1), B0 = rand_s<S>(out, 8, g, 0.1);
  CHECK(dev.add("fresh", A0, B0, 3.0) == 0);
  host.insert(0, "fresh", A0, B0, 3.0);
  for (Index t = 0; t < T; t += 3) ids[static_cast<std::size_t>(t)] = 0;
  check("after add");
  CHECK(dev.size() == 3);
  CHECK(dev.find("swapped") == 1);
}

TEST_CASE("cuda multi: bad shapes, ranks and ids throw lora::error naming them", "[cuda][multi]") {
  using M = Matrix<float>;
  Generator g(lora::test::fresh_seed());
  multi::AdapterSet<float, cuda> dev(64, 48);
  const M A = rand_s<float>(8, 64, g), B = rand_s<float>(48, 8, g);
  CHECK(dev.add("a", A, B, 2.0) == 0);
  using Catch::Matchers::ContainsSubstring;
  CHECK_THROWS_WITH(dev.add("b", rand_s<float>(8, 63, g), B, 1.0), ContainsSubstring("lora_A has shape [8 x 63]"));
  CHECK_THROWS_WITH(dev.add("b", A, rand_s<float>(47, 8, g), 1.0), ContainsSubstring("lora_B has shape [47 x 8]"));
  CHECK_THROWS_WITH(dev.add("b", A, rand_s<float>(48, 4, g), 1.0), ContainsSubstring("both must equal the rank"));
  CHECK_THROWS_WITH(dev.add("b", rand_s<float>(49, 64, g), rand_s<float>(48, 49, g), 1.0),
                    ContainsSubstring("rank r = 49"));
  CHECK_THROWS_WITH(dev.add("b", A, B, std::nan("")), ContainsSubstring("scaling must be finite"));
  CHECK_THROWS_WITH(dev.add("a", A, B, 1.0), ContainsSubstring("already loaded as id 0"));
  CHECK_THROWS_WITH(dev.add("", A, B, 1.0), ContainsSubstring("must not be empty"));
  CHECK_THROWS_WITH(dev.insert(0, "c", A, B, 1.0), ContainsSubstring("'a' is there"));
  CHECK_THROWS_WITH(dev.replace(5, "c", A, B, 1.0), ContainsSubstring("cannot replace id 5"));
  CHECK_THROWS_WITH(dev.remove(3), ContainsSubstring("cannot remove id 3"));
  CHECK(dev.size() == 1);

  const auto W = DeviceMatrix<float>::from_host(rand_s<float>(48, 64, g));
  const auto X = DeviceMatrix<float>::from_host(rand_s<float>(3, 64, g));
  const std::vector<int> ok = {0, -1, 0}, bad_id = {0, 1, 0}, short_ids = {0, 0};
  CHECK_THROWS_WITH(dev.segments(bad_id), ContainsSubstring("adapter id 1, which is not loaded"));
  CHECK_THROWS_WITH(dev.apply(W.view(), X.view(), short_ids), ContainsSubstring("2 adapter ids given for 3 tokens"));
  const auto Wt = DeviceMatrix<float>::from_host(rand_s<float>(64, 48, g));
  CHECK_THROWS_WITH(dev.apply(Wt.view(), X.view(), ok), ContainsSubstring("base weight W has shape [64 x 48]"));
  const auto Xb = DeviceMatrix<float>::from_host(rand_s<float>(3, 60, g));
  CHECK_THROWS_WITH(dev.apply(W.view(), Xb.view(), ok), ContainsSubstring("input X has 60 columns"));
  DeviceMatrix<float> Yb(3, 47);
  CHECK_THROWS_WITH(dev.apply(W.view(), X.view(), dev.segments(ok), Yb.view()),
                    ContainsSubstring("output Y has shape [3 x 47]"));
  CHECK_THROWS_WITH((multi::AdapterSet<float, cuda>(0, 4)), ContainsSubstring("at least 1"));
  // and a correct call still works
  const auto y = dev.apply(W.view(), X.view(), ok).to_host();
  CHECK(y.allFinite());
}

/// Float64 gradients of a mixed batch, token by token: dX = dY·W (or 0) + Σ gb·A_i, dA_i, dB_i.
template <class S>
struct RefGrads {
  MatD dX;
  std::vector<MatD> dA, dB;
};
template <class S>
RefGrads<S> reference_backward(const multi::AdapterSet<S>& set, const Matrix<S>* W, const Matrix<S>& X,
                               const Matrix<S>& dY, const std::vector<int>& ids) {
  const MatD Xd = X.template cast<double>(), Gd = dY.template cast<double>();
  RefGrads<S> r;
  r.dX = W ? MatD(Gd * W->template cast<double>()) : MatD(MatD::Zero(X.rows(), X.cols()));
  r.dA.resize(static_cast<std::size_t>(set.capacity()));
  r.dB.resize(static_cast<std::size_t>(set.capacity()));
  for (int id = 0; id < set.capacity(); ++id) {
    const auto& a = set.at(id);
    r.dA[static_cast<std::size_t>(id)] = MatD::Zero(a.rank(), X.cols());
    r.dB[static_cast<std::size_t>(id)] = MatD::Zero(dY.cols(), a.rank());
  }
  for (Index t = 0; t < X.rows(); ++t) {
    const int id = ids[static_cast<std::size_t>(t)];
    if (id < 0) continue;
    const auto& a = set.at(id);
    const MatD A = a.A.template cast<double>(), B = a.B.template cast<double>();
    const MatD h = a.scaling * Xd.row(t) * A.transpose();
    const MatD gb = a.scaling * Gd.row(t) * B;
    r.dB[static_cast<std::size_t>(id)] += Gd.row(t).transpose() * h;
    r.dA[static_cast<std::size_t>(id)] += gb.transpose() * Xd.row(t);
    r.dX.row(t) += gb * A;
  }
  return r;
}

// The segmented backward: shrink kernels for h = s·X·Aᵀ and gb = s·dY·B, the expand for gb·A,
// one kernel for dA and dB over chunks of ≤ 128 tokens (and the ordered reduction of longer
// segments). Ranks that are not multiples of 4, 8 or 16, unused adapters, ids −1, shuffled ids,
// T 1, 7 and 256 (one adapter's 256 tokens = two chunks; 300 = three), aligned shapes (16-byte
// and tensor-core paths) and odd ones (scalar paths), with and without W. Outputs poisoned, the
// gradient object reused across calls (its buffers must not move once large enough); on two
// streams and on one (with the per-tile expand), and with gb·A into a scratch beside the GEMM.
TEMPLATE_TEST_CASE("cuda multi: backward (dA, dB per adapter, dX) matches float64 and the CPU", "[cuda][multi]",
                   bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Case cases[] = {{"aligned", 256, 192, 0, 7}, {"odd", 100, 70, 0, 5}, {"wide", 1024, 512, 0, 4}};
  for (const Case& c : cases) {
    auto set = random_set<S>(c.in, c.out, c.adapters, {5, 16, 13, 24, 3, 40, 8}, g);
    auto dev = multi::AdapterSet<S, cuda>::from_host(set);
    const Matrix<S> W = rand_s<S>(c.out, c.in, g, 0.05);
    const auto dW = DeviceMatrix<S>::from_host(W);
    const DeviceView<const S> Wv = dW.view();
    multi::DeviceBatchedGradients<S> grads;  // reused across calls
    for (const std::string kind : {"random", "all_one", "none"}) {
      for (Index T : {Index(1), Index(7), Index(256), Index(300)}) {
        if (T == 300 && kind != "all_one") continue;
        INFO(c.what << ": in " << c.in << " out " << c.out << " T " << T << " ids " << kind);
        const auto ids = make_ids(kind, T, c.adapters, g);  // random: adapter n-1 unused, some -1
        const Matrix<S> X = rand_s<S>(T, c.in, g), dY = rand_s<S>(T, c.out, g);
        const auto dXin = DeviceMatrix<S>::from_host(X);
        const auto ddY = DeviceMatrix<S>::from_host(dY);
        const auto seg = dev.segments(ids);
        struct Mode {
          bool with_w, overlap, delta, chunk;
        };
        for (auto [with_w, overlap, delta, chunk] :
             {Mode{true, true, false, false}, Mode{false, true, false, false}, Mode{true, false, false, false},
              Mode{true, true, true, true}, Mode{true, true, false, true}}) {
          INFO("with W: " << with_w << ", second stream: " << overlap << ", gb·A beside the GEMM: " << delta
                          << ", per-chunk expand (else per-token): " << chunk);
          // the per-tile expand with the one-stream schedule; the per-chunk one into D (gb·A beside
          // the GEMM) and straight into dX
          dev.backward_overlap = overlap;
          dev.expand_kernel = !overlap ? multi::SgmvExpand::per_tile
                              : chunk  ? multi::SgmvExpand::per_chunk
                                       : multi::SgmvExpand::per_token;
          dev.backward_delta_tokens = delta ? 0 : 1 << 30;
          // Buffers large enough already: the call must reuse them, so they can be poisoned first.
          if (grads.storage.size() < dev.gradient_elements(seg))
            grads.storage = DeviceBuffer<float>(dev.gradient_elements(seg));
          if (grads.dX.rows() != T) grads.dX = DeviceMatrix<S>(T, c.in);
          const float* storage = grads.storage.data();
          if (grads.storage.size() > 0)
            poison(DeviceView<float>{grads.storage.data(), 1, static_cast<Index>(grads.storage.size()),
                                     static_cast<Index>(grads.storage.size())});
          poison(grads.dX.view());
          dev.backward(with_w ? &Wv : nullptr, dXin.view(), seg, ddY.view(), grads);
          CHECK(grads.storage.data() == storage);
          const auto ref = reference_backward(set, with_w ? &W : nullptr, X, dY, ids);
          const Matrix<S> dx = grads.dX.to_host();
          REQUIRE(dx.allFinite());
          if (ref.dX.norm() > 0)
            CHECK(lora::test::rel_error(dx, ref.dX) < tol<S>());
          else
            CHECK(dx.template cast<double>().norm() == 0.0);
          for (int id = 0; id < c.adapters; ++id) {
            INFO("adapter " << id << " rank " << dev.rank(id));
            const bool used = std::find(ids.begin(), ids.end(), id) != ids.end();
            REQUIRE((grads.dA[static_cast<std::size_t>(id)].rows > 0) == used);
            if (!used) continue;
            const Matrix<float> dA = to_host(grads.dA[static_cast<std::size_t>(id)]),
                                dB = to_host(grads.dB[static_cast<std::size_t>(id)]);
            REQUIRE(dA.allFinite());
            REQUIRE(dB.allFinite());
            CHECK(lora::test::rel_error(dA, ref.dA[static_cast<std::size_t>(id)]) < tol<S>());
            CHECK(lora::test::rel_error(dB, ref.dB[static_cast<std::size_t>(id)]) < tol<S>());
          }
        }
        if (kind == "random" && T == 256) {  // the returning form and the CPU's batched_backward
          const auto fresh = dev.backward(&Wv, dXin.view(), seg, ddY.view());
          const auto cpu = multi::batched_backward(set, X, ids, dY.template cast<compute_t<S>>(), &W);
          CHECK(lora::test::rel_error(fresh.dX.to_host(), cpu.dX) < tol<S>());
          for (int id = 0; id < c.adapters; ++id)
            if (fresh.dA[static_cast<std::size_t>(id)].rows > 0)
              CHECK(lora::test::rel_error(to_host(fresh.dA[static_cast<std::size_t>(id)]),
                                          cpu.dA[static_cast<std::size_t>(id)]) < tol<S>());
        }
      }
    }
  }
  multi::AdapterSet<S, cuda> dev(64, 48);
  dev.add("a", rand_s<S>(8, 64, g, 0.1), rand_s<S>(48, 8, g, 0.1), 1.0);
  const auto X = DeviceMatrix<S>::from_host(rand_s<S>(3, 64, g));
  const auto bad = DeviceMatrix<S>::from_host(rand_s<S>(3, 49, g));
  const std::vector<int> ids = {0, -1, 0};
  CHECK_THROWS_WITH(dev.backward(nullptr, X.view(), dev.segments(ids), bad.view()),
                    Catch::Matchers::ContainsSubstring("dY has shape"));
}
