// lora quantize / lora dequantize: NF4 (bitsandbytes) checkpoints in transformers' bnb-4bit layout.
#include <lora/io/safetensors.hpp>
#include <lora/quant/bnb_format.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli.hpp"
#include "progress.hpp"

namespace {

namespace fs = std::filesystem;
using lora::io::dtype;

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

/// A module is skipped when an entry equals one of its dot-separated path
/// components or a dotted suffix of its path ("lm_head", "embed_tokens", "mlp.down_proj").
bool skipped(const std::string& module, const std::vector<std::string>& skip) {
  for (const auto& s : skip) {
    if (module == s || ends_with(module, "." + s)) return true;
    std::size_t start = 0;
    while (start <= module.size()) {
      const auto dot = module.find('.', start);
      const auto part = module.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (part == s) return true;
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  }
  return false;
}

struct QuantizeStats {
  int quantized = 0, kept = 0;
  std::int64_t params = 0, bytes_before = 0, bytes_after = 0;
  std::set<lora::source_dtype> dtypes;
};

/// Sum of the tensors' byte sizes: the shard index's "total_size" of what is written.
std::uint64_t data_bytes(const std::vector<lora::io::TensorData>& ts) {
  std::uint64_t n = 0;
  for (const auto& t : ts) n += t.bytes.size();
  return n;
}

std::vector<lora::io::TensorData> quantize_file(const lora::io::SafetensorsFile& f, const lora::Nf4Options& opts,
                                                const std::vector<std::string>& skip, QuantizeStats& st,
                                                const std::function<void(std::uint64_t)>& done = {}) {
  std::vector<lora::io::TensorData> out;
  for (const auto& v : f.tensors()) {
    if (done) done(v.bytes.size());
    const bool floaty = v.type == dtype::F32 || v.type == dtype::BF16 || v.type == dtype::F16 || v.type == dtype::F64;
    const bool candidate = ends_with(v.name, ".weight") && v.ndim() == 2 && floaty && !lora::quant::bnb::is_companion(v.name);
    const std::string module = candidate ? v.name.substr(0, v.name.size() - 7) : std::string();
    if (!candidate || skipped(module, skip) || v.numel() == 0) {
      out.push_back(lora::io::TensorData::copy_of(v));
      ++st.kept;
      continue;
    }
    lora::io::require_finite(v, "quantize");  // a NaN would poison its block's absmax
    lora::Nf4Tensor t;
    if (v.type == dtype::BF16) {
      const auto m = v.to_matrix<lora::bfloat16>();
      t = lora::Nf4Tensor::quantize(m, opts);
    } else if (v.type == dtype::F16) {
      const auto m = v.to_matrix<lora::half>();
      t = lora::Nf4Tensor::quantize(m, opts);
    } else {
      const auto m = v.to_matrix<float>();
      t = lora::Nf4Tensor::quantize(m, opts);
    }
    st.dtypes.insert(t.dtype());
    st.params += v.numel();
    st.bytes_before += static_cast<std::int64_t>(v.bytes.size());
    for (auto& td : lora::quant::bnb::to_tensors(v.name, t)) {
      st.bytes_after += static_cast<std::int64_t>(td.bytes.size());
      out.push_back(std::move(td));
    }
    ++st.quantized;
  }
  return out;
}

std::vector<lora::io::TensorData> dequantize_file(const lora::io::SafetensorsFile& f, std::optional<dtype> to,
                                                  int& converted, const std::function<void(std::uint64_t)>& done = {}) {
  std::vector<lora::io::TensorData> out;
  for (const auto& v : f.tensors()) {
    if (done) done(v.bytes.size());
    if (lora::quant::bnb::is_companion(v.name)) {
      // A companion whose weight is missing would otherwise vanish from the output silently.
      const std::string w = v.name.substr(0, v.name.rfind(".weight.") + 7);
      if (!f.contains(w))
        lora::fail("{}: '{}' belongs to a bitsandbytes 4-bit weight '{}' that is not in the file", f.path(),
                           v.name, w);
      continue;
    }
    if (!lora::quant::bnb::is_nf4_weight(f, v.name)) {
      if (f.contains(v.name + ".quant_state.bitsandbytes__fp4"))
        lora::fail("{}: '{}' is bitsandbytes FP4; only NF4 is supported", f.path(), v.name);
      out.push_back(lora::io::TensorData::copy_of(v));
      continue;
    }
    const auto t = lora::quant::bnb::read(f, v.name);
    dtype d = to.value_or(t.dtype() == lora::source_dtype::bfloat16  ? dtype::BF16
                          : t.dtype() == lora::source_dtype::float16 ? dtype::F16
                                                                     : dtype::F32);
    std::vector<float> vals(static_cast<std::size_t>(t.numel()));
    t.dequantize_into(vals.data());
    out.push_back(lora::io::TensorData::from_values(v.name, vals.data(), t.shape(), d));
    ++converted;
  }
  return out;
}

nlohmann::ordered_json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) lora::fail("{}: cannot open for reading", p.string());
  try {
    return nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    lora::fail("{}: not valid JSON: {}", p.string(), e.what());
  }
}

