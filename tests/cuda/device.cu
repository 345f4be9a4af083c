// One test body per concept, run on lora::cpu and on lora::cuda: the same calls (from_host,
// apply, forward, backward, merge, unmerge, dequantize, …) on LowRankAdapter, DoraAdapter,
// ModuleAdapter, quant::Nf4Tensor, QLoraLinear and multi::AdapterSet, checked against one
// float64 reference. Only the moves differ (test::on<D> puts a host matrix where the device takes it,
// test::host brings a result back). Device outputs are fresh allocations, written in full
// by the call under test.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

using namespace lora;
using lora::test::column;
using lora::test::d;
using lora::test::host;
using lora::test::MatD;
using lora::test::on;
using lora::test::rand_s;

namespace {
using S = float;
constexpr double tolerance = 1e-5;  // float on both devices against float64

LowRankAdapter<S> random_adapter(Index in, Index out, Index r, double alpha, Generator& g) {
  LowRankAdapter<S> a(in, out, r, alpha);
  a.set_A(rand_s<S>(r, in, g, 0.2));
  a.set_B(rand_s<S>(out, r, g, 0.2));
  return a;
}
}  // namespace

TEMPLATE_TEST_CASE("device: LowRankAdapter and DoraAdapter, one body on the CPU and the GPU", "[cuda][device]",
                   lora::cpu, lora::cuda) {
  using D = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 96, out = 80, r = 8, T = 7;
  const LowRankAdapter<S> h = random_adapter(in, out, r, 16.0, g);
  const Matrix<S> Wh = rand_s<S>(out, in, g, 0.2), Xh = rand_s<S>(T, in, g), dYh = rand_s<S>(T, out, g);
  const double s = h.scaling();
  const MatD A = d(h.A()), B = d(h.B()), W = d(Wh), X = d(Xh), dY = d(dYh);
  const auto dW = on<D>(Wh);
  const auto dX = on<D>(Xh);
  const auto ddY = on<D>(dYh);

  // LoRA: Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ, its gradients, W ± s·B·A.
  const auto ad = LowRankAdapter<S, D>::from_host(h);
  CHECK(lora::test::rel_error(host(ad.apply(dW, dX)), MatD(X * W.transpose() + s * X * A.transpose() * B.transpose())) <
        tolerance);
  CHECK(lora::test::rel_error(host(ad.forward(dX)), MatD(s * X * A.transpose() * B.transpose())) < tolerance);
  {
    const auto gr = ad.backward(dW, dX, ddY);
    CHECK(lora::test::rel_error(host(gr.dA), MatD(s * (dY * B).transpose() * X)) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dB), MatD(s * dY.transpose() * (X * A.transpose()))) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dX), MatD(dY * W + s * dY * B * A)) < tolerance);
    auto Wm = on<D>(Wh);
    ad.merge(Wm);
    CHECK(lora::test::rel_error(host(Wm), MatD(W + s * B * A)) < tolerance);
    ad.unmerge(Wm);
    CHECK(lora::test::rel_error(host(Wm), W) < tolerance);
    CHECK(lora::test::rel_error(d(ad.to_host().A()), A) == 0.0);
  }

  // DoRA: Y = (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ), n = ‖W + s·B·A‖_row, detached in backward.
  Vector<float> mh(out);
  for (Index i = 0; i < out; ++i) mh[i] = static_cast<float>(g.uniform(0.5, 2.0));
  const DoraAdapter<S> hd(h, mh);
  const auto dora = DoraAdapter<S, D>::from_host(hd);
  const MatD V = W + s * B * A;
  const Vector<double> n = V.rowwise().norm(), m = mh.cast<double>();
  const Vector<double> c = m.cwiseQuotient(n);
  const MatD Z = X * V.transpose();
  CHECK(lora::test::rel_error(column(host(dora.weight_norm(dW))), MatD(n)) < tolerance);
  CHECK(lora::test::rel_error(host(dora.apply(dW, dX)), MatD(Z * c.asDiagonal())) < tolerance);
  {
    const auto gr = dora.backward(dW, dX, ddY);
    const MatD G = dY * c.asDiagonal();
    CHECK(lora::test::rel_error(host(gr.dA), MatD(s * (G * B).transpose() * X)) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dB), MatD(s * G.transpose() * (X * A.transpose()))) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dX), MatD(G * V)) < tolerance);
    const Vector<double> dm = (dY.cwiseProduct(Z)).colwise().sum().transpose().cwiseQuotient(n);
    CHECK(lora::test::rel_error(column(host(gr.dm)), MatD(dm)) < tolerance);
  }
  {
    const MatD merged = c.asDiagonal() * V;
    CHECK(lora::test::rel_error(host(dora.merged_weight(dW)), merged) < tolerance);
    auto Wm = on<D>(Wh);
    const auto norms = dora.merge(Wm);
    CHECK(lora::test::rel_error(host(Wm), merged) < tolerance);
    CHECK(lora::test::rel_error(column(host(norms)), MatD(n)) < tolerance);
    dora.unmerge(Wm, norms);
    CHECK(lora::test::rel_error(host(Wm), W) < tolerance);
    // PEFT's initialisation: m = n, so the layer starts as plain LoRA.
    const auto init = DoraAdapter<S, D>::from_weight(LowRankAdapter<S, D>::from_host(h), dW);
    CHECK(lora::test::rel_error(host(init.apply(dW, dX)), Z) < tolerance);
    const DoraAdapter<S> back = dora.to_host();
    CHECK(lora::test::rel_error(column(d(back.magnitude())), column(MatD(m))) == 0.0);
  }
}

