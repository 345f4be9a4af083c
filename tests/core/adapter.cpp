#include <lora/core/adapter.hpp>
#include <lora/core/merge.hpp>
#include <lora/core/init.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

namespace {

struct Ref {  // float64 reference of the adapter maths, written out plainly
  MatD A, B;
  double s;
  MatD delta() const { return s * B * A; }
  MatD forward(const MatD& X) const {
    MatD Y = MatD::Zero(X.rows(), B.rows());
    for (Index t = 0; t < X.rows(); ++t)
      for (Index o = 0; o < B.rows(); ++o) {
        double acc = 0;
        for (Index k = 0; k < A.rows(); ++k) {
          double xa = 0;
          for (Index i = 0; i < A.cols(); ++i) xa += X(t, i) * A(k, i);
          acc += B(o, k) * xa;
        }
        Y(t, o) = s * acc;
      }
    return Y;
  }
};

template <class S>
LowRankAdapter<S> random_adapter(Index in, Index out, Index r, double alpha, Generator& gen, AdapterOptions o = {}) {
  return LowRankAdapter<S>::from_factors(random_matrix<S>(r, in, gen), random_matrix<S>(out, r, gen), alpha, o);
}

}  // namespace

TEMPLATE_TEST_CASE("forward, apply and delta_weight match a float64 reference", "[adapter]", float, double) {
  using S = TestType;
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (auto [in, out, r, T] : {std::tuple{17, 9, 3, 5}, {64, 176, 8, 7}, {33, 33, 33, 1}, {1, 1, 1, 1}}) {
    const double alpha = gen.uniform(0.5, 40.0);
    auto ad = random_adapter<S>(in, out, r, alpha, gen);
    Ref ref{ad.A().template cast<double>(), ad.B().template cast<double>(), alpha / r};
    MatD X = random_matrix(T, in, gen);
    MatD W = random_matrix(out, in, gen);
    REQUIRE(ad.scaling() == Approx(alpha / r).epsilon(1e-15));
    CHECK(rel_error(ad.delta_weight(), ref.delta()) < tol);
    CHECK(rel_error(ad.forward(X.cast<S>()), ref.forward(X.cast<S>().template cast<double>())) < tol);
    MatD Xs = X.cast<S>().template cast<double>(), Ws = W.cast<S>().template cast<double>();
    CHECK(rel_error(ad.apply(W.cast<S>(), X.cast<S>()), MatD(Xs * Ws.transpose() + ref.forward(Xs))) < tol);
    CHECK(ad.trainable_parameters() == (in + out) * r);
  }
}

TEST_CASE("fan_in_fan_out uses W as [in x out] and transposes the delta", "[adapter]") {
  Generator gen(lora::test::fresh_seed());
  AdapterOptions o;
  o.fan_in_fan_out = true;
  auto ad = random_adapter<double>(12, 20, 4, 8.0, gen, o);
  MatD W = random_matrix(12, 20, gen);  // Conv1D: [in x out]
  MatD X = random_matrix(6, 12, gen);
  MatD BA = ad.B() * ad.A();
  CHECK(rel_error(ad.delta_weight(), MatD(2.0 * BA.transpose())) < 1e-14);
  CHECK(rel_error(ad.apply(W, X), MatD(X * W + 2.0 * X * ad.A().transpose() * ad.B().transpose())) < 1e-13);
  MatD Wm = W;
  ad.merge(Wm);
  CHECK(rel_error(MatD(X * Wm), ad.apply(W, X)) < 1e-13);
  CHECK_THROWS_AS(ad.apply(MatD(20, 12), X), lora::error);
}

