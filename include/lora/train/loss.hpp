#pragma once
// Losses with their gradients, as torch's MSELoss and CrossEntropyLoss (reduction "mean").

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

namespace lora {

/// A loss value and its gradient with respect to the prediction (same shape).
template <class S>
struct Loss {
  double value = 0.0;
  Matrix<S> grad;
};

/// L = (1/N) Σ (pred − target)², N = number of elements; ∂L/∂pred = 2(pred − target)/N.
template <class S>
Loss<S> mse_loss(const MatrixRef<S>& pred, const MatrixRef<S>& target) {
  if (pred.rows() != target.rows() || pred.cols() != target.cols())
    detail::fail("mse_loss: target has shape [{} x {}], expected the prediction's [{} x {}]", target.rows(),
                 target.cols(), pred.rows(), pred.cols());
  if (pred.size() == 0) detail::fail("mse_loss: empty prediction");
  Loss<S> out;
  const Matrix<double> d = pred.template cast<double>() - target.template cast<double>();
  const double n = static_cast<double>(d.size());
  out.value = d.squaredNorm() / n;
  out.grad = (d * (2.0 / n)).template cast<S>();
  return out;
}

/// Softmax cross-entropy over logits [T × C] with integer labels (label ignore_index skips a
/// row), averaged over the counted rows. With label smoothing ε the target is
/// (1−ε)·onehot + ε/C. ∂L/∂logits = (softmax − target)/n. No counted row: value 0, zero gradient
/// (torch returns NaN there).
template <class S>
Loss<S> cross_entropy_loss(const MatrixRef<S>& logits, std::span<const int> labels, int ignore_index = -100,
                           double label_smoothing = 0.0) {
  const Index T = logits.rows(), C = logits.cols();
  if (static_cast<Index>(labels.size()) != T)
    detail::fail("cross_entropy_loss: {} labels for {} rows of logits", labels.size(), T);
  if (C < 1) detail::fail("cross_entropy_loss: logits have no classes");
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
    detail::fail("cross_entropy_loss: label_smoothing must be in [0, 1], got {}", label_smoothing);
  Loss<S> out;
  Matrix<double> g = Matrix<double>::Zero(T, C);
  double total = 0;
  Index n = 0;
  for (Index t = 0; t < T; ++t) {
    const int y = labels[static_cast<std::size_t>(t)];
    if (y == ignore_index) continue;
    if (y < 0 || y >= C) detail::fail("cross_entropy_loss: label {} of row {} is outside [0, {})", y, t, C);
    const auto row = logits.row(t).template cast<double>();
    const double mx = row.maxCoeff();
    const double lse = mx + std::log((row.array() - mx).exp().sum());
    const double eps = label_smoothing;
    // −Σ_c q_c·log p_c with q = (1−ε)·onehot + ε/C
    total += (1.0 - eps) * (lse - row(y)) + eps * (lse - row.mean());
    for (Index c = 0; c < C; ++c) g(t, c) = std::exp(row(c) - lse) - eps / static_cast<double>(C);
    g(t, y) -= 1.0 - eps;
    ++n;
  }
  if (n == 0) {
    out.grad = Matrix<S>::Zero(T, C);
    return out;
  }
  out.value = total / static_cast<double>(n);
  out.grad = (g / static_cast<double>(n)).template cast<S>();
  return out;
}

template <class S>
Loss<S> cross_entropy_loss(const MatrixRef<S>& logits, const std::vector<int>& labels, int ignore_index = -100,
                           double label_smoothing = 0.0) {
  return cross_entropy_loss<S>(logits, std::span<const int>(labels), ignore_index, label_smoothing);
}

}  // namespace lora
