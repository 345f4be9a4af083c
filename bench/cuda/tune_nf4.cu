// tune_nf4 [out.csv [profile]]: the library's NF4 kernels (lora/cuda/nf4.cuh) side by side on
// W 14336 × 4096 and 4096 × 4096 (blocksize 64, bf16 activations), at 1, 2, 4, 8 and 16 tokens,
// against cuBLAS's bf16 GEMM on the unquantised weights and the copy bandwidth, each with its
// relative error against a float32 cuBLAS product of the dequantised W. Every variant is a
// kernel or launch helper of the library, with the template parameters nf4_gemm chooses among:
//   ring S3           nf4_ring_kernel (tensor cores, per-warp cp.async ring; nf4_gemm's choice
//                     for blocksize 64 and K ≤ 4096, with 2 slots) with 3 ring slots per warp
//   ring narrow       2 slots, the narrow code table (PRMT + LEA per lookup address) for ≤ 8
//                     tokens, where nf4_gemm takes the WIDE one (entries 256 bytes apart)
//   stream NT1/NT2    nf4_stream_kernel (tensor cores, barrier form): nf4_gemm's choice for 2…16
//                     tokens at other shapes
//   byte_pair pdl     nf4_byte_pair_kernel (one token, CUDA cores)
//   nf4_gemm          the dispatcher itself
//   ring+lora r16     detail::nf4_gemm_lora with the LoRA term (r 16, s 2: one piece, so every block
//                     computes XA and adds B·XA in its epilogue): QLoRA's fused forward
//                     (QLoraLinear<S, cuda>::forward at these sizes); also timed against
//                     nf4_matmul alone in alternating batches
//   lora shrunk/self  the same with XA from the shrink kernel (the table nf4_gemm takes: WIDE up
//                     to 8 tokens) / computed by every block (the narrow table, nf4_gemm_lora's
//                     choice); `self wide` with the WIDE table. The library's choice, shrunk, self
//                     with 3 ring slots, per cluster of 2 and self wide also timed against
//                     nf4_matmul in alternating batches (rows qlora*: the form's µs, the NF4
//                     product's µs, their ratio)
//   dense*            lora/cuda/ring.cuh's one-pass kernel on the bf16 W (alone, with the r 16 term
//                     per block: the launcher's form (A through the rings at ≤ 8 tokens), (regA)
//                     A into registers, (ringA) A through the rings at 16 too, (x2) tokens 8…15
//                     in shared memory (alone and with the term); per cluster of 2
//                     and of 4) against cuBLAS's bf16 GEMM on the same
//                     W, in alternating batches (rows: µs, cuBLAS µs, ratio, % of copy, error
//                     against float32)
//   lora self handoff XA per block handed to the piece's warp alone through a named barrier (the
//                     other warps go on to their first tile; launch_nf4_ring's HO); also in
//                     alternating batches (qlora_handoff)
//   lora clusterC     XA computed by the C blocks of a thread-block cluster together (each reads
//                     1 / C of A; bit for bit `self`), C = 2, 4, 8; also in alternating batches
//   r64 self/shrunk/cluster4  a LoRA term of rank 64 (four pieces): XA computed by every block
//                     (each reads all four pieces' A) / from the shrink kernel / by clusters of 4;
//                     also in alternating batches
// Weight sets rotate so that every call reads W from device memory (together > 3× L2); each
// timing round starts with an untimed call (bench::time_all). Single-token variants are also
// timed as a CUDA graph of their launches. % of copy counts the bytes read (codes, absmax, X)
// and written (Y) against the device-to-device copy's read + write rate. With `profile`, only
// a few untimed launches of nf4_ring_kernel at 1, 8 and 16 tokens on 14336 × 4096, and at one
// token with the LoRA term (r 16) (for ncu).
#include <lora/core/random.hpp>
#include <lora/cuda/nf4.cuh>
#include <lora/cuda/ring.cuh>
#include <lora/cuda/runtime.hpp>

#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace lora;
using bench::fill_random;
using bench::time_graph_ms;
using bench::time_all;
using bench::time_ms;
using S = bfloat16;
using T = detail::device_t<S>;