TEST_CASE("scaling policies for r = 1..256", "[scaling]") {
  Generator gen(lora::test::fresh_seed());
  for (int r = 1; r <= 256; r *= 2) {
    const double alpha = gen.uniform(1.0, 64.0);
    LowRankAdapter<double, cpu, standard_scaling> st(256, 256, r, alpha);
    LowRankAdapter<double, cpu, rslora_scaling> rs(256, 256, r, alpha);
    LowRankAdapter<double, cpu, dynamic_scaling> dyn(256, 256, r, alpha, {}, dynamic_scaling{true});
    CHECK(st.scaling() == Approx(alpha / r).epsilon(1e-15));
    CHECK(rs.scaling() == Approx(alpha / std::sqrt(double(r))).epsilon(1e-15));
    CHECK(dyn.scaling() == rs.scaling());
    // the delta weight follows the policy
    initialize(rs, init_method::random, gen);
    CHECK(rel_error(rs.delta_weight(), MatD(alpha / std::sqrt(double(r)) * rs.B() * rs.A())) < 1e-13);
  }
  // r = 3 and 7 are not powers of two
  CHECK(LowRankAdapter<double, cpu, rslora_scaling>(8, 8, 3, 6.0).scaling() == Approx(6.0 / std::sqrt(3.0)));
  CHECK(LowRankAdapter<double>(8, 8, 7, 14.0).scaling() == Approx(2.0));
}

namespace {
struct quarter_scaling {  // a user-defined rule: s = alpha / (4 r)
  static constexpr std::string_view name = "quarter";
  static double factor(double alpha, int r) { return alpha / (4.0 * r); }
};
struct not_a_policy {};
}  // namespace
static_assert(ScalingPolicy<quarter_scaling>);
static_assert(!ScalingPolicy<not_a_policy>);

TEST_CASE("a user-defined scaling policy plugs in", "[scaling]") {
  LowRankAdapter<double, cpu, quarter_scaling> ad(10, 10, 2, 16.0);
  CHECK(ad.scaling() == Approx(2.0));
}

TEST_CASE("set_alpha and rescale change the strength post hoc", "[adapter]") {
  Generator gen(lora::test::fresh_seed());
  auto ad = random_adapter<double>(30, 40, 5, 10.0, gen);
  MatD d0 = ad.delta_weight();
  ad.set_alpha(5.0);
  CHECK(rel_error(ad.delta_weight(), MatD(0.5 * d0)) < 1e-14);
  ad.rescale(3.0);
  CHECK(ad.scaling() == Approx(3.0 * 5.0 / 5));
  CHECK(rel_error(ad.delta_weight(), MatD(1.5 * d0)) < 1e-14);
  ad.rescale(0.5);
  CHECK(ad.multiplier() == Approx(1.5));
  CHECK_THROWS_AS(ad.set_alpha(std::nan("")), lora::error);
  CHECK_THROWS_AS(ad.rescale(INFINITY), lora::error);
}

namespace {
// Central differences of L = <G, Y(A, B, X)> in double.
template <class F>
MatD numeric_grad(MatD& param, F&& loss, double h = 1e-6) {
  MatD g(param.rows(), param.cols());
  for (Index i = 0; i < param.rows(); ++i)
    for (Index j = 0; j < param.cols(); ++j) {
      const double old = param(i, j);
      param(i, j) = old + h;
      const double lp = loss();
      param(i, j) = old - h;
      const double lm = loss();
      param(i, j) = old;
      g(i, j) = (lp - lm) / (2 * h);
    }
  return g;
}
}  // namespace

TEST_CASE("backward matches finite differences for A, B and X", "[adapter][gradient]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (bool fifo : {false, true}) {
    const Index in = 11, out = 7, r = 3, T = 4;
    MatD A = random_matrix(r, in, gen), B = random_matrix(out, r, gen), X = random_matrix(T, in, gen);
    MatD W = fifo ? random_matrix(in, out, gen) : random_matrix(out, in, gen);
    MatD G = random_matrix(T, out, gen);  // dL/dY for L = sum(G ⊙ Y)
    AdapterOptions o;
    o.fan_in_fan_out = fifo;
    auto loss = [&] {
      auto ad = LowRankAdapter<double>::from_factors(A, B, 6.0, o);
      return (ad.apply(W, X).array() * G.array()).sum();
    };
    auto ad = LowRankAdapter<double>::from_factors(A, B, 6.0, o);
    auto g = ad.backward(W, X, G);
    CHECK(rel_error(g.dA, numeric_grad(A, loss)) < 1e-7);
    CHECK(rel_error(g.dB, numeric_grad(B, loss)) < 1e-7);
    CHECK(rel_error(g.dX, numeric_grad(X, loss)) < 1e-7);
    // adapter-only path
    auto g2 = ad.backward(X, G);
    CHECK(rel_error(g2.dA, g.dA) < 1e-14);
    MatD dX_base = fifo ? MatD(G * W.transpose()) : MatD(G * W);
    CHECK(rel_error(MatD(g2.dX + dX_base), g.dX) < 1e-13);
  }
}

