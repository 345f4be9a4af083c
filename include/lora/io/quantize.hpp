#pragma once
// Checkpoints to NF4 and back: quantize_checkpoint writes transformers' bnb-4bit layout
// (quant/bnb_format.hpp) from a float checkpoint, dequantize_checkpoint the float checkpoint
// from a bnb-4bit one (ours or one from the hub). What `lora quantize` / `lora dequantize` do.
//
// The input is a .safetensors file (the output is then a file) or a model folder (then a
// folder: each .safetensors file becomes the file of the same name, config.json and the shard
// index are written anew, every other file is copied). Both write through
// write_checkpoint_by_shard (io/checkpoint.hpp): the output appears atomically or not at all,
// and one file's tensors are in memory at a time.

#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/json.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/quant/bnb_format.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lora::io {

/// Options of quantize_checkpoint.
struct QuantizeOptions {
  Nf4Options nf4 = {};  ///< blocksize (64) and double quantisation
  /// Modules left as they are: an entry matches a module whose path has it as a dot-separated
  /// component or dotted suffix ("lm_head", "embed_tokens", "mlp.down_proj"). Written to
  /// config.json as transformers' llm_int8_skip_modules.
  std::vector<std::string> skip = {"lm_head", "embed_tokens"};
  /// Called after each input tensor is read: bytes_done/bytes_total count the input files'
  /// bytes, tensors_done/tensors_total their tensors; once more at the end with bytes_done ==
  /// bytes_total (headers included).
  std::function<void(const WriteProgress&)> progress;
};

/// What quantize_checkpoint wrote.
struct QuantizeSummary {
  int quantized = 0;              ///< weights written as NF4
  int kept = 0;                   ///< tensors copied as they are (skipped, 1-D, integer, empty)
  std::int64_t parameters = 0;    ///< elements of the quantised weights
  std::int64_t bytes_before = 0;  ///< their bytes in the input
  std::int64_t bytes_after = 0;   ///< their bytes as NF4 with every companion tensor
  /// bnb_4bit_compute_dtype written to config.json: bfloat16 if any quantised weight was,
  /// else float16 if any was, else float32.
  source_dtype compute_dtype = source_dtype::float32;
  /// Storage per quantised parameter, companions included (≈ 4.5 at blocksize 64).
  double bits_per_parameter() const {
    return parameters ? 8.0 * static_cast<double>(bytes_after) / static_cast<double>(parameters) : 0.0;
  }
};

/// Options of dequantize_checkpoint.
struct DequantizeOptions {
  /// Output dtype of the dequantised weights (F32, BF16, F16 or F64); unset: the dtype
  /// recorded in each weight's quant_state.
  std::optional<dtype> to;
  /// As QuantizeOptions::progress.
  std::function<void(const WriteProgress&)> progress;
};

/// What dequantize_checkpoint wrote.
struct DequantizeSummary {
  int dequantized = 0;  ///< NF4 weights written as float tensors
  int kept = 0;         ///< other tensors, copied as they are
};

namespace detail {

/// Whether `module` (a weight's name without ".weight") is one QuantizeOptions::skip names.
inline bool skipped_module(std::string_view module, const std::vector<std::string>& skip) {
  for (const auto& s : skip) {
    if (module == s || (module.ends_with(s) && module.size() > s.size() && module[module.size() - s.size() - 1] == '.'))
      return true;
    std::size_t start = 0;
    while (start <= module.size()) {
      const auto dot = module.find('.', start);
      if (module.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start) == s) return true;
      if (dot == std::string_view::npos) break;
      start = dot + 1;
    }
  }
  return false;
}

/// A model folder's .safetensors files, sorted by name.
inline std::vector<std::filesystem::path> safetensors_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) lora::fail("{}: folder has no .safetensors files", dir.string());
  return files;
}

/// Counts input bytes for a progress callback: tensors as they are read, then the total.
class InputProgress {
 public:
  InputProgress(const std::vector<std::filesystem::path>& files, const std::function<void(const WriteProgress&)>& cb)
      : cb_(cb) {
    if (!cb_) return;
    for (const auto& p : files) {
      p_.bytes_total += std::filesystem::file_size(p);
      p_.tensors_total += SafetensorsFile::open(p).tensors().size();
    }
  }
  void tensor(const TensorView& v) {
    if (!cb_) return;
    p_.bytes_done += v.bytes.size();
    ++p_.tensors_done;
    p_.last = v.name;
    cb_(p_);
  }
  void finish() {
    if (!cb_) return;
    p_.bytes_done = p_.bytes_total;
    p_.last = {};
    cb_(p_);
  }

 private:
  const std::function<void(const WriteProgress&)>& cb_;
  WriteProgress p_;
};

