// Every GPU path against a float64 CPU reference on fresh random inputs
// (bf16/half within 1e-2 relative, float within 1e-5), outputs poisoned with NaN
// before each run so that unwritten elements fail.

#include <lora/cuda.hpp>
#include <lora/io/safetensors.hpp>

#include "cuda/support.cuh"

#include <Eigen/SVD>
#include <cstring>
#include <string>

using namespace lora;
using lora::test::MatD;

namespace {

using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;

template <class E>
MatD d(const Eigen::MatrixBase<E>& m) {
  return m.template cast<double>();
}


template <class S>
DeviceMatrix<S> upload_padded(const Matrix<S>& X, Index extra) {
  DeviceMatrix<S> p(X.rows(), X.cols() + extra);
  poison(p.view());
  upload<S>(X, p.view().col_block(0, X.cols()));
  return p;
}

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
    auto Xp = upload_padded(X, fused_rank_pad(sh.r));
    poison(Y.view());
    ad.apply(fw, Xp.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    for (FusedForward how : {FusedForward::concat_k, FusedForward::accumulate, FusedForward::stacked}) {
      fw.forward = how;
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

TEMPLATE_TEST_CASE("cuda dora: forward and backward match float64", "[cuda][dora]", bfloat16, float) {
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
    auto ad = LowRankAdapter<S, cuda>::from_host(host);
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

    auto dW = DeviceMatrix<S>::from_host(W);
    auto fw = ad.fuse(dW.view());
    auto dm = DeviceMatrix<float>::from_host(m.cast<float>().transpose());
    auto Xp = upload_padded(X, fused_rank_pad(r));
    DeviceMatrix<S> Y(T, out);
    poison(Y.view());
    DoraWorkspace<S> ws;
    dora_apply(ad, fw, DeviceView<const float>(dm.view()), Xp.view(), Y.view(), ws);
    CHECK(lora::test::rel_error(ws.norm.to_host(), MatD(norm)) < (std::is_same_v<S, float> ? 1e-5 : 1e-3));
    CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
    auto dYp = upload_padded(dY, r);
    DeviceMatrix<S> gX(T, in);
    DeviceMatrix<float> gA(r, in), gB(out, r), gm(out, 1);
    poison(gX.view());
    poison(gm.view());
    dora_backward(ad, fw, DeviceView<const float>(dm.view()), DeviceView<const S>(Xp.view()), DeviceView<const S>(Y.view()),
                  dYp.view(), gX.view(), gA.view(), gB.view(), gm.view(), ws);
    CHECK(lora::test::rel_error(gX.to_host(), ref_dX) < tol<S>());
    CHECK(lora::test::rel_error(gA.to_host(), ref_dA) < tol<S>());
    CHECK(lora::test::rel_error(gB.to_host(), ref_dB) < tol<S>());
    CHECK(lora::test::rel_error(gm.to_host(), MatD(ref_dm)) < tol<S>());

    // cache_norm: the second call reuses c; after new magnitudes and invalidate_norm() it is recomputed.
    DoraWorkspace<S> cw;
    cw.cache_norm = true;
    for (int call = 0; call < 2; ++call) {
      poison(Y.view());
      dora_apply(ad, fw, DeviceView<const float>(dm.view()), Xp.view(), Y.view(), cw);
      CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());
      CHECK(cw.norm_block == fw.block.data());
    }
    Vector<double> m2(out);
    for (Index n = 0; n < out; ++n) m2[n] = g.uniform(0.5, 2.0);
    dm.upload(Matrix<float>(m2.cast<float>().transpose()));
    cw.invalidate_norm();
    poison(Y.view());
    dora_apply(ad, fw, DeviceView<const float>(dm.view()), Xp.view(), Y.view(), cw);
    CHECK(lora::test::rel_error(Y.to_host(), MatD(Z * m2.cwiseQuotient(norm).asDiagonal())) < tol<S>());
  }
}

TEST_CASE("cuda nf4: codes, absmax and dequantisation match the bitsandbytes reference vectors", "[cuda][nf4]") {
  auto f = io::SafetensorsFile::open(std::string(LORA_TEST_DATA_DIR) + "/nf4/nf4_reference.safetensors");
  for (const char* c : {"big_10000_bs4096", "normal_4096_bs64", "student_t_3001_bs64", "weight_37x53_bs32",
                        "weight_96x200_bs128", "zero_block_exact_codes_bs64"}) {
    const std::string k = c;
    INFO(k);
    const auto input = f.tensor(k + ".input").to_vector<float>();
    const int bs = static_cast<int>(f.tensor(k + ".blocksize").at<std::int64_t>(0));
    const auto want_packed = f.tensor(k + ".packed").to_vector<std::uint8_t>();
    const auto want_absmax = f.tensor(k + ".absmax").to_vector<float>();
    const auto want_deq = f.tensor(k + ".dequant").to_vector<float>();
    const auto near = f.tensor(k + ".near_threshold").to_vector<std::uint8_t>();
    const Index n = static_cast<Index>(input.size());
    auto dx = DeviceMatrix<float>::from_host(ConstMatrixMap<float>(input.data(), 1, n));
    DeviceNF4 q = nf4_quantize<float>(dx.view(), bs);
    auto [packed, absmax] = to_host(q);
    REQUIRE(packed.size() == want_packed.size());
    REQUIRE(absmax == want_absmax);
    Index mismatches = 0, excused = 0;
    for (Index i = 0; i < n; ++i) {
      const int got = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
      const int want = (i % 2 == 0) ? want_packed[i / 2] >> 4 : want_packed[i / 2] & 15;
      if (got != want) (near[i] ? excused : mismatches)++;
    }
    CHECK(mismatches == 0);
    // The pad nibble of an odd count: bitsandbytes' kernel quantises the zero padding (code 7,
    // or 0 when the block's absmax is 0), like the CPU path; the reference vectors store 0 there.
    if (n % 2) CHECK((packed.back() & 15) == (absmax.back() == 0.0f ? 0 : 7));
    // Dequantise our codes and the reference codes: the second must match .dequant exactly.
    DeviceMatrix<float> out(1, n);
    poison(out.view());
    nf4_dequantize<float>(q, out.view());
    const Matrix<float> deq = out.to_host();
    Index bad = 0;
    for (Index i = 0; i < n; ++i) {
      const int got = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
      const int want = (i % 2 == 0) ? want_packed[i / 2] >> 4 : want_packed[i / 2] & 15;
      if (got == want && deq(0, i) != want_deq[i]) ++bad;
    }
    CHECK(bad == 0);
  }
}

TEMPLATE_TEST_CASE("cuda nf4: codes and absmax are bit-identical to the CPU path", "[cuda][nf4]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (int bs : {32, 64, 128, 4096}) {
    // odd element counts for two block sizes: the last byte's low nibble is a zero pad's code
    const bool odd = bs == 32 || bs == 128;
    const Index rows = 1 + 2 * static_cast<Index>(g.uniform() * 45),
                cols = 2 * (1 + static_cast<Index>(g.uniform() * 150)) + (odd ? 1 : 0);
    Matrix<S> X = rand_s<S>(rows, cols, g, g.uniform(0.01, 10.0));
    X(0, 0) = S(0.f);
    auto dx = DeviceMatrix<S>::from_host(X);
    DeviceNF4 q = nf4_quantize<S>(dx.view(), bs);
    auto [packed, absmax] = to_host(q);
    const std::int64_t n = rows * cols;
    std::vector<std::uint8_t> want_p(static_cast<std::size_t>(quant::packed_bytes(n)));
    std::vector<float> want_a(static_cast<std::size_t>(quant::num_blocks(n, bs)));
    quant::nf4_quantize(X.data(), n, bs, want_p.data(), want_a.data());
    CHECK(packed == want_p);
    CHECK(absmax == want_a);
  }
}

