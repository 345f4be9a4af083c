#include <lora/core/init.hpp>
#include <lora/multi/adapter_set.hpp>
#include <lora/quant/qlora.hpp>

#include <algorithm>
#include <numeric>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

namespace {

// Float64 reference: one token at a time.
MatD reference_apply(const multi::AdapterSet<float>& set, const MatD& W, const MatD& X, const std::vector<int>& ids) {
  MatD Y(X.rows(), W.rows());
  for (Index t = 0; t < X.rows(); ++t) {
    Eigen::RowVectorXd y = X.row(t) * W.transpose();
    if (ids[static_cast<std::size_t>(t)] >= 0) {
      const auto& s = set.at(ids[static_cast<std::size_t>(t)]);
      const MatD A = s.A.cast<double>(), B = s.B.cast<double>();
      y += s.scaling * (X.row(t) * A.transpose()) * B.transpose();
    }
    Y.row(t) = y;
  }
  return Y;
}

struct Fixture {
  Index in = 48, out = 40;
  Generator gen{lora::test::fresh_seed()};
  multi::AdapterSet<float> set{48, 40};
  MatD W;
  Fixture(int n_adapters) {
    W = random_matrix(out, in, gen);
    for (int i = 0; i < n_adapters; ++i) {
      const Index r = 1 + static_cast<Index>(gen.next() % 16);  // mixed ranks
      const double scaling = (i % 2) ? 16.0 / r : 16.0 / std::sqrt(double(r));  // standard and rsLoRA
      set.add("adapter" + std::to_string(i), random_matrix<float>(r, in, gen), random_matrix<float>(out, r, gen),
              scaling);
    }
  }
};

}  // namespace

TEST_CASE("batched_apply equals the per-token float64 reference for every id layout", "[multi]") {
  Fixture f(7);
  auto check = [&](std::vector<int> ids, const char* what) {
    INFO(what);
    MatD X = random_matrix(static_cast<Index>(ids.size()), f.in, f.gen);
    auto Y = multi::batched_apply(f.set, Matrix<float>(f.W.cast<float>()), Matrix<float>(X.cast<float>()), ids);
    CHECK(rel_error(Y, reference_apply(f.set, f.W.cast<float>().cast<double>(), X.cast<float>().cast<double>(), ids)) <
          1e-5);
    auto Ya = multi::batched_forward(f.set, Matrix<float>(X.cast<float>()), ids);
    MatD base = X.cast<float>().cast<double>() * f.W.cast<float>().cast<double>().transpose();
    CHECK(rel_error(MatD(Ya.template cast<double>() + base), Y) < 1e-5);
  };
  std::vector<int> ids(64);
  for (auto& i : ids) i = static_cast<int>(f.gen.next() % 8) - 1;  // random ids in {-1, 0..6}
  check(ids, "random ids with -1");
  std::sort(ids.begin(), ids.end());
  check(ids, "sorted (contiguous segments)");
  check(std::vector<int>(33, 3), "all tokens on one adapter");
  check(std::vector<int>(5, -1), "no adapter at all");
  check({0, 1, 2, 3, 4, 5, 6}, "one token per adapter");
  check({6, 0}, "most adapters unused (empty segments)");
  check({4}, "a single token");
}

TEST_CASE("apply over an NF4 base equals the float64 reference on the dequantised weight", "[multi][nf4]") {
  // QLoRA serving on the CPU, as AdapterSet<S, cuda>::apply(Nf4Tensor<cuda>, …): the fused NF4
  // product for ≤ 16 tokens, row panels above, then the per-token adapter paths.
  Fixture f(5);
  const Nf4Tensor q = Nf4Tensor::quantize(Matrix<float>(f.W.cast<float>()), {64, true});
  const MatD Wd = q.dequantize<float>().cast<double>();
  for (Index T : {Index(1), Index(5), Index(16), Index(37)}) {
    INFO("tokens " << T);
    std::vector<int> ids(static_cast<std::size_t>(T));
    for (auto& i : ids) i = static_cast<int>(f.gen.next() % 6) - 1;  // {-1, 0..4}
    const MatD X = random_matrix(T, f.in, f.gen);
    const Matrix<float> Xf = X.cast<float>();
    const auto Y = f.set.apply(q, Xf, ids);
    CHECK(rel_error(Y, reference_apply(f.set, Wd, Xf.cast<double>(), ids)) < 1e-5);
  }
  const Nf4Tensor wrong = Nf4Tensor::quantize(Matrix<float>(random_matrix<float>(f.in, f.out, f.gen)), {64, false});
  const std::vector<int> ids = {0, -1};
  CHECK_THROWS_WITH(f.set.apply(wrong, Matrix<float>(random_matrix<float>(2, f.in, f.gen)), ids),
                    Catch::Matchers::ContainsSubstring("NF4 base weight has 2 dimensions and shape [48 x 40], expected "
                                                       "[out x in] = [40 x 48]"));
}