TEST_CASE("float backward agrees with the double one", "[adapter][gradient]") {
  Generator gen(lora::test::fresh_seed());
  auto ad = random_adapter<double>(64, 48, 8, 16.0, gen);
  auto adf = LowRankAdapter<float>::from_factors(ad.A().cast<float>(), ad.B().cast<float>(), 16.0);
  MatD X = random_matrix(9, 64, gen), W = random_matrix(48, 64, gen), G = random_matrix(9, 48, gen);
  auto gd = ad.backward(W, X, G);
  auto gf = adf.backward(W.cast<float>(), X.cast<float>(), G.cast<float>());
  CHECK(rel_error(gf.dA, gd.dA) < 1e-5);
  CHECK(rel_error(gf.dB, gd.dB) < 1e-5);
  CHECK(rel_error(gf.dX, gd.dX) < 1e-5);
}

TEST_CASE("dropout: identity in evaluation, seeded mask in training, gradients through the mask",
          "[adapter][dropout]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  AdapterOptions o;
  o.dropout = 0.25;
  auto ad = random_adapter<double>(50, 30, 4, 8.0, gen, o);
  MatD X = random_matrix(40, 50, gen), W = random_matrix(30, 50, gen);
  // evaluation mode ignores dropout
  auto ad0 = LowRankAdapter<double>::from_factors(ad.A(), ad.B(), 8.0);
  CHECK(rel_error(ad.forward(X), ad0.forward(X)) < 1e-15);

  Generator g1(seed + 1), g2(seed + 1);
  ForwardCache<double> c1, c2;
  MatD y1 = ad.forward_train(X, g1, c1);
  MatD y2 = ad.forward_train(X, g2, c2);
  CHECK(y1 == y2);  // same seed, same mask
  const double dropped = (c1.keep.array() == 0).cast<double>().mean();
  CHECK(dropped == Approx(0.25).margin(0.05));  // 2000 draws: 5 sigma is 0.05
  bool values_ok = true;
  for (Index i = 0; i < c1.keep.size(); ++i) {
    const double k = c1.keep.data()[i];
    values_ok = values_ok && (k == 0.0 || std::abs(k - 1 / 0.75) < 1e-15);
  }
  CHECK(values_ok);
  // forward_train is the adapter applied to the masked input
  MatD Xd = (X.array() * c1.keep.array()).matrix();
  CHECK(rel_error(y1, ad0.forward(Xd)) < 1e-14);

  // gradient w.r.t. X through the fixed mask, by finite differences
  MatD G = random_matrix(40, 30, gen);
  auto g = ad.backward(W, c1, G);
  MatD dX_ref = (ad0.backward(Xd, G).dX.array() * c1.keep.array()).matrix() + G * W;
  CHECK(rel_error(g.dX, dX_ref) < 1e-13);
  CHECK(rel_error(g.dA, ad0.backward(Xd, G).dA) < 1e-13);
  // apply_train = base + forward_train
  Generator g3(seed + 1);
  ForwardCache<double> c3;
  CHECK(rel_error(ad.apply_train(W, X, g3, c3), MatD(X * W.transpose() + y1)) < 1e-13);
}

TEMPLATE_TEST_CASE("merge then unmerge restores W within the documented bound", "[adapter][merge]", float, double) {
  using S = TestType;
  Generator gen(lora::test::fresh_seed());
  auto ad = random_adapter<S>(70, 45, 6, 12.0, gen);
  Matrix<S> W = random_matrix<S>(45, 70, gen);
  Matrix<S> W0 = W;
  MatD X = random_matrix(5, 70, gen);
  ad.merge(W);
  // merged weight gives the unmerged output
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-13;
  CHECK(rel_error(MatD(X.cast<S>().template cast<double>() * W.template cast<double>().transpose()),
                  ad.apply(W0, X.cast<S>())) < tol);
  ad.unmerge(W);
  const double eps = std::numeric_limits<S>::epsilon() / 2;
  Matrix<S> d = ad.delta_weight();
  const Eigen::Array<double, -1, -1> bound =
      2 * eps * (W0.template cast<double>().array().abs() + d.template cast<double>().array().abs());
  CHECK(((W.template cast<double>() - W0.template cast<double>()).array().abs() <= bound).all());
}