TEMPLATE_TEST_CASE("cuda nf4: fused GEMV/GEMM for 1..16 tokens matches float64 on the dequantised weight",
                   "[cuda][nf4]", bfloat16, lora::half, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Shapes for both kernels' edges: rows not a multiple of 16 (the tensor-core tile), K a
  // multiple of 256 (tensor cores for bf16/half tokens and blocksize ≥ 64) or only of 32 (the
  // CUDA-core kernel), tiny K; more tiles than the persistent grid holds at once (9001 rows:
  // each block walks several, its 4 partial-sum slots wrap around), K over one step of the
  // 16 warps (8448 = 132 groups: three steps, the last with one warp); tokens 1, 2…8 and 9…16
  // (one and two n-tiles).
  // One bf16/half token with K % 1024 == 0 takes the byte-pair kernel: K = 1024 (one K-warp),
  // 4096 with rows not a multiple of its 4-row batches (the last 3 rows by the general kernel),
  // 14336 (14 K-warps, one row group).
  for (auto [out, in] : {std::pair<Index, Index>{100, 256}, {1003, 4192}, {7, 32}, {64, 2080}, {130, 1024},
                         {9001, 256}, {300, 8448}, {1003, 4096}, {37, 14336}})
  for (int bs : {32, 64, 256}) {
    INFO("out " << out << " in " << in << " blocksize " << bs);
    const Matrix<S> W = rand_s<S>(out, in, g);
    auto dW = DeviceMatrix<S>::from_host(W);
    DeviceNF4 q = nf4_quantize<S>(dW.view(), bs);
    DeviceMatrix<S> deq(out, in);
    nf4_dequantize<S>(q, deq.view());
    // The dequantised values are code·absmax, within half a code step of W.
    const MatD Wq = d(deq.to_host());
    CHECK(lora::test::rel_error(Wq, d(W)) < 0.15);
    for (Index T : {Index(1), Index(2), Index(3), Index(9), Index(16)}) {
      INFO("tokens " << T);
      const Matrix<S> X = rand_s<S>(T, in, g);
      auto dX = DeviceMatrix<S>::from_host(X);
      DeviceMatrix<S> Y(T, out);
      poison(Y.view());
      nf4_gemm<S>(q, dX.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), MatD(d(X) * Wq.transpose())) < tol<S>());
    }
  }
}

