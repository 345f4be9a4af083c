// DoraAdapter<S, cuda> (lora/cuda/dora.cuh): the fused path (forward, backward, the cached
// column scale) and the tensor-core weight-norm GEMM against float64. The unfused member
// functions run in device.cu, on the CPU and the GPU from one body.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;
using lora::test::upload_padded;

TEMPLATE_TEST_CASE("cuda dora: the fused forward and backward match float64", "[cuda][dora]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // T 40 and 48 take the scaled-block path (T > 16); in = 100 there makes the block's leading
  // dimension not a multiple of 8 (the row-by-row scale kernel, not the vectorised one).
  for (Index T : {Index(2), Index(40), Index(48)}) {
    const Index in = T == 40 ? 100 : 128, out = 96, r = T == 48 ? 16 : 8;
    LowRankAdapter<S> host(in, out, r, 16.0);
    host.set_A(rand_s<S>(r, in, g, 0.1));
    host.set_B(rand_s<S>(out, r, g, 0.1));
    const Matrix<S> W = rand_s<S>(out, in, g, 0.1), X = rand_s<S>(T, in, g), dY = rand_s<S>(T, out, g);
    const double s = host.scaling();
    const MatD Ad = d(host.A()), Bd = d(host.B()), Wd = d(W), Xd = d(X), dYd = d(dY);
    Vector<double> m(out);
    for (Index n = 0; n < out; ++n) m[n] = g.uniform(0.5, 2.0);
    const MatD merged = Wd + s * Bd * Ad;
    const Vector<double> norm = merged.rowwise().norm();
    const Vector<double> c = m.cwiseQuotient(norm);
    const MatD Z = Xd * Wd.transpose() + s * (Xd * Ad.transpose()) * Bd.transpose();
    const MatD ref_y = Z * c.asDiagonal();
    const MatD dZ = dYd * c.asDiagonal();
    const MatD gb = s * dZ * Bd;
    const MatD ref_dX = dZ * Wd + gb * Ad, ref_dA = gb.transpose() * Xd,
               ref_dB = s * dZ.transpose() * (Xd * Ad.transpose());
    const Vector<double> ref_dm = (dYd.cwiseProduct(Z)).colwise().sum().transpose().cwiseQuotient(norm);

    DoraAdapter<S, cuda> dora(LowRankAdapter<S, cuda>::from_host(host),
                              DeviceMatrix<float>::from_host(Matrix<float>(m.cast<float>())));
    auto dW = DeviceMatrix<S>::from_host(W);
    auto fw = dora.fuse(dW.view());
    auto Xp = upload_padded(X, fused_rank_pad(r));
    DeviceMatrix<S> Y(T, out);
    poison(Y.view());
    dora.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(lora::to_host(dora.last_norm()), MatD(norm)) < (std::is_same_v<S, float> ? 1e-5 : 1e-3));
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    for (Index pad : {r, fused_rank_pad(r)}) {  // dYp with out + r or out + rp columns
      INFO("dY padding " << pad);
      auto dYp = upload_padded(dY, pad);
      DeviceMatrix<S> gX(T, in);
      DeviceMatrix<float> gA(r, in), gB(out, r), gm(out, 1);
      poison(gX.view());
      poison(gA.view());
      poison(gB.view());
      poison(gm.view());
      dora.backward(fw, Xp.view(), Y.view(), dYp.view(), gX.view(), gA.view(), gB.view(), gm.view());
      CHECK(lora::test::rel_error(gX.to_host(), ref_dX) < tol<S>());
      CHECK(lora::test::rel_error(gA.to_host(), ref_dA) < tol<S>());
      CHECK(lora::test::rel_error(gB.to_host(), ref_dB) < tol<S>());
      CHECK(lora::test::rel_error(gm.to_host(), MatD(ref_dm)) < tol<S>());
    }

    // cache_norm: the second call reuses c (a changed m is not seen until invalidate_norm()).
    dora.cache_norm(true);
    for (int call = 0; call < 2; ++call) {
      poison(Y.view());
      dora.apply(fw, Xp.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    }
    Vector<double> m2(out);
    for (Index n = 0; n < out; ++n) m2[n] = g.uniform(0.5, 2.0);
    upload<float>(Matrix<float>(m2.cast<float>()), dora.magnitude());
    poison(Y.view());
    dora.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());  // still the cached scale
    dora.invalidate_norm();
    poison(Y.view());
    dora.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), MatD(Z * m2.cwiseQuotient(norm).asDiagonal())) < tol<S>());
  }
}

