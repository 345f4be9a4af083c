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
  dtype out = dtype::BF16;  ///< BF16, F16 or F32
  double scale = 1.0;       ///< multiplies every ΔW (PEFT's merge with a weight)
  std::uint64_t max_shard_bytes = 5'000'000'000;
};

/// One weight the adapter changed.
struct QuantizedMergeModule {
  std::string weight;               ///< e.g. "model.layers.0.self_attn.q_proj.weight"
  bool from_nf4 = false;            ///< the base weight was NF4 (else float, merged as usual)
  double delta_norm = 0;            ///< ‖s·B·A‖_F
  double quant_error = std::numeric_limits<double>::quiet_NaN();   ///< ‖deq − W_ref‖_F / ‖W_ref‖_F
  double merged_error = std::numeric_limits<double>::quiet_NaN();  ///< ‖out − (W_ref + ΔW)‖_F / ‖W_ref + ΔW‖_F
};

struct QuantizedMergeSummary {
  std::size_t nf4_weights = 0;  ///< NF4 weights dequantised (merged or not)
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
}  // namespace detail

/// Merges `adapter` into the 4-bit checkpoint `base` and writes `out` (a .safetensors file,
/// or a folder when the output needs shards or `out` has no .safetensors extension).
/// Plain LoRA modules only (no DoRA, embedding LoRA, lora_bias or modules_to_save copies:
/// refused, naming the module). Every adapter module must match a weight of `base`.
template <class = void>
inline QuantizedMergeSummary merge_into_quantized(const Checkpoint& base, const PeftAdapter& adapter,
                                                  const std::filesystem::path& out,
                                                  const QuantizedMergeOptions& opt = {},
                                                  const Checkpoint* reference = nullptr) {
  if (opt.out != dtype::BF16 && opt.out != dtype::F16 && opt.out != dtype::F32)
    lora::detail::fail("merge into a 4-bit base: output dtype must be BF16, F16 or F32, got {}", dtype_name(opt.out));
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
  QuantizedMergeSummary summary;
  std::vector<TensorSpec> specs;
  std::map<std::string, Nf4Tensor> nf4;  // read once, while planning (shapes), used once
  for (const auto& e : entries) {
    const auto& v = base.tensor(e.name);
    if (e.nf4) {
      Nf4Tensor t = quant::bnb::read(base.shard(e.shard), e.name);
      specs.push_back({e.name, opt.out, t.shape()});
      ++summary.nf4_weights;
      nf4.emplace(e.name, std::move(t));
    } else {
      specs.push_back({e.name, detail::is_float_dtype(v.type) ? opt.out : v.type, v.shape});
    }
  }
  CheckpointLayout layout = CheckpointLayout::split(specs, opt.max_shard_bytes);
  layout.single_file = layout.shards.size() == 1 && out.extension() == ".safetensors";
  write_checkpoint(out, layout, [&](const TensorSpec& spec) -> TensorBytes {
    const auto& e = *by_name.at(spec.name);
    const auto& v = base.tensor(spec.name);
    if (!e.nf4 && !detail::is_float_dtype(v.type)) return TensorBytes::borrow(v.bytes);
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
        if (!reference->contains(spec.name))
          lora::detail::fail("--reference {}: no tensor '{}'", reference->path().string(), spec.name);
        const auto& rv = reference->tensor(spec.name);
        if (rv.numel() != W.size())
          lora::detail::fail("--reference {}: '{}' has {} elements, the 4-bit base {}", reference->path().string(),
                             spec.name, rv.numel(), W.size());
        const auto rvals = rv.to_vector<double>();
        const Eigen::Map<const Matrix<double>> Wr(rvals.data(), rows, cols);
        // the output as written: rounded to the output dtype
        const TensorData rounded = TensorData::from_values(spec.name, Matrix<double>(W).data(), spec.shape, opt.out);
        const auto back = TensorView{spec.name, "", opt.out, spec.shape, rounded.bytes}.to_vector<double>();
        const Eigen::Map<const Matrix<double>> Wo(back.data(), rows, cols);
        rep.quant_error = (deq - Wr).norm() / Wr.norm();
        rep.merged_error = (Wo - (Wr + D)).norm() / (Wr + D).norm();
      }
      summary.modules.push_back(std::move(rep));
    }
    const Matrix<double> Wrow = W;
    ++summary.written;
    return TensorBytes::own(TensorData::from_values(spec.name, Wrow.data(), spec.shape, opt.out).bytes);
  });
  return summary;
}

}  // namespace lora::io
