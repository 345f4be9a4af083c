// include/lora/quant/nf4.hpp: the NF4 code book, the encoder's threshold tree and the raw
// blockwise kernels against bitsandbytes' reference vectors (Nf4Tensor: nf4_tensor.cpp).
#include <lora/io/safetensors.hpp>
#include <lora/quant/nf4.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "support/catch.hpp"
#include "support/nf4_reference.hpp"
#include "support/reference.hpp"

using namespace lora;

namespace {

std::string data_file() { return std::string(LORA_TEST_DATA_DIR) + "/nf4/nf4_reference.safetensors"; }

}  // namespace

TEST_CASE("nf4: thresholds are the midpoints of neighbouring codes", "[quant][nf4]") {
  for (int c = 0; c < 15; ++c) {
    const double mid = 0.5 * (double(quant::nf4_code[c]) + double(quant::nf4_code[c + 1]));
    CHECK(std::abs(quant::nf4_thresholds[c] - mid) < 1e-7);
  }
}

TEST_CASE("nf4: branch-free encoder equals the decision tree everywhere", "[quant][nf4]") {
  // Around every threshold (the float below, at and above) and on random values.
  for (float t : quant::nf4_thresholds)
    for (float x : {std::nextafter(t, -2.0f), t, std::nextafter(t, 2.0f)}) {
      CHECK(quant::detail::nf4_encode_count(x) == quant::nf4_encode(x));
    }
  for (float x : {-1.0f, 1.0f, 0.0f, -0.0f, 2.0f, -2.0f, std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    CHECK(quant::detail::nf4_encode_count(x) == quant::nf4_encode(x));
  CHECK(quant::nf4_encode(std::numeric_limits<float>::quiet_NaN()) == 0);
  // A threshold is a float32 rounding of the midpoint between two codes, so the
  // float equal to it can sit just past the exact midpoint: there the tree (code
  // c for x <= t[c]) and the nearest code disagree by definition. Pin the tree's
  // choice at each threshold and check the nearest code one float to each side.
  for (int c = 0; c < 15; ++c) {
    const float t = quant::nf4_thresholds[c];
    CHECK(quant::nf4_encode(t) == c);
    CHECK(quant::nf4_encode(std::nextafter(t, 2.0f)) == c + 1);
    CHECK(test::nearest_nf4_code(std::nextafter(t, -2.0f)) == c);
    CHECK(test::nearest_nf4_code(std::nextafter(t, 2.0f)) == c + 1);
  }
  Generator gen(test::fresh_seed());
  for (int i = 0; i < 100000; ++i) {
    const float x = static_cast<float>(gen.uniform(-1.05, 1.05));
    REQUIRE(quant::detail::nf4_encode_count(x) == quant::nf4_encode(x));
    if (std::find(quant::nf4_thresholds.begin(), quant::nf4_thresholds.end(), x) != quant::nf4_thresholds.end())
      continue;  // pinned above
    const int ref = test::nearest_nf4_code(x);
    INFO("x = " << x);
    REQUIRE(quant::nf4_encode(x) == ref);
  }
}

TEST_CASE("nf4: reference vectors are reproduced bit for bit", "[quant][nf4]") {
  const auto f = io::SafetensorsFile::open(data_file());
  int cases = 0;
  for (const auto& name : f.names()) {
    const std::string suffix = ".input";
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string c = name.substr(0, name.size() - suffix.size());
    ++cases;
    INFO("case " << c);
    const auto x = f.tensor(c + ".input").to_vector<float>();
    const std::int64_t bs = f.tensor(c + ".blocksize").at<std::int64_t>(0);
    const auto want_packed = f.tensor(c + ".packed").to_vector<std::uint8_t>();
    const auto want_absmax = f.tensor(c + ".absmax").to_vector<float>();
    const auto want_deq = f.tensor(c + ".dequant").to_vector<float>();
    const auto near = f.tensor(c + ".near_threshold").to_vector<std::uint8_t>();
    const auto n = static_cast<std::int64_t>(x.size());

    std::vector<std::uint8_t> packed(static_cast<std::size_t>(quant::packed_bytes(n)));
    std::vector<float> absmax(static_cast<std::size_t>(quant::num_blocks(n, bs)));
    quant::nf4_quantize(x.data(), n, bs, packed.data(), absmax.data());

    REQUIRE(absmax.size() == want_absmax.size());
    for (std::size_t b = 0; b < absmax.size(); ++b) REQUIRE(absmax[b] == want_absmax[b]);  // bitwise (no NaN here)

    REQUIRE(packed.size() == want_packed.size());
    for (std::int64_t i = 0; i < n; ++i) {
      const int got = (i & 1) ? (packed[i >> 1] & 0x0F) : (packed[i >> 1] >> 4);
      const int want = (i & 1) ? (want_packed[i >> 1] & 0x0F) : (want_packed[i >> 1] >> 4);
      if (near[i]) {
        CHECK(std::abs(got - want) <= 1);
      } else {
        INFO("element " << i << " x = " << x[i]);
        REQUIRE(got == want);
      }
    }
    // The pad nibble of an odd count: bitsandbytes' kernel quantises the
    // zero padding, giving the code of 0 (7) — or 0 when the block's absmax is 0.
    if (n % 2 == 1) {
      const int pad = packed.back() & 0x0F;
      CHECK(pad == (absmax.back() == 0.0f ? 0 : 7));
    }

    std::vector<float> deq(x.size());
    quant::nf4_dequantize(packed.data(), absmax.data(), n, bs, deq.data());
    for (std::int64_t i = 0; i < n; ++i)
      if (!near[i]) REQUIRE(deq[i] == want_deq[i]);
  }
  CHECK(cases == 6);
}
