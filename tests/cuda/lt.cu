// cuBLASLt plans (lora/cuda/lt.hpp) and the fused forward's choice among their algorithms:
// every candidate algorithm against float64 on fresh random inputs, all four transpose
// combinations, strided operands, and the plan refusing operands it was not made for.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

using namespace lora;
using lora::test::MatD;

namespace {

template <class E>
MatD d(const Eigen::MatrixBase<E>& m) {
  return m.template cast<double>();
}

}  // namespace

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

TEST_CASE("cuda lt: the fused forward's and backward's automatic choices record an algorithm and match float64",
          "[cuda][lt]") {
  using S = bfloat16;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, out = 320, r = 16, T = 200;
  LowRankAdapter<S> host(in, out, r, 32.0);
  host.set_A(lora::test::rand_s<S>(r, in, g, 0.1));
  host.set_B(lora::test::rand_s<S>(out, r, g, 0.1));
  auto ad = LowRankAdapter<S, cuda>::from_host(host);
  const Matrix<S> W = lora::test::rand_s<S>(out, in, g, 0.05), X = lora::test::rand_s<S>(T, in, g);
  auto dW = DeviceMatrix<S>::from_host(W);
  auto fw = ad.fuse(dW.view());
  auto Xp = ad.padded_input(T);
  upload<S>(X, Xp.view().col_block(0, in));
  DeviceMatrix<S> Y(T, out);
  const MatD ref = d(X) * d(W).transpose() + host.scaling() * d(X) * d(host.A()).transpose() * d(host.B()).transpose();
  for (int call = 0; call < 2; ++call) {  // the first call tunes, the second uses the choice
    lora::test::poison(Y.view());
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref) < lora::test::tol<S>());
  }
  REQUIRE(fw.gemm_choices.size() == 1);
  CHECK(fw.gemm_choices[0].tokens == T);
  REQUIRE(fw.gemm_choices[0].plan);
  CHECK(fw.gemm_choices[0].algo < fw.gemm_choices[0].plan->candidates());
  // Every candidate of the recorded plan, forced in turn, gives the same Y.
  for (int i = 0; i < fw.gemm_choices[0].plan->candidates(); ++i) {
    INFO("candidate " << i);
    fw.gemm_choices[0].algo = i;
    lora::test::poison(Y.view());
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref) < lora::test::tol<S>());
  }
  // The backward's dX GEMM: tuned on the first call, every candidate gives the same dX.
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
  REQUIRE(fw.backward_choices.size() == 1);
  REQUIRE(fw.backward_choices[0].plan);
  for (int i = -1; i < fw.backward_choices[0].plan->candidates(); ++i) {
    INFO("backward candidate " << i);
    fw.backward_choices[0].algo = i;
    lora::test::poison(dX.view());
    ad.backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
    CHECK(lora::test::rel_error(dX.to_host(), ref_dX) < lora::test::tol<S>());
  }
  CHECK(fw.backward_choices.size() == 1);  // the choice was reused, not retuned
  // A Y with weaker alignment than planned falls back to cublasGemmEx.
  DeviceMatrix<S> Ybig(T, out + 8);
  const DeviceView<S> Yodd{Ybig.data() + 8, T, out, out + 8};
  lora::test::poison(Ybig.view());
  ad.apply(fw, Xp.view(), Yodd);
  CHECK(lora::test::rel_error(to_host(DeviceView<const S>(Yodd)), ref) < lora::test::tol<S>());
}