TEMPLATE_TEST_CASE("cuda dora: the weight-norm GEMM [W; A]·Aᵀ on tensor cores (detail::norm_gemm) matches float64",
                   "[cuda][dora]", bfloat16, lora::half) {
  using S = TestType;
  using T = detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    Index out, in, r;
    int blocks;  // 0: the device's resident blocks; else a smaller grid (longer row and K ranges)
  };
  // Row ranges of 1-4 row tiles and K ranges of 1-16 K tiles (8 at r > 16), partial last tiles
  // in both (rows out + r, K not a multiple of 64), r below the 16/32 column groups.
  const Case cases[] = {{1000, 1032, 16, 0}, {1000, 1032, 16, 4}, {264, 200, 20, 0}, {264, 200, 20, 3},
                        {500, 64, 1, 0},     {300, 2048, 32, 1},  {4100, 1040, 16, 1}, {8, 64, 3, 0},
                        {96, 128, 8, 0},     {64, 4096, 16, 0},   {130, 4104, 24, 0}};
  for (const Case& c : cases) {
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " blocks " << c.blocks);
    const Index rows = c.out + c.r;
    const Matrix<S> Mh = rand_s<S>(rows, c.in, g);
    // [W; A] inside a larger block: NaN in the 24 columns past K and the 8 rows below A,
    // which the kernel must not read.
    DeviceMatrix<S> blk(rows + 8, c.in + 24);
    poison(blk.view());
    upload<S>(Mh, blk.view().row_block(0, rows).col_block(0, c.in));
    const DeviceView<const S> all = blk.view();
    auto dev = [](auto v) { return detail::as_device(v); };
    const auto M = dev(all.row_block(0, rows).col_block(0, c.in));
    const auto A = dev(all.row_block(c.out, c.r).col_block(0, c.in));
    REQUIRE(detail::norm_gemm_ok<T>(M, A, c.r));
    DeviceMatrix<float> PG(rows, c.r);
    poison(PG.view());
    DeviceBuffer<float> scratch;
    auto ctx = CudaContext::thread_default();
    detail::norm_gemm<T>(*ctx, M, A, c.r, PG.view(), scratch, c.blocks);
    const MatD ref = d(Mh) * d(Mh.bottomRows(c.r)).transpose();
    const Matrix<float> h = PG.to_host();
    // Exact products of 16-bit inputs, float sums: far inside 1e-4.
    CHECK(lora::test::rel_error(h, ref) < 1e-4);
    CHECK(lora::test::max_abs_diff(h, ref) < 1e-4 * std::sqrt(static_cast<double>(c.in)) * 8);
    // The partial sums are added in a fixed order: a second run gives the same bits.
    poison(PG.view());
    detail::norm_gemm<T>(*ctx, M, A, c.r, PG.view(), scratch, c.blocks);
    const Matrix<float> h2 = PG.to_host();
    CHECK(std::memcmp(h2.data(), h.data(), sizeof(float) * h.size()) == 0);
  }
  // End to end through dora_weight_norm: the norms straight from the partial sums
  // (dora_norm_fused_kernel; r 16 and 20: N 16 and 32), from cuBLAS's PG (in 100: rows not on
  // 16 bytes) and, for r > 32, cuBLAS and dora_norm_kernel.
  struct NormCase {
    Index out, in, r;
  };
  for (const NormCase& c : {NormCase{1000, 1032, 16}, NormCase{264, 200, 20}, NormCase{96, 100, 8},
                            NormCase{72, 128, 40}}) {
    INFO("dora_weight_norm: out " << c.out << " in " << c.in << " r " << c.r);
    LowRankAdapter<S> host(c.in, c.out, c.r, 2.0 * c.r);
    host.set_A(rand_s<S>(c.r, c.in, g, 0.1));
    host.set_B(rand_s<S>(c.out, c.r, g, 0.1));
    auto ad = LowRankAdapter<S, cuda>::from_host(host);
    const Matrix<S> W = rand_s<S>(c.out, c.in, g, 0.1);
    Vector<double> m(c.out);
    for (Index n = 0; n < c.out; ++n) m[n] = g.uniform(0.5, 2.0);
    auto dW = DeviceMatrix<S>::from_host(W);
    auto fw = ad.fuse(dW.view());
    auto dm = DeviceMatrix<float>::from_host(m.cast<float>().transpose());
    detail::DoraWorkspace<S> ws;
    for (int run = 0; run < 2; ++run) {  // the second run takes the cached ‖w_n‖² and the grown scratch
      detail::dora_weight_norm(ad, fw, ws, dm.data());
      const MatD Wd = d(W), Ad = d(host.A()), Bd = d(host.B());
      const Vector<double> norm = (Wd + host.scaling() * Bd * Ad).rowwise().norm();
      CHECK(lora::test::rel_error(ws.norm.to_host(), MatD(norm)) < 1e-3);
      CHECK(lora::test::rel_error(ws.c.to_host(), MatD(m.cwiseQuotient(norm))) < 1e-3);
      MatD tall(c.out + c.r, c.in);
      tall << Wd, Ad;
      CHECK(lora::test::rel_error(ws.PG.to_host(), MatD(tall * Ad.transpose())) < 1e-4);
    }
  }
  // The launch shape: one row tile per range and the fewest K ranges (16 K tiles each) where
  // that fills the resident blocks; longer row ranges where the rows alone fill it.
  const auto p = detail::norm_gemm_plan(4112, 4096, 4, 16, 264);
  CHECK((p.RT == 65 && p.KT == 64 && p.P == 65 && p.Q == 4));
  const auto p2 = detail::norm_gemm_plan(14352, 4096, 4, 16, 264);
  CHECK((p2.RT == 225 && p2.P == 66 && p2.Q == 4));
  const auto p3 = detail::norm_gemm_plan(1016, 1032, 4, 16, 264);
  CHECK((p3.P == 16 && p3.Q == 16));
  const auto p4 = detail::norm_gemm_plan(8, 64, 4, 16, 264);
  CHECK((p4.P == 1 && p4.Q == 1));
  // Layouts it does not take: float, r > 32, K not a multiple of 8, unaligned rows, A too short.
  DeviceMatrix<S> m(40, 72);
  const auto v = detail::as_device(DeviceView<const S>(m.view()));
  CHECK(detail::norm_gemm_ok<T>(v.col_block(0, 64), v.col_block(0, 64), 16));
  CHECK_FALSE(detail::norm_gemm_ok<T>(v.col_block(0, 64), v.col_block(0, 64), 33));
  CHECK_FALSE(detail::norm_gemm_ok<T>(v.col_block(0, 60), v.col_block(0, 60), 16));
  CHECK_FALSE(detail::norm_gemm_ok<T>(v.col_block(1, 64), v.col_block(1, 64), 16));
  CHECK_FALSE(detail::norm_gemm_ok<T>(v.col_block(0, 64), v.row_block(0, 8).col_block(0, 64), 16));
  DeviceMatrix<float> f(8, 64);
  CHECK_FALSE(detail::norm_gemm_ok<float>(f.view(), f.view(), 4));
}


