#pragma once
// A LoRA adapter from a full fine-tune: per module ΔW = T − W, truncated to rank k by a
// randomized range finder (Halko, Martinsson & Tropp 2011) that reads ΔW in blocks of
// rows, never more than one block of it converted at once: Y = ΔW·Ω and Z = ΔWᵀ·Q are
// accumulated block by block from the two checkpoints' tensors. The factors are
// B = U_k·√Σ_k, A = √Σ_k·V_kᵀ for a scaling of 1 (r = lora_alpha = k).
//
//   auto m = lora::analysis::extract_module(W, T, {.rank = 16});
//   m.rel_fro_error;   // ‖ΔW − B·A‖_F / ‖ΔW‖_F
//
// Compile time: the non-template functions here are `template <class = void>` (see
// docs/reliability.md, "Sanitizers").

#include <lora/analysis/compress.hpp>
#include <lora/analysis/intruder.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include <Eigen/Dense>
#include <fmt/ranges.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

namespace lora::analysis {

/// How extract picks the rank: `rank` > 0 fixes k; otherwise the smallest k ≤ max_rank
/// with Σ_{i≤k} σ_i² ≥ energy·‖ΔW‖_F² (σ from the sketch of width max_rank + oversample).
struct ExtractOptions {
  Index rank = 0;
  double energy = 0;
  Index max_rank = 128;
  Index oversample = 10;
  int power_iterations = 2;
  Index block_rows = 256;  ///< rows of ΔW converted at once
  std::uint64_t seed = 0x5eed;
};

/// One extracted module and how well its factors represent ΔW.
struct ExtractedModule {
  std::string name;
  Factors factors;               ///< ΔW ≈ B·A (scaling 1)
  Index rank = 0;
  double delta_norm = 0;         ///< ‖ΔW‖_F
  Eigen::VectorXd singular_values;  ///< the sketch's σ (top rank + 1 or max_rank)
  double kept_energy = 0;        ///< Σ_{i≤k} σ_i² / ‖ΔW‖_F²
  double rel_fro_error = 0;      ///< ‖ΔW − B·A‖_F / ‖ΔW‖_F, exact (one more pass over ΔW)
  double rel_spectral_error = 0; ///< σ_{k+1} / σ_1 of the sketch (Eckart–Young's ‖ΔW − ΔW_k‖₂ / ‖ΔW‖₂); a lower bound (a sketch underestimates σ in a flat tail)
};

namespace detail {
/// Rows [r0, r0 + n) of a 2-D tensor as doubles (F64/F32/BF16/F16 by pointer, others by element).
template <class = void>
inline void tensor_rows(const io::TensorView& t, Index r0, Index n, Eigen::MatrixXd& out) {
  const Index cols = t.shape[1];
  out.resize(n, cols);
  const std::byte* p = t.bytes.data() + static_cast<std::size_t>(r0 * cols) * io::dtype_size(t.type);
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < cols; ++j) {
      const std::size_t off = static_cast<std::size_t>(i * cols + j);
      switch (t.type) {
        case io::dtype::F32: {
          float v;
          std::memcpy(&v, p + off * 4, 4);
          out(i, j) = v;
          break;
        }
        case io::dtype::BF16: {
          std::uint16_t h;
          std::memcpy(&h, p + off * 2, 2);
          const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
          float v;
          std::memcpy(&v, &bits, 4);
          out(i, j) = v;
          break;
        }
        default: out(i, j) = t.at<double>((r0 + i) * cols + j);
      }
    }
  }
}

