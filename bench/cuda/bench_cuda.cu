// bench_cuda [out.csv]: the device paths against the base cuBLAS GEMM and the
// copy bandwidth, bf16, CUDA events, median of batches. Weights rotate among
// several copies where one copy would sit in L2 (decode shapes), so that
// every variant reads them from device memory. Prints one CSV line per
// measurement: name,in,out,tokens,r,ms,extra.

#include <lora/cuda.hpp>

#include "common.cuh"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

using namespace lora;
using S = bfloat16;
using bench::fill_random;
using bench::time_ms;
using bench::time_pair;

namespace {

FILE* csv = stdout;

/// The planner's choice for one fused shape, in words.
std::string describe(const std::optional<detail::PlanChoice>& c, bool forward) {
  if (!c) return "not planned";
  static const char* paths[] = {"accumulate", "concat_k", "stacked", "stacked (N out + rp)", "decode kernels",
                                "stream",     "stream (32-row tiles)", "ring", "ring (XA per cluster)"};
  std::string s = forward ? std::string(paths[c->path]) + ", " : std::string();
  s += c->algo < 0 ? std::string("cublasGemmEx") : "cuBLASLt algorithm " + std::to_string(c->algo);
  if (c->lt) s += " (of " + std::to_string(c->lt->candidates()) + " cuBLASLt candidates)";
  return s;
}

void emit(const char* name, Index in, Index out, Index T, Index r, double ms, double extra = 0) {
  std::fprintf(csv, "%s,%ld,%ld,%ld,%ld,%.5f,%.4f\n", name, static_cast<long>(in), static_cast<long>(out),
               static_cast<long>(T), static_cast<long>(r), ms, extra);
  std::fflush(csv);
}

/// One adapter (random A, B; alpha = 2r) and `sets` random weights fused with it: the rotating
/// weight copies every timed forward walks through.
struct FusedSets {
  LowRankAdapter<S> host;
  LowRankAdapter<S, cuda> ad;
  std::vector<DeviceMatrix<S>> W;
  std::vector<FusedWeight<S>> fw;
};
FusedSets fused_sets(std::shared_ptr<CudaContext> ctx, Index in, Index out, Index r, int sets, Generator& g) {
  LowRankAdapter<S> host(in, out, r, 2.0 * r);
  host.set_A(bench::random_factor<S>(r, in, g));
  host.set_B(bench::random_factor<S>(out, r, g));
  auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
  std::vector<DeviceMatrix<S>> W;
  std::vector<FusedWeight<S>> fw;
  for (int i = 0; i < sets; ++i) {
    W.emplace_back(out, in);
    fill_random(W.back().view(), g, 0.02);
    fw.push_back(ad.fuse(W.back().view()));
  }
  return {std::move(host), std::move(ad), std::move(W), std::move(fw)};
}

void bench_lora(CudaContext& ctx_ref, std::shared_ptr<CudaContext> ctx, Index in, Index out, Index T, Index r,
                Generator& g, bool dora) {
  const int sets = T <= 16 ? 4 : 1;  // decode: 4 weight copies (> L2) so weights come from HBM
  FusedSets ws = fused_sets(ctx, in, out, r, sets, g);
  auto& host = ws.host;
  auto& ad = ws.ad;
  auto& W = ws.W;
  auto& fw = ws.fw;
  const detail::FusedLayout<S> L0 = detail::fused_layout(fw[0]);  // the first set's views, for the parts
  auto Xp = ad.padded_input(T);
  fill_random(Xp.view(), g, 1.0);
  auto dYp = ad.padded_grad(T);
  fill_random(dYp.view(), g, 1.0);
  DeviceMatrix<S> Y(T, out), dX(T, in);
  DeviceMatrix<float> dA(r, in), dB(out, r);
  DeviceView<const S> X = DeviceView<const S>(Xp.view()).col_block(0, in);
  DeviceView<const S> dY = DeviceView<const S>(dYp.view()).col_block(0, out);

  // The baseline reads contiguous X and dY (as torch's F.linear would).
  DeviceMatrix<S> Xc(T, in), dYc(T, out);
  LORA_CUDA_CHECK(cudaMemcpy2D(Xc.data(), in * sizeof(S), X.data, X.ld * sizeof(S), in * sizeof(S), T,
                               cudaMemcpyDeviceToDevice));
  LORA_CUDA_CHECK(cudaMemcpy2D(dYc.data(), out * sizeof(S), dY.data, dY.ld * sizeof(S), out * sizeof(S), T,
                               cudaMemcpyDeviceToDevice));
  auto base = [&](int i) {
    detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in, 1.f, Xc.view(), W[i % sets].view(), 0.f, Y.view());
  };
  auto base_dx = [&](int i) {
    detail::gemm<S, S, S>(ctx_ref, false, false, T, in, out, 1.f, dYc.view(), W[i % sets].view(), 0.f, dX.view());
  };
  if (!dora) {
    auto [tb, tf] = time_pair(ctx_ref, base, [&](int i) { ad.apply(fw[i % sets], Xp.view(), Y.view()); });
    emit("base_gemm", in, out, T, r, tb);
    emit("ours_fused_fwd", in, out, T, r, tf);
    std::fprintf(stderr, "T %ld in %ld out %ld r %ld: fused forward %s\n", static_cast<long>(T), static_cast<long>(in),
                 static_cast<long>(out), static_cast<long>(r),
                 describe(ctx_ref.planner().find(detail::fused_forward_key<S>(fw[0], Xp.view(), Y.view())), true)
                     .c_str());
    if (T >= 4096) {  // where the fused forward's time goes
      emit("part_base_strided_x", in, out, T, r, time_ms(ctx_ref, [&](int) {
             detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in, 1.f, X, W[0].view(), 0.f, Y.view());
           }));
      emit("part_xa_cublas", in, out, T, r, time_ms(ctx_ref, [&](int) {
             detail::gemm<S, S, S>(ctx_ref, false, true, T, L0.rp(), in, 0.5f, X, L0.A_padded(), 0.f,
                                   Xp.view().col_block(in, L0.rp()));
           }));
      emit("part_wide_gemm", in, out, T, r, time_ms(ctx_ref, [&](int) {
             detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in + L0.rp(), 1.f,
                                   DeviceView<const S>(Xp.view()), L0.wide(), 0.f, Y.view());
           }));
      for (auto [name, how] : {std::pair{"part_fwd_concat_k", FusedForward::concat_k},
                               std::pair{"part_fwd_accumulate", FusedForward::accumulate}}) {
        FusedWeight<S>& f0 = fw[0];
        const FusedForward keep = f0.strategy();
        f0.set_strategy(how);
        emit(name, in, out, T, r, time_ms(ctx_ref, [&](int) { ad.apply(f0, Xp.view(), Y.view()); }));
        f0.set_strategy(keep);
      }
    }
    emit("ours_plain_fwd", in, out, T, r,
         time_ms(ctx_ref, [&](int i) { ad.apply(W[i % sets].view(), Xc.view(), Y.view()); }));
    auto [tbb, tfb] = time_pair(
        ctx_ref,
        [&](int i) {
          base(i);
          base_dx(i);
        },
        [&](int i) {
          ad.apply(fw[i % sets], Xp.view(), Y.view());
          ad.backward(fw[i % sets], Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
        });
    emit("base_fwd_bwd", in, out, T, r, tbb);
    emit("ours_fwd_bwd", in, out, T, r, tfb);
    std::fprintf(stderr, "T %ld in %ld out %ld r %ld: dX GEMM %s\n", static_cast<long>(T), static_cast<long>(in),
                 static_cast<long>(out), static_cast<long>(r),
                 describe(ctx_ref.planner().find(detail::fused_backward_key<S>(fw[0], dYp.view(), L0.rp(), dX.view())),
                          false)
                     .c_str());
    if (T >= 4096) {  // the backward alone: dY padded to out + rp (padded_grad) or out + r
      DeviceMatrix<S> dYr(T, out + r);
      LORA_CUDA_CHECK(cudaMemcpy2D(dYr.data(), (out + r) * sizeof(S), dYc.data(), out * sizeof(S), out * sizeof(S), T,
                                   cudaMemcpyDeviceToDevice));
      const auto t = bench::time_all(
          ctx_ref,
          {base_dx,
           [&](int i) { ad.backward(fw[i % sets], Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view()); },
           [&](int i) { ad.backward(fw[i % sets], Xp.view(), dYr.view(), dX.view(), dA.view(), dB.view()); }},
          10, 15, 3);
      emit("part_base_dx", in, out, T, r, t[0]);
      emit("part_bwd_pad_rp", in, out, T, r, t[1]);
      emit("part_bwd_pad_r", in, out, T, r, t[2]);
      // s·dY·B and dYᵀ·XA: two cuBLAS GEMMs (each reads dY) against the one pass over dY
      // (detail::dy_pass) at its default grid and at 1 and 4 blocks per SM.
      const detail::FusedLayout<S>& f0 = L0;
      DeviceView<const S> XA = DeviceView<const S>(Xp.view()).col_block(in, f0.rp());
      DeviceView<S> Gp = dYp.view().col_block(out, f0.rp());
      if (detail::dy_pass_ok<S>(dY, f0.B_padded(), XA, r, f0.rp())) {
        DeviceBuffer<float> scratch;
        int sms = 0;
        LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
        auto pass = [&](int blocks) {
          return [&, blocks](int) {
            detail::dy_pass(ctx_ref, detail::as_device(dY), detail::as_device(f0.B_padded()), detail::as_device(XA),
                            r, 0.5f, detail::as_device(Gp), dB.view(), scratch, blocks);
          };
        };
        auto phase = [&](int ph) {
          return [&, ph](int) {
            detail::launch_dy_pass<detail::device_t<S>, 2>(ctx_ref.stream(), detail::as_device(dY),
                                                           detail::as_device(f0.B_padded()), detail::as_device(XA),
                                                           r, 0.5f, detail::as_device(Gp), dB.view(), scratch, 0, ph);
          };
        };
        auto staged = [&]<int ST>(std::integral_constant<int, ST>) {
          return [&](int) {
            detail::launch_dy_pass<detail::device_t<S>, 2, ST>(
                ctx_ref.stream(), detail::as_device(dY), detail::as_device(f0.B_padded()), detail::as_device(XA), r,
                0.5f, detail::as_device(Gp), dB.view(), scratch, 0);
          };
        };
        const auto u = bench::time_all(
            ctx_ref,
            {[&](int) {
               detail::gemm<S, S, S>(ctx_ref, false, false, T, f0.rp(), out, 0.5f, dY, f0.B_padded(), 0.f, Gp);
               detail::gemm<S, S, float>(ctx_ref, true, false, out, r, T, 1.f, dY, XA.col_block(0, r), 0.f,
                                         dB.view());
             },
             pass(0), pass(sms), pass(4 * sms), staged(std::integral_constant<int, 4>{}),
             staged(std::integral_constant<int, 6>{}), phase(1), phase(2)},
            10, 15, 3);
        emit("part_dy_two_gemms", in, out, T, r, u[0]);
        emit("part_dy_pass", in, out, T, r, u[1], 2.0 * T * out / u[1] / 1e6);
        emit("part_dy_pass_1sm", in, out, T, r, u[2], 2.0 * T * out / u[2] / 1e6);
        emit("part_dy_pass_4sm", in, out, T, r, u[3], 2.0 * T * out / u[3] / 1e6);
        if (r <= 16) {
          emit("part_dy_pass_st4", in, out, T, r, u[4], 2.0 * T * out / u[4] / 1e6);
          emit("part_dy_pass_st6", in, out, T, r, u[5], 2.0 * T * out / u[5] / 1e6);
          emit("part_dy_partials", in, out, T, r, u[6], 2.0 * T * out / u[6] / 1e6);
          emit("part_dy_reduce", in, out, T, r, u[7]);
        }
      }
    }
  } else {
    DeviceMatrix<float> m(1, out);
    {
      Matrix<float> h(1, out);
      for (Index n = 0; n < out; ++n) h(0, n) = static_cast<float>(g.uniform(0.5, 1.5));
      m.upload(h);
    }
    // One DoraAdapter<S, cuda> per weight set (each keeps the buffers of its fused path).
    std::vector<DoraAdapter<S, cuda>> dora;
    const Matrix<float> mh = m.to_host();
    for (int i = 0; i < sets; ++i)
      dora.emplace_back(LowRankAdapter<S, cuda>::from_host(host, ctx), DeviceMatrix<float>::from_host(mh));
    auto [tb, td] = time_pair(ctx_ref, base, [&](int i) { dora[i % sets].apply(fw[i % sets], Xp.view(), Y.view()); });
    emit("base_gemm", in, out, T, r, tb);
    emit("ours_dora_fwd", in, out, T, r, td);
    std::vector<detail::DoraWorkspace<S>> ws(1);  // the per-part timings below run the internals
    {  // inference with frozen A, B, m: the column scale kept from the first call (cache_norm)
      for (auto& d : dora) d.cache_norm(true);
      auto [tb2, tc] = time_pair(ctx_ref, base, [&](int i) { dora[i % sets].apply(fw[i % sets], Xp.view(), Y.view()); });
      emit("base_gemm_dora_cached", in, out, T, r, tb2);
      emit("ours_dora_fwd_cached", in, out, T, r, tc);
      std::fprintf(stderr, "DoRA T %ld: %.4f ms = %.2fx base per call; cached norm %.4f ms = %.2fx base\n",
                   static_cast<long>(T), td, td / tb, tc, tc / tb2);
    }
    if (T >= 4096) {  // where the DoRA forward's time goes (each timed on its own)
      const float* mp = m.data();
      detail::DoraWorkspace<S>& w0 = ws[0];
      int sms = 0;
      LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
      auto pg_blocks = [&](int blocks) {  // the tensor-core pass's partial sums at another grid size
        return [&, blocks](int) {
          detail::norm_gemm(ctx_ref, detail::as_device(L0.tall()), detail::as_device(L0.A()), r, w0.PG.view(),
                            w0.pg_partials, blocks, 1);
        };
      };
      const auto t = bench::time_all(
          ctx_ref,
          {[&](int) { detail::dora_weight_norm(ad, fw[0], w0, mp); }, [&](int) { detail::dora_build_scaled(ad, fw[0], w0); },
           [&](int) { ad.apply(w0.scaled, Xp.view(), Y.view()); }, [&](int) { ad.apply(fw[0], Xp.view(), Y.view()); },
           [&](int) { detail::dora_apply(ad, fw[0], DeviceView<const float>(m.view()), Xp.view(), Y.view(), w0); },
           // PG = [W; A]·Aᵀ alone: cuBLAS (the fallback) and the tensor-core pass (detail::norm_gemm),
           // then its partial sums and its reduction apart.
           [&](int) {
             detail::gemm<S, S, float>(ctx_ref, false, true, out + r, r, in, 1.f, L0.tall(), L0.A(), 0.f,
                                       w0.PG.view());
           },
           [&](int) {
             detail::norm_gemm(ctx_ref, detail::as_device(L0.tall()), detail::as_device(L0.A()), r,
                               w0.PG.view(), w0.pg_partials);
           },
           [&](int) {
             detail::norm_gemm(ctx_ref, detail::as_device(L0.tall()), detail::as_device(L0.A()), r,
                               w0.PG.view(), w0.pg_partials, 0, 1);
           },
           [&](int) {
             detail::norm_gemm(ctx_ref, detail::as_device(L0.tall()), detail::as_device(L0.A()), r,
                               w0.PG.view(), w0.pg_partials, 0, 2);
           },
           pg_blocks(sms), pg_blocks(4 * sms)},
          10, 15, 3);
      const double pg_bytes = static_cast<double>(out + r) * in * sizeof(S);
      emit("part_dora_norm", in, out, T, r, t[0]);
      emit("part_dora_pg_cublas", in, out, T, r, t[5], pg_bytes / t[5] / 1e6);
      emit("part_dora_pg_tc", in, out, T, r, t[6], pg_bytes / t[6] / 1e6);
      emit("part_dora_pg_tc_partials", in, out, T, r, t[7], pg_bytes / t[7] / 1e6);
      emit("part_dora_pg_tc_reduce", in, out, T, r, t[8]);
      emit("part_dora_pg_tc_partials_1sm", in, out, T, r, t[9], pg_bytes / t[9] / 1e6);
      emit("part_dora_pg_tc_partials_4sm", in, out, T, r, t[10], pg_bytes / t[10] / 1e6);
      emit("part_dora_scale_w", in, out, T, r, t[1]);
      emit("part_dora_apply_scaled", in, out, T, r, t[2]);
      emit("part_lora_apply", in, out, T, r, t[3]);
      emit("part_dora_fwd_one_set", in, out, T, r, t[4]);
      std::fprintf(stderr, "DoRA T %ld: scaled block's forward %s\n", static_cast<long>(T),
                   describe(ctx_ref.planner().find(detail::fused_forward_key<S>(w0.scaled, Xp.view(), Y.view())), true)
                       .c_str());
    }
  }
}

