// RankAllocator: the budget schedule against hand-computed values, and a random run
// against an independent float64 restatement of PEFT's update_and_allocate.
#include <lora/adalora/rank_allocator.hpp>

#include <map>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;

TEST_CASE("budget schedule: warm-up, cubic decay, final phase", "[adalora]") {
  AdaLoraConfig cfg;
  cfg.init_r = 12;
  cfg.target_r = 4;
  cfg.tinit = 10;
  cfg.tfinal = 20;
  cfg.deltaT = 5;
  cfg.total_step = 100;
  std::vector<SvdAdapter<double>> ads;
  for (int i = 0; i < 3; ++i) ads.emplace_back(16, 16, 12, 8.0);
  RankAllocator<double> alloc(cfg, ads);
  CHECK(alloc.initial_budget() == 36);
  CHECK(alloc.target_budget() == 12);
  // by hand: b(t) = int(24·(1 − (t − 10)/70)³ + 12)
  const std::map<int, std::pair<int, bool>> want{
      {0, {36, false}},  {10, {36, false}}, {11, {34, false}}, {15, {31, true}}, {45, {15, true}},
      {79, {12, false}}, {80, {12, true}},  {81, {12, true}},  {99, {12, true}}};
  for (auto [t, bm] : want) {
    INFO("step " << t);
    const double mul = 1.0 - (t - 10) / 70.0;
    if (t > 10 && t <= 80) CHECK(bm.first == static_cast<int>(24 * mul * mul * mul + 12));
    CHECK(alloc.budget_schedule(t).budget == bm.first);
    CHECK(alloc.budget_schedule(t).mask_ind == bm.second);
  }
  AdaLoraConfig bad = cfg;
  bad.total_step = 0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Matchers::ContainsSubstring("total_step must be > 0"));
  bad = cfg;
  bad.tinit = 80;
  CHECK_THROWS_WITH(bad.validate(), Catch::Matchers::ContainsSubstring("no budgeting phase"));
  bad = cfg;
  bad.beta1 = 1.0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Matchers::ContainsSubstring("beta1 must be in (0, 1)"));
}

namespace {
// PEFT's algorithm restated with plain loops, in double, with a sort for kthvalue.
struct RefAllocator {
  AdaLoraConfig cfg;
  int init_bgt, target_bgt;
  std::vector<MatD> ia, ua, ie, ue, ib, ub;
  std::optional<std::vector<std::vector<bool>>> pattern;

  RefAllocator(AdaLoraConfig c, const std::vector<SvdAdapter<double>>& ads) : cfg(c) {
    init_bgt = 0;
    for (auto& a : ads) init_bgt += static_cast<int>(a.rank());
    target_bgt = c.target_r * static_cast<int>(ads.size());
    reset(ads);
  }
  void reset(const std::vector<SvdAdapter<double>>& ads) {
    ia.clear(), ua.clear(), ie.clear(), ue.clear(), ib.clear(), ub.clear();
    for (auto& a : ads) {
      ia.push_back(MatD::Zero(a.rank(), a.in_features()));
      ua.push_back(ia.back());
      ie.push_back(MatD::Zero(a.rank(), 1));
      ue.push_back(ie.back());
      ib.push_back(MatD::Zero(a.out_features(), a.rank()));
      ub.push_back(ib.back());
    }
  }
  std::pair<int, bool> budget(int t) const {
    if (t <= cfg.tinit) return {init_bgt, false};
    if (t > cfg.total_step - cfg.tfinal) return {target_bgt, true};
    double m = 1.0 - double(t - cfg.tinit) / double(cfg.total_step - cfg.tfinal - cfg.tinit);
    return {int((init_bgt - target_bgt) * m * m * m + target_bgt), t % cfg.deltaT == 0};
  }
  static void ema(MatD& I, MatD& U, const MatD& p, const MatD& g, double b1, double b2) {
    for (Index i = 0; i < p.rows(); ++i)
      for (Index j = 0; j < p.cols(); ++j) {
        double ipt = std::abs(p(i, j) * g(i, j));
        I(i, j) = b1 * I(i, j) + (1 - b1) * ipt;
        U(i, j) = b2 * U(i, j) + (1 - b2) * std::abs(ipt - I(i, j));
      }
  }
  void mask(std::vector<SvdAdapter<double>>& ads, int b) {
    std::vector<std::vector<double>> s(ads.size());
    std::vector<double> all;
    for (std::size_t m = 0; m < ads.size(); ++m)
      for (Index i = 0; i < ads[m].rank(); ++i) {
        double sa = 0, sb = 0;
        for (Index j = 0; j < ia[m].cols(); ++j) sa += ia[m](i, j) * ua[m](i, j);
        for (Index k = 0; k < ib[m].rows(); ++k) sb += ib[m](k, i) * ub[m](k, i);
        s[m].push_back(ie[m](i, 0) * ue[m](i, 0) + sa / double(ia[m].cols()) + sb / double(ib[m].rows()));
        all.push_back(s[m].back());
      }
    std::sort(all.begin(), all.end());
    const double thr = all[static_cast<std::size_t>(init_bgt - b - 1)];
    pattern.emplace();
    for (std::size_t m = 0; m < ads.size(); ++m) {
      std::vector<bool> keep;
      for (double v : s[m]) keep.push_back(v > thr);
      ads[m].mask(keep);
      pattern->push_back(keep);
    }
  }
  void step(int t, std::vector<SvdAdapter<double>>& ads, const std::vector<SvdGradients<double>>& g) {
    const int fs = cfg.total_step - cfg.tfinal;
    if (t < fs) {
      for (std::size_t m = 0; m < ads.size(); ++m) {
        ema(ia[m], ua[m], ads[m].A(), g[m].dA, cfg.beta1, cfg.beta2);
        ema(ie[m], ue[m], MatD(ads[m].E()), MatD(g[m].dE), cfg.beta1, cfg.beta2);
        ema(ib[m], ub[m], ads[m].B(), g[m].dB, cfg.beta1, cfg.beta2);
      }
      auto [b, mi] = budget(t);
      if (mi) mask(ads, b);
    } else if (t == fs) {
      mask(ads, budget(t).first);
      reset(ads);
    } else {
      for (std::size_t m = 0; m < ads.size(); ++m) ads[m].mask((*pattern)[m]);
    }
  }
};
}  // namespace

