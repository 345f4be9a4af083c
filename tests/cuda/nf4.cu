// quant::Nf4Tensor<cuda> and quant::nf4_matmul (lora/cuda/nf4.cuh): codes, scales and double
// quantisation bit-identical to the CPU and bitsandbytes' reference vectors, dequantisation to
// the bit, the fused GEMV/GEMM against float64.

#include <lora/cuda.hpp>
#include <lora/io/safetensors.hpp>

#include "cuda/support.cuh"

#include <cstring>
#include <limits>
#include <string>
#include <tuple>

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;

TEST_CASE("cuda nf4: codes, absmax and dequantisation match the bitsandbytes reference vectors", "[cuda][nf4]") {
  auto f = io::SafetensorsFile::open(std::string(LORA_TEST_DATA_DIR) + "/nf4/nf4_reference.safetensors");
  for (const char* c : {"big_10000_bs4096", "normal_4096_bs64", "student_t_3001_bs64", "weight_37x53_bs32",
                        "weight_96x200_bs128", "zero_block_exact_codes_bs64"}) {
    const std::string k = c;
    INFO(k);
    const auto input = f.tensor(k + ".input").to_vector<float>();
    const int bs = static_cast<int>(f.tensor(k + ".blocksize").at<std::int64_t>(0));
    const auto want_packed = f.tensor(k + ".packed").to_vector<std::uint8_t>();
    const auto want_absmax = f.tensor(k + ".absmax").to_vector<float>();
    const auto want_deq = f.tensor(k + ".dequant").to_vector<float>();
    const auto near = f.tensor(k + ".near_threshold").to_vector<std::uint8_t>();
    const Index n = static_cast<Index>(input.size());
    auto dx = DeviceMatrix<float>::from_host(ConstMatrixMap<float>(input.data(), 1, n));
    auto q = quant::Nf4Tensor<cuda>::quantize<float>(dx.view(), {bs, false});
    const Nf4Tensor hq = q.to_host();
    const std::vector<std::uint8_t>& packed = hq.packed();
    const std::vector<float>& absmax = hq.absmax();
    REQUIRE(packed.size() == want_packed.size());
    REQUIRE(absmax == want_absmax);
    Index mismatches = 0, excused = 0;
    for (Index i = 0; i < n; ++i) {
      const int got = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
      const int want = (i % 2 == 0) ? want_packed[i / 2] >> 4 : want_packed[i / 2] & 15;
      if (got != want) (near[i] ? excused : mismatches)++;
    }
    CHECK(mismatches == 0);
    // The pad nibble of an odd count: bitsandbytes' kernel quantises the zero padding (code 7,
    // or 0 when the block's absmax is 0), like the CPU path; the reference vectors store 0 there.
    if (n % 2) CHECK((packed.back() & 15) == (absmax.back() == 0.0f ? 0 : 7));
    // Dequantise our codes and the reference codes: the second must match .dequant exactly.
    DeviceMatrix<float> out(1, n);
    poison(out.view());
    q.dequantize_into(out.view());
    const Matrix<float> deq = out.to_host();
    Index bad = 0;
    for (Index i = 0; i < n; ++i) {
      const int got = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
      const int want = (i % 2 == 0) ? want_packed[i / 2] >> 4 : want_packed[i / 2] & 15;
      if (got == want && deq(0, i) != want_deq[i]) ++bad;
    }
    CHECK(bad == 0);
  }
}

TEMPLATE_TEST_CASE("cuda nf4: codes and absmax are bit-identical to the CPU path", "[cuda][nf4]", bfloat16, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (int bs : {32, 64, 128, 4096}) {
    // odd element counts for two block sizes: the last byte's low nibble is a zero pad's code
    const bool odd = bs == 32 || bs == 128;
    const Index rows = 1 + 2 * static_cast<Index>(g.uniform() * 45),
                cols = 2 * (1 + static_cast<Index>(g.uniform() * 150)) + (odd ? 1 : 0);
    Matrix<S> X = rand_s<S>(rows, cols, g, g.uniform(0.01, 10.0));
    X(0, 0) = S(0.f);
    auto dx = DeviceMatrix<S>::from_host(X);
    const auto q = quant::Nf4Tensor<cuda>::quantize<S>(dx.view(), {bs, false});
    const Nf4Tensor cpu_q = Nf4Tensor::quantize(X, {bs, false});
    const Nf4Tensor hq = q.to_host();
    CHECK(hq.packed() == cpu_q.packed());
    CHECK(hq.absmax() == cpu_q.absmax());
    CHECK(hq.dtype() == cpu_q.dtype());
  }
}

