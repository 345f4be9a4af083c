// Learning-rate schedules against values computed by hand.
#include <lora/train/schedule.hpp>

#include "support/catch.hpp"

using namespace lora;

TEST_CASE("linear schedule with warm-up", "[train]") {
  LinearSchedule s{.warmup_steps = 4, .total_steps = 12};
  // warm-up 0, 1/4, 2/4, 3/4; then (12 − t)/8
  const double want[] = {0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0};
  for (int t = 0; t < 14; ++t) CHECK(s(t) == Approx(want[t]).margin(1e-15));
  CHECK(LinearSchedule{0, 10}(0) == 1.0);
}

TEST_CASE("cosine schedule with warm-up", "[train]") {
  CosineSchedule s{.warmup_steps = 2, .total_steps = 10};
  CHECK(s(0) == 0.0);
  CHECK(s(1) == 0.5);
  CHECK(s(2) == Approx(1.0));
  // p = (t − 2)/8: t = 4 → ½(1 + cos(π/4)) = 0.853553…; t = 6 → ½; t = 8 → 0.146446…; t = 10 → 0
  CHECK(s(4) == Approx(0.8535533905932737).epsilon(1e-14));
  CHECK(s(6) == Approx(0.5).epsilon(1e-14));
  CHECK(s(8) == Approx(0.1464466094067262).epsilon(1e-13));
  CHECK(s(10) == Approx(0.0).margin(1e-15));
  CosineSchedule floor{.warmup_steps = 0, .total_steps = 10, .cycles = 0.5, .min_ratio = 0.1};
  CHECK(floor(10) == Approx(0.1));
  CHECK(floor(5) == Approx(0.1 + 0.9 * 0.5));
  CHECK(ConstantSchedule{3}(1) == Approx(1.0 / 3));
  CHECK(ConstantSchedule{3}(7) == 1.0);
  CHECK_THROWS_WITH((LinearSchedule{-1, 5}(0)), Catch::Matchers::ContainsSubstring("must be >= 0"));
}
