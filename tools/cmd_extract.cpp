// lora extract: a PEFT LoRA adapter from a full fine-tune (ΔW = tuned − base per linear module).
#include <lora/analysis/extract.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>

#include <nlohmann/json.hpp>
#include <chrono>

#include "cli.hpp"

namespace {

using namespace lora;

int run_extract(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"json", "quiet"},
                 {"base", "tuned", "rank", "energy", "max-rank", "out", "dtype", "only", "power-iterations",
                  "oversample", "block-rows", "seed", "save-modules"},
                 "extract");
  if (!args.positional().empty())
    lora::fail("unexpected argument '{}' (see 'lora extract --help')", args.positional()[0]);
  const std::string base_path = args.required("base"), tuned_path = args.required("tuned"), out = args.required("out");
  analysis::ExtractOptions opt;
  if (args.has("rank") == args.has("energy")) lora::fail("give exactly one of --rank k and --energy e");
  if (args.has("rank")) {
    const double k = args.number("rank", 0);
    if (k < 1 || k != std::floor(k)) lora::fail("--rank must be a whole number ≥ 1, got {}", *args.get("rank"));
    opt.rank = static_cast<Index>(k);
  } else {
    opt.energy = args.number("energy", 0);
    if (!(opt.energy > 0 && opt.energy <= 1)) lora::fail("--energy must be in (0, 1], got {}", *args.get("energy"));
  }
  auto whole = [&](const char* name, double fallback, double lo) {
    const double v = args.number(name, fallback);
    if (v < lo || v != std::floor(v)) lora::fail("--{} must be a whole number ≥ {}, got {}", name, lo, v);
    return static_cast<Index>(v);
  };
  opt.max_rank = whole("max-rank", 128, 1);
  opt.power_iterations = static_cast<int>(whole("power-iterations", 2, 0));
  opt.oversample = whole("oversample", 10, 0);
  opt.block_rows = whole("block-rows", 256, 1);
  opt.seed = static_cast<std::uint64_t>(whole("seed", 0x5eed, 0));
  io::dtype dt = io::dtype::F32;
  if (auto d = args.get("dtype")) dt = io::parse_float_dtype(*d, "--dtype");
  std::vector<std::string> only;
  if (auto o = args.get("only")) only = cli::Args::split(*o);
  std::vector<std::string> save;
  if (auto o = args.get("save-modules")) save = cli::Args::split(*o);
  cli::guard_output(args, out, {base_path, tuned_path}, io::output_kind::folder);
  const auto base = io::Checkpoint::open(base_path);
  const auto tuned = io::Checkpoint::open(tuned_path);
  const bool quiet = args.has("quiet") || args.has("json");
  std::size_t w = 40;
  if (!quiet)
    fmt::print("{:<{}}  {:>4}  {:>9}  {:>11}  {:>11}  {:>10}\n", "module", w, "r", "‖ΔW‖_F", "kept energy", "rel Frob err",
               "rel σ err");
  std::vector<double> seconds;  // wall time per module (the bench compares it with a dense SVD)
  auto t0 = std::chrono::steady_clock::now();
  const auto ex = analysis::extract_adapter(base, tuned, opt, only, [&](const analysis::ExtractedModule& m) {
    const auto t1 = std::chrono::steady_clock::now();
    seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
    t0 = t1;
    if (!quiet)
      fmt::print("{:<{}}  {:>4}  {:>9.4g}  {:>11.6f}  {:>11.3e}  {:>10.3e}\n", m.name, w, m.rank, m.delta_norm,
                 m.kept_energy, m.rel_fro_error, m.rel_spectral_error);
  }, save);
  io::save_peft_adapter(out, ex.adapter, dt);
  if (args.has("json")) {
    nlohmann::ordered_json j, mods = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < ex.modules.size(); ++i) {
      const auto& m = ex.modules[i];
      mods.push_back({{"name", m.name},
                      {"rank", m.rank},
                      {"delta_norm", m.delta_norm},
                      {"kept_energy", m.kept_energy},
                      {"rel_fro_error", m.rel_fro_error},
                      {"rel_spectral_error", m.rel_spectral_error},
                      {"seconds", seconds[i]}});
    }
    j["modules"] = std::move(mods);
    j["unchanged"] = ex.unchanged;
    j["modules_to_save"] = ex.saved;
    j["out"] = out;
    fmt::print("{}\n", j.dump(1));
    return 0;
  }
  for (const auto& n : ex.saved) fmt::print("{:<{}}  saved whole (modules_to_save)\n", n, w);
  fmt::print("\nextracted {} modules (r ≤ {}), {} unchanged weights skipped, {} tensors saved whole; wrote {}\n",
             ex.modules.size(), ex.modules.empty() ? 0 : ex.adapter.config.r, ex.unchanged.size(), ex.saved.size(), out);
  return 0;
}

const lora::cli::Register reg_extract{{"extract", "a PEFT LoRA adapter from a full fine-tune (truncated SVD of tuned − base)",
                               R"(usage: lora extract --base <checkpoint> --tuned <checkpoint> (--rank k | --energy e)
                    --out <folder> [--max-rank 128] [--only q_proj,v_proj,...] [--dtype F32|BF16|F16]
                    [--save-modules embed_tokens,lm_head]
                    [--power-iterations 2] [--oversample 10] [--block-rows 256] [--seed n] [--json|--quiet]

For every linear weight (2-D '*.weight', not embeddings or lm_head) that differs between the
checkpoints, ΔW = tuned − base is truncated to rank k by a randomized range finder that
reads ΔW in blocks of rows (one block converted at a time). --energy e picks per module the
smallest k ≤ --max-rank keeping a fraction e of ‖ΔW‖_F². The adapter has lora_alpha = r per
module (scaling 1; rank_pattern/alpha_pattern where ranks differ). The report gives per
module the kept energy, ‖ΔW − B·A‖_F/‖ΔW‖_F (exact) and σ_{k+1}/σ_1 (the spectral error
of the best rank-k approximation, from the sketch).
--save-modules m1,m2 copies the tuned tensors of those modules whole (PEFT's modules_to_save:
embeddings, lm_head, norms, or any module path), in their stored dtype; those modules are
not extracted. PEFT (and lora merge) swap the copies in, so they equal the tuned tensors.
)",
                               run_extract}};

}  // namespace