void write_json(const fs::path& p, const nlohmann::ordered_json& j) { lora::io::write_bytes(p, j.dump(2) + "\n"); }

std::vector<fs::path> safetensors_in(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) lora::fail("{}: folder has no .safetensors files", dir.string());
  return files;
}

/// Copies the folder's other files, letting `edit` rewrite config.json and the shard index.
void copy_other_files(const fs::path& in, const fs::path& tmp,
                      const std::function<void(const std::string&, nlohmann::ordered_json&)>& edit) {
  for (const auto& e : fs::directory_iterator(in)) {
    if (!e.is_regular_file() || e.path().extension() == ".safetensors") continue;
    const auto name = e.path().filename().string();
    if (name == "config.json" || name == "model.safetensors.index.json") {
      auto j = read_json(e.path());
      edit(name, j);
      write_json(tmp / name, j);
    } else {
      fs::copy_file(e.path(), tmp / name);
    }
  }
}

int run_quantize(const std::vector<std::string>& argv) {
  lora::cli::Args args(argv, {"double-quant", "progress", "quiet"}, {"out", "blocksize", "skip"}, "quantize");
  if (args.positional().size() != 1)
    lora::fail("expected one input (a .safetensors file or a model folder), got {}", args.positional().size());
  const fs::path in = args.positional()[0];
  const fs::path out = args.required("out");
  const std::int64_t bsd = args.integer("blocksize", 64, 0, std::int64_t{1} << 40);
  if (!lora::quant::is_valid_blocksize(bsd))
    lora::fail("--blocksize must be a power of two from 32 to 4096, got {}", args.get("blocksize").value_or("64"));
  const lora::Nf4Options opts{static_cast<std::int64_t>(bsd), args.has("double-quant")};
  const auto skip = lora::cli::Args::split(args.get("skip").value_or("lm_head,embed_tokens"));
  if (!fs::exists(in)) lora::fail("{}: no such file or folder", in.string());
  lora::cli::guard_output(args, out, {in}, fs::is_directory(in) ? lora::io::output_kind::folder : lora::io::output_kind::file);

  QuantizeStats st;
  // Progress by bytes of input tensors read, over every input file.
  std::uint64_t total = 0, done_bytes = 0, written = 0;
  const std::vector<fs::path> inputs = fs::is_directory(in) ? safetensors_in(in) : std::vector<fs::path>{in};
  for (const auto& p : inputs) total += fs::file_size(p);
  lora::cli::Progress progress("quantize", !args.has("quiet") && (args.has("progress") || total >= (std::uint64_t{256} << 20)));
  auto tick = [&](std::uint64_t b) {
    done_bytes += b;
    progress.update(done_bytes, total, fmt::format("{:.2f} / {:.2f} GB", done_bytes / 1e9, total / 1e9));
  };
  if (fs::is_directory(in)) {
    const auto& files = inputs;
    lora::io::write_folder_atomically(out, [&](const fs::path& tmp) {
      std::map<std::string, std::vector<std::string>> companions;  // weight -> added keys
      for (const auto& p : files) {
        const auto f = lora::io::SafetensorsFile::open(p);
        auto tensors = quantize_file(f, opts, skip, st, tick);
        written += data_bytes(tensors);
        for (const auto& t : tensors)
          if (lora::quant::bnb::is_companion(t.name))
            companions[t.name.substr(0, t.name.find(".weight.") + 7)].push_back(t.name);
        lora::io::write_bytes(tmp / p.filename(), lora::io::serialize_safetensors(tensors, f.metadata()));
      }
      progress.update(total, total, fmt::format("{:.2f} GB", total / 1e9));
      if (st.quantized == 0) lora::fail("{}: no 2-D floating-point .weight tensors to quantise", in.string());
      copy_other_files(in, tmp, [&](const std::string& name, nlohmann::ordered_json& j) {
        if (name == "config.json") {
          const auto cd = st.dtypes.count(lora::source_dtype::bfloat16) ? lora::source_dtype::bfloat16
                          : st.dtypes.count(lora::source_dtype::float16) ? lora::source_dtype::float16
                                                                         : lora::source_dtype::float32;
          j["quantization_config"] = lora::quant::bnb::quantization_config(opts.double_quant, cd, skip);
        } else if (j.contains("weight_map") && j["weight_map"].is_object()) {
          auto& wm = j["weight_map"];
          for (const auto& [w, keys] : companions)
            if (wm.contains(w))
              for (const auto& k : keys) wm[k] = wm[w];
          // the index describes what was written: packed codes and their companions
          if (!j.contains("metadata") || !j["metadata"].is_object()) j["metadata"] = nlohmann::ordered_json::object();
          j["metadata"]["total_size"] = written;
        }
      });
    });
  } else {
    const auto f = lora::io::SafetensorsFile::open(in);
    auto tensors = quantize_file(f, opts, skip, st, tick);
    progress.update(total, total, fmt::format("{:.2f} GB", total / 1e9));
    if (st.quantized == 0) lora::fail("{}: no 2-D floating-point .weight tensors to quantise", in.string());
    auto meta = f.metadata();
    if (!meta.count("format")) meta["format"] = "pt";
    lora::io::write_safetensors(out, tensors, meta);
  }
  fmt::print("quantised {} tensors to NF4 (blocksize {}{}), kept {} as they were: {:.1f} MiB -> {:.1f} MiB, {:.3f} bits per quantised parameter\n",
             st.quantized, opts.blocksize, opts.double_quant ? ", double quantisation" : "", st.kept,
             st.bytes_before / 1048576.0, st.bytes_after / 1048576.0,
             st.params ? 8.0 * static_cast<double>(st.bytes_after) / static_cast<double>(st.params) : 0.0);
  return 0;
}

