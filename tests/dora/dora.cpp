// lora/dora/dora.hpp against PEFT's DoRA fixtures (layer outputs and merged weights),
// finite differences (weight norm held constant; also in training mode, with dropout), and
// merge/unmerge round trips;
// lora/dora/module_adapter.hpp (LoRA or DoRA by the data) against both classes and float64.
#include <lora/dora/dora.hpp>
#include <lora/dora/module_adapter.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::MatD;
using lora::test::rel_error;

namespace {

using DoraD = DoraAdapter<double>;

DoraD random_dora(Index in, Index out, Index r, double alpha, Generator& gen, bool fifo = false) {
  AdapterOptions o;
  o.fan_in_fan_out = fifo;
  o.name = "test";
  auto lora = LowRankAdapter<double>::from_factors(lora::test::random_matrix(r, in, gen, 0.5),
                                                   lora::test::random_matrix(out, r, gen, 0.5), alpha, o);
  Vector<double> m(out);
  for (Index i = 0; i < out; ++i) m(i) = 0.5 + gen.uniform();
  return DoraD(std::move(lora), m);
}

/// Float64 reference of the forward with a given (frozen) norm n0.
MatD reference_forward(const MatD& W, const MatD& A, const MatD& B, const Vector<double>& m, double s, const MatD& X,
                       const Vector<double>& n0) {
  const MatD V = W + s * B * A;
  return (X * V.transpose()) * m.cwiseQuotient(n0).asDiagonal();
}
/// Central differences (step 1e-6) of loss() with respect to every element of param, which
/// loss() reads.
template <class P, class F>
P fd(P& param, F loss) {
  const double h = 1e-6;
  P grad(param.rows(), param.cols());
  for (Index i = 0; i < param.size(); ++i) {
    const double keep = param.data()[i];
    param.data()[i] = keep + h;
    const double lp = loss();
    param.data()[i] = keep - h;
    const double lm = loss();
    param.data()[i] = keep;
    grad.data()[i] = (lp - lm) / (2 * h);
  }
  return grad;
}
}  // namespace

TEST_CASE("DoRA reproduces PEFT's layer outputs and merged weights", "[dora]") {
  const auto ad = io::load_peft_adapter(data("peft/dora_r4_a8_qv/adapter"));
  const auto base = io::SafetensorsFile::open(data("peft/dora_r4_a8_qv/base/model.safetensors"));
  const auto merged = io::SafetensorsFile::open(data("peft/dora_r4_a8_qv/merged.safetensors"));
  const auto ref = io::SafetensorsFile::open(data("peft/dora_r4_a8_qv/reference.safetensors"));
  int n = 0;
  for (const auto& mod : ad.modules) {
    INFO(mod.name);
    REQUIRE(mod.is_dora());
    const DoraAdapter<float, cpu, dynamic_scaling>& dora = mod.dora();
    Matrix<float> W = base.tensor(mod.name + ".weight").to_matrix<float>();
    const auto x = ref.tensor(mod.name + ".x").to_matrix<float>();
    const auto y = ref.tensor(mod.name + ".y").to_matrix<float>();
    const auto want = merged.tensor(mod.name + ".weight").to_matrix<float>();
    CHECK(rel_error(dora.apply(W, x), y) < 1e-5);
    CHECK(rel_error(dora.merged_weight(W), want) < 1e-6);
    // also in double
    DoraAdapter<double, cpu, dynamic_scaling> dd(
        LowRankAdapter<double, cpu, dynamic_scaling>::from_factors(
            mod.adapter.A().cast<double>(), mod.adapter.B().cast<double>(), mod.adapter.alpha(), {}, mod.adapter.policy()),
        mod.adapter.magnitude().cast<double>());
    CHECK(rel_error(dd.apply(W.cast<double>(), x.cast<double>()), y) < 1e-5);
    Matrix<float> W0 = W;
    const auto norm = dora.merge(W);
    CHECK(rel_error(W, want) < 1e-6);
    // merged layer alone gives y
    CHECK(rel_error(x * W.transpose(), y) < 1e-5);
    dora.unmerge(W, norm);
    CHECK(rel_error(W, W0) < 1e-6);
    ++n;
  }
  // q, v and down of every layer of the base
  CHECK(n == lora::test::peft_case_modules("dora_r4_a8_qv"));
  io::PeftModule plain{"model.layers.0.q_proj", LowRankAdapter<float, cpu, dynamic_scaling>(8, 8, 2, 4.0)};
  CHECK_THROWS_WITH(plain.dora(), Catch::Matchers::ContainsSubstring("not a DoRA module"));
}