/// Quantises the candidate weights of one file; everything else is copied.
inline std::vector<TensorData> quantize_tensors(const SafetensorsFile& f, const QuantizeOptions& opt,
                                                QuantizeSummary& sum, InputProgress& progress) {
  std::vector<TensorData> out;
  for (const auto& v : f.tensors()) {
    progress.tensor(v);
    const bool floating = v.type == dtype::F32 || v.type == dtype::BF16 || v.type == dtype::F16 || v.type == dtype::F64;
    const bool candidate = std::string_view(v.name).ends_with(".weight") && v.ndim() == 2 && floating &&
                           !quant::bnb::is_companion(v.name);
    if (!candidate || skipped_module(std::string_view(v.name).substr(0, v.name.size() - 7), opt.skip) ||
        v.numel() == 0) {
      out.push_back(TensorData::copy_of(v));
      ++sum.kept;
      continue;
    }
    require_finite(v, "quantize");  // a NaN would poison its block's absmax
    const Nf4Tensor t = v.type == dtype::BF16  ? Nf4Tensor::quantize(v.to_matrix<bfloat16>(), opt.nf4)
                        : v.type == dtype::F16 ? Nf4Tensor::quantize(v.to_matrix<half>(), opt.nf4)
                                               : Nf4Tensor::quantize(v.to_matrix<float>(), opt.nf4);
    if (t.dtype() == source_dtype::bfloat16 ||
        (t.dtype() == source_dtype::float16 && sum.compute_dtype != source_dtype::bfloat16))
      sum.compute_dtype = t.dtype();
    sum.parameters += v.numel();
    sum.bytes_before += static_cast<std::int64_t>(v.bytes.size());
    for (auto& td : quant::bnb::to_tensors(v.name, t)) {
      sum.bytes_after += static_cast<std::int64_t>(td.bytes.size());
      out.push_back(std::move(td));
    }
    ++sum.quantized;
  }
  return out;
}

/// Dequantises the NF4 weights of one file; everything else but their companions is copied.
inline std::vector<TensorData> dequantize_tensors(const SafetensorsFile& f, const DequantizeOptions& opt,
                                                  DequantizeSummary& sum, InputProgress& progress) {
  std::vector<TensorData> out;
  for (const auto& v : f.tensors()) {
    progress.tensor(v);
    if (quant::bnb::is_companion(v.name)) {
      // A companion whose weight is missing would otherwise vanish from the output silently.
      const std::string w = v.name.substr(0, v.name.rfind(".weight.") + 7);
      if (!f.contains(w))
        lora::fail("{}: '{}' belongs to a bitsandbytes 4-bit weight '{}' that is not in the file", f.path(), v.name,
                   w);
      continue;
    }
    if (!quant::bnb::is_nf4_weight(f, v.name)) {
      if (f.contains(v.name + ".quant_state.bitsandbytes__fp4"))
        lora::fail("{}: '{}' is bitsandbytes FP4; only NF4 is supported", f.path(), v.name);
      out.push_back(TensorData::copy_of(v));
      ++sum.kept;
      continue;
    }
    const auto t = quant::bnb::read(f, v.name);
    const dtype d = opt.to.value_or(t.dtype() == source_dtype::bfloat16  ? dtype::BF16
                                    : t.dtype() == source_dtype::float16 ? dtype::F16
                                                                         : dtype::F32);
    std::vector<float> vals(static_cast<std::size_t>(t.numel()));
    t.dequantize_into(vals.data());
    out.push_back(TensorData::from_values(v.name, vals.data(), t.shape(), d));
    ++sum.dequantized;
  }
  return out;
}

/// The frame of quantize/dequantize, on write_checkpoint_by_shard (so the same atomic writers
/// and file writer as every checkpoint): each input file becomes the output file of the same
/// name, its tensors computed by `convert(file)` when its turn comes; `check()` runs after the
/// last file and may refuse. A file gives a file (metadata "format": "pt" added where the input
/// had none when `add_format`). A folder gives a folder: its shard index, if it has one, is
/// written anew for the output's tensors (its metadata kept, total_size the bytes written,
/// weight_map sorted as transformers writes it), config.json goes through `edit_config`, every
/// other file is copied.
inline void convert_checkpoint(const std::filesystem::path& in, const std::filesystem::path& out,
                               const std::vector<std::filesystem::path>& files, bool add_format,
                               const std::function<std::vector<TensorData>(const SafetensorsFile&)>& convert,
                               const std::function<void()>& check,
                               const std::function<void(nlohmann::ordered_json&)>& edit_config) {
  namespace fs = std::filesystem;
  const bool folder = fs::is_directory(in);
  CheckpointLayout layout;
  layout.single_file = !folder;
  for (const auto& p : files) {
    auto meta = SafetensorsFile::open(p).metadata();
    if (!folder && add_format && !meta.count("format")) meta["format"] = "pt";
    layout.shards.push_back(ShardSpec{p.filename().string(), {}, std::move(meta)});
  }
  if (folder && fs::exists(in / checkpoint_index_name)) {
    layout.write_index = true;
    const auto idx = lora::io::read_json_file<nlohmann::ordered_json>(in / checkpoint_index_name);
    if (idx.contains("metadata") && idx["metadata"].is_object()) layout.index_metadata = idx["metadata"];
  }
  write_checkpoint_by_shard(
      out, std::move(layout),
      [&](std::size_t s) {
        auto tensors = convert(SafetensorsFile::open(files[s]));
        if (s + 1 == files.size()) check();
        return tensors;
      },
      [&](const fs::path& tmp) {
        for (const auto& e : fs::directory_iterator(in)) {
          const auto name = e.path().filename().string();
          if (!e.is_regular_file() || e.path().extension() == ".safetensors" || name == checkpoint_index_name) continue;
          if (name == "config.json") {
            auto j = lora::io::read_json_file<nlohmann::ordered_json>(e.path());
            edit_config(j);
            write_bytes(tmp / name, j.dump(2) + "\n");
          } else {
            fs::copy_file(e.path(), tmp / name);
          }
        }
      });
}

