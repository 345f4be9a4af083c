// NF4 few-token GEMM (ours, exact and fast modes) against Eigen's float GEMV/GEMM,
// the QLoRA layer (NF4 + r 16 adapter) and, when built with -DLORA_GGML_DIR=...,
// ggml's CPU kernels (Q4_0, IQ4_NL, Q4_K through ggml_mul_mat) on the same
// weights, shapes and thread counts. Paired: one process, every candidate called
// once per round in a rotating order, medians over the rounds.
//
//   ./bench_quant_ggml [--rounds 15] [--tokens 1,4,16] [--threads 1,2] [--shapes 14336x4096,4096x14336]
//                      [--kernels ours,qlora]   (name prefixes; default all)
#include <lora/quant/nf4_cpu.hpp>
#include <lora/quant/qlora.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(LORA_BENCH_GGML)
#include <ggml-cpu.h>
#include <ggml.h>
#endif

namespace {

using lora::Index;
using lora::Matrix;

std::vector<long> parse_list(const std::string& s) {
  std::vector<long> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stol(item));
  return v;
}

void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(1);  // Eigen runs per thread on a slice of rows (below)
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

#if defined(LORA_BENCH_GGML)
// One ggml weight of `type` and a Y = X·Wᵀ graph for T tokens.
struct GgmlMatmul {
  ggml_context* ctx = nullptr;
  ggml_tensor *w = nullptr, *x = nullptr, *y = nullptr;
  ggml_cgraph* gf = nullptr;
  std::vector<std::uint8_t> work;
  int planned_threads = -1;
  ggml_cplan plan{};

  GgmlMatmul(ggml_type type, const Matrix<float>& W, Index T) {
    const Index out = W.rows(), in = W.cols();
    const size_t wbytes = ggml_row_size(type, in) * out;
    ggml_init_params p{wbytes + sizeof(float) * (T * in + T * out) + 16 * ggml_tensor_overhead() + ggml_graph_overhead() +
                           (1 << 20),
                       nullptr, false};
    ctx = ggml_init(p);
    w = ggml_new_tensor_2d(ctx, type, in, out);
    ggml_quantize_chunk(type, W.data(), w->data, 0, out, in, nullptr);
    x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, in, T);
    y = ggml_mul_mat(ctx, w, x);
    gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
  }
  ~GgmlMatmul() { ggml_free(ctx); }
  GgmlMatmul(const GgmlMatmul&) = delete;
  GgmlMatmul& operator=(const GgmlMatmul&) = delete;

  void run(const Matrix<float>& X, int threads) {
    std::copy(X.data(), X.data() + X.size(), static_cast<float*>(x->data));
    if (threads != planned_threads) {
      plan = ggml_graph_plan(gf, threads, nullptr);
      work.resize(plan.work_size + 64);
      plan.work_data = work.data();
      planned_threads = threads;
    }
    ggml_graph_compute(gf, &plan);
  }
  // Mean |ggml − ref| / rms(ref) over the outputs, for the table's error column.
  double rel_error(const Matrix<double>& ref) const {
    const float* d = static_cast<const float*>(y->data);
    double e = 0, r = 0;
    for (Index t = 0; t < ref.rows(); ++t)
      for (Index i = 0; i < ref.cols(); ++i) {
        const double v = d[t * ref.cols() + i] - ref(t, i);
        e += v * v;
        r += ref(t, i) * ref(t, i);
      }
    return std::sqrt(e / r);
  }
};
#endif

