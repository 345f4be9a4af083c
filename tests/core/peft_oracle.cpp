// The PEFT oracle: for every module of the fixtures, apply(W, x) equals PEFT's
// layer output y and delta_weight() equals PEFT's get_delta_weight.
#include <lora/io/safetensors.hpp>
#include <lora/core/adapter.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::rel_error;

namespace {

int check_case(const std::string& name) {
  std::ifstream cfg_in(data("peft/" + name + "/adapter/adapter_config.json"));
  const auto cfg = nlohmann::json::parse(cfg_in);
  const int r = cfg["r"];
  const double alpha = cfg["lora_alpha"];
  const bool rs = cfg["use_rslora"];
  auto adapter = io::SafetensorsFile::open(data("peft/" + name + "/adapter/adapter_model.safetensors"));
  auto base = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
  auto ref = io::SafetensorsFile::open(data("peft/" + name + "/reference.safetensors"));
  int modules = 0;
  for (const auto& key : ref.names()) {
    const std::string suffix = ".delta_weight";
    if (key.size() < suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string module = key.substr(0, key.size() - suffix.size());
    INFO(name << ": " << module);
    auto A = adapter.tensor("base_model.model." + module + ".lora_A.weight").to_matrix<float>();
    auto B = adapter.tensor("base_model.model." + module + ".lora_B.weight").to_matrix<float>();
    REQUIRE(A.rows() == r);
    auto ad = LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(A, B, alpha, {}, dynamic_scaling{rs});
    auto W = base.tensor(module + ".weight").to_matrix<float>();
    auto x = ref.tensor(module + ".x").to_matrix<float>();
    auto y = ref.tensor(module + ".y").to_matrix<float>();
    CHECK(rel_error(ad.delta_weight(), ref.tensor(key).to_matrix<float>()) < 1e-6);
    CHECK(rel_error(ad.apply(W, x), y) < 1e-5);
    // and in double, against the float32 oracle
    auto add = LowRankAdapter<double, cpu, dynamic_scaling>::from_factors(A.cast<double>(), B.cast<double>(), alpha, {},
                                                                          dynamic_scaling{rs});
    CHECK(rel_error(add.apply(W.cast<double>(), x.cast<double>()), y) < 1e-5);
    ++modules;
  }
  return modules;
}
}  // namespace

// Each fixture adapts its target projections in every layer of its base.
TEST_CASE("PEFT oracle: lora_r8_a16_all", "[peft]") {
  CHECK(check_case("lora_r8_a16_all") == lora::test::peft_case_modules("lora_r8_a16_all"));
}
TEST_CASE("PEFT oracle: rslora_r16_a8_attn", "[peft]") {
  CHECK(check_case("rslora_r16_a8_attn") == lora::test::peft_case_modules("rslora_r16_a8_attn"));
}
