#pragma once
// Learning-rate schedules with warm-up, as transformers' get_*_schedule_with_warmup define
// them: a factor f(t) that multiplies the base learning rate at step t (t = 0 for the first
// update, so a warm-up starts at 0).

#include <lora/error.hpp>

#include <algorithm>
#include <cmath>
#include <numbers>

namespace lora {

namespace detail {
inline void check_schedule(int warmup, int total) {
  if (warmup < 0 || total < 0) detail::fail("schedule: warmup_steps and total_steps must be >= 0, got {} and {}", warmup, total);
}
inline double warmup_factor(int step, int warmup) {
  return static_cast<double>(step) / static_cast<double>(std::max(1, warmup));
}
}  // namespace detail

/// f(t) = t / warmup during warm-up, then 1.
struct ConstantSchedule {
  int warmup_steps = 0;
  double operator()(int step) const {
    detail::check_schedule(warmup_steps, 0);
    return step < warmup_steps ? detail::warmup_factor(step, warmup_steps) : 1.0;
  }
};

/// f(t) = t / warmup during warm-up, then max(0, (total − t) / (total − warmup)).
struct LinearSchedule {
  int warmup_steps = 0;
  int total_steps = 0;
  double operator()(int step) const {
    detail::check_schedule(warmup_steps, total_steps);
    if (step < warmup_steps) return detail::warmup_factor(step, warmup_steps);
    return std::max(0.0, static_cast<double>(total_steps - step) / static_cast<double>(std::max(1, total_steps - warmup_steps)));
  }
};

/// f(t) = t / warmup during warm-up, then with p = (t − warmup) / (total − warmup):
/// max(0, ½(1 + cos(2π·cycles·p))) rescaled to [min_ratio, 1] (min_ratio = 0: transformers'
/// cosine schedule; cycles = 0.5 decays once to 0).
struct CosineSchedule {
  int warmup_steps = 0;
  int total_steps = 0;
  double cycles = 0.5;
  double min_ratio = 0.0;
  double operator()(int step) const {
    detail::check_schedule(warmup_steps, total_steps);
    if (step < warmup_steps) return detail::warmup_factor(step, warmup_steps);
    const double p = static_cast<double>(step - warmup_steps) / static_cast<double>(std::max(1, total_steps - warmup_steps));
    const double f = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * cycles * 2.0 * p)));
    return f * (1.0 - min_ratio) + min_ratio;
  }
};

}  // namespace lora