/// The range finder on ΔW given by rows(r0, n, block) (block = rows [r0, r0+n) of ΔW).
template <class Rows>
ExtractedModule extract_from_rows(Index out, Index in, Rows&& rows, const ExtractOptions& opt) {
  if (opt.rank < 0 || (opt.rank == 0 && !(opt.energy > 0.0 && opt.energy <= 1.0)))
    lora::detail::fail("extract: give a rank ≥ 1 or an energy in (0, 1] (got rank {}, energy {})", opt.rank,
                       opt.energy);
  const Index full = std::min(out, in);
  const Index bs = std::max<Index>(opt.block_rows, 1);
  double norm2 = 0;
  bool counted = false;
  Eigen::MatrixXd blk;
  auto apply = [&](const Eigen::MatrixXd& X) -> Eigen::MatrixXd {  // ΔW·X
    Eigen::MatrixXd Y(out, X.cols());
    for (Index r0 = 0; r0 < out; r0 += bs) {
      const Index n = std::min(bs, out - r0);
      rows(r0, n, blk);
      if (!counted) norm2 += blk.squaredNorm();
      Y.middleRows(r0, n).noalias() = blk * X;
    }
    counted = true;
    return Y;
  };
  auto apply_t = [&](const Eigen::MatrixXd& Y) -> Eigen::MatrixXd {  // ΔWᵀ·Y
    Eigen::MatrixXd X = Eigen::MatrixXd::Zero(in, Y.cols());
    for (Index r0 = 0; r0 < out; r0 += bs) {
      const Index n = std::min(bs, out - r0);
      rows(r0, n, blk);
      X.noalias() += blk.transpose() * Y.middleRows(r0, n);
    }
    return X;
  };
  const Index want = opt.rank > 0 ? std::min(opt.rank + 1, full) : std::min(opt.max_rank + 1, full);
  if (opt.rank > full)
    lora::detail::fail("extract: rank {} exceeds min(out, in) = {} of a [{} x {}] module", opt.rank, full, out, in);
  RandomizedSVDOptions ro{opt.oversample, opt.power_iterations, opt.seed};
  const LowRankSVD<double> svd = randomized_svd(out, in, apply, apply_t, want, ro);
  ExtractedModule m;
  m.delta_norm = std::sqrt(norm2);
  m.singular_values = svd.singular_values;
  Index k = opt.rank;
  if (k == 0) {
    k = std::min(want, opt.max_rank);
    double acc = 0;
    for (Index i = 0; i < svd.size() && i < opt.max_rank; ++i) {
      acc += svd.singular_values(i) * svd.singular_values(i);
      if (acc >= opt.energy * norm2 * (1 - 1e-12)) {
        k = i + 1;
        break;
      }
    }
  }
  k = std::max<Index>(k, 1);
  m.rank = k;
  LowRankSVD<double> top{svd.U.leftCols(k), svd.singular_values.head(k), svd.V.leftCols(k)};
  m.factors = factors_from_svd(top, 1.0, k);
  const double kept = top.singular_values.squaredNorm();
  m.kept_energy = norm2 > 0 ? kept / norm2 : 1.0;
  // ‖ΔW − UΣVᵀ‖² = ‖ΔW‖² − 2·tr(Σ·Uᵀ·ΔW·V) + ‖Σ‖², with ΔW·V from one more pass
  const Eigen::MatrixXd DV = apply(top.V);
  const double cross = (top.U.transpose() * DV).diagonal().dot(top.singular_values);
  const double res2 = std::max(0.0, norm2 - 2 * cross + kept);
  m.rel_fro_error = norm2 > 0 ? std::sqrt(res2 / norm2) : 0.0;
  const double s1 = svd.size() ? svd.singular_values(0) : 0.0;
  m.rel_spectral_error = (s1 > 0 && k < svd.size()) ? svd.singular_values(k) / s1 : 0.0;
  return m;
}
}  // namespace detail

/// Extracts rank-k factors of ΔW = T − W from two dense weights [out × in].
template <class DW, class DT>
ExtractedModule extract_module(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DT>& T,
                               const ExtractOptions& opt) {
  if (W.rows() != T.rows() || W.cols() != T.cols())
    lora::detail::fail("extract: base weight is [{} x {}], tuned is [{} x {}]", W.rows(), W.cols(), T.rows(), T.cols());
  return detail::extract_from_rows(
      W.rows(), W.cols(),
      [&](Index r0, Index n, Eigen::MatrixXd& blk) {
        blk = T.middleRows(r0, n).template cast<double>() - W.middleRows(r0, n).template cast<double>();
      },
      opt);
}

