#pragma once
// Merging a LoRA adapter into a bitsandbytes 4-bit (NF4) checkpoint, the layout transformers
// saves for load_in_4bit models (quant/bnb_format.hpp): every NF4 weight is dequantised
// (code·absmax, bit-exact with bitsandbytes, double quantisation included), the adapter's
// ΔW = s·B·A is added in double, and the sum is rounded once to the output dtype
// (BF16, F16 or F32). Other float tensors are converted to the output dtype; the NF4
// companion tensors (absmax, quant_map, quant_state, …) are dropped. Written tensor by
// tensor and atomically (io::write_checkpoint).
//
// With a float `reference` checkpoint (the model before quantisation) it also reports, per
// merged weight, how far the 4-bit route lands from merging into the float base:
// ‖out − (W_ref + ΔW)‖_F / ‖W_ref + ΔW‖_F, next to the quantisation error ‖deq − W_ref‖_F / ‖W_ref‖_F.
//
// With `requantize` the merged NF4 weights are written back as NF4 instead (bitsandbytes'
// layout, quant/bnb_format.hpp, the base tensor's blocksize, double quantisation and dtype):
// M = deq + ΔW in double, rounded to float32 and quantised once (PEFT's merge into a
// Linear4bit rounds M to the compute dtype first, then quantises). The report gives the
// re-quantisation error ‖deq(q(M)) − M‖_F / ‖M‖_F per module, and with a reference the
// error of the dequantised output against W_ref + ΔW. Untouched NF4 weights keep their
// bytes and companions; float tensors keep their dtype.

#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/quant/bnb_format.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace lora::io {

/// Options of merge_into_quantized.
struct QuantizedMergeOptions {
  dtype out = dtype::BF16;  ///< BF16, F16 or F32 (not used with `requantize`)
  double scale = 1.0;       ///< multiplies every ΔW (PEFT's merge with a weight)
  std::uint64_t max_shard_bytes = 5'000'000'000;
  /// Write merged NF4 weights as NF4 again (and every other tensor as stored) instead of
  /// dequantising the whole model to `out`.
  bool requantize = false;
};

/// One weight the adapter changed.
struct QuantizedMergeModule {
  std::string weight;               ///< e.g. "model.layers.0.self_attn.q_proj.weight"
  bool from_nf4 = false;            ///< the base weight was NF4 (else float, merged as usual)
  double delta_norm = 0;            ///< ‖s·B·A‖_F
  double quant_error = std::numeric_limits<double>::quiet_NaN();   ///< ‖deq − W_ref‖_F / ‖W_ref‖_F
  double merged_error = std::numeric_limits<double>::quiet_NaN();  ///< ‖out − (W_ref + ΔW)‖_F / ‖W_ref + ΔW‖_F
  /// requantize: ‖deq(q(M)) − M‖_F / ‖M‖_F, M = deq + ΔW, the error the second quantisation adds
  double requant_error = std::numeric_limits<double>::quiet_NaN();
};

struct QuantizedMergeSummary {
  std::size_t nf4_weights = 0;  ///< NF4 weights dequantised (merged or not)
  std::size_t requantized = 0;  ///< NF4 weights merged and quantised again (requantize)
  std::size_t written = 0;      ///< tensors written
  std::vector<QuantizedMergeModule> modules;
};

namespace detail {
/// The base tensors of a checkpoint that are model tensors (not NF4 companions), with the
/// shard each is in and whether it is an NF4 weight.
struct QuantizedEntry {
  std::string name;
  std::size_t shard = 0;
  bool nf4 = false;
};

template <class = void>
inline std::vector<QuantizedEntry> quantized_entries(const Checkpoint& ck) {
  std::vector<QuantizedEntry> out;
  for (const auto& n : ck.names()) {
    if (quant::bnb::is_companion(n)) continue;
    const std::size_t s = ck.shard_of(n);
    out.push_back({n, s, quant::bnb::is_nf4_weight(ck.shard(s), n)});
  }
  return out;
}

inline bool is_float_dtype(dtype t) { return t == dtype::F64 || t == dtype::F32 || t == dtype::F16 || t == dtype::BF16; }

/// ΔW of a module as [out × in] in double (fan_in_fan_out transposed back to W's layout
/// is the caller's business: the weight stored in the checkpoint has the same layout as
/// delta_weight()).
template <class = void>
inline Eigen::MatrixXd delta_of(const PeftModule& m, double scale) {
  const auto& a = m.adapter;
  Eigen::MatrixXd d = (scale * a.scaling()) * (a.B().template cast<double>() * a.A().template cast<double>());
  if (a.fan_in_fan_out()) return d.transpose();
  return d;
}

/// The reference weight of `name` as a [rows × cols] double matrix, checked against the base.
template <class = void>
inline Eigen::MatrixXd reference_weight(const Checkpoint& reference, const std::string& name, Index rows, Index cols) {
  if (!reference.contains(name))
    lora::detail::fail("--reference {}: no tensor '{}'", reference.path().string(), name);
  const auto& rv = reference.tensor(name);
  if (rv.numel() != rows * cols)
    lora::detail::fail("--reference {}: '{}' has {} elements, the 4-bit base {}", reference.path().string(), name,
                       rv.numel(), rows * cols);
  const auto rvals = rv.to_vector<double>();
  return Eigen::Map<const Matrix<double>>(rvals.data(), rows, cols);
}
}  // namespace detail

