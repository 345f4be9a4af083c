// Experiment 1: rank sweep r = 1 … 256 on tasks whose true rank is known.
// Claim tested: "loss against rank has a knee at the rank of the needed update".
//
//   exp_rank_sweep [--seeds N] [--out DIR] [--quick]
// Writes exp1_rank_sweep.csv and exp1_rank_sweep_{linear,mlp}.svg.
#include "experiment_common.hpp"

using namespace exper;

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int steps = opt.quick ? 150 : 250;
  const double lr = 2e-3;  // Adam, alpha = 2r (s = 2) for every r

  Csv csv(opt.out + "/exp1_rank_sweep.csv", {"task", "k", "r", "alpha", "seed", "steps", "train_mse", "test_error"});

  // (a) one linear layer, d = 256, ΔW* of rank 8 plus noise
  const int d = 256, tokens = 1024, k = 8;
  const double noise = 0.1;
  const std::vector<int> ranks = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  std::vector<std::vector<double>> test_a(ranks.size()), train_a(ranks.size());
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const LinearTask task = make_linear_task(d, tokens, flat_spectrum(k, 2.0, 1.0), noise, 1000 + seed);
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      const int r = ranks[i];
      Adapter ad = make_adapter(d, d, r, 2.0 * r, false, 77 + seed * 1000 + r);
      const TrainLog log = train_linear(task, ad, make_opt(optimizer::adam, lr), steps);
      test_a[i].push_back(log.test.back());
      train_a[i].push_back(log.train.back());
      csv.row(std::string("linear"), k, r, 2.0 * r, seed, steps, log.train.back(), log.test.back());
    }
  }
  fmt::print("(a) linear d={} k={} noise={} tokens={}, Adam lr={} alpha=2r, {} steps, {} seeds\n", d, k, noise,
             tokens, lr, steps, opt.seeds);
  fmt::print("{:>5} {:>22} {:>22}\n", "r", "test error (mean±sd)", "train MSE (mean±sd)");
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    const Stat a = stat(test_a[i]), b = stat(train_a[i]);
    fmt::print("{:>5} {:>12.5f} ± {:<8.5f} {:>12.6f} ± {:<8.6f}\n", ranks[i], a.mean, a.sd, b.mean, b.sd);
  }

  std::vector<double> xr(ranks.begin(), ranks.end());
  {
    Plot p;
    p.title = fmt::format("Rank sweep, one layer: teacher rank k = {}, d = {}", k, d);
    p.xlabel = "adapter rank r";
    p.ylabel = "test error  ‖ΔW − ΔW*‖² / ‖ΔW*‖²";
    p.xscale = Plot::log2;
    p.yscale = Plot::log10;
    p.add(mean_series("test error", xr, test_a));
    // the best a rank-r matrix can do: drop the r smallest of the k singular values
    const auto sig = flat_spectrum(k, 2.0, 1.0);
    double tot = 0;
    for (double s : sig) tot += s * s;
    Series opt_s;
    opt_s.name = "optimum of rank r (no noise)";
    opt_s.dashed = true;
    opt_s.markers = false;
    for (int r : ranks) {
      double rest = 0;
      for (int i = r; i < k; ++i) rest += sig[i] * sig[i];
      opt_s.x.push_back(r);
      opt_s.y.push_back(rest / tot);
    }
    p.add(opt_s);
    p.vlines.push_back({double(k), fmt::format("teacher rank k = {}", k)});
    // E‖ΔW_ls − ΔW*‖² = noise²·d·tr((XᵀX)⁻¹) ≈ noise²·d²/(T − d) for the unconstrained least squares
    p.hlines.push_back({noise * noise * d * d / (tokens - d) / tot, "full-rank least squares (theory)"});
    p.save(opt.out + "/exp1_rank_sweep_linear.svg");
  }

  // (b) 3-layer tanh MLP, d = 128, ΔW*_l of rank 4 in every layer; one adapter per layer
  const int d2 = 128, k2 = 4;
  const std::vector<int> ranks2 = {1, 2, 4, 8, 16, 32, 64, 128};
  std::vector<std::vector<double>> test_b(ranks2.size()), train_b(ranks2.size());
  const int steps2 = opt.quick ? 150 : 250;
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const MlpTask task = make_mlp_task(d2, 1024, {k2, k2, k2}, 1.0, 0.05, 2000 + seed);
    for (std::size_t i = 0; i < ranks2.size(); ++i) {
      const int r = ranks2[i];
      std::vector<std::optional<Adapter>> ads(3);
      for (int l = 0; l < 3; ++l) ads[l] = make_adapter(d2, d2, r, 2.0 * r, false, 99 + seed * 1000 + r * 10 + l);
      const TrainLog log = train_mlp(task, ads, optimizer::adam, lr, steps2);
      test_b[i].push_back(log.test.back());
      train_b[i].push_back(log.train.back());
      csv.row(std::string("mlp"), k2, r, 2.0 * r, seed, steps2, log.train.back(), log.test.back());
    }
  }
  fmt::print("\n(b) 3-layer tanh MLP d={} k={} per layer, Adam lr={} alpha=2r, {} steps\n", d2, k2, lr, steps2);
  fmt::print("{:>5} {:>22} {:>22}\n", "r", "test error (mean±sd)", "train MSE (mean±sd)");
  for (std::size_t i = 0; i < ranks2.size(); ++i) {
    const Stat a = stat(test_b[i]), b = stat(train_b[i]);
    fmt::print("{:>5} {:>12.5f} ± {:<8.5f} {:>12.6f} ± {:<8.6f}\n", ranks2[i], a.mean, a.sd, b.mean, b.sd);
  }
  {
    Plot p;
    p.title = fmt::format("Rank sweep, 3-layer MLP: teacher rank k = {} per layer", k2);
    p.xlabel = "adapter rank r (each of 3 layers)";
    p.ylabel = "test error (1 = base model)";
    p.xscale = Plot::log2;
    p.yscale = Plot::log10;
    p.add(mean_series("test error", std::vector<double>(ranks2.begin(), ranks2.end()), test_b));
    p.vlines.push_back({double(k2), fmt::format("teacher rank k = {}", k2)});
    p.save(opt.out + "/exp1_rank_sweep_mlp.svg");
  }
  fmt::print("\nexp_rank_sweep: {}\n", clock.report());
}