/// Extracts from two tensors of checkpoints (any float dtype), reading row blocks.
template <class = void>
inline ExtractedModule extract_module(const io::TensorView& W, const io::TensorView& T, const ExtractOptions& opt) {
  if (W.shape.size() != 2 || W.shape != T.shape)
    lora::detail::fail("extract: '{}' has shape {} in the base and {} in the tuned checkpoint (2-D, equal expected)",
                       W.name, fmt::join(W.shape, "x"), fmt::join(T.shape, "x"));
  Eigen::MatrixXd wb;
  auto m = detail::extract_from_rows(
      W.shape[0], W.shape[1],
      [&](Index r0, Index n, Eigen::MatrixXd& blk) {
        detail::tensor_rows(T, r0, n, blk);
        detail::tensor_rows(W, r0, n, wb);
        blk -= wb;
      },
      opt);
  m.name = W.name;
  return m;
}

/// Whether extract treats a tensor as a linear layer's weight: 2-D, named `*.weight`,
/// not an embedding table or the output head (PEFT would need modules_to_save for those).
inline bool is_extractable_linear(const io::TensorView& t) {
  const std::string& n = t.name;
  if (t.shape.size() != 2 || n.size() < 7 || n.compare(n.size() - 7, 7, ".weight") != 0) return false;
  return n.find("embed") == std::string::npos && n.find("lm_head") == std::string::npos &&
         n.find("wte") == std::string::npos && n.find("wpe") == std::string::npos;
}

/// The result of extract_adapter: the adapter and one report per module (in name order);
/// `unchanged` lists linear weights with ΔW = 0 exactly (left out of the adapter);
/// `saved` the tuned tensors copied whole as modules_to_save (in name order).
struct ExtractedAdapter {
  io::PeftAdapter adapter;
  std::vector<ExtractedModule> modules;
  std::vector<std::string> unchanged;
  std::vector<std::string> saved;
};

namespace detail {
/// The module path of a tensor name ("lm_head.weight" → "lm_head").
inline std::string module_of(const std::string& tensor) {
  const auto dot = tensor.rfind('.');
  return dot == std::string::npos ? tensor : tensor.substr(0, dot);
}
}  // namespace detail

