#pragma once
// Shared pieces of the rank/alpha experiments (examples/exp_*.cpp): synthetic
// tasks with a known answer, a small Adam, a 3-layer MLP with adapters, CSV
// output and a dependency-free SVG line plot. Not part of the library.
//
// Tasks
//  * LinearTask: one linear layer, y = x·(W0 + ΔW*)ᵀ + noise with ΔW* of rank k.
//    Full-batch training only needs XᵀX and XᵀR (R = Y − X·W0ᵀ), so the T tokens
//    are compressed once by a QR decomposition X = Q·Rx: for any M,
//      ‖X·Mᵀ − R‖² = ‖Rx·Mᵀ − QᵀR‖² + (‖R‖² − ‖QᵀR‖²),
//    and the adapter trains on d "tokens" Rx with targets QᵀR: same loss, same
//    gradients, T/d times cheaper. Inputs are N(0, I), so the population (test)
//    error of a delta ΔW is exactly ‖ΔW − ΔW*‖²_F / d per output element.
//  * MlpTask: 3 layers d → d → d → d with tanh between them, frozen random base
//    weights; the teacher adds a low-rank ΔW*_l to some layers.
#include <lora/lora.hpp>
#include <lora/train/loraplus.hpp>
#include <lora/train/optim.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace exper {

using lora::Index;
using Mat = lora::Matrix<float>;
using MatD = lora::Matrix<double>;
/// One adapter type for both scaling rules: dynamic_scaling{rslora}.
using Adapter = lora::LowRankAdapter<float, lora::cpu, lora::dynamic_scaling>;

// ---------------------------------------------------------------- command line

struct Options {
  int seeds = 3;
  std::string out = "docs/experiments";
  bool quick = false;  ///< fewer seeds/steps, for a smoke test
};

inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seeds" && i + 1 < argc)
      o.seeds = std::atoi(argv[++i]);
    else if (a == "--out" && i + 1 < argc)
      o.out = argv[++i];
    else if (a == "--quick")
      o.quick = true;
    else {
      fmt::print(stderr, "usage: {} [--seeds N] [--out DIR] [--quick]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.quick) o.seeds = 1;
  std::filesystem::create_directories(o.out);
  return o;
}

/// Wall-clock and process CPU time since construction (the machine may be shared,
/// so both are reported).
struct Stopwatch {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  std::clock_t c0 = std::clock();
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
  double cpu_seconds() const { return static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC; }
  std::string report() const { return fmt::format("{:.1f} s wall, {:.1f} s CPU", seconds(), cpu_seconds()); }
};

// ---------------------------------------------------------------- random data

inline Mat randn(Index rows, Index cols, lora::Generator& g, double sd = 1.0) {
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(g.normal(0.0, sd));
  return m;
}

/// A [n × k] matrix with orthonormal columns (QR of a Gaussian matrix).
inline MatD random_orthonormal(Index n, Index k, lora::Generator& g) {
  MatD G(n, k);
  for (Index i = 0; i < G.size(); ++i) G.data()[i] = g.normal();
  Eigen::HouseholderQR<MatD> qr(G);
  return qr.householderQ() * MatD::Identity(n, k);
}

/// U·diag(σ)·Vᵀ with random orthonormal U [out × k], V [in × k].
inline Mat low_rank(Index out, Index in, const std::vector<double>& sigma, lora::Generator& g) {
  const Index k = static_cast<Index>(sigma.size());
  const MatD U = random_orthonormal(out, k, g), V = random_orthonormal(in, k, g);
  Eigen::VectorXd s = Eigen::Map<const Eigen::VectorXd>(sigma.data(), k);
  return (U * s.asDiagonal() * V.transpose()).cast<float>();
}

/// Singular values (descending) of a float matrix, computed in double.
inline Eigen::VectorXd singular_values(const Mat& M) {
  Eigen::BDCSVD<MatD> svd(M.cast<double>());
  return svd.singularValues();
}

// ---------------------------------------------------------------- optimisers

enum class optimizer { sgd, adam };
inline const char* name(optimizer o) { return o == optimizer::sgd ? "sgd" : "adam"; }

/// Optimiser for one adapter (A and B): plain SGD, or the library's AdamW
/// (lora/train/optim.hpp) with weight decay 0, i.e. Adam with torch's defaults
/// (β = 0.9, 0.999, ε = 1e-8). Registered on the first step, so the adapter must not
/// move in memory while it trains.
struct AdapterOpt {
  optimizer kind = optimizer::adam;
  double lr = 1e-3;
  std::optional<lora::AdamW<float>> adam;
  lora::AdapterSlots slots;
  void step(Adapter& ad, const lora::Gradients<float>& g) {
    if (kind == optimizer::sgd) {
      ad.A() -= static_cast<float>(lr) * g.dA;
      ad.B() -= static_cast<float>(lr) * g.dB;
      return;
    }
    if (!adam) {
      lora::AdamWOptions o;
      o.lr = lr;
      o.weight_decay = 0.0;
      adam.emplace(o);
      slots = lora::add_adapter(*adam, ad);
    }
    lora::adamw_step(*adam, slots, g);
  }
};

inline AdapterOpt make_opt(optimizer kind, double lr) {
  AdapterOpt o;
  o.kind = kind;
  o.lr = lr;
  return o;
}

inline Adapter make_adapter(Index in, Index out, Index r, double alpha, bool rslora, std::uint64_t seed) {
  Adapter ad(in, out, r, alpha, {}, lora::dynamic_scaling{rslora});
  lora::initialize(ad, lora::init_method::kaiming_uniform, seed);  // PEFT's default: B = 0
  return ad;
}

// ---------------------------------------------------------------- task (a): one layer

struct LinearTask {
  Index d = 0, tokens = 0;
  double noise = 0;
  Mat delta_true;   ///< ΔW* [d × d]
  Mat Xc, Rc;       ///< compressed tokens Rx [d × d] and targets QᵀR [d × d]
  double rest = 0;  ///< ‖R‖² − ‖QᵀR‖²: the part of the residual no linear map fits
  double teacher_sq = 0;  ///< ‖ΔW*‖²_F

  /// Mean squared error per element on the training tokens for adapter delta path.
  double train_loss(const Adapter& ad) const {
    return ((ad.forward(Xc) - Rc).squaredNorm() + rest) / static_cast<double>(tokens * d);
  }
  /// ‖ΔW − ΔW*‖²_F / ‖ΔW*‖²_F: the fraction of the teacher's change not recovered
  /// (1 for the base model); the test MSE is this · ‖ΔW*‖²/d + noise².
  double test_error(const Mat& delta) const { return (delta - delta_true).squaredNorm() / teacher_sq; }
  double test_error(const Adapter& ad) const { return test_error(Mat(ad.delta_weight())); }
};

/// y = x·(W0 + ΔW*)ᵀ + N(0, noise²), x ~ N(0, I_d), ΔW* = U·diag(sigma)·Vᵀ.
/// (W0 cancels out of the adapter's loss, so only ΔW* and the data are kept.)
inline LinearTask make_linear_task(Index d, Index tokens, const std::vector<double>& sigma, double noise,
                                   std::uint64_t seed) {
  lora::Generator g(seed);
  LinearTask t;
  t.d = d;
  t.tokens = tokens;
  t.noise = noise;
  t.delta_true = low_rank(d, d, sigma, g);
  t.teacher_sq = t.delta_true.cast<double>().squaredNorm();
  MatD X(tokens, d), E(tokens, d);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = g.normal();
  for (Index i = 0; i < E.size(); ++i) E.data()[i] = g.normal(0.0, noise);
  const MatD R = X * t.delta_true.cast<double>().transpose() + E;
  Eigen::HouseholderQR<MatD> qr(X);
  const MatD Rx = qr.matrixQR().topRows(d).triangularView<Eigen::Upper>();
  const MatD QtR = (qr.householderQ().transpose() * R).topRows(d);
  t.Xc = Rx.cast<float>();
  t.Rc = QtR.cast<float>();
  t.rest = R.squaredNorm() - QtR.squaredNorm();
  return t;
}

/// σ_i = hi … lo, evenly spaced, k values.
inline std::vector<double> flat_spectrum(int k, double hi, double lo) {
  std::vector<double> s(k);
  for (int i = 0; i < k; ++i) s[i] = k == 1 ? hi : hi + (lo - hi) * i / (k - 1.0);
  return s;
}

struct TrainLog {
  std::vector<int> step;
  std::vector<double> train, test;
  double grad_a = 0, grad_b = 0;  ///< mean ‖∂L/∂A‖_F, ‖∂L/∂B‖_F over the steps
  double grad_b_init = 0;         ///< ‖∂L/∂B‖_F at step 0 (B = 0, so ∂L/∂A = 0 there)
  double first_update = 0;        ///< ‖ΔW after step 10‖_F / 10: early speed of ΔW
};

/// Full-batch training of one adapter on a LinearTask. The gradient is that of
/// the per-token squared error summed over outputs (d × the reported MSE).
inline TrainLog train_linear(const LinearTask& task, Adapter& ad, AdapterOpt opt, int steps, int log_every = 0) {
  TrainLog log;
  const float gscale = 2.0f / static_cast<float>(task.tokens);
  for (int s = 0; s <= steps; ++s) {
    const Mat err = ad.forward(task.Xc) - task.Rc;
    const bool record = log_every > 0 ? (s % log_every == 0 || s == steps) : s == steps;
    if (record) {
      log.step.push_back(s);
      log.train.push_back((err.squaredNorm() + task.rest) / static_cast<double>(task.tokens * task.d));
      log.test.push_back(task.test_error(ad));
    }
    if (s == 10) log.first_update = ad.delta_weight().norm() / 10.0;
    if (s == steps) break;
    const Mat dY = gscale * err;
    auto g = ad.backward(task.Xc, dY);
    if (s == 0) log.grad_b_init = g.dB.norm();
    log.grad_a += g.dA.norm() / steps;
    log.grad_b += g.dB.norm() / steps;
    opt.step(ad, g);
    if (!std::isfinite(g.dA.norm()) || !std::isfinite(g.dB.norm())) {  // diverged: stop, keep the record honest
      log.step.push_back(s + 1);
      log.train.push_back(std::numeric_limits<double>::infinity());
      log.test.push_back(std::numeric_limits<double>::infinity());
      break;
    }
  }
  return log;
}

// ---------------------------------------------------------------- task (b): 3-layer MLP

struct Mlp {
  std::vector<Mat> W;  ///< base weights [d × d], frozen
};

struct MlpTask {
  Index d = 0, layers = 0;
  Mlp base;
  std::vector<Mat> delta_true;  ///< ΔW*_l (zero where the teacher does not change layer l)
  Mat X, Y;                     ///< training tokens and noisy teacher targets
  Mat Xt, Yt, Yt_base;          ///< held-out tokens, clean teacher outputs, base outputs
};

/// Forward pass, optionally remembering what backward needs (layer inputs and tanh outputs).
struct MlpCache {
  std::vector<Mat> in;   ///< input of layer l
  std::vector<Mat> act;  ///< tanh output after layer l (l < L−1)
};

inline Mat mlp_forward(const Mlp& net, const std::vector<std::optional<Adapter>>& ads, const Mat& X,
                       MlpCache* cache = nullptr) {
  const std::size_t L = net.W.size();
  Mat h = X;
  if (cache) {
    cache->in.assign(L, Mat());
    cache->act.assign(L, Mat());
  }
  for (std::size_t l = 0; l < L; ++l) {
    if (cache) cache->in[l] = h;
    Mat z = (l < ads.size() && ads[l]) ? Mat(ads[l]->apply(net.W[l], h)) : Mat(h * net.W[l].transpose());
    if (l + 1 < L) {
      h = z.array().tanh().matrix();
      if (cache) cache->act[l] = h;
    } else {
      h = std::move(z);
    }
  }
  return h;
}

/// Teacher network: base weights plus ΔW*.
inline Mat mlp_teacher(const MlpTask& t, const Mat& X) {
  Mat h = X;
  for (Index l = 0; l < t.layers; ++l) {
    Mat z = h * (t.base.W[l] + t.delta_true[l]).transpose();
    h = l + 1 < t.layers ? Mat(z.array().tanh().matrix()) : z;
  }
  return h;
}

/// teacher_ranks[l] = k_l (0: layer unchanged); ΔW*_l has k_l equal singular values `sv`.
inline MlpTask make_mlp_task(Index d, Index tokens, const std::vector<int>& teacher_ranks, double sv, double noise,
                             std::uint64_t seed) {
  lora::Generator g(seed);
  MlpTask t;
  t.d = d;
  t.layers = static_cast<Index>(teacher_ranks.size());
  for (Index l = 0; l < t.layers; ++l) {
    // gain 1.5 on the hidden layers keeps tanh in its curved range
    t.base.W.push_back(randn(d, d, g, (l + 1 < t.layers ? 1.5 : 1.0) / std::sqrt(static_cast<double>(d))));
    const int k = teacher_ranks[l];
    t.delta_true.push_back(k > 0 ? low_rank(d, d, std::vector<double>(k, sv), g) : Mat(Mat::Zero(d, d)));
  }
  t.X = randn(tokens, d, g);
  t.Y = mlp_teacher(t, t.X) + randn(tokens, d, g, noise);
  t.Xt = randn(tokens, d, g);
  t.Yt = mlp_teacher(t, t.Xt);
  t.Yt_base = mlp_forward(t.base, {}, t.Xt);
  return t;
}

/// ‖f(Xt) − teacher(Xt)‖² / ‖base(Xt) − teacher(Xt)‖²: 1 for the base model, 0 for a perfect fit.
inline double mlp_test_error(const MlpTask& t, const std::vector<std::optional<Adapter>>& ads) {
  return (mlp_forward(t.base, ads, t.Xt) - t.Yt).squaredNorm() / (t.Yt_base - t.Yt).squaredNorm();
}
/// ‖f(Xt) − base(Xt)‖² / ‖teacher(Xt) − base(Xt)‖²: how far the adapted model moved from the base.
inline double mlp_drift(const MlpTask& t, const std::vector<std::optional<Adapter>>& ads) {
  return (mlp_forward(t.base, ads, t.Xt) - t.Yt_base).squaredNorm() / (t.Yt_base - t.Yt).squaredNorm();
}

/// Full-batch training of the adapters present in `ads` (the others layers stay frozen).
inline TrainLog train_mlp(const MlpTask& t, std::vector<std::optional<Adapter>>& ads, optimizer kind, double lr,
                          int steps, int log_every = 0) {
  TrainLog log;
  const std::size_t L = t.base.W.size();
  std::vector<AdapterOpt> opt(L, make_opt(kind, lr));
  const float gscale = 2.0f / static_cast<float>(t.X.rows());
  MlpCache cache;
  for (int s = 0; s <= steps; ++s) {
    const Mat Yhat = mlp_forward(t.base, ads, t.X, &cache);
    const Mat err = Yhat - t.Y;
    const bool record = log_every > 0 ? (s % log_every == 0 || s == steps) : s == steps;
    if (record) {
      log.step.push_back(s);
      log.train.push_back(err.squaredNorm() / static_cast<double>(err.size()));
      log.test.push_back(mlp_test_error(t, ads));
    }
    if (s == steps) break;
    Mat dY = gscale * err;  // ∂L/∂(output of layer l), going down
    for (std::size_t l = L; l-- > 0;) {
      if (l + 1 < L) dY.array() *= 1.0f - cache.act[l].array().square();  // tanh'
      if (ads[l]) {
        auto g = ads[l]->backward(t.base.W[l], cache.in[l], dY);
        log.grad_a += g.dA.norm() / steps;
        log.grad_b += g.dB.norm() / steps;
        opt[l].step(*ads[l], g);
        dY = std::move(g.dX);
      } else {
        dY = dY * t.base.W[l];
      }
      if (l == 0) break;
      // stop early when nothing below is trained
      bool below = false;
      for (std::size_t j = 0; j < l; ++j) below = below || ads[j].has_value();
      if (!below) break;
    }
  }
  return log;
}

// ---------------------------------------------------------------- statistics

struct Stat {
  double mean = 0, sd = 0, lo = 0, hi = 0;
};
inline Stat stat(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  double q = 0;
  for (double x : v) q += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(q / (v.size() - 1)) : 0.0;
  s.lo = *std::min_element(v.begin(), v.end());
  s.hi = *std::max_element(v.begin(), v.end());
  return s;
}

// ---------------------------------------------------------------- CSV

/// A CSV file written row by row; numbers with 6 significant digits.
class Csv {
 public:
  Csv(const std::string& path, const std::vector<std::string>& header) : f_(path), path_(path) {
    if (!f_) lora::detail::fail("{}: cannot open for writing", path);
    for (std::size_t i = 0; i < header.size(); ++i) f_ << (i ? "," : "") << header[i];
    f_ << '\n';
  }
  template <class... T>
  void row(const T&... v) {
    bool first = true;
    ((f_ << (first ? "" : ",") << cell(v), first = false), ...);
    f_ << '\n';
  }
  const std::string& path() const { return path_; }

 private:
  static std::string cell(double x) { return fmt::format("{:.6g}", x); }
  static std::string cell(float x) { return fmt::format("{:.6g}", x); }
  static std::string cell(int x) { return fmt::format("{}", x); }
  static std::string cell(long x) { return fmt::format("{}", x); }
  static std::string cell(long long x) { return fmt::format("{}", x); }
  static std::string cell(unsigned long x) { return fmt::format("{}", x); }
  static std::string cell(const std::string& s) { return s; }
  static std::string cell(const char* s) { return s; }
  std::ofstream f_;
  std::string path_;
};

// ---------------------------------------------------------------- SVG plots

struct Series {
  std::string name;
  std::vector<double> x, y;
  std::vector<double> lo, hi;  ///< optional error bars (same length as y)
  std::string color;           ///< empty: next palette colour
  bool dashed = false;
  bool markers = true;
  bool line = true;
};

struct RefLine {
  double at;
  std::string label;
};

/// A line plot written as SVG: linear, log10 or log2 axes, error bars, a legend
/// to the right of the plot area, optional reference lines and category x labels.
struct Plot {
  std::string title, xlabel, ylabel;
  enum scale { linear, log10, log2 };
  scale xscale = linear, yscale = linear;
  std::vector<Series> series;
  std::vector<RefLine> vlines, hlines;
  std::vector<std::string> xcategories;  ///< if set, x values are indices 0..n−1 with these labels
  std::optional<double> ymin, ymax, xmin, xmax;
  int width = 760, height = 440;

  Series& add(Series s) {
    series.push_back(std::move(s));
    return series.back();
  }
  void save(const std::string& path) const;
};

namespace detail {
inline std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&')
      o += "&amp;";
    else if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else
      o += c;
  }
  return o;
}
inline const char* palette(std::size_t i) {
  static const char* p[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return p[i % 10];
}
inline std::string num(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e5 || a < 1e-3) return fmt::format("{:.0e}", v);
  return fmt::format("{:g}", v);
}
inline std::vector<double> nice_ticks(double lo, double hi) {
  const double span = hi - lo;
  if (!(span > 0)) return {lo};
  const double raw = span / 6;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    t.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}
}  // namespace detail