int run_dequantize(const std::vector<std::string>& argv) {
  lora::cli::Args args(argv, {"progress", "quiet"}, {"out", "dtype"}, "dequantize");
  if (args.positional().size() != 1)
    lora::fail("expected one input (a .safetensors file or a model folder), got {}", args.positional().size());
  const fs::path in = args.positional()[0];
  const fs::path out = args.required("out");
  std::optional<dtype> to;
  if (auto d = args.get("dtype")) to = lora::io::parse_float_dtype(*d, "--dtype");
  if (!fs::exists(in)) lora::fail("{}: no such file or folder", in.string());
  lora::cli::guard_output(args, out, {in}, fs::is_directory(in) ? lora::io::output_kind::folder : lora::io::output_kind::file);
  int converted = 0;
  // Progress by bytes of input tensors read, over every input file (as quantize).
  const std::vector<fs::path> inputs = fs::is_directory(in) ? safetensors_in(in) : std::vector<fs::path>{in};
  std::uint64_t total = 0, done_bytes = 0;
  for (const auto& p : inputs) total += fs::file_size(p);
  lora::cli::Progress progress("dequantize",
                               !args.has("quiet") && (args.has("progress") || total >= (std::uint64_t{256} << 20)));
  auto tick = [&](std::uint64_t b) {
    done_bytes += b;
    progress.update(done_bytes, total, fmt::format("{:.2f} / {:.2f} GB", done_bytes / 1e9, total / 1e9));
  };
  if (fs::is_directory(in)) {
    const auto& files = inputs;
    std::uint64_t written = 0;
    lora::io::write_folder_atomically(out, [&](const fs::path& tmp) {
      for (const auto& p : files) {
        const auto f = lora::io::SafetensorsFile::open(p);
        const auto tensors = dequantize_file(f, to, converted, tick);
        written += data_bytes(tensors);
        lora::io::write_bytes(tmp / p.filename(), lora::io::serialize_safetensors(tensors, f.metadata()));
      }
      progress.update(total, total, fmt::format("{:.2f} GB", total / 1e9));
      if (converted == 0) lora::fail("{}: no bitsandbytes NF4 weights found", in.string());
      copy_other_files(in, tmp, [&](const std::string& name, nlohmann::ordered_json& j) {
        if (name == "config.json") {
          j.erase("quantization_config");
        } else if (j.contains("weight_map") && j["weight_map"].is_object()) {
          nlohmann::ordered_json wm = nlohmann::ordered_json::object();
          for (auto& [k, v] : j["weight_map"].items())
            if (!lora::quant::bnb::is_companion(k)) wm[k] = v;
          j["weight_map"] = wm;
          if (!j.contains("metadata") || !j["metadata"].is_object()) j["metadata"] = nlohmann::ordered_json::object();
          j["metadata"]["total_size"] = written;
        }
      });
    });
  } else {
    const auto f = lora::io::SafetensorsFile::open(in);
    auto tensors = dequantize_file(f, to, converted, tick);
    progress.update(total, total, fmt::format("{:.2f} GB", total / 1e9));
    if (converted == 0) lora::fail("{}: no bitsandbytes NF4 weights found", in.string());
    lora::io::write_safetensors(out, tensors, f.metadata());
  }
  fmt::print("dequantised {} NF4 tensors{}\n", converted, to ? fmt::format(" to {}", lora::io::dtype_name(*to)) : "");
  return 0;
}