/// DoRA at decode sizes (issue 23), per call as PEFT runs it (norm recomputed every call): the
/// one-pass forward (DoraDecode::one_pass, fused and plain) and the norm pass + LoRA forward
/// (two_pass) against the base GEMM, one rotating set; weights rotate among copies beyond 3× L2.
void bench_dora_decode(CudaContext& ctx_ref, std::shared_ptr<CudaContext> ctx, Index in, Index out, Index T, Index r,
                       Generator& g) {
  int l2 = 0;
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  const int sets = std::max(4, static_cast<int>(3.0 * l2 / (static_cast<double>(out) * in * sizeof(S))) + 1);
  LowRankAdapter<S> host(in, out, r, 2.0 * r);
  host.set_A(bench::random_factor<S>(r, in, g));
  host.set_B(bench::random_factor<S>(out, r, g));
  Matrix<float> mh(out, 1);
  for (Index n = 0; n < out; ++n) mh(n, 0) = static_cast<float>(g.uniform(0.5, 1.5));
  std::vector<DeviceMatrix<S>> W;
  std::vector<DoraAdapter<S, cuda>> dora;  // one per weight set: the two-pass path keeps ‖w_n‖² per adapter
  std::vector<FusedWeight<S>> fw;
  for (int i = 0; i < sets; ++i) {
    W.emplace_back(out, in);
    fill_random(W.back().view(), g, 0.02);
    dora.emplace_back(LowRankAdapter<S, cuda>::from_host(host, ctx), DeviceMatrix<float>::from_host(mh));
    fw.push_back(dora.back().fuse(W.back().view()));
  }
  auto Xp = dora[0].padded_input(T);
  fill_random(Xp.view(), g, 1.0);
  DeviceMatrix<S> Y(T, out), Xc(T, in);
  LORA_CUDA_CHECK(cudaMemcpy2D(Xc.data(), in * sizeof(S), Xp.data(), Xp.view().ld * sizeof(S), in * sizeof(S), T,
                               cudaMemcpyDeviceToDevice));
  auto base = [&](int i) {
    detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in, 1.f, Xc.view(), W[i % sets].view(), 0.f, Y.view());
  };
  auto fused = [&](DoraDecode how) {
    return [&, how](int i) {
      dora[i % sets].decode_path(how);
      dora[i % sets].apply(fw[i % sets], Xp.view(), Y.view());
    };
  };
  const bool one = r + T <= 32;
  DeviceMatrix<float> mag = DeviceMatrix<float>::from_host(mh), nrm(out, 1), cs(out, 1);
  DeviceBuffer<float> part, sq;
  std::vector<std::function<void(int)>> fns = {base, fused(DoraDecode::two_pass),
                                               [&](int i) { dora[i % sets].lora().apply(fw[i % sets], Xp.view(), Y.view()); }};
  if (one) {
    fns.push_back(fused(DoraDecode::one_pass));
    fns.push_back([&](int i) {
      dora[i % sets].decode_path(DoraDecode::one_pass);
      dora[i % sets].apply(W[i % sets].view(), Xc.view(), Y.view());
    });
    fns.push_back([&](int i) {  // the pass launched plainly (no programmatic launch, no L2 prefetch)
      using T = detail::device_t<S>;
      const detail::FusedLayout<S> f = detail::fused_layout(fw[i % sets]);
      detail::dora_pass<T>(ctx_ref, detail::as_device(f.W()), detail::as_device(f.A()),
                           detail::as_device(DeviceView<const S>(Xp.view()).col_block(0, in)), r,
                           reinterpret_cast<const T*>(f.B().data), f.B().ld, 1.f, mag.data(), nrm.data(), cs.data(),
                           detail::as_device(Y.view()), part, sq, 0, detail::DoraPassOptions{false, true, 1});
    });
    for (int rpw : {2, -1}) {  // the epilogue with 2 output rows per warp (1 by default); -1: K-outer tiles
      fns.push_back([&, rpw](int i) {
        using T = detail::device_t<S>;
        const detail::FusedLayout<S> f = detail::fused_layout(fw[i % sets]);
        detail::dora_pass<T>(ctx_ref, detail::as_device(f.W()), detail::as_device(f.A()),
                             detail::as_device(DeviceView<const S>(Xp.view()).col_block(0, in)), r,
                             reinterpret_cast<const T*>(f.B().data), f.B().ld, 1.f, mag.data(), nrm.data(), cs.data(),
                             detail::as_device(Y.view()), part, sq, 0,
                             detail::DoraPassOptions{true, rpw > 0, rpw < 0 ? 1 : rpw});
      });
    }
  }
  const auto t = bench::time_all(ctx_ref, fns, 10, 15, 3);
  emit("base_gemm_dora_decode", in, out, T, r, t[0]);
  emit("ours_dora_two_pass", in, out, T, r, t[1]);
  emit("ours_lora_fused_fwd", in, out, T, r, t[2]);
  if (one) {
    emit("ours_dora_one_pass", in, out, T, r, t[3]);
    emit("ours_dora_one_pass_plain", in, out, T, r, t[4]);
    emit("ours_dora_one_pass_no_pdl", in, out, T, r, t[5]);
    emit("ours_dora_one_pass_epi2", in, out, T, r, t[6]);
    emit("ours_dora_one_pass_k_outer", in, out, T, r, t[7]);
  }
  std::fprintf(stderr, "DoRA %ldx%ld r %ld T %2ld (%d sets): base %6.2f us | two-pass %6.2f (%.2fx) | one-pass %6.2f (%.2fx), plain %6.2f, no PDL %6.2f, epilogue 2 rows/warp %6.2f, K-outer %6.2f | LoRA %6.2f\n",
               static_cast<long>(in), static_cast<long>(out), static_cast<long>(r), static_cast<long>(T), sets,
               t[0] * 1e3, t[1] * 1e3, t[1] / t[0], one ? t[3] * 1e3 : 0.0, one ? t[3] / t[0] : 0.0,
               one ? t[4] * 1e3 : 0.0, one ? t[5] * 1e3 : 0.0, one ? t[6] * 1e3 : 0.0,
               one ? t[7] * 1e3 : 0.0, t[2] * 1e3);
}