TEST_CASE("bfloat16 and half storage compute in float", "[adapter][bf16]") {
  Generator gen(lora::test::fresh_seed());
  auto ad = random_adapter<float>(64, 32, 8, 16.0, gen);
  auto ab = LowRankAdapter<bfloat16>::from_factors(ad.A().cast<bfloat16>(), ad.B().cast<bfloat16>(), 16.0);
  auto ah = LowRankAdapter<half>::from_factors(ad.A().cast<half>(), ad.B().cast<half>(), 16.0);
  Matrix<float> X = random_matrix<float>(6, 64, gen), W = random_matrix<float>(32, 64, gen);
  auto yf = ad.apply(W, X);
  auto yb = ab.apply(W.cast<bfloat16>(), X.cast<bfloat16>());
  auto yh = ah.apply(W.cast<half>(), X.cast<half>());
  static_assert(std::is_same_v<decltype(yb)::Scalar, float>);
  CHECK(rel_error(yb, yf) < 1e-2);
  CHECK(rel_error(yh, yf) < 2e-3);
  Matrix<bfloat16> Wb = W.cast<bfloat16>();
  ab.merge(Wb);
  CHECK(rel_error(Wb, MatD(W.cast<double>() + ad.delta_weight().cast<double>())) < 1e-2);
}

TEST_CASE("bad input raises lora::error with a clear message", "[adapter][errors]") {
  using Catch::Matchers::ContainsSubstring;
  CHECK_THROWS_WITH(LowRankAdapter<float>(64, 32, 0, 8.0), ContainsSubstring("rank r must be at least 1, got r = 0"));
  CHECK_THROWS_WITH(LowRankAdapter<float>(64, 32, 33, 8.0),
                    ContainsSubstring("rank r = 33 exceeds min(in_features, out_features) = min(64, 32) = 32"));
  CHECK_THROWS_WITH(LowRankAdapter<float>(64, 32, 4, std::nan("")), ContainsSubstring("lora_alpha must be finite"));
  CHECK_THROWS_WITH(LowRankAdapter<float>(64, 32, 4, INFINITY), ContainsSubstring("lora_alpha must be finite"));
  CHECK_THROWS_AS(LowRankAdapter<float>(0, 32, 1, 8.0), lora::error);
  AdapterOptions o;
  o.name = "model.layers.0.self_attn.q_proj";
  LowRankAdapter<float> ad(64, 32, 4, 8.0, o);
  CHECK_THROWS_WITH(ad.forward(Matrix<float>::Ones(3, 63)),
                    ContainsSubstring("adapter 'model.layers.0.self_attn.q_proj': input X has 63 columns, expected 64"));
  CHECK_THROWS_WITH(ad.apply(Matrix<float>::Ones(64, 32), Matrix<float>::Ones(3, 64)),
                    ContainsSubstring("base weight W has shape [64 x 32], expected [32 x 64]"));
  CHECK_THROWS_WITH(ad.set_A(Matrix<float>::Ones(5, 64)), ContainsSubstring("lora_A has shape [5 x 64], expected [4 x 64]"));
  CHECK_THROWS_AS(ad.set_B(Matrix<float>::Ones(32, 5)), lora::error);
  Matrix<float> W = Matrix<float>::Ones(31, 64);
  CHECK_THROWS_AS(ad.merge(W), lora::error);
  CHECK_THROWS_AS(ad.backward(Matrix<float>::Ones(3, 64), Matrix<float>::Ones(3, 31)), lora::error);
  CHECK_THROWS_WITH((LowRankAdapter<float>::from_factors(Matrix<float>::Ones(4, 64), Matrix<float>::Ones(32, 3), 8.0)),
                    ContainsSubstring("lora_A has 4 rows and lora_B has 3 columns"));
  CHECK_THROWS_AS(ad.set_dropout(1.0), lora::error);
  lora::error e("x");
  const std::runtime_error& base = e;  // lora::error is a std::runtime_error
  CHECK(std::string(base.what()) == "x");
}

