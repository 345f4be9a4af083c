// ModuleAdapter<S, cuda> (lora/cuda/module_adapter.cuh): a float host module moved to bf16 and
// float (and io::PeftModule's type, dynamic_scaling with rsLoRA, there and back), the forms that
// write a caller's (NaN-poisoned) buffers, the fused path of a LoRA and a DoRA module against
// float64, and what a LoRA module refuses. The returning forms run in
// device.cu, on the CPU and the GPU from one body.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <optional>

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;
using lora::test::upload_padded;

TEMPLATE_TEST_CASE("cuda module adapter: a float host module on the device, caller buffers and the fused path",
                   "[cuda][module_adapter]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 128, out = 96, r = 8;
  // The host module is float (as io::PeftModule holds it); the device rounds its factors to S.
  LowRankAdapter<float> hl(in, out, r, 16.0, AdapterOptions{false, 0.0, "q_proj"});
  hl.set_A(rand_s<float>(r, in, g, 0.1));
  hl.set_B(rand_s<float>(out, r, g, 0.1));
  hl.rescale(0.75);
  Vector<float> mh(out);
  for (Index i = 0; i < out; ++i) mh[i] = static_cast<float>(g.uniform(0.5, 2.0));
  const double s = hl.scaling();
  const MatD A = d(Matrix<S>(hl.A().cast<S>())), B = d(Matrix<S>(hl.B().cast<S>()));
  const Matrix<S> Wh = rand_s<S>(out, in, g, 0.1);
  const MatD W = d(Wh), V = W + s * B * A;
  const Vector<double> n = V.rowwise().norm(), m = mh.cast<double>();
  const auto dW = DeviceMatrix<S>::from_host(Wh);

  for (const bool is_dora : {false, true}) {
    INFO((is_dora ? "DoRA" : "LoRA") << " module");
    const ModuleAdapter<float> host(hl, is_dora ? std::optional<Vector<float>>(mh) : std::nullopt);
    auto mod = ModuleAdapter<S, cuda>::from_host(host);
    CHECK(mod.is_dora() == is_dora);
    CHECK(mod.name() == "q_proj");
    CHECK(mod.scaling() == s);
    CHECK(mod.multiplier() == hl.multiplier());
    const Vector<double> c = is_dora ? Vector<double>(m.cwiseQuotient(n)) : Vector<double>::Ones(out);

    // Back to the host as float: the factors as rounded to S, the magnitude as it was, the multiplier kept.
    {
      const ModuleAdapter<float> back = mod.template to_host<float>();
      CHECK(back.is_dora() == is_dora);
      CHECK(back.multiplier() == hl.multiplier());
      CHECK(lora::test::rel_error(d(back.A()), A) == 0.0);
      if (is_dora) CHECK(lora::test::rel_error(d(back.magnitude()), MatD(m)) == 0.0);
    }

    // T 5 and 40: DoRA's few-token (column scale) and scaled-block fused forwards.
    for (Index T : {Index(5), Index(40)}) {
      INFO("tokens " << T);
      const Matrix<S> Xh = rand_s<S>(T, in, g), dYh = rand_s<S>(T, out, g);
      const MatD X = d(Xh), dY = d(dYh), Z = X * V.transpose();
      const MatD ref_y = Z * c.asDiagonal(), G = dY * c.asDiagonal();
      const MatD ref_dX = G * V, ref_dA = s * (G * B).transpose() * X, ref_dB = s * G.transpose() * (X * A.transpose());
      const Vector<double> ref_dm = (dY.cwiseProduct(Z)).colwise().sum().transpose().cwiseQuotient(n);

      const auto dX = DeviceMatrix<S>::from_host(Xh);
      DeviceMatrix<S> Y(T, out);
      poison(Y.view());
      mod.apply(dW.view(), dX.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());

      auto fw = mod.fuse(dW.view());
      auto Xp = upload_padded(Xh, fused_rank_pad(r));
      poison(Y.view());
      mod.apply(fw, Xp.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), ref_y) < tol<S>());

      auto dYp = upload_padded(dYh, fused_rank_pad(r));
      DeviceMatrix<S> gX(T, in);
      DeviceMatrix<float> gA(r, in), gB(out, r), gm = is_dora ? DeviceMatrix<float>(out, 1) : DeviceMatrix<float>();
      poison(gX.view());
      poison(gA.view());
      poison(gB.view());
      poison(gm.view());
      mod.backward(fw, Xp.view(), Y.view(), dYp.view(), gX.view(), gA.view(), gB.view(), gm.view());
      CHECK(lora::test::rel_error(gX.to_host(), ref_dX) < tol<S>());
      CHECK(lora::test::rel_error(gA.to_host(), ref_dA) < tol<S>());
      CHECK(lora::test::rel_error(gB.to_host(), ref_dB) < tol<S>());
      if (is_dora) {
        CHECK(lora::test::rel_error(gm.to_host(), MatD(ref_dm)) < tol<S>());
      } else {
        // A LoRA module has no magnitude gradient to write.
        DeviceMatrix<float> dm(out, 1);
        CHECK_THROWS_AS(mod.backward(fw, Xp.view(), Y.view(), dYp.view(), gX.view(), gA.view(), gB.view(), dm.view()),
                        lora::error);
      }
    }

    // merge and merged_weight in S (one rounding of the float result), unmerge back.
    const MatD merged = c.asDiagonal() * V;
    CHECK(lora::test::rel_error(mod.merged_weight(dW.view()).to_host(), merged) < tol<S>());
    auto Wm = DeviceMatrix<S>::from_host(Wh);
    const DeviceMatrix<float> norms = mod.merge(Wm.view());
    CHECK(lora::test::rel_error(Wm.to_host(), merged) < tol<S>());
    CHECK(norms.size() == static_cast<std::size_t>(is_dora ? out : 0));
    if (!is_dora) {
      const DeviceMatrix<float> bogus(out, 1);
      CHECK_THROWS_AS(mod.unmerge(Wm.view(), bogus.view()), lora::error);
      CHECK_THROWS_AS(mod.magnitude(), lora::error);
    }
    mod.unmerge(Wm.view(), norms.view());
    CHECK(lora::test::rel_error(Wm.to_host(), W) < (std::is_same_v<S, float> ? 1e-5 : 2e-2));
  }
}