struct Candidate {
  std::string name;
  std::function<void()> call;
  std::vector<double> ms;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double rel_error(const Matrix<float>& y, const Matrix<double>& ref) {
  return std::sqrt((y.cast<double>() - ref).squaredNorm() / ref.squaredNorm());
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 15;
  std::string kernels;  // comma-separated name prefixes ("ours,qlora"); empty: all
  std::vector<long> tokens = {1, 4, 16}, threads = {1, 2};
  std::vector<std::pair<Index, Index>> shapes = {{14336, 4096}, {4096, 14336}};
  for (int a = 1; a + 1 < argc; a += 2) {
    const std::string k = argv[a], v = argv[a + 1];
    if (k == "--rounds") {
      rounds = std::stoi(v);
    } else if (k == "--tokens") {
      tokens = parse_list(v);
    } else if (k == "--kernels") {
      kernels = v;
    } else if (k == "--threads") {
      threads = parse_list(v);
    } else if (k == "--shapes") {
      shapes.clear();
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        const auto x = item.find('x');
        shapes.push_back({std::stol(item.substr(0, x)), std::stol(item.substr(x + 1))});
      }
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 1;
    }
  }
#if defined(LORA_BENCH_GGML)
  ggml_cpu_init();
#endif
  std::printf("path %s; %d rounds; times are medians in ms; ratio = time / ours fast\n", lora::quant::isa::native::name,
              rounds);
  std::printf("%-12s %3s %3s %-14s %9s %7s %9s\n", "shape", "T", "thr", "kernel", "ms", "ratio", "rel.err");
  for (const auto& [out, in] : shapes) {
    lora::Generator gen(7);
    Matrix<float> W(out, in);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(0.02 * gen.normal());
    Matrix<float> A(16, in), B(out, 16);
    for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<float>(0.01 * gen.normal());
    for (Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<float>(0.01 * gen.normal());
    lora::QLoraLinear<> layer(lora::Nf4Tensor::quantize(W, {64, false}),
                              lora::LowRankAdapter<float>::from_factors(A, B, 32.0));
    // The GEMM reads the layer's own codes: the same pages as the layer's forward.
    const lora::quant::Nf4View view = lora::quant::nf4_view(layer.base());
    const Matrix<double> Wd = W.cast<double>();
    for (long T : tokens) {
      Matrix<float> X(T, in);
      for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(gen.normal());
      const Matrix<double> ref = X.cast<double>() * Wd.transpose();  // unquantised weights
      Matrix<float> Ye = Matrix<float>::Zero(T, out), Yf = Ye, Yeig = Ye, Yl;
#if defined(LORA_BENCH_GGML)
      GgmlMatmul q40(GGML_TYPE_Q4_0, W, T), iq4(GGML_TYPE_IQ4_NL, W, T), q4k(GGML_TYPE_Q4_K, W, T);
#endif
      for (long nt : threads) {
        set_threads(static_cast<int>(nt));
        std::vector<Candidate> c;
        c.push_back({"ours fast", [&] { lora::quant::nf4_gemm(lora::quant::isa::native{}, view, X.data(), T, Yf.data(), lora::quant::nf4_mode::fast); }, {}});
        c.push_back({"ours exact", [&] { lora::quant::nf4_gemm(lora::quant::isa::native{}, view, X.data(), T, Ye.data(), lora::quant::nf4_mode::exact); }, {}});
        c.push_back({"qlora fast", [&] {
                       layer.set_mode(lora::quant::nf4_mode::fast);
                       Yl = layer.forward(X);
                     }, {}});
        c.push_back({"qlora exact", [&] {
                       layer.set_mode(lora::quant::nf4_mode::exact);
                       Yl = layer.forward(X);
                     }, {}});
        c.push_back({"eigen float", [&] {
                       // Each thread multiplies a slice of W's rows (Eigen's GEMV is single-threaded).
#if defined(_OPENMP)
#pragma omp parallel num_threads(static_cast<int>(nt))
                       {
                         const int n = omp_get_num_threads(), t = omp_get_thread_num();
                         const Index r0 = out * t / n, r1 = out * (t + 1) / n;
                         Yeig.middleCols(r0, r1 - r0).noalias() = X * W.middleRows(r0, r1 - r0).transpose();
                       }
#else
                       Yeig.noalias() = X * W.transpose();
#endif
                     }, {}});
#if defined(LORA_BENCH_GGML)
        c.push_back({"ggml Q4_0", [&] { q40.run(X, static_cast<int>(nt)); }, {}});
        c.push_back({"ggml IQ4_NL", [&] { iq4.run(X, static_cast<int>(nt)); }, {}});
        c.push_back({"ggml Q4_K", [&] { q4k.run(X, static_cast<int>(nt)); }, {}});
#endif
        if (!kernels.empty()) {
          std::vector<Candidate> kept;
          for (auto& k : c) {
            std::stringstream ks(kernels);
            std::string p;
            bool keep = false;
            while (std::getline(ks, p, ',')) keep = keep || k.name.rfind(p, 0) == 0;
            if (keep) kept.push_back(std::move(k));
          }
          c = std::move(kept);
        }
        auto index = [&](const std::string& name) {
          for (std::size_t j = 0; j < c.size(); ++j)
            if (c[j].name == name) return static_cast<long>(j);
          return -1L;
        };
        for (auto& k : c) k.call();  // warm up (pages, plans)
        for (int r = 0; r < rounds; ++r)
          for (std::size_t j = 0; j < c.size(); ++j) {
            auto& k = c[(j + static_cast<std::size_t>(r)) % c.size()];
            const double t0 = now_ms();
            k.call();
            k.ms.push_back(now_ms() - t0);
          }
        if (c.empty()) continue;
        const double base = median(c[0].ms);
        for (auto& k : c) {
          double err = -1;
          if (k.name == "ours fast") err = rel_error(Yf, ref);
          if (k.name == "ours exact") err = rel_error(Ye, ref);
          if (k.name == "eigen float") err = rel_error(Yeig, ref);
#if defined(LORA_BENCH_GGML)
          if (k.name == "ggml Q4_0") err = q40.rel_error(ref);
          if (k.name == "ggml IQ4_NL") err = iq4.rel_error(ref);
          if (k.name == "ggml Q4_K") err = q4k.rel_error(ref);
#endif
          const double m = median(k.ms);
          std::printf("%5ldx%-6ld %3ld %3ld %-14s %9.3f %7.2f", static_cast<long>(out), static_cast<long>(in), T, nt,
                      k.name.c_str(), m, m / base);
          if (err >= 0)
            std::printf(" %9.2e\n", err);
          else
            std::printf("\n");
        }
        // The layer against its base product alone, same mode (the issue's ≤ 1.05):
        // medians of the per-round ratios (the two calls ran in the same round).
        auto paired = [&](const char* a, const char* b) {
          const long ia = index(a), ib = index(b);
          if (ia < 0 || ib < 0) return std::nan("");
          std::vector<double> r;
          for (int i = 0; i < rounds; ++i)
            r.push_back(c[static_cast<std::size_t>(ia)].ms[static_cast<std::size_t>(i)] /
                        c[static_cast<std::size_t>(ib)].ms[static_cast<std::size_t>(i)]);
          return median(r);
        };
        const double fe = std::sqrt((Yf.cast<double>() - Ye.cast<double>()).squaredNorm() /
                                    (Ye.cast<double>() - ref).squaredNorm());
        std::printf("%5ldx%-6ld %3ld %3ld qlora/gemm: fast %.3f, exact %.3f; |fast - exact| / |exact - float| = %.3f\n",
                    static_cast<long>(out), static_cast<long>(in), T, nt, paired("qlora fast", "ours fast"), paired("qlora exact", "ours exact"), fe);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
