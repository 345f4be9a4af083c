// AdamW against hand-computed steps and a float64 restatement; gradient clipping.
#include <lora/adalora/svd_adapter.hpp>
#include <lora/train/optim.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

TEST_CASE("AdamW: one step by hand", "[train]") {
  // θ = 1, g = 0.5, lr = 0.1, λ = 0.01, β = (0.9, 0.999), ε = 1e-8:
  // θ·(1 − 0.001) = 0.999; m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25;
  // θ = 0.999 − 0.1·0.5/(0.5 + 1e-8) = 0.899000002 (to 9 digits).
  Matrix<double> p(1, 1);
  p(0, 0) = 1.0;
  AdamW<double> opt({.lr = 0.1, .weight_decay = 0.01});
  const auto i = opt.add(p);
  Matrix<double> g(1, 1);
  g(0, 0) = 0.5;
  opt.update(i, g);
  CHECK(p(0, 0) == Approx(0.899000002).epsilon(1e-12));
  // Second step, same gradient: θ = 0.899000002·0.999; m = 0.095, v = 0.00049975;
  // m̂ = 0.095/0.19 = 0.5, v̂ = 0.00049975/0.001999 = 0.25 → same step of 0.1·0.5/(0.5+1e-8).
  opt.update(i, g);
  CHECK(p(0, 0) == Approx(0.899000002 * 0.999 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-12));
  CHECK(opt.steps(i) == 2);
}

TEST_CASE("AdamW matches a float64 restatement over many steps", "[train]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const AdamWOptions o{.lr = gen.uniform(1e-3, 1e-1), .beta1 = gen.uniform(0.5, 0.95), .beta2 = gen.uniform(0.9, 0.9999),
                       .eps = 1e-8, .weight_decay = gen.uniform(0.0, 0.1)};
  MatD P = random_matrix(4, 5, gen);
  Vector<double> e = random_matrix(3, 1, gen);
  AdamW<double> opt(o);
  const auto ip = opt.add(P), ie = opt.add(e, 0.5 * o.lr, 0.0);
  // reference: plain loops, textbook bias-corrected form
  MatD Pr = P, mP = MatD::Zero(4, 5), vP = mP;
  Vector<double> er = e, me = Vector<double>::Zero(3), ve = me;
  for (int t = 1; t <= 25; ++t) {
    const double factor = 1.0 - 0.03 * t;  // a schedule
    opt.set_lr_factor(factor);
    const MatD g = random_matrix(4, 5, gen);
    const Vector<double> ge = random_matrix(3, 1, gen);
    opt.update(ip, g);
    opt.update(ie, ge);
    auto ref = [&](double& th, double& m, double& v, double gr, double lr, double wd) {
      th -= lr * wd * th;
      m = o.beta1 * m + (1 - o.beta1) * gr;
      v = o.beta2 * v + (1 - o.beta2) * gr * gr;
      const double mh = m / (1 - std::pow(o.beta1, t)), vh = v / (1 - std::pow(o.beta2, t));
      th -= lr * mh / (std::sqrt(vh) + o.eps);
    };
    for (Index k = 0; k < Pr.size(); ++k)
      ref(Pr.data()[k], mP.data()[k], vP.data()[k], g.data()[k], o.lr * factor, o.weight_decay);
    for (Index k = 0; k < er.size(); ++k) ref(er(k), me(k), ve(k), ge(k), 0.5 * o.lr * factor, 0.0);
  }
  CHECK(rel_error(P, Pr) < 1e-12);
  CHECK(rel_error(e, er) < 1e-12);
}

TEST_CASE("AdamW works on adapter views and rejects bad shapes", "[train]") {
  Generator gen(lora::test::fresh_seed());
  auto ad = SvdAdapter<float>::from_factors(random_matrix<float>(3, 6, gen), random_matrix<float>(3, 1, gen),
                                            random_matrix<float>(4, 3, gen), 8.0);
  const Matrix<float> A0 = ad.A();
  AdamW<float> opt;
  const auto ia = opt.add(ad.A(), std::nullopt, std::nullopt, "lora_A");
  const auto ie = opt.add(ad.E());
  const Matrix<float> g = random_matrix<float>(3, 6, gen);
  opt.update(ia, g);
  // first step moves every element by ≈ lr·sign(g) (plus decay)
  for (Index k = 0; k < g.size(); ++k)
    CHECK(A0.data()[k] - ad.A().data()[k] == Approx(1e-3 * (g.data()[k] > 0 ? 1 : -1) + 1e-5 * A0.data()[k]).epsilon(1e-3));
  opt.update(ie, Vector<float>::Ones(3));
  CHECK_THROWS_WITH(opt.update(ia, Matrix<float>::Zero(6, 3)),
                    Catch::Matchers::ContainsSubstring("gradient for parameter 'lora_A' has shape [6 x 3], expected [3 x 6]"));
  CHECK_THROWS_WITH(opt.update(7, g), Catch::Matchers::ContainsSubstring("no parameter 7"));
  CHECK_THROWS_WITH(AdamW<float>({.beta2 = 1.0}), Catch::Matchers::ContainsSubstring("beta2 must be in [0, 1)"));
}

TEST_CASE("clip_grad_norm: torch's rule", "[train]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  MatD a = random_matrix(3, 4, gen);
  Vector<double> b = random_matrix(5, 1, gen);
  double want = 0;
  for (Index k = 0; k < a.size(); ++k) want += a.data()[k] * a.data()[k];
  for (Index k = 0; k < b.size(); ++k) want += b(k) * b(k);
  want = std::sqrt(want);
  const MatD a0 = a;
  const Vector<double> b0 = b;
  // above the limit: scaled by max/(N + 1e-6)
  const double n = clip_grad_norm(0.5, a, b);
  CHECK(n == Approx(want).epsilon(1e-14));
  CHECK(rel_error(a, MatD(a0 * (0.5 / (want + 1e-6)))) < 1e-14);
  CHECK(std::sqrt(a.squaredNorm() + b.squaredNorm()) == Approx(0.5).epsilon(1e-5));
  // below the limit: untouched
  const MatD a1 = a;
  clip_grad_norm(10.0, a, b);
  CHECK(a == a1);
  // over adapter gradient sets (dX not included)
  std::vector<SvdGradients<double>> gs(2);
  double sq = 0;
  for (auto& g : gs) {
    g.dA = random_matrix(2, 3, gen);
    g.dB = random_matrix(4, 2, gen);
    g.dE = random_matrix(2, 1, gen);
    g.dX = random_matrix(1, 3, gen, 100.0);
    sq += g.dA.squaredNorm() + g.dB.squaredNorm() + g.dE.squaredNorm();
  }
  const MatD dX0 = gs[0].dX;
  CHECK(clip_grad_norm(1.0, gs) == Approx(std::sqrt(sq)).epsilon(1e-14));
  double after = 0;
  for (auto& g : gs) after += g.dA.squaredNorm() + g.dB.squaredNorm() + g.dE.squaredNorm();
  CHECK(std::sqrt(after) == Approx(1.0).epsilon(1e-5));
  CHECK(gs[0].dX == dX0);
}