/// A model's kernel before a projection: writes the projection's input X (`rows` × `cols`
/// 16-bit values, dst ← src), as a norm would; a plain launch, so a programmatic dependent
/// launch after it starts only as its blocks exit.
__global__ void produce_x_kernel(const unsigned short* __restrict__ src, long lds, unsigned short* __restrict__ dst,
                                 long ldd, int rows, int cols) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < static_cast<long>(rows) * cols;
       i += static_cast<long>(gridDim.x) * blockDim.x)
    dst[(i / cols) * ldd + i % cols] = src[(i / cols) * lds + i % cols];
}

/// The decode regime (issue 23): the fused forward against the base GEMM for each token count
/// in `tokens` (2…128), and each strategy forced (stacked, concat_k and accumulate after XA, the
/// one-launch stream kernel for ≤ 32 tokens), all timed in one rotating set per token count, with
/// the parts of the stacked path (its GEMM; its epilogue, vectorised and scalar), s·X·Aᵀ and the
/// concat_k GEMM. Weights rotate among copies that together exceed 3× L2; the same X for all.
/// For ≤ 16 tokens also the planner's own measure of its choice, ring and stacked (one call
/// after an L2 eviction), and base, ours, ring and stacked each after a kernel that writes X, as
/// in a model (back to back, a ring call's start overlaps the previous ring call's end).
void bench_decode(CudaContext& ctx_ref, std::shared_ptr<CudaContext> ctx, Index in, Index out,
                  const std::vector<Index>& tokens, Index r, Generator& g) {
  int l2 = 0;
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  const double wbytes = static_cast<double>(out + 64) * (in + 64) * sizeof(S);
  const int sets = std::max(4, static_cast<int>(3.0 * l2 / wbytes) + 1);
  FusedSets ws = fused_sets(ctx, in, out, r, sets, g);
  auto& host = ws.host;
  auto& ad = ws.ad;
  auto& W = ws.W;
  auto& fw = ws.fw;
  const Index rp = fused_rank_pad(r);
  for (const Index T : tokens) {
    auto Xp = ad.padded_input(T);
    fill_random(Xp.view(), g, 1.0);
    DeviceMatrix<S> Y(T, out), Xc(T, in);
    LORA_CUDA_CHECK(cudaMemcpy2D(Xc.data(), in * sizeof(S), Xp.data(), Xp.cols() * sizeof(S), in * sizeof(S), T,
                                 cudaMemcpyDeviceToDevice));
    ad.plan(fw[0], T);
    auto forced = [&](FusedForward how) {
      return [&, how](int i) {
        FusedWeight<S>& f = fw[static_cast<std::size_t>(i % sets)];
        f.set_strategy(how);
        ad.apply(f, Xp.view(), Y.view());
        f.set_strategy(FusedForward::automatic);
      };
    };
    const DeviceView<const S> X = DeviceView<const S>(Xp.view()).col_block(0, in);
    // The stacked product's scratch (planned above) for the parts.
    const DeviceView<S> C{reinterpret_cast<S*>(ctx_ref.planner().stacked.data()), T, out + r, out + rp};
    const bool have_c = ctx_ref.planner().stacked.size() >= static_cast<std::size_t>(T * (out + rp)) * sizeof(S);
    std::vector<std::pair<const char*, std::function<void(int)>>> fns = {
        {"dec_base",
         [&](int i) {
           detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in, 1.f, Xc.view(), W[i % sets].view(), 0.f,
                                 Y.view());
         }},
        {"dec_ours", [&](int i) { ad.apply(fw[i % sets], Xp.view(), Y.view()); }},
        {"dec_stacked", forced(FusedForward::stacked)},
        {"dec_concat_gemmex",
         [&](int i) {  // concat_k without the decode kernels: XA, then one cublasGemmEx over K = in + rp
           const detail::FusedLayout<S> f = detail::fused_layout(fw[static_cast<std::size_t>(i % sets)]);
           detail::compute_xa<S>(ctx_ref, X, f.A_padded(), false, Xp.view().col_block(in, rp), 0.5f);
           detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in + rp, 1.f, DeviceView<const S>(Xp.view()), f.wide(),
                                 0.f, Y.view());
         }},
        {"dec_accumulate", forced(FusedForward::accumulate)},
        {"dec_part_xa",
         [&](int i) {
           detail::compute_xa<S>(ctx_ref, X, detail::fused_layout(fw[i % sets]).A_padded(), false, Xp.view().col_block(in, rp), 0.5f);
         }},
        {"dec_part_concat_gemm", [&](int i) {
           detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in + rp, 1.f, DeviceView<const S>(Xp.view()),
                                 detail::fused_layout(fw[i % sets]).wide(), 0.f, Y.view());
         }}};
    // The stream kernel with 16- and 32-row tiles, each through the planner (its choice is
    // replaced for the call and restored).
    const detail::PlanKey key = detail::fused_forward_key<S>(fw[0], Xp.view(), Y.view());
    const std::optional<detail::PlanChoice> planned = ctx_ref.planner().find(key);
    auto via_planner = [&](detail::FusedPath p) {
      return [&, p](int i) {
        ctx_ref.planner().record(key, {static_cast<int>(p)});
        ad.apply(fw[i % sets], Xp.view(), Y.view());
        ctx_ref.planner().record(key, *planned);
      };
    };
    if (T <= detail::stream_max_tokens && planned) {
      fns.push_back({"dec_stream", via_planner(detail::FusedPath::stream)});
      fns.push_back({"dec_stream_wide", via_planner(detail::FusedPath::stream_wide)});
    }
    if (T <= detail::dense_ring_max_tokens && planned) {  // the ring kernel (above 16 tokens in groups of
      // 16), XA per block and per cluster (stacked where it does not apply)
      fns.push_back({"dec_ring", via_planner(detail::FusedPath::ring)});
      if (T <= 16) fns.push_back({"dec_ring_cluster", via_planner(detail::FusedPath::ring_cluster)});
    }
    if (have_c) {
      fns.push_back({"dec_part_stacked_gemm", [&](int i) {
                       detail::gemm<S, S, S>(ctx_ref, false, true, T, out + r, in, 1.f, X, detail::fused_layout(fw[i % sets]).tall(), 0.f, C);
                     }});
      for (const bool vec : {true, false})
        fns.push_back({vec ? "dec_part_epilogue" : "dec_part_epilogue_scalar", [&, vec](int i) {
                         detail::launch_stacked_epilogue(ctx_ref, detail::as_device(DeviceView<const S>(C)), out, r, rp,
                                                         detail::as_device(detail::fused_layout(fw[i % sets]).B()), 0.5f,
                                                         detail::as_device(Y.view()),
                                                         detail::as_device(Xp.view().col_block(in, rp)), vec);
                       }});
    }
    {  // every forward strategy against X·Wᵀ + s·(X·Aᵀ)·Bᵀ in float64 on the host, first 1024 outputs
      const Index no = std::min<Index>(out, 1024);
      const Matrix<S> Xh = to_host(X), Wh = to_host(DeviceView<const S>(W[0].view()).row_block(0, no));
      const Eigen::MatrixXd xa = host.scaling() * Xh.cast<double>() * host.A().cast<double>().transpose();
      const Eigen::MatrixXd ref =
          Xh.cast<double>() * Wh.cast<double>().transpose() + xa * host.B().topRows(no).cast<double>().transpose();
      std::string errs;
      for (std::size_t k = 0; k < fns.size(); ++k) {
        const std::string name = fns[k].first;
        if (name != "dec_ours" && name != "dec_stacked" && name != "dec_accumulate" && name != "dec_stream" &&
            name != "dec_stream_wide" && name != "dec_ring" && name != "dec_ring_cluster")
          continue;
        LORA_CUDA_CHECK(cudaMemsetAsync(Y.data(), 0xFF, Y.size() * sizeof(S), ctx_ref.stream()));
        fns[k].second(0);
        const Eigen::MatrixXd y = Y.to_host().leftCols(no).cast<double>();
        const double e = y.hasNaN() ? 1.0 : (y - ref).norm() / ref.norm();
        errs += std::string(" ") + fns[k].first + " " + std::to_string(e).substr(0, 8);
      }
      std::fprintf(stderr, "  check T %ld: rel err vs float64:%s\n", static_cast<long>(T), errs.c_str());
    }
    std::vector<std::function<void(int)>> calls;
    for (auto& f : fns) calls.push_back(f.second);
    const auto t = bench::time_all(ctx_ref, calls, 10, 15, 3);
    auto at = [&](const char* name) {
      for (std::size_t i = 0; i < fns.size(); ++i)
        if (std::string(fns[i].first) == name) return t[i];
      return 0.0;
    };
    for (std::size_t i = 0; i < t.size(); ++i) emit(fns[i].first, in, out, T, r, t[i]);
    const double base = t[0];
    std::fprintf(stderr,
                 "decode T %3ld %ld->%ld r %ld (%d sets): base %.1f us, ours %.1f (%.3fx; %s); stacked %.3fx, "
                 "stream %.3fx (32-row %.3fx), ring %.3fx (cluster %.3fx), concat %.3fx, accumulate %.3fx\n",
                 static_cast<long>(T), static_cast<long>(in), static_cast<long>(out), static_cast<long>(r), sets,
                 base * 1e3, t[1] * 1e3, t[1] / base,
                 describe(ctx_ref.planner().find(detail::fused_forward_key<S>(fw[0], Xp.view(), Y.view())), true)
                     .c_str(),
                 at("dec_stacked") / base, at("dec_stream") / base, at("dec_stream_wide") / base,
                 at("dec_ring") / base, at("dec_ring_cluster") / base, at("dec_concat_gemmex") / base,
                 at("dec_accumulate") / base);
    if (T <= 16 && planned) {
      // The planner's own measure of its choice, the ring path and the plain stacked path
      // (detail::time_candidates: one call after an L2 eviction and lead_kernel, best of five
      // rounds) on the
      // first weight, beside the rotating measure above: where the two rank them differently,
      // the planner's pick and the alternating batches disagree.
      const std::vector<detail::PlanChoice> pc = {
          *planned, {static_cast<int>(detail::FusedPath::ring)}, {static_cast<int>(detail::FusedPath::stacked)}};
      const auto tp = detail::time_candidates(ctx_ref, static_cast<int>(pc.size()), [&](int k) {
        ctx_ref.planner().record(key, pc[static_cast<std::size_t>(k)]);
        ad.apply(fw[0], Xp.view(), Y.view());
        ctx_ref.planner().record(key, *planned);
      });
      std::fprintf(stderr,
                   "  planner's measure (us, after an L2 eviction and lead_kernel): planned %.2f, ring %.2f, stacked (GemmEx) %.2f; "
                   "rotating: ours %.2f, ring %.2f, stacked %.2f\n",
                   tp[0] * 1e3, tp[1] * 1e3, tp[2] * 1e3, t[1] * 1e3, at("dec_ring") * 1e3,
                   at("dec_stacked") * 1e3);
    }
    if (T <= 16 && planned) {
      // As in a model: each call after a kernel that writes X (produce_x_kernel, from a copy of X),
      // weights rotating as above; the producer's time alone is subtracted.
      auto produce = [&] {
        produce_x_kernel<<<64, 256, 0, ctx_ref.stream()>>>(reinterpret_cast<const unsigned short*>(Xc.data()), in,
                                                          reinterpret_cast<unsigned short*>(Xp.data()), Xp.cols(),
                                                          static_cast<int>(T), static_cast<int>(in));
        LORA_CUDA_CHECK_LAUNCH("produce_x_kernel");
      };
      const std::vector<std::function<void(int)>> after = {
          [&](int) { produce(); },
          [&](int i) {
            produce();
            detail::gemm<S, S, S>(ctx_ref, false, true, T, out, in, 1.f, X, W[i % sets].view(), 0.f, Y.view());
          },
          [&](int i) {
            produce();
            ad.apply(fw[i % sets], Xp.view(), Y.view());
          },
          [&](int i) {
            produce();
            via_planner(detail::FusedPath::ring)(i);
          },
          [&](int i) {
            produce();
            forced(FusedForward::stacked)(i);
          }};
      const auto ta = bench::time_all(ctx_ref, after, 10, 15, 3);
      const double pb = ta[1] - ta[0];
      std::fprintf(stderr,
                   "  after a producer kernel (us, its %.2f subtracted): base %.2f, ours %.2f (%.3fx), ring %.2f "
                   "(%.3fx), stacked %.2f (%.3fx)\n",
                   ta[0] * 1e3, pb * 1e3, (ta[2] - ta[0]) * 1e3, (ta[2] - ta[0]) / pb, (ta[3] - ta[0]) * 1e3,
                   (ta[3] - ta[0]) / pb, (ta[4] - ta[0]) * 1e3, (ta[4] - ta[0]) / pb);
      emit("dec_after_base", in, out, T, r, pb);
      emit("dec_after_ours", in, out, T, r, ta[2] - ta[0]);
      emit("dec_after_ring", in, out, T, r, ta[3] - ta[0]);
      emit("dec_after_stacked", in, out, T, r, ta[4] - ta[0]);
      // The planner's measure with the producer before each candidate (L2 evicted, then the
      // producer and the candidate with no event between), the producer alone subtracted: does
      // it rank the candidates as the rows above do?
      const std::vector<detail::PlanChoice> pc = {
          *planned, {static_cast<int>(detail::FusedPath::ring)}, {static_cast<int>(detail::FusedPath::stacked)}};
      const auto tq = detail::time_candidates(ctx_ref, static_cast<int>(pc.size()) + 1, [&](int k) {
        produce();
        if (k == static_cast<int>(pc.size())) return;
        ctx_ref.planner().record(key, pc[static_cast<std::size_t>(k)]);
        ad.apply(fw[0], Xp.view(), Y.view());
        ctx_ref.planner().record(key, *planned);
      });
      std::fprintf(stderr,
                   "  planner's measure after the producer (us, its %.2f subtracted): planned %.2f, ring %.2f, "
                   "stacked (GemmEx) %.2f\n",
                   tq[3] * 1e3, (tq[0] - tq[3]) * 1e3, (tq[1] - tq[3]) * 1e3, (tq[2] - tq[3]) * 1e3);
    }
    std::fprintf(stderr,
                 "  parts (us): stacked GEMM %.2f, epilogue %.2f (scalar %.2f), s·X·Aᵀ %.2f, concat_k GEMM %.2f\n",
                 at("dec_part_stacked_gemm") * 1e3, at("dec_part_epilogue") * 1e3,
                 at("dec_part_epilogue_scalar") * 1e3, at("dec_part_xa") * 1e3, at("dec_part_concat_gemm") * 1e3);
  }
}