TEST_CASE("DoRA backward matches finite differences with the norm held constant", "[dora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (bool fifo : {false, true}) {
    INFO("fan_in_fan_out " << fifo);
    const Index in = 7, out = 5, r = 3, T = 4;
    auto dora = random_dora(in, out, r, 6.0, gen, fifo);
    const MatD Wo = lora::test::random_matrix(out, in, gen);  // [out × in]
    const MatD W = fifo ? MatD(Wo.transpose()) : Wo;
    const MatD X = lora::test::random_matrix(T, in, gen);
    const MatD dY = lora::test::random_matrix(T, out, gen);
    const double s = dora.lora().scaling();
    const MatD A = dora.lora().A(), B = dora.lora().B();
    const Vector<double> m = dora.magnitude();
    const Vector<double> n0 = (Wo + s * B * A).rowwise().norm();

    // forward against the plain formula: up to few_tokens tokens (X·Wᵀ from the norm pass's rows
    // of W) and more (one product)
    CHECK(rel_error(dora.apply(W, X), reference_forward(Wo, A, B, m, s, X, n0)) < 1e-13);
    const MatD X2 = lora::test::random_matrix(LowRankAdapter<double>::few_tokens + 5, in, gen);
    CHECK(rel_error(dora.apply(W, X2), reference_forward(Wo, A, B, m, s, X2, n0)) < 1e-13);
    CHECK(rel_error(dora.weight_norm(W), n0) < 1e-14);

    auto loss = [&](const MatD& a, const MatD& b, const Vector<double>& mm, const MatD& x) {
      return (dY.array() * reference_forward(Wo, a, b, mm, s, x, n0).array()).sum();
    };
    const auto g = dora.backward(W, X, dY);
    MatD a = A, b = B, x = X;
    Vector<double> mm = m;
    const MatD fdA = fd(a, [&] { return loss(a, B, m, X); });
    const MatD fdB = fd(b, [&] { return loss(A, b, m, X); });
    const Vector<double> fdm = fd(mm, [&] { return loss(A, B, mm, X); });
    const MatD fdX = fd(x, [&] { return loss(A, B, m, x); });
    CHECK(rel_error(g.dA, fdA) < 1e-7);
    CHECK(rel_error(g.dB, fdB) < 1e-7);
    CHECK(rel_error(g.dm, fdm) < 1e-7);
    CHECK(rel_error(g.dX, fdX) < 1e-7);
    CHECK(g.dA.norm() > 0);
    CHECK(g.dm.norm() > 0);
  }
}

