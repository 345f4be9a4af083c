// extract: a planted low-rank ΔW is recovered exactly; on a full-rank ΔW the error equals
// the dense SVD's optimum (Eckart–Young); the energy rule picks the rank a dense SVD gives;
// the checkpoint route (bf16 tensors, row blocks) equals the matrix route; modules_to_save
// copies round-trip through our PEFT reader and merge to the tuned tensors bit for bit.
#include <lora/analysis/extract.hpp>
#include <lora/io/merge.hpp>

#include <filesystem>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;
using lora::test::random_orthonormal;
using lora::test::rel_error;

TEST_CASE("extract recovers a planted low-rank ΔW exactly", "[analysis][extract]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index out = 180, in = 140, r = 7;
  const MatD W = lora::test::random_matrix(out, in, gen, 0.05);
  Eigen::VectorXd s(r);
  for (Index i = 0; i < r; ++i) s(i) = 3.0 / (1 + i);
  const MatD dW = random_orthonormal(out, r, gen) * s.asDiagonal() * random_orthonormal(in, r, gen).transpose();
  const MatD T = W + dW;
  ExtractOptions opt;
  opt.rank = r;
  opt.block_rows = 37;  // blocks that do not divide the rows
  opt.seed = seed;
  const auto m = extract_module(W, T, opt);
  CHECK(m.rank == r);
  CHECK(rel_error(MatD(m.factors.B * m.factors.A), dW) < 1e-10);
  CHECK(m.rel_fro_error < 1e-6);  // from ‖ΔW‖² − 2⟨ΔW, P⟩ + ‖P‖²: cancellation limits it to ~1e-8
  CHECK(m.kept_energy == Approx(1.0).epsilon(1e-10));
  CHECK(m.rel_spectral_error < 1e-10);
  CHECK(m.delta_norm == Approx(dW.norm()).epsilon(1e-12));
  // balanced factors: ‖B e_i‖ = ‖Aᵀ e_i‖ = √σ_i
  for (Index i = 0; i < r; ++i) CHECK(m.factors.B.col(i).norm() == Approx(std::sqrt(s(i))).epsilon(1e-8));
  // the energy rule stops at the planted rank
  ExtractOptions e;
  e.energy = 1.0;
  e.max_rank = 20;
  const auto me = extract_module(W, T, e);
  CHECK(me.rank == r);
}

TEST_CASE("extract on a full-rank ΔW: Eckart–Young's error, the energy rank", "[analysis][extract]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index out = 150, in = 200, p = 150;
  Eigen::VectorXd s(p);
  for (Index i = 0; i < p; ++i) s(i) = std::pow(0.85, double(i));
  const MatD dW = random_orthonormal(out, p, gen) * s.asDiagonal() * random_orthonormal(in, p, gen).transpose();
  const MatD W = lora::test::random_matrix(out, in, gen, 0.05);
  const MatD T = W + dW;
  Eigen::BDCSVD<MatD> dense(dW);  // the reference: a dense SVD of ΔW
  const Eigen::VectorXd sv = dense.singularValues();
  const Index k = 12;
  ExtractOptions opt;
  opt.rank = k;
  opt.power_iterations = 3;
  opt.seed = seed;
  const auto m = extract_module(W, T, opt);
  const double best = std::sqrt(sv.tail(p - k).squaredNorm()) / sv.norm();
  CHECK(m.rel_fro_error == Approx(best).epsilon(1e-3));
  CHECK(rel_error(m.singular_values.head(k), Eigen::VectorXd(sv.head(k))) < 1e-6);
  CHECK(m.rel_spectral_error == Approx(sv(k) / sv(0)).epsilon(1e-3));
  // the residual is what the factors leave, measured densely
  CHECK(m.rel_fro_error == Approx((dW - m.factors.B * m.factors.A).norm() / dW.norm()).epsilon(1e-6));
  // energy: the smallest k whose top-k energy reaches 0.95 of ‖ΔW‖²
  Index want = 0;
  for (double acc = 0; acc < 0.95 * sv.squaredNorm(); ++want) acc += sv(want) * sv(want);
  ExtractOptions e;
  e.energy = 0.95;
  e.max_rank = 40;
  e.power_iterations = 3;
  const auto me = extract_module(W, T, e);
  CHECK(me.rank == want);
  CHECK(me.kept_energy >= 0.95);
  ExtractOptions bad;
  CHECK_THROWS_WITH(extract_module(W, T, bad), Catch::Matchers::ContainsSubstring("rank ≥ 1 or an energy"));
}

