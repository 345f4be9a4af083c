// LowRankAdapter<S, cuda> (lora/cuda/adapter.cuh) against a float64 CPU reference on fresh
// random inputs (bf16/half within 1e-2 relative, float within 1e-5), outputs poisoned with NaN
// before each run so that unwritten elements fail.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <cmath>
#include <cstring>
#include <memory>

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;
using lora::test::upload_padded;

namespace {
struct Shape {
  Index in, out, r, tokens;
};
}  // namespace

TEMPLATE_TEST_CASE("cuda adapter: apply, forward, backward and merge match float64", "[cuda][adapter]", bfloat16,
                   lora::half, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Aligned shapes take the decode kernels (tokens <= 16) and the fused GEMMs;
  // the odd one forces the plain GEMM path.
  const Shape shapes[] = {{256, 200, 8, 1},  {256, 200, 8, 3},  {256, 200, 8, 16}, {256, 200, 8, 37},
                          {128, 320, 16, 9}, {256, 192, 16, 64}, {96, 160, 32, 32}, {256, 128, 64, 48},
                          {100, 70, 5, 2},   {100, 70, 5, 33},  {256, 520, 16, 600}, {264, 136, 24, 200}};
  for (const Shape& sh : shapes) {
    INFO("in " << sh.in << " out " << sh.out << " r " << sh.r << " tokens " << sh.tokens);
    const double alpha = 2.0 * sh.r * g.uniform(0.5, 1.5);
    LowRankAdapter<S> host(sh.in, sh.out, sh.r, alpha);
    host.set_A(rand_s<S>(sh.r, sh.in, g, 0.1));
    host.set_B(rand_s<S>(sh.out, sh.r, g, 0.1));
    auto ad = LowRankAdapter<S, cuda>::from_host(host);
    const Matrix<S> W = rand_s<S>(sh.out, sh.in, g, 0.05), X = rand_s<S>(sh.tokens, sh.in, g);
    const Matrix<S> dY = rand_s<S>(sh.tokens, sh.out, g);
    const double s = host.scaling();
    const MatD Ad = d(host.A()), Bd = d(host.B()), Wd = d(W), Xd = d(X), dYd = d(dY);
    const MatD xa = Xd * Ad.transpose();
    const MatD ref_y = Xd * Wd.transpose() + s * xa * Bd.transpose();
    const MatD gb = s * dYd * Bd;
    const MatD ref_dX = dYd * Wd + gb * Ad, ref_dA = gb.transpose() * Xd, ref_dB = s * dYd.transpose() * xa;

    auto dW = DeviceMatrix<S>::from_host(W);
    auto dX = DeviceMatrix<S>::from_host(X);
    auto ddY = DeviceMatrix<S>::from_host(dY);

    // Plain path.
    DeviceMatrix<S> Y(sh.tokens, sh.out);
    poison(Y.view());
    ad.apply(dW.view(), dX.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    CHECK(lora::test::rel_error(ad.forward(dX.view()).to_host(), MatD(s * xa * Bd.transpose())) < tol<S>());
    auto gr = ad.backward(dW.view(), dX.view(), ddY.view());
    CHECK(lora::test::rel_error(gr.dX.to_host(), ref_dX) < tol<S>());
    CHECK(lora::test::rel_error(gr.dA.to_host(), ref_dA) < tol<S>());
    CHECK(lora::test::rel_error(gr.dB.to_host(), ref_dB) < tol<S>());

    // Fused path: [[W, B], [A, 0]] and padded activations.
    auto fw = ad.fuse(dW.view());
    CHECK(fw.out_features() == sh.out);
    CHECK(fw.in_features() == sh.in);
    CHECK(fw.rank() == sh.r);
    CHECK(fw.strategy() == FusedForward::automatic);
    auto Xp = upload_padded(X, fused_rank_pad(sh.r));
    poison(Y.view());
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    for (FusedForward how : {FusedForward::concat_k, FusedForward::accumulate, FusedForward::stacked}) {
      fw.set_strategy(how);
      poison(Y.view());
      ad.apply(fw, Xp.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    }
    // dY with rp spare columns (padded_grad; the padding is poisoned, backward writes zeros
    // there) and with r (accepted too).
    for (Index pad : {fused_rank_pad(sh.r), sh.r}) {
      INFO("dY padding " << pad);
      auto dYp = upload_padded(dY, pad);
      DeviceMatrix<S> gX(sh.tokens, sh.in);
      DeviceMatrix<float> gA(sh.r, sh.in), gB(sh.out, sh.r);
      poison(gX.view());
      poison(gA.view());
      poison(gB.view());
      ad.backward(fw, Xp.view(), dYp.view(), gX.view(), gA.view(), gB.view());
      CHECK(lora::test::rel_error(gX.to_host(), ref_dX) < tol<S>());
      CHECK(lora::test::rel_error(gA.to_host(), ref_dA) < tol<S>());
      CHECK(lora::test::rel_error(gB.to_host(), ref_dB) < tol<S>());
    }
    CHECK(ad.padded_grad(sh.tokens).cols() == sh.out + fused_rank_pad(sh.r));

    // delta_weight, merge, unmerge.
    const MatD delta = s * Bd * Ad;
    CHECK(lora::test::rel_error(ad.delta_weight().to_host(), delta) < tol<S>());
    auto Wm = DeviceMatrix<S>::from_host(W);
    ad.merge(Wm.view());
    CHECK(lora::test::rel_error(Wm.to_host(), MatD(Wd + delta)) < tol<S>());
    ad.unmerge(Wm.view());
    CHECK(lora::test::rel_error(Wm.to_host(), Wd) < tol<S>());
    // Round trip of the factors.
    CHECK(lora::test::max_abs_diff(ad.to_host().A(), host.A()) == 0.0);
  }
}

TEMPLATE_TEST_CASE("cuda adapter: the backward's one pass over dY (s·dY·B and dYᵀ·XA) matches float64",
                   "[cuda][adapter]", bfloat16, lora::half) {
  using S = TestType;
  using T = detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    Index tokens, out, r;
    int blocks;  // 0: the device's resident blocks; else forces fewer output ranges
  };
  // Several token ranges (512 tokens each at r <= 16, 256 at r <= 32) and output ranges,
  // partial last tiles in both, r below the 16/32 column groups, one token.
  const Case cases[] = {{1000, 520, 16, 0}, {1000, 520, 8, 0}, {777, 264, 20, 0}, {300, 200, 32, 0},
                        {1300, 1208, 16, 4}, {1300, 1208, 16, 0}, {64, 64, 1, 0},  {1, 8, 3, 0}};
  for (const Case& c : cases) {
    INFO("tokens " << c.tokens << " out " << c.out << " r " << c.r << " blocks " << c.blocks);
    const Index N = c.r <= 16 ? 16 : 32, gcols = 64;
    const double s = g.uniform(0.5, 2.0);
    const Matrix<S> dY = rand_s<S>(c.tokens, c.out, g), B = rand_s<S>(c.out, c.r, g, 0.3),
                    XA = rand_s<S>(c.tokens, c.r, g, 0.3);
    // dY with spare columns, B and XA with N + 8 columns; everything past the data is NaN
    // (the kernel must neither read dY's spare columns nor let B's and XA's reach column < r).
    auto ddY = upload_padded(dY, 24);
    auto dB_in = upload_padded(B, N + 8 - c.r);
    auto dXA = upload_padded(XA, N + 8 - c.r);
    DeviceMatrix<S> G(c.tokens, gcols);
    DeviceMatrix<float> dB(c.out, c.r);
    poison(G.view());
    poison(dB.view());
    DeviceBuffer<float> scratch;
    auto ctx = CudaContext::thread_default();
    const DeviceView<const S> vdY = DeviceView<const S>(ddY.view()).col_block(0, c.out);
    REQUIRE(detail::dy_pass_ok<S>(vdY, dB_in.view(), dXA.view(), c.r, N + 8));
    auto dev = [](auto v) { return detail::as_device(v); };
    detail::dy_pass<T>(*ctx, dev(vdY), dev(DeviceView<const S>(dB_in.view())), dev(DeviceView<const S>(dXA.view())),
                       c.r, static_cast<float>(s), dev(G.view()), dB.view(), scratch, c.blocks);
    const MatD Gref = s * d(dY) * d(B), dBref = d(dY).transpose() * d(XA);
    const Matrix<S> Gh = G.to_host();
    CHECK(lora::test::rel_error(Gh.leftCols(c.r), Gref) < tol<S>());
    CHECK(lora::test::max_abs_diff(Gh.rightCols(gcols - c.r), Matrix<S>::Zero(c.tokens, gcols - c.r)) == 0.0);
    const Matrix<float> dBh = dB.to_host();
    CHECK(lora::test::rel_error(dBh, dBref) < tol<S>());
    // The partial sums are added in a fixed order: a second run gives the same bits.
    poison(G.view());
    poison(dB.view());
    detail::dy_pass<T>(*ctx, dev(vdY), dev(DeviceView<const S>(dB_in.view())), dev(DeviceView<const S>(dXA.view())),
                       c.r, static_cast<float>(s), dev(G.view()), dB.view(), scratch, c.blocks);
    const Matrix<S> Gh2 = G.to_host();
    const Matrix<float> dBh2 = dB.to_host();
    CHECK(std::memcmp(Gh2.data(), Gh.data(), sizeof(S) * Gh.size()) == 0);
    CHECK(std::memcmp(dBh2.data(), dBh.data(), sizeof(float) * dBh.size()) == 0);
  }
  // The launch shape: token ranges of 512 (r <= 16), output ranges a multiple of 64 that fill
  // the resident blocks, at most 1024 outputs per block.
  const auto p = detail::dy_pass_plan(16384, 4096, 512, 1024, 264);
  CHECK((p.P == 32 && p.Q == 8 && p.ob == 512));
  const auto p2 = detail::dy_pass_plan(16384, 14336, 512, 1024, 264);
  CHECK((p2.P == 32 && p2.Q == 14 && p2.ob == 1024));
  const auto p3 = detail::dy_pass_plan(100, 200, 512, 1024, 264);
  CHECK((p3.P == 1 && p3.Q == 4 && p3.ob == 64));
  // Layouts it does not take: float, r > 32, unaligned rows, too few readable columns.
  DeviceMatrix<S> m(8, 72);
  const DeviceView<const S> v = m.view();
  CHECK(detail::dy_pass_ok<S>(v.col_block(0, 64), v, v, 16, 16));
  CHECK_FALSE(detail::dy_pass_ok<S>(v.col_block(0, 64), v, v, 33, 64));
  CHECK_FALSE(detail::dy_pass_ok<S>(v.col_block(0, 60), v, v, 16, 16));
  CHECK_FALSE(detail::dy_pass_ok<S>(v.col_block(0, 64), v.col_block(1, 32), v, 16, 16));
  CHECK_FALSE(detail::dy_pass_ok<S>(v.col_block(0, 64), v, v, 8, 8));
  DeviceMatrix<float> f(8, 64);
  CHECK_FALSE(detail::dy_pass_ok<float>(f.view(), f.view(), f.view(), 16, 16));
}

TEST_CASE("cuda adapter: fan_in_fan_out apply and merge", "[cuda][adapter]") {
  using S = float;
  Generator g(lora::test::fresh_seed());
  const Index in = 48, out = 40, r = 4, T = 24;
  LowRankAdapter<S> host(in, out, r, 8.0, AdapterOptions{.fan_in_fan_out = true});
  host.set_A(rand_s<S>(r, in, g));
  host.set_B(rand_s<S>(out, r, g));
  auto ad = LowRankAdapter<S, cuda>::from_host(host);
  const Matrix<S> W = rand_s<S>(in, out, g), X = rand_s<S>(T, in, g);
  auto dW = DeviceMatrix<S>::from_host(W);
  auto dX = DeviceMatrix<S>::from_host(X);
  const MatD ref = d(X) * d(W) + host.scaling() * d(X) * d(host.A()).transpose() * d(host.B()).transpose();
  CHECK(lora::test::rel_error(ad.apply(dW.view(), dX.view()).to_host(), ref) < 1e-5);
  ad.merge(dW.view());
  CHECK(lora::test::rel_error(dW.to_host(), d(host.delta_weight()) + d(W)) < 1e-5);
  CHECK_THROWS_WITH(ad.fuse(dW.view()), Catch::Matchers::ContainsSubstring("fan_in_fan_out"));
}

TEST_CASE("cuda adapter: bad shapes throw lora::error naming the tensor", "[cuda][adapter]") {
  LowRankAdapter<float, cuda> ad(64, 32, 4, 8.0, AdapterOptions{.name = "q_proj"});
  DeviceMatrix<float> W(31, 64), X(3, 64);
  CHECK_THROWS_WITH(ad.apply(W.view(), X.view()), Catch::Matchers::ContainsSubstring("base weight W"));
  CHECK_THROWS_WITH(ad.set_A(Matrix<float>(4, 63)), Catch::Matchers::ContainsSubstring("q_proj"));
  CHECK_THROWS_AS(ad.apply(W.view(), X.view()), lora::error);
  // The fused backward names the padded dY when it has neither r nor rp spare columns.
  DeviceMatrix<float> W2(32, 64);
  auto fw = ad.fuse(W2.view());
  auto Xp = ad.padded_input(3);
  DeviceMatrix<float> dYp(3, 32 + 5), dX(3, 64), dA(4, 64), dB(32, 4);
  CHECK_THROWS_WITH(ad.backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view()),
                    Catch::Matchers::ContainsSubstring("padded dY"));
}


