// Every compiled-in NF4 GEMM path (portable, AVX2, AVX-512) and both modes
// against a float64 reference, on odd shapes and 1..16 tokens. This TU is built
// twice: in test_quant (the native target) and as test_quant_avx2 with
// -mavx2 -mno-avx512f, so the AVX2 path is tested on an AVX-512 machine too.
#include <lora/quant/nf4_cpu.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;

namespace {

struct Case {
  Index out, in;
  std::int64_t bs;
};

Matrix<float> random_matrix(Generator& gen, Index r, Index c, double scale) {
  Matrix<float> m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * gen.normal());
  return m;
}

struct Reference {
  Matrix<double> y;       // X·Wdᵀ in float64, Wd the bitsandbytes values
  Matrix<double> abs_wx;  // Σ_k |w_k·x_k|, for the rounding tolerance
  Matrix<double> fast_bound;  // the fast mode's worst-case error (see nf4_cpu.hpp)
};

Reference reference(const Matrix<float>& Wd, const Matrix<float>& X, const std::vector<float>& absmax, std::int64_t bs) {
  const Index T = X.rows(), in = X.cols(), out = Wd.rows();
  Reference r;
  r.y.resize(T, out);
  r.abs_wx.resize(T, out);
  r.fast_bound.resize(T, out);
  const double ew = quant::nf4_code_i8_max_error;
  for (Index t = 0; t < T; ++t) {
    // Half a quantisation step of each activation's group (plus a float's worth).
    std::vector<double> dx(static_cast<std::size_t>(in));
    for (Index g0 = 0; g0 < in; g0 += quant::nf4_q8_group) {
      const Index g1 = std::min<Index>(in, g0 + quant::nf4_q8_group);
      double amax = 0;
      for (Index k = g0; k < g1; ++k) amax = std::max(amax, std::abs(double(X(t, k))));
      for (Index k = g0; k < g1; ++k) dx[static_cast<std::size_t>(k)] = amax / 127.0 * (0.5 + 1e-5);
    }
    for (Index i = 0; i < out; ++i) {
      double y = 0, a = 0, b = 0;
      for (Index k = 0; k < in; ++k) {
        const double w = Wd(i, k), x = X(t, k);
        const double s = absmax[static_cast<std::size_t>((i * in + k) / bs)];
        y += w * x;
        a += std::abs(w * x);
        const double xk = dx[static_cast<std::size_t>(k)];
        b += std::abs(x) * ew * s + std::abs(w) * xk + ew * s * xk;
      }
      r.y(t, i) = y;
      r.abs_wx(t, i) = a;
      r.fast_bound(t, i) = b;
    }
  }
  return r;
}

template <class Isa>
Matrix<float> run(Isa isa, const Nf4Tensor& Wq, const Matrix<float>& X, quant::nf4_mode mode) {
  Matrix<float> Y(X.rows(), Wq.rows());
  Y.setConstant(std::nanf(""));  // every output must be written
  quant::nf4_gemm(isa, quant::nf4_view(Wq), X.data(), X.rows(), Y.data(), mode);
  return Y;
}

template <class Isa>
void check_path(Isa isa) {
  INFO("path " << Isa::name);
  Generator gen(test::fresh_seed());
  // Partial blocks, rows not a multiple of 32 (portable fallback), blocks
  // spanning rows (blocksize > in), a single row, and a SIMD-sized shape.
  const Case cases[] = {{37, 96, 32}, {19, 100, 64}, {5, 33, 32}, {1, 64, 64},
                        {66, 512, 128}, {7, 160, 4096}, {3, 2, 32}, {40, 2048, 64}};
  for (const auto& c : cases) {
    const Matrix<float> W = random_matrix(gen, c.out, c.in, 0.05);
    const Nf4Tensor Wq = Nf4Tensor::quantize(W, {c.bs, false});
    const Matrix<float> Wd = Wq.dequantize<float>();
    for (Index T = 1; T <= 16; T += (c.in >= 2048 ? 5 : 1)) {
      INFO("W [" << c.out << " x " << c.in << "], blocksize " << c.bs << ", T " << T);
      Matrix<float> X = random_matrix(gen, T, c.in, 1.0);
      if (T > 1) X.row(1) *= 1e-3f;  // tokens of very different size
      const Reference ref = reference(Wd, X, Wq.absmax(), c.bs);
      const Matrix<float> ye = run(isa, Wq, X, quant::nf4_mode::exact);
      const Matrix<float> yf = run(isa, Wq, X, quant::nf4_mode::fast);
      const Matrix<float> yp = run(quant::isa::portable{}, Wq, X, quant::nf4_mode::fast);
      for (Index t = 0; t < T; ++t)
        for (Index i = 0; i < c.out; ++i) {
          INFO("token " << t << ", row " << i);
          const double tol = 1e-5 * ref.abs_wx(t, i) + 1e-30;  // float rounding of the dot
          REQUIRE(std::abs(ye(t, i) - ref.y(t, i)) <= tol);
          REQUIRE(std::abs(yf(t, i) - ref.y(t, i)) <= ref.fast_bound(t, i) + tol);
          // The same integer sums on every path: only the float summation differs.
          REQUIRE(std::abs(yf(t, i) - yp(t, i)) <= tol);
        }
    }
  }
}

}  // namespace

TEST_CASE("nf4 paths: every compiled path, both modes, against float64", "[quant][nf4]") {
  check_path(quant::isa::portable{});
#if defined(__AVX2__) && defined(__FMA__)
  check_path(quant::isa::avx2{});
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__)
  check_path(quant::isa::avx512{});
#endif
  check_path(quant::isa::native{});
}

TEST_CASE("nf4 paths: the fast mode's error is far below NF4's own", "[quant][nf4]") {
  // On Gaussian weights and activations: rms(fast − exact) against
  // rms(exact − unquantised), both on the outputs.
  Generator gen(test::fresh_seed());
  const Index out = 256, in = 1024, T = 4;
  const Matrix<float> W = random_matrix(gen, out, in, 0.02);
  const Matrix<float> X = random_matrix(gen, T, in, 1.0);
  const Nf4Tensor Wq = Nf4Tensor::quantize(W, {64, false});
  const Matrix<float> Wd = Wq.dequantize<float>();
  const Matrix<double> y_float = X.cast<double>() * W.cast<double>().transpose();
  const Matrix<double> y_nf4 = X.cast<double>() * Wd.cast<double>().transpose();
  const Matrix<float> yf = run(quant::isa::native{}, Wq, X, quant::nf4_mode::fast);
  const double nf4_err = (y_nf4 - y_float).norm();
  const double fast_err = (yf.cast<double>() - y_nf4).norm();
  INFO("NF4 error " << nf4_err << ", fast-mode error " << fast_err);
  CHECK(fast_err < 0.15 * nf4_err);  // about 0.09 on these shapes
  CHECK(fast_err > 0);  // it is an approximation: the check above can fail
}

TEST_CASE("nf4 paths: invalid arguments throw", "[quant][nf4]") {
  std::vector<std::uint8_t> packed(8);
  std::vector<float> absmax(1, 1.0f), x(16), y(1);
  quant::Nf4View v{packed.data(), absmax.data(), 1, 16, 48};
  CHECK_THROWS_AS(quant::nf4_gemm(quant::isa::native{}, v, x.data(), 1, y.data(), quant::nf4_mode::exact), error);
}
