// QLoraLinear<S, cuda> (lora/cuda/qlora.cuh) with bf16/half activations and factors against
// float64 on the dequantised weight: the fused NF4 kernels (≤ 16 tokens) and dequantise +
// cuBLAS (more tokens, backward), the writing and returning forms, merge against the CPU
// layer's merge. The float layer runs in device.cu, on the CPU and the GPU from one body.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <cstring>

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;

TEMPLATE_TEST_CASE("cuda qlora: forward and backward with 16-bit activations match float64", "[cuda][qlora]", bfloat16,
                   lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 512, out = 200, r = 16;
  const Matrix<float> W = rand_s<float>(out, in, g, 0.5);
  LowRankAdapter<float> a(in, out, r, 32.0);
  a.set_A(rand_s<float>(r, in, g, 0.1).cast<S>().template cast<float>());  // exact in S
  a.set_B(rand_s<float>(out, r, g, 0.1).cast<S>().template cast<float>());
  const QLoraLinear<float> host(Nf4Tensor::quantize(W, {64, true}), a);
  auto layer = QLoraLinear<S, cuda>::from_host(host);
  const MatD Wq = d(host.base().template dequantize<float>()), A = d(a.A()), B = d(a.B());
  const double s = a.scaling();
  for (Index T : {Index(1), Index(5), Index(16), Index(33)}) {
    INFO("tokens " << T);
    const Matrix<S> X = rand_s<S>(T, in, g), dY = rand_s<S>(T, out, g);
    const MatD Xd = d(X), dYd = d(dY);
    auto dX = DeviceMatrix<S>::from_host(X);
    auto ddY = DeviceMatrix<S>::from_host(dY);
    DeviceMatrix<S> Y(T, out);
    poison(Y.view());
    layer.forward(dX.view(), Y.view());
    const MatD ref = Xd * Wq.transpose() + s * Xd * A.transpose() * B.transpose();
    CHECK(lora::test::rel_error(Y.to_host(), ref) < tol<S>());
    CHECK(lora::test::rel_error(layer.base_forward(dX.view()).to_host(), MatD(Xd * Wq.transpose())) < tol<S>());
    const auto gr = layer.backward(dX.view(), ddY.view());
    CHECK(lora::test::rel_error(gr.dA.to_host(), MatD(s * (dYd * B).transpose() * Xd)) < tol<S>());
    CHECK(lora::test::rel_error(gr.dB.to_host(), MatD(s * dYd.transpose() * (Xd * A.transpose()))) < tol<S>());
    CHECK(lora::test::rel_error(gr.dX.to_host(), MatD(dYd * Wq + s * dYd * B * A)) < tol<S>());
  }
  // merge: the CPU layer's new codes, B zeroed on the device, the report the CPU gives.
  QLoraLinear<float> cpu = host;
  const Nf4MergeReport want = cpu.merge();
  const Nf4MergeReport got = layer.merge();
  CHECK(got.relative_error == want.relative_error);
  const QLoraLinear<float> back = layer.to_host();
  CHECK(back.base().packed() == cpu.base().packed());
  CHECK(back.base().absmax() == cpu.base().absmax());
  CHECK(back.adapter().B().cwiseAbs().maxCoeff() == 0.f);
  // Mismatched shapes are refused by name.
  CHECK_THROWS_WITH((QLoraLinear<S, cuda>(quant::Nf4Tensor<cuda>::from_host(Nf4Tensor::quantize(W, {64, false})),
                                           LowRankAdapter<S, cuda>(in + 32, out, r, 8.0))),
                    Catch::Matchers::ContainsSubstring("adapter expects"));
}