TEMPLATE_TEST_CASE("cuda adapter: the fused forward at decode token counts, every strategy, matches float64",
                   "[cuda][adapter][decode]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    Index in, out;
  };
  // out 328 leaves a partial block of outputs; in 100 gives rows that are not 16-byte aligned
  // (the stacked epilogue's scalar fallback and the cuBLAS paths); in 1024 lets the ring kernel
  // take up to four pieces (r 64), in 256 one.
  const Case cases[] = {{256, 328}, {100, 70}, {1024, 264}};
  const Index tokens[] = {1, 2, 3, 5, 8, 16, 17, 33, 64, 100, 128};
  for (const Case& c : cases)
    for (const Index r : {Index(5), Index(8), Index(16), Index(20), Index(33), Index(64)}) {
      if (c.in == 100 && r != 8 && r != 33) continue;
      const double alpha = 2.0 * r * g.uniform(0.5, 1.5);
      LowRankAdapter<S> host(c.in, c.out, r, alpha);
      host.set_A(rand_s<S>(r, c.in, g, 0.1));
      host.set_B(rand_s<S>(c.out, r, g, 0.1));
      auto ctx = std::make_shared<CudaContext>();  // a fresh planner per adapter
      auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
      const Matrix<S> W = rand_s<S>(c.out, c.in, g, 0.05);
      auto dW = DeviceMatrix<S>::from_host(W);
      auto fw = ad.fuse(dW.view());
      const Index rp = fused_rank_pad(r);
      const double s = host.scaling();
      for (const Index T : tokens) {
        INFO("in " << c.in << " out " << c.out << " r " << r << " tokens " << T);
        const Matrix<S> X = rand_s<S>(T, c.in, g);
        const MatD xa = s * d(X) * d(host.A()).transpose();
        const MatD ref = d(X) * d(W).transpose() + xa * d(host.B()).transpose();
        auto Xp = upload_padded(X, rp);
        DeviceMatrix<S> Y(T, c.out);
        // automatic after plan() (the first use of this shape on the context), each fixed
        // strategy, then automatic again (the planned choice, looked up).
        for (const int how : {-1, 1, 2, 3, 4, 5, 0}) {
          INFO("strategy " << how);
          fw.set_strategy(how < 0 ? FusedForward::automatic : static_cast<FusedForward>(how));
          if (how < 0) ad.plan(fw, T);
          poison(Y.view());
          lora::test::poison(Xp.view().col_block(c.in, rp));
          ad.apply(fw, Xp.view(), Y.view());
          CHECK(lora::test::rel_error(Y.to_host(), ref) < tol<S>());
          // s·X·Aᵀ in Xp's first r spare columns (the fused backward reads them); the stacked
          // and stream paths also write zeros after them (the decode kernels, which concat_k,
          // accumulate and automatic may take at T <= 4, write only the r columns).
          const Matrix<S> spare = to_host(DeviceView<const S>(Xp.view()).col_block(c.in, rp));
          CHECK(lora::test::rel_error(spare.leftCols(r), xa) < tol<S>());
          if ((how >= 3 || T > 4) && rp > r)
            CHECK(lora::test::max_abs_diff(spare.rightCols(rp - r), Matrix<S>::Zero(T, rp - r)) == 0.0);
        }
        fw.set_strategy(FusedForward::automatic);
        // The stream kernel with 16- and 32-row tiles, and the ring kernel with XA per block and
        // per cluster, at every T (forced through the planner; where they do not apply, above 32
        // or 16 tokens, for float, unaligned rows or in % 256 != 0, they fall back to stacked).
        const detail::PlanKey key = detail::fused_forward_key<S>(fw, Xp.view(), Y.view());
        const auto planned = ctx->planner().find(key);
        REQUIRE(planned);
        for (detail::FusedPath p : {detail::FusedPath::stream, detail::FusedPath::stream_wide, detail::FusedPath::ring,
                                    detail::FusedPath::ring_cluster}) {
          INFO("path " << static_cast<int>(p));
          ctx->planner().record(key, {static_cast<int>(p)});
          for (int call = 0; call < 2; ++call) {  // twice: the kernel's counters must be reset
            poison(Y.view());
            lora::test::poison(Xp.view().col_block(c.in, rp));
            ad.apply(fw, Xp.view(), Y.view());
            CHECK(lora::test::rel_error(Y.to_host(), ref) < tol<S>());
            const Matrix<S> spare = to_host(DeviceView<const S>(Xp.view()).col_block(c.in, rp));
            CHECK(lora::test::rel_error(spare.leftCols(r), xa) < tol<S>());
            if (rp > r)
              CHECK(lora::test::max_abs_diff(spare.rightCols(rp - r), Matrix<S>::Zero(T, rp - r)) == 0.0);
          }
        }
        ctx->planner().record(key, *planned);
      }
    }
}

