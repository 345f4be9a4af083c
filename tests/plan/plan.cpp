#include <lora/plan/plan.hpp>
#include <algorithm>

#include "support/catch.hpp"

using namespace lora::plan;

namespace {
const std::vector<std::string> kAttn = {"q_proj", "k_proj", "v_proj", "o_proj"};
const std::vector<std::string> kAll = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
Plan plan_for(const std::string& model, int r, std::vector<std::string> targets) {
  PlanOptions o;
  o.rank = r;
  o.targets = std::move(targets);
  return make_plan(architecture(model), o);
}
// (in + out)·r summed by hand from the published shapes.
std::int64_t by_hand(std::int64_t layers, std::vector<std::pair<std::int64_t, std::int64_t>> shapes, int r) {
  std::int64_t n = 0;
  for (auto [in, out] : shapes) n += (in + out) * r;
  return layers * n;
}
}  // namespace

TEST_CASE("exact trainable parameter counts of the issue", "[plan]") {
  CHECK(plan_for("llama-3.1-8b", 16, kAttn).trainable_parameters == 13'631'488);
  CHECK(plan_for("llama-2-7b", 8, {"q_proj", "v_proj"}).trainable_parameters == 4'194'304);
  CHECK(plan_for("llama-3-8b", 64, kAll).trainable_parameters == 167'772'160);
  CHECK(plan_for("llama-3-8b", 64, {"all-linear"}).trainable_parameters == 167'772'160);
  // the same counts computed from the shapes by hand
  CHECK(plan_for("llama-3-8b", 64, kAll).trainable_parameters ==
        by_hand(32, {{4096, 4096}, {4096, 1024}, {4096, 1024}, {4096, 4096}, {4096, 14336}, {4096, 14336}, {14336, 4096}}, 64));
  CHECK(plan_for("mistral-7b", 16, kAttn).trainable_parameters ==
        by_hand(32, {{4096, 4096}, {4096, 1024}, {4096, 1024}, {4096, 4096}}, 16));
}