TEMPLATE_TEST_CASE("cuda nf4: fused GEMV/GEMM for 1..16 tokens matches float64 on the dequantised weight",
                   "[cuda][nf4]", bfloat16, lora::half, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Shapes for both kernels' edges: rows not a multiple of 16 (the tensor-core tile), K a
  // multiple of 256 (tensor cores for bf16/half tokens and blocksize ≥ 64) or only of 32 (the
  // CUDA-core kernel), tiny K; more tiles than the persistent grid holds at once (9001 rows:
  // each block walks several, its 4 partial-sum slots wrap around), K over one step of the
  // 16 warps (8448 = 132 groups: three steps, the last with one warp); tokens 1, 2…8 and 9…16
  // (one and two n-tiles).
  // One bf16/half token with K % 1024 == 0 takes the byte-pair kernel: K = 1024 (one K-warp),
  // 4096 with rows not a multiple of its 4-row batches (the last 3 rows by the general kernel),
  // 14336 (14 K-warps, one row group).
  for (auto [out, in] : {std::pair<Index, Index>{100, 256}, {1003, 4192}, {7, 32}, {64, 2080}, {130, 1024},
                         {9001, 256}, {300, 8448}, {1003, 4096}, {37, 14336}})
  for (int bs : {32, 64, 256}) {
    INFO("out " << out << " in " << in << " blocksize " << bs);
    const Matrix<S> W = rand_s<S>(out, in, g);
    auto dW = DeviceMatrix<S>::from_host(W);
    const auto q = quant::Nf4Tensor<cuda>::quantize<S>(dW.view(), {bs, false});
    const DeviceMatrix<S> deq = q.template dequantize<S>();
    // The dequantised values are code·absmax, within half a code step of W.
    const MatD Wq = d(deq.to_host());
    CHECK(lora::test::rel_error(Wq, d(W)) < 0.15);
    for (Index T : {Index(1), Index(2), Index(3), Index(9), Index(16)}) {
      INFO("tokens " << T);
      const Matrix<S> X = rand_s<S>(T, in, g);
      auto dX = DeviceMatrix<S>::from_host(X);
      DeviceMatrix<S> Y(T, out);
      poison(Y.view());
      quant::nf4_matmul<S>(q, dX.view(), Y.view());
      CHECK(lora::test::rel_error(Y.to_host(), MatD(d(X) * Wq.transpose())) < tol<S>());
    }
  }
}

TEMPLATE_TEST_CASE("cuda nf4: the copy-ring tensor-core kernel (blocksize 64, K ≤ 4096) for 1..16 tokens matches float64",
                   "[cuda][nf4]", bfloat16, lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Rows not a multiple of its 16-row tile (37, 1003, 4099), more tiles than the persistent grid
  // holds (4099 rows: 257 tiles), every warp count it takes (K / 256 = 1, 4, 15, 16), plain and
  // double-quantised scales, X with a leading dimension wider than K (a column block). The
  // reference is the float dequantised W: the kernel rounds each code to S (2^-9 relative for
  // bf16) and sums in float, and Y is rounded to S once, so the relative error is a few 2^-9,
  // well inside the 1e-2 of tol<S>(). Above 16 tokens nf4_matmul dequantises and calls cuBLAS.
  for (auto [out, in, dq] : {std::tuple<Index, Index, bool>{37, 4096, false}, {1003, 256, true}, {4099, 1024, false},
                             {130, 3840, true}, {1003, 4096, true}})
  for (Index T : {Index(1), Index(2), Index(3), Index(4), Index(5), Index(7), Index(8), Index(9), Index(12),
                  Index(15), Index(16), Index(17), Index(33)}) {
    INFO("out " << out << " in " << in << " double_quant " << dq << " tokens " << T);
    const Matrix<S> W = rand_s<S>(out, in, g, g.uniform(0.01, 2.0));
    const Nf4Tensor cpu_q = Nf4Tensor::quantize(W, {64, dq});
    const auto q = quant::Nf4Tensor<cuda>::from_host(cpu_q);
    const MatD Wq = d(cpu_q.template dequantize<float>());
    const Matrix<S> X = rand_s<S>(T, in, g);
    DeviceMatrix<S> Xwide(T, in + 24);  // ld = in + 24: 16-byte aligned rows, not contiguous
    poison(Xwide.view());
    upload<S>(X, Xwide.view().col_block(0, in));
    DeviceMatrix<S> Y(T, out);
    poison(Y.view());
    quant::nf4_matmul<S>(q, DeviceView<const S>(Xwide.view().col_block(0, in)), Y.view());
    const Matrix<S> y = Y.to_host();
    CHECK(lora::test::rel_error(y, MatD(d(X) * Wq.transpose())) < tol<S>());
  }
}

