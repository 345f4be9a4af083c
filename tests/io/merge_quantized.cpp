// Merging into a bnb-4bit checkpoint: the output equals dequantise (Nf4Tensor, bit-exact
// with bitsandbytes) + s·B·A in float64, rounded once to the output dtype; the reference
// report equals the errors computed densely; requantize writes the NF4 codes a float64
// nearest-code encoder gives for dequantise + ΔW, and reports its error.
#include <lora/io/merge_quantized.hpp>

#include <filesystem>

#include "support/catch.hpp"
#include "support/nf4_reference.hpp"
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
                                      io::dtype::F32});
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

TEST_CASE("merge_into_quantized with requantize: NF4 out, codes of a float64 encoder", "[io][merge_quantized]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("lora_requant_{}", seed);
  fs::create_directories(dir);
  const std::string q = "model.layers.0.self_attn.q_proj.weight", k = "model.layers.0.self_attn.k_proj.weight",
                    v = "model.layers.0.self_attn.v_proj.weight";
  const MatD Wq = lora::test::random_matrix(48, 64, gen, 0.05), Wk = lora::test::random_matrix(32, 64, gen, 0.05),
             Wv = lora::test::random_matrix(32, 64, gen, 0.05);
  const MatD norm = lora::test::random_matrix(1, 64, gen);
  Nf4Options dq;
  dq.double_quant = true;
  dq.blocksize = 128;
  const auto q4 = Nf4Tensor::quantize(Wq), k4 = Nf4Tensor::quantize(Wk, dq), v4 = Nf4Tensor::quantize(Wv);
  std::vector<io::TensorData> tensors;
  for (const auto& [name, t] : {std::pair{q, &q4}, std::pair{k, &k4}, std::pair{v, &v4}})
    for (auto& d : quant::bnb::to_tensors(name, *t)) tensors.push_back(std::move(d));
  tensors.push_back(io::TensorData::from_values("model.norm.weight", norm.data(), {64}, io::dtype::BF16));
  io::write_safetensors(dir / "base4.safetensors", tensors);
  io::write_safetensors(dir / "ref.safetensors", {io::TensorData::from_matrix(q, Wq, io::dtype::F32),
                                                  io::TensorData::from_matrix(k, Wk, io::dtype::F32),
                                                  io::TensorData::from_matrix(v, Wv, io::dtype::F32)});
  // r 4, alpha 8 on q (plain NF4) and k (double quantisation, blocksize 128); v untouched
  io::PeftAdapter ad;
  ad.config.r = 4;
  ad.config.lora_alpha = 8;
  std::map<std::string, MatD> delta;
  for (const auto& [name, out] : {std::pair{q, Index(48)}, std::pair{k, Index(32)}}) {
    AdapterOptions o;
    o.name = name.substr(0, name.size() - 7);
    const Matrix<float> A = lora::test::random_matrix<float>(4, 64, gen, 0.1),
                        B = lora::test::random_matrix<float>(out, 4, gen, 0.1);
    ad.modules.push_back(io::PeftModule{
        o.name, LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(A, B, 8.0, o, dynamic_scaling{false}),
        io::dtype::F32});
    delta[name] = 2.0 * B.cast<double>() * A.cast<double>();
  }
  const auto base = io::Checkpoint::open(dir / "base4.safetensors");
  const auto ref = io::Checkpoint::open(dir / "ref.safetensors");
  io::QuantizedMergeOptions opt;
  opt.requantize = true;
  const auto sum = io::merge_into_quantized(base, ad, dir / "out.safetensors", opt, &ref);
  CHECK(sum.requantized == 2);
  CHECK(sum.nf4_weights == 3);
  REQUIRE(sum.modules.size() == 2);
  const auto in = io::SafetensorsFile::open(dir / "base4.safetensors");
  const auto out = io::SafetensorsFile::open(dir / "out.safetensors");
  CHECK(out.names().size() == in.names().size());  // the same tensors, companions included
  // untouched tensors keep their bytes (v and its companions, the bf16 norm)
  for (const auto& n : in.names())
    if (n.rfind(v, 0) == 0 || n == "model.norm.weight") {
      INFO(n);
      const auto& a = in.tensor(n);
      const auto& b = out.tensor(n);
      CHECK(a.type == b.type);
      CHECK(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end()));
    }
  const std::map<std::string, const Nf4Tensor*> base4{{q, &q4}, {k, &k4}};
  const std::map<std::string, const MatD*> wref{{q, &Wq}, {k, &Wk}};
  for (const auto& m : sum.modules) {
    INFO(m.weight);
    const Nf4Tensor& b4 = *base4.at(m.weight);
    const Nf4Tensor got = quant::bnb::read(out, m.weight);
    CHECK(got.blocksize() == b4.blocksize());
    CHECK(got.double_quant() == b4.double_quant());
    // float64 reference: M = deq + ΔW, rounded to float, blockwise absmax, nearest code
    const MatD M = b4.dequantize<double>() + delta.at(m.weight);
    const Matrix<float> Mf = M.cast<float>();
    const std::int64_t n = Mf.size(), bs = b4.blocksize();
    std::int64_t wrong_codes = 0;
    double worst_absmax = 0;
    for (std::int64_t b0 = 0; b0 < n; b0 += bs) {
      double amax = 0;
      for (std::int64_t i = b0; i < std::min(n, b0 + bs); ++i) amax = std::max(amax, std::abs(double(Mf.data()[i])));
      worst_absmax = std::max(worst_absmax, std::abs(got.absmax()[std::size_t(b0 / bs)] - amax) / amax);
      for (std::int64_t i = b0; i < std::min(n, b0 + bs); ++i)
        wrong_codes += got.code(i) != lora::test::nearest_nf4_code(double(Mf.data()[i]) / amax);
    }
    CHECK(wrong_codes == 0);
    // plain absmax is stored in float32 exactly; double quantisation keeps it to 8 bits
    CHECK(worst_absmax < (got.double_quant() ? 2e-2 : 1e-7));
    const MatD back = got.dequantize<double>();
    CHECK(m.requant_error == Approx((back - M).norm() / M.norm()).epsilon(1e-9));
    CHECK(m.requant_error > 0);
    CHECK(m.requant_error < 0.15);  // NF4's error on Gaussian weights is ~0.1
    const MatD Wr = wref.at(m.weight)->cast<float>().cast<double>();
    const MatD D = delta.at(m.weight);
    CHECK(m.quant_error == Approx((b4.dequantize<double>() - Wr).norm() / Wr.norm()).epsilon(1e-9));
    CHECK(m.merged_error == Approx((back - (Wr + D)).norm() / (Wr + D).norm()).epsilon(1e-9));
  }
  fs::remove_all(dir);
}
