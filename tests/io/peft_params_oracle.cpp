// PEFT-run oracles (tests/gpu/make_peft_fixtures.py, PEFT 0.21 on tiny transformers models):
// LoRA on MoE expert parameters (target_parameters) and DoRA on an embedding. Which parameter
// each wrapper adapts, its layout, rank and scaling are PEFT's (wrappers.json); every expert's
// ΔW is PEFT's get_delta_weight; merging the saved base gives PEFT's merge_and_unload() saved
// the same way; the DoRA embedding's lookup is the PEFT layer's output.
#include <lora/dora/module_adapter.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/peft.hpp>

#include <cmath>
#include <filesystem>

#include "support/catch.hpp"
#include "support/checkpoints.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::peft;
using lora::test::read_json;
using lora::test::rel_error;
using lora::test::TempDir;
namespace fs = std::filesystem;

namespace {

double bf16_step(double v) {
  if (v == 0) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(std::fabs(v)))) - 7);
}

/// Every tensor of the merged folder `got` against the case's merged/ (PEFT's result saved with
/// save_pretrained): same keys, dtypes and shapes; float32 within 1e-6 relative per tensor;
/// bf16 within one rounding of ours plus one of PEFT's bf16 ΔW (PEFT rounds ΔW, then the sum).
/// Returns how many tensors the merge changed.
int compare_with_peft_merged(const std::string& c, const fs::path& got_dir) {
  const auto got = io::Checkpoint::open(got_dir), want = io::Checkpoint::open(peft(c, "merged")),
             base = io::Checkpoint::open(peft(c, "base"));
  REQUIRE(got.names() == want.names());
  int changed = 0;
  for (const auto& k : want.names()) {
    INFO(c << ": " << k);
    const auto &w = want.tensor(k), &g = got.tensor(k);
    REQUIRE(g.type == w.type);
    REQUIRE(g.shape == w.shape);
    const auto wv = w.to_vector<double>(), gv = g.to_vector<double>(), bv = base.tensor(k).to_vector<double>();
    if (wv != bv) ++changed;
    if (w.type == io::dtype::F32) {
      Eigen::Map<const Vector<double>> a(gv.data(), static_cast<Index>(gv.size())), b(wv.data(), static_cast<Index>(wv.size()));
      CHECK(rel_error(a, b) <= 1e-6);
    } else {
      std::size_t bad = 0;
      for (std::size_t i = 0; i < wv.size(); ++i)
        if (std::fabs(gv[i] - wv[i]) > bf16_step(std::max(std::fabs(gv[i]), std::fabs(wv[i]))) + bf16_step(wv[i] - bv[i]))
          ++bad;
      CHECK(bad == 0);
    }
  }
  return changed;
}

}  // namespace

TEST_CASE("parameter LoRA equals PEFT's ParamWrapper: assignment, layout, ΔW per expert, merge", "[peft][params]") {
  for (const char* c : {"moe_qwen3_experts", "moe_qwen3_down_only_rslora", "moe_gptoss_patterns", "moe_qwen3_bf16"}) {
    INFO(c);
    const auto ad = io::load_peft_adapter(peft(c, "adapter"));
    const auto wrappers = read_json(peft(c, "wrappers.json"));
    REQUIRE(ad.params.size() == wrappers.size());
    const auto base = io::Checkpoint::open(peft(c, "base"));
    const auto map = io::resolve_base_keys(base, {{&ad, 1.0}});
    const auto targets = io::resolve_parameter_targets(base, ad, map);
    const auto ref = io::SafetensorsFile::open(peft(c, "reference.safetensors"));
    for (const auto& wj : wrappers) {
      const std::string path = wj["path"].get<std::string>();
      INFO(path);
      const io::ParamTarget* t = nullptr;
      for (const auto& x : targets)
        if (x.wrapper->path == path) t = &x;
      REQUIRE(t);
      CHECK(t->parameter == wj["parameter_name"].get<std::string>());
      CHECK(t->experts == wj["num_experts"].get<Index>());
      CHECK(t->rank == wj["r"].get<int>());
      CHECK(t->scaling() == Approx(wj["scaling"].get<double>()).epsilon(1e-12));
      CHECK(t->wrapper->in_features() == wj["in_features"].get<Index>());
      CHECK(t->wrapper->out_features() == wj["out_features"].get<Index>());
      // PEFT swaps in/out (and gives ΔW as [E, out, in]) unless the experts are stored transposed
      if (wj["param_shape"].size() == 3) CHECK(t->transposed == !wj["swapped"].get<bool>());
      // every expert's ΔW in the parameter's layout
      io::PeftParamAdapter w = *t->wrapper;
      w.rank = t->rank;
      w.alpha = t->alpha;
      const auto& d = ref.tensor(path + ".delta_weight");
      const auto dv = d.to_vector<double>();
      const Index E = t->experts, in = w.in_features(), out = w.out_features();
      double err = 0, norm = 0;
      for (Index e = 0; e < E; ++e) {
        const Matrix<double> De = w.expert(e).delta_weight().cast<double>();  // [out × in]
        for (Index o = 0; o < out; ++o)
          for (Index i = 0; i < in; ++i) {
            const std::size_t at = static_cast<std::size_t>(t->transposed ? (e * in + i) * out + o : (e * out + o) * in + i);
            err += (De(o, i) - dv[at]) * (De(o, i) - dv[at]);
            norm += dv[at] * dv[at];
          }
      }
      CHECK(std::sqrt(err / norm) < (d.type == io::dtype::F32 ? 1e-6 : 1e-2));
    }
    TempDir tmp("moe-oracle");
    io::merge_peft_checkpoint(base, ad, tmp.path / "m");
    CHECK(compare_with_peft_merged(c, tmp.path / "m") > 0);
  }
}

TEST_CASE("DoRA on an embedding equals PEFT's DoraEmbeddingVariant: lookup and merge", "[peft][dora][embedding]") {
  const std::string c = "dora_embedding";
  const auto ad = io::load_peft_adapter(peft(c, "adapter"));
  const auto& m = ad.at("model.embed_tokens");
  REQUIRE(m.is_dora());
  REQUIRE(m.is_embedding());
  const auto base = io::Checkpoint::open(peft(c, "base"));
  const auto ref = io::SafetensorsFile::open(peft(c, "reference.safetensors"));
  const Matrix<float> E = base.tensor("model.embed_tokens.weight").to_matrix<float>();
  const auto ids = ref.tensor("model.embed_tokens.ids").to_vector<std::int64_t>();
  const Matrix<float> y = embedding_forward(m.adapter, MatrixRef<float>(E), ids);
  CHECK(rel_error(y, ref.tensor("model.embed_tokens.y").to_matrix<float>()) < 1e-6);
  TempDir tmp("dora-emb-oracle");
  io::merge_peft_checkpoint(base, ad, tmp.path / "m");
  CHECK(compare_with_peft_merged(c, tmp.path / "m") > 0);
}