TEST_CASE("segments group tokens stably and detect contiguity", "[multi]") {
  Fixture f(3);
  std::vector<int> ids = {2, 2, -1, 0, 0, 0, 1};
  auto seg = multi::make_segments(f.set, ids);
  CHECK(seg.adapter == std::vector<int>{0, 1, 2});
  CHECK(seg.begin == std::vector<Index>{0, 3, 4, 6});
  CHECK(seg.order == std::vector<Index>{3, 4, 5, 6, 0, 1});
  CHECK(seg.contiguous);
  ids = {0, 1, 0};
  CHECK_FALSE(multi::make_segments(f.set, ids).contiguous);
}

TEST_CASE("batched_backward matches per-adapter LowRankAdapter gradients and finite differences", "[multi][gradient]") {
  Fixture f(5);
  const Index T = 40;
  std::vector<int> ids(static_cast<std::size_t>(T));
  for (auto& i : ids) i = static_cast<int>(f.gen.next() % 6) - 1;
  ids[0] = 4;  // make sure adapter 4 is used
  MatD X = random_matrix(T, f.in, f.gen), G = random_matrix(T, f.out, f.gen);
  const Matrix<float> Xf = X.cast<float>(), Wf = f.W.cast<float>();
  auto g = multi::batched_backward(f.set, Xf, ids, Matrix<float>(G.cast<float>()), &Wf);
  // reference: for each adapter, the tokens that use it, through the single-adapter backward in double
  MatD dX = G.cast<float>().cast<double>() * Wf.cast<double>();
  for (int id = 0; id < f.set.capacity(); ++id) {
    std::vector<Index> rows;
    for (Index t = 0; t < T; ++t)
      if (ids[static_cast<std::size_t>(t)] == id) rows.push_back(t);
    if (rows.empty()) {
      CHECK(g.dA[static_cast<std::size_t>(id)].size() == 0);
      continue;
    }
    const auto& s = f.set.at(id);
    LowRankAdapter<double> ad = LowRankAdapter<double>::from_factors(s.A.cast<double>(), s.B.cast<double>(), 1.0);
    ad.rescale(s.scaling / ad.scaling());
    MatD xs(static_cast<Index>(rows.size()), f.in), gs(static_cast<Index>(rows.size()), f.out);
    for (std::size_t j = 0; j < rows.size(); ++j) {
      xs.row(static_cast<Index>(j)) = Xf.row(rows[j]).cast<double>();
      gs.row(static_cast<Index>(j)) = G.row(rows[j]).cast<float>().cast<double>();
    }
    auto r = ad.backward(xs, gs);
    CHECK(rel_error(g.dA[static_cast<std::size_t>(id)], r.dA) < 1e-5);
    CHECK(rel_error(g.dB[static_cast<std::size_t>(id)], r.dB) < 1e-5);
    for (std::size_t j = 0; j < rows.size(); ++j) dX.row(rows[j]) += r.dX.row(static_cast<Index>(j));
  }
  CHECK(rel_error(g.dX, dX) < 1e-5);
  // finite differences of L = <G, Y> for one entry of one adapter's A (double arithmetic via the reference)
  const int id = 4;
  auto loss = [&](const multi::AdapterSet<float>& set) {
    return (reference_apply(set, Wf.cast<double>(), Xf.cast<double>(), ids).array() * G.cast<float>().cast<double>().array()).sum();
  };
  const auto& slot = f.set.at(id);
  Matrix<float> A = slot.A;
  const float h = 1e-2f;
  A(0, 0) += h;
  // rebuild a copy of the set with the perturbed factor
  auto rebuild = [&](const Matrix<float>& Aid) {
    multi::AdapterSet<float> s(f.in, f.out);
    for (int i = 0; i < f.set.capacity(); ++i) {
      const auto& o = f.set.at(i);
      s.add(o.name, i == id ? Aid : o.A, o.B, o.scaling);
    }
    return s;
  };
  const double lp = loss(rebuild(A));
  A(0, 0) -= 2 * h;
  const double lm = loss(rebuild(A));
  CHECK((lp - lm) / (2 * h) == Approx(g.dA[id](0, 0)).epsilon(1e-3));
}