TEST_CASE("cuda module adapter: a PEFT module's type (float, dynamic_scaling, rsLoRA) on the device in bf16 and back",
          "[cuda][module_adapter]") {
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 64, out = 48, r = 4, T = 3;
  using HostModule = ModuleAdapter<float, cpu, dynamic_scaling>;  // io::PeftModule::adapter
  LowRankAdapter<float, cpu, dynamic_scaling> hl(in, out, r, 8.0, {}, dynamic_scaling{true});
  hl.set_A(rand_s<float>(r, in, g, 0.2));
  hl.set_B(rand_s<float>(out, r, g, 0.2));
  Vector<float> mh(out);
  for (Index i = 0; i < out; ++i) mh[i] = static_cast<float>(g.uniform(0.5, 2.0));
  const HostModule host(hl, mh);
  const auto mod = ModuleAdapter<bfloat16, cuda, dynamic_scaling>::from_host(host);
  CHECK(mod.is_dora());
  CHECK(mod.policy() == dynamic_scaling{true});
  CHECK(mod.scaling() == 8.0 / 2.0);  // rsLoRA: alpha / sqrt(r)
  // The layer against float64 from the bf16-rounded factors and inputs.
  const Matrix<bfloat16> Wh = rand_s<bfloat16>(out, in, g, 0.2), Xh = rand_s<bfloat16>(T, in, g);
  const MatD A = d(Matrix<bfloat16>(hl.A().cast<bfloat16>())), B = d(Matrix<bfloat16>(hl.B().cast<bfloat16>()));
  const MatD V = d(Wh) + mod.scaling() * B * A;
  const Vector<double> c = mh.cast<double>().cwiseQuotient(V.rowwise().norm());
  const auto dW = DeviceMatrix<bfloat16>::from_host(Wh);
  const auto dX = DeviceMatrix<bfloat16>::from_host(Xh);
  CHECK(lora::test::rel_error(mod.apply(dW.view(), dX.view()).to_host(), MatD(d(Xh) * V.transpose() * c.asDiagonal())) <
        tol<bfloat16>());
  const HostModule back = mod.to_host<float>();  // what a PeftModule holds again
  CHECK(back.policy() == dynamic_scaling{true});
  CHECK(back.scaling() == host.scaling());
  CHECK(lora::test::rel_error(d(back.B()), B) == 0.0);
  CHECK(lora::test::rel_error(d(back.magnitude()), d(mh)) == 0.0);
}
