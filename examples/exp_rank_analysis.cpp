// Experiment 4: post-hoc rank analysis. Claim tested: "the singular values of
// a trained adapter's ΔW = s·B·A reveal the rank the task needed", so an
// over-provisioned adapter can be analysed and truncated afterwards.
//
// Adapters of rank r ∈ {32, 128} are trained on teachers of known rank
// k ∈ {2, 8, 24} (one layer) and on the 3-layer MLP (k = 4 per layer); we
// estimate k from the spectrum of ΔW with three rules:
//   gap:     argmax_i σ_i / σ_{i+1} (the largest relative drop),
//   energy:  smallest i keeping 90% / 99% of Σσ² (lora::analysis::energy_rank),
// and report how much test error truncating to each estimate costs.
//
//   exp_rank_analysis [--seeds N] [--out DIR] [--quick]
// Writes exp4_rank_analysis.csv, exp4_spectra.csv, exp4_spectra_*.svg.
#include "experiment_common.hpp"

using namespace exper;

namespace {

int gap_rank(const Eigen::VectorXd& s, int r) {
  int best = 1;
  double ratio = 0;
  for (int i = 0; i + 1 < r && i + 1 < s.size(); ++i) {
    const double q = s(i) / std::max(s(i + 1), 1e-300);
    if (q > ratio) ratio = q, best = i + 1;
  }
  return best;
}
int energy_rank(const Eigen::VectorXd& s, double tau) {
  const double tot = s.squaredNorm();
  double acc = 0;
  for (int i = 0; i < s.size(); ++i) {
    acc += s(i) * s(i);
    if (acc >= tau * tot) return i + 1;
  }
  return static_cast<int>(s.size());
}
/// Best rank-q approximation of M (truncated SVD).
Mat truncate(const Mat& M, int q) {
  Eigen::BDCSVD<MatD> svd(M.cast<double>(), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const MatD U = svd.matrixU().leftCols(q), V = svd.matrixV().leftCols(q);
  return (U * svd.singularValues().head(q).asDiagonal() * V.transpose()).cast<float>();
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  Stopwatch clock;
  const int d = 256, tokens = 1024;
  const int steps = opt.quick ? 150 : 250;
  const double noise = 0.1, lr = 2e-3;
  Csv csv(opt.out + "/exp4_rank_analysis.csv",
          {"task", "layer", "k", "r", "seed", "gap_rank", "energy90_rank", "energy99_rank", "test_error",
           "test_error_truncated_gap", "test_error_truncated_e90", "test_error_truncated_e99"});
  Csv scsv(opt.out + "/exp4_spectra.csv", {"task", "layer", "k", "r", "seed", "i", "sigma", "sigma_over_sigma1"});

  fmt::print("post-hoc rank analysis (Adam lr={}, alpha=2r, {} steps, {} seeds)\n", lr, steps, opt.seeds);
  fmt::print("{:>7} {:>3} {:>4} | {:>10} {:>10} {:>10} | test error: full, cut@gap, cut@e90, cut@e99\n", "task", "k",
             "r", "gap", "energy90", "energy99");
  std::vector<Series> spectra;
  for (int k : {2, 8, 24})
    for (int r : {32, 128}) {
      std::vector<double> g, e9, e99, te, tg, t9, t99;
      for (int seed = 0; seed < opt.seeds; ++seed) {
        const LinearTask task = make_linear_task(d, tokens, flat_spectrum(k, 2.0, 1.0), noise, 5000 + seed + 10 * k);
        Adapter ad = make_adapter(d, d, r, 2.0 * r, false, 600 + seed * 1000 + r + k);
        train_linear(task, ad, make_opt(optimizer::adam, lr), steps);
        const Mat delta = ad.delta_weight();
        const Eigen::VectorXd s = singular_values(delta);
        const int rg = gap_rank(s, r), r9 = energy_rank(s, 0.9), r99 = energy_rank(s, 0.99);
        const double full = task.test_error(delta), cg = task.test_error(truncate(delta, rg)),
                     c9 = task.test_error(truncate(delta, r9)), c99 = task.test_error(truncate(delta, r99));
        g.push_back(rg), e9.push_back(r9), e99.push_back(r99);
        te.push_back(full), tg.push_back(cg), t9.push_back(c9), t99.push_back(c99);
        csv.row(std::string("linear"), 0, k, r, seed, rg, r9, r99, full, cg, c9, c99);
        for (int i = 0; i < std::min<int>(r, 64); ++i)
          scsv.row(std::string("linear"), 0, k, r, seed, i + 1, s(i), s(i) / s(0));
        if (seed == 0 && r == 128) {
          Series sp;
          sp.name = fmt::format("k = {}, r = {}", k, r);
          for (int i = 0; i < 64; ++i) sp.x.push_back(i + 1), sp.y.push_back(s(i) / s(0));
          sp.markers = false;
          spectra.push_back(sp);
        }
      }
      auto ranks_str = [](const std::vector<double>& v) {
        std::string o;
        for (double x : v) o += fmt::format("{}{:g}", o.empty() ? "" : ",", x);
        return o;
      };
      fmt::print("{:>7} {:>3} {:>4} | {:>10} {:>10} {:>10} | {:.4f}, {:.4f}, {:.4f}, {:.4f}\n", "linear", k, r,
                 ranks_str(g), ranks_str(e9), ranks_str(e99), stat(te).mean, stat(tg).mean, stat(t9).mean,
                 stat(t99).mean);
    }
  {
    Plot p;
    p.title = "Spectrum of trained ΔW = s·B·A (r = 128, one layer)";
    p.xlabel = "index i";
    p.ylabel = "σ_i / σ_1";
    p.yscale = Plot::log10;
    p.xscale = Plot::log2;
    for (auto& s : spectra) p.add(s);
    for (int k : {2, 8, 24}) p.vlines.push_back({double(k), k == 2 ? "teacher ranks k = 2, 8, 24" : ""});
    p.save(opt.out + "/exp4_spectra_linear.svg");
  }

  // the MLP: ΔW*_l of rank 4 in every layer, adapters of r = 32 on all three
  const int d2 = 128, k2 = 4, r2 = 32;
  std::vector<Series> lspectra;
  for (int seed = 0; seed < opt.seeds; ++seed) {
    const MlpTask task = make_mlp_task(d2, 1024, {k2, k2, k2}, 1.0, 0.05, 2000 + seed);
    std::vector<std::optional<Adapter>> ads(3);
    for (int l = 0; l < 3; ++l) ads[l] = make_adapter(d2, d2, r2, 2.0 * r2, false, 99 + seed * 1000 + r2 * 10 + l);
    const TrainLog log = train_mlp(task, ads, optimizer::adam, lr, steps);
    std::string line;
    for (int l = 0; l < 3; ++l) {
      const Mat delta = ads[l]->delta_weight();
      const Eigen::VectorXd s = singular_values(delta);
      const int rg = gap_rank(s, r2), r9 = energy_rank(s, 0.9), r99 = energy_rank(s, 0.99);
      // truncate this layer only and measure the whole network's error
      auto cut = [&](int q) {
        std::vector<std::optional<Adapter>> c = ads;
        const Mat t = truncate(delta, q);
        Eigen::BDCSVD<MatD> svd(t.cast<double>(), Eigen::ComputeThinU | Eigen::ComputeThinV);
        // refactor the truncated ΔW as s·B·A with B = U·Σ/s, A = Vᵀ (rank q padded with zeros to r2)
        Mat B = Mat::Zero(d2, r2), A = Mat::Zero(r2, d2);
        const double sc = ads[l]->scaling();
        B.leftCols(q) = (svd.matrixU().leftCols(q) * svd.singularValues().head(q).asDiagonal() / sc).cast<float>();
        A.topRows(q) = svd.matrixV().leftCols(q).transpose().cast<float>();
        c[l]->set_A(A);
        c[l]->set_B(B);
        return mlp_test_error(task, c);
      };
      const double cg = cut(rg), c9 = cut(r9), c99 = cut(r99);
      csv.row(std::string("mlp"), l, k2, r2, seed, rg, r9, r99, log.test.back(), cg, c9, c99);
      for (int i = 0; i < r2; ++i) scsv.row(std::string("mlp"), l, k2, r2, seed, i + 1, s(i), s(i) / s(0));
      line += fmt::format(" layer {}: gap {} e90 {} e99 {} (err {:.4f} → {:.4f}/{:.4f}/{:.4f});", l, rg, r9, r99,
                          log.test.back(), cg, c9, c99);
      if (seed == 0) {
        Series sp;
        sp.name = fmt::format("layer {}", l + 1);
        for (int i = 0; i < r2; ++i) sp.x.push_back(i + 1), sp.y.push_back(s(i) / s(0));
        sp.markers = false;
        lspectra.push_back(sp);
      }
    }
    fmt::print("mlp k={} r={} seed {}:{}\n", k2, r2, seed, line);
  }
  {
    Plot p;
    p.title = fmt::format("Spectrum of trained ΔW per layer (3-layer MLP, r = {})", r2);
    p.xlabel = "index i";
    p.ylabel = "σ_i / σ_1";
    p.yscale = Plot::log10;
    p.xscale = Plot::log2;
    for (auto& s : lspectra) p.add(s);
    p.vlines.push_back({double(k2), fmt::format("teacher rank k = {}", k2)});
    p.save(opt.out + "/exp4_spectra_mlp.svg");
  }
  fmt::print("exp_rank_analysis: {}\n", clock.report());
}