TEMPLATE_TEST_CASE("cuda adapter: both stacked epilogue kernels match float64 on strided operands",
                   "[cuda][adapter][decode]", bfloat16, lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index out = 300;
  for (const Index r : {Index(3), Index(16), Index(24), Index(64)})
    for (const Index T : {Index(1), Index(4), Index(7), Index(32), Index(33), Index(128)})
      for (const bool vec : {true, false}) {
        INFO("r " << r << " tokens " << T << " vectorised " << vec);
        const Index rp = fused_rank_pad(r);
        const double s = g.uniform(0.5, 2.0);
        // C [T × (out + rp)], B with rp readable columns (zeros past r, as in the fused block;
        // ld 8 more than rp, or an odd ld for the scalar kernel), Y and XA strided.
        const Matrix<S> Ch = rand_s<S>(T, out + r, g), Bh = rand_s<S>(out, r, g, 0.3);
        Matrix<S> Bfull = Matrix<S>::Zero(out, rp);
        Bfull.leftCols(r) = Bh;
        auto C = upload_padded(Ch, rp - r + 8);
        auto Bd = DeviceMatrix<S>(out, rp + (vec ? 8 : 9));
        upload<S>(Bfull, Bd.view().col_block(0, rp));
        DeviceMatrix<S> Y(T, out + 5), XA(T, rp + 3);
        poison(Y.view());
        poison(XA.view());
        using D = detail::device_t<S>;
        const DeviceView<const S> Bv = DeviceView<const S>(Bd.view()).col_block(0, r);
        detail::launch_stacked_epilogue<D>(*CudaContext::thread_default(), detail::as_device(DeviceView<const S>(C.view())),
                                           out, r, rp, detail::as_device(Bv), static_cast<float>(s),
                                           detail::as_device(Y.view().col_block(0, out)),
                                           detail::as_device(XA.view().col_block(0, rp)), vec);
        const MatD Cd = d(Ch), xa = s * Cd.rightCols(r);
        const MatD ref = Cd.leftCols(out) + xa * d(Bh).transpose();
        const Matrix<S> Yh = Y.to_host(), XAh = XA.to_host();
        CHECK(lora::test::rel_error(Yh.leftCols(out), ref) < tol<S>());
        CHECK(lora::test::rel_error(XAh.leftCols(r), xa) < tol<S>());
        if (rp > r) CHECK(lora::test::max_abs_diff(XAh.middleCols(r, rp - r), Matrix<S>::Zero(T, rp - r)) == 0.0);
        // Nothing written past the views.
        auto all_nan = [](const Matrix<S>& m) {
          for (Index i = 0; i < m.rows(); ++i)
            for (Index j = 0; j < m.cols(); ++j)
              if (!std::isnan(static_cast<float>(m(i, j)))) return false;
          return true;
        };
        CHECK(all_nan(Yh.rightCols(5)));
        CHECK(all_nan(XAh.rightCols(3)));
      }
}