TEMPLATE_TEST_CASE("device: ModuleAdapter, LoRA or DoRA by the data, one body on the CPU and the GPU",
                   "[cuda][device][module_adapter]", lora::cpu, lora::cuda) {
  using D = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 96, out = 80, r = 8, T = 7;
  const LowRankAdapter<S> h = random_adapter(in, out, r, 16.0, g), h2 = random_adapter(in, out, r, 16.0, g);
  const Matrix<S> Wh = rand_s<S>(out, in, g, 0.2), Xh = rand_s<S>(T, in, g), dYh = rand_s<S>(T, out, g);
  Vector<float> mh(out);
  for (Index i = 0; i < out; ++i) mh[i] = static_cast<float>(g.uniform(0.5, 2.0));
  const double s = h.scaling();
  const MatD W = d(Wh), X = d(Xh), dY = d(dYh);
  const Vector<double> m = mh.cast<double>();
  const auto dW = on<D>(Wh);
  const auto dX = on<D>(Xh);
  const auto ddY = on<D>(dYh);

  for (const bool is_dora : {false, true}) {
    INFO((is_dora ? "DoRA" : "LoRA") << " module");
    const ModuleAdapter<S> hm(h, is_dora ? std::optional<Vector<float>>(mh) : std::nullopt);
    const auto mod = ModuleAdapter<S, D>::from_host(hm);
    CHECK(mod.is_dora() == is_dora);
    CHECK(mod.in_features() == in);
    CHECK(mod.out_features() == out);
    CHECK(mod.rank() == r);
    CHECK(mod.scaling() == s);
    CHECK(mod.multiplier() == h.multiplier());
    CHECK(mod.trainable_parameters() == (in + out) * r + (is_dora ? out : 0));
    if (!is_dora) CHECK_THROWS_AS(mod.dora(), lora::error);

    // Y = c ⊙ (X·Vᵀ), V = W + s·B·A, c = m ⊘ ‖V‖_row for DoRA and 1 for LoRA; n detached in backward.
    auto layer = [&](const LowRankAdapter<S>& l) {
      const MatD A = d(l.A()), B = d(l.B());
      const MatD V = W + l.scaling() * B * A;
      const Vector<double> n = V.rowwise().norm();
      const Vector<double> c = is_dora ? Vector<double>(m.cwiseQuotient(n)) : Vector<double>::Ones(out);
      return std::tuple{A, B, V, n, c};
    };
    const auto [A, B, V, n, c] = layer(h);
    const MatD Z = X * V.transpose();
    CHECK(lora::test::rel_error(host(mod.apply(dW, dX)), MatD(Z * c.asDiagonal())) < tolerance);
    {
      const auto gr = mod.backward(dW, dX, ddY);
      const MatD G = dY * c.asDiagonal();
      CHECK(lora::test::rel_error(host(gr.dA), MatD(s * (G * B).transpose() * X)) < tolerance);
      CHECK(lora::test::rel_error(host(gr.dB), MatD(s * G.transpose() * (X * A.transpose()))) < tolerance);
      CHECK(lora::test::rel_error(host(gr.dX), MatD(G * V)) < tolerance);
      if (is_dora) {
        const Vector<double> dm = (dY.cwiseProduct(Z)).colwise().sum().transpose().cwiseQuotient(n);
        CHECK(lora::test::rel_error(column(host(gr.dm)), MatD(dm)) < tolerance);
      } else {
        CHECK(host(gr.dm).size() == 0);
      }
    }
    {
      const MatD merged = c.asDiagonal() * V;
      CHECK(lora::test::rel_error(host(mod.merged_weight(dW)), merged) < tolerance);
      auto Wm = on<D>(Wh);
      const auto norms = mod.merge(Wm);
      CHECK(lora::test::rel_error(host(Wm), merged) < tolerance);
      if (is_dora)
        CHECK(lora::test::rel_error(column(host(norms)), MatD(n)) < tolerance);
      else
        CHECK(host(norms).size() == 0);
      mod.unmerge(Wm, norms);
      CHECK(lora::test::rel_error(host(Wm), W) < tolerance);
    }
    {
      // Another low-rank part, the same kind (DoRA keeps m).
      const auto other = mod.with_lora(LowRankAdapter<S, D>::from_host(h2));
      CHECK(other.is_dora() == is_dora);
      const auto [A2, B2, V2, n2, c2] = layer(h2);
      CHECK(lora::test::rel_error(host(other.apply(dW, dX)), MatD(X * V2.transpose() * c2.asDiagonal())) <
            tolerance);
    }
    const ModuleAdapter<S> back = mod.to_host();
    CHECK(back.is_dora() == is_dora);
    CHECK(lora::test::rel_error(d(back.A()), A) == 0.0);
    CHECK(lora::test::rel_error(d(back.B()), B) == 0.0);
    if (is_dora) CHECK(lora::test::rel_error(column(d(back.magnitude())), column(MatD(m))) == 0.0);
  }
}