TEMPLATE_TEST_CASE("cuda qlora: the fused decode forward (NF4 product and low-rank term in one kernel) matches float64",
                   "[cuda][qlora]", bfloat16, lora::half) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // Ranks 16, 32 and 128 (one, two and eight pieces of 16 ranks; at in = 4096 and T ≤ 8 with the
  // WIDE table), 64 at in = 256 (four pieces, one K-warp: the unfused path) and 8 (unfused), rows
  // not a multiple of the 16-row tile, 1, 4, 8 and 16 K-warps, tokens 1…16 (one and two
  // n-tiles). The low-rank term is scaled to be comparable with the base product, so a wrong B
  // row, rank index or token shows. Reference: float64 on the float dequantised W; the kernel
  // rounds codes and s·X·Aᵀ to S and Y once (a few 2^-9 relative for bf16, inside tol<S>() = 1e-2).
  for (auto [out, in, r] : {std::tuple<Index, Index, Index>{1003, 4096, 16}, {37, 1024, 32}, {300, 256, 64},
                            {130, 1024, 8}, {200, 2048, 128}}) {
    INFO("out " << out << " in " << in << " r " << r);
    const Matrix<float> W = rand_s<float>(out, in, g, 0.5);
    LowRankAdapter<float> a(in, out, r, 2.0 * static_cast<double>(r));
    a.set_A(rand_s<float>(r, in, g, 0.5).cast<S>().template cast<float>());
    a.set_B(rand_s<float>(out, r, g, 0.5).cast<S>().template cast<float>());
    const QLoraLinear<float> host(Nf4Tensor::quantize(W, {64, false}), a);
    auto layer = QLoraLinear<S, cuda>::from_host(host);
    const MatD Wq = d(host.base().template dequantize<float>()), A = d(a.A()), B = d(a.B());
    const double s = a.scaling();
    for (Index T : {Index(1), Index(2), Index(7), Index(8), Index(9), Index(16)}) {
      INFO("tokens " << T);
      const Matrix<S> X = rand_s<S>(T, in, g);
      const MatD Xd = d(X);
      auto dX = DeviceMatrix<S>::from_host(X);
      DeviceMatrix<S> Y(T, out);
      poison(Y.view());
      layer.forward(dX.view(), Y.view());
      const MatD lowrank = s * Xd * A.transpose() * B.transpose();
      const MatD ref = Xd * Wq.transpose() + lowrank;
      CHECK(lora::test::rel_error(Y.to_host(), ref) < tol<S>());
      // the low-rank term alone, against Y minus the base product: it is there, whole
      const MatD base = d(layer.base_forward(dX.view()).to_host());
      CHECK(lora::test::rel_error(MatD(d(Y.to_host()) - base), lowrank) < 5 * tol<S>());
    }
  }
}

TEST_CASE("cuda qlora: nf4_matmul from a second translation unit (its own copy of the ring kernels) matches float64",
          "[cuda][qlora][nf4]") {
  // tests/cuda/nf4.cu launches the same kernel templates; whichever file runs second launches
  // its own copies, which need their own raised shared-memory limit (persistent_capacity).
  using S = bfloat16;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index out = 300, in = 4096;
  const Matrix<S> W = rand_s<S>(out, in, g, 0.5);
  const Nf4Tensor cpu_q = Nf4Tensor::quantize(W, {64, false});
  const auto q = quant::Nf4Tensor<cuda>::from_host(cpu_q);
  const MatD Wq = d(cpu_q.template dequantize<float>());
  for (Index T : {Index(1), Index(6), Index(12)}) {  // the WIDE table (T ≤ 8), the narrow one at two n-tiles
    INFO("tokens " << T);
    const Matrix<S> X = rand_s<S>(T, in, g);
    const auto dX = DeviceMatrix<S>::from_host(X);
    DeviceMatrix<S> Y(T, out);
    poison(Y.view());
    quant::nf4_matmul<S>(q, dX.view(), Y.view());
    CHECK(lora::test::rel_error(Y.to_host(), MatD(d(X) * Wq.transpose())) < tol<S>());
  }
}

