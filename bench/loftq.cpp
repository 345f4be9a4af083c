// LoftQ's quantisation error per iteration against plain QLoRA initialisation (B = 0, base
// = deq(NF4(W))) on real-shaped weights: ‖W − Q_t − L_t·R_t‖_F / ‖W‖_F for t = 1..T.
// Weights: Gaussian (std 0.02) plus a rank-32 part carrying ~30% of the energy, a crude
// stand-in for a trained projection's spectrum (no real checkpoint on the build machine).
//
//   bench_loftq [iterations=5] [rank=16,64] [shapes=4096x4096,4096x11008]
#include <lora/quant/loftq.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace lora;

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 5;
  std::vector<Index> ranks = {16, 64};
  if (argc > 2) {
    ranks.clear();
    for (std::string s = argv[2]; !s.empty();) {
      const auto c = s.find(',');
      ranks.push_back(std::stol(s.substr(0, c)));
      s = c == std::string::npos ? "" : s.substr(c + 1);
    }
  }
  std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}};
  if (argc > 3) {
    shapes.clear();
    for (std::string s = argv[3]; !s.empty();) {
      const auto c = s.find(','), x = s.find('x');
      shapes.emplace_back(std::stol(s.substr(0, x)), std::stol(s.substr(x + 1, c - x - 1)));
      s = c == std::string::npos ? "" : s.substr(c + 1);
    }
  }
  for (auto [out, in] : shapes) {
    Generator gen(static_cast<std::uint64_t>(out * 7 + in));
    Eigen::MatrixXd U(out, 32), V(in, 32);
    for (Index i = 0; i < U.size(); ++i) U.data()[i] = gen.normal();
    for (Index i = 0; i < V.size(); ++i) V.data()[i] = gen.normal();
    const Eigen::MatrixXd low = U * V.transpose() * (0.02 * std::sqrt(0.43 / 32.0));
    Matrix<float> W(out, in);
    for (Index i = 0; i < out; ++i)
      for (Index j = 0; j < in; ++j) W(i, j) = static_cast<float>(low(i, j) + gen.normal(0.0, 0.02));
    const double wn = W.cast<double>().norm();
    for (Index r : ranks) {
      quant::LoftQOptions opt;
      opt.rank = r;
      opt.iterations = iters;
      opt.randomized = true;
      const auto t0 = std::chrono::steady_clock::now();
      const auto res = quant::loftq_init(W, opt);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%ldx%ld r=%ld: plain QLoRA %.5f", long(out), long(in), long(r), res.quant_error[0] / wn);
      for (int t = 0; t < iters; ++t) std::printf("  iter%d %.5f", t + 1, res.error[static_cast<std::size_t>(t)] / wn);
      std::printf("  (%.1f s)\n", s);
      std::fflush(stdout);
    }
  }
  return 0;
}