TEMPLATE_TEST_CASE("device: Nf4Tensor, QLoraLinear and AdapterSet, one body on the CPU and the GPU", "[cuda][device]",
                   lora::cpu, lora::cuda) {
  using D = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, out = 72, r = 4;
  const Matrix<S> Wh = rand_s<S>(out, in, g, 0.5);

  // NF4 with double quantisation: the host's codes moved over dequantise to the same bits.
  const Nf4Tensor hq = Nf4Tensor::quantize(Wh, {64, true});
  const auto q = quant::Nf4Tensor<D>::from_host(hq);
  CHECK(q.double_quant());
  CHECK(q.bits_per_parameter() == hq.bits_per_parameter());
  const Matrix<float> want = hq.dequantize<float>();
  const MatD got = host(q.template dequantize<float>());
  CHECK((got - d(want)).cwiseAbs().maxCoeff() == 0.0);
  CHECK(q.to_host().packed() == hq.packed());

  // QLoRA: Y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ and its gradients, for a decode batch and a larger one.
  const LowRankAdapter<S> ha = random_adapter(in, out, r, 8.0, g);
  const QLoraLinear<S> hl(hq, ha);
  const auto layer = QLoraLinear<S, D>::from_host(hl);
  const MatD Wq = d(want), A = d(ha.A()), B = d(ha.B());
  const double s = ha.scaling();
  for (Index T : {Index(3), Index(24)}) {
    INFO("tokens " << T);
    const Matrix<S> Xh = rand_s<S>(T, in, g), dYh = rand_s<S>(T, out, g);
    const MatD X = d(Xh), dY = d(dYh);
    const auto dX = on<D>(Xh);
    const auto ddY = on<D>(dYh);
    CHECK(lora::test::rel_error(host(layer.forward(dX)), MatD(X * Wq.transpose() + s * X * A.transpose() * B.transpose())) <
          tolerance);
    const auto gr = layer.backward(dX, ddY);
    CHECK(lora::test::rel_error(host(gr.dA), MatD(s * (dY * B).transpose() * X)) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dB), MatD(s * dY.transpose() * (X * A.transpose()))) < tolerance);
    CHECK(lora::test::rel_error(host(gr.dX), MatD(dY * Wq + s * dY * B * A)) < tolerance);
  }

  // Many adapters, one base: per token t with adapter ids[t], Y[t] = X[t]·Wᵀ + s_i·(X[t]·A_iᵀ)·B_iᵀ.
  multi::AdapterSet<S> hs(in, out);
  std::vector<LowRankAdapter<S>> ads;
  for (int i = 0; i < 3; ++i) {
    ads.push_back(random_adapter(in, out, 2 + 3 * i, 4.0 + i, g));
    hs.add("a" + std::to_string(i), ads.back());
  }
  const auto set = multi::AdapterSet<S, D>::from_host(hs);
  const std::vector<int> ids = {2, -1, 0, 0, 1, 2, -1, 1, 0};
  const Index T = static_cast<Index>(ids.size());
  const Matrix<S> Xh = rand_s<S>(T, in, g);
  const MatD X = d(Xh), W = d(Wh);
  MatD ref = X * W.transpose(), ref_adapters = MatD::Zero(T, out);
  for (Index t = 0; t < T; ++t)
    if (ids[static_cast<std::size_t>(t)] >= 0) {
      const auto& a = ads[static_cast<std::size_t>(ids[static_cast<std::size_t>(t)])];
      ref_adapters.row(t) = a.scaling() * X.row(t) * d(a.A()).transpose() * d(a.B()).transpose();
    }
  ref += ref_adapters;
  const auto dW = on<D>(Wh);
  const auto dX = on<D>(Xh);
  CHECK(lora::test::rel_error(host(set.apply(dW, dX, ids)), ref) < tolerance);
  CHECK(lora::test::rel_error(host(set.forward(dX, ids)), ref_adapters) < tolerance);
  const multi::AdapterSet<S> back = set.to_host();
  CHECK(back.size() == hs.size());
  CHECK(back.find("a1") == hs.find("a1"));
}

#include "../../examples/device_generic.hpp"

TEST_CASE("device: examples/device_generic.hpp gives the same layer outputs on the CPU and the GPU", "[cuda][device]") {
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 256, hidden = 128, out = 64, r = 8, T = 5;
  const LowRankAdapter<S> a = random_adapter(in, hidden, r, 16.0, g), a2 = random_adapter(hidden, out, r, 16.0, g);
  const Matrix<S> W = rand_s<S>(hidden, in, g, 0.1), W2 = rand_s<S>(out, hidden, g, 0.1), X = rand_s<S>(T, in, g);
  const auto dora = DoraAdapter<S>::from_weight(a, W);
  const QLoraLinear<S> layer(Nf4Tensor::quantize(W2, {64, true}), a2);
  const auto [Yc, dAc] = example::dora_then_qlora<lora::cpu>(dora, layer, W, X);
  const auto [Yg, dAg] = example::dora_then_qlora<lora::cuda>(dora, layer, W, X);
  CHECK(lora::test::rel_error(d(Yg), d(Yc)) < tolerance);
  CHECK(lora::test::rel_error(d(dAg), d(dAc)) < tolerance);
}