/// Merges `adapter` into the 4-bit checkpoint `base` and writes `out` (a .safetensors file,
/// or a folder when the output needs shards or `out` has no .safetensors extension).
/// Plain LoRA modules only (no DoRA, embedding LoRA, lora_bias or modules_to_save copies:
/// refused, naming the module). Every adapter module must match a weight of `base`.
/// With opt.requantize the merged NF4 weights are kept in NF4 (see the header comment);
/// their new tensors are held in memory until written (≈ 0.56 bytes per parameter).
template <class = void>
inline QuantizedMergeSummary merge_into_quantized(const Checkpoint& base, const PeftAdapter& adapter,
                                                  const std::filesystem::path& out,
                                                  const QuantizedMergeOptions& opt = {},
                                                  const Checkpoint* reference = nullptr) {
  if (opt.out != dtype::BF16 && opt.out != dtype::F16 && opt.out != dtype::F32)
    lora::detail::fail("merge into a 4-bit base: output dtype must be BF16, F16 or F32, got {}", dtype_name(opt.out));
  require_modules_only(adapter, "merge into a 4-bit base");
  const auto entries = detail::quantized_entries(base);
  std::map<std::string, const detail::QuantizedEntry*> by_name;
  for (const auto& e : entries) by_name[e.name] = &e;
  std::map<std::string, const PeftModule*> module_of;  // weight name → module
  for (const auto& m : adapter.modules) {
    if (m.is_dora() || m.is_embedding() || m.lora_bias)
      lora::detail::fail("merge into a 4-bit base: module '{}' is {}; only plain LoRA modules are supported", m.name,
                         m.is_dora() ? "DoRA" : m.is_embedding() ? "an embedding LoRA" : "lora_bias");
    const std::string w = m.name + ".weight";
    auto it = by_name.find(w);
    if (it == by_name.end())
      lora::detail::fail("merge into a 4-bit base: adapter module '{}' has no weight '{}' in {}", m.name, w,
                         base.path().string());
    module_of[w] = &m;
  }
  if (!adapter.saved.empty())
    lora::detail::fail("merge into a 4-bit base: the adapter carries {} full tensors (modules_to_save, e.g. '{}'); "
                       "not supported here",
                       adapter.saved.size(), adapter.saved.front().key);
  // the companions of each NF4 weight, in file order (requantize keeps or replaces them)
  std::map<std::string, std::vector<std::string>> companions;
  if (opt.requantize)
    for (const auto& n : base.names())
      if (quant::bnb::is_companion(n)) {
        const auto pos = n.find(".weight.");
        if (pos != std::string::npos) companions[n.substr(0, pos + 7)].push_back(n);
      }
  QuantizedMergeSummary summary;
  std::vector<TensorSpec> specs;
  std::map<std::string, Nf4Tensor> nf4;           // read once, while planning (shapes), used once
  std::map<std::string, TensorData> requantized;  // requantize: the new tensors of merged NF4 weights
  for (const auto& e : entries) {
    const auto& v = base.tensor(e.name);
    if (e.nf4 && opt.requantize) {
      ++summary.nf4_weights;
      auto mit = module_of.find(e.name);
      if (mit == module_of.end()) {  // untouched: the stored weight and companions
        specs.push_back({e.name, v.type, v.shape});
        for (const auto& c : companions[e.name]) specs.push_back({c, base.tensor(c).type, base.tensor(c).shape});
        continue;
      }
      Nf4Tensor t = quant::bnb::read(base.shard(e.shard), e.name);
      const Eigen::MatrixXd deq = t.dequantize<double>();
      const Eigen::MatrixXd D = detail::delta_of(*mit->second, opt.scale);
      if (D.rows() != deq.rows() || D.cols() != deq.cols())
        lora::detail::fail("merge into a 4-bit base: '{}' is [{} x {}] but module '{}' gives ΔW [{} x {}]", e.name,
                           deq.rows(), deq.cols(), mit->second->name, D.rows(), D.cols());
      const Eigen::MatrixXd M = deq + D;
      t.requantize(M);  // same blocksize, double quantisation and dtype
      const Eigen::MatrixXd back = t.dequantize<double>();
      QuantizedMergeModule rep;
      rep.weight = e.name;
      rep.from_nf4 = true;
      rep.delta_norm = D.norm();
      const double mn = M.norm();
      rep.requant_error = mn > 0 ? (back - M).norm() / mn : 0.0;
      if (reference) {
        const Eigen::MatrixXd Wr = detail::reference_weight(*reference, e.name, deq.rows(), deq.cols());
        rep.quant_error = (deq - Wr).norm() / Wr.norm();
        rep.merged_error = (back - (Wr + D)).norm() / (Wr + D).norm();
      }
      summary.modules.push_back(std::move(rep));
      ++summary.requantized;
      for (auto& td : quant::bnb::to_tensors(e.name, t)) {
        specs.push_back({td.name, td.type, td.shape});
        requantized.emplace(td.name, std::move(td));
      }
    } else if (e.nf4) {
      Nf4Tensor t = quant::bnb::read(base.shard(e.shard), e.name);
      specs.push_back({e.name, opt.out, t.shape()});
      ++summary.nf4_weights;
      nf4.emplace(e.name, std::move(t));
    } else {
      specs.push_back({e.name, detail::is_float_dtype(v.type) && !opt.requantize ? opt.out : v.type, v.shape});
    }
  }
  CheckpointLayout layout = CheckpointLayout::split(specs, opt.max_shard_bytes);
  layout.single_file = layout.shards.size() == 1 && out.extension() == ".safetensors";
  write_checkpoint(out, layout, [&](const TensorSpec& spec) -> TensorBytes {
    ++summary.written;
    if (auto it = requantized.find(spec.name); it != requantized.end()) {
      auto bytes = std::move(it->second.bytes);
      requantized.erase(it);
      return TensorBytes::own(std::move(bytes));
    }
    const auto& v = base.tensor(spec.name);
    const auto eit = by_name.find(spec.name);
    if (eit == by_name.end() || (eit->second->nf4 && opt.requantize) || !detail::is_float_dtype(spec.type))
      return TensorBytes::borrow(v.bytes);  // a kept NF4 weight or companion, or a non-float tensor
    const auto& e = *eit->second;
    Eigen::MatrixXd W;
    Index rows = 1, cols = 1;
    if (e.nf4) {
      const auto& t = nf4.at(spec.name);
      rows = t.rows();
      cols = t.cols();
      Matrix<float> f(rows, cols);
      t.dequantize_into(f.data());
      W = f.cast<double>();
      nf4.erase(spec.name);
    } else {
      rows = v.shape.empty() ? 1 : v.shape[0];
      cols = rows ? v.numel() / std::max<std::int64_t>(rows, 1) : 0;
      const auto vals = v.to_vector<double>();
      W = Eigen::Map<const Matrix<double>>(vals.data(), rows, cols);
    }
    auto mit = module_of.find(spec.name);
    if (mit != module_of.end()) {
      const PeftModule& m = *mit->second;
      const Eigen::MatrixXd D = detail::delta_of(m, opt.scale);
      if (D.rows() != W.rows() || D.cols() != W.cols())
        lora::detail::fail("merge into a 4-bit base: '{}' is [{} x {}] but module '{}' gives ΔW [{} x {}]", spec.name,
                           W.rows(), W.cols(), m.name, D.rows(), D.cols());
      QuantizedMergeModule rep;
      rep.weight = spec.name;
      rep.from_nf4 = e.nf4;
      rep.delta_norm = D.norm();
      const Eigen::MatrixXd deq = W;
      W += D;
      if (reference) {
        const Eigen::MatrixXd Wr = detail::reference_weight(*reference, spec.name, rows, cols);
        // the output as written: rounded to the output dtype
        const TensorData rounded = TensorData::from_values(spec.name, Matrix<double>(W).data(), spec.shape, spec.type);
        const auto back = TensorView{spec.name, "", spec.type, spec.shape, rounded.bytes}.to_vector<double>();
        const Eigen::Map<const Matrix<double>> Wo(back.data(), rows, cols);
        rep.quant_error = (deq - Wr).norm() / Wr.norm();
        rep.merged_error = (Wo - (Wr + D)).norm() / (Wr + D).norm();
      }
      summary.modules.push_back(std::move(rep));
    }
    const Matrix<double> Wrow = W;
    return TensorBytes::own(TensorData::from_values(spec.name, Wrow.data(), spec.shape, spec.type).bytes);
  });
  std::sort(summary.modules.begin(), summary.modules.end(),
            [](const QuantizedMergeModule& a, const QuantizedMergeModule& b) { return a.weight < b.weight; });
  return summary;
}

}  // namespace lora::io
