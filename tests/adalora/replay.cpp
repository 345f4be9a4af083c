// The PEFT AdaLoRA trace (tests/data/peft/adalora_trace), replayed through RankAllocator:
// budget at every step, the singular values after every step and the final rank_pattern.
#include <lora/adalora/replay.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"

using namespace lora;

namespace {
std::string trace_dir() { return std::string(LORA_TEST_DATA_DIR) + "/peft/adalora_trace"; }
}  // namespace

TEST_CASE("AdaLoRA replay reproduces PEFT's trace exactly", "[adalora][peft]") {
  const TraceReplay r = replay_adalora_trace(trace_dir());
  std::ifstream in(trace_dir() + "/trace.json");
  const auto j = nlohmann::json::parse(in);
  auto file = io::SafetensorsFile::open(trace_dir() + "/trace.safetensors");

  // the config's targets (q, v) in every layer of the base
  const std::size_t modules = j["config"]["target_modules"].size() *
                              static_cast<std::size_t>(lora::test::layers_of(trace_dir() + "/base/model.safetensors"));
  REQUIRE(r.modules.size() == modules);
  CHECK(r.modules.front() == "model.layers.0.self_attn.q_proj");
  const auto& budgets = j["budgets"];
  REQUIRE(r.steps.size() == budgets.size());
  REQUIRE(r.steps.size() == 12);
  int masked_steps = 0;
  for (std::size_t k = 0; k < r.steps.size(); ++k) {
    const auto& s = r.steps[k];
    INFO("step " << k);
    CHECK(s.step == budgets[k]["step"].get<int>());
    CHECK(s.budget.budget == budgets[k]["budget"].get<int>());
    CHECK(s.budget.mask_ind == budgets[k]["mask_ind"].get<bool>());
    for (std::size_t m = 0; m < r.modules.size(); ++m) {
      INFO("module " << r.modules[m]);
      const auto want = file.tensor(fmt::format("step{}.after.lora_E.{}.lora_E.default", k, r.modules[m])).to_vector<float>();
      REQUIRE(want.size() == static_cast<std::size_t>(s.E[m].size()));
      for (std::size_t i = 0; i < want.size(); ++i) {
        CHECK(s.E[m](static_cast<Index>(i)) == want[i]);  // untouched or exactly zero: bitwise equal
        CHECK(s.kept[m][i] == (want[i] != 0.0f));
      }
    }
    masked_steps += s.masked ? 1 : 0;
  }
  // PEFT masks at steps 4, 6, 8 (schedule), 9 (forced, T − tfinal) and 10, 11 (frozen pattern).
  CHECK(masked_steps == 6);
  // Something was pruned: the trace is not trivially "all kept".
  Index kept_total = 0;
  for (const auto& ad : r.adapters) kept_total += ad.active_rank();
  CHECK(kept_total == j["config"]["target_r"].get<Index>() * static_cast<Index>(modules));  // PEFT's target budget

  // The final rank_pattern, keyed <module>.lora_E.default in trace.json.
  REQUIRE(r.rank_pattern.size() == r.modules.size());
  for (std::size_t m = 0; m < r.modules.size(); ++m) {
    const auto want = j["rank_pattern"][r.modules[m] + ".lora_E.default"].get<std::vector<bool>>();
    CHECK(r.rank_pattern[m] == want);
  }
}

