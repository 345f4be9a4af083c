// Experiment 6: adapt all layers at low rank, or few layers at high rank, at
// equal trainable parameter count. Claim tested (Hu et al. 2021, Dettmers et
// al. 2023): "adapting more weight matrices at a lower rank beats fewer at a
// higher rank".
//
// 3-layer tanh MLP, d = 128. Budget: 3 layers × r = 4 = 2 layers × r = 6 =
// 1 layer × r = 12, i.e. exactly (128 + 128) · 12 = 3072 trainable parameters
// in every configuration. Two teachers:
//   spread:       ΔW* of rank 4 in each of the three layers;
//   concentrated: ΔW* of rank 12 in the middle layer only.
//
//   exp_layers_vs_rank [--seeds N] [--out DIR] [--quick]
// Writes exp6_layers_vs_rank.csv and exp6_layers_vs_rank.svg.
#include "experiment_common.hpp"

using namespace exper;

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int d = 128, tokens = 512;
  const int steps = opt.quick ? 150 : 300;
  const double lr = 2e-3;
  struct Config {
    std::string name;
    std::vector<int> layers;
    int r;
  };
  const std::vector<Config> configs = {{"all @4", {0, 1, 2}, 4}, {"L1+L2 @6", {0, 1}, 6}, {"L1+L3 @6", {0, 2}, 6},
                                       {"L2+L3 @6", {1, 2}, 6},  {"L1 @12", {0}, 12},       {"L2 @12", {1}, 12},
                                       {"L3 @12", {2}, 12}};
  struct Teacher {
    std::string name;
    std::vector<int> ranks;
  };
  const std::vector<Teacher> teachers = {{"spread: rank 4 in L1, L2, L3", {4, 4, 4}},
                                         {"concentrated: rank 12 in L2", {0, 12, 0}}};

  Csv csv(opt.out + "/exp6_layers_vs_rank.csv",
          {"teacher", "config", "layers", "r", "trainable_parameters", "seed", "train_mse", "test_error"});
  std::vector<std::vector<std::vector<double>>> err(teachers.size(),
                                                    std::vector<std::vector<double>>(configs.size()));
  for (std::size_t t = 0; t < teachers.size(); ++t)
    for (int seed = 0; seed < opt.seeds; ++seed) {
      const MlpTask task = make_mlp_task(d, tokens, teachers[t].ranks, 1.0, 0.05, 7000 + seed + 100 * t);
      for (std::size_t c = 0; c < configs.size(); ++c) {
        std::vector<std::optional<Adapter>> ads(3);
        Index params = 0;
        for (int l : configs[c].layers) {
          ads[l] = make_adapter(d, d, configs[c].r, 2.0 * configs[c].r, false, 900 + seed * 1000 + c * 10 + l);
          params += ads[l]->trainable_parameters();
        }
        const TrainLog log = train_mlp(task, ads, optimizer::adam, lr, steps);
        err[t][c].push_back(log.test.back());
        std::string ls;
        for (int l : configs[c].layers) ls += fmt::format("{}L{}", ls.empty() ? "" : "+", l + 1);
        csv.row(std::string(t == 0 ? "spread" : "concentrated"), configs[c].name, ls, configs[c].r,
                static_cast<long>(params), seed, log.train.back(), log.test.back());
      }
    }

  fmt::print("layers vs rank at {} trainable parameters, 3-layer MLP d={}, Adam lr={} alpha=2r, {} steps, {} seeds\n",
             3 * 4 * 2 * d, d, lr, steps, opt.seeds);
  for (std::size_t t = 0; t < teachers.size(); ++t) {
    fmt::print("teacher: {}\n", teachers[t].name);
    for (std::size_t c = 0; c < configs.size(); ++c) {
      const Stat s = stat(err[t][c]);
      fmt::print("  {:<14} test error {:.4f} ± {:.4f}  [{:.4f}, {:.4f}]\n", configs[c].name, s.mean, s.sd, s.lo, s.hi);
    }
  }
  Plot p;
  p.title = fmt::format("Equal budget ({} parameters): where to put the rank", 3 * 4 * 2 * d);
  p.xlabel = "adapted layers @ rank (L1 = first layer)";
  p.ylabel = "test error (1 = base)";
  p.yscale = Plot::log10;
  for (const auto& c : configs) p.xcategories.push_back(c.name);
  std::vector<double> xs;
  for (std::size_t c = 0; c < configs.size(); ++c) xs.push_back(static_cast<double>(c));
  for (std::size_t t = 0; t < teachers.size(); ++t) {
    Series s = mean_series(teachers[t].name, xs, err[t]);
    s.line = false;
    // nudge the two teachers apart so the error bars do not overlap
    for (double& x : s.x) x += t == 0 ? -0.08 : 0.08;
    p.add(s);
  }
  p.width = 960;  // room for the seven category labels
  p.save(opt.out + "/exp6_layers_vs_rank.svg");
  fmt::print("exp_layers_vs_rank: {}\n", clock.report());
}
