// cuBLASLt plans (lora/cuda/lt.hpp) and the planner (lora/cuda/plan.hpp): every candidate
// algorithm against float64 on fresh random inputs, all four transpose combinations, strided
// operands, the plan refusing operands it was not made for; every fused forward path and
// algorithm forced through the planner; forward and backward captured in a CUDA graph after
// plan() (and unplanned) and replayed with new inputs.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

using namespace lora;
using lora::test::d;
using lora::test::MatD;

TEMPLATE_TEST_CASE("cuda lt: every cuBLASLt candidate computes op(A)·op(B) like float64", "[cuda][lt]", bfloat16,
                   lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto ctx = CudaContext::thread_default();
  struct Case {
    Index M, N, K;
    bool ta, tb;
    Index pad;  // extra columns of every operand's buffer (strided views)
  };
  const Case cases[] = {{96, 80, 72, false, true, 0},  {96, 80, 72, false, true, 24}, {64, 48, 40, false, false, 8},
                        {40, 72, 56, true, false, 0},  {48, 40, 64, true, true, 16},  {333, 200, 136, false, true, 64}};
  for (const Case& c : cases) {
    INFO("M " << c.M << " N " << c.N << " K " << c.K << " transA " << c.ta << " transB " << c.tb << " pad " << c.pad);
    const Index ar = c.ta ? c.K : c.M, ac = c.ta ? c.M : c.K, br = c.tb ? c.N : c.K, bc = c.tb ? c.K : c.N;
    const Matrix<S> A = lora::test::rand_s<S>(ar, ac, g), B = lora::test::rand_s<S>(br, bc, g);
    DeviceMatrix<S> dA(ar, ac + c.pad), dB(br, bc + c.pad), dC(c.M, c.N + c.pad);
    upload<S>(A, dA.view().col_block(0, ac));
    upload<S>(B, dB.view().col_block(0, bc));
    const DeviceView<const S> va = DeviceView<const S>(dA.view()).col_block(0, ac),
                              vb = DeviceView<const S>(dB.view()).col_block(0, bc);
    const DeviceView<S> vc = dC.view().col_block(0, c.N);
    detail::LtGemm plan(*ctx, c.ta, c.tb, c.M, c.N, c.K, va, vb, vc);
    REQUIRE(plan.candidates() >= 1);
    const MatD ref = (c.ta ? MatD(d(A).transpose()) : d(A)) * (c.tb ? MatD(d(B).transpose()) : d(B));
    for (int i = 0; i < plan.candidates(); ++i) {
      INFO("candidate " << i);
      lora::test::poison(vc);
      REQUIRE(plan.fits(c.ta, c.tb, c.M, c.N, c.K, va, vb, vc));
      plan.run(*ctx, i, va, vb, vc);
      CHECK(lora::test::rel_error(to_host(vc), ref) < lora::test::tol<S>());
    }
    // Other shapes, leading dimensions or weaker alignment than planned do not fit.
    CHECK_FALSE(plan.fits(c.ta, c.tb, c.M + 1, c.N, c.K, va, vb, vc));
    CHECK_FALSE(plan.fits(!c.ta, c.tb, c.M, c.N, c.K, va, vb, vc));
    const DeviceView<S> wider{vc.data, vc.rows, vc.cols, vc.ld + 8};
    CHECK_FALSE(plan.fits(c.ta, c.tb, c.M, c.N, c.K, va, vb, wider));
    const DeviceView<S> shifted{vc.data + 1, vc.rows, vc.cols - 1, vc.ld};
    CHECK_FALSE(plan.fits(c.ta, c.tb, c.M, c.N, c.K, va, vb, shifted));
  }
  CHECK(detail::pointer_alignment(reinterpret_cast<const void*>(std::uintptr_t{768})) == 256);
  CHECK(detail::pointer_alignment(reinterpret_cast<const void*>(std::uintptr_t{776})) == 8);
}