inline std::vector<std::filesystem::path> checkpoint_inputs(const std::filesystem::path& in) {
  if (!std::filesystem::exists(in)) lora::fail("{}: no such file or folder", in.string());
  return std::filesystem::is_directory(in) ? safetensors_files(in) : std::vector<std::filesystem::path>{in};
}

}  // namespace detail

/// Quantises every 2-D floating-point tensor named "*.weight" of a checkpoint to NF4,
/// bit-identical to bitsandbytes' quantize_4bit(quant_type="nf4"), and writes transformers'
/// bnb-4bit layout (<m>.weight packed U8, .absmax, .quant_map, .nested_* with double
/// quantisation, the .quant_state.bitsandbytes__nf4 JSON blob). Tensors of skipped modules,
/// 1-D and non-float tensors are copied. A folder's config.json gets a
/// "quantization_config"; its shard index lists the new tensors, total_size the bytes
/// written. Refuses (writing nothing) NaN/Inf weights and a checkpoint with nothing to quantise.
///
///   auto s = lora::io::quantize_checkpoint("llama-3b", "llama-3b-bnb4", {.nf4 = {64, true}});
///   fmt::print("{} weights, {:.3f} bits each\n", s.quantized, s.bits_per_parameter());
inline QuantizeSummary quantize_checkpoint(const std::filesystem::path& in, const std::filesystem::path& out,
                                           const QuantizeOptions& opt = {}) {
  if (!quant::is_valid_blocksize(opt.nf4.blocksize))
    lora::fail("quantize: blocksize must be a power of two from 32 to 4096, got {}", opt.nf4.blocksize);
  const auto files = detail::checkpoint_inputs(in);
  detail::InputProgress progress(files, opt.progress);
  QuantizeSummary sum;
  detail::convert_checkpoint(
      in, out, files, true, [&](const SafetensorsFile& f) { return detail::quantize_tensors(f, opt, sum, progress); },
      [&] {
        progress.finish();
        if (sum.quantized == 0) lora::fail("{}: no 2-D floating-point .weight tensors to quantise", in.string());
      },
      [&](nlohmann::ordered_json& config) {
        config["quantization_config"] =
            quant::bnb::quantization_config(opt.nf4.double_quant, sum.compute_dtype, opt.skip);
      });
  return sum;
}

/// Dequantises every bitsandbytes NF4 weight of a checkpoint (with or without double
/// quantisation) to a float tensor: code · absmax in float32, rounded once to `opt.to`
/// (default: the dtype its quant_state records). Other tensors are copied, companions
/// dropped; a folder's config.json loses "quantization_config" and its shard index the
/// companions. Refuses (writing nothing) FP4 weights, orphaned companions, malformed
/// quant_state and a checkpoint without NF4 weights.
inline DequantizeSummary dequantize_checkpoint(const std::filesystem::path& in, const std::filesystem::path& out,
                                               const DequantizeOptions& opt = {}) {
  if (opt.to && *opt.to != dtype::F32 && *opt.to != dtype::BF16 && *opt.to != dtype::F16 && *opt.to != dtype::F64)
    lora::fail("dequantize: output dtype must be F32, BF16, F16 or F64, got {}", dtype_name(*opt.to));
  const auto files = detail::checkpoint_inputs(in);
  detail::InputProgress progress(files, opt.progress);
  DequantizeSummary sum;
  detail::convert_checkpoint(
      in, out, files, false, [&](const SafetensorsFile& f) { return detail::dequantize_tensors(f, opt, sum, progress); },
      [&] {
        progress.finish();
        if (sum.dequantized == 0) lora::fail("{}: no bitsandbytes NF4 weights found", in.string());
      },
      [&](nlohmann::ordered_json& config) { config.erase("quantization_config"); });
  return sum;
}

}  // namespace lora::io
