#pragma once
// An adapter every engine scales right: each module's PEFT scaling folded into B, one rank
// for all modules, alpha = r, no rank_pattern/alpha_pattern, no rsLoRA.
//
//   lora::io::NormalizeReport rep;
//   auto plain = lora::io::normalize_adapter(lora::io::load_peft_adapter("rs/"), &rep);
//   lora::io::save_peft_adapter("rs-normalized/", plain);
//
// Module m with scaling s_m (alpha_m/r_m, alpha_m/√r_m with rsLoRA, times any multiplier)
// and rank r_m becomes A' = [A; 0] (R × in) and B' = [s_m·B, 0] (out × R) with R = max r_m,
// alpha = R, so s' = 1 and s'·B'·A' = s_m·B·A exactly up to float rounding of s_m·B. A
// lora_B.bias is scaled by s_m too (PEFT scales lora_B's output, bias included); DoRA
// magnitudes are unchanged (DoRA's norm is taken of W + s·B·A, which does not change).
// Engines that take one alpha/r for the whole adapter (vLLM, TGI), or alpha/r with r from
// each tensor (llama.cpp), all compute 1 from it.

#include <lora/core/adapter.hpp>
#include <lora/core/embedding.hpp>
#include <lora/io/peft.hpp>

#include <string>
#include <vector>

namespace lora::io {

/// What normalize_adapter did to each module.
struct NormalizeReport {
  struct Module {
    std::string name;
    double scaling = 1;  ///< PEFT's s, now in B
    Index rank = 0;      ///< r before (after: `rank` of the report)
  };
  Index rank = 0;  ///< the common rank R = alpha
  std::vector<Module> modules;
};

/// The adapter with every module's scaling in B, common rank R = max r, alpha = R (s = 1).
inline PeftAdapter normalize_adapter(const PeftAdapter& in, NormalizeReport* report = nullptr) {
  require_modules_only(in, "normalize");
  if (in.modules.empty()) lora::detail::fail("normalize: the adapter has no modules");
  Index R = 0;
  for (const auto& m : in.modules) R = std::max(R, m.adapter.rank());
  PeftAdapter out;
  out.config = in.config;
  out.config.r = static_cast<int>(R);
  out.config.lora_alpha = static_cast<double>(R);
  out.config.use_rslora = false;
  out.config.rank_pattern.clear();
  out.config.alpha_pattern.clear();
  out.saved = in.saved;
  out.trainable_tokens = in.trainable_tokens;
  out.skipped = in.skipped;
  if (report) report->rank = R;
  for (const auto& m : in.modules) {
    const auto& a = m.adapter;
    const double s = a.scaling();
    const Index r = a.rank();
    Matrix<float> A = Matrix<float>::Zero(R, a.A().cols());
    Matrix<float> B = Matrix<float>::Zero(a.B().rows(), R);
    A.topRows(r) = a.A();
    B.leftCols(r) = (a.B().cast<double>() * s).cast<float>();
    AdapterOptions o;
    o.name = m.name;
    o.fan_in_fan_out = a.fan_in_fan_out();
    PeftModule nm{m.name,
                  a.with_lora(m.is_embedding() ? embedding_adapter<float, dynamic_scaling>(std::move(A), std::move(B),
                                                                                          double(R), o, dynamic_scaling{false})
                                               : LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                                                     std::move(A), std::move(B), double(R), o, dynamic_scaling{false})),
                  m.stored_dtype, m.kind, std::nullopt};
    if (m.lora_bias) nm.lora_bias = Vector<float>((m.lora_bias->cast<double>() * s).cast<float>());
    out.modules.push_back(std::move(nm));
    if (report) report->modules.push_back({m.name, s, r});
  }
  return out;
}

/// load_peft_adapter, normalize_adapter, save_peft_adapter (atomic; dtype: the input's).
inline NormalizeReport normalize_peft_folder(const std::filesystem::path& in, const std::filesystem::path& out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out) && fs::equivalent(in, out, ec))
    lora::detail::fail("{}: is the input folder; normalize writes a new folder", out.string());
  const PeftAdapter ad = load_peft_adapter(in);
  NormalizeReport rep;
  const PeftAdapter n = normalize_adapter(ad, &rep);
  save_peft_adapter(out, n, ad.modules.front().stored_dtype);
  return rep;
}

}  // namespace lora::io