TEST_CASE("cuda lt: the planner's fused forward and backward choices record a path and match float64",
          "[cuda][lt]") {
  using S = bfloat16;
  using detail::FusedPath;
  using detail::PlanChoice;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, out = 320, r = 16, T = 200;
  LowRankAdapter<S> host(in, out, r, 32.0);
  host.set_A(lora::test::rand_s<S>(r, in, g, 0.1));
  host.set_B(lora::test::rand_s<S>(out, r, g, 0.1));
  auto ctx = std::make_shared<CudaContext>();  // a fresh planner
  auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
  const Matrix<S> W = lora::test::rand_s<S>(out, in, g, 0.05), X = lora::test::rand_s<S>(T, in, g);
  auto dW = DeviceMatrix<S>::from_host(W);
  auto fw = ad.fuse(dW.view());
  const detail::FusedLayout<S> L = detail::fused_layout(fw);
  const Index rp = L.rp();
  auto Xp = ad.padded_input(T);
  upload<S>(X, Xp.view().col_block(0, in));
  DeviceMatrix<S> Y(T, out);
  const MatD xa = host.scaling() * d(X) * d(host.A()).transpose();
  const MatD ref = d(X) * d(W).transpose() + xa * d(host.B()).transpose();
  auto& planner = ctx->planner();
  CHECK(planner.size() == 0);
  for (int call = 0; call < 2; ++call) {  // the first call plans, the second uses the choice
    lora::test::poison(Y.view());
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref) < lora::test::tol<S>());
  }
  CHECK(planner.size() == 1);
  const detail::PlanKey key = detail::fused_forward_key<S>(fw, Xp.view(), Y.view());
  REQUIRE(planner.find(key));
  // Every path, and every cuBLASLt algorithm of the concat_k and stacked GEMMs, forced in turn
  // through the planner, gives the same Y and leaves s·X·Aᵀ in Xp (the padding poisoned).
  const DeviceView<const S> cXp = Xp.view();
  std::vector<PlanChoice> forced = {{int(FusedPath::accumulate)},
                                    {int(FusedPath::concat_k)},
                                    {int(FusedPath::stacked)},
                                    {int(FusedPath::stacked_padded)},
                                    {int(FusedPath::decode)}};
  auto lt_concat = std::make_shared<detail::LtGemm>(*ctx, false, true, T, out, in + rp, cXp, L.wide(), Y.view());
  for (int i = 0; i < lt_concat->candidates(); ++i) forced.push_back({int(FusedPath::concat_k), lt_concat, i});
  REQUIRE(planner.stacked.size() >= static_cast<std::size_t>(T * (out + rp)) * sizeof(S));
  const DeviceView<S> C{reinterpret_cast<S*>(planner.stacked.data()), T, out + r, out + rp};
  auto lt_stacked = std::make_shared<detail::LtGemm>(*ctx, false, true, T, out + r, in, cXp.col_block(0, in),
                                                     L.tall(), C);
  for (int i = 0; i < lt_stacked->candidates(); ++i) forced.push_back({int(FusedPath::stacked), lt_stacked, i});
  for (const PlanChoice& c : forced) {
    INFO("path " << c.path << " algorithm " << c.algo);
    planner.record(key, c);
    lora::test::poison(Y.view());
    lora::test::poison(Xp.view().col_block(in, rp));
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref) < lora::test::tol<S>());
    CHECK(lora::test::rel_error(to_host(cXp.col_block(in, r)), xa) < lora::test::tol<S>());
  }
  // The backward's dX GEMM: planned on the first call, every candidate gives the same dX.
  const Matrix<S> dY = lora::test::rand_s<S>(T, out, g);
  const MatD gb = host.scaling() * d(dY) * d(host.B());
  const MatD ref_dX = d(dY) * d(W) + gb * d(host.A());
  auto dYp = ad.padded_grad(T);
  upload<S>(dY, dYp.view().col_block(0, out));
  DeviceMatrix<S> dX(T, in);
  DeviceMatrix<float> dA(r, in), dB(out, r);
  lora::test::poison(dX.view());
  ad.backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
  CHECK(lora::test::rel_error(dX.to_host(), ref_dX) < lora::test::tol<S>());
  const detail::PlanKey bkey = detail::fused_backward_key<S>(fw, dYp.view(), rp, dX.view());
  const auto planned = planner.find(bkey);
  REQUIRE(planned);
  REQUIRE(planned->lt);
  for (int i = -1; i < planned->lt->candidates(); ++i) {
    INFO("backward candidate " << i);
    planner.record(bkey, {0, planned->lt, i});
    lora::test::poison(dX.view());
    ad.backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
    CHECK(lora::test::rel_error(dX.to_host(), ref_dX) < lora::test::tol<S>());
  }
  CHECK(planner.size() == 2);  // the choices were reused, not replanned
  // A Y with weaker alignment than planned falls back to cublasGemmEx.
  planner.record(key, {int(FusedPath::concat_k), lt_concat, 0});
  DeviceMatrix<S> Ybig(T, out + 8);
  const DeviceView<S> Yodd{Ybig.data() + 8, T, out, out + 8};
  lora::test::poison(Ybig.view());
  ad.apply(fw, Xp.view(), Yodd);
  CHECK(lora::test::rel_error(to_host(DeviceView<const S>(Yodd)), ref) < lora::test::tol<S>());
}

