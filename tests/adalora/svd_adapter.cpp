// SvdAdapter: ΔW, forward and backward against float64 loops and finite differences;
// pruning and conversion to a plain LoRA keep ΔW.
#include <lora/adalora/svd_adapter.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

namespace {
SvdAdapter<double> random_svd(Index in, Index out, Index r, double alpha, Generator& gen) {
  MatD E = random_matrix(r, 1, gen);
  return SvdAdapter<double>::from_factors(random_matrix(r, in, gen), E, random_matrix(out, r, gen), alpha);
}

// ΔW_oi = c·Σ_k B_ok·E_k·A_ki with c = alpha / (r + 1e-5), written as a plain loop.
MatD ref_delta(const SvdAdapter<double>& ad, double alpha) {
  const double c = alpha / (static_cast<double>(ad.rank()) + 1e-5);
  MatD d = MatD::Zero(ad.out_features(), ad.in_features());
  for (Index o = 0; o < d.rows(); ++o)
    for (Index i = 0; i < d.cols(); ++i) {
      double acc = 0;
      for (Index k = 0; k < ad.rank(); ++k) acc += ad.B()(o, k) * ad.E()(k) * ad.A()(k, i);
      d(o, i) = c * acc;
    }
  return d;
}

// L = Σ G ∘ (X·Wᵀ + forward(X)) for a fixed random G, so ∂L/∂Y = G.
double loss(const SvdAdapter<double>& ad, const MatD& W, const MatD& X, const MatD& G) {
  return (ad.apply(W, X).array() * G.array()).sum();
}
}  // namespace

TEST_CASE("SvdAdapter: delta_weight, forward and apply match float64 loops", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (auto [in, out, r, T] : {std::tuple{17, 9, 3, 5}, {64, 32, 6, 4}, {5, 7, 1, 2}}) {
    const double alpha = gen.uniform(0.5, 20.0);
    auto ad = random_svd(in, out, r, alpha, gen);
    CHECK(ad.scaling() == alpha);
    CHECK(ad.ranknum() == r);
    const MatD d = ref_delta(ad, alpha);
    CHECK(rel_error(ad.delta_weight(), d) < 1e-12);
    const MatD X = random_matrix(T, in, gen), W = random_matrix(out, in, gen);
    CHECK(rel_error(ad.forward(X), MatD(X * d.transpose())) < 1e-12);
    CHECK(rel_error(ad.apply(W, X), MatD(X * (W + d).transpose())) < 1e-12);
    CHECK(ad.trainable_parameters() == (in + out + 1) * r);
    MatD Wm = W;
    ad.merge(Wm);
    CHECK(rel_error(Wm, MatD(W + d)) < 1e-14);
    ad.unmerge(Wm);
    CHECK(rel_error(Wm, W) < 1e-13);
  }
  // alpha ≤ 0: PEFT scales by r instead.
  auto ad0 = random_svd(8, 8, 4, 0.0, gen);
  CHECK(ad0.scaling() == 4.0);
  // float: c is computed as PEFT does, alpha / (float(r) + 1e-5f).
  SvdAdapter<float> f(4, 4, 6, 8.0);
  CHECK(f.factor() == 8.0f / (6.0f + 1e-5f));
}

TEST_CASE("SvdAdapter: backward matches finite differences", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index in = 7, out = 5, r = 3, T = 4;
  auto ad = random_svd(in, out, r, 3.0, gen);
  const MatD W = random_matrix(out, in, gen), X = random_matrix(T, in, gen), G = random_matrix(T, out, gen);
  const auto g = ad.backward(W, X, G);
  const double h = 1e-6;
  auto fd = [&](auto&& poke) {
    auto p = ad, m = ad;
    poke(p, +h);
    poke(m, -h);
    return (loss(p, W, X, G) - loss(m, W, X, G)) / (2 * h);
  };
  for (Index k = 0; k < r; ++k) {
    for (Index i = 0; i < in; ++i)
      CHECK(g.dA(k, i) == Approx(fd([&](auto& a, double e) { a.A()(k, i) += e; })).epsilon(1e-6).margin(1e-8));
    CHECK(g.dE(k) == Approx(fd([&](auto& a, double e) { a.E()(k) += e; })).epsilon(1e-6).margin(1e-8));
    for (Index o = 0; o < out; ++o)
      CHECK(g.dB(o, k) == Approx(fd([&](auto& a, double e) { a.B()(o, k) += e; })).epsilon(1e-6).margin(1e-8));
  }
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < in; ++i) {
      MatD Xp = X, Xm = X;
      Xp(t, i) += h;
      Xm(t, i) -= h;
      CHECK(g.dX(t, i) == Approx((loss(ad, W, Xp, G) - loss(ad, W, Xm, G)) / (2 * h)).epsilon(1e-6).margin(1e-8));
    }
  // forward_train without dropout gives the same gradients
  SvdForwardCache<double> cache;
  const MatD y = ad.forward_train(X, gen, cache);
  CHECK(rel_error(y, ad.forward(X)) < 1e-14);
  CHECK(rel_error(ad.backward(cache, G).dA, ad.backward(X, G).dA) < 1e-14);
}

