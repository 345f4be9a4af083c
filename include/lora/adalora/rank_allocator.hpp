#pragma once
// AdaLoRA's rank allocator, replaying PEFT 0.21 (tuners/adalora: RankAllocator and
// AdaLoraModel.update_and_allocate) step for step. See docs/adalora.md for the formulas.

#include <lora/adalora/svd_adapter.hpp>
#include <lora/error.hpp>

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace lora {

/// PEFT's AdaLoraConfig fields that drive the schedule and the allocator.
struct AdaLoraConfig {
  int init_r = 12;    ///< initial rank of every module
  int target_r = 8;   ///< average rank at the end: the final budget is target_r · modules
  int tinit = 0;      ///< warm-up steps with the full budget
  int tfinal = 0;     ///< final steps with the rank pattern frozen
  int deltaT = 1;     ///< mask every deltaT steps while the budget shrinks
  double beta1 = 0.85;  ///< EMA factor of the sensitivity |θ·∇θ|
  double beta2 = 0.85;  ///< EMA factor of the uncertainty |I − Ī|
  double orth_reg_weight = 0.5;
  double lora_alpha = 8;
  int total_step = 0;  ///< must be set (> 0)

  /// PEFT's checks: total_step > 0, tinit < total_step − tfinal, 0 < beta < 1, orth_reg_weight ≥ 0.
  void validate() const {
    if (total_step <= 0) detail::fail("AdaLoraConfig: total_step must be > 0, got {}", total_step);
    if (tinit >= total_step - tfinal)
      detail::fail("AdaLoraConfig: tinit ({}) must be < total_step − tfinal ({} − {} = {}): no budgeting phase", tinit,
                   total_step, tfinal, total_step - tfinal);
    if (!(beta1 > 0 && beta1 < 1)) detail::fail("AdaLoraConfig: beta1 must be in (0, 1), got {}", beta1);
    if (!(beta2 > 0 && beta2 < 1)) detail::fail("AdaLoraConfig: beta2 must be in (0, 1), got {}", beta2);
    if (orth_reg_weight < 0) detail::fail("AdaLoraConfig: orth_reg_weight must be >= 0, got {}", orth_reg_weight);
    if (deltaT < 1) detail::fail("AdaLoraConfig: deltaT must be >= 1, got {}", deltaT);
    if (init_r < 0 || target_r < 0)
      detail::fail("AdaLoraConfig: init_r and target_r must be >= 0, got init_r = {}, target_r = {}", init_r, target_r);
  }
};

/// The budget (total number of singular values to keep) at a step, and whether PEFT masks then.
struct Budget {
  int budget = 0;
  bool mask_ind = false;
};

/// One keep-flag per singular value, per module (in the adapters' order).
using RankPattern = std::vector<std::vector<bool>>;

/// What update_and_allocate did at one step.
struct AllocationStep {
  int step = 0;
  Budget budget;
  bool importance_updated = false;  ///< update_ipt ran (step < total_step − tfinal)
  bool masked = false;              ///< E was masked (to the budget, or by the frozen final pattern)
};

/// Importance tracking and budget masking for a fixed set of SvdAdapters (all modules
/// of one AdaLoRA adapter). Call update_and_allocate(step, adapters, grads) after the
/// backward pass of every step, with the gradients of the loss (orthogonal term included).
///
///   lora::RankAllocator<float> alloc(cfg, adapters);
///   for (int step = 0; step < cfg.total_step; ++step) {
///     ... backward into grads; optimiser step ...
///     alloc.update_and_allocate(step, adapters, grads);
///   }
///   auto pattern = alloc.rank_pattern();  // PEFT's final rank_pattern
template <class S>
class RankAllocator {
 public:
  RankAllocator(AdaLoraConfig cfg, std::span<const SvdAdapter<S>> adapters) : cfg_(cfg) {
    cfg_.validate();
    for (const auto& ad : adapters) {
      ranks_.push_back(ad.rank());
      shapes_.push_back({ad.out_features(), ad.in_features()});
      init_bgt_ += static_cast<int>(ad.rank());
    }
    target_bgt_ = cfg_.target_r * static_cast<int>(adapters.size());
    reset_importance();
  }
  RankAllocator(AdaLoraConfig cfg, const std::vector<SvdAdapter<S>>& adapters)
      : RankAllocator(cfg, std::span<const SvdAdapter<S>>(adapters)) {}

  const AdaLoraConfig& config() const { return cfg_; }
  /// Σ r over modules.
  int initial_budget() const { return init_bgt_; }
  /// target_r · modules.
  int target_budget() const { return target_bgt_; }

  /// PEFT's budget_schedule: the full budget up to tinit; the target (and masking) after
  /// total_step − tfinal; in between b = ⌊(b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋,
  /// masking when t is a multiple of deltaT.
  Budget budget_schedule(int step) const {
    Budget b;
    if (step <= cfg_.tinit) {
      b.budget = init_bgt_;
      b.mask_ind = false;
    } else if (step > cfg_.total_step - cfg_.tfinal) {
      b.budget = target_bgt_;
      b.mask_ind = true;
    } else {
      const double mul = 1.0 - static_cast<double>(step - cfg_.tinit) /
                                   static_cast<double>(cfg_.total_step - cfg_.tfinal - cfg_.tinit);
      const double v = static_cast<double>(init_bgt_ - target_bgt_) * std::pow(mul, 3.0) + target_bgt_;
      b.budget = static_cast<int>(v);  // Python's int(): truncation toward zero
      b.mask_ind = step % cfg_.deltaT == 0;
    }
    return b;
  }

  /// PEFT's update_ipt: with I = |θ·∇θ| elementwise for θ ∈ {A, E, B},
  /// Ī ← β₁·Ī + (1−β₁)·I and Ū ← β₂·Ū + (1−β₂)·|I − Ī| (Ī already updated).
  void update_importance(std::span<const SvdAdapter<S>> adapters, std::span<const SvdGradients<S>> grads) {
    check(adapters, grads);
    const S b1 = static_cast<S>(cfg_.beta1), c1 = static_cast<S>(1.0 - cfg_.beta1);
    const S b2 = static_cast<S>(cfg_.beta2), c2 = static_cast<S>(1.0 - cfg_.beta2);
    auto upd = [&](State& st, const auto& p, const auto& g) {
      for (Index i = 0; i < st.ipt.size(); ++i) {
        const S ipt = std::abs(static_cast<S>(p.data()[i] * g.data()[i]));
        const S e = static_cast<S>(b1 * st.exp_ipt.data()[i]) + static_cast<S>(c1 * ipt);
        st.exp_ipt.data()[i] = e;
        const S d = std::abs(static_cast<S>(ipt - e));
        st.exp_unc.data()[i] = static_cast<S>(b2 * st.exp_unc.data()[i]) + static_cast<S>(c2 * d);
      }
    };
    for (std::size_t m = 0; m < adapters.size(); ++m) {
      upd(a_[m], adapters[m].A(), grads[m].dA);
      upd(e_[m], adapters[m].E(), grads[m].dE);
      upd(b_[m], adapters[m].B(), grads[m].dB);
    }
  }

  /// Per-triplet scores s_i = Ī_Eᵢ·Ū_Eᵢ + mean_j(Ī_Aᵢⱼ·Ū_Aᵢⱼ) + mean_k(Ī_Bₖᵢ·Ū_Bₖᵢ) (PEFT's
  /// _element_score and _combine_ipt), one vector per module.
  std::vector<std::vector<S>> triplet_scores() const {
    std::vector<std::vector<S>> out(ranks_.size());
    for (std::size_t m = 0; m < ranks_.size(); ++m) {
      const Index r = ranks_[m];
      out[m].resize(static_cast<std::size_t>(r));
      for (Index i = 0; i < r; ++i) {
        // PEFT takes float means of float products; summing in double and rounding once is
        // within an ulp of it (the order of torch's reduction is not ours to copy).
        double sa = 0, sb = 0;
        const Index in = a_[m].ipt.cols(), outf = b_[m].ipt.rows();
        for (Index j = 0; j < in; ++j)
          sa += static_cast<double>(static_cast<S>(a_[m].exp_ipt(i, j) * a_[m].exp_unc(i, j)));
        for (Index k = 0; k < outf; ++k)
          sb += static_cast<double>(static_cast<S>(b_[m].exp_ipt(k, i) * b_[m].exp_unc(k, i)));
        const S ma = static_cast<S>(sa / static_cast<double>(in));
        const S mb = static_cast<S>(sb / static_cast<double>(outf));
        const S se = static_cast<S>(e_[m].exp_ipt(i, 0) * e_[m].exp_unc(i, 0));
        out[m][static_cast<std::size_t>(i)] = static_cast<S>(se + static_cast<S>(ma + mb));
      }
    }
    return out;
  }

  /// PEFT's mask_to_budget: the threshold τ is the k-th smallest score over all triplets,
  /// k = initial_budget − budget, and every triplet with s ≤ τ gets E_i = 0. Returns the
  /// pattern (s > τ). With k ≤ 0 nothing is masked (PEFT's kthvalue would raise there).
  RankPattern mask_to_budget(std::span<SvdAdapter<S>> adapters, int budget) {
    check(adapters);
    const auto scores = triplet_scores();
    const int k = init_bgt_ - budget;
    RankPattern pattern(scores.size());
    if (k <= 0) {
      for (std::size_t m = 0; m < scores.size(); ++m) pattern[m].assign(scores[m].size(), true);
      last_threshold_.reset();
      return pattern;
    }
    std::vector<S> all;
    for (const auto& s : scores) all.insert(all.end(), s.begin(), s.end());
    if (k > static_cast<int>(all.size()))
      detail::fail("RankAllocator: budget {} leaves k = {} below the {} singular values", budget, k, all.size());
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
    const S threshold = all[static_cast<std::size_t>(k - 1)];
    last_threshold_ = static_cast<double>(threshold);
    for (std::size_t m = 0; m < scores.size(); ++m) {
      pattern[m].resize(scores[m].size());
      for (std::size_t i = 0; i < scores[m].size(); ++i) pattern[m][i] = !(scores[m][i] <= threshold);
      adapters[m].mask(pattern[m]);
    }
    return pattern;
  }

  /// PEFT's mask_using_rank_pattern: E_i = 0 where the pattern is false.
  void mask_using_rank_pattern(std::span<SvdAdapter<S>> adapters, const RankPattern& pattern) const {
    check(adapters);
    if (pattern.size() != adapters.size())
      detail::fail("RankAllocator: rank pattern has {} modules, expected {}", pattern.size(), adapters.size());
    for (std::size_t m = 0; m < adapters.size(); ++m) adapters[m].mask(pattern[m]);
  }

  /// PEFT's AdaLoraModel.update_and_allocate(step), to be called after backward (and the
  /// optimiser step) of every step:
  /// - step < T − tfinal: update importance, then mask to the budget if the schedule says so;
  /// - step = T − tfinal: mask to the budget (no importance update), freeze that rank
  ///   pattern and reset the importance;
  /// - step > T − tfinal: re-apply the frozen pattern (E of pruned triplets stays zero).
  AllocationStep update_and_allocate(int step, std::span<SvdAdapter<S>> adapters,
                                     std::span<const SvdGradients<S>> grads) {
    AllocationStep out;
    out.step = step;
    out.budget = budget_schedule(step);
    const int final_start = cfg_.total_step - cfg_.tfinal;
    if (step < final_start) {
      update_importance(std::span<const SvdAdapter<S>>(adapters.data(), adapters.size()), grads);
      out.importance_updated = true;
      if (out.budget.mask_ind) {
        pattern_ = mask_to_budget(adapters, out.budget.budget);
        out.masked = true;
      }
    } else if (step == final_start) {
      pattern_ = mask_to_budget(adapters, out.budget.budget);
      out.masked = true;
      reset_importance();
    } else {
      if (!pattern_)
        detail::fail("RankAllocator: step {} is in the final phase but no rank pattern was fixed (call step {} first)",
                     step, final_start);
      mask_using_rank_pattern(adapters, *pattern_);
      out.masked = true;
    }
    return out;
  }
  AllocationStep update_and_allocate(int step, std::vector<SvdAdapter<S>>& adapters,
                                     const std::vector<SvdGradients<S>>& grads) {
    return update_and_allocate(step, std::span<SvdAdapter<S>>(adapters), std::span<const SvdGradients<S>>(grads));
  }

  /// The last pattern masked to (PEFT's config.rank_pattern); empty before the first mask.
  const std::optional<RankPattern>& rank_pattern() const { return pattern_; }
  /// The threshold τ of the last mask_to_budget (none if nothing was masked).
  std::optional<double> last_threshold() const { return last_threshold_; }

  /// PEFT's reset_ipt: forget the importance averages.
  void reset_importance() {
    a_.clear();
    e_.clear();
    b_.clear();
    for (std::size_t m = 0; m < ranks_.size(); ++m) {
      a_.emplace_back(ranks_[m], shapes_[m].in);
      e_.emplace_back(ranks_[m], 1);
      b_.emplace_back(shapes_[m].out, ranks_[m]);
    }
  }

 private:
  struct Shape {
    Index out, in;
  };
  struct State {
    State(Index r, Index c) : ipt(Matrix<S>::Zero(r, c)), exp_ipt(Matrix<S>::Zero(r, c)), exp_unc(Matrix<S>::Zero(r, c)) {}
    Matrix<S> ipt, exp_ipt, exp_unc;
  };

  template <class Ads>
  void check(const Ads& adapters) const {
    if (adapters.size() != ranks_.size())
      detail::fail("RankAllocator: got {} adapters, expected {}", adapters.size(), ranks_.size());
    for (std::size_t m = 0; m < adapters.size(); ++m) {
      const auto& ad = adapters[m];
      if (ad.rank() != ranks_[m] || ad.in_features() != shapes_[m].in || ad.out_features() != shapes_[m].out)
        detail::fail("RankAllocator: adapter {} ('{}') is [r={}, in={}, out={}], expected [r={}, in={}, out={}]", m,
                     ad.name(), ad.rank(), ad.in_features(), ad.out_features(), ranks_[m], shapes_[m].in,
                     shapes_[m].out);
    }
  }
  void check(std::span<const SvdAdapter<S>> adapters, std::span<const SvdGradients<S>> grads) const {
    check(adapters);
    if (grads.size() != adapters.size())
      detail::fail("RankAllocator: got {} gradient sets, expected {}", grads.size(), adapters.size());
    for (std::size_t m = 0; m < adapters.size(); ++m) {
      const auto& ad = adapters[m];
      const auto& g = grads[m];
      detail::check_shape(fmt::format("module '{}': ", ad.name()), "gradient of lora_A", g.dA.rows(), g.dA.cols(),
                          ad.rank(), ad.in_features());
      detail::check_shape(fmt::format("module '{}': ", ad.name()), "gradient of lora_E", g.dE.rows(), g.dE.cols(),
                          ad.rank(), 1);
      detail::check_shape(fmt::format("module '{}': ", ad.name()), "gradient of lora_B", g.dB.rows(), g.dB.cols(),
                          ad.out_features(), ad.rank());
    }
  }

  AdaLoraConfig cfg_;
  std::vector<Index> ranks_;
  std::vector<Shape> shapes_;
  int init_bgt_ = 0;
  int target_bgt_ = 0;
  std::vector<State> a_, e_, b_;
  std::optional<RankPattern> pattern_;
  std::optional<double> last_threshold_;
};

}  // namespace lora
