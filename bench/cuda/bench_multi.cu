// bench_multi_cuda [out.csv]: mixed-adapter batches (lora/cuda/multi.cuh) on
// in = out = 4096, r = 16, bf16: T tokens spread evenly (then shuffled) over N
// adapters, against the base cuBLAS GEMM alone, one adapter over the same T
// (LowRankAdapter<bf16, cuda>, fused and plain), and the naive loop (tokens
// sorted by adapter, one LowRankAdapter::apply per adapter over its rows).
// CUDA events; all variants of a shape are timed in alternating batches and
// the median per variant is kept. Decode sizes (T ≤ 16) rotate among 4 copies
// of W so that it comes from device memory. CSV: name,tokens,adapters,r,ms,extra.
// LORA_BENCH_MULTI=fwd, =bwd or =nf4 runs only the forward, the backward or the NF4-base rows.

#include <lora/cuda.hpp>

#include "common.cuh"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

using namespace lora;
using S = bfloat16;
using bench::fill_random;
using bench::time_all;

namespace {

FILE* csv = stdout;

void emit(const char* name, Index T, int N, Index r, double ms, double extra = 0) {
  std::fprintf(csv, "%s,%ld,%d,%ld,%.5f,%.4f\n", name, static_cast<long>(T), N, static_cast<long>(r), ms, extra);
  std::fflush(csv);
}

}  // namespace

