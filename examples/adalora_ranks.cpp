// AdaLoRA on a synthetic task whose modules need different ranks: module m must learn a
// teacher ΔW*_m of true rank k_m. Every module starts with init_r singular values; the
// rank allocator prunes the total down to target_r · modules = Σ k_m while training with
// AdamW and PEFT's orthogonal regulariser, and the ranks it kept are printed next to k_m.
//
//   adalora_ranks [--steps N] [--seed S] [--seeds K]
//
// --seeds K runs seeds S, S+1, …, S+K−1 and prints one summary line per run.
#include <lora/adalora/rank_allocator.hpp>
#include <lora/adalora/regularizer.hpp>
#include <lora/adalora/svd_adapter.hpp>
#include <lora/train/loraplus.hpp>
#include <lora/train/loss.hpp>
#include <lora/train/optim.hpp>
#include <lora/train/schedule.hpp>

#include <Eigen/SVD>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <string>
#include <vector>

using lora::Index;
using Mat = lora::Matrix<float>;

namespace {

Mat randn(Index rows, Index cols, lora::Generator& g, double sd) {
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(g.normal(0.0, sd));
  return m;
}

// ΔW* = U·diag(σ)·Vᵀ with orthonormal U, V and σ_i in [1, 1.5]: every direction matters.
Mat teacher(Index out, Index in, int k, lora::Generator& g) {
  if (k == 0) return Mat::Zero(out, in);
  Eigen::HouseholderQR<Mat> qu(randn(out, k, g, 1.0)), qv(randn(in, k, g, 1.0));
  const Mat U = qu.householderQ() * Mat::Identity(out, k);
  const Mat V = qv.householderQ() * Mat::Identity(in, k);
  Eigen::VectorXf s(k);
  for (int i = 0; i < k; ++i) s(i) = static_cast<float>(1.5 - 0.5 * i / std::max(1, k - 1));
  return U * s.asDiagonal() * V.transpose();
}


struct Outcome {
  int matched = 0;
  int modules = 0;
  int kept = 0;
  double loss = 0;
  std::vector<Index> ranks;
};

const std::vector<int> true_rank{1, 1, 2, 3, 4, 7};  // Σ = 18 = target_r · modules

Outcome run(std::uint64_t seed, int steps, bool verbose) {
  lora::Generator gen(seed);
  const Index dim = 32, batch = 64;
  const int M = static_cast<int>(true_rank.size());

  lora::AdaLoraConfig cfg;
  cfg.init_r = 8;
  cfg.target_r = 3;
  cfg.lora_alpha = 8;
  cfg.total_step = steps;
  cfg.tinit = steps / 6;
  cfg.tfinal = steps / 4;
  cfg.deltaT = 10;
  cfg.beta1 = cfg.beta2 = 0.85;
  cfg.orth_reg_weight = 0.5;

  std::vector<Mat> teachers;
  std::vector<lora::SvdAdapter<float>> ads;
  for (int m = 0; m < M; ++m) {
    teachers.push_back(teacher(dim, dim, true_rank[m], gen));
    lora::AdapterOptions o;
    o.name = fmt::format("module{}", m);
    ads.emplace_back(dim, dim, cfg.init_r, cfg.lora_alpha, o);
    ads.back().reset_parameters(gen);  // PEFT: E = 0, A, B ~ N(0, 0.02²)
  }
  lora::RankAllocator<float> alloc(cfg, ads);
  lora::AdamW<float> opt({.lr = 1e-2, .weight_decay = 0.0});
  std::vector<lora::AdapterSlots> slots;
  for (auto& ad : ads) slots.push_back(lora::add_adapter(opt, ad));
  const lora::LinearSchedule sched{.warmup_steps = 0, .total_steps = steps};

  Outcome out;
  for (int step = 0; step < steps; ++step) {
    const Mat X = randn(batch, dim, gen, 1.0);
    std::vector<lora::SvdGradients<float>> grads;
    out.loss = 0;
    for (int m = 0; m < M; ++m) {
      const Mat Y = X * teachers[m].transpose();
      const auto l = lora::mse_loss<float>(ads[m].forward(X), Y);
      out.loss += l.value;
      grads.push_back(ads[m].backward(X, l.grad));
    }
    // PEFT adds orth_reg_weight · R to the loss.
    const auto pen = lora::orthogonal_penalty(ads);
    for (int m = 0; m < M; ++m) {
      grads[m].dA += static_cast<float>(cfg.orth_reg_weight) * pen.dA[m];
      grads[m].dB += static_cast<float>(cfg.orth_reg_weight) * pen.dB[m];
    }
    opt.set_lr_factor(sched(step));
    for (int m = 0; m < M; ++m) lora::adamw_step(opt, slots[m], grads[m]);
    alloc.update_and_allocate(step, ads, grads);  // after optimizer.step(), as PEFT documents
  }

  out.modules = M;
  if (verbose) {
    fmt::print("AdaLoRA: {} modules of {}x{}, init_r {}, target_r {} (budget {} -> {}), {} steps, seed {}\n", M, dim,
               dim, cfg.init_r, cfg.target_r, alloc.initial_budget(), alloc.target_budget(), steps, seed);
    fmt::print("{:<10} {:>9} {:>9} {:>16}\n", "module", "true rank", "allocated", "rel. error of dW");
  }
  for (int m = 0; m < M; ++m) {
    const Index r = ads[m].active_rank();
    out.ranks.push_back(r);
    out.matched += r == true_rank[m] ? 1 : 0;
    out.kept += static_cast<int>(r);
    // The pruned adapter as a plain LoRA of the kept rank (what PEFT saves with rank_pattern).
    const auto lora_m = ads[m].to_lora();
    const Mat delta = lora_m ? Mat(lora_m->delta_weight()) : Mat(Mat::Zero(dim, dim));
    const double err = (delta - teachers[m]).norm() / std::max(1e-12f, teachers[m].norm());
    if (verbose) fmt::print("{:<10} {:>9} {:>9} {:>16.4f}\n", ads[m].name(), true_rank[m], r, err);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 6000, seeds = 1;
  std::uint64_t seed = 7;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--steps") && i + 1 < argc)
      steps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc)
      seed = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--seeds") && i + 1 < argc)
      seeds = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: adalora_ranks [--steps N] [--seed S] [--seeds K]\n");
      return 2;
    }
  }
  if (steps < 8 || seeds < 1) {
    std::fprintf(stderr, "adalora_ranks: need --steps >= 8 and --seeds >= 1\n");
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  int all_matched = 0;
  for (int k = 0; k < seeds; ++k) {
    const Outcome o = run(seed + static_cast<std::uint64_t>(k), steps, seeds == 1);
    all_matched += o.matched == o.modules ? 1 : 0;
    if (seeds == 1)
      fmt::print("ranks matched: {}/{}; kept {} singular values in all; final loss {:.5f}\n", o.matched, o.modules,
                 o.kept, o.loss);
    else
      fmt::print("seed {:>3}: allocated {} (true {}), matched {}/{}, final loss {:.5f}\n", seed + k,
                 fmt::join(o.ranks, ","), fmt::join(true_rank, ","), o.matched, o.modules, o.loss);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (seeds > 1) fmt::print("all ranks right in {}/{} runs\n", all_matched, seeds);
  fmt::print("{:.2f} s\n", secs);
  return 0;
}
