#pragma once
// The safetensors layout transformers uses for bitsandbytes 4-bit checkpoints
// (QuantState.as_dict(packed=True), saved by Linear4bit._save_to_state_dict):
//
//   <m>.weight                                U8  [ceil(n/2), 1]  packed codes
//   <m>.weight.absmax                         F32 [blocks]        (U8 [blocks] with double quantisation)
//   <m>.weight.quant_map                      F32 [16]            the NF4 code
//   <m>.weight.nested_absmax                  F32 [ceil(blocks/256)]   } double quantisation only
//   <m>.weight.nested_quant_map               F32 [256]                }
//   <m>.weight.quant_state.bitsandbytes__nf4  U8  [len]  UTF-8 JSON: {"quant_type": "nf4",
//       "blocksize": 64, "dtype": "bfloat16", "shape": [out, in], and with double quantisation
//       "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <float>}

#include <lora/error.hpp>
#include <lora/io/json.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace lora::quant::bnb {

/// Suffix of the JSON blob that marks a bnb-4bit weight.
inline constexpr std::string_view state_suffix = ".quant_state.bitsandbytes__nf4";

/// True if `weight_name` (e.g. "model.layers.0.mlp.up_proj.weight") is stored as bnb NF4 in `f`.
inline bool is_nf4_weight(const io::SafetensorsFile& f, const std::string& weight_name) {
  return f.contains(weight_name + std::string(state_suffix));
}

/// True if `name` is one of the companion tensors of a bnb 4-bit weight
/// (absmax, quant_map, nested_*, quant_state.*), not a model tensor.
inline bool is_companion(std::string_view name) {
  for (std::string_view s : {".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map"})
    if (name.size() >= s.size() && name.substr(name.size() - s.size()) == s) return true;
  return name.find(".weight.quant_state.") != std::string_view::npos;
}

/// The tensors that store `W` under `weight_name`, in transformers' layout.
inline std::vector<io::TensorData> to_tensors(const std::string& weight_name, const lora::Nf4Tensor& W) {
  std::vector<io::TensorData> out;
  io::TensorData w;
  w.name = weight_name;
  w.type = io::dtype::U8;
  w.shape = {static_cast<std::int64_t>(W.packed().size()), 1};
  w.bytes.resize(W.packed().size());
  if (!w.bytes.empty()) std::memcpy(w.bytes.data(), W.packed().data(), W.packed().size());
  out.push_back(std::move(w));

  nlohmann::ordered_json blob;
  blob["quant_type"] = "nf4";
  blob["blocksize"] = W.blocksize();
  blob["dtype"] = source_dtype_name(W.dtype());
  blob["shape"] = W.shape();
  const auto& dq = W.double_quant_state();
  if (dq) {
    out.push_back(io::TensorData::from_values(weight_name + ".absmax", dq->codes.data(),
                                              {static_cast<std::int64_t>(dq->codes.size())}, io::dtype::U8));
  } else {
    out.push_back(io::TensorData::from_values(weight_name + ".absmax", W.absmax().data(),
                                              {static_cast<std::int64_t>(W.absmax().size())}, io::dtype::F32));
  }
  out.push_back(io::TensorData::from_values(weight_name + ".quant_map", nf4_code.data(), {16}, io::dtype::F32));
  if (dq) {
    out.push_back(io::TensorData::from_values(weight_name + ".nested_absmax", dq->nested_absmax.data(),
                                              {static_cast<std::int64_t>(dq->nested_absmax.size())}, io::dtype::F32));
    out.push_back(io::TensorData::from_values(weight_name + ".nested_quant_map", dq->nested_code.data(), {256},
                                              io::dtype::F32));
    blob["nested_blocksize"] = nested_blocksize;
    blob["nested_dtype"] = "float32";
    blob["nested_offset"] = static_cast<double>(dq->offset);  // shortest repr of the float, as Python's json
  }
  // Python's json.dumps separators: ", " and ": ".
  std::string js = blob.dump();
  std::string pretty;
  pretty.reserve(js.size() + 16);
  bool in_str = false;
  for (std::size_t i = 0; i < js.size(); ++i) {
    const char c = js[i];
    pretty.push_back(c);
    if (c == '"' && (i == 0 || js[i - 1] != '\\')) in_str = !in_str;
    if (!in_str && (c == ',' || c == ':')) pretty.push_back(' ');
  }
  out.push_back(io::TensorData::from_values(weight_name + std::string(state_suffix),
                                            reinterpret_cast<const std::uint8_t*>(pretty.data()),
                                            {static_cast<std::int64_t>(pretty.size())}, io::dtype::U8));
  return out;
}