inline void Plot::save(const std::string& path) const {
  using detail::esc;
  const bool cat = !xcategories.empty();
  auto tx = [&](double v) { return xscale == log10 ? std::log10(v) : xscale == log2 ? std::log2(v) : v; };
  auto ty = [&](double v) { return yscale == log10 ? std::log10(v) : yscale == log2 ? std::log2(v) : v; };
  auto okx = [&](double v) { return std::isfinite(v) && (xscale == linear || v > 0); };
  auto oky = [&](double v) { return std::isfinite(v) && (yscale == linear || v > 0); };
  // data range (in transformed units)
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : series)
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (okx(s.x[i]) && oky(s.y[i])) x0 = std::min(x0, tx(s.x[i])), x1 = std::max(x1, tx(s.x[i]));
      for (double v : {s.y[i], s.lo.empty() ? s.y[i] : s.lo[i], s.hi.empty() ? s.y[i] : s.hi[i]})
        if (oky(v)) y0 = std::min(y0, ty(v)), y1 = std::max(y1, ty(v));
    }
  for (const auto& h : hlines)
    if (oky(h.at)) y0 = std::min(y0, ty(h.at)), y1 = std::max(y1, ty(h.at));
  if (cat) x0 = -0.5, x1 = xcategories.size() - 0.5;
  if (xmin) x0 = tx(*xmin);
  if (xmax) x1 = tx(*xmax);
  if (ymin) y0 = ty(*ymin);
  if (ymax) y1 = ty(*ymax);
  if (!std::isfinite(x0)) x0 = 0, x1 = 1;
  if (!std::isfinite(y0)) y0 = 0, y1 = 1;
  if (x1 - x0 < 1e-12) x0 -= 0.5, x1 += 0.5;
  if (y1 - y0 < 1e-12) y0 -= 0.5, y1 += 0.5;
  if (!cat && !xmin && !xmax) {
    const double p = (x1 - x0) * 0.03;
    x0 -= p, x1 += p;
  }
  if (!ymin && !ymax) {
    const double p = (y1 - y0) * 0.05;
    y0 -= p, y1 += p;
  }

  // layout: plot area, legend on the right
  std::size_t longest = 0;
  for (const auto& s : series) longest = std::max(longest, s.name.size());
  for (const auto& v : vlines) longest = std::max(longest, v.label.size());
  for (const auto& h : hlines) longest = std::max(longest, h.label.size());
  const double legend_w = std::min<double>(260, 36 + 6.6 * static_cast<double>(longest));
  const double L = 78, T = 40, R = width - legend_w - 16, B = height - 58;
  auto px = [&](double v) { return L + (v - x0) / (x1 - x0) * (R - L); };
  auto py = [&](double v) { return B - (v - y0) / (y1 - y0) * (B - T); };

  std::string o;
  o += fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n",
      width, height, width, height);
  o += fmt::format("<rect width=\"{}\" height=\"{}\" fill=\"white\"/>\n", width, height);
  o += fmt::format("<text x=\"{:.1f}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
                   (L + R) / 2, esc(title));
  o += fmt::format("<defs><clipPath id=\"area\"><rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\"/></clipPath></defs>\n",
                   L, T, R - L, B - T);

  // ticks and grid
  auto axis_ticks = [&](scale sc, double lo, double hi, bool is_x) {
    std::vector<std::pair<double, std::string>> t;  // transformed position, label
    if (is_x && cat) {
      for (std::size_t i = 0; i < xcategories.size(); ++i) t.push_back({double(i), xcategories[i]});
      return t;
    }
    if (sc == linear) {
      for (double v : detail::nice_ticks(lo, hi)) t.push_back({v, detail::num(v)});
    } else if (sc == log2) {
      int step = std::max(1, static_cast<int>(std::ceil((hi - lo) / 10)));
      for (int e = static_cast<int>(std::ceil(lo - 1e-9)); e <= hi + 1e-9; e += step)
        t.push_back({double(e), detail::num(std::pow(2.0, e))});
    } else {
      const int e0 = static_cast<int>(std::floor(lo)), e1 = static_cast<int>(std::ceil(hi));
      const bool minor = (hi - lo) < 2.5;
      for (int e = e0; e <= e1; ++e)
        for (double m : minor ? std::vector<double>{1, 2, 5} : std::vector<double>{1}) {
          const double v = std::log10(m) + e;
          if (v >= lo - 1e-9 && v <= hi + 1e-9) t.push_back({v, detail::num(m * std::pow(10.0, e))});
        }
      if (t.size() < 2)  // less than a decade: fall back to linear ticks of the values
        for (double v : detail::nice_ticks(std::pow(10.0, lo), std::pow(10.0, hi)))
          if (v > 0) t.push_back({std::log10(v), detail::num(v)});
    }
    return t;
  };
  for (auto& [v, lab] : axis_ticks(xscale, x0, x1, true)) {
    const double x = px(v);
    o += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#e5e5e5\"/>\n", x, T, B);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", x, B + 16, esc(lab));
  }
  for (auto& [v, lab] : axis_ticks(yscale, y0, y1, false)) {
    const double y = py(v);
    o += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#e5e5e5\"/>\n", L, y, R);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", L - 6, y + 4, esc(lab));
  }
  o += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#333\"/>\n",
                   L, T, R - L, B - T);
  o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n", (L + R) / 2,
                   height - 14, esc(xlabel));
  o += fmt::format(
      "<text transform=\"translate(18,{:.1f}) rotate(-90)\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n",
      (T + B) / 2, esc(ylabel));

  // reference lines
  o += "<g clip-path=\"url(#area)\">\n";
  for (const auto& v : vlines)
    if (okx(v.at))
      o += fmt::format(
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#555\" stroke-dasharray=\"2,3\"/>\n",
          px(tx(v.at)), T, B);
  for (const auto& h : hlines)
    if (oky(h.at))
      o += fmt::format(
          "<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{2:.1f}\" y2=\"{1:.1f}\" stroke=\"#555\" stroke-dasharray=\"6,3\"/>\n",
          L, py(ty(h.at)), R);

  // series
  for (std::size_t si = 0; si < series.size(); ++si) {
    const Series& s = series[si];
    const std::string col = s.color.empty() ? detail::palette(si) : s.color;
    std::string pts;
    std::vector<std::pair<double, double>> xy;
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!okx(s.x[i]) || !oky(s.y[i])) {  // a gap (diverged run or zero on a log axis)
        if (s.line && xy.size() > 1)
          o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\"{} points=\"{}\"/>\n", col,
                           s.dashed ? " stroke-dasharray=\"6,4\"" : "", pts);
        pts.clear();
        xy.clear();
        continue;
      }
      const double X = px(tx(s.x[i])), Y = py(ty(s.y[i]));
      pts += fmt::format("{:.1f},{:.1f} ", X, Y);
      xy.push_back({X, Y});
      if (!s.lo.empty() && oky(s.lo[i]) && oky(s.hi[i])) {
        const double a = py(ty(s.lo[i])), b = py(ty(s.hi[i]));
        o += fmt::format(
            "<path d=\"M{0:.1f},{1:.1f}V{2:.1f}M{3:.1f},{1:.1f}h6M{3:.1f},{2:.1f}h6\" stroke=\"{4}\" stroke-width=\"1.2\" fill=\"none\"/>\n",
            X, a, b, X - 3, col);
      }
      if (s.markers)
        o += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", X, Y, col);
    }
    if (s.line && xy.size() > 1)
      o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\"{} points=\"{}\"/>\n", col,
                       s.dashed ? " stroke-dasharray=\"6,4\"" : "", pts);
  }
  o += "</g>\n";

  // legend
  double ly = T + 8;
  const double lx = R + 14;
  for (std::size_t si = 0; si < series.size(); ++si) {
    const Series& s = series[si];
    if (s.name.empty()) continue;
    const std::string col = s.color.empty() ? detail::palette(si) : s.color;
    o += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\"{}/>\n",
                     lx, ly, lx + 22, ly, col, s.dashed ? " stroke-dasharray=\"5,3\"" : "");
    if (s.markers) o += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", lx + 11, ly, col);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", lx + 28, ly + 4, esc(s.name));
    ly += 18;
  }
  for (const auto& v : vlines) {
    if (v.label.empty()) continue;
    o += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#555\" stroke-dasharray=\"2,3\"/>\n",
                     lx, ly, lx + 22, ly);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", lx + 28, ly + 4, esc(v.label));
    ly += 18;
  }
  for (const auto& h : hlines) {
    if (h.label.empty()) continue;
    o += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#555\" stroke-dasharray=\"6,3\"/>\n",
                     lx, ly, lx + 22, ly);
    o += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", lx + 28, ly + 4, esc(h.label));
    ly += 18;
  }
  o += "</svg>\n";
  std::ofstream f(path);
  if (!f) lora::detail::fail("{}: cannot open for writing", path);
  f << o;
}

/// Series of mean with min–max error bars from per-seed values.
inline Series mean_series(std::string name, const std::vector<double>& x, const std::vector<std::vector<double>>& per_x) {
  Series s;
  s.name = std::move(name);
  s.x = x;
  for (const auto& v : per_x) {
    const Stat st = stat(v);
    s.y.push_back(st.mean);
    s.lo.push_back(st.lo);
    s.hi.push_back(st.hi);
  }
  return s;
}

}  // namespace exper