int main(int argc, char** argv) {
  // --profile: a few mixed batches only, for ncu (T, N) = (1, 1), (256, 64), (4096, 1), (256, 512),
  // each three forwards and three backwards (into kept gradients).
  // LORA_BENCH_SHAPES="T:N,T:N" limits the forward rows to those shapes (no naive loop).
  const bool profile = argc > 1 && std::string(argv[1]) == "--profile";
  const std::string only = std::getenv("LORA_BENCH_MULTI") ? std::getenv("LORA_BENCH_MULTI") : "";
  if (argc > 1 && !profile) csv = std::fopen(argv[1], "w");
  if (!csv) return 1;
  auto ctx = CudaContext::thread_default();
  cudaDeviceProp prop{};
  LORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "bench_multi: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  {  // registers and local memory of the kernels (spills would show as local bytes)
    using T = detail::device_t<S>;
    constexpr int V = 16 / sizeof(S), TT = multi::detail::sgmv_tile_tokens, RG = multi::detail::sgmv_rank_group,
                  ERG = multi::detail::sgmv_expand_rank_group;
    cudaFuncAttributes a{}, b{}, c{}, d{};
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&d, multi::detail::sgmv_expand_token_kernel<T, V>));
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&a, multi::detail::sgmv_shrink_kernel<T, V, TT, RG>));
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&b, multi::detail::sgmv_expand_kernel<T, V, TT, ERG>));
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&c, multi::detail::sgmv_shrink_mma_kernel<T>));
    std::fprintf(stderr,
                 "shrink: %d regs, %zu local bytes; tensor-core shrink: %d regs, %zu local bytes; expand: %d regs, "
                 "%zu local bytes; per-token expand: %d regs, %zu local bytes\n",
                 a.numRegs, a.localSizeBytes, c.numRegs, c.localSizeBytes, b.numRegs, b.localSizeBytes, d.numRegs,
                 d.localSizeBytes);
  }
  std::fprintf(csv, "name,tokens,adapters,r,ms,extra\n");
  std::vector<std::pair<Index, int>> shapes;  // LORA_BENCH_SHAPES: forward rows to run (all if empty)
  if (const char* e = std::getenv("LORA_BENCH_SHAPES")) {
    std::string v = e;
    for (std::size_t a = 0; a < v.size();) {
      std::size_t b = v.find(',', a);
      if (b == std::string::npos) b = v.size();
      const std::string item = v.substr(a, b - a);
      const std::size_t c = item.find(':');
      if (c != std::string::npos) shapes.push_back({std::stol(item.substr(0, c)), std::stoi(item.substr(c + 1))});
      a = b + 1;
    }
  }
  auto wanted = [&](Index T, int N) {
    return shapes.empty() || std::find(shapes.begin(), shapes.end(), std::pair<Index, int>{T, N}) != shapes.end();
  };
  const Index in = 4096, out = 4096, r = 16;
  const double alpha = 32.0;
  Generator g(4321);

  // Factors of the largest set, generated once; smaller sets use the first N.
  const int Nmax = 512;
  std::vector<Matrix<S>> As, Bs;
  for (int i = 0; i < Nmax; ++i) {
    As.push_back(bench::random_factor<S>(r, in, g));
    Bs.push_back(bench::random_factor<S>(out, r, g));
  }
  std::vector<DeviceMatrix<S>> W;
  for (int i = 0; i < 4; ++i) {
    W.emplace_back(out, in);
    fill_random(W.back().view(), g, 0.02);
  }
  // One adapter alone (the single-adapter baseline): adapter 0 of every set.
  LowRankAdapter<S> host0(in, out, r, alpha);
  host0.set_A(As[0]);
  host0.set_B(Bs[0]);
  auto single = LowRankAdapter<S, cuda>::from_host(host0, ctx);
  std::vector<FusedWeight<S>> fw;
  for (auto& w : W) fw.push_back(single.fuse(w.view()));

  if (profile) {
    for (auto [T, N] : {std::pair<Index, int>{1, 1}, {256, 64}, {4096, 1}, {256, 512}}) {
      multi::AdapterSet<S, cuda> set(in, out, ctx);
      for (int i = 0; i < N; ++i)
        set.add("a" + std::to_string(i), As[static_cast<std::size_t>(i)], Bs[static_cast<std::size_t>(i)], 2.0);
      std::vector<int> ids(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<int>(t % N);
      auto seg = set.segments(ids);
      DeviceMatrix<S> X(T, in), Y(T, out);
      fill_random(X.view(), g, 1.0);
      for (int i = 0; i < 3; ++i) set.apply(W[0].view(), X.view(), seg, Y.view());
      DeviceMatrix<S> dY(T, out);
      fill_random(dY.view(), g, 1.0);
      multi::DeviceBatchedGradients<S> kept;
      const DeviceView<const S> Wv = W[0].view();
      for (int i = 0; i < 3; ++i) set.backward(&Wv, X.view(), seg, dY.view(), kept);
      ctx->synchronize();
    }
    return 0;
  }
  for (int N : {1, 8, 64, 512}) {
    if (only == "bwd" || only == "nf4") break;
    bool any = false;
    for (Index T : {Index(1), Index(16), Index(256), Index(4096)}) any = any || wanted(T, N);
    if (!any) continue;
    multi::AdapterSet<S, cuda> set(in, out, ctx);
    std::vector<LowRankAdapter<S, cuda>> loop;  // the naive loop's adapters
    for (int i = 0; i < N; ++i) {
      set.add("a" + std::to_string(i), As[static_cast<std::size_t>(i)], Bs[static_cast<std::size_t>(i)],
              standard_scaling::factor(alpha, static_cast<int>(r)));
      if (!shapes.empty()) continue;  // no naive loop
      LowRankAdapter<S> h(in, out, r, alpha);
      h.set_A(As[static_cast<std::size_t>(i)]);
      h.set_B(Bs[static_cast<std::size_t>(i)]);
      loop.push_back(LowRankAdapter<S, cuda>::from_host(h, ctx));
    }
    for (Index T : {Index(1), Index(16), Index(256), Index(4096)}) {
      if (!wanted(T, N)) continue;
      const int sets = T <= 16 ? 4 : 1;
      // Tokens spread evenly over the N adapters, shuffled (a decode batch's worst case).
      std::vector<int> ids(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<int>(t % N);
      for (std::size_t i = ids.size(); i > 1; --i)
        std::swap(ids[i - 1], ids[static_cast<std::size_t>(g.uniform() * static_cast<double>(i))]);
      const auto h0 = std::chrono::steady_clock::now();
      auto seg = set.segments(ids);  // host grouping + upload, once per batch
      const double seg_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count();

      auto Xp = single.padded_input(T);
      fill_random(Xp.view(), g, 1.0);
      DeviceMatrix<S> X(T, in), Y(T, out);
      LORA_CUDA_CHECK(cudaMemcpy2D(X.data(), in * sizeof(S), Xp.data(), (in + r) * sizeof(S), in * sizeof(S), T,
                                   cudaMemcpyDeviceToDevice));
      // Naive loop: tokens sorted by adapter (contiguous rows, which favours the loop).
      std::vector<Index> cnt(static_cast<std::size_t>(N), 0);
      for (int id : ids) ++cnt[static_cast<std::size_t>(id)];

      std::vector<std::string> names = {"base_gemm",   "single_fused",         "single_plain",
                                        "mixed_serial", "mixed_overlap",       "mixed_delta",
                                        "sgmv_only",   "mixed_overlap_simt",   "mixed_overlap_tile",
                                        "mixed_overlap_chunk"};
      std::vector<std::function<void(int)>> fns = {
          [&](int i) {
            detail::gemm<S, S, S>(*ctx, false, true, T, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
          },
          [&](int i) { single.apply(fw[i % sets], Xp.view(), Y.view()); },
          [&](int i) { single.apply(W[i % sets].view(), X.view(), Y.view()); },
          [&](int i) {
            set.tensor_core_shrink = true;
            set.schedule = multi::SgmvSchedule::serial;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
          },
          [&](int i) {
            set.schedule = multi::SgmvSchedule::overlap;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
          },
          [&](int i) {
            set.schedule = multi::SgmvSchedule::delta;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
          },
          // the shrink and expand alone (Y += the adapters' rows), and overlap with the
          // CUDA-core shrink (the tensor-core one's baseline)
          [&](int) { set.add_forward(X.view(), seg, Y.view()); },
          [&](int i) {
            set.tensor_core_shrink = false;
            set.schedule = multi::SgmvSchedule::overlap;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
            set.tensor_core_shrink = true;
          },
          // overlap with the expand of one thread per 8 columns of a whole tile
          [&](int i) {
            set.schedule = multi::SgmvSchedule::overlap;
            set.expand_kernel = multi::SgmvExpand::per_tile;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
            set.expand_kernel = multi::SgmvExpand::per_token;
          },
          // overlap with the per-chunk expand (16 positions of one segment per block: Bᵀ from L2 once per chunk)
          [&](int i) {
            set.schedule = multi::SgmvSchedule::overlap;
            set.expand_kernel = multi::SgmvExpand::per_chunk;
            set.apply(W[i % sets].view(), X.view(), seg, Y.view());
            set.expand_kernel = multi::SgmvExpand::per_token;
          }};
      // The naive loop is timed on its own: thousands of small launches in the
      // alternation disturbed the other variants' clocks (T 256, 64 adapters).
      std::function<void(int)> naive = [&](int i) {
            Index b = 0;
            for (int a = 0; a < N; ++a) {
              const Index n = cnt[static_cast<std::size_t>(a)];
              if (n == 0) continue;
              loop[static_cast<std::size_t>(a)].apply(W[i % sets].view(), DeviceView<const S>(X.view()).row_block(b, n),
                                                      Y.view().row_block(b, n));
              b += n;
            }
          };
      auto ms = time_all(*ctx, fns, 10, 15);
      const bool slow = N >= 64 && T >= 256;  // the naive loop launches thousands of kernels
      ms.push_back(shapes.empty() ? time_all(*ctx, {naive}, slow ? 3 : 10, slow ? 7 : 15)[0] : 0.0);
      names.push_back("naive_loop");
      for (std::size_t f = 0; f < names.size(); ++f) emit(names[f].c_str(), T, N, r, ms[f]);
      emit("segments_host_us", T, N, r, 0.0, seg_us);
      std::fprintf(stderr,
                   "T %5ld N %3d: base %.4f single %.4f mixed %.4f / %.4f / %.4f (%.2fx single; overlap with the "
                   "CUDA-core shrink %.4f; per-tile expand %.4f; per-chunk expand %.4f; shrink + expand alone %.4f) "
                   "naive %.4f ms\n",
                   static_cast<long>(T), N, ms[0], ms[1], ms[3], ms[4], ms[5], std::min({ms[3], ms[4], ms[5]}) / ms[1],
                   ms[7], ms[8], ms[9], ms[6], ms[10]);
    }
  }
  // Backward (W frozen): AdapterSet<S, cuda>::backward over a mixed batch against one adapter's
  // LowRankAdapter::backward over the same T, and the input-gradient GEMM dY·W alone.
  // bwd_single / bwd_mixed: the returning forms, which allocate their outputs per call
  // (cudaMalloc, and cudaFree, which synchronises); bwd_single_fused / bwd_mixed_reuse: the
  // allocation-free forms (the fused single-adapter backward into caller buffers; the set's
  // backward into a DeviceBatchedGradients kept across calls).
  for (int N : {8, 64, 512}) {
    if (only == "fwd" || only == "nf4") break;
    multi::AdapterSet<S, cuda> set(in, out, ctx);
    for (int i = 0; i < N; ++i)
      set.add("a" + std::to_string(i), As[static_cast<std::size_t>(i)], Bs[static_cast<std::size_t>(i)],
              standard_scaling::factor(alpha, static_cast<int>(r)));
    for (Index T : {Index(16), Index(256), Index(4096)}) {
      std::vector<int> ids(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<int>(t % N);
      for (std::size_t i = ids.size(); i > 1; --i)
        std::swap(ids[i - 1], ids[static_cast<std::size_t>(g.uniform() * static_cast<double>(i))]);
      auto seg = set.segments(ids);
      DeviceMatrix<S> X(T, in), dY(T, out), dX(T, in);
      fill_random(X.view(), g, 1.0);
      fill_random(dY.view(), g, 1.0);
      auto Xp = single.padded_input(T), dYp = single.padded_grad(T);
      fill_random(Xp.view(), g, 1.0);
      fill_random(dYp.view(), g, 1.0);
      DeviceMatrix<float> dA(r, in), dB(out, r);
      multi::DeviceBatchedGradients<S> kept;
      const DeviceView<const S> Wv = W[0].view();
      std::vector<std::function<void(int)>> fns = {
          [&](int) {
            detail::gemm<S, S, S>(*ctx, false, false, T, in, out, 1.f, dY.view(), W[0].view(), 0.f, dX.view());
          },
          [&](int) { (void)single.backward(W[0].view(), X.view(), dY.view()); },
          [&](int) { (void)set.backward(&Wv, X.view(), seg, dY.view()); },
          [&](int) { single.backward(fw[0], Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view()); },
          [&](int) { set.backward(&Wv, X.view(), seg, dY.view(), kept); },
          [&](int) {  // everything on one stream
            set.backward_overlap = false;
            set.backward(&Wv, X.view(), seg, dY.view(), kept);
            set.backward_overlap = true;
          },
          [&](int) { set.backward(nullptr, X.view(), seg, dY.view(), kept); },  // adapter paths only
          [&](int) {  // gb·A placed the other way (beside the GEMM below 2048 tokens, after it above)
            const Index keep = set.backward_delta_tokens;
            set.backward_delta_tokens = T >= keep ? Index(1) << 40 : 0;
            set.backward(&Wv, X.view(), seg, dY.view(), kept);
            set.backward_delta_tokens = keep;
          }};
      const auto ms = time_all(*ctx, fns, 5, 11);
      emit("bwd_base_dx", T, N, r, ms[0]);
      emit("bwd_single", T, N, r, ms[1]);
      emit("bwd_mixed", T, N, r, ms[2]);
      emit("bwd_single_fused", T, N, r, ms[3]);
      emit("bwd_mixed_reuse", T, N, r, ms[4]);
      emit("bwd_mixed_reuse_serial", T, N, r, ms[5]);
      emit("bwd_mixed_paths_only", T, N, r, ms[6]);
      emit("bwd_mixed_reuse_other_placement", T, N, r, ms[7]);
      std::fprintf(stderr,
                   "backward T %5ld N %3d: dX GEMM %.4f | allocating: single %.4f mixed %.4f (%.2fx) | "
                   "allocation-free: single fused %.4f mixed %.4f (%.2fx; one stream %.4f; no W %.4f; gb.A %s "
                   "%.4f) ms\n",
                   static_cast<long>(T), N, ms[0], ms[1], ms[2], ms[2] / ms[1], ms[3], ms[4], ms[4] / ms[3], ms[5],
                   ms[6], T >= set.backward_delta_tokens ? "after GEMM" : "beside GEMM", ms[7]);
    }
  }
  // Mixed batches over an NF4 base (issue 23: ≤ 1.15× the NF4 product alone): quant::nf4_matmul
  // against AdapterSet<S, cuda>::apply(Nf4Tensor<cuda>, …) (serial and overlap schedules) over the
  // same X. Decode sizes rotate among 16 NF4 copies of W (150 MB, beyond the 60 MB L2).
  if (only.empty() || only == "nf4") {
    const int qsets = 16;
    std::vector<quant::Nf4Tensor<cuda>> Wq;
    {
      DeviceMatrix<S> Wtmp(out, in);
      for (int i = 0; i < qsets; ++i) {
        fill_random(Wtmp.view(), g, 0.02);
        Wq.push_back(quant::Nf4Tensor<cuda>::quantize<S>(Wtmp.view(), {64, false}, ctx));
      }
    }
    for (int N : {1, 8, 64}) {
      multi::AdapterSet<S, cuda> set(in, out, ctx);
      for (int i = 0; i < N; ++i)
        set.add("a" + std::to_string(i), As[static_cast<std::size_t>(i)], Bs[static_cast<std::size_t>(i)],
                standard_scaling::factor(alpha, static_cast<int>(r)));
      for (Index T : {Index(1), Index(4), Index(16), Index(256), Index(4096)}) {
        if (T == 1 && N > 1) continue;
        const int sets = T <= 16 ? qsets : 1;
        std::vector<int> ids(static_cast<std::size_t>(T));
        for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<int>(t % N);
        for (std::size_t i = ids.size(); i > 1; --i)
          std::swap(ids[i - 1], ids[static_cast<std::size_t>(g.uniform() * static_cast<double>(i))]);
        auto seg = set.segments(ids);
        DeviceMatrix<S> X(T, in), Y(T, out);
        fill_random(X.view(), g, 1.0);
        const std::vector<std::function<void(int)>> fns = {
            [&](int i) { quant::nf4_matmul<S>(Wq[static_cast<std::size_t>(i % sets)], X.view(), Y.view()); },
            [&](int i) {
              set.schedule = multi::SgmvSchedule::serial;
              set.apply(Wq[static_cast<std::size_t>(i % sets)], X.view(), seg, Y.view());
            },
            [&](int i) {
              set.schedule = multi::SgmvSchedule::overlap;
              set.apply(Wq[static_cast<std::size_t>(i % sets)], X.view(), seg, Y.view());
            }};
        const auto ms = time_all(*ctx, fns, 10, 15);
        emit("nf4_base", T, N, r, ms[0]);
        emit("nf4_mixed_serial", T, N, r, ms[1]);
        emit("nf4_mixed_overlap", T, N, r, ms[2]);
        std::fprintf(stderr, "nf4 T %5ld N %3d: NF4 product %.4f mixed serial %.4f overlap %.4f ms (%.2fx)\n",
                     static_cast<long>(T), N, ms[0], ms[1], ms[2], std::min(ms[1], ms[2]) / ms[0]);
      }
    }
  }
  if (csv != stdout) std::fclose(csv);
  return 0;
}
