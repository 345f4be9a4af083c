// A base GGUF with PEFT's ΔW added to its weights: the reference llama.cpp should reproduce
// with an adapter. usage: merge_delta <base.f32.gguf> <reference delta.safetensors> <out.gguf>
// (the reference holds "<module>.delta_weight" [out × in], or [vocab × dim] for the embedding).
#include <lora/io/gguf_lora.hpp>

int main(int argc, char** argv) try {
  using namespace lora;
  using namespace lora::io;
  if (argc != 4) {
    fmt::print(stderr, "usage: {} <base.f32.gguf> <delta.safetensors> <out.gguf>\n", argv[0]);
    return 2;
  }
  const GgufFile base = GgufFile::open(argv[1]);
  const GgufBaseModel bm = load_gguf_base_model(argv[1]);
  const SafetensorsFile ref = SafetensorsFile::open(argv[2]);
  std::map<std::string, Matrix<float>> delta;
  const std::string suffix = ".delta_weight";
  for (const auto& t : ref.tensors()) {
    const std::string module = t.name.substr(0, t.name.size() - suffix.size());
    const auto g = gguf_tensor_name(module, bm.architecture);
    if (!g) lora::detail::fail("{}: no GGUF name for '{}'", argv[2], module);
    Matrix<float> d = t.to_matrix<float>();
    const bool q = g->find("attn_q") != std::string::npos, k = g->find("attn_k") != std::string::npos;
    if (bm.permutes_qk() && (q || k)) d = llama_permute_rows(d, q ? bm.n_head : bm.n_head_kv);
    delta[*g + ".weight"] = std::move(d);
  }
  std::vector<GgufTensorData> out;
  for (const auto& t : base.tensors()) {
    if (auto it = delta.find(t.name); it != delta.end()) {
      if (t.type != ggml_type::F32) lora::detail::fail("{}: tensor '{}' is not F32", argv[1], t.name);
      Matrix<float> w = t.to_matrix<float>();
      if (w.rows() != it->second.rows() || w.cols() != it->second.cols())
        lora::detail::fail("'{}': base {}×{}, delta {}×{}", t.name, w.rows(), w.cols(), it->second.rows(), it->second.cols());
      w += it->second;
      out.push_back(GgufTensorData::from_values(t.name, w.data(), t.ne, ggml_type::F32));
      delta.erase(it);
    } else {
      out.push_back({t.name, t.type, t.ne, {t.bytes.begin(), t.bytes.end()}});
    }
  }
  if (!delta.empty()) lora::detail::fail("no base tensor '{}'", delta.begin()->first);
  write_gguf(argv[3], base.metadata(), out);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "merge_delta: {}\n", e.what());
  return 1;
}