TEST_CASE("DoRA training mode: PEFT's forward with lora_dropout, its backward against finite differences",
          "[dora]") {
  // PEFT (LoraLayer.forward, DoraLinearLayer.forward): with dropout the base layer sees X and the
  // DoRA term X̃ = drop(X): Y = X·Wᵀ + (c − 1) ⊙ (X̃·Wᵀ) + c ⊙ s·(X̃·Aᵀ)·Bᵀ, c = m ⊘ n (n detached).
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (bool fifo : {false, true}) {
    for (double p : {0.0, 0.4}) {
      INFO("fan_in_fan_out " << fifo << " dropout " << p);
      const Index in = 8, out = 6, r = 3, T = 5;
      auto dora = random_dora(in, out, r, 6.0, gen, fifo);
      dora.lora().set_dropout(p);
      const MatD Wo = lora::test::random_matrix(out, in, gen);  // [out × in]
      const MatD W = fifo ? MatD(Wo.transpose()) : Wo;
      const MatD X = lora::test::random_matrix(T, in, gen);
      const MatD dY = lora::test::random_matrix(T, out, gen);
      const double s = dora.lora().scaling();
      const MatD A = dora.lora().A(), B = dora.lora().B();
      const Vector<double> m = dora.magnitude();
      const Vector<double> n0 = (Wo + s * B * A).rowwise().norm();

      const std::uint64_t draw = gen.next();
      Generator g1(draw);
      DoraForwardCache<double> cache;
      const MatD Y = dora.apply_train(W, X, g1, cache);
      // the dropout multipliers: LoRA's forward_train's, from the same generator state
      ForwardCache<double> lc;
      Generator g2(draw);
      (void)dora.lora().forward_train(X, g2, lc);
      CHECK(cache.lora.keep.size() == lc.keep.size());
      CHECK(rel_error(cache.lora.x, lc.x) == 0.0);
      MatD K = MatD::Ones(T, in);
      if (p > 0) {
        K = cache.lora.keep;
        Index dropped = 0;
        for (Index i = 0; i < K.size(); ++i) {
          CHECK((K.data()[i] == 0.0 || std::abs(K.data()[i] - 1.0 / (1.0 - p)) < 1e-15));
          dropped += K.data()[i] == 0.0;
        }
        CHECK(dropped > 0);
        CHECK(dropped < K.size());
      } else {
        CHECK(cache.lora.keep.size() == 0);
      }
      CHECK(rel_error(cache.norm, n0) < 1e-14);

      auto forward = [&](const MatD& a, const MatD& b, const Vector<double>& mm, const MatD& x) {
        const MatD xd = x.cwiseProduct(K);
        const Vector<double> c = mm.cwiseQuotient(n0);
        const MatD lo = s * (xd * a.transpose()) * b.transpose();
        return MatD(x * Wo.transpose() + (xd * Wo.transpose()) * (c.array() - 1.0).matrix().asDiagonal() +
                    lo * c.asDiagonal());
      };
      CHECK(rel_error(Y, forward(A, B, m, X)) < 1e-13);
      if (p == 0) CHECK(rel_error(Y, dora.apply(W, X)) < 1e-14);

      auto loss = [&](const MatD& a, const MatD& b, const Vector<double>& mm, const MatD& x) {
        return (dY.array() * forward(a, b, mm, x).array()).sum();
      };
      const auto g = dora.backward(W, cache, dY);
      MatD a = A, b = B, x = X;
      Vector<double> mm = m;
      CHECK(rel_error(g.dA, fd(a, [&] { return loss(a, B, m, X); })) < 1e-7);
      CHECK(rel_error(g.dB, fd(b, [&] { return loss(A, b, m, X); })) < 1e-7);
      CHECK(rel_error(g.dm, fd(mm, [&] { return loss(A, B, mm, X); })) < 1e-7);
      CHECK(rel_error(g.dX, fd(x, [&] { return loss(A, B, m, x); })) < 1e-7);
      CHECK(g.dA.norm() > 0);
      CHECK(g.dm.norm() > 0);
      if (p == 0) {  // evaluation mode's gradients
        const auto ge = dora.backward(W, X, dY);
        CHECK(rel_error(g.dA, ge.dA) < 1e-13);
        CHECK(rel_error(g.dB, ge.dB) < 1e-13);
        CHECK(rel_error(g.dm, ge.dm) < 1e-13);
        CHECK(rel_error(g.dX, ge.dX) < 1e-13);
      }

      // ModuleAdapter: DoRA's and LoRA's training modes, each class's
      const ModuleAdapter<double> mod_dora(dora), mod_lora(dora.lora());
      DoraForwardCache<double> cm, cl;
      Generator g3(draw), g4(draw), g5(draw);
      CHECK(rel_error(mod_dora.apply_train(W, X, g3, cm), Y) == 0.0);
      const auto gm = mod_dora.backward(W, cm, dY);
      CHECK(rel_error(gm.dm, g.dm) == 0.0);
      CHECK(rel_error(gm.dX, g.dX) == 0.0);
      ForwardCache<double> lc2;
      CHECK(rel_error(mod_lora.apply_train(W, X, g4, cl), dora.lora().apply_train(W, X, g5, lc2)) == 0.0);
      CHECK(cl.xv.size() == 0);
      const auto gl = mod_lora.backward(W, cl, dY);
      CHECK(gl.dm.size() == 0);
      CHECK(rel_error(gl.dX, dora.lora().backward(W, lc2, dY).dX) == 0.0);

      // a cache that apply_train did not fill for this adapter is refused, naming the adapter
      DoraForwardCache<double> bad = cache;
      bad.norm.resize(0);
      CHECK_THROWS_WITH(dora.backward(W, bad, dY),
                        Catch::Matchers::ContainsSubstring("adapter 'test': DoRA backward: the cache holds 0 norms"));
      CHECK_THROWS_AS(dora.backward(W, cache, MatD(dY.topRows(T - 1))), lora::error);
    }
  }
}