TEMPLATE_TEST_CASE("cuda lt: after plan(), the fused forward and backward replay from a CUDA graph with new inputs",
                   "[cuda][lt][graph]", bfloat16, lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, out = 320;
  for (const Index r : {Index(16), Index(24)})
    for (const Index T : {Index(1), Index(3), Index(16), Index(64), Index(300)})
      for (const bool planned : {true, false}) {
        INFO("r " << r << " tokens " << T << " planned " << planned);
        LowRankAdapter<S> host(in, out, r, 2.0 * r * g.uniform(0.5, 1.5));
        host.set_A(lora::test::rand_s<S>(r, in, g, 0.1));
        host.set_B(lora::test::rand_s<S>(out, r, g, 0.1));
        auto ctx = std::make_shared<CudaContext>();  // a fresh planner
        auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
        const Matrix<S> W = lora::test::rand_s<S>(out, in, g, 0.05);
        auto dW = DeviceMatrix<S>::from_host(W);
        auto fw = ad.fuse(dW.view());
        if (planned) ad.plan(fw, T);
        const std::size_t plans = ctx->planner().size();
        CHECK(plans == (planned ? 2u : 0u));
        auto Xp = ad.padded_input(T), dYp = ad.padded_grad(T);
        DeviceMatrix<S> Y(T, out), dX(T, in);
        DeviceMatrix<float> dA(r, in), dB(out, r);
        // Global capture mode: an allocation, a synchronisation or a blocking call inside fails it.
        ctx->synchronize();
        cudaGraph_t graph = nullptr;
        LORA_CUDA_CHECK(cudaStreamBeginCapture(ctx->stream(), cudaStreamCaptureModeGlobal));
        ad.apply(fw, Xp.view(), Y.view());
        ad.backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
        LORA_CUDA_CHECK(cudaStreamEndCapture(ctx->stream(), &graph));
        cudaGraphExec_t exec = nullptr;
        LORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        CHECK(ctx->planner().size() == plans);  // nothing was planned inside the capture
        for (int replay = 0; replay < 2; ++replay) {
          const Matrix<S> X = lora::test::rand_s<S>(T, in, g), dY = lora::test::rand_s<S>(T, out, g);
          lora::test::poison(Xp.view());
          lora::test::poison(dYp.view());
          upload<S>(X, Xp.view().col_block(0, in));
          upload<S>(dY, dYp.view().col_block(0, out));
          lora::test::poison(Y.view());
          lora::test::poison(dX.view());
          lora::test::poison(dA.view());
          lora::test::poison(dB.view());
          LORA_CUDA_CHECK(cudaGraphLaunch(exec, ctx->stream()));
          ctx->synchronize();
          const double s = host.scaling();
          const MatD Xd = d(X), dYd = d(dY), Ad = d(host.A()), Bd = d(host.B()), Wd = d(W);
          const MatD xa = s * Xd * Ad.transpose(), gb = s * dYd * Bd;
          CHECK(lora::test::rel_error(Y.to_host(), MatD(Xd * Wd.transpose() + xa * Bd.transpose())) <
                lora::test::tol<S>());
          CHECK(lora::test::rel_error(dX.to_host(), MatD(dYd * Wd + gb * Ad)) < lora::test::tol<S>());
          CHECK(lora::test::rel_error(dA.to_host(), MatD(gb.transpose() * Xd)) < lora::test::tol<S>());
          CHECK(lora::test::rel_error(dB.to_host(), MatD(dYd.transpose() * xa)) < lora::test::tol<S>());
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
      }
}