namespace {

/// PEFT's DoRA forward in float64 from the rounded inputs: Y = c ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ),
/// c = m ⊘ ‖W + s·B·A‖_row; `norm` gets the row norms.
MatD dora_reference(const MatD& W, const MatD& A, const MatD& B, const MatD& X, const Vector<double>& m, double s,
                    Vector<double>& norm) {
  norm = (W + s * B * A).rowwise().norm();
  const Vector<double> c = m.cwiseQuotient(norm);
  return (X * W.transpose() + s * (X * A.transpose()) * B.transpose()) * c.asDiagonal();
}

/// Lets its dependents start at once, spins, then doubles X: a programmatic dependent launch
/// after it that reads X before griddepcontrol.wait sees the old values.
template <class T>
__global__ void dora_spin_then_double(T* X, long ld, int rows, int cols) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < 200000) {
  }
  for (int i = static_cast<int>(threadIdx.x); i < rows * cols; i += static_cast<int>(blockDim.x)) {
    T& x = X[static_cast<long>(i / cols) * ld + i % cols];
    x = lora::detail::from_float<T>(2.f * lora::detail::to_float(x));
  }
}

double max_rel(const Matrix<float>& got, const Vector<double>& want) {
  double e = 0;
  for (Index i = 0; i < want.size(); ++i)
    e = std::max(e, std::abs(static_cast<double>(got.data()[i]) - want[i]) / std::abs(want[i]));
  return e;
}

}  // namespace