const lora::cli::Register reg_quantize{{"quantize", "quantise a model's linear weights to NF4 (bitsandbytes / transformers bnb-4bit layout)",
    R"(usage: lora quantize <model.safetensors | folder> --out <file | folder> [--blocksize 64] [--double-quant]
                     [--skip lm_head,embed_tokens]

Quantises every 2-D floating-point tensor whose name ends in ".weight" to NF4,
bit-identical to bitsandbytes' quantize_4bit(quant_type="nf4"), and writes it in
the layout transformers saves for bnb-4bit models: <m>.weight (packed uint8),
<m>.weight.absmax, .quant_map, (.nested_absmax, .nested_quant_map with
--double-quant) and the .quant_state.bitsandbytes__nf4 JSON blob. Norms, biases
and other 1-D tensors are copied as they are.

  --blocksize N     elements per scale: 32, 64, 128, ..., 4096 (default 64)
  --double-quant    quantise the scales too (about 4.127 instead of 4.5 bits per parameter)
  --skip LIST       comma-separated module names or path suffixes to leave unquantised
                    (default lm_head,embed_tokens)
  --progress        always report progress on stderr (default: only above 256 MiB)
  --quiet           never report progress

A folder input (sharded or not) gives a folder output: every .safetensors file is
converted, config.json gets a "quantization_config", the shard index lists the
new tensors and its total_size is the bytes written, other files are copied. The output is written atomically.)",
    run_quantize}};

const lora::cli::Register reg_dequantize{{"dequantize", "dequantise a bnb-4bit NF4 checkpoint back to f32/bf16/f16",
    R"(usage: lora dequantize <model.safetensors | folder> --out <file | folder> [--dtype f32|bf16|f16]
                       [--progress | --quiet]

Dequantises every bitsandbytes NF4 weight (with or without double quantisation)
of a transformers bnb-4bit checkpoint — ours or one from the hub — to a plain
tensor: code value × absmax in float32, then rounded to --dtype (default: the
dtype recorded in the weight's quant_state). Other tensors are copied; a folder's
config.json loses its "quantization_config". The output is written atomically.
Progress goes to stderr above 256 MiB of input (--progress: always; --quiet: never).)",
    run_dequantize}};

}  // namespace