TEST_CASE("cuda adapter: validation and messages are AdapterSpec's, the same as on the CPU", "[cuda][adapter]") {
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const lora::error& e) {
      return e.what();
    }
    return "did not throw";
  };
  const AdapterOptions named{.name = "q_proj"};
  // Construction: rank out of range, alpha not finite, dropout out of [0, 1).
  CHECK(message([&] { LowRankAdapter<float, cuda>(64, 32, 0, 8.0, named); }) ==
        message([&] { LowRankAdapter<float>(64, 32, 0, 8.0, named); }));
  CHECK(message([&] { LowRankAdapter<float, cuda>(64, 32, 40, 8.0, named); }) ==
        message([&] { LowRankAdapter<float>(64, 32, 40, 8.0, named); }));
  CHECK(message([&] { LowRankAdapter<float, cuda>(64, 32, 4, std::nan(""), named); }) ==
        message([&] { LowRankAdapter<float>(64, 32, 4, std::nan(""), named); }));
  const AdapterOptions bad_dropout{.dropout = 1.5, .name = "q_proj"};
  CHECK(message([&] { LowRankAdapter<float, cuda>(64, 32, 4, 8.0, bad_dropout); }) ==
        message([&] { LowRankAdapter<float>(64, 32, 4, 8.0, bad_dropout); }));
  // Operands: W, X, dY and the factors, each with the CPU adapter's message.
  LowRankAdapter<float, cuda> ad(64, 32, 4, 8.0, named);
  const LowRankAdapter<float> cpu(64, 32, 4, 8.0, named);
  CHECK(ad.spec().in_features == 64);
  CHECK(ad.spec().out_features == 32);
  CHECK(ad.who() == cpu.spec().who());
  DeviceMatrix<float> W(32, 64), Wbad(31, 64), X(3, 64), Xbad(3, 63), dYbad(3, 31);
  const Matrix<float> hW = Matrix<float>::Zero(32, 64), hWbad = Matrix<float>::Zero(31, 64),
                      hX = Matrix<float>::Zero(3, 64), hXbad = Matrix<float>::Zero(3, 63),
                      hdYbad = Matrix<float>::Zero(3, 31);
  const std::string bad_w = message([&] { ad.apply(Wbad.view(), X.view()); });
  CHECK(bad_w.find("base weight W") != std::string::npos);
  CHECK(bad_w == message([&] { (void)cpu.apply(hWbad, hX); }));
  CHECK(message([&] { ad.apply(W.view(), Xbad.view()); }) == message([&] { (void)cpu.apply(hW, hXbad); }));
  CHECK(message([&] { ad.backward(W.view(), X.view(), dYbad.view()); }) ==
        message([&] { (void)cpu.backward(hW, hX, hdYbad); }));
  LowRankAdapter<float> cpu2 = cpu;
  CHECK(message([&] { ad.set_A(Matrix<float>(4, 63)); }) == message([&] { cpu2.set_A(Matrix<float>(4, 63)); }));
  CHECK(message([&] { ad.set_B(Matrix<float>(31, 4)); }) == message([&] { cpu2.set_B(Matrix<float>(31, 4)); }));
}