namespace {
/// x ← c·x, late: it lets programmatic dependents launch at once, then spins for `spin`
/// cycles before it writes, so a dependent that read x before its grid-dependency wait
/// would see the old values.
template <class T>
__global__ void scale_late_kernel(T* x, int n, float c, long long spin) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x))
    x[i] = lora::detail::from_float<T>(lora::detail::to_float(x[i]) * c);
}
}  // namespace

TEMPLATE_TEST_CASE("cuda nf4: the one-token GEMV (a programmatic dependent launch) waits for the kernel before it",
                   "[cuda][nf4]", bfloat16, lora::half) {
  using S = TestType;
  using T = lora::detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index out = 1003, in = 4096;  // the byte-pair kernel, and the general one for the last 3 rows
  const Matrix<S> W = rand_s<S>(out, in, g);
  auto dW = DeviceMatrix<S>::from_host(W);
  DeviceNF4 q = nf4_quantize<S>(dW.view(), 64);
  DeviceMatrix<S> deq(out, in);
  nf4_dequantize<S>(q, deq.view());
  const MatD Wq = d(deq.to_host());
  const Matrix<S> X = rand_s<S>(1, in, g);
  auto dX = DeviceMatrix<S>::from_host(X);
  // Factors exact in bf16/half, so the scaled X is exact; each round's kernel writes X ~50 µs
  // after its dependents may start, and the GEMV right behind it must see the new X.
  const float factors[3] = {-2.f, 0.5f, 4.f};
  std::vector<DeviceMatrix<S>> Y;
  for (int i = 0; i < 3; ++i) {
    Y.emplace_back(1, out);
    poison(Y.back().view());
  }
  auto& ctx = *CudaContext::thread_default();
  for (int i = 0; i < 3; ++i) {
    scale_late_kernel<T><<<1, 256, 0, ctx.stream()>>>(reinterpret_cast<T*>(dX.data()), static_cast<int>(in),
                                                       factors[i], 100000);
    LORA_CUDA_CHECK(cudaGetLastError());
    nf4_gemm<S>(q, dX.view(), Y[static_cast<std::size_t>(i)].view(), ctx);
  }
  double c = 1;
  for (int i = 0; i < 3; ++i) {
    c *= factors[i];
    INFO("round " << i);
    CHECK(lora::test::rel_error(Y[static_cast<std::size_t>(i)].to_host(), MatD(c * d(X) * Wq.transpose())) <
          tol<S>());
  }
}

TEMPLATE_TEST_CASE("cuda spectrum: singular values of s·B·A match a dense float64 SVD", "[cuda][spectrum]", bfloat16,
                   float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 200, out = 300, r = 12;
  LowRankAdapter<S> host(in, out, r, 24.0);
  host.set_A(rand_s<S>(r, in, g));
  Matrix<S> B = rand_s<S>(out, r, g);
  B.col(3) *= S(0.01f);  // a spread of singular values
  host.set_B(B);
  auto ad = LowRankAdapter<S, cuda>::from_host(host);
  const MatD dense = host.scaling() * d(host.B()) * d(host.A());
  Eigen::JacobiSVD<MatD> svd(dense);
  const Vector<double> want = svd.singularValues().head(r);
  const Vector<double> got = singular_values(ad);
  REQUIRE(got.size() == r);
  CHECK((got - want).norm() / want.norm() < 1e-5);
  CHECK(std::abs(got[r - 1] - want[r - 1]) < 1e-4 * want[0]);
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
    DoraWorkspace<S> ws;
    for (int run = 0; run < 2; ++run) {  // the second run takes the cached ‖w_n‖² and the grown scratch
      dora_weight_norm(ad, fw, ws, dm.data());
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