TEST_CASE("base parameter counts match the published model sizes", "[plan]") {
  CHECK(architecture("llama-3-8b").total_parameters == 8'030'261'248);
  CHECK(architecture("llama-2-7b").total_parameters == 6'738'415'616);
  CHECK(architecture("llama-3.2-1b").total_parameters == 1'235'814'400);
  CHECK(architecture("gpt2").total_parameters == 124'439'808);
  CHECK(architecture("qwen2-7b").total_parameters == 7'615'616'512);
}

TEST_CASE("GPT-2: fused c_attn and c_proj in two places, Conv1D orientation", "[plan]") {
  const auto p = plan_for("gpt2", 8, {"c_attn", "c_proj"});
  // c_attn 768 -> 2304, attn.c_proj 768 -> 768, mlp.c_proj 3072 -> 768, 12 layers
  CHECK(p.trainable_parameters == 12 * ((768 + 2304) * 8 + (768 + 768) * 8 + (3072 + 768) * 8));
  CHECK(p.modules.size() == 36);
  const auto a = architecture("gpt2");
  CHECK(a.modules[1].fan_in_fan_out);
}

TEST_CASE("rank and alpha patterns follow PEFT's key matching; DoRA adds the magnitude", "[plan]") {
  PlanOptions o;
  o.rank = 8;
  o.targets = kAttn;
  o.rank_pattern = {{"layers.0.self_attn.q_proj", 32}, {"k_proj", 4}};
  o.alpha_pattern = {{"v_proj", 64}};
  const auto p = make_plan(architecture("llama-3.2-1b"), o);
  std::int64_t expect = 0;
  for (int l = 0; l < 16; ++l) {
    expect += (2048 + 2048) * (l == 0 ? 32 : 8);  // q (layer 0 overridden; layers.10.. not matched by "layers.0.")
    expect += (2048 + 512) * 4 + (2048 + 512) * 8 + (2048 + 2048) * 8;
  }
  CHECK(p.trainable_parameters == expect);
  for (const auto& m : p.modules)
    if (m.kind == "v_proj") CHECK(m.scaling == Approx(64.0 / 8));
  o.dora = true;
  o.rank_pattern.clear();
  const auto d = make_plan(architecture("llama-3.2-1b"), o);
  CHECK(d.trainable_parameters == 16 * ((2048 + 2048) * 8 * 2 + (2048 + 512) * 8 * 2 + 2048 + 512 + 512 + 2048));
}

TEST_CASE("adapter file size and memory estimate add up", "[plan]") {
  PlanOptions o;
  o.rank = 16;
  o.targets = kAttn;
  auto p = make_plan(architecture("llama-3.1-8b"), o);
  CHECK(p.adapter_file_bytes > p.trainable_parameters * 4);
  CHECK(p.adapter_file_bytes < p.trainable_parameters * 4 + 200'000);
  CHECK(p.memory.frozen_weights == 8'030'261'248LL * 2);
  CHECK(p.memory.optimizer_states == 2 * p.memory.gradients);
  CHECK_FALSE(p.memory.activations.has_value());
  o.quant = quant_mode::nf4;
  auto q = make_plan(architecture("llama-3.1-8b"), o);
  const std::int64_t linear = 8'030'261'248LL - 2 * 128256LL * 4096 - 65 * 4096;
  CHECK(q.memory.frozen_weights == static_cast<std::int64_t>(std::ceil(linear * 0.5625)) + (8'030'261'248LL - linear) * 2);
  o.quant = quant_mode::nf4_dq;
  CHECK(make_plan(architecture("llama-3.1-8b"), o).memory.frozen_weights < q.memory.frozen_weights);
  CHECK(nf4_bytes_per_weight(quant_mode::nf4_dq, 64) * 8 == Approx(4.127).margin(0.001));
  o.batch = 2;
  o.seq = 1024;
  auto a = make_plan(architecture("llama-3.1-8b"), o);
  REQUIRE(a.memory.activations.has_value());
  CHECK(*a.memory.activations > 0);
  auto j = to_json(a);
  CHECK(j["trainable_parameters"] == 13'631'488);
}

TEST_CASE("plan errors name what is wrong", "[plan][errors]") {
  using Catch::Matchers::ContainsSubstring;
  CHECK_THROWS_WITH(plan_for("llama-3-8b", 8, {"qkv"}), ContainsSubstring("no module of llama-3-8b matches the targets [qkv]"));
  CHECK_THROWS_WITH(plan_for("llama-3-8b", 2000, {"k_proj"}), ContainsSubstring("r = 2000 exceeds min(in, out) = 1024"));
  CHECK_THROWS_WITH(architecture("llama-9"), ContainsSubstring("neither a config.json path nor a preset"));
  CHECK_THROWS_WITH(architecture_from_config({{"model_type", "bert"}}), ContainsSubstring("model_type 'bert' is not supported"));
  CHECK_THROWS_WITH(architecture_from_config({{"model_type", "llama"}, {"hidden_size", 64}}),
                    ContainsSubstring("missing integer field 'intermediate_size'"));
}

TEST_CASE("attention heads must split evenly", "[plan][errors]") {
  using Catch::Matchers::ContainsSubstring;
  const nlohmann::json llama = {{"model_type", "llama"}, {"hidden_size", 64},       {"intermediate_size", 176},
                                {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                                {"vocab_size", 128}};
  CHECK(architecture_from_config(llama).head_dim == 16);
  auto with = [&](const char* key, nlohmann::json v) {
    auto j = llama;
    j[key] = std::move(v);
    return j;
  };
  CHECK_THROWS_WITH(architecture_from_config(with("num_key_value_heads", 3), "cfg.json"),
                    ContainsSubstring("cfg.json: num_key_value_heads = 3 does not divide num_attention_heads = 4"));
  CHECK_THROWS_WITH(architecture_from_config(with("num_key_value_heads", 8)),
                    ContainsSubstring("num_key_value_heads = 8 does not divide num_attention_heads = 4"));
  CHECK_THROWS_WITH(architecture_from_config(with("num_attention_heads", 6)),
                    ContainsSubstring("hidden_size = 64 is not divisible by num_attention_heads = 6"));
  // An explicit head_dim (Qwen3, Gemma) lifts the hidden_size constraint: q_proj is heads·head_dim wide.
  auto explicit_dim = with("num_attention_heads", 6);
  explicit_dim["num_key_value_heads"] = 3;
  explicit_dim["head_dim"] = 24;
  const auto a = architecture_from_config(explicit_dim);
  CHECK(a.head_dim == 24);
  CHECK(a.modules[1].kind == "q_proj");
  CHECK(a.modules[1].out_features == 6 * 24);
  CHECK(a.modules[2].out_features == 3 * 24);
  const nlohmann::json gpt2 = {{"model_type", "gpt2"}, {"n_embd", 64}, {"n_layer", 2}, {"n_head", 6}, {"vocab_size", 128}};
  CHECK_THROWS_WITH(architecture_from_config(gpt2), ContainsSubstring("n_embd = 64 is not divisible by n_head = 6"));
}

TEST_CASE("gemma2, phi3, mixtral and qwen2_moe configs give their published sizes", "[plan][families]") {
  // Published parameter counts (model cards / safetensors totals) of the real checkpoints.
  const nlohmann::json phi3 = {{"model_type", "phi3"},          {"hidden_size", 3072},       {"intermediate_size", 8192},
                               {"num_hidden_layers", 32},       {"num_attention_heads", 32}, {"num_key_value_heads", 32},
                               {"vocab_size", 32064},           {"tie_word_embeddings", false}};
  const auto p = architecture_from_config(phi3);
  CHECK(p.total_parameters == Approx(3'821'079'552.0).epsilon(1e-3));
  CHECK(p.modules[1].name == "model.layers.0.self_attn.qkv_proj");
  CHECK(p.modules[1].out_features == 3 * 3072);
  CHECK(p.modules[3].kind == "gate_up_proj");
  const nlohmann::json mixtral = {{"model_type", "mixtral"},      {"hidden_size", 4096},       {"intermediate_size", 14336},
                                  {"num_hidden_layers", 32},      {"num_attention_heads", 32}, {"num_key_value_heads", 8},
                                  {"vocab_size", 32000},          {"num_local_experts", 8},    {"tie_word_embeddings", false}};
  const auto m = architecture_from_config(mixtral);
  CHECK(m.total_parameters == Approx(46'702'792'704.0).epsilon(1e-3));
  CHECK(std::any_of(m.modules.begin(), m.modules.end(),
                    [](const LinearModule& x) { return x.name == "model.layers.31.block_sparse_moe.experts.7.w2"; }));
  const nlohmann::json gemma2 = {{"model_type", "gemma2"},   {"hidden_size", 2304},       {"intermediate_size", 9216},
                                 {"num_hidden_layers", 26},  {"num_attention_heads", 8},  {"num_key_value_heads", 4},
                                 {"head_dim", 256},          {"vocab_size", 256000}};
  const auto g = architecture_from_config(gemma2);
  CHECK(g.tied_embeddings);  // gemma's default
  CHECK(g.total_parameters == Approx(2'614'341'888.0).epsilon(1e-3));
  const nlohmann::json qmoe = {{"model_type", "qwen2_moe"},  {"hidden_size", 2048},         {"intermediate_size", 5632},
                               {"num_hidden_layers", 24},    {"num_attention_heads", 16},   {"num_key_value_heads", 16},
                               {"vocab_size", 151936},       {"num_experts", 60},           {"moe_intermediate_size", 1408},
                               {"shared_expert_intermediate_size", 5632}, {"tie_word_embeddings", false}};
  const auto q = architecture_from_config(qmoe);
  CHECK(q.total_parameters == Approx(14'315'784'192.0).epsilon(1e-2));  // Qwen1.5-MoE-A2.7B: 14.3B
  CHECK_THROWS_WITH(architecture_from_config({{"model_type", "falcon"}}),
                    Catch::Matchers::ContainsSubstring("'falcon' is not supported") &&
                        Catch::Matchers::ContainsSubstring("phi3"));
}