namespace {
/// x ← c·x, late: it lets programmatic dependents launch at once, then spins for `spin`
/// cycles before it writes, so a dependent that read x before its grid-dependency wait
/// would see the old values.
template <class T>
__global__ void scale_late_kernel(T* x, int n, float c, long long spin) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x))
    x[i] = lora::detail::from_float<T>(lora::detail::to_float(x[i]) * c);
}
}  // namespace

TEMPLATE_TEST_CASE("cuda nf4: the one-token GEMV (a programmatic dependent launch) waits for the kernel before it",
                   "[cuda][nf4]", bfloat16, lora::half) {
  using S = TestType;
  using T = lora::detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index out = 1003, in = 4096;  // the byte-pair kernel, and the general one for the last 3 rows
  const Matrix<S> W = rand_s<S>(out, in, g);
  auto dW = DeviceMatrix<S>::from_host(W);
  const auto q = quant::Nf4Tensor<cuda>::quantize<S>(dW.view(), {64, false});
  const DeviceMatrix<S> deq = q.template dequantize<S>();
  const MatD Wq = d(deq.to_host());
  const Matrix<S> X = rand_s<S>(1, in, g);
  auto dX = DeviceMatrix<S>::from_host(X);
  // Factors exact in bf16/half, so the scaled X is exact; each round's kernel writes X ~50 µs
  // after its dependents may start, and the GEMV right behind it must see the new X.
  const float factors[3] = {-2.f, 0.5f, 4.f};
  std::vector<DeviceMatrix<S>> Y;
  for (int i = 0; i < 3; ++i) {
    Y.emplace_back(1, out);
    poison(Y.back().view());
  }
  auto& ctx = *CudaContext::thread_default();
  for (int i = 0; i < 3; ++i) {
    scale_late_kernel<T><<<1, 256, 0, ctx.stream()>>>(reinterpret_cast<T*>(dX.data()), static_cast<int>(in),
                                                       factors[i], 100000);
    LORA_CUDA_CHECK(cudaGetLastError());
    quant::nf4_matmul<S>(q, dX.view(), Y[static_cast<std::size_t>(i)].view());
  }
  double c = 1;
  for (int i = 0; i < 3; ++i) {
    c *= factors[i];
    INFO("round " << i);
    CHECK(lora::test::rel_error(Y[static_cast<std::size_t>(i)].to_host(), MatD(c * d(X) * Wq.transpose())) <
          tol<S>());
  }
}