TEST_CASE("SvdAdapter: dropout in forward_train is undone consistently in backward", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  AdapterOptions o;
  o.dropout = 0.3;
  auto base = random_svd(9, 6, 3, 2.0, gen);
  auto ad = SvdAdapter<double>::from_factors(base.A(), base.E(), base.B(), 2.0, o);
  const MatD X = random_matrix(5, 9, gen), G = random_matrix(5, 6, gen);
  SvdForwardCache<double> cache;
  const MatD y = ad.forward_train(X, gen, cache);
  REQUIRE(cache.keep.size() == X.size());
  const MatD Xd = (X.array() * cache.keep.array()).matrix();
  CHECK(rel_error(y, ad.forward(Xd)) < 1e-13);
  const auto g = ad.backward(cache, G), gd = ad.backward(Xd, G);
  CHECK(rel_error(g.dA, gd.dA) < 1e-13);
  CHECK(rel_error(g.dX, MatD((gd.dX.array() * cache.keep.array()).matrix())) < 1e-13);
}

TEST_CASE("SvdAdapter: masking, pruning and conversion to a plain LoRA keep ΔW", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  auto ad = random_svd(12, 10, 6, 8.0, gen);
  const std::vector<bool> keep{true, false, true, true, false, false};
  ad.mask(keep);
  CHECK(ad.active() == keep);
  CHECK(ad.active_rank() == 3);
  const MatD d = ad.delta_weight();
  const auto p = ad.pruned();
  CHECK(p.rank() == 3);
  CHECK(p.ranknum() == 6.0);  // PEFT copies ranknum on resize: ΔW is unchanged
  CHECK(rel_error(p.delta_weight(), d) < 1e-14);
  const auto l = ad.to_lora();
  REQUIRE(l.has_value());
  CHECK(l->rank() == 3);
  CHECK(rel_error(l->delta_weight(), d) < 1e-14);
  const MatD X = random_matrix(3, 12, gen);
  CHECK(rel_error(l->forward(X), ad.forward(X)) < 1e-13);
  // all pruned: no LoRA left
  ad.mask(std::vector<bool>(6, false));
  CHECK_FALSE(ad.to_lora().has_value());
  CHECK(ad.pruned().rank() == 0);
  CHECK(ad.pruned().delta_weight().norm() == 0.0);
}

TEST_CASE("SvdAdapter: PEFT's reset_parameters and bad inputs", "[adalora]") {
  Generator gen(lora::test::fresh_seed());
  // 6 × 4000 draws of A: the sample sd's relative spread is 1/√(2n) = 0.46%, so the 5% band is
  // ~11σ (6 × 300 draws gave 3σ, a failure in about one run of 370).
  SvdAdapter<double> ad(4000, 200, 6, 8.0);
  ad.reset_parameters(gen);
  CHECK(ad.E().norm() == 0.0);
  const double sd = std::sqrt(ad.A().squaredNorm() / static_cast<double>(ad.A().size()));
  CHECK(sd == Approx(0.02).epsilon(0.05));
  CHECK_THROWS_WITH((SvdAdapter<double>(4, 4, -1, 1.0)), Catch::Matchers::ContainsSubstring("rank r must be at least 0"));
  CHECK_THROWS_WITH(SvdAdapter<double>::from_factors(MatD::Zero(3, 4), MatD::Zero(2, 1), MatD::Zero(5, 3), 1.0),
                    Catch::Matchers::ContainsSubstring("lora_E has shape [2 x 1], expected [3 x 1]"));
  CHECK_THROWS_WITH(ad.mask(std::vector<bool>(5, true)), Catch::Matchers::ContainsSubstring("expected one per singular value (6)"));
  CHECK_THROWS_WITH(ad.forward(MatD::Zero(2, 3)), Catch::Matchers::ContainsSubstring("input X has 3 columns, expected 4000"));
}