TEST_CASE("DoRA in float on a layer large enough for several threads matches float64", "[dora]") {
  // weight_norm and apply run blocks of rows of W + s·B·A over OpenMP threads from 2^16 weights on
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (bool fifo : {false, true}) {
    INFO("fan_in_fan_out " << fifo);
    const Index in = 260, out = 301, r = 8;
    const DoraD d = random_dora(in, out, r, 16.0, gen, fifo);
    AdapterOptions o;
    o.fan_in_fan_out = fifo;
    const DoraAdapter<float> f(LowRankAdapter<float>::from_factors(d.lora().A().cast<float>(),
                                                                   d.lora().B().cast<float>(), 16.0, o),
                               d.magnitude().cast<float>());
    const MatD Wo = lora::test::random_matrix(out, in, gen, 0.1);
    const Matrix<float> Wf = (fifo ? MatD(Wo.transpose()) : Wo).cast<float>();
    const MatD Wd = fifo ? MatD(Wf.cast<double>().transpose()) : MatD(Wf.cast<double>());
    const MatD A = f.lora().A().cast<double>(), B = f.lora().B().cast<double>();
    const double s = f.lora().scaling();
    const Vector<double> n0 = (Wd + s * B * A).rowwise().norm();
    CHECK(rel_error(f.weight_norm(Wf), n0) < 1e-6);
    for (Index T : {Index(3), Index(40)}) {
      const Matrix<float> X = lora::test::random_matrix<float>(T, in, gen);
      CHECK(rel_error(f.apply(Wf, X), reference_forward(Wd, A, B, f.magnitude().cast<double>(), s,
                                                        X.cast<double>(), n0)) < 1e-5);
    }
  }
}

TEST_CASE("DoRA merge/unmerge, initialisation and fan_in_fan_out agree", "[dora]") {
  Generator gen(lora::test::fresh_seed());
  const Index in = 12, out = 9, r = 4, T = 6;
  auto dora = random_dora(in, out, r, 8.0, gen);
  const MatD W = lora::test::random_matrix(out, in, gen);
  const MatD X = lora::test::random_matrix(T, in, gen);
  MatD Wm = W;
  const auto n = dora.merge(Wm);
  CHECK(rel_error(X * Wm.transpose(), dora.apply(W, X)) < 1e-13);
  CHECK(rel_error(Wm, dora.merged_weight(W)) < 1e-15);
  // the merged rows have the magnitude as their norm
  CHECK(rel_error(Wm.rowwise().norm(), dora.magnitude()) < 1e-13);
  dora.unmerge(Wm, n);
  CHECK(rel_error(Wm, W) < 1e-13);

  // initialised from W, DoRA equals plain LoRA
  auto init = DoraD::from_weight(dora.lora(), W);
  CHECK(rel_error(init.apply(W, X), dora.lora().apply(W, X)) < 1e-13);

  // the same layer with W stored transposed
  AdapterOptions o;
  o.fan_in_fan_out = true;
  DoraD t(LowRankAdapter<double>::from_factors(dora.lora().A(), dora.lora().B(), 8.0, o), dora.magnitude());
  const MatD Wt = W.transpose();
  CHECK(rel_error(t.apply(Wt, X), dora.apply(W, X)) < 1e-13);
  MatD Wtm = Wt;
  t.merge(Wtm);
  CHECK(rel_error(Wtm.transpose(), dora.merged_weight(W)) < 1e-14);

  // shapes are checked
  CHECK_THROWS_AS(dora.apply(Wt, X), lora::error);
  CHECK_THROWS_AS(DoraD(dora.lora(), Vector<double>::Ones(out + 1)), lora::error);
  CHECK_THROWS_AS(dora.unmerge(Wm, Vector<double>::Ones(3)), lora::error);
}

