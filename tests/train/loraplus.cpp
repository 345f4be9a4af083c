// LoRA+: B's learning rate is ratio × A's; and adapters train end to end with AdamW.
#include <lora/adalora.hpp>
#include <lora/train.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

TEST_CASE("LoRA+ gives B ratio × A's learning rate (PEFT groups)", "[train]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  auto ad = LowRankAdapter<double>::from_factors(random_matrix(3, 8, gen), random_matrix(6, 3, gen), 6.0);
  auto twin = ad;
  AdamW<double> opt({.weight_decay = 0.0});
  const auto s = add_loraplus(opt, ad, {.lr = 2e-3});  // ratio defaults to 16
  CHECK(opt.lr(s.A) == 2e-3);
  CHECK(opt.lr(s.B) == Approx(32e-3));
  // The same update by hand with two separately configured AdamWs.
  AdamW<double> ra({.lr = 2e-3, .weight_decay = 0.0}), rb({.lr = 32e-3, .weight_decay = 0.0});
  const auto ia = ra.add(twin.A()), ib = rb.add(twin.B());
  const MatD X = random_matrix(5, 8, gen), G = random_matrix(5, 6, gen);
  for (int t = 0; t < 3; ++t) {
    const auto g = ad.backward(X, G), gt = twin.backward(X, G);
    adamw_step(opt, s, g);
    ra.update(ia, gt.dA);
    rb.update(ib, gt.dB);
  }
  CHECK(rel_error(ad.A(), twin.A()) < 1e-15);
  CHECK(rel_error(ad.B(), twin.B()) < 1e-15);
  // AdaLoRA: E goes with A (PEFT: not lora_B, not 1-D)
  auto sv = SvdAdapter<double>::from_factors(random_matrix(3, 8, gen), random_matrix(3, 1, gen), random_matrix(6, 3, gen), 8.0);
  AdamW<double> o2;
  const auto s2 = add_loraplus(o2, sv, {.lr = 1e-3, .ratio = 4});
  REQUIRE(s2.E.has_value());
  CHECK(o2.lr(*s2.E) == 1e-3);
  CHECK(o2.lr(s2.B) == 4e-3);
  CHECK_THROWS_WITH(add_loraplus(o2, sv, {.ratio = 0}), Catch::Matchers::ContainsSubstring("ratio (loraplus_lr_ratio) must be > 0"));
}

TEST_CASE("AdamW + cosine schedule + clipping train a LoRA to a low-rank teacher", "[train]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index in = 16, out = 12, r = 2;
  const MatD teacher = random_matrix(out, r, gen) * random_matrix(r, in, gen) * 0.3;
  LowRankAdapter<double> ad(in, out, r, 4.0);
  initialize(ad, init_method::kaiming_uniform, gen);
  AdamW<double> opt({.weight_decay = 0.0});
  const auto s = add_loraplus(opt, ad, {.lr = 5e-3, .ratio = 4});
  const CosineSchedule sched{.warmup_steps = 20, .total_steps = 600};
  double first = 0, last = 0;
  for (int t = 0; t < 600; ++t) {
    const MatD X = random_matrix(32, in, gen);
    const MatD Y = X * teacher.transpose();
    const auto l = mse_loss<double>(ad.forward(X), Y);
    if (t == 0) first = l.value;
    last = l.value;
    auto g = ad.backward(X, l.grad);
    clip_grad_norm(1.0, g.dA, g.dB);
    opt.set_lr_factor(sched(t));
    adamw_step(opt, s, g);
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 1e-2 * first);
  CHECK(rel_error(ad.delta_weight(), teacher) < 0.1);
}