TEST_CASE("AdaLoRA replay: masking decisions are not knife-edge", "[adalora][peft]") {
  // Re-run the trace step by step and look at how far the nearest kept score is from the
  // threshold: a relative gap far above float epsilon means the float32 replay is robust.
  const TraceReplay r = replay_adalora_trace(trace_dir());
  auto file = io::SafetensorsFile::open(trace_dir() + "/trace.safetensors");
  std::vector<SvdAdapter<float>> ads;
  for (const auto& m : r.modules)
    ads.push_back(SvdAdapter<float>::from_factors(file.tensor("init." + m + ".lora_A.default").to_matrix<float>(),
                                                  file.tensor("init." + m + ".lora_E.default").to_matrix<float>(),
                                                  file.tensor("init." + m + ".lora_B.default").to_matrix<float>(), 8));
  RankAllocator<float> alloc(r.config, ads);
  double min_gap = 1.0;
  for (int k = 0; k < static_cast<int>(r.steps.size()); ++k) {
    std::vector<SvdGradients<float>> g;
    for (const auto& m : r.modules) {
      SvdGradients<float> gi;
      gi.dA = file.tensor(fmt::format("step{}.grad.{}.lora_A.default", k, m)).to_matrix<float>();
      const Matrix<float> dE = file.tensor(fmt::format("step{}.grad.{}.lora_E.default", k, m)).to_matrix<float>();
      gi.dE = Eigen::Map<const Vector<float>>(dE.data(), dE.size());
      gi.dB = file.tensor(fmt::format("step{}.grad.{}.lora_B.default", k, m)).to_matrix<float>();
      g.push_back(std::move(gi));
    }
    const bool scored = k <= r.config.total_step - r.config.tfinal;
    std::vector<std::vector<float>> scores;
    if (scored && k < r.config.total_step - r.config.tfinal) {
      alloc.update_importance(std::span<const SvdAdapter<float>>(ads), std::span<const SvdGradients<float>>(g));
      scores = alloc.triplet_scores();
    } else if (scored) {
      scores = alloc.triplet_scores();
    }
    const Budget b = alloc.budget_schedule(k);
    if (scored && (b.mask_ind || k == r.config.total_step - r.config.tfinal)) {
      std::vector<float> all;
      for (auto& s : scores) all.insert(all.end(), s.begin(), s.end());
      std::sort(all.begin(), all.end());
      const int kk = alloc.initial_budget() - b.budget;
      const double t = all[kk - 1], above = all[kk];
      min_gap = std::min(min_gap, (above - t) / std::max(std::abs(t), 1e-30));
      alloc.mask_to_budget(std::span<SvdAdapter<float>>(ads), b.budget);
    }
  }
  INFO("smallest relative gap between the threshold and the next score: " << min_gap);
  CHECK(min_gap > 1e-4);
}

TEST_CASE("AdaLoRA replay: missing or malformed trace folders are reported", "[adalora]") {
  CHECK_THROWS_WITH(replay_adalora_trace("/nonexistent/trace"), Catch::Matchers::ContainsSubstring("trace.json"));
  // trace.json with one thing wrong each: a lora::error naming the file and the key (before, a
  // nlohmann::json exception without either, or a silently truncated 6.5)
  const std::string good =
      R"({"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "beta1": 0.85, "beta2": 0.85, )"
      R"("total_step": 12})";
  auto with = [&](const std::string& from, const std::string& to) {
    std::string c = good;
    const auto at = c.find(from);
    REQUIRE(at != std::string::npos);
    return R"({"config": )" + c.replace(at, from.size(), to) + "}";
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {with(R"("init_r": 6)", R"("init_r": "6")"), "'init_r'"},
      {with(R"("init_r": 6)", R"("init_r": 6.5)"), "'init_r'"},
      {with(R"("tinit": 2)", R"("tinit": 1e12)"), "'tinit'"},
      {with(R"("deltaT": 2)", R"("deltaT": 0)"), "'deltaT'"},
      {with(R"("beta1": 0.85)", R"("beta1": "high")"), "'beta1'"},
      {with(R"(, "total_step": 12)", ""), "'total_step'"},
      {with(R"("beta2": 0.85)", R"("beta2": 0.85, "beta2": 0.5)"), "appears twice"},
      {R"({"config": 3})", "\"config\""},
      {std::string(100, '[') + std::string(100, ']'), "nested deeper"},
      {"{", "not valid JSON"}};
  for (const auto& [json, what] : cases) {
    INFO(json);
    lora::test::TempDir dir("replay");
    std::ofstream(dir.path / "trace.json") << json;
    CHECK_THROWS_WITH(replay_adalora_trace(dir.path),
                      Catch::Matchers::ContainsSubstring("trace.json") && Catch::Matchers::ContainsSubstring(what));
  }
  {  // a well-formed config without its tensors: the missing file is named
    lora::test::TempDir dir("replay");
    std::ofstream(dir.path / "trace.json") << R"({"config": )" + good + "}";
    CHECK_THROWS_WITH(replay_adalora_trace(dir.path), Catch::Matchers::ContainsSubstring("trace.safetensors"));
  }
}