TEST_CASE("cuda qlora: every hand-off of XA to the one-pass NF4 kernel matches float64", "[cuda][qlora][nf4]") {
  // detail::launch_nf4_ring with a LoRA term, each way nf4_gemm_lora may take: XA computed by
  // every block, by every block and handed to the piece's warp alone (HO), by the blocks of a
  // cluster of 2 or 4 together (both bit for bit every block's), and XA from the shrink kernel;
  // the WIDE and the narrow table; B's layout and Bᵀ's (a piece of 5 ranks: rows past the rank
  // clamped, their XA 0); one piece and two (r 32: every block computes both pieces' XA, or the
  // shrink kernel does); a token mask (tokens outside it get the base product only); rows not a
  // multiple of the tile; blocks of one tile and of several.
  using S = bfloat16;
  using T = lora::detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // rows for two tiles per block and more (the persistent grid holds one block per SM at K 4096),
  // so that every block passes its later tiles' barriers after the hand-off and rewrites both slots
  int sms = 0;
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const Index rows_2 = 16L * 2 * sms + 8;
  for (auto [out, in] : {std::pair<Index, Index>{1000, 4096}, {40, 1024}, {rows_2, 4096}}) {
    const Matrix<float> W = rand_s<float>(out, in, g, 0.5);
    const Nf4Tensor cpu_q = Nf4Tensor::quantize(W, {64, false});
    const auto q = quant::Nf4Tensor<cuda>::from_host(cpu_q);
    const MatD Wq = d(cpu_q.template dequantize<float>());
    for (const auto [bt, r] : {std::pair<bool, Index>{false, 16}, {true, 5}, {false, 32}}) {
      const Matrix<S> A = rand_s<S>(r, in, g, 0.5), B = rand_s<S>(out, r, g, 0.5);
      const Matrix<S> Bt = B.transpose();
      const auto dA = DeviceMatrix<S>::from_host(A), dB = DeviceMatrix<S>::from_host(bt ? Bt : B);
      const double s = 1.5;
      const int pieces = static_cast<int>((r + 15) / 16);
      DeviceBuffer<S> xa(static_cast<std::size_t>(pieces) * 256);
      for (Index tokens : {Index(1), Index(7), Index(13)}) {
        const Matrix<S> X = rand_s<S>(tokens, in, g);
        const auto dX = DeviceMatrix<S>::from_host(X);
        // token 0 and every third token take the adapter
        std::uint32_t mask = 0;
        MatD sel = MatD::Zero(tokens, tokens);
        for (Index t = 0; t < tokens; ++t)
          if (t % 3 == 0) mask |= 1u << t, sel(t, t) = 1;
        const MatD ref = d(X) * Wq.transpose() + s * sel * d(X) * d(A).transpose() * d(B).transpose();
        lora::detail::Nf4RingLora<T> l;
        l.jobs = pieces;
        l.bt = bt;
        l.xa = reinterpret_cast<T*>(xa.data());
        for (int p = 0; p < pieces; ++p)  // ranks [16p, 16p + 16): A's rows, B's columns (Bᵀ's rows)
          l.job[p] = {reinterpret_cast<const T*>(dA.data()) + 16L * p * dA.view().ld, dA.view().ld,
                      reinterpret_cast<const T*>(dB.data()) + 16L * p * (bt ? dB.view().ld : 1), dB.view().ld,
                      static_cast<int>(std::min<Index>(16, r - 16L * p)), static_cast<float>(s), mask};
        REQUIRE(lora::detail::nf4_ring_lora_ok<T>(l, in, out));
        for (const bool wide : {false, true}) {
          if (wide && (tokens > 8 || in < 256 * lora::detail::nf4_ring_wide_min_warps)) continue;
          Matrix<S> y_self;
          // cluster 0: XA from the shrink kernel; 1: every block; -1: every block, handed to the
          // piece's warp alone (HO; one piece, else as 1); 2, 4: clusters of that many blocks
          for (const int cluster : {0, 1, -1, 2, 4}) {
            if (cluster == -1 && wide) continue;  // HO: the narrow table's launcher in this test
            INFO("out " << out << " in " << in << " bt " << bt << " r " << r << " tokens " << tokens << " cluster "
                        << cluster << " wide " << wide);
            l.self = cluster != 0;
            l.cluster = std::max(cluster, 1);
            REQUIRE(lora::detail::nf4_ring_lora_ok<T>(l, in, out));
            DeviceMatrix<S> Y(tokens, out);
            poison(Y.view());
            const auto p = q.parts();
            auto ring = cluster == -1 ? lora::detail::launch_nf4_ring<T, lora::detail::nf4_ring_stages, false, true>
                        : wide            ? lora::detail::launch_nf4_ring<T, lora::detail::nf4_ring_stages, true>
                                          : lora::detail::launch_nf4_ring<T, lora::detail::nf4_ring_stages, false>;
            ring(reinterpret_cast<const T*>(dX.data()), dX.view().ld, static_cast<int>(tokens), static_cast<int>(in),
                 p.packed, p.absmax, static_cast<int>(out), reinterpret_cast<T*>(Y.data()), Y.view().ld,
                 CudaContext::thread_default()->stream(), true, l);
            const Matrix<S> y = Y.to_host();
            REQUIRE(y.allFinite());
            CHECK(lora::test::rel_error(y, ref) < tol<S>());
            if (cluster == 1) y_self = y;
            if (cluster > 1 || cluster == -1) CHECK(std::memcmp(y.data(), y_self.data(), sizeof(S) * y.size()) == 0);
          }
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("cuda ring: the one-pass dense kernel, alone and with a LoRA term, matches float64",
                   "[cuda][ring]", bfloat16, lora::half) {
  // detail::launch_dense_ring (lora/cuda/ring.cuh): a bf16/half W streamed once, without a LoRA
  // term, with XA computed by every block (the pieces' A through the warps' rings, at one n-tile
  // only, and into registers; the second n-tile's activations in shared memory), and by the blocks
  // of clusters of 2 and 4 (each bit for bit the first form's); B's layout and Bᵀ's (a piece of 5
  // ranks), one, two and four pieces (r 32, 64: at K 4096 four pieces leave no room for X2, so 41
  // tokens take the token-group kernel without it); a token mask; rows not a multiple of the tile;
  // one and two n-tiles of tokens, and 41 tokens (three groups of 16 on the grid's y, every piece
  // for every token; a partial mask is refused).
  using S = TestType;
  using T = lora::detail::device_t<S>;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (auto [out, in] : {std::pair<Index, Index>{1000, 4096}, {40, 1024}, {2056, 2048}}) {
    const Matrix<S> W = rand_s<S>(out, in, g, 0.5);
    const auto dW = DeviceMatrix<S>::from_host(W);
    const MatD Wd = d(W);
    for (const auto [bt, r] : {std::pair<bool, Index>{false, 0}, {false, 16}, {true, 5}, {false, 32}, {false, 64}}) {
      const Index rr = std::max<Index>(r, 1);
      const Matrix<S> A = rand_s<S>(rr, in, g, 0.5), B = rand_s<S>(out, rr, g, 0.5);
      const Matrix<S> Bt = B.transpose();
      const auto dA = DeviceMatrix<S>::from_host(A), dB = DeviceMatrix<S>::from_host(bt ? Bt : B);
      const double s = 1.5;
      const int pieces = static_cast<int>((r + 15) / 16);
      for (Index tokens : {Index(1), Index(7), Index(13), Index(16), Index(41)}) {
        const Matrix<S> X = rand_s<S>(tokens, in, g);
        const auto dX = DeviceMatrix<S>::from_host(X);
        // token 0 and every third token take the adapter; above 16 tokens (groups of 16) every token
        std::uint32_t mask = 0;
        MatD sel = MatD::Zero(tokens, tokens);
        for (Index t = 0; t < tokens; ++t)
          if (tokens > 16 || t % 3 == 0) mask |= t < 32 ? 1u << t : 0u, sel(t, t) = 1;
        MatD ref = d(X) * Wd.transpose();
        if (r > 0) ref += s * sel * d(X) * d(A).transpose() * d(B).transpose();
        lora::detail::Nf4RingLora<T> l;
        l.jobs = pieces;
        l.bt = bt;
        l.self = true;
        for (int p = 0; p < pieces; ++p)
          l.job[p] = {reinterpret_cast<const T*>(dA.data()) + 16L * p * dA.view().ld, dA.view().ld,
                      reinterpret_cast<const T*>(dB.data()) + 16L * p * (bt ? dB.view().ld : 1), dB.view().ld,
                      static_cast<int>(std::min<Index>(16, r - 16L * p)), static_cast<float>(s), mask};
        REQUIRE(lora::detail::dense_ring_ok<T>(in, static_cast<int>(tokens), dX.view().ld, dX.data(), dW.view().ld,
                                               dW.data()));
        Matrix<S> y_self;
        // cluster 1 four times: the pieces' A through the rings at every n-tile, at one n-tile (the
        // launcher's default), into registers, and through the rings with the second n-tile's
        // activations in shared memory (X2)
        for (const auto [cluster, am, x2] : {std::tuple{1, 2, false}, {1, 1, false}, {1, 0, false}, {1, 2, true},
                                              {2, 1, false}, {4, 1, false}}) {
          if (cluster > 1 && (r == 0 || tokens > 16)) continue;  // clusters: a term, at most 16 tokens
          INFO("out " << out << " in " << in << " bt " << bt << " r " << r << " tokens " << tokens << " cluster "
                      << cluster << " A mode " << am << " X2 " << x2);
          l.cluster = cluster;
          if (r > 0) REQUIRE(lora::detail::nf4_ring_lora_ok<T>(l, in, out));
          DeviceMatrix<S> Y(tokens, out);
          poison(Y.view());
          const int K = static_cast<int>(in), N = static_cast<int>(out);  // (no structured bindings in the lambda)
          const auto launch = [&](auto mode, auto second) {
            lora::detail::launch_dense_ring<T, lora::detail::dense_ring_stages, decltype(mode)::value,
                                            decltype(second)::value>(
                reinterpret_cast<const T*>(dX.data()), dX.view().ld, static_cast<int>(tokens), K,
                reinterpret_cast<const T*>(dW.data()), dW.view().ld, N,
                reinterpret_cast<T*>(Y.data()), Y.view().ld, CudaContext::thread_default()->stream(), true, l);
          };
          if (x2)
            launch(std::integral_constant<int, lora::detail::dense_a_ring>{}, std::true_type{});
          else if (am == 2)
            launch(std::integral_constant<int, lora::detail::dense_a_ring>{}, std::false_type{});
          else if (am == 1)
            launch(std::integral_constant<int, lora::detail::dense_a_ring_one_tile>{}, std::false_type{});
          else
            launch(std::integral_constant<int, lora::detail::dense_a_registers>{}, std::false_type{});
          LORA_CUDA_CHECK(cudaGetLastError());
          const Matrix<S> y = Y.to_host();
          REQUIRE(y.allFinite());
          CHECK(lora::test::rel_error(y, ref) < tol<S>());
          if (cluster == 1 && am == 2 && !x2) y_self = y;
          else CHECK(std::memcmp(y.data(), y_self.data(), sizeof(S) * y.size()) == 0);  // bit for bit
        }
        if (tokens > 16 && r > 0) {  // token groups take a piece for all tokens or none
          l.cluster = 1;
          DeviceMatrix<S> Y(tokens, out);
          // a token missing from the first group, and tokens 16… missing (every group reads bits 0…15)
          for (const std::uint32_t partial : {0x7fffu, 0xffffu}) {
            l.job[0].tokens = partial;
            CHECK_THROWS_WITH(lora::detail::launch_dense_ring<T>(
                                  reinterpret_cast<const T*>(dX.data()), dX.view().ld, static_cast<int>(tokens),
                                  static_cast<int>(in), reinterpret_cast<const T*>(dW.data()), dW.view().ld,
                                  static_cast<int>(out), reinterpret_cast<T*>(Y.data()), Y.view().ld,
                                  CudaContext::thread_default()->stream(), true, l),
                              Catch::Matchers::ContainsSubstring(fmt::format("piece 0 has token mask {:#x}", partial)));
          }
        }
      }
    }
  }
}