/// Experiment: the fused forward at T 16384 with s·X·Aᵀ computed chunk by chunk on a second
/// stream (its own cuBLAS handle) while the main stream runs the [X | XA]·[W | B | 0]ᵀ GEMM
/// of the chunk before: can the memory-bound XA pass hide beside the compute-bound GEMM?
void bench_pipeline(CudaContext& ctx, Generator& g) {
  const Index in = 4096, out = 4096, r = 16, T = 16384;
  LowRankAdapter<S> host(in, out, r, 2.0 * r);
  host.set_A(bench::random_factor<S>(r, in, g));
  host.set_B(bench::random_factor<S>(out, r, g));
  auto shared = CudaContext::thread_default();
  auto ad = LowRankAdapter<S, cuda>::from_host(host, shared);
  DeviceMatrix<S> W(out, in);
  fill_random(W.view(), g, 0.02);
  auto fw = ad.fuse(W.view());
  const detail::FusedLayout<S> L = detail::fused_layout(fw);
  auto Xp = ad.padded_input(T);
  fill_random(Xp.view(), g, 1.0);
  DeviceMatrix<S> Y(T, out), Y2(T, out), Xc(T, in);
  LORA_CUDA_CHECK(cudaMemcpy2D(Xc.data(), in * sizeof(S), Xp.data(), (in + L.rp()) * sizeof(S), in * sizeof(S), T,
                               cudaMemcpyDeviceToDevice));
  CudaContext side;
  const float s = static_cast<float>(ad.scaling());
  const Index rp = L.rp();
  cudaEvent_t ev[17];
  for (auto& e : ev) LORA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  auto xa = [&](CudaContext& c, Index t0, Index tc) {
    auto Xv = Xp.view();
    detail::gemm<S, S, S>(c, false, true, tc, rp, in, s, DeviceView<const S>(Xv.row_block(t0, tc).col_block(0, in)),
                          L.A_padded(), 0.f, Xv.row_block(t0, tc).col_block(in, rp));
  };
  auto big = [&](Index t0, Index tc, DeviceMatrix<S>& Yo) {
    detail::gemm<S, S, S>(ctx, false, true, tc, out, in + rp, 1.f, DeviceView<const S>(Xp.view().row_block(t0, tc)),
                          L.wide(), 0.f, Yo.view().row_block(t0, tc));
  };
  auto pipe = [&](int C, DeviceMatrix<S>& Yo) {
    const Index tc = T / C;
    LORA_CUDA_CHECK(cudaEventRecord(ev[16], ctx.stream()));
    LORA_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ev[16], 0));
    for (int c = 0; c < C; ++c) {
      xa(side, c * tc, tc);
      LORA_CUDA_CHECK(cudaEventRecord(ev[c], side.stream()));
    }
    for (int c = 0; c < C; ++c) {
      LORA_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), ev[c], 0));
      big(c * tc, tc, Yo);
    }
  };
  // correctness of the pipelined form against the library's apply
  ad.apply(fw, Xp.view(), Y.view());
  pipe(8, Y2);
  {
    const Matrix<S> a = to_host(Y.view()), b = to_host(Y2.view());
    double num = 0, den = 0;
    for (Index i = 0; i < a.rows(); i += 97)
      for (Index j = 0; j < a.cols(); ++j) {
        const double d = double(float(a(i, j))) - double(float(b(i, j)));
        num += d * d;
        den += double(float(a(i, j))) * double(float(a(i, j)));
      }
    std::fprintf(stderr, "pipeline C 8 against apply: relative difference %.2e\n", std::sqrt(num / den));
  }
  const auto t = bench::time_all(
      ctx,
      {[&](int) {
         detail::gemm<S, S, S>(ctx, false, true, T, out, in, 1.f, DeviceView<const S>(Xc.view()), DeviceView<const S>(W.view()), 0.f,
                               Y.view());
       },
       [&](int) { ad.apply(fw, Xp.view(), Y.view()); },
       [&](int) {
         for (int c = 0; c < 8; ++c) big(c * (T / 8), T / 8, Y);
       },
       [&](int) { pipe(4, Y); }, [&](int) { pipe(8, Y); }, [&](int) { pipe(16, Y); }},
      10, 15, 3);
  const char* names[] = {"pipe_base", "pipe_ours_apply", "pipe_gemm_8_chunks", "pipe_4", "pipe_8", "pipe_16"};
  for (int i = 0; i < 6; ++i) {
    emit(names[i], in, out, T, r, t[static_cast<std::size_t>(i)]);
    std::fprintf(stderr, "%-20s %.4f ms = %.3fx base\n", names[i], t[static_cast<std::size_t>(i)], t[static_cast<std::size_t>(i)] / t[0]);
  }
  // The same with the main GEMMs held to fewer SMs (cublasSetSmCountTarget) so that the side
  // stream's XA finds free SMs: 2048 tiles of 128 x 256 fill 128 SMs in 16 whole waves, as many
  // as 132 SMs need.
  int sms = 0;
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  auto targeted = [&](int main_sms, int side_sms, std::function<void()> f) {
    return [&, main_sms, side_sms, f](int) {
      LORA_CUDA_CHECK(cublasSetSmCountTarget(ctx.blas(), main_sms));
      LORA_CUDA_CHECK(cublasSetSmCountTarget(side.blas(), side_sms));
      f();
      LORA_CUDA_CHECK(cublasSetSmCountTarget(ctx.blas(), 0));
      LORA_CUDA_CHECK(cublasSetSmCountTarget(side.blas(), 0));
    };
  };
  auto base_full = [&] {
    detail::gemm<S, S, S>(ctx, false, true, T, out, in, 1.f, DeviceView<const S>(Xc.view()),
                          DeviceView<const S>(W.view()), 0.f, Y.view());
  };
  std::vector<std::function<void(int)>> fns = {targeted(0, 0, base_full), targeted(0, 0, [&] { ad.apply(fw, Xp.view(), Y.view()); })};
  std::vector<std::string> labels = {"sm_base", "sm_apply"};
  for (int m : {sms - 4, sms - 8, sms - 12}) {
    fns.push_back(targeted(m, 0, base_full));
    labels.push_back("sm_base_main" + std::to_string(m));
    fns.push_back(targeted(m, 0, [&] { for (int c = 0; c < 8; ++c) big(c * (T / 8), T / 8, Y); }));
    labels.push_back("sm_gemm8_main" + std::to_string(m));
    for (int C : {4, 8, 16}) {
      fns.push_back(targeted(m, sms - m, [&, C] { pipe(C, Y); }));
      labels.push_back("sm_pipe" + std::to_string(C) + "_main" + std::to_string(m) + "_side" + std::to_string(sms - m));
    }
  }
  const auto u = bench::time_all(ctx, fns, 10, 15, 3);
  for (std::size_t i = 0; i < u.size(); ++i) {
    emit(labels[i].c_str(), in, out, T, r, u[i]);
    std::fprintf(stderr, "%-32s %.4f ms = %.3fx base\n", labels[i].c_str(), u[i], u[i] / u[0]);
  }
  for (auto& e : ev) cudaEventDestroy(e);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) csv = std::fopen(argv[1], "w");
  if (!csv) return 1;
  auto ctx = CudaContext::thread_default();
  cudaDeviceProp prop{};
  LORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  std::fprintf(csv, "name,in,out,tokens,r,ms,extra\n");
  Generator g(1234);

  // Ceilings: device-to-device copy (bytes read + written) and a large bf16 GEMM.
  {
    const std::size_t bytes = std::size_t(1) << 30;
    DeviceBuffer<char> a(bytes), b(bytes);
    LORA_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
    const double ms = time_ms(*ctx, [&](int) {
      LORA_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, ctx->stream()));
    }, 2, 9);
    emit("copy_GBps", 0, 0, 0, 0, ms, 2.0 * bytes / ms / 1e6);
    const Index n = 8192;
    DeviceMatrix<S> A(n, n), B(n, n), C(n, n);
    fill_random(A.view(), g, 1.0);
    fill_random(B.view(), g, 1.0);
    const double gm = time_ms(*ctx, [&](int) {
      detail::gemm<S, S, S>(*ctx, false, true, n, n, n, 1.f, A.view(), B.view(), 0.f, C.view());
    }, 2, 9);
    emit("gemm8192_TFLOPs", n, n, n, 0, gm, 2.0 * n * n * n / gm / 1e9);
  }

  // LORA_BENCH_ONLY=dora: only the DoRA shapes (for profiling runs).
  const char* only = std::getenv("LORA_BENCH_ONLY");
  const bool only_dora = only && std::string(only) == "dora";
  if (only && std::string(only) == "dora_decode") {  // DoRA per call at 1…16 tokens (issue 23)
    for (Index T : {Index(1), Index(2), Index(4), Index(8), Index(16)}) bench_dora_decode(*ctx, ctx, 4096, 4096, T, 16, g);
    for (Index T : {Index(1), Index(16)}) bench_dora_decode(*ctx, ctx, 4096, 4096, T, 8, g);
    bench_dora_decode(*ctx, ctx, 4096, 14336, 1, 16, g);
    bench_dora_decode(*ctx, ctx, 4096, 4096, 1, 64, g);  // r + T > 32: the two-pass path only
    return 0;
  }
  if (only && std::string(only) == "pipeline") {  // the chunked two-stream forward experiment
    bench_pipeline(*ctx, g);
    return 0;
  }
  if (only && std::string(only) == "backward") {  // the T 16384 shapes of the backward goal
    for (Index r : {Index(16), Index(64)}) bench_lora(*ctx, ctx, 4096, 4096, 16384, r, g, false);
    bench_lora(*ctx, ctx, 4096, 14336, 16384, 16, g, false);
    return 0;
  }
  if (!only_dora) {
    // LORA_BENCH_DECODE=out:T,out:T,… limits the decode rows (for profiling runs).
    const char* dec = std::getenv("LORA_BENCH_DECODE");
    for (Index out : {Index(4096), Index(14336)}) {
      std::vector<Index> ts;
      for (Index T : {2, 4, 8, 16, 32, 64, 128}) {
        const std::string pair = std::to_string(out) + ":" + std::to_string(T);
        if (!dec || ("," + std::string(dec) + ",").find("," + pair + ",") != std::string::npos) ts.push_back(T);
      }
      if (!ts.empty()) bench_decode(*ctx, ctx, 4096, out, ts, 16, g);
    }
    if (only && std::string(only) == "decode") return 0;
    for (Index T : {Index(1), Index(16), Index(4096), Index(16384)})
      for (Index r : {Index(16), Index(64)}) bench_lora(*ctx, ctx, 4096, 4096, T, r, g, false);
    for (Index T : {Index(1), Index(16), Index(4096), Index(16384)})
      bench_lora(*ctx, ctx, 4096, 14336, T, 16, g, false);
  }
  for (Index T : {Index(1), Index(16384)}) bench_lora(*ctx, ctx, 4096, 4096, T, 16, g, true);
  if (only_dora) return 0;

  // NF4: W [14336 × 4096] (4096 → 14336), GEMV at batch 1 and 16 vs cuBLAS bf16; dequantisation bandwidth.
  {
    const Index out = 14336, in = 4096;
    const int sets = 4;
    std::vector<DeviceMatrix<S>> W;
    std::vector<quant::Nf4Tensor<cuda>> q;
    for (int i = 0; i < sets; ++i) {
      W.emplace_back(out, in);
      fill_random(W.back().view(), g, 0.02);
      q.push_back(quant::Nf4Tensor<cuda>::quantize<S>(W.back().view(), {64, false}, ctx));
    }
    for (Index T : {Index(1), Index(16)}) {
      DeviceMatrix<S> X(T, in), Y(T, out);
      fill_random(X.view(), g, 1.0);
      auto [tb, ms] = time_pair(
          *ctx,
          [&](int i) {
            detail::gemm<S, S, S>(*ctx, false, true, T, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
          },
          [&](int i) { quant::nf4_matmul<S>(q[i % sets], X.view(), Y.view()); });
      emit("base_gemm", in, out, T, 0, tb);
      const double bytes = out * in / 2.0 + out * in / 64.0 * 4 + T * (in + out) * 2.0;
      emit("ours_nf4_gemm", in, out, T, 0, ms, bytes / ms / 1e6);
    }
    DeviceMatrix<S> D(out, in);
    const double ms = time_ms(*ctx, [&](int i) { q[i % sets].dequantize_into(D.view()); });
    const double bytes = out * in / 2.0 + out * in / 64.0 * 4 + out * in * 2.0;
    emit("ours_nf4_dequant", in, out, 0, 0, ms, bytes / ms / 1e6);
    const double qms = time_ms(*ctx, [&](int i) { auto t = quant::Nf4Tensor<cuda>::quantize<S>(W[i % sets].view(), {64, false}, ctx); }, 2, 9);
    emit("ours_nf4_quant", in, out, 0, 0, qms, (out * in * 2.0 + out * in / 2.0) / qms / 1e6);
  }

  // Spectrum of a 4096 × 4096, r = 64 adapter (wall clock: includes the host-side r × r step).
  {
    const Index in = 4096, out = 4096, r = 64;
    LowRankAdapter<S> host(in, out, r, 128.0);
    host.set_A(bench::random_factor<S>(r, in, g));
    host.set_B(bench::random_factor<S>(out, r, g));
    auto ad = LowRankAdapter<S, cuda>::from_host(host, ctx);
    SpectrumWorkspace ws;
    std::vector<double> t;
    for (int i = 0; i < 23; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      auto sv = singular_values(ad, ws);
      const auto t1 = std::chrono::steady_clock::now();
      if (i >= 3) t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      if (sv.size() != r) return 2;
    }
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    emit("ours_spectrum", in, out, 0, r, t[t.size() / 2]);
  }
  if (csv != stdout) std::fclose(csv);
  return 0;
}