TEMPLATE_TEST_CASE("cuda dora: the one-pass forward (norms and Y from one read of W) matches float64",
                   "[cuda][dora]", bfloat16, lora::half) {
  using S = TestType;
  using T = detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // bf16/half outputs rounded once from float: ~2^-9 (bf16) or 2^-11 (half) relative per element.
  const double ytol = std::is_same_v<S, bfloat16> ? 5e-3 : 2e-3;
  // in 1032: K not a multiple of 64; out 1000: the last row tile partial, A's rows inside it.
  const Index in = 1032, out = 1000;
  for (Index r : {Index(8), Index(16), Index(64)})
    for (Index Tn : {Index(1), Index(2), Index(7), Index(16), Index(40)})
      for (double rho : {0.01, 0.1}) {  // ‖s·B_i·A‖ / ‖W_i‖ about rho
        INFO("r " << r << " T " << Tn << " rho " << rho);
        const double alpha = 2.0 * r;
        LowRankAdapter<S> host(in, out, r, alpha);
        const double s = host.scaling(), sa = 0.05, sw = 0.02;
        const double sb = rho * sw / (s * sa * std::sqrt(static_cast<double>(r)));
        host.set_A(rand_s<S>(r, in, g, sa));
        host.set_B(rand_s<S>(out, r, g, sb));
        const Matrix<S> W = rand_s<S>(out, in, g, sw), X = rand_s<S>(Tn, in, g);
        Vector<double> m(out);
        for (Index n = 0; n < out; ++n) m[n] = g.uniform(0.5, 2.0) * sw * std::sqrt(static_cast<double>(in));
        Vector<double> norm;
        const MatD ref = dora_reference(d(W), d(host.A()), d(host.B()), d(X), m, s, norm);

        DoraAdapter<S, cuda> dora(LowRankAdapter<S, cuda>::from_host(host),
                                  DeviceMatrix<float>::from_host(Matrix<float>(m.cast<float>())));
        auto dW = DeviceMatrix<S>::from_host(W), dX = DeviceMatrix<S>::from_host(X);
        auto fw = dora.fuse(dW.view());
        auto Xp = lora::test::upload_padded(X, fused_rank_pad(r));
        DeviceMatrix<S> Y(Tn, out);
        const bool applies = r + Tn <= 32 && Tn <= 16;
        for (DoraDecode how : {DoraDecode::automatic, DoraDecode::one_pass, DoraDecode::two_pass}) {
          INFO("path " << static_cast<int>(how));
          dora.decode_path(how);
          if (how == DoraDecode::one_pass && !applies) {
            CHECK_THROWS_AS(dora.apply(fw, Xp.view(), Y.view()), lora::error);
            CHECK_THROWS_AS(dora.apply(dW.view(), dX.view(), Y.view()), lora::error);
            continue;
          }
          const bool pass = how != DoraDecode::two_pass && applies;
          const double tol_y = pass ? ytol : tol<S>();
          poison(Y.view());
          dora.apply(fw, Xp.view(), Y.view());
          const Matrix<S> y1 = Y.to_host();
          CHECK(lora::test::rel_error(y1, ref) < tol_y);
          if (pass) {  // s·X·Aᵀ, then zeros, in Xp's last rp columns (what the fused backward reads)
            const Matrix<S> xa = lora::to_host(DeviceView<const S>(Xp.view()).col_block(in, fused_rank_pad(r)));
            CHECK(lora::test::rel_error(xa.leftCols(r), MatD(s * d(X) * d(host.A()).transpose())) < tol<S>());
            if (fused_rank_pad(r) > r) CHECK(d(xa.rightCols(fused_rank_pad(r) - r)).cwiseAbs().maxCoeff() == 0.0);
          }
          const double norm_err = max_rel(lora::to_host(dora.last_norm()), norm);
          // One-pass: every term of ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ from exact products
          // of 16-bit values added in float; the terms do not cancel at these scales.
          CHECK(norm_err < (pass ? 1e-5 : 1e-3));
          if (pass && how == DoraDecode::automatic && Tn == 1 && r == 16)
            std::printf("dora one-pass %s: r %ld T %ld rho %.2f: max rel. error of the norm %.2e, of Y %.2e\n",
                        std::is_same_v<S, bfloat16> ? "bf16" : "half", static_cast<long>(r), static_cast<long>(Tn),
                        rho, norm_err, lora::test::rel_error(y1, ref));
          poison(Y.view());
          dora.apply(dW.view(), dX.view(), Y.view());  // the plain form takes the same path
          CHECK(lora::test::rel_error(Y.to_host(), ref) < tol_y);
          if (pass) {  // partials added in a fixed order: the same bits again
            poison(Y.view());
            dora.apply(fw, Xp.view(), Y.view());
            const Matrix<S> y2 = Y.to_host();
            CHECK(std::memcmp(y1.data(), y2.data(), sizeof(S) * y1.size()) == 0);
          }
        }
        if (!applies || rho != 0.1) continue;
        // Per call, nothing kept: new m, then a new W and new A, B (refresh) between calls.
        dora.decode_path(DoraDecode::automatic);
        Vector<double> m2(out);
        for (Index n = 0; n < out; ++n) m2[n] = g.uniform(0.5, 2.0);
        upload<float>(Matrix<float>(m2.cast<float>()), dora.magnitude());
        const Matrix<S> W2 = rand_s<S>(out, in, g, sw);
        upload<S>(W2, dW.view());
        auto fw2 = dora.fuse(dW.view());
        poison(Y.view());
        dora.apply(fw2, Xp.view(), Y.view());
        CHECK(lora::test::rel_error(Y.to_host(), dora_reference(d(W2), d(host.A()), d(host.B()), d(X), m2, s, norm)) <
              ytol);
        const Matrix<S> A3 = rand_s<S>(r, in, g, sa), B3 = rand_s<S>(out, r, g, sb);
        dora.lora().set_A(A3);
        dora.lora().set_B(B3);
        dora.refresh(fw2);
        poison(Y.view());
        dora.apply(fw2, Xp.view(), Y.view());
        CHECK(lora::test::rel_error(Y.to_host(), dora_reference(d(W2), d(A3), d(B3), d(X), m2, s, norm)) < ytol);
      }

  // detail::dora_pass alone: W and A in separate allocations with NaN around them, grids of
  // 1 and 3 blocks (long row and K ranges), r + T = 16 and 32 (N 16 and 32).
  struct Case {
    Index out, in, r, T;
    int blocks;
  };
  for (const Case& c : {Case{300, 2048, 8, 8, 1}, Case{300, 2048, 16, 16, 3}, Case{4100, 520, 16, 1, 0},
                        Case{64, 64, 1, 1, 0}, Case{130, 4104, 24, 8, 0}}) {
    INFO("dora_pass: out " << c.out << " in " << c.in << " r " << c.r << " T " << c.T << " blocks " << c.blocks);
    const Matrix<S> W = rand_s<S>(c.out, c.in, g, 0.02), A = rand_s<S>(c.r, c.in, g, 0.05),
                    B = rand_s<S>(c.out, c.r, g, 0.02), X = rand_s<S>(c.T, c.in, g);
    Vector<double> m(c.out);
    for (Index n = 0; n < c.out; ++n) m[n] = g.uniform(0.5, 2.0);
    auto pad = [](const Matrix<S>& h) {
      DeviceMatrix<S> p(h.rows() + 8, h.cols() + 24);
      poison(p.view());
      upload<S>(h, p.view().row_block(0, h.rows()).col_block(0, h.cols()));
      return p;
    };
    auto pW = pad(W), pA = pad(A), pX = pad(X), pB = pad(B);
    auto sub = [](DeviceMatrix<S>& p, Index rows, Index cols) {
      return detail::as_device(DeviceView<const S>(p.view()).row_block(0, rows).col_block(0, cols));
    };
    const auto vW = sub(pW, c.out, c.in), vA = sub(pA, c.r, c.in), vX = sub(pX, c.T, c.in);
    REQUIRE(detail::dora_pass_ok<T>(vW, vA, vX, c.r));
    auto dm = DeviceMatrix<float>::from_host(Matrix<float>(m.cast<float>()));
    DeviceMatrix<float> dn(c.out, 1), dc(c.out, 1);
    DeviceMatrix<S> Y(c.T, c.out);
    DeviceBuffer<float> part, sq;
    auto ctx = CudaContext::thread_default();
    const double s = 1.5;
    for (int run = 0; run < 4; ++run) {  // both tile orders, 1 and 3 rows per epilogue warp
      INFO("run " << run);
      poison(Y.view());
      poison(dn.view());
      poison(dc.view());
      detail::dora_pass<T>(*ctx, vW, vA, vX, c.r, reinterpret_cast<const T*>(pB.data()), pB.view().ld,
                           static_cast<float>(s), dm.data(), dn.data(), dc.data(), detail::as_device(Y.view()), part,
                           sq, c.blocks, detail::DoraPassOptions{run % 2 == 0, run >= 2, run == 3 ? 3 : 1});
      Vector<double> norm;
      const MatD ref = dora_reference(d(W), d(A), d(B), d(X), m, s, norm);
      CHECK(max_rel(dn.to_host(), norm) < 1e-5);
      CHECK(max_rel(dc.to_host(), Vector<double>(m.cwiseQuotient(norm))) < 1e-5);
      CHECK(lora::test::rel_error(Y.to_host(), ref) < ytol);
    }
    // The programmatic launch waits for the kernel before it: X/2 uploaded, doubled by a kernel
    // that lets its dependents start at once and spins first.
    upload<S>(Matrix<S>((X.template cast<double>() * 0.5).template cast<S>()), pX.view().row_block(0, c.T).col_block(0, c.in));
    poison(Y.view());
    dora_spin_then_double<T><<<1, 256, 0, ctx->stream()>>>(reinterpret_cast<T*>(pX.data()), pX.view().ld,
                                                           static_cast<int>(c.T), static_cast<int>(c.in));
    detail::dora_pass<T>(*ctx, vW, vA, vX, c.r, reinterpret_cast<const T*>(pB.data()), pB.view().ld,
                         static_cast<float>(s), dm.data(), dn.data(), dc.data(), detail::as_device(Y.view()), part, sq,
                         c.blocks, detail::DoraPassOptions{true, false, 1});
    Vector<double> norm;
    CHECK(lora::test::rel_error(Y.to_host(), dora_reference(d(W), d(A), d(B), d(X), m, s, norm)) < ytol);
  }
  // Layouts it does not take: r + T > 32, K not a multiple of 8, rows off 16 bytes, float.
  DeviceMatrix<S> big(64, 72);
  const auto v = detail::as_device(DeviceView<const S>(big.view()));
  CHECK(detail::dora_pass_ok<T>(v.col_block(0, 64), v.row_block(0, 16).col_block(0, 64),
                                v.row_block(0, 16).col_block(0, 64), 16));
  CHECK_FALSE(detail::dora_pass_ok<T>(v.col_block(0, 64), v.row_block(0, 16).col_block(0, 64),
                                      v.row_block(0, 17).col_block(0, 64), 16));
  CHECK_FALSE(detail::dora_pass_ok<T>(v.col_block(0, 60), v.row_block(0, 16).col_block(0, 60),
                                      v.row_block(0, 1).col_block(0, 60), 16));
  CHECK_FALSE(detail::dora_pass_ok<T>(v.col_block(1, 64), v.row_block(0, 16).col_block(1, 64),
                                      v.row_block(0, 1).col_block(1, 64), 16));
  DeviceMatrix<float> f(8, 64);
  CHECK_FALSE(detail::dora_pass_ok<float>(f.view(), f.view().row_block(0, 4), f.view().row_block(0, 1), 4));
}