TEST_CASE("extract_adapter reads bf16 checkpoints in row blocks", "[analysis][extract]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("lora_extract_{}", seed);
  std::filesystem::create_directories(dir);
  const Index out = 64, in = 48, r = 4;
  const MatD W = lora::test::random_matrix(out, in, gen, 0.5);
  const MatD dW = lora::test::random_matrix(out, r, gen, 0.3) * lora::test::random_matrix(r, in, gen, 0.3);
  const MatD emb = lora::test::random_matrix(32, in, gen);
  using io::TensorData;
  io::write_safetensors(dir / "base.safetensors",
                        {TensorData::from_matrix("model.layers.0.mlp.up_proj.weight", W, io::dtype::BF16),
                         TensorData::from_matrix("model.layers.0.mlp.down_proj.weight", W, io::dtype::BF16),
                         TensorData::from_matrix("model.embed_tokens.weight", emb, io::dtype::BF16)});
  io::write_safetensors(dir / "tuned.safetensors",
                        {TensorData::from_matrix("model.layers.0.mlp.up_proj.weight", MatD(W + dW), io::dtype::BF16),
                         TensorData::from_matrix("model.layers.0.mlp.down_proj.weight", W, io::dtype::BF16),
                         TensorData::from_matrix("model.embed_tokens.weight", MatD(emb * 2), io::dtype::BF16)});
  const auto base = io::Checkpoint::open(dir / "base.safetensors");
  const auto tuned = io::Checkpoint::open(dir / "tuned.safetensors");
  ExtractOptions opt;
  opt.rank = r;
  opt.block_rows = 10;
  const auto ex = extract_adapter(base, tuned, opt);
  REQUIRE(ex.adapter.modules.size() == 1);  // down_proj unchanged, embeddings not linear
  CHECK(ex.unchanged == std::vector<std::string>{"model.layers.0.mlp.down_proj.weight"});
  const auto& m = ex.adapter.modules[0];
  CHECK(m.name == "model.layers.0.mlp.up_proj");
  CHECK(m.adapter.scaling() == 1.0);
  // the bf16 ΔW the files hold, converted densely: the factors are its best rank-r part
  const MatD Wb = base.tensor("model.layers.0.mlp.up_proj.weight").to_matrix<double>();
  const MatD Tb = tuned.tensor("model.layers.0.mlp.up_proj.weight").to_matrix<double>();
  const auto direct = extract_module(Wb, Tb, opt);
  CHECK(rel_error(m.adapter.delta_weight(), MatD(direct.factors.B * direct.factors.A)) < 1e-6);
  CHECK(ex.modules[0].rel_fro_error == Approx(direct.rel_fro_error).epsilon(1e-6));
  CHECK(ex.adapter.config.target_modules == std::vector<std::string>{"up_proj"});
  std::filesystem::remove_all(dir);
}

TEST_CASE("extract saves embeddings and heads as modules_to_save; merged they equal the tuned tensors",
          "[analysis][extract]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("lora_extract_mts_{}", seed);
  std::filesystem::create_directories(dir);
  const Index vocab = 40, dim = 24, r = 3;
  using io::TensorData;
  const MatD W = lora::test::random_matrix(dim, dim, gen, 0.5);
  const MatD dW = lora::test::random_matrix(dim, r, gen, 0.3) * lora::test::random_matrix(r, dim, gen, 0.3);
  const MatD E = lora::test::random_matrix(vocab, dim, gen), H = lora::test::random_matrix(vocab, dim, gen);
  const MatD n0 = lora::test::random_matrix(dim, 1, gen);
  auto ckpt = [&](const std::string& file, double t) {
    io::write_safetensors(
        dir / file,
        {TensorData::from_matrix("model.embed_tokens.weight", MatD(E + t * lora::test::random_matrix(vocab, dim, gen)),
                                 io::dtype::BF16),
         TensorData::from_matrix("model.layers.0.self_attn.q_proj.weight", MatD(W + t * dW), io::dtype::F32),
         TensorData::from_matrix("model.layers.0.self_attn.v_proj.weight", MatD(W + t * dW.transpose()), io::dtype::F32),
         TensorData::from_values("model.norm.weight", MatD(n0.array() + t).eval().data(), {dim}, io::dtype::F32),
         TensorData::from_matrix("lm_head.weight", MatD(H + t * lora::test::random_matrix(vocab, dim, gen)),
                                 io::dtype::F16)});
  };
  ckpt("base.safetensors", 0.0);
  ckpt("tuned.safetensors", 0.1);
  const auto base = io::Checkpoint::open(dir / "base.safetensors");
  const auto tuned = io::Checkpoint::open(dir / "tuned.safetensors");
  ExtractOptions opt;
  opt.rank = r;
  // "v_proj": a linear module named too is saved whole, not extracted (PEFT adapts no saved module)
  const auto ex = extract_adapter(base, tuned, opt, {}, {}, {"embed_tokens", "lm_head", "norm", "v_proj"});
  const std::vector<std::string> saved{"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight",
                                       "model.norm.weight"};
  CHECK(ex.saved == saved);
  REQUIRE(ex.adapter.modules.size() == 1);
  CHECK(ex.adapter.modules[0].name == "model.layers.0.self_attn.q_proj");
  io::save_peft_adapter(dir / "ad", ex.adapter, io::dtype::F32);
  // PEFT 0.21's keys: base_model.model.<tensor> (as the modules_to_save_lm_head_embed fixture shows)
  const auto file = io::SafetensorsFile::open(dir / "ad" / "adapter_model.safetensors");
  for (const auto& n : saved) CHECK(file.contains("base_model.model." + n));
  const auto back = io::load_peft_adapter(dir / "ad");
  CHECK(back.config.modules_to_save == std::vector<std::string>{"embed_tokens", "lm_head", "norm", "v_proj"});
  REQUIRE(back.saved.size() == 4);
  CHECK(back.skipped.empty());
  io::merge_peft_checkpoint(base, back, dir / "merged.safetensors");
  const auto merged = io::Checkpoint::open(dir / "merged.safetensors");
  for (const auto& n : saved) {
    INFO(n);
    const auto& a = merged.tensor(n);
    const auto& b = tuned.tensor(n);
    CHECK(a.type == b.type);
    CHECK(a.bytes.size() == b.bytes.size());
    CHECK(std::memcmp(a.bytes.data(), b.bytes.data(), b.bytes.size()) == 0);
  }
  // the extracted module merges to the tuned weight up to float32 rounding
  const MatD q = merged.tensor("model.layers.0.self_attn.q_proj.weight").to_matrix<double>();
  CHECK(rel_error(q, tuned.tensor("model.layers.0.self_attn.q_proj.weight").to_matrix<double>()) < 1e-6);
  CHECK_THROWS_WITH(extract_adapter(base, tuned, opt, {}, {}, {"embed_token"}),
                    Catch::Matchers::ContainsSubstring("no tensor of module 'embed_token'"));
  std::filesystem::remove_all(dir);
}
