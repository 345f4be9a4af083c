// lora extract's per-module SVD (randomized range finder over row blocks, ΔW never formed)
// against a dense SVD of the formed ΔW (Eigen's BDCSVD in float32, standing in for
// mergekit's extract_lora, which runs torch's dense SVD per module; neither mergekit nor
// numpy is installable on the build machine). The two alternate in one process, round by
// round, on the same synthetic fine-tune ΔW = rank-64 part with decaying σ + full-rank noise.
//
//   bench_extract [rounds=2] [rank=64] [shapes=4096x4096,4096x11008]
#include <lora/analysis/extract.hpp>

#include <Eigen/SVD>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace lora;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 2;
  const Index k = argc > 2 ? std::atol(argv[2]) : 64;
  std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {4096, 11008}};
  if (argc > 3) {
    shapes.clear();
    std::string s = argv[3];
    for (std::size_t p = 0; p < s.size();) {
      const std::size_t c = s.find(',', p), x = s.find('x', p);
      shapes.emplace_back(std::stol(s.substr(p, x - p)), std::stol(s.substr(x + 1, c - x - 1)));
      p = c == std::string::npos ? s.size() : c + 1;
    }
  }
  std::printf("%-12s %5s %6s %12s %12s %12s %12s %8s\n", "shape", "round", "rank", "extract s", "dense s",
              "extract err", "dense err", "ratio");
  for (auto [out, in] : shapes) {
    Generator gen(static_cast<std::uint64_t>(out * 131 + in));
    Matrix<float> W(out, in), T(out, in);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(gen.normal(0.0, 0.02));
    // ΔW: a rank-64 part with σ_i ∝ 0.95^i plus isotropic noise carrying ~5% of the energy
    const Index p = 64;
    Eigen::MatrixXd U(out, p), V(in, p);
    for (Index i = 0; i < U.size(); ++i) U.data()[i] = gen.normal();
    for (Index i = 0; i < V.size(); ++i) V.data()[i] = gen.normal();
    for (Index j = 0; j < p; ++j) U.col(j) *= 0.02 * std::pow(0.95, double(j)) / std::sqrt(double(in));
    const Eigen::MatrixXd low = U * V.transpose();
    const double noise = 0.23 * low.norm() / std::sqrt(double(out * in));
    for (Index i = 0; i < out; ++i)
      for (Index j = 0; j < in; ++j) T(i, j) = static_cast<float>(W(i, j) + low(i, j) + gen.normal(0.0, noise));
    for (int r = 0; r < rounds; ++r) {
      // alternate which goes first, so that neither always runs on a warmer machine
      double te = 0, td = 0, ee = 0, ed = 0;
      auto run_extract = [&] {
        analysis::ExtractOptions opt;
        opt.rank = k;
        const auto t0 = std::chrono::steady_clock::now();
        const auto m = analysis::extract_module(W, T, opt);
        te = seconds_since(t0);
        ee = m.rel_fro_error;
      };
      auto run_dense = [&] {
        const auto t0 = std::chrono::steady_clock::now();
        const Eigen::MatrixXf D = T - W;
        Eigen::BDCSVD<Eigen::MatrixXf> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
        const Eigen::MatrixXf B = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal();
        const Eigen::MatrixXf A = svd.matrixV().leftCols(k).transpose();
        td = seconds_since(t0);
        const Eigen::VectorXd sv = svd.singularValues().cast<double>();
        ed = std::sqrt(sv.tail(sv.size() - k).squaredNorm()) / sv.norm();
        (void)B, (void)A;
      };
      if (r % 2 == 0) run_extract(), run_dense();
      else run_dense(), run_extract();
      std::printf("%5ldx%-6ld %5d %6ld %12.2f %12.2f %12.6f %12.6f %8.1f\n", long(out), long(in), r, long(k), te, td, ee,
                  ed, td / te);
      std::fflush(stdout);
    }
  }
  return 0;
}