/// A PEFT LoRA adapter (r = lora_alpha per module, so every scaling is 1) from a base and a
/// fully fine-tuned checkpoint of the same architecture: each linear weight in both
/// (is_extractable_linear; `only`, when given, keeps names containing one of its strings)
/// becomes B·A ≈ T − W. One module is processed at a time; `progress` is called after each.
///
/// `save_modules` (PEFT's modules_to_save: "embed_tokens", "lm_head", or any module path or
/// its last components) copies every tensor of the tuned checkpoint whose module PEFT would
/// save under that config (io::PeftConfig::saves_module) whole and in its stored dtype; the
/// file keys are `base_model.model.<tensor>` as PEFT 0.21's save_pretrained writes them, so
/// loading and merging the folder gives the tuned tensors bit for bit. Saved modules are not
/// extracted (PEFT puts no adapter inside a modules_to_save module). Each entry must match a
/// float tensor present in both checkpoints with one shape.
template <class = void>
inline ExtractedAdapter extract_adapter(const io::Checkpoint& base, const io::Checkpoint& tuned,
                                        const ExtractOptions& opt, const std::vector<std::string>& only = {},
                                        const std::function<void(const ExtractedModule&)>& progress = {},
                                        const std::vector<std::string>& save_modules = {}) {
  ExtractedAdapter out;
  io::PeftConfig saving;
  saving.modules_to_save = save_modules;
  for (const auto& e : save_modules) {
    if (e.empty()) lora::detail::fail("extract: an empty module name in the modules to save");
    io::PeftConfig one;  // each entry must match something: a misspelt name is an error, not a no-op
    one.modules_to_save = {e};
    const auto& tn = tuned.names();
    const bool found = std::any_of(tn.begin(), tn.end(), [&](const std::string& n) {
      return one.saves_module(detail::module_of(n));
    });
    if (!found)
      lora::detail::fail("extract: no tensor of module '{}' in the tuned checkpoint {} (modules_to_save; e.g. "
                         "embed_tokens, lm_head, or a module path)",
                         e, tuned.path().string());
  }
  if (!save_modules.empty()) {
    for (const auto& n : tuned.names()) {
      if (!saving.saves_module(detail::module_of(n))) continue;
      const auto& T = tuned.tensor(n);
      if (!base.contains(n))
        lora::detail::fail("extract: '{}' (modules_to_save) is in the tuned checkpoint but not in the base; a saved "
                           "copy replaces a base tensor", n);
      const auto& W = base.tensor(n);
      if (W.shape != T.shape)
        lora::detail::fail("extract: '{}' (modules_to_save) has shape {} in the base and {} in the tuned checkpoint", n,
                           fmt::join(W.shape, "x"), fmt::join(T.shape, "x"));
      if (T.type != io::dtype::F32 && T.type != io::dtype::BF16 && T.type != io::dtype::F16 &&
          T.type != io::dtype::F64)
        lora::detail::fail("extract: '{}' (modules_to_save) is {}, expected a float tensor", n, io::dtype_name(T.type));
      out.adapter.saved.push_back({n, detail::module_of(n), io::PeftSavedTensor::Role::modules_to_save,
                                   io::TensorData::copy_of(T)});
      out.saved.push_back(n);
    }
    std::sort(out.saved.begin(), out.saved.end());
    std::sort(out.adapter.saved.begin(), out.adapter.saved.end(),
              [](const io::PeftSavedTensor& a, const io::PeftSavedTensor& b) { return a.key < b.key; });
    out.adapter.config.modules_to_save = save_modules;
  }
  std::vector<std::string> names;
  for (const auto& n : base.names()) {
    const auto& t = base.tensor(n);
    if (!is_extractable_linear(t)) continue;
    if (!save_modules.empty() && saving.saves_module(detail::module_of(n))) continue;
    if (!only.empty() && std::none_of(only.begin(), only.end(), [&](const std::string& s) {
          return n.find(s) != std::string::npos;
        }))
      continue;
    if (!tuned.contains(n)) lora::detail::fail("extract: '{}' is in the base checkpoint but not in the tuned one", n);
    names.push_back(n);
  }
  if (names.empty() && out.saved.empty())
    lora::detail::fail("extract: no linear weights to extract in {}", base.path().string());
  std::sort(names.begin(), names.end());
  std::set<std::string> suffixes;
  int common_rank = -1;
  for (const auto& n : names) {
    const auto& W = base.tensor(n);
    const auto& T = tuned.tensor(n);
    if (W.shape != T.shape)
      lora::detail::fail("extract: '{}' has shape {} in the base and {} in the tuned checkpoint", n,
                         fmt::join(W.shape, "x"), fmt::join(T.shape, "x"));
    if (W.bytes.size() == T.bytes.size() && W.type == T.type &&
        std::memcmp(W.bytes.data(), T.bytes.data(), W.bytes.size()) == 0) {
      out.unchanged.push_back(n);
      continue;
    }
    ExtractedModule m = extract_module(W, T, opt);
    m.name = n.substr(0, n.size() - 7);
    const std::string suffix = m.name.substr(m.name.rfind('.') + 1);
    suffixes.insert(suffix);
    AdapterOptions ao;
    ao.name = m.name;
    io::PeftModule mod{m.name,
                       LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                           m.factors.A.cast<float>(), m.factors.B.cast<float>(), static_cast<double>(m.rank), ao,
                           dynamic_scaling{false}),
                       io::dtype::F32};
    out.adapter.modules.push_back(std::move(mod));
    common_rank = common_rank < 0 ? static_cast<int>(m.rank) : std::max(common_rank, static_cast<int>(m.rank));
    if (progress) progress(m);
    m.factors = {};  // the report keeps the numbers, the adapter the factors
    out.modules.push_back(std::move(m));
  }
  if (out.adapter.modules.empty() && out.adapter.saved.empty())
    lora::detail::fail("extract: every selected weight is identical in the two checkpoints; nothing to extract");
  if (common_rank > 0) {
    out.adapter.config.r = common_rank;
    out.adapter.config.lora_alpha = common_rank;
  }
  out.adapter.config.target_modules.assign(suffixes.begin(), suffixes.end());
  std::sort(out.adapter.modules.begin(), out.adapter.modules.end(),
            [](const io::PeftModule& a, const io::PeftModule& b) { return a.name < b.name; });
  return out;
}

}  // namespace lora::analysis
