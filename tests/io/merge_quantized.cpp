// Merging into a bnb-4bit checkpoint: the output equals dequantise (Nf4Tensor, bit-exact
// with bitsandbytes) + s·B·A in float64, rounded once to the output dtype; the reference
// report equals the errors computed densely.
#include <lora/io/merge_quantized.hpp>

#include <filesystem>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;

TEST_CASE("merge_into_quantized: dequantise, add ΔW, round once", "[io][merge_quantized]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("lora_merge4_{}", seed);
  fs::create_directories(dir);
  const MatD Wq = lora::test::random_matrix(48, 64, gen, 0.05), Wk = lora::test::random_matrix(32, 64, gen, 0.05);
  const MatD norm = lora::test::random_matrix(1, 64, gen);
  Nf4Options dq;
  dq.double_quant = true;
  const auto q4 = Nf4Tensor::quantize(Wq), k4 = Nf4Tensor::quantize(Wk, dq);
  std::vector<io::TensorData> tensors = quant::bnb::to_tensors("model.layers.0.self_attn.q_proj.weight", q4);
  for (auto& t : quant::bnb::to_tensors("model.layers.0.self_attn.k_proj.weight", k4)) tensors.push_back(std::move(t));
  tensors.push_back(io::TensorData::from_values("model.norm.weight", norm.data(), {64}, io::dtype::F32));
  io::write_safetensors(dir / "base4.safetensors", tensors);
  io::write_safetensors(dir / "ref.safetensors",
                        {io::TensorData::from_matrix("model.layers.0.self_attn.q_proj.weight", Wq, io::dtype::F32),
                         io::TensorData::from_matrix("model.layers.0.self_attn.k_proj.weight", Wk, io::dtype::F32),
                         io::TensorData::from_values("model.norm.weight", norm.data(), {64}, io::dtype::F32)});
  // an adapter on q_proj only, r 4, alpha 8
  io::PeftAdapter ad;
  ad.config.r = 4;
  ad.config.lora_alpha = 8;
  AdapterOptions o;
  o.name = "model.layers.0.self_attn.q_proj";
  const Matrix<float> A = lora::test::random_matrix<float>(4, 64, gen, 0.1), B = lora::test::random_matrix<float>(48, 4, gen, 0.1);
  ad.modules.push_back(io::PeftModule{o.name, LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(A, B, 8.0, o, dynamic_scaling{false}),
                                      std::nullopt, io::dtype::F32});
  const auto base = io::Checkpoint::open(dir / "base4.safetensors");
  const auto ref = io::Checkpoint::open(dir / "ref.safetensors");
  for (auto dt : {io::dtype::BF16, io::dtype::F32}) {
    io::QuantizedMergeOptions opt;
    opt.out = dt;
    const fs::path out = dir / fmt::format("merged_{}.safetensors", io::dtype_name(dt));
    const auto sum = io::merge_into_quantized(base, ad, out, opt, &ref);
    CHECK(sum.nf4_weights == 2);
    CHECK(sum.written == 3);
    REQUIRE(sum.modules.size() == 1);
    const auto merged = io::SafetensorsFile::open(out);
    CHECK(merged.names().size() == 3);  // companions dropped
    const MatD dW = 2.0 * B.cast<double>() * A.cast<double>();
    const MatD deq_q = q4.dequantize<float>().cast<double>(), deq_k = k4.dequantize<float>().cast<double>();
    // the reference route: float64 sum, one rounding to dt
    const auto want_q = io::TensorData::from_matrix("q", MatD(deq_q + dW), dt);
    const auto want_k = io::TensorData::from_matrix("k", deq_k, dt);
    const auto& got_q = merged.tensor("model.layers.0.self_attn.q_proj.weight");
    const auto& got_k = merged.tensor("model.layers.0.self_attn.k_proj.weight");
    CHECK(got_q.type == dt);
    CHECK(got_q.shape == std::vector<std::int64_t>{48, 64});
    CHECK(std::equal(got_q.bytes.begin(), got_q.bytes.end(), want_q.bytes.begin(), want_q.bytes.end()));
    CHECK(std::equal(got_k.bytes.begin(), got_k.bytes.end(), want_k.bytes.begin(), want_k.bytes.end()));
    const MatD norm32 = norm.cast<float>().cast<double>().transpose();  // a 1-D tensor reads as a column
    if (dt == io::dtype::F32) CHECK(merged.tensor("model.norm.weight").to_matrix<double>() == norm32);
    else CHECK(merged.tensor("model.norm.weight").to_matrix<double>().isApprox(norm32, 1e-2));
    // the report: quantisation error of the base, error of the written result vs W + ΔW
    const auto& m = sum.modules[0];
    CHECK(m.from_nf4);
    CHECK(m.delta_norm == Approx(dW.norm()).epsilon(1e-12));
    const MatD Wr = Wq.cast<float>().cast<double>();  // the reference file holds float32
    CHECK(m.quant_error == Approx((deq_q - Wr).norm() / Wr.norm()).epsilon(1e-9));
    const MatD written = got_q.to_matrix<double>();
    CHECK(m.merged_error == Approx((written - (Wr + dW)).norm() / (Wr + dW).norm()).epsilon(1e-9));
  }
  // a module the base lacks, and an output dtype it cannot write
  io::PeftAdapter bad = ad;
  bad.modules[0].name = "model.layers.0.self_attn.v_proj";
  CHECK_THROWS_WITH(io::merge_into_quantized(base, bad, dir / "x.safetensors"),
                    Catch::Matchers::ContainsSubstring("has no weight 'model.layers.0.self_attn.v_proj.weight'"));
  io::QuantizedMergeOptions u8;
  u8.out = io::dtype::U8;
  CHECK_THROWS_WITH(io::merge_into_quantized(base, ad, dir / "x.safetensors", u8),
                    Catch::Matchers::ContainsSubstring("BF16, F16 or F32"));
  CHECK_FALSE(fs::exists(dir / "x.safetensors"));
  fs::remove_all(dir);
}
