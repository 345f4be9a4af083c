#include <lora/io/safetensors.hpp>

#include <filesystem>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;

TEST_CASE("safetensors write then read gives the same tensors in every float dtype", "[io]") {
  Generator gen(lora::test::fresh_seed());
  Matrix<float> m = lora::test::random_matrix<float>(7, 5, gen);
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("lora-rt-{}", gen.next());
  std::filesystem::create_directories(dir);
  const auto path = dir / "t.safetensors";
  io::write_safetensors(path,
                        {io::TensorData::from_matrix("f32", m, io::dtype::F32),
                         io::TensorData::from_matrix("f64", m.cast<double>(), io::dtype::F64),
                         io::TensorData::from_matrix("bf16", m, io::dtype::BF16),
                         io::TensorData::from_matrix("f16", m, io::dtype::F16, /*as_vector=*/true)},
                        {{"format", "pt"}});
  auto f = io::SafetensorsFile::open(path);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.tensor("f32").to_matrix<float>() == m);
  CHECK(f.tensor("f64").to_matrix<double>() == m.cast<double>());
  CHECK(lora::test::rel_error(f.tensor("bf16").to_matrix<float>(), m) < 4e-3);
  CHECK(f.tensor("f16").shape == std::vector<std::int64_t>{35});
  CHECK(f.tensor("bf16").to_matrix<float>() == m.cast<bfloat16>().cast<float>());
  CHECK_THROWS_AS(f.tensor("missing"), lora::error);
  // nothing but the target is left in the folder
  int files = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir)) ++files;
  CHECK(files == 1);
  std::filesystem::remove_all(dir);
}