TEST_CASE("hot-swap: add, replace and remove leave the other adapters in place", "[multi]") {
  Fixture f(3);
  const Matrix<float> Wf = f.W.cast<float>();
  MatD X = random_matrix(12, f.in, f.gen);
  const Matrix<float> Xf = X.cast<float>();
  std::vector<int> ids = {0, 1, 2, 0, 1, 2, 0, 1, 2, -1, 0, 2};
  auto before = multi::batched_apply(f.set, Wf, Xf, ids);
  const float* A1 = f.set.at(1).A.data();

  // replace adapter 2 with one of a different rank; 0 and 1 are untouched (same storage)
  f.set.replace(2, "adapter2-v2", random_matrix<float>(9, f.in, f.gen), random_matrix<float>(f.out, 9, f.gen), 0.5);
  CHECK(f.set.at(1).A.data() == A1);
  auto after = multi::batched_apply(f.set, Wf, Xf, ids);
  for (Index t = 0; t < 12; ++t) {
    if (ids[static_cast<std::size_t>(t)] == 2)
      CHECK(rel_error(after.row(t), before.row(t)) > 1e-3);
    else
      CHECK(after.row(t) == before.row(t));
  }
  CHECK(rel_error(after, reference_apply(f.set, Wf.cast<double>(), Xf.cast<double>(), ids)) < 1e-5);

  f.set.remove(1);
  CHECK(f.set.size() == 2);
  CHECK_FALSE(f.set.contains(1));
  CHECK_THROWS_WITH(multi::batched_apply(f.set, Wf, Xf, ids),
                    Catch::Matchers::ContainsSubstring("token 1 asks for adapter id 1, which is not loaded"));
  const int again = f.set.add("new", random_matrix<float>(4, f.in, f.gen), random_matrix<float>(f.out, 4, f.gen), 1.0);
  CHECK(again == 1);  // freed id reused
  CHECK(f.set.find("new") == 1);
  CHECK(f.set.find("adapter2-v2") == 2);
  CHECK_FALSE(f.set.find("adapter1").has_value());
}

TEST_CASE("AdapterSet rejects mismatched shapes, ranks and ids with clear messages", "[multi][errors]") {
  using Catch::Matchers::ContainsSubstring;
  Generator gen(lora::test::fresh_seed());
  multi::AdapterSet<float> set(16, 8);
  CHECK_THROWS_WITH(set.add("x", random_matrix<float>(4, 15, gen), random_matrix<float>(8, 4, gen), 1.0),
                    ContainsSubstring("adapter 'x': lora_A has shape [4 x 15], expected [r x 16]"));
  CHECK_THROWS_WITH(set.add("x", random_matrix<float>(4, 16, gen), random_matrix<float>(9, 4, gen), 1.0),
                    ContainsSubstring("lora_B has shape [9 x 4], expected [8 x r]"));
  CHECK_THROWS_WITH(set.add("x", random_matrix<float>(4, 16, gen), random_matrix<float>(8, 3, gen), 1.0),
                    ContainsSubstring("lora_A has 4 rows and lora_B has 3 columns"));
  CHECK_THROWS_WITH(set.add("x", random_matrix<float>(9, 16, gen), random_matrix<float>(8, 9, gen), 1.0),
                    ContainsSubstring("adapter 'x': rank r = 9 exceeds min(in_features, out_features) = min(16, 8) = 8"));
  CHECK_THROWS_WITH(set.add("x", random_matrix<float>(4, 16, gen), random_matrix<float>(8, 4, gen), std::nan("")),
                    ContainsSubstring("AdapterSet: adapter 'x': scaling must be finite, got nan"));
  LowRankAdapter<float, cpu, rslora_scaling> ad(16, 8, 4, 8.0);
  initialize(ad, init_method::random, gen);
  const int id = set.add("rs", ad);
  CHECK(set.at(id).scaling == Approx(4.0));
  CHECK_THROWS_WITH(set.add("rs", ad), ContainsSubstring("adapter 'rs' is already loaded as id 0"));
  CHECK_THROWS_AS(set.remove(5), lora::error);
  CHECK_THROWS_AS(set.replace(3, "y", ad.A(), ad.B(), 1.0), lora::error);
  std::vector<int> ids = {0, 0};
  CHECK_THROWS_WITH(multi::batched_forward(set, Matrix<float>(random_matrix<float>(3, 16, gen)), ids),
                    ContainsSubstring("2 adapter ids given for 3 tokens"));
  CHECK_THROWS_AS(multi::batched_apply(set, Matrix<float>(random_matrix<float>(16, 8, gen)),
                                       Matrix<float>(random_matrix<float>(2, 16, gen)), ids),
                  lora::error);
  AdapterOptions o;
  o.fan_in_fan_out = true;
  LowRankAdapter<float> conv(16, 8, 2, 4.0, o);
  CHECK_THROWS_AS(set.add("conv", conv), lora::error);
}