TEMPLATE_TEST_CASE("cuda nf4: double quantisation on the device is the CPU's to the bit, and so is dequantisation",
                   "[cuda][nf4]", bfloat16, lora::half, float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Scale counts below, at and above one nested block of 256, a partial last nested block, and
  // enough scales (70 000) for the offset's sum to span many blocks of the device reduction.
  for (auto [rows, cols, bs] : {std::tuple<Index, Index, int>{3, 64, 32}, {64, 256, 64}, {257, 193, 64},
                                {300, 1000, 32}, {1000, 4480, 64}}) {
    INFO("[" << rows << " x " << cols << "] blocksize " << bs);
    Matrix<S> X = rand_s<S>(rows, cols, g, g.uniform(0.01, 10.0));
    for (Index i = 0; i < rows; i += 7) X(i, 0) = S(static_cast<float>(g.uniform(-50.0, 50.0)));  // spread the scales
    const Nf4Tensor cpu_q = Nf4Tensor::quantize(X, {bs, true});
    auto dx = DeviceMatrix<S>::from_host(X);
    const auto q = quant::Nf4Tensor<cuda>::quantize<S>(dx.view(), {bs, true});
    REQUIRE(q.double_quant());
    const Nf4Tensor hq = q.to_host();
    const auto& a = *cpu_q.double_quant_state();
    const auto& b = *hq.double_quant_state();
    CHECK(b.offset == a.offset);
    CHECK(b.codes == a.codes);
    CHECK(b.nested_absmax == a.nested_absmax);
    CHECK(std::memcmp(b.nested_code.data(), a.nested_code.data(), sizeof(float) * 256) == 0);
    CHECK(hq.packed() == cpu_q.packed());
    // The device's restored scales (what its kernels read) are the CPU's.
    std::vector<float> dev_absmax(q.absmax().size());
    LORA_CUDA_CHECK(cudaDeviceSynchronize());
    LORA_CUDA_CHECK(cudaMemcpy(dev_absmax.data(), q.absmax().data(), dev_absmax.size() * sizeof(float),
                               cudaMemcpyDeviceToHost));
    CHECK(dev_absmax == cpu_q.absmax());
    CHECK(q.storage_bytes() == cpu_q.storage_bytes());
    CHECK(q.bits_per_parameter() == cpu_q.bits_per_parameter());
    // Dequantised values to the bit in S (and in float), aligned and element-wise kernels.
    DeviceMatrix<S> out(rows, cols);
    poison(out.view());
    q.dequantize_into(out.view());
    const Matrix<S> want = cpu_q.template dequantize<S>(), got = out.to_host();
    CHECK(std::memcmp(got.data(), want.data(), sizeof(S) * want.size()) == 0);
    const Matrix<float> wantf = cpu_q.dequantize<float>(), gotf = q.template dequantize<float>().to_host();
    CHECK(std::memcmp(gotf.data(), wantf.data(), sizeof(float) * wantf.size()) == 0);
    // from_host carries the CPU's state; to_host gives it back; requantize keeps the options.
    auto q2 = quant::Nf4Tensor<cuda>::from_host(cpu_q);
    CHECK(q2.double_quant());
    CHECK(q2.code(rows * cols - 1) == cpu_q.code(rows * cols - 1));
    const Matrix<S> got2 = q2.template dequantize<S>().to_host();
    CHECK(std::memcmp(got2.data(), want.data(), sizeof(S) * want.size()) == 0);
    const Nf4Tensor back = q2.to_host();
    CHECK(back.packed() == cpu_q.packed());
    CHECK(back.absmax() == cpu_q.absmax());
    CHECK(back.double_quant_state()->codes == a.codes);
    q2.template requantize<S>(dx.view());
    CHECK(q2.double_quant());
    CHECK(q2.blocksize() == bs);
    CHECK(q2.to_host().absmax() == cpu_q.absmax());
  }
  // A non-finite scale (an infinite input) is refused by name, as on the CPU.
  Matrix<float> bad = rand_s<float>(4, 64, g);
  bad(2, 5) = std::numeric_limits<float>::infinity();
  auto db = DeviceMatrix<float>::from_host(bad);
  CHECK_THROWS_WITH((quant::Nf4Tensor<cuda>::quantize<float>(db.view(), {64, true})),
                    Catch::Matchers::ContainsSubstring("absmax[2]") && Catch::Matchers::ContainsSubstring("finite"));
}

TEST_CASE("cuda nf4: nf4_matmul above 16 tokens (dequantise + cuBLAS) matches float64", "[cuda][nf4]") {
  using S = bfloat16;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index out = 200, in = 96, T = 40;
  const Matrix<S> W = rand_s<S>(out, in, g), X = rand_s<S>(T, in, g);
  const Nf4Tensor cpu_q = Nf4Tensor::quantize(W, {64, true});
  const auto q = quant::Nf4Tensor<cuda>::from_host(cpu_q);
  auto dX = DeviceMatrix<S>::from_host(X);
  const DeviceMatrix<S> Y = quant::nf4_matmul<S>(q, dX.view());
  CHECK(lora::test::rel_error(Y.to_host(), MatD(d(X) * d(cpu_q.template dequantize<S>()).transpose())) < tol<S>());
}
