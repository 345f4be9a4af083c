// Experiment 2: alpha sweep at fixed r. Claim tested: "alpha acts as a
// learning-rate multiplier". With s = alpha/r and B = 0 at the start, the
// gradients of A and B carry one factor s and ΔW = s·B·A another, so the
// step of ΔW is ∝ lr·s² under SGD and ∝ lr·s under Adam (which divides out the
// gradient's scale) while A stays near its initial value. We train on a grid of
// (alpha, lr) and measure which exponent p makes the curves of final error
// against lr·s^p collapse onto one.
//
//   exp_alpha_sweep [--seeds N] [--out DIR] [--quick]
// Writes exp2_alpha_grid.csv, exp2_alpha_curves.csv, exp2_alpha_*.svg.
#include "experiment_common.hpp"

using namespace exper;

namespace {

struct Cell {
  double alpha, lr, err;
};

// Mean squared distance between the curves log(err) vs log(lr) + p·log(s) of
// different alphas, over the x range where both are defined (linear interpolation).
double collapse_spread(const std::vector<Cell>& cells, const std::vector<double>& alphas, int r, double p) {
  std::vector<std::vector<std::pair<double, double>>> curves;
  for (double a : alphas) {
    std::vector<std::pair<double, double>> c;
    for (const Cell& x : cells)
      if (x.alpha == a && std::isfinite(x.err) && x.err < 2.0)
        c.push_back({std::log(x.lr) + p * std::log(a / r), std::log(x.err)});
    std::sort(c.begin(), c.end());
    if (c.size() >= 2) curves.push_back(c);
  }
  auto at = [](const std::vector<std::pair<double, double>>& c, double x) {
    for (std::size_t i = 1; i < c.size(); ++i)
      if (x <= c[i].first) {
        const double t = (x - c[i - 1].first) / (c[i].first - c[i - 1].first);
        return c[i - 1].second + t * (c[i].second - c[i - 1].second);
      }
    return c.back().second;
  };
  double sum = 0;
  int n = 0;
  for (std::size_t i = 0; i < curves.size(); ++i)
    for (std::size_t j = i + 1; j < curves.size(); ++j) {
      const double lo = std::max(curves[i].front().first, curves[j].front().first);
      const double hi = std::min(curves[i].back().first, curves[j].back().first);
      if (hi <= lo) continue;
      for (int q = 0; q <= 10; ++q) {
        const double x = lo + (hi - lo) * q / 10.0;
        const double dlt = at(curves[i], x) - at(curves[j], x);
        sum += dlt * dlt;
        ++n;
      }
    }
  return n ? sum / n : INFINITY;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int d = 128, tokens = 512, k = 8, r = 16;
  const int steps = opt.quick ? 100 : 150;
  const double noise = 0.1;
  const std::vector<double> alphas = {1, 2, 4, 8, 16, 32, 64, 128};
  std::vector<double> lr_adam, lr_sgd;
  for (int i = 0; i <= 12; ++i) lr_adam.push_back(1e-4 * std::pow(10.0, i * 0.25));  // 1e-4 … 1e-1
  for (int i = 0; i <= 20; ++i) lr_sgd.push_back(1e-2 * std::pow(10.0, i * 0.25));   // 1e-2 … 1e3

  Csv grid(opt.out + "/exp2_alpha_grid.csv", {"optimizer", "r", "alpha", "s", "lr", "seed", "steps", "test_error"});
  Csv curves(opt.out + "/exp2_alpha_curves.csv", {"optimizer", "r", "alpha", "lr", "seed", "step", "train_mse"});

  const LinearTask task = make_linear_task(d, tokens, flat_spectrum(k, 2.0, 1.0), noise, 3000);
  std::vector<Cell> cells_adam, cells_sgd;
  const double lr_adam_fixed = 1e-3, lr_sgd_fixed = 0.1;
  std::vector<Series> curve_adam, curve_sgd;
  for (optimizer o : {optimizer::adam, optimizer::sgd}) {
    const auto& lrs = o == optimizer::adam ? lr_adam : lr_sgd;
    for (double a : alphas)
      for (double lr : lrs) {
        const bool fixed = std::abs(lr / (o == optimizer::adam ? lr_adam_fixed : lr_sgd_fixed) - 1) < 1e-9;
        std::vector<double> errs;
        Series cs;
        for (int seed = 0; seed < (fixed ? opt.seeds : 1); ++seed) {
          Adapter ad = make_adapter(d, d, r, a, false, 500 + seed);
          const TrainLog log = train_linear(task, ad, make_opt(o, lr), steps, fixed ? 5 : 0);
          errs.push_back(log.test.back());
          grid.row(std::string(name(o)), r, a, a / r, lr, seed, steps, log.test.back());
          if (fixed) {
            for (std::size_t i = 0; i < log.step.size(); ++i)
              curves.row(std::string(name(o)), r, a, lr, seed, log.step[i], log.train[i]);
            if (seed == 0) {
              cs.name = fmt::format("alpha = {:g}", a);
              for (std::size_t i = 0; i < log.step.size(); ++i) cs.x.push_back(log.step[i]), cs.y.push_back(log.train[i]);
              cs.markers = false;
            }
          }
        }
        (o == optimizer::adam ? cells_adam : cells_sgd).push_back({a, lr, stat(errs).mean});
        if (fixed) (o == optimizer::adam ? curve_adam : curve_sgd).push_back(cs);
      }
  }

  // which exponent p collapses the curves?
  fmt::print("alpha sweep: d={} r={} k={}, {} steps; spread of log(error) between alphas at equal lr·s^p\n", d, r, k,
             steps);
  fmt::print("{:>5} {:>12} {:>12}\n", "p", "adam", "sgd");
  double best_adam = 0, best_sgd = 0, sa = INFINITY, ss = INFINITY;
  for (int i = 0; i <= 12; ++i) {
    const double p = i * 0.25;
    const double a = collapse_spread(cells_adam, alphas, r, p), b = collapse_spread(cells_sgd, alphas, r, p);
    if (a < sa) sa = a, best_adam = p;
    if (b < ss) ss = b, best_sgd = p;
    fmt::print("{:>5.2f} {:>12.4f} {:>12.4f}\n", p, a, b);
  }
  fmt::print("best p: adam {:.2f}, sgd {:.2f}\n", best_adam, best_sgd);
  {
    Csv c(opt.out + "/exp2_alpha_collapse.csv", {"optimizer", "p", "spread"});
    for (int i = 0; i <= 12; ++i) {
      c.row(std::string("adam"), i * 0.25, collapse_spread(cells_adam, alphas, r, i * 0.25));
      c.row(std::string("sgd"), i * 0.25, collapse_spread(cells_sgd, alphas, r, i * 0.25));
    }
  }

  auto grid_plot = [&](const std::vector<Cell>& cells, const char* oname, double p, const std::string& xlab,
                       const std::string& file) {
    Plot pl;
    const std::string sp = p == 1 ? "s" : p == 2 ? "s²" : p == 0.5 ? "√s" : fmt::format("s^{:g}", p);
    pl.title = fmt::format("{}: error after {} steps against lr·{} (r = {})", oname, steps, sp, r);
    pl.xlabel = xlab;
    pl.ylabel = "test error (1 = base)";
    pl.xscale = Plot::log10;
    pl.yscale = Plot::log10;
    pl.ymax = 2.0;
    for (double a : alphas) {
      Series s;
      s.name = fmt::format("alpha = {:g} (s = {:g})", a, a / r);
      for (const Cell& c : cells)
        if (c.alpha == a) {
          s.x.push_back(c.lr * std::pow(a / r, p));
          s.y.push_back(c.err < 2.0 ? c.err : NAN);  // diverged or blown up: a gap
        }
      pl.add(s);
    }
    pl.save(opt.out + "/" + file);
  };
  grid_plot(cells_adam, "Adam", 1.0, "lr · s   (s = alpha / r)", "exp2_alpha_adam_lr_s.svg");
  grid_plot(cells_adam, "Adam", 0.5, "lr · √s   (s = alpha / r)", "exp2_alpha_adam_lr_sqrt_s.svg");
  grid_plot(cells_sgd, "SGD", 2.0, "lr · s²   (s = alpha / r)", "exp2_alpha_sgd_lr_s2.svg");
  grid_plot(cells_sgd, "SGD", 1.0, "lr · s   (s = alpha / r)", "exp2_alpha_sgd_lr_s.svg");

  for (int which = 0; which < 2; ++which) {
    Plot pl;
    pl.title = which == 0 ? fmt::format("Adam, lr = {:g}, r = {}: training loss by alpha", lr_adam_fixed, r)
                          : fmt::format("SGD, lr = {:g}, r = {}: training loss by alpha", lr_sgd_fixed, r);
    pl.xlabel = "step";
    pl.ylabel = "train MSE";
    pl.yscale = Plot::log10;
    pl.ymax = 0.2;
    for (const Series& s : which == 0 ? curve_adam : curve_sgd) pl.add(s);
    pl.hlines.push_back({noise * noise, "noise floor"});
    pl.save(opt.out + (which == 0 ? "/exp2_alpha_curves_adam.svg" : "/exp2_alpha_curves_sgd.svg"));
  }
  // final error at the fixed lr as a function of alpha
  for (optimizer o : {optimizer::adam, optimizer::sgd}) {
    const double lrf = o == optimizer::adam ? lr_adam_fixed : lr_sgd_fixed;
    fmt::print("{} lr={:g}: ", name(o), lrf);
    for (const Cell& c : o == optimizer::adam ? cells_adam : cells_sgd)
      if (std::abs(c.lr / lrf - 1) < 1e-9) fmt::print("a={:g}:{:.4f} ", c.alpha, c.err);
    fmt::print("\n");
  }
  fmt::print("exp_alpha_sweep: {}\n", clock.report());
}