int main(int argc, char** argv) {
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : stdout;
  if (!csv) return 1;
  auto ctx = CudaContext::thread_default();
  Generator g(20261123);
  int l2 = 0;
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  std::fprintf(csv, "name,out,in,tokens,ms,GBps,pct_copy,x_cublas,rel_err\n");

  const bool profile = argc > 2 && std::string(argv[2]) == "profile";
  if (profile) {  // W 14336 × 4096 once, nf4_ring_kernel three times per token count
    const Index out = 14336, in = 4096;
    DeviceMatrix<S> W(out, in);
    fill_random(W.view(), g, 0.02);
    const auto q = quant::Nf4Tensor<cuda>::quantize<S>(W.view(), {64, false}, ctx);
    DeviceMatrix<S> LA(16, in), LB(out, 16);
    fill_random(LA.view(), g, 0.02);
    fill_random(LB.view(), g, 0.02);
    DeviceBuffer<S> xa(256);
    detail::Nf4RingLora<T> lora;
    lora.jobs = 1;
    lora.xa = reinterpret_cast<T*>(xa.data());
    lora.job[0] = {reinterpret_cast<const T*>(LA.data()), LA.view().ld, reinterpret_cast<const T*>(LB.data()),
                   LB.view().ld, 16, 2.f, 1u};
    for (const Index tokens : {Index(1), Index(8), Index(16)}) {
      DeviceMatrix<S> X(tokens, in), Y(tokens, out);
      fill_random(X.view(), g, 1.0);
      // the narrow kernel, then (one token only) the same with the LoRA term (QLoRA's fused forward)
      for (const bool with_lora : {false, true}) {
        if (with_lora && tokens != 1) continue;
        for (int i = 0; i < 3; ++i)
          detail::launch_nf4_ring<T>(reinterpret_cast<const T*>(X.data()), X.view().ld, static_cast<int>(tokens),
                                     static_cast<int>(in), q.packed().data(), q.absmax().data(), static_cast<int>(out),
                                     reinterpret_cast<T*>(Y.data()), Y.view().ld, ctx->stream(), true,
                                     with_lora ? lora : detail::Nf4RingLora<T>{});
        LORA_CUDA_CHECK(cudaDeviceSynchronize());
      }
    }
    return 0;
  }
  const std::size_t cb = std::size_t(1) << 30;
  DeviceBuffer<char> ca(cb), cbuf(cb);
  LORA_CUDA_CHECK(cudaMemset(ca.data(), 1, cb));
  const double copy_ms = time_ms(*ctx, [&](int) {
    LORA_CUDA_CHECK(cudaMemcpyAsync(cbuf.data(), ca.data(), cb, cudaMemcpyDeviceToDevice, ctx->stream()));
  }, 2, 9);
  const double copy_gbps = 2.0 * cb / copy_ms / 1e6;
  std::fprintf(csv, "copy,0,0,0,%.5f,%.1f,100,0,0\n", copy_ms, copy_gbps);
  std::fprintf(stderr, "copy %.0f GB/s\n", copy_gbps);

  for (const auto [out, in] : {std::pair<Index, Index>{14336, 4096}, {4096, 4096}}) {
    const double code_bytes = out * in / 2.0 + out * in / 64.0 * 4;
    const int sets = std::max(4, static_cast<int>(3.0 * l2 / code_bytes) + 1);
    std::fprintf(stderr, "W %ld x %ld: %d weight sets\n", static_cast<long>(out), static_cast<long>(in), sets);
    // Set 0 is random; the others are copies in other buffers (the rotation is about addresses).
    std::vector<DeviceMatrix<S>> W;
    std::vector<quant::Nf4Tensor<cuda>> q;
    for (int i = 0; i < sets; ++i) {
      W.emplace_back(out, in);
      if (i == 0)
        fill_random(W.back().view(), g, 0.02);
      else
        LORA_CUDA_CHECK(cudaMemcpy(W.back().data(), W[0].data(), static_cast<std::size_t>(out * in) * sizeof(S),
                                   cudaMemcpyDeviceToDevice));
      q.push_back(quant::Nf4Tensor<cuda>::quantize<S>(W.back().view(), {64, false}, ctx));
    }
    DeviceMatrix<float> Df(out, in);
    q[0].dequantize_into(Df.view());
    const Index rank = 16;
    const float lora_s = 2.f;
    DeviceMatrix<S> LA(rank, in), LB(out, rank);
    fill_random(LA.view(), g, 0.02);
    fill_random(LB.view(), g, 0.02);
    DeviceBuffer<S> xa(static_cast<std::size_t>(rank / 16) * 256);  // the LoRA pieces' s·X·Aᵀ
    DeviceMatrix<float> LAf(rank, in), LBf(out, rank);
    upload<float>(Matrix<float>(to_host(LA.view()).template cast<float>()), LAf.view());
    upload<float>(Matrix<float>(to_host(LB.view()).template cast<float>()), LBf.view());
    // r 64: four pieces, XA per block or from the shrink kernel (nf4_gemm_lora's choice beyond one piece)
    const Index rank4 = 64;
    DeviceMatrix<S> LA4(rank4, in), LB4(out, rank4);
    fill_random(LA4.view(), g, 0.02);
    fill_random(LB4.view(), g, 0.02);
    DeviceBuffer<S> xa4(static_cast<std::size_t>(rank4 / 16) * 256);
    const Matrix<float> LA4h = to_host(LA4.view()).template cast<float>(),
                        LB4h = to_host(LB4.view()).template cast<float>();

    for (const Index tokens : {Index(1), Index(2), Index(4), Index(8), Index(16)}) {
      DeviceMatrix<S> X(tokens, in), Y(tokens, out);
      fill_random(X.view(), g, 1.0);
      // reference: float32 product of the dequantised set 0
      DeviceMatrix<float> Xf(tokens, in), Yf(tokens, out);
      {
        const Matrix<S> xh = to_host(X.view());
        upload<float>(Matrix<float>(xh.template cast<float>()), Xf.view());
      }
      detail::gemm<float, float, float>(*ctx, false, true, tokens, out, in, 1.f, Xf.view(), Df.view(), 0.f, Yf.view());
      const Matrix<float> ref_base = to_host(Yf.view());
      DeviceMatrix<float> XAf(tokens, rank);
      detail::gemm<float, float, float>(*ctx, false, true, tokens, rank, in, lora_s, Xf.view(), LAf.view(), 0.f,
                                        XAf.view());
      detail::gemm<float, float, float>(*ctx, false, true, tokens, out, rank, 1.f, XAf.view(), LBf.view(), 1.f,
                                        Yf.view());
      const Matrix<float> ref_lora = to_host(Yf.view());
      const Matrix<float> ref_lora4 =
          ref_base + lora_s * (to_host(X.view()).template cast<float>() * LA4h.transpose()) * LB4h.transpose();
      const Matrix<float>* refp = &ref_base;
      auto rel_err = [&]() {
        const Matrix<float>& ref = *refp;
        const Matrix<S> y = to_host(Y.view());
        double num = 0, den = 0;
        for (Index t = 0; t < tokens; ++t)
          for (Index j = 0; j < out; ++j) {
            const double d = double(float(y(t, j))) - ref(t, j);
            num += d * d;
            den += double(ref(t, j)) * ref(t, j);
          }
        return std::sqrt(num / den);
      };
      const double bytes = code_bytes + tokens * (in + out) * 2.0;
      const T* xd = reinterpret_cast<const T*>(X.data());
      T* yd = reinterpret_cast<T*>(Y.data());
      const long ldx = X.view().ld, ldy = Y.view().ld;
      const double cub = time_ms(*ctx, [&](int i) {
        detail::gemm<S, S, S>(*ctx, false, true, tokens, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
      });
      const double cub_bytes = out * in * 2.0 + tokens * (in + out) * 2.0;
      std::fprintf(csv, "cublas_bf16,%ld,%ld,%ld,%.5f,%.1f,%.1f,1,0\n", static_cast<long>(out), static_cast<long>(in),
                   static_cast<long>(tokens), cub, cub_bytes / cub / 1e6, 100 * cub_bytes / cub / 1e6 / copy_gbps);
      std::fprintf(stderr, "%5ldx%ld T %2ld: cuBLAS bf16 %.2f us (%.0f%% of copy)\n", static_cast<long>(out),
                   static_cast<long>(in), static_cast<long>(tokens), cub * 1e3, 100 * cub_bytes / cub / 1e6 / copy_gbps);
      auto variant = [&](const std::string& name, const std::function<void(int)>& launch) {
        LORA_CUDA_CHECK(cudaMemset(Y.data(), 0xff, static_cast<std::size_t>(tokens * out) * sizeof(S)));
        LORA_CUDA_CHECK(cudaDeviceSynchronize());
        launch(0);
        LORA_CUDA_CHECK(cudaGetLastError());
        const double err = rel_err();
        const double ms = time_ms(*ctx, launch);
        const double gms = tokens == 1 ? time_graph_ms(*ctx, launch) : 0.0;
        const double pct = 100 * bytes / ms / 1e6 / copy_gbps;
        std::fprintf(csv, "%s,%ld,%ld,%ld,%.5f,%.1f,%.1f,%.3f,%.2e\n", name.c_str(), static_cast<long>(out),
                     static_cast<long>(in), static_cast<long>(tokens), ms, bytes / ms / 1e6, pct, cub / ms, err);
        std::fprintf(stderr, "%5ldx%ld T %2ld: %-14s %7.2f us %3.0f%% of copy %5.2fx cuBLAS  err %.1e",
                     static_cast<long>(out), static_cast<long>(in), static_cast<long>(tokens), name.c_str(), ms * 1e3,
                     pct, cub / ms, err);
        if (gms > 0) std::fprintf(stderr, "  (graph %.2f us)", gms * 1e3);
        std::fprintf(stderr, "\n");
      };
      variant("nf4_gemm", [&](int i) { quant::nf4_matmul<S>(q[i % sets], X.view(), Y.view()); });
      variant("ring S3", [&](int i) {
        const auto& w = q[i % sets];
        detail::launch_nf4_ring<T, 3>(xd, ldx, static_cast<int>(tokens), static_cast<int>(in), w.packed().data(),
                                      w.absmax().data(), static_cast<int>(out), yd, ldy, ctx->stream(), true, {});
      });
      if (tokens <= 8)
        variant("ring narrow", [&](int i) {
          const auto& w = q[i % sets];
          detail::launch_nf4_ring<T, 2, false>(xd, ldx, static_cast<int>(tokens), static_cast<int>(in),
                                              w.packed().data(), w.absmax().data(), static_cast<int>(out), yd, ldy,
                                              ctx->stream(), true, {});
        });
      if (tokens == 1)
        variant("byte_pair pdl", [&](int i) {
          const auto& w = q[i % sets];
          detail::launch_nf4_byte_pair<T>(xd, static_cast<int>(in), w.packed().data(), w.absmax().data(), 64,
                                          static_cast<int>(out), yd, ctx->stream(), true);
        });
      auto stream = [&](const char* name, auto launch) {
        variant(name, [&, launch](int i) {
          const auto& w = q[i % sets];
          launch(xd, ldx, static_cast<int>(tokens), static_cast<int>(in), w.packed().data(), w.absmax().data(), 64,
                 static_cast<int>(out), yd, ldy, ctx->stream());
        });
      };
      if (tokens >= 2 && tokens <= 8) stream("stream NT1", detail::launch_nf4_stream<T, 1, false, false>);
      if (tokens > 8) stream("stream NT2", detail::launch_nf4_stream<T, 2, false, false>);
      refp = &ref_lora;
      detail::Nf4RingLora<T> lora;
      lora.jobs = static_cast<int>(rank / 16);
      lora.xa = reinterpret_cast<T*>(xa.data());
      for (int p = 0; p < lora.jobs; ++p)
        lora.job[p] = {reinterpret_cast<const T*>(LA.data()) + 16L * p * LA.view().ld, LA.view().ld,
                       reinterpret_cast<const T*>(LB.data()) + 16L * p, LB.view().ld, 16, lora_s,
                       (1u << tokens) - 1u};
      auto qlora = [&](int i) {  // the library's choice (QLoraLinear<S, cuda>::forward)
        if (!detail::nf4_gemm_lora<S>(q[i % sets].parts(), X.view(), Y.view(), lora, *ctx))
          throw std::runtime_error("tune_nf4: nf4_gemm_lora refused the product");
      };
      {  // the dense one-pass kernel (lora/cuda/ring.cuh) on the bf16 W against cuBLAS's GEMM on it
        const Matrix<float>* const saved_ref = refp;
        DeviceMatrix<float> Yd(tokens, out);
        detail::gemm<S, S, float>(*ctx, false, true, tokens, out, in, 1.f, X.view(), W[0].view(), 0.f, Yd.view());
        const Matrix<float> ref_dense = to_host(Yd.view());
        const Matrix<float> ref_dense_lora = ref_dense + (ref_lora - ref_base);
        auto dense = [&](int cluster, bool with_lora, int am = detail::dense_a_ring_one_tile, bool x2 = false) {
          return [&, cluster, with_lora, am, x2](int i) {
            detail::Nf4RingLora<T> l = with_lora ? lora : detail::Nf4RingLora<T>{};
            l.self = true;
            l.cluster = cluster;
            const T* w = reinterpret_cast<const T*>(W[i % sets].data());
            auto go = [&](auto mode) {
              detail::launch_dense_ring<T, detail::dense_ring_stages, decltype(mode)::value>(
                  xd, ldx, static_cast<int>(tokens), static_cast<int>(in), w, W[i % sets].view().ld,
                  static_cast<int>(out), yd, ldy, ctx->stream(), true, l);
            };
            if (x2)
              detail::launch_dense_ring<T, detail::dense_ring_stages, detail::dense_a_ring, true>(
                  xd, ldx, static_cast<int>(tokens), static_cast<int>(in), w, W[i % sets].view().ld,
                  static_cast<int>(out), yd, ldy, ctx->stream(), true, l);
            else if (am == detail::dense_a_ring)
              go(std::integral_constant<int, detail::dense_a_ring>{});
            else if (am == detail::dense_a_registers)
              go(std::integral_constant<int, detail::dense_a_registers>{});
            else
              go(std::integral_constant<int, detail::dense_a_ring_one_tile>{});
          };
        };
        const std::vector<std::pair<const char*, std::function<void(int)>>> forms = {
            {"dense", dense(1, false)},
            {"dense_lora_self", dense(1, true)},
            {"dense_lora_self_regA", dense(1, true, detail::dense_a_registers)},
            {"dense_lora_self_ringA", dense(1, true, detail::dense_a_ring)},
            {"dense_x2", dense(1, false, detail::dense_a_ring, true)},
            {"dense_lora_self_x2", dense(1, true, detail::dense_a_ring, true)},
            {"dense_lora_cluster2", dense(2, true)},
            {"dense_lora_cluster4", dense(4, true)}};
        std::vector<std::function<void(int)>> fns = {[&](int i) {
          detail::gemm<S, S, S>(*ctx, false, true, tokens, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
        }};
        std::vector<double> errs;
        for (const auto& f : forms) {  // each checked against float32 before it is timed
          LORA_CUDA_CHECK(cudaMemset(Y.data(), 0xff, static_cast<std::size_t>(tokens * out) * sizeof(S)));
          f.second(0);
          LORA_CUDA_CHECK(cudaDeviceSynchronize());
          const std::string name = f.first;
          refp = name == "dense" || name == "dense_x2" ? &ref_dense : &ref_dense_lora;
          errs.push_back(rel_err());
          fns.push_back(f.second);
        }
        refp = saved_ref;  // the variants after this block check against the reference they had
        const auto m = time_all(*ctx, fns, 10, 15);
        const double dense_bytes = out * in * 2.0 + tokens * (in + out) * 2.0;
        std::fprintf(stderr, "%5ldx%ld T %2ld: dense / cuBLAS bf16 (alternating): cuBLAS %.2f us",
                     static_cast<long>(out), static_cast<long>(in), static_cast<long>(tokens), m[0] * 1e3);
        for (std::size_t v = 0; v < forms.size(); ++v) {  // µs of the form, of cuBLAS, ratio, % of copy, error
          std::fprintf(csv, "%s,%ld,%ld,%ld,%.5f,%.5f,%.4f,%.1f,%.2e\n", forms[v].first, static_cast<long>(out),
                       static_cast<long>(in), static_cast<long>(tokens), m[v + 1], m[0], m[v + 1] / m[0],
                       100 * dense_bytes / m[v + 1] / 1e6 / copy_gbps, errs[v]);
          std::fprintf(stderr, ", %s %.2f us (%.3f, %.0f%% of copy, err %.1e)", forms[v].first, m[v + 1] * 1e3,
                       m[v + 1] / m[0], 100 * dense_bytes / m[v + 1] / 1e6 / copy_gbps, errs[v]);
        }
        std::fprintf(stderr, "\n");
      }
      variant("ring+lora r16", qlora);
      // one LoRA term, hand-off of XA, table and ring depth, whatever nf4_gemm_lora picks
      auto forced_term = [&](const detail::Nf4RingLora<T>& term, bool self, bool wide, bool s3 = false,
                             int cluster = 1, bool handoff = false) {
        return [&, term, self, wide, s3, cluster, handoff](int i) {
          const auto& w = q[i % sets];
          auto l = term;
          l.self = self;
          l.cluster = cluster;
          auto ring = handoff ? detail::launch_nf4_ring<T, 2, false, true>
                      : s3    ? detail::launch_nf4_ring<T, 3, false>
                      : wide  ? detail::launch_nf4_ring<T, 2, true>
                              : detail::launch_nf4_ring<T, 2, false>;
          ring(xd, ldx, static_cast<int>(tokens), static_cast<int>(in), w.packed().data(), w.absmax().data(),
               static_cast<int>(out), yd, ldy, ctx->stream(), true, l);
        };
      };
      auto forced = [&](bool self, bool wide, bool s3 = false, int cluster = 1) {
        return forced_term(lora, self, wide, s3, cluster);
      };
      const bool wide = tokens <= 8;
      variant("lora shrunk", forced(false, wide));
      variant("lora self", forced(true, false));
      variant("lora self handoff", forced_term(lora, true, false, false, 1, true));
      if (wide) variant("lora self wide", forced(true, true));
      variant("lora cluster2", forced(true, false, false, 2));
      variant("lora cluster4", forced(true, false, false, 4));
      variant("lora cluster8", forced(true, false, false, 8));
      // four pieces (r 64): XA per block (every block reads all four pieces' A) against the shrink kernel
      detail::Nf4RingLora<T> lora4;
      lora4.jobs = static_cast<int>(rank4 / 16);
      lora4.xa = reinterpret_cast<T*>(xa4.data());
      for (int p = 0; p < lora4.jobs; ++p)
        lora4.job[p] = {reinterpret_cast<const T*>(LA4.data()) + 16L * p * LA4.view().ld, LA4.view().ld,
                        reinterpret_cast<const T*>(LB4.data()) + 16L * p, LB4.view().ld, 16, lora_s,
                        (1u << tokens) - 1u};
      // the tables nf4_gemm_lora would take: narrow with XA per block, WIDE up to 8 tokens with the shrink kernel
      auto forced4 = [&](bool self) { return forced_term(lora4, self, !self && wide); };
      refp = &ref_lora4;
      variant("r64 self", forced4(true));
      variant("r64 shrunk", forced4(false));
      variant("r64 cluster4", forced_term(lora4, true, false, false, 4));
      refp = &ref_base;
      {  // four pieces against the NF4 product alone, in alternating batches
        const auto m = time_all(*ctx,
                                {[&](int i) { quant::nf4_matmul<S>(q[i % sets], X.view(), Y.view()); },
                                 forced4(true), forced4(false), forced_term(lora4, true, false, false, 4)},
                                10, 15);
        const char* names4[] = {"qlora64_self", "qlora64_shrunk", "qlora64_cluster4"};
        for (int v = 0; v < 3; ++v)
          std::fprintf(csv, "%s,%ld,%ld,%ld,%.5f,%.5f,%.4f,0,0\n", names4[v], static_cast<long>(out),
                       static_cast<long>(in), static_cast<long>(tokens), m[v + 1], m[0], m[v + 1] / m[0]);
        std::fprintf(stderr,
                     "%5ldx%ld T %2ld: QLoRA r64 / NF4 alone (alternating): NF4 %.2f us, self %.2f us (%.3f), "
                     "shrunk %.2f us (%.3f), cluster4 %.2f us (%.3f)\n",
                     static_cast<long>(out), static_cast<long>(in), static_cast<long>(tokens), m[0] * 1e3, m[1] * 1e3,
                     m[1] / m[0], m[2] * 1e3, m[2] / m[0], m[3] * 1e3, m[3] / m[0]);
      }
      {  // QLoRA's fused forward (the library's choice) and the other forms against the NF4 product
         // alone, in alternating batches
        std::vector<std::pair<const char*, std::function<void(int)>>> forms = {
            {"qlora", qlora},
            {"qlora_shrunk", forced(false, wide)},
            {"qlora_handoff", forced_term(lora, true, false, false, 1, true)},
            {"qlora_self_s3", forced(true, false, true)},
            {"qlora_cluster2", forced(true, false, false, 2)}};
        if (wide) forms.emplace_back("qlora_self_wide", forced(true, true));
        std::vector<std::function<void(int)>> fns = {
            [&](int i) { quant::nf4_matmul<S>(q[i % sets], X.view(), Y.view()); }};
        for (const auto& f : forms) fns.push_back(f.second);
        const auto m = time_all(*ctx, fns, 10, 15);
        std::fprintf(stderr, "%5ldx%ld T %2ld: QLoRA r16 / NF4 alone (alternating): NF4 %.2f us", static_cast<long>(out),
                     static_cast<long>(in), static_cast<long>(tokens), m[0] * 1e3);
        for (std::size_t v = 0; v < forms.size(); ++v) {  // each row: µs of the form, of the NF4 product alone, ratio
          std::fprintf(csv, "%s,%ld,%ld,%ld,%.5f,%.5f,%.4f,0,0\n", forms[v].first, static_cast<long>(out),
                       static_cast<long>(in), static_cast<long>(tokens), m[v + 1], m[0], m[v + 1] / m[0]);
          std::fprintf(stderr, ", %s %.2f us (%.3f)", forms[v].first, m[v + 1] * 1e3, m[v + 1] / m[0]);
        }
        std::fprintf(stderr, "\n");
      }
    }
    if (out == 14336) {  // dequantisation: the library's (2 groups per thread, streaming stores) and others
      DeviceMatrix<S> D(out, in);
      const long groups = out * in / 8;
      auto direct = [&](auto u, auto cs) {
        constexpr int U = decltype(u)::value;
        constexpr bool CS = decltype(cs)::value;
        return [&, groups](int i) {
          const auto& w = q[i % sets];
          detail::nf4_dequantize_kernel<T, U, CS><<<detail::ceil_div(groups, 256L * U), 256, 0, ctx->stream()>>>(
              w.packed().data(), w.absmax().data(), groups, 64, reinterpret_cast<T*>(D.data()));
        };
      };
      const std::vector<std::pair<std::string, std::function<void(int)>>> dqs = {
          {"dequantize", [&](int i) { q[i % sets].dequantize_into(D.view()); }},
          {"dequantize U1", direct(std::integral_constant<int, 1>{}, std::false_type{})},
          {"dequantize U2 st", direct(std::integral_constant<int, 2>{}, std::false_type{})},
          {"dequantize U4 st", direct(std::integral_constant<int, 4>{}, std::false_type{})},
          {"dequantize U4 cs", direct(std::integral_constant<int, 4>{}, std::true_type{})},
          {"dequantize U8", direct(std::integral_constant<int, 8>{}, std::false_type{})}};
      for (const auto& [name, fn] : dqs) {
        const double dq = time_ms(*ctx, fn);
        const double dq_bytes = code_bytes + out * in * 2.0;
        std::fprintf(csv, "%s,%ld,%ld,0,%.5f,%.1f,%.1f,0,0\n", name.c_str(), static_cast<long>(out),
                     static_cast<long>(in), dq, dq_bytes / dq / 1e6, 100 * dq_bytes / dq / 1e6 / copy_gbps);
        std::fprintf(stderr, "%-14s %.2f us, %.0f GB/s (%.0f%% of copy)\n", name.c_str(), dq * 1e3,
                     dq_bytes / dq / 1e6, 100 * dq_bytes / dq / 1e6 / copy_gbps);
      }
    }
  }
  if (csv != stdout) std::fclose(csv);
  return 0;
}