TEST_CASE("ModuleAdapter is DoRA with a magnitude and LoRA without: the same members, each class's math", "[dora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  using ModD = ModuleAdapter<double>;
  for (bool fifo : {false, true}) {
    INFO("fan_in_fan_out " << fifo);
    const Index in = 9, out = 6, r = 3, T = 5;
    const DoraD d = random_dora(in, out, r, 5.0, gen, fifo);
    const MatD Wo = lora::test::random_matrix(out, in, gen);
    const MatD W = fifo ? MatD(Wo.transpose()) : Wo;
    const MatD X = lora::test::random_matrix(T, in, gen);
    const MatD dY = lora::test::random_matrix(T, out, gen);
    const double s = d.lora().scaling();
    const MatD A = d.lora().A(), B = d.lora().B();
    const MatD V = Wo + s * B * A;  // float64 reference, [out × in]
    const Vector<double> n0 = V.rowwise().norm();

    const ModD dora(d.lora(), std::optional<Vector<double>>(d.magnitude()));
    const ModD plain = d.lora();
    REQUIRE(dora.is_dora());
    REQUIRE_FALSE(plain.is_dora());
    CHECK(dora.trainable_parameters() == (in + out) * r + out);
    CHECK(plain.trainable_parameters() == (in + out) * r);
    CHECK(dora.rank() == r);
    CHECK(dora.scaling() == s);
    CHECK(rel_error(dora.magnitude(), d.magnitude()) == 0.0);

    // forward: DoRA's (m/n) ⊙ (X·Vᵀ), LoRA's X·Vᵀ
    CHECK(rel_error(dora.apply(W, X), reference_forward(Wo, A, B, d.magnitude(), s, X, n0)) < 1e-13);
    CHECK(rel_error(plain.apply(W, X), MatD(X * V.transpose())) < 1e-13);
    // backward: each class's gradients; LoRA has no dm
    const auto gd = dora.backward(W, X, dY);
    const auto gw = d.backward(W, X, dY);
    CHECK(rel_error(gd.dA, gw.dA) == 0.0);
    CHECK(rel_error(gd.dm, gw.dm) == 0.0);
    const auto gl = plain.backward(W, X, dY);
    const auto gr = d.lora().backward(W, X, dY);
    CHECK(gl.dm.size() == 0);
    CHECK(rel_error(gl.dA, gr.dA) == 0.0);
    CHECK(rel_error(gl.dB, gr.dB) == 0.0);
    CHECK(rel_error(gl.dX, gr.dX) == 0.0);
    // merge: DoRA returns n and rescales rows; LoRA returns nothing
    MatD Wd = W, Wl = W;
    const Vector<double> n = dora.merge(Wd);
    CHECK(rel_error(n, n0) < 1e-14);
    const MatD want_d = d.magnitude().cwiseQuotient(n0).asDiagonal() * V;
    CHECK(rel_error(fifo ? MatD(Wd.transpose()) : Wd, want_d) < 1e-14);
    CHECK(rel_error(Wd, dora.merged_weight(W)) < 1e-14);
    const Vector<double> none = plain.merge(Wl);
    CHECK(none.size() == 0);
    CHECK(rel_error(fifo ? MatD(Wl.transpose()) : Wl, V) < 1e-14);
    CHECK(rel_error(Wl, plain.merged_weight(W)) < 1e-14);
    dora.unmerge(Wd, n);
    plain.unmerge(Wl, none);
    CHECK(rel_error(Wd, W) < 1e-13);
    CHECK(rel_error(Wl, W) < 1e-13);

    // with_lora keeps the kind; errors name the adapter
    const auto other = LowRankAdapter<double>::from_factors(lora::test::random_matrix(r, in, gen),
                                                            lora::test::random_matrix(out, r, gen), 2.0);
    CHECK(dora.with_lora(other).is_dora());
    CHECK(rel_error(dora.with_lora(other).magnitude(), d.magnitude()) == 0.0);
    CHECK_FALSE(plain.with_lora(other).is_dora());
    CHECK_THROWS_WITH(plain.dora(), Catch::Matchers::ContainsSubstring("adapter 'test': not a DoRA adapter"));
    CHECK_THROWS_WITH(plain.unmerge(Wl, n0),
                      Catch::Matchers::ContainsSubstring("adapter 'test': LoRA unmerge takes no weight norms"));
    CHECK_THROWS_WITH(ModD(d.lora(), std::optional<Vector<double>>(Vector<double>::Ones(out + 1))),
                      Catch::Matchers::ContainsSubstring("magnitude has 7 elements, expected out_features = 6"));
  }
}