TEMPLATE_TEST_CASE("the row-block merge routine matches float64 and does not depend on the block",
                   "[merge][blocks]", float, double) {
  using C = TestType;
  Generator gen(lora::test::fresh_seed());
  for (auto [rows, cols, r] : {std::tuple<Index, Index, Index>{19, 45, 3}, {8, 64, 16}, {5, 7, 1}, {33, 70, 9}}) {
    const Matrix<C> W = random_matrix<C>(rows, cols, gen), coef = random_matrix<C>(rows, r, gen),
                    basis = random_matrix<C>(r, cols, gen);
    const C s = C(0.75);
    const MatD want = W.template cast<double>() + 0.75 * coef.template cast<double>() * basis.template cast<double>();
    // the whole weight at once, and every row alone at the block's last position
    Matrix<C> V = W;
    low_rank_update<C>(V, coef, basis, s);
    const double tol = std::is_same_v<C, float> ? 1e-5 : 1e-13;
    CHECK(rel_error(V, want) < tol);
    for (Index i = 0; i < rows; ++i) {
      Matrix<C> one = W.row(i);
      low_rank_update_rows<C>(coef.data() + i * r, basis.data(), r, cols, s, one.data(), cols, 1);
      CHECK(bool(one == V.row(i)));  // bits: the same row gives the same result in any block
    }
    // unmerge with -s undoes it within rounding
    low_rank_update<C>(V, coef, basis, -s);
    CHECK(rel_error(V, W.template cast<double>()) < tol);
    // DoRA's rescale: rows get norm m_i
    const Vector<C> m = random_matrix<C>(rows, 1, gen).cwiseAbs();
    Matrix<C> D = W;
    dora_rescale_rows<C>(D, m.data());
    CHECK(rel_error(D.template cast<double>().rowwise().norm(), m.template cast<double>()) < tol);
    Vector<C> n = W.rowwise().norm();
    dora_unscale_rows<C>(D, n.data(), m.data());
    CHECK(rel_error(D, W.template cast<double>()) < tol);
  }
}

TEST_CASE("AdapterSpec carries the checks and messages of every adapter class", "[adapter][spec]") {
  using Catch::Matchers::ContainsSubstring;
  AdapterOptions o;
  o.name = "q_proj";
  const AdapterSpec spec{64, 32, 8, 16.0, o};
  CHECK(spec.who() == "adapter 'q_proj': ");
  CHECK(spec.label() == "adapter 'q_proj'");
  CHECK(AdapterSpec{}.who().empty());
  CHECK(spec.factor(standard_scaling{}) == 2.0);
  CHECK(spec.factor(rslora_scaling{}) == 16.0 / std::sqrt(8.0));
  CHECK_NOTHROW(spec.validate());
  CHECK_THROWS_WITH(spec.check_weight(64, 32), ContainsSubstring("adapter 'q_proj': base weight W has shape [64 x 32], expected [32 x 64]"));
  CHECK_THROWS_WITH((AdapterSpec{64, 32, 40, 1.0, o}.validate()), ContainsSubstring("rank r = 40 exceeds"));
  CHECK_NOTHROW((AdapterSpec{64, 32, 40, 1.0, o}.validate(0, /*bounded=*/false)));
  CHECK_THROWS_WITH((AdapterSpec{64, 32, -1, 1.0, o}.validate(0, false)), ContainsSubstring("rank r must be at least 0"));
  // the adapter classes report through it
  auto ad = LowRankAdapter<float>::from_factors(Matrix<float>::Ones(8, 64), Matrix<float>::Ones(32, 8), 16.0, o);
  CHECK(ad.spec().rank == 8);
  CHECK(ad.scaling() == spec.factor(standard_scaling{}));
  CHECK_THROWS_WITH(ad.apply(Matrix<float>::Zero(64, 32), Matrix<float>::Zero(2, 64)),
                    ContainsSubstring("adapter 'q_proj': base weight W has shape [64 x 32]"));
}