TEMPLATE_TEST_CASE("cuda dora: fan_in_fan_out (W stored [in x out]) as on the CPU, against float64", "[cuda][dora]",
                   bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 136, out = 72, r = 8;
  LowRankAdapter<S> h(in, out, r, 16.0, AdapterOptions{.fan_in_fan_out = true});
  h.set_A(rand_s<S>(r, in, g, 0.1));
  h.set_B(rand_s<S>(out, r, g, 0.1));
  const Matrix<S> Wt = rand_s<S>(in, out, g, 0.1);  // [in × out], as GPT-2's Conv1D keeps it
  Vector<double> m(out);
  for (Index n = 0; n < out; ++n) m[n] = g.uniform(0.5, 2.0);
  const MatD Wd = d(Wt).transpose(), Ad = d(h.A()), Bd = d(h.B());
  const double s = h.scaling();
  const DoraAdapter<S> cpu_dora(h, m.cast<compute_t<S>>());
  auto dora = DoraAdapter<S, cuda>::from_host(cpu_dora);
  auto dW = DeviceMatrix<S>::from_host(Wt);
  CHECK_THROWS_AS(dora.fuse(dW.view()), lora::error);  // the fused block takes [out × in], as LoRA's
  const DeviceMatrix<S> Wwrong(out, in);
  CHECK_THROWS_AS(dora.weight_norm(Wwrong.view()), lora::error);

  const Vector<double> norm = (Wd + s * Bd * Ad).rowwise().norm();
  CHECK(lora::test::rel_error(dora.weight_norm(dW.view()).to_host(), MatD(norm)) < 1e-5);
  CHECK(lora::test::rel_error(cpu_dora.weight_norm(Wt), MatD(norm)) < 1e-5);  // the CPU agrees
  for (Index T : {Index(1), Index(5), Index(24)}) {
    INFO("T " << T);
    const Matrix<S> X = rand_s<S>(T, in, g), dY = rand_s<S>(T, out, g);
    Vector<double> nrm;
    const MatD ref = dora_reference(Wd, Ad, Bd, d(X), m, s, nrm);
    auto dX = DeviceMatrix<S>::from_host(X);
    for (DoraDecode how : {DoraDecode::automatic, DoraDecode::two_pass}) {
      dora.decode_path(how);
      const Matrix<S> Y = dora.apply(dW.view(), dX.view()).to_host();
      CHECK(lora::test::rel_error(Y, ref) < tol<S>());
      CHECK(lora::test::rel_error(Y, d(cpu_dora.apply(Wt, X))) < tol<S>());
    }
    dora.decode_path(DoraDecode::automatic);
    // Gradients against the CPU class (itself tested against float64 in tests/dora).
    const auto gc = cpu_dora.backward(Wt, X, dY.template cast<compute_t<S>>());
    const auto gd = dora.backward(dW.view(), dX.view(), DeviceMatrix<S>::from_host(dY).view());
    CHECK(lora::test::rel_error(gd.dX.to_host(), d(gc.dX)) < tol<S>());
    CHECK(lora::test::rel_error(gd.dA.to_host(), d(gc.dA)) < tol<S>());
    CHECK(lora::test::rel_error(gd.dB.to_host(), d(gc.dB)) < tol<S>());
    CHECK(lora::test::rel_error(gd.dm.to_host(), MatD(d(gc.dm))) < tol<S>());
  }
  // merge / unmerge / merged_weight keep W's [in × out] orientation, column n scaled by c_n.
  const MatD merged = ((Wd + s * Bd * Ad).array().colwise() * (m.array() / norm.array())).matrix().transpose();
  CHECK(lora::test::rel_error(dora.merged_weight(dW.view()).to_host(), merged) < tol<S>());
  CHECK(lora::test::rel_error(dora.merged_weight(dW.view()).to_host(), d(cpu_dora.merged_weight(Wt))) < tol<S>());
  auto Wm = DeviceMatrix<S>::from_host(Wt);
  const DeviceMatrix<float> n = dora.merge(Wm.view());
  CHECK(lora::test::rel_error(Wm.to_host(), merged) < tol<S>());
  CHECK(lora::test::rel_error(n.to_host(), MatD(norm)) < 1e-5);
  dora.unmerge(Wm.view(), n.view());
  CHECK(lora::test::rel_error(Wm.to_host(), d(Wt)) < (std::is_same_v<S, float> ? 1e-5 : 2e-2));
  // PEFT's initialisation: m = ‖W + s·B·A‖ per output feature.
  const auto init = DoraAdapter<S, cuda>::from_weight(LowRankAdapter<S, cuda>::from_host(h), dW.view());
  CHECK(lora::test::rel_error(lora::to_host(init.magnitude()), MatD(norm)) < 1e-5);
}
