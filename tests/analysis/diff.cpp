// diff: ‖ΔW_A − ΔW_B‖ from the factors against the dense difference; φ of identical and
// unrelated subspaces; modules on one side; the heatmap's cells.
#include <lora/analysis/diff.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;

TEST_CASE("module_diff equals the dense difference", "[analysis][diff]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD Ba = lora::test::random_matrix(40, 6, gen), Aa = lora::test::random_matrix(6, 30, gen);
  const MatD Bb = lora::test::random_matrix(40, 3, gen), Ab = lora::test::random_matrix(3, 30, gen);
  const MatD Da = 2.0 * Ba * Aa, Db = 0.5 * Bb * Ab;
  const auto d = module_diff(Ba, Aa, 2.0, Bb, Ab, 0.5);
  CHECK(d.diff_fro == Approx((Da - Db).norm()).epsilon(1e-12));
  Eigen::JacobiSVD<MatD> svd(Da - Db);
  CHECK(d.diff_spectral == Approx(svd.singularValues()(0)).epsilon(1e-12));
  CHECK(d.rel_fro == Approx((Da - Db).norm() / Da.norm()).epsilon(1e-12));
  CHECK(d.rank_a == 6);
  CHECK(d.rank_b == 3);
  // the same ΔW written with other factors: zero difference, similarity 1
  const MatD G = lora::test::random_orthonormal(6, 6, gen);
  const auto same = module_diff(Ba, Aa, 2.0, MatD(Ba * G * 4.0), MatD(G.transpose() * Aa), 0.5);
  CHECK(same.rel_fro < 1e-13);
  CHECK(same.similarity == Approx(1.0).epsilon(1e-12));
  // a ΔW_B whose row space is orthogonal to ΔW_A's: similarity 0
  Eigen::HouseholderQR<MatD> qr(MatD(Aa.transpose()));
  const MatD Q = qr.householderQ() * MatD::Identity(30, 30);
  const MatD Aorth = Q.rightCols(24).leftCols(6).transpose();
  CHECK(module_diff(Ba, Aa, 1.0, Ba, Aorth, 1.0).similarity < 1e-12);
  CHECK_THROWS_WITH(module_diff(Ba, Aa, 1.0, Bb, MatD(Ab.leftCols(20)), 1.0),
                    Catch::Matchers::ContainsSubstring("[40 x 30] in the first adapter and [40 x 20]"));
}

TEST_CASE("adapter_diff lists modules on one side; the heatmap has one cell per module", "[analysis][diff]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  auto module = [&](const std::string& name, double scale) {
    AdapterOptions o;
    o.name = name;
    return io::PeftModule{name,
                          LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                              lora::test::random_matrix<float>(4, 16, gen), lora::test::random_matrix<float>(8, 4, gen, scale),
                              8.0, o, dynamic_scaling{false}),
                          io::dtype::F32};
  };
  io::PeftAdapter a, b;
  for (int l = 0; l < 3; ++l) a.modules.push_back(module(fmt::format("model.layers.{}.self_attn.q_proj", l), 1.0));
  a.modules.push_back(module("model.layers.0.mlp.up_proj", 1.0));
  b.modules = {a.modules[0], a.modules[2]};
  b.modules.push_back(module("model.layers.1.self_attn.k_proj", 1.0));
  std::sort(a.modules.begin(), a.modules.end(), [](auto& x, auto& y) { return x.name < y.name; });
  std::sort(b.modules.begin(), b.modules.end(), [](auto& x, auto& y) { return x.name < y.name; });
  const auto d = adapter_diff(a, b);
  REQUIRE(d.modules.size() == 2);
  for (const auto& m : d.modules) CHECK(m.rel_fro < 1e-14);
  CHECK(d.only_a == std::vector<std::string>{"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"});
  CHECK(d.only_b == std::vector<std::string>{"model.layers.1.self_attn.k_proj"});
  const std::string svg = diff_heatmap_svg(adapter_diff(a, a));
  CHECK(svg.rfind("<svg", 0) == 0);
  std::size_t cells = 0;
  for (std::size_t p = svg.find("<title>"); p != std::string::npos; p = svg.find("<title>", p + 1)) ++cells;
  CHECK(cells == 4);
  CHECK(svg.find("self_attn.q_proj layer 2") != std::string::npos);
}