TEST_CASE("RankAllocator follows PEFT's update_and_allocate on a random run", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  AdaLoraConfig cfg;
  cfg.init_r = 5;
  cfg.target_r = 2;
  cfg.tinit = 3;
  cfg.tfinal = 4;
  cfg.deltaT = 2;
  cfg.beta1 = gen.uniform(0.5, 0.95);
  cfg.beta2 = gen.uniform(0.5, 0.95);
  cfg.total_step = 20;
  std::vector<SvdAdapter<double>> ads;
  for (auto [in, out] : {std::pair{10, 8}, {12, 6}, {7, 9}, {8, 8}})
    ads.push_back(SvdAdapter<double>::from_factors(random_matrix(5, in, gen), random_matrix(5, 1, gen),
                                                   random_matrix(out, 5, gen), 8.0));
  auto ref_ads = ads;
  RankAllocator<double> alloc(cfg, ads);
  RefAllocator ref(cfg, ref_ads);
  for (int t = 0; t < cfg.total_step; ++t) {
    INFO("step " << t);
    std::vector<SvdGradients<double>> g;
    for (auto& a : ads) {
      SvdGradients<double> gi;
      gi.dA = random_matrix(a.rank(), a.in_features(), gen);
      gi.dE = random_matrix(a.rank(), 1, gen);
      gi.dB = random_matrix(a.out_features(), a.rank(), gen);
      g.push_back(std::move(gi));
    }
    const auto st = alloc.update_and_allocate(t, ads, g);
    ref.step(t, ref_ads, g);
    CHECK(st.budget.budget == ref.budget(t).first);
    for (std::size_t m = 0; m < ads.size(); ++m) CHECK(ads[m].active() == ref_ads[m].active());
  }
  REQUIRE(alloc.rank_pattern().has_value());
  CHECK(*alloc.rank_pattern() == *ref.pattern);
  Index kept = 0;
  for (auto& a : ads) kept += a.active_rank();
  CHECK(kept <= alloc.target_budget());  // ties can only prune more
  CHECK(kept >= 1);
}

TEST_CASE("RankAllocator rejects mismatched adapters and gradients", "[adalora]") {
  AdaLoraConfig cfg;
  cfg.total_step = 10;
  cfg.init_r = 4;
  std::vector<SvdAdapter<double>> ads{SvdAdapter<double>(6, 5, 4, 8.0)};
  RankAllocator<double> alloc(cfg, ads);
  std::vector<SvdGradients<double>> g(1);
  g[0].dA = MatD::Zero(4, 6);
  g[0].dE = Vector<double>::Zero(4);
  g[0].dB = MatD::Zero(5, 3);
  CHECK_THROWS_WITH(alloc.update_and_allocate(0, ads, g),
                    Catch::Matchers::ContainsSubstring("gradient of lora_B has shape [5 x 3], expected [5 x 4]"));
  std::vector<SvdAdapter<double>> other{SvdAdapter<double>(6, 5, 3, 8.0)};
  CHECK_THROWS_WITH(alloc.mask_to_budget(std::span<SvdAdapter<double>>(other), 2),
                    Catch::Matchers::ContainsSubstring("expected [r=4, in=6, out=5]"));
}

TEST_CASE("RankAllocator edge cases: no pruning needed, final phase without a pattern", "[adalora]") {
  Generator gen(lora::test::fresh_seed());
  AdaLoraConfig cfg;
  cfg.init_r = 3;
  cfg.target_r = 3;  // budget never shrinks: k = 0, nothing is masked (PEFT's kthvalue would raise)
  cfg.total_step = 6;
  cfg.tfinal = 2;
  std::vector<SvdAdapter<double>> ads{SvdAdapter<double>::from_factors(random_matrix(3, 5, gen), random_matrix(3, 1, gen),
                                                                       random_matrix(4, 3, gen), 8.0)};
  std::vector<SvdGradients<double>> g(1);
  g[0].dA = random_matrix(3, 5, gen);
  g[0].dE = random_matrix(3, 1, gen);
  g[0].dB = random_matrix(4, 3, gen);
  RankAllocator<double> alloc(cfg, ads);
  for (int t = 0; t < 6; ++t) alloc.update_and_allocate(t, ads, g);
  CHECK(ads[0].active_rank() == 3);
  REQUIRE(alloc.rank_pattern().has_value());
  CHECK(*alloc.rank_pattern() == RankPattern{{true, true, true}});
  // jumping straight into the final phase has no pattern to apply
  RankAllocator<double> fresh(cfg, ads);
  CHECK_THROWS_WITH(fresh.update_and_allocate(5, ads, g), Catch::Matchers::ContainsSubstring("no rank pattern was fixed (call step 4 first)"));
}