/// Reads the bnb NF4 weight `weight_name` from `f` (with or without double
/// quantisation). Throws lora::error naming the file and tensor on anything
/// malformed, and for FP4 weights (not supported).
inline lora::Nf4Tensor read(const io::SafetensorsFile& f, const std::string& weight_name) {
  const std::string where = fmt::format("{}: '{}'", f.path(), weight_name);
  const std::string blob_name = weight_name + std::string(state_suffix);
  if (!f.contains(blob_name)) {
    if (f.contains(weight_name + ".quant_state.bitsandbytes__fp4"))
      lora::detail::fail("{}: is bitsandbytes FP4; only NF4 is supported", where);
    lora::detail::fail("{}: no '{}' tensor, not a bitsandbytes NF4 weight", where, blob_name);
  }
  const auto& bt = f.tensor(blob_name);
  if (bt.type != io::dtype::U8) lora::detail::fail("{}: quant_state blob has dtype {}, expected U8", where, io::dtype_name(bt.type));
  // bounded nesting and unique keys, as every JSON we did not write (io/json.hpp)
  const nlohmann::json js = io::parse_json(
      std::string_view(reinterpret_cast<const char*>(bt.bytes.data()), bt.bytes.size()), where + ": quant_state blob");
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!js.is_object() || !js.contains(key)) lora::detail::fail("{}: quant_state has no '{}'", where, key);
    return js[key];
  };
  if (!need("quant_type").is_string() || js["quant_type"].get<std::string>() != "nf4")
    lora::detail::fail("{}: quant_type is {}, expected \"nf4\"", where, js["quant_type"].dump());
  if (!need("blocksize").is_number_integer()) lora::detail::fail("{}: blocksize must be an integer", where);
  const auto bs = js["blocksize"].get<std::int64_t>();
  std::vector<std::int64_t> shape;
  std::int64_t n = 1;
  if (!need("shape").is_array()) lora::detail::fail("{}: shape must be an array of integers", where);
  for (auto& d : js["shape"]) {
    if (!d.is_number_integer() || d.get<std::int64_t>() < 0)
      lora::detail::fail("{}: shape must be an array of non-negative integers, got {}", where, js["shape"].dump());
    const auto v = d.get<std::int64_t>();
    if (v > 0 && n > (std::int64_t{1} << 62) / v)  // the element count must not overflow
      lora::detail::fail("{}: shape {} is too large", where, js["shape"].dump());
    n *= v;
    shape.push_back(v);
  }
  source_dtype dt = source_dtype::float32;
  if (js.contains("dtype") && js["dtype"].is_string()) {
    const auto s = js["dtype"].get<std::string>();
    if (s == "bfloat16")
      dt = source_dtype::bfloat16;
    else if (s == "float16")
      dt = source_dtype::float16;
    else if (s == "float32")
      dt = source_dtype::float32;
    else
      lora::detail::fail("{}: dtype '{}' is not one of float32, bfloat16, float16", where, s);
  }

  // Packed codes are U8, as transformers saves bnb-4bit checkpoints. Codes stored under a
  // float dtype (bnb's quant_storage for FSDP) are refused rather than reinterpreted: a
  // float tensor that merely carries a quant_state is far more often a mistake (issue 21).
  const auto& wt = f.tensor(weight_name);
  if (wt.type != io::dtype::U8)
    lora::detail::fail("{}: packed NF4 codes have dtype {}, expected U8 (uint8 quant_storage)", where,
                       io::dtype_name(wt.type));
  if (static_cast<std::int64_t>(wt.bytes.size()) < packed_bytes(n))
    lora::detail::fail("{}: packed weight has {} bytes, shape {} needs {}", where, wt.bytes.size(), js["shape"].dump(),
                       packed_bytes(n));
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(packed_bytes(n)));
  if (!packed.empty()) std::memcpy(packed.data(), wt.bytes.data(), packed.size());  // shape [0, …]: no codes

  if (f.contains(weight_name + ".quant_map")) {
    const auto qm = f.tensor(weight_name + ".quant_map").to_vector<float>();
    if (qm.size() != 16) lora::detail::fail("{}: quant_map has {} values, expected 16", where, qm.size());
    for (int c = 0; c < 16; ++c)
      if (qm[c] != nf4_code[c])
        lora::detail::fail("{}: quant_map[{}] = {} is not the NF4 code value {}", where, c, qm[c], nf4_code[c]);
  }
  const auto& am = f.tensor(weight_name + ".absmax");
  if (f.contains(weight_name + ".nested_absmax")) {
    quant::DoubleQuantState dq;
    if (am.type != io::dtype::U8)
      lora::detail::fail("{}: absmax has dtype {}, expected U8 with double quantisation", where, io::dtype_name(am.type));
    dq.codes = am.to_vector<std::uint8_t>();
    dq.nested_absmax = f.tensor(weight_name + ".nested_absmax").to_vector<float>();
    const auto nqm = f.tensor(weight_name + ".nested_quant_map").to_vector<float>();
    if (nqm.size() != 256) lora::detail::fail("{}: nested_quant_map has {} values, expected 256", where, nqm.size());
    std::copy(nqm.begin(), nqm.end(), dq.nested_code.begin());
    if (!need("nested_offset").is_number()) lora::detail::fail("{}: nested_offset must be a number", where);
    dq.offset = static_cast<float>(js["nested_offset"].get<double>());
    if (js.contains("nested_blocksize") && js["nested_blocksize"] != nested_blocksize)
      lora::detail::fail("{}: nested_blocksize is {}, expected {}", where, js["nested_blocksize"].dump(), nested_blocksize);
    return lora::Nf4Tensor::from_parts(std::move(shape), bs, std::move(packed), {}, std::move(dq), dt, where);
  }
  return lora::Nf4Tensor::from_parts(std::move(shape), bs, std::move(packed), am.to_vector<float>(), std::nullopt, dt, where);
}

/// transformers' `quantization_config` for config.json of a bnb NF4 checkpoint.
inline nlohmann::ordered_json quantization_config(bool double_quant, source_dtype compute_dtype,
                                                  const std::vector<std::string>& skipped_modules) {
  nlohmann::ordered_json q;
  q["quant_method"] = "bitsandbytes";
  q["_load_in_4bit"] = true;
  q["_load_in_8bit"] = false;
  q["load_in_4bit"] = true;
  q["load_in_8bit"] = false;
  q["bnb_4bit_quant_type"] = "nf4";
  q["bnb_4bit_use_double_quant"] = double_quant;
  q["bnb_4bit_compute_dtype"] = source_dtype_name(compute_dtype);
  q["bnb_4bit_quant_storage"] = "uint8";
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_threshold"] = 6.0;
  if (skipped_modules.empty())
    q["llm_int8_skip_modules"] = nullptr;
  else
    q["llm_int8_skip_modules"] = skipped_modules;
  return q;
}

}  // namespace lora::quant::bnb
