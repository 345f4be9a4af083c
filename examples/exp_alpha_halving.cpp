// Experiment 5: changing alpha after training (PEFT's set_scale; here
// LowRankAdapter::rescale(m), i.e. alpha → m·alpha). Claims tested:
//  * "halving alpha after training halves the adapter's effect": ΔW → ΔW/2 exactly,
//    so in a linear layer the drift from the base halves and the remaining
//    error of the fit is (1 − m)² of the base's, i.e. 25% at m = ½;
//  * "it is like having trained with half the alpha": no — alpha during
//    training only sets the speed, the trained ΔW ends up at the same fit;
//  * "scaling an over-fitted adapter down a little can help": shrinkage of a
//    high-rank adapter that fitted noise.
//
//   exp_alpha_halving [--seeds N] [--out DIR] [--quick]
// Writes exp5_alpha_halving.csv and exp5_alpha_halving_{fit,tradeoff}.svg.
#include "experiment_common.hpp"

using namespace exper;

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int steps = opt.quick ? 150 : 300;
  const double lr = 2e-3;
  std::vector<double> ms;
  for (int i = 0; i <= 15; ++i) ms.push_back(i * 0.1);

  Csv csv(opt.out + "/exp5_alpha_halving.csv",
          {"task", "variant", "r", "alpha_trained", "multiplier", "seed", "test_error", "drift"});

  // (a) one layer, d = 128, teacher rank 8; adapters r = 16 (alpha 32) and r = 128 (over-fits the noise)
  const int d = 128, tokens = 512, k = 8;
  const double noise = 0.2;
  struct Variant {
    std::string name;
    int r;
  };
  const std::vector<Variant> variants = {{"r16", 16}, {"r128", 128}};
  std::vector<std::vector<std::vector<double>>> fit(variants.size(), std::vector<std::vector<double>>(ms.size()));
  auto drift_a = fit;
  std::vector<double> half_trained_fit, half_trained_drift, full_fit;
  std::vector<double> best_m_r128;
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const LinearTask task = make_linear_task(d, tokens, flat_spectrum(k, 2.0, 1.0), noise, 6000 + seed);
    for (std::size_t v = 0; v < variants.size(); ++v) {
      const int r = variants[v].r;
      Adapter ad = make_adapter(d, d, r, 2.0 * r, false, 700 + seed * 1000 + r);
      train_linear(task, ad, make_opt(optimizer::adam, lr), steps);
      const Mat delta = ad.delta_weight();
      double best = INFINITY, bm = 1;
      for (std::size_t i = 0; i < ms.size(); ++i) {
        Adapter c = ad;
        c.rescale(ms[i]);
        const Mat dm = c.delta_weight();
        const double f = task.test_error(dm), dr = dm.squaredNorm() / task.teacher_sq;
        fit[v][i].push_back(f);
        drift_a[v][i].push_back(dr);
        csv.row(std::string("linear"), variants[v].name, r, 2.0 * r, ms[i], seed, f, dr);
        if (f < best) best = f, bm = ms[i];
      }
      if (r == 128) best_m_r128.push_back(bm);
      if (r == 16) {
        full_fit.push_back(task.test_error(delta));
        // the same adapter trained from the start with half the alpha
        Adapter h = make_adapter(d, d, r, r, false, 700 + seed * 1000 + r);
        train_linear(task, h, make_opt(optimizer::adam, lr), steps);
        const Mat dh = h.delta_weight();
        half_trained_fit.push_back(task.test_error(dh));
        half_trained_drift.push_back(dh.squaredNorm() / task.teacher_sq);
        csv.row(std::string("linear"), std::string("r16_trained_half_alpha"), r, 1.0 * r, 1.0, seed,
                half_trained_fit.back(), half_trained_drift.back());
      }
    }
  }
  const std::size_t half = 5;  // ms[5] = 0.5
  fmt::print("(a) one layer d={} k={} noise={}: r=16 alpha=32, Adam lr={} {} steps, {} seeds\n", d, k, noise, lr, steps,
             opt.seeds);
  fmt::print("  trained (m=1):       test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(fit[0][10]).mean,
             stat(fit[0][10]).sd, stat(drift_a[0][10]).mean);
  fmt::print("  alpha halved (m=½):  test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(fit[0][half]).mean,
             stat(fit[0][half]).sd, stat(drift_a[0][half]).mean);
  fmt::print("  trained with alpha/2: test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(half_trained_fit).mean,
             stat(half_trained_fit).sd, stat(half_trained_drift).mean);
  {
    const Stat b = stat(best_m_r128);
    fmt::print("  r=128 (over-fitted): error at m=1 {:.4f}, best m {:.2f} ± {:.2f} with error {:.4f}\n",
               stat(fit[1][10]).mean, b.mean, b.sd, [&] {
                 std::vector<double> v;
                 for (std::size_t s = 0; s < fit[1][0].size(); ++s) {
                   double best = INFINITY;
                   for (std::size_t i = 0; i < ms.size(); ++i) best = std::min(best, fit[1][i][s]);
                   v.push_back(best);
                 }
                 return stat(v).mean;
               }());
  }

  // (b) the 3-layer MLP, r = 8 on every layer
  const int d2 = 128, k2 = 4, r2 = 8;
  std::vector<std::vector<double>> fit_b(ms.size()), drift_b(ms.size());
  std::vector<double> hb_fit, hb_drift;
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const MlpTask task = make_mlp_task(d2, 512, {k2, k2, k2}, 1.0, 0.05, 6500 + seed);
    std::vector<std::optional<Adapter>> ads(3), hads(3);
    for (int l = 0; l < 3; ++l) {
      ads[l] = make_adapter(d2, d2, r2, 2.0 * r2, false, 800 + seed * 1000 + l);
      hads[l] = make_adapter(d2, d2, r2, 1.0 * r2, false, 800 + seed * 1000 + l);
    }
    train_mlp(task, ads, optimizer::adam, lr, steps);
    train_mlp(task, hads, optimizer::adam, lr, steps);
    for (std::size_t i = 0; i < ms.size(); ++i) {
      auto c = ads;
      for (auto& a : c) a->rescale(ms[i]);
      fit_b[i].push_back(mlp_test_error(task, c));
      drift_b[i].push_back(mlp_drift(task, c));
      csv.row(std::string("mlp"), std::string("r8"), r2, 2.0 * r2, ms[i], seed, fit_b[i].back(), drift_b[i].back());
    }
    hb_fit.push_back(mlp_test_error(task, hads));
    hb_drift.push_back(mlp_drift(task, hads));
    csv.row(std::string("mlp"), std::string("r8_trained_half_alpha"), r2, 1.0 * r2, 1.0, seed, hb_fit.back(),
            hb_drift.back());
  }
  fmt::print("(b) 3-layer MLP d={} k={} per layer, r={} alpha={}\n", d2, k2, r2, 2 * r2);
  fmt::print("  trained (m=1):        test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(fit_b[10]).mean,
             stat(fit_b[10]).sd, stat(drift_b[10]).mean);
  fmt::print("  alpha halved (m=½):   test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(fit_b[half]).mean,
             stat(fit_b[half]).sd, stat(drift_b[half]).mean);
  fmt::print("  trained with alpha/2: test error {:.4f} ± {:.4f}, drift {:.3f}\n", stat(hb_fit).mean,
             stat(hb_fit).sd, stat(hb_drift).mean);

  {
    Plot p;
    p.title = "Rescaling alpha after training: fit and drift";
    p.xlabel = "multiplier m (alpha → m·alpha after training)";
    p.ylabel = "relative to the base model (1 = base)";
    auto s = mean_series("test error, one layer r = 16", ms, fit[0]);
    s.color = detail::palette(0);
    p.add(s);
    s = mean_series("drift, one layer r = 16", ms, drift_a[0]);
    s.color = detail::palette(0);
    s.dashed = true;
    p.add(s);
    s = mean_series("test error, 3-layer MLP r = 8", ms, fit_b);
    s.color = detail::palette(1);
    p.add(s);
    s = mean_series("drift, 3-layer MLP r = 8", ms, drift_b);
    s.color = detail::palette(1);
    s.dashed = true;
    p.add(s);
    Series t;
    t.name = "(1 − m)²";
    t.color = "#999999";
    t.markers = false;
    t.dashed = true;
    for (double m : ms) t.x.push_back(m), t.y.push_back((1 - m) * (1 - m));
    p.add(t);
    Series h;
    h.name = "trained with alpha/2 (one layer, MLP)";
    h.line = false;
    h.color = "#000000";
    h.x = {1.0, 1.0};
    h.y = {stat(half_trained_fit).mean, stat(hb_fit).mean};
    p.add(h);
    p.vlines.push_back({0.5, "m = ½"});
    p.ymax = 2.0;
    p.ymin = 0.0;
    p.save(opt.out + "/exp5_alpha_halving_fit.svg");
  }
  {
    Plot p;
    p.title = "Over-fitted adapter (one layer, r = 128): scaling down after training";
    p.xlabel = "multiplier m";
    p.ylabel = "test error (1 = base)";
    p.yscale = Plot::log10;
    p.add(mean_series("r = 128", ms, fit[1]));
    p.add(mean_series("r = 16", ms, fit[0]));
    p.vlines.push_back({1.0, "as trained"});
    p.xmin = 0.5;
    p.xmax = 1.5;
    p.ymax = 0.5;
    p.save(opt.out + "/exp5_alpha_halving_shrink.svg");
  }
  fmt::print("exp_alpha_halving: {}\n", clock.report());
}
