// Experiment 3: standard (s = alpha/r) vs rsLoRA (s = alpha/√r) scaling for
// r = 4 … 256 at one learning rate. Claim tested (Kalajdzievski 2023): with
// alpha/r the gradients shrink as r grows and high ranks learn no better than
// low ranks ("gradient collapse"); alpha/√r keeps learning stable across r, so
// higher ranks pay off.
//
// The teacher's spectrum decays as a power law over all 256 directions, so more
// rank can help. One learning rate for every run (Adam, 1e-3, alpha = 16); a
// second pass retunes the learning rate per (rule, r) to separate "the rule is
// wrong" from "the rule only moves the best learning rate".
//
//   exp_rslora [--seeds N] [--out DIR] [--quick]
// Writes exp3_rslora{,_curves,_tuned}.csv and exp3_rslora_{loss,grad,speed,curves,tuned}.svg.
#include "experiment_common.hpp"

using namespace exper;

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int d = 256, tokens = 1024;
  const int steps = opt.quick ? 100 : 200;
  const double noise = 0.05, alpha = 16, lr = 1e-3;
  std::vector<double> sigma(d);
  for (int i = 0; i < d; ++i) sigma[i] = 2.0 * std::pow(i + 1.0, -0.7);
  const std::vector<int> ranks = {4, 8, 16, 32, 64, 128, 256};

  Csv csv(opt.out + "/exp3_rslora.csv", {"scaling", "r", "alpha", "s", "lr", "seed", "steps", "train_mse",
                                         "test_error", "grad_B_at_init", "mean_grad_A", "mean_grad_B", "dW_speed_first10"});
  Csv ccsv(opt.out + "/exp3_rslora_curves.csv", {"scaling", "r", "seed", "step", "test_error"});

  // the best any rank-r matrix can do (Eckart–Young on ΔW*, no noise)
  double tot = 0;
  for (double s : sigma) tot += s * s;
  auto optimum = [&](int r) {
    double rest = 0;
    for (int i = r; i < d; ++i) rest += sigma[i] * sigma[i];
    return rest / tot;
  };
  auto rule = [](int m) { return std::string(m ? "rslora" : "standard"); };
  std::vector<double> xr(ranks.begin(), ranks.end());
  // A plot over r (log2) of a quantity on a log10 axis.
  auto over_rank = [](std::string title, std::string ylabel) {
    Plot p;
    p.title = std::move(title);
    p.xlabel = "rank r";
    p.ylabel = std::move(ylabel);
    p.xscale = Plot::log2;
    p.yscale = Plot::log10;
    return p;
  };
  // Both rules' per-seed values at each r: mean with min–max bars.
  auto add_rules = [&](Plot& p, const std::vector<std::vector<double>> (&per_rule)[2]) {
    p.add(mean_series("standard  s = alpha/r", xr, per_rule[0]));
    p.add(mean_series("rsLoRA  s = alpha/√r", xr, per_rule[1]));
  };
  auto best_fit = [&] {
    Series o;
    o.name = "best rank-r fit (no noise)";
    o.dashed = true;
    o.markers = false;
    for (int r : ranks) o.x.push_back(r), o.y.push_back(optimum(r));
    return o;
  };

  std::vector<std::vector<double>> err[2], ga[2], gb[2], speed[2], g0[2];
  for (int m = 0; m < 2; ++m) {
    err[m].resize(ranks.size());
    g0[m].resize(ranks.size());
    ga[m].resize(ranks.size());
    gb[m].resize(ranks.size());
    speed[m].resize(ranks.size());
  }
  std::vector<Series> curves;
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const LinearTask task = make_linear_task(d, tokens, sigma, noise, 4000 + seed);
    for (int m = 0; m < 2; ++m)
      for (std::size_t i = 0; i < ranks.size(); ++i) {
        const int r = ranks[i];
        Adapter ad = make_adapter(d, d, r, alpha, m == 1, 300 + seed * 1000 + r);
        const TrainLog log = train_linear(task, ad, make_opt(optimizer::adam, lr), steps, 10);
        err[m][i].push_back(log.test.back());
        ga[m][i].push_back(log.grad_a);
        gb[m][i].push_back(log.grad_b);
        speed[m][i].push_back(log.first_update);
        g0[m][i].push_back(log.grad_b_init);
        csv.row(rule(m), r, alpha, ad.scaling(), lr, seed, steps, log.train.back(),
                log.test.back(), log.grad_b_init, log.grad_a, log.grad_b, log.first_update);
        for (std::size_t j = 0; j < log.step.size(); ++j)
          ccsv.row(rule(m), r, seed, log.step[j], log.test[j]);
        if (seed == 0 && (r == 4 || r == 32 || r == 256)) {
          Series s;
          s.name = fmt::format("{} r = {}", m ? "rsLoRA" : "standard", r);
          s.x.assign(log.step.begin(), log.step.end());
          s.y = log.test;
          s.markers = false;
          s.dashed = m == 0;
          s.color = detail::palette(r == 4 ? 0 : r == 32 ? 1 : 2);
          curves.push_back(s);
        }
      }
  }

  fmt::print("standard vs rsLoRA: d={} power-law teacher, Adam lr={} alpha={}, {} steps, {} seeds\n", d, lr, alpha,
             steps, opt.seeds);
  fmt::print("{:>5} | {:>20} {:>9} {:>9} {:>9} {:>9} | {:>20} {:>9} {:>9} {:>9} {:>9} | {:>8}\n", "r", "standard err",
             "|dB|@0", "|dA|", "|dB|", "|ΔW|/st", "rsLoRA err", "|dB|@0", "|dA|", "|dB|", "|ΔW|/st", "optimum");
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    const Stat e0 = stat(err[0][i]), e1 = stat(err[1][i]);
    fmt::print("{:>5} | {:>10.4f} ± {:<7.4f} {:>9.3g} {:>9.3g} {:>9.3g} {:>9.3g} | {:>10.4f} ± {:<7.4f} {:>9.3g} {:>9.3g} "
               "{:>9.3g} {:>9.3g} | {:>8.4f}\n",
               ranks[i], e0.mean, e0.sd, stat(g0[0][i]).mean, stat(ga[0][i]).mean, stat(gb[0][i]).mean,
               stat(speed[0][i]).mean, e1.mean, e1.sd, stat(g0[1][i]).mean, stat(ga[1][i]).mean, stat(gb[1][i]).mean,
               stat(speed[1][i]).mean, optimum(ranks[i]));
  }

  {
    Plot p = over_rank(fmt::format("Error after {} steps at one lr (Adam {:g}, alpha = {:g})", steps, lr, alpha),
                       "test error (1 = base)");
    add_rules(p, err);
    p.add(best_fit());
    p.save(opt.out + "/exp3_rslora_loss.svg");
  }
  {
    Plot p = over_rank("‖∂L/∂B‖ at initialisation (B = 0, A = PEFT's default)", "‖∂L/∂B‖_F at step 0");
    add_rules(p, g0);
    Series ref;
    ref.name = "∝ 1/√r";
    ref.dashed = true;
    ref.markers = false;
    ref.color = "#999999";
    for (int r : ranks) ref.x.push_back(r), ref.y.push_back(stat(g0[0][0]).mean * std::sqrt(4.0 / r));
    p.add(ref);
    p.save(opt.out + "/exp3_rslora_grad.svg");
  }
  {
    Plot p = over_rank("How fast ΔW moves in the first 10 steps (Adam, one lr)", "‖ΔW after 10 steps‖_F / 10");
    add_rules(p, speed);
    p.save(opt.out + "/exp3_rslora_speed.svg");
  }
  {
    Plot p;
    p.title = "Test error during training (seed 0; dashed = standard)";
    p.xlabel = "step";
    p.ylabel = "test error (1 = base)";
    p.yscale = Plot::log10;
    for (auto& s : curves) p.add(s);
    p.save(opt.out + "/exp3_rslora_curves.svg");
  }

  // retune: best lr per (rule, r) over a small grid, seed 0 only
  const std::vector<double> lrs = {1e-3, 4e-3, 1.6e-2, 6.4e-2};
  Csv tcsv(opt.out + "/exp3_rslora_tuned.csv", {"scaling", "r", "lr", "test_error"});
  std::vector<std::vector<double>> best(2, std::vector<double>(ranks.size(), INFINITY));
  std::vector<std::vector<double>> best_lr(2, std::vector<double>(ranks.size(), 0));
  const LinearTask task = make_linear_task(d, tokens, sigma, noise, 4000);
  const std::vector<int> tranks = opt.quick ? std::vector<int>{4, 64} : ranks;
  for (int m = 0; m < 2; ++m)
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      if (std::find(tranks.begin(), tranks.end(), ranks[i]) == tranks.end()) continue;
      for (double l : lrs) {
        Adapter ad = make_adapter(d, d, ranks[i], alpha, m == 1, 300 + ranks[i]);
        const TrainLog log = train_linear(task, ad, make_opt(optimizer::adam, l), steps);
        tcsv.row(rule(m), ranks[i], l, log.test.back());
        if (log.test.back() < best[m][i]) best[m][i] = log.test.back(), best_lr[m][i] = l;
      }
    }
  fmt::print("\nbest lr per (rule, r) from {{1e-3, 4e-3, 1.6e-2, 6.4e-2}}, seed 0:\n");
  for (std::size_t i = 0; i < ranks.size(); ++i)
    fmt::print("r={:>4}: standard {:.4f} (lr {:g})   rsLoRA {:.4f} (lr {:g})\n", ranks[i], best[0][i], best_lr[0][i],
               best[1][i], best_lr[1][i]);
  {
    Plot p = over_rank(fmt::format("Error after {} steps, lr tuned per point (seed 0)", steps), "test error (1 = base)");
    Series a, b;
    a.name = "standard, best lr";
    b.name = "rsLoRA, best lr";
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      if (std::isfinite(best[0][i])) a.x.push_back(ranks[i]), a.y.push_back(best[0][i]);
      if (std::isfinite(best[1][i])) b.x.push_back(ranks[i]), b.y.push_back(best[1][i]);
    }
    p.add(a);
    p.add(b);
    p.add(best_fit());
    p.save(opt.out + "/exp3_rslora_tuned.svg");
  }
  fmt::print("exp_rslora: {}\n", clock.report());
}
