// lora/tp: sharded adapters on simulated ranks (threads + LocalGroup's all-reduce) against the
// unsharded layer computed in float64, for both layouts, world sizes 2-4 and dimensions that
// no world size divides.
#include <lora/tp.hpp>

#include <array>
#include <mutex>
#include <vector>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;
using tp::TpLayout;

namespace {

constexpr double tol = 2e-5;  // float arithmetic, compared with float64

// Per-rank results, written by the rank's thread into its own slot.
template <class T>
struct PerRank {
  std::vector<T> v;
  explicit PerRank(int world) : v(static_cast<std::size_t>(world)) {}
  T& operator[](int r) { return v[static_cast<std::size_t>(r)]; }
};

// Pastes rank pieces of a split dimension back together (columns or rows).
MatD join_cols(const std::vector<Matrix<float>>& parts) {
  Index cols = 0;
  for (auto& p : parts) cols += p.cols();
  MatD m(parts.front().rows(), cols);
  Index c = 0;
  for (auto& p : parts) {
    m.middleCols(c, p.cols()) = p.cast<double>();
    c += p.cols();
  }
  return m;
}
MatD join_rows(const std::vector<Matrix<float>>& parts) {
  Index rows = 0;
  for (auto& p : parts) rows += p.rows();
  MatD m(rows, parts.front().cols());
  Index r = 0;
  for (auto& p : parts) {
    m.middleRows(r, p.rows()) = p.cast<double>();
    r += p.rows();
  }
  return m;
}
// Every rank holds the same replicated result, bit for bit.
void require_replicated(const std::vector<Matrix<float>>& parts) {
  for (std::size_t k = 1; k < parts.size(); ++k) REQUIRE(parts[k] == parts[0]);
}

struct LoraRef {
  MatD Y, path, dA, dB, dX;  // path: the adapter's s·(X·Aᵀ)·Bᵀ alone
};
LoraRef lora_reference(const MatD& W, const MatD& A, const MatD& B, double s, const MatD& X, const MatD& dY) {
  LoraRef r;
  r.path = s * (X * A.transpose()) * B.transpose();
  r.Y = X * W.transpose() + r.path;
  r.dA = s * (dY * B).transpose() * X;
  r.dB = s * dY.transpose() * (X * A.transpose());
  r.dX = dY * W + s * (dY * B) * A;
  return r;
}

}  // namespace

TEST_CASE("shard_range cuts a dimension into contiguous pieces, the first n mod world one longer", "[tp]") {
  for (int world = 1; world <= 5; ++world)
    for (Index n : {Index(5), Index(13), Index(29), Index(64)}) {
      if (n < world) continue;
      Index next = 0;
      for (int k = 0; k < world; ++k) {
        const auto r = tp::shard_range(n, k, world);
        CHECK(r.offset == next);
        CHECK(r.size == n / world + (k < n % world ? 1 : 0));
        next += r.size;
      }
      CHECK(next == n);
    }
  CHECK_THROWS_WITH(tp::shard_range(3, 0, 4), Catch::Matchers::ContainsSubstring("cannot be split over 4 ranks"));
  CHECK_THROWS_WITH(tp::shard_range(8, 2, 2), Catch::Matchers::ContainsSubstring("rank 2 is outside [0, 2)"));
}

TEST_CASE("LocalGroup: all-reduce gives every rank the same sum; a failing rank fails the others", "[tp]") {
  Generator gen(lora::test::fresh_seed());
  const int world = 3;
  std::vector<std::vector<double>> in(world);
  for (auto& v : in)
    for (int i = 0; i < 17; ++i) v.push_back(gen.normal(0.0, 1.0));
  PerRank<std::vector<double>> out(world);
  tp::LocalGroup group(world);
  group.run([&](tp::LocalComm& c) {
    std::vector<double> v = in[static_cast<std::size_t>(c.rank())];
    c.all_reduce(std::span<double>(v));
    out[c.rank()] = v;
  });
  for (int i = 0; i < 17; ++i) {
    CHECK(out[0][static_cast<std::size_t>(i)] == Approx(in[0][i] + in[1][i] + in[2][i]).margin(1e-12));
    CHECK(out[1][static_cast<std::size_t>(i)] == out[0][static_cast<std::size_t>(i)]);
    CHECK(out[2][static_cast<std::size_t>(i)] == out[0][static_cast<std::size_t>(i)]);
  }
  // Rank 1 throws before its all-reduce: the others must not wait forever.
  CHECK_THROWS_WITH(group.run([&](tp::LocalComm& c) {
    if (c.rank() == 1) fail("rank 1 gave up");
    std::vector<float> v(4, 1.0f);
    c.all_reduce(std::span<float>(v));
  }),
                    Catch::Matchers::ContainsSubstring("gave up"));
  CHECK_THROWS_WITH(group.run([&](tp::LocalComm& c) {
    std::vector<float> v(static_cast<std::size_t>(4 + c.rank()), 1.0f);
    c.all_reduce(std::span<float>(v));
  }),
                    Catch::Matchers::ContainsSubstring("all-reduce mismatch"));
}

TEST_CASE("LoRA: sharded forward and backward equal the unsharded layer (column and row, world 2-4)", "[tp]") {
  Generator gen(lora::test::fresh_seed());
  // No world size in 2..4 divides out or in; r = 5 is not divisible either.
  const Index in = 29, out = 23, r = 5, T = 7;
  const bool fifo = GENERATE(false, true);
  INFO("fan_in_fan_out = " << fifo);
  const MatD Wd = random_matrix(out, in, gen), Ad = random_matrix(r, in, gen, 0.3), Bd = random_matrix(out, r, gen, 0.3);
  const MatD Xd = random_matrix(T, in, gen), dYd = random_matrix(T, out, gen);
  const Matrix<float> W = (fifo ? MatD(Wd.transpose()) : Wd).cast<float>(), X = Xd.cast<float>();
  const Matrix<float> dY = dYd.cast<float>();
  AdapterOptions opts;
  opts.fan_in_fan_out = fifo;
  opts.name = "layers.0.proj";
  auto full = LowRankAdapter<float>::from_factors(Ad.cast<float>(), Bd.cast<float>(), /*alpha=*/7.0, opts);
  full.rescale(0.75);
  // The reference: the float inputs in float64, W as [out × in].
  const MatD Wr = fifo ? MatD(W.cast<double>().transpose()) : MatD(W.cast<double>());
  const LoraRef ref = lora_reference(Wr, full.A().cast<double>(), full.B().cast<double>(), full.scaling(),
                                     X.cast<double>(), dY.cast<double>());

  {  // a world of one is the unsharded layer
    tp::SelfComm self;
    for (TpLayout layout : {TpLayout::column, TpLayout::row}) {
      const auto whole = tp::shard(full, layout, 0, 1);
      CHECK(whole.A() == full.A());
      CHECK(whole.B() == full.B());
      CHECK(rel_error(tp::apply(whole, layout, W, X, self), ref.Y) < tol);
    }
  }
  for (int world = 2; world <= 4; ++world) {
    INFO("world = " << world);
    tp::LocalGroup group(world);
    {  // column-parallel
      PerRank<Matrix<float>> Y(world), dA(world), dB(world), dX(world), fwd(world);
      PerRank<double> scaling(world);
      group.run([&](tp::LocalComm& c) {
        const auto local = tp::shard(full, TpLayout::column, c.rank(), world);
        scaling[c.rank()] = local.scaling();
        const Matrix<float> Wk = tp::shard_weight<float>(W, TpLayout::column, c.rank(), world, fifo);
        const auto range = tp::shard_range(out, c.rank(), world);
        Y[c.rank()] = tp::apply(local, TpLayout::column, Wk, X, c);
        fwd[c.rank()] = tp::forward(local, TpLayout::column, X, c);
        const Matrix<float> dYk = dY.middleCols(range.offset, range.size);
        auto g = tp::backward(local, TpLayout::column, Wk, X, dYk, c);
        dA[c.rank()] = g.dA;
        dB[c.rank()] = g.dB;
        dX[c.rank()] = g.dX;
      });
      for (double sc : scaling.v) CHECK(sc == full.scaling());
      CHECK(rel_error(join_cols(Y.v), ref.Y) < tol);
      CHECK(rel_error(join_cols(fwd.v), ref.path) < tol);
      require_replicated(dA.v);
      require_replicated(dX.v);
      CHECK(rel_error(dA.v[0], ref.dA) < tol);
      CHECK(rel_error(join_rows(dB.v), ref.dB) < tol);
      CHECK(rel_error(dX.v[0], ref.dX) < tol);
    }
    for (auto mode : {tp::RowReduce::fold, tp::RowReduce::separate}) {
      INFO("row-parallel, " << (mode == tp::RowReduce::fold ? "fold" : "separate"));
      PerRank<Matrix<float>> Y(world), dA(world), dB(world), dX(world), fwd(world);
      group.run([&](tp::LocalComm& c) {
        const auto local = tp::shard(full, TpLayout::row, c.rank(), world);
        const Matrix<float> Wk = tp::shard_weight<float>(W, TpLayout::row, c.rank(), world, fifo);
        const auto range = tp::shard_range(in, c.rank(), world);
        const Matrix<float> Xk = X.middleCols(range.offset, range.size);
        Y[c.rank()] = tp::apply(local, TpLayout::row, Wk, Xk, c, mode);
        fwd[c.rank()] = tp::forward(local, TpLayout::row, Xk, c);
        auto g = tp::backward(local, TpLayout::row, Wk, Xk, dY, c);
        dA[c.rank()] = g.dA;
        dB[c.rank()] = g.dB;
        dX[c.rank()] = g.dX;
      });
      require_replicated(Y.v);
      require_replicated(fwd.v);
      require_replicated(dB.v);
      CHECK(rel_error(Y.v[0], ref.Y) < tol);
      CHECK(rel_error(fwd.v[0], ref.path) < tol);
      CHECK(rel_error(join_cols(dA.v), ref.dA) < tol);
      CHECK(rel_error(dB.v[0], ref.dB) < tol);
      CHECK(rel_error(join_cols(dX.v), ref.dX) < tol);
    }
  }
}

TEST_CASE("DoRA: sharded forward and backward equal the unsharded layer; row shards all-reduce the row norms",
          "[tp][dora]") {
  Generator gen(lora::test::fresh_seed());
  const Index in = 29, out = 23, r = 5, T = 6;
  const MatD Wd = random_matrix(out, in, gen), Ad = random_matrix(r, in, gen, 0.3), Bd = random_matrix(out, r, gen, 0.3);
  const Matrix<float> W = Wd.cast<float>(), X = random_matrix<float>(T, in, gen), dY = random_matrix<float>(T, out, gen);
  auto lora = LowRankAdapter<float>::from_factors(Ad.cast<float>(), Bd.cast<float>(), /*alpha=*/10.0);
  Vector<float> m(out);
  for (Index i = 0; i < out; ++i) m(i) = static_cast<float>(gen.uniform(0.5, 2.0));
  const DoraAdapter<float> full(lora, m);

  // float64 reference, n held constant in backward (PEFT).
  const MatD A = full.lora().A().cast<double>(), B = full.lora().B().cast<double>(), Xr = X.cast<double>();
  const MatD dYr = dY.cast<double>();
  const double s = full.lora().scaling();
  const MatD V = W.cast<double>() + s * B * A;
  const Eigen::VectorXd n = V.rowwise().norm();
  const Eigen::VectorXd c = m.cast<double>().cwiseQuotient(n);
  const MatD Y = (Xr * V.transpose()) * c.asDiagonal();
  const MatD G = dYr * c.asDiagonal();
  const MatD dA = s * (G * B).transpose() * Xr, dB = s * G.transpose() * (Xr * A.transpose()), dX = G * V;
  const Eigen::VectorXd dm = (dYr.array() * (Xr * V.transpose()).array()).colwise().sum().transpose().matrix().cwiseQuotient(n);

  for (int world = 2; world <= 4; ++world) {
    INFO("world = " << world);
    tp::LocalGroup group(world);
    for (TpLayout layout : {TpLayout::column, TpLayout::row}) {
      INFO(tp::layout_name(layout));
      const bool col = layout == TpLayout::column;
      PerRank<Matrix<float>> Yk(world), dAk(world), dBk(world), dXk(world);
      PerRank<Vector<float>> nk(world), dmk(world), mk(world);
      group.run([&](tp::LocalComm& cm) {
        const auto local = tp::shard(full, layout, cm.rank(), world);
        const Matrix<float> Wk = tp::shard_weight<float>(W, layout, cm.rank(), world);
        const auto range = tp::shard_range(col ? out : in, cm.rank(), world);
        const Matrix<float> Xk = col ? X : Matrix<float>(X.middleCols(range.offset, range.size));
        const Matrix<float> dYk = col ? Matrix<float>(dY.middleCols(range.offset, range.size)) : dY;
        mk[cm.rank()] = local.magnitude();
        nk[cm.rank()] = tp::weight_norm(local, layout, Wk, cm);
        Yk[cm.rank()] = tp::apply(local, layout, Wk, Xk, cm);
        auto g = tp::backward(local, layout, Wk, Xk, dYk, cm);
        dAk[cm.rank()] = g.dA;
        dBk[cm.rank()] = g.dB;
        dXk[cm.rank()] = g.dX;
        dmk[cm.rank()] = g.dm;
      });
      auto vcat = [](const std::vector<Vector<float>>& v) {
        std::vector<Matrix<float>> mats;
        for (auto& x : v) mats.push_back(Matrix<float>(Eigen::Map<const Matrix<float>>(x.data(), x.size(), 1)));
        return join_rows(mats);
      };
      if (col) {
        CHECK(vcat(mk.v) == MatD(m.cast<double>()));
        CHECK(rel_error(vcat(nk.v), MatD(n)) < tol);
        CHECK(rel_error(join_cols(Yk.v), Y) < tol);
        require_replicated(dAk.v);
        require_replicated(dXk.v);
        CHECK(rel_error(dAk.v[0], dA) < tol);
        CHECK(rel_error(join_rows(dBk.v), dB) < tol);
        CHECK(rel_error(dXk.v[0], dX) < tol);
        CHECK(rel_error(vcat(dmk.v), MatD(dm)) < tol);
      } else {
        for (int k = 0; k < world; ++k) CHECK(mk[k] == m);
        CHECK(rel_error(nk[0], n) < tol);
        require_replicated(Yk.v);
        require_replicated(dBk.v);
        CHECK(rel_error(Yk.v[0], Y) < tol);
        CHECK(rel_error(join_cols(dAk.v), dA) < tol);
        CHECK(rel_error(dBk.v[0], dB) < tol);
        CHECK(rel_error(join_cols(dXk.v), dX) < tol);
        CHECK(rel_error(dmk.v[0], dm) < tol);
        CHECK(dmk.v[1] == dmk.v[0]);
      }
    }
  }
}

TEST_CASE("AdapterSet: a mixed-adapter batch on sharded sets equals the unsharded batch, forward and backward",
          "[tp][multi]") {
  Generator gen(lora::test::fresh_seed());
  const Index in = 29, out = 23, T = 11;
  multi::AdapterSet<float> set(in, out);
  const Index ranks[] = {3, 5, 2};
  for (int i = 0; i < 3; ++i)
    set.add(fmt::format("a{}", i), random_matrix<float>(ranks[i], in, gen, 0.3), random_matrix<float>(out, ranks[i], gen, 0.3),
            gen.uniform(0.5, 2.0));
  set.remove(1);  // ids stay: 0 and 2 loaded, 1 free
  set.insert(1, "a1b", random_matrix<float>(4, in, gen, 0.3), random_matrix<float>(out, 4, gen, 0.3), 1.5);
  std::vector<int> ids(static_cast<std::size_t>(T));
  for (auto& id : ids) id = static_cast<int>(gen.next() % 4) - 1;  // -1 (base only), 0, 1, 2, interleaved
  ids[0] = 2;
  ids[1] = -1;
  const Matrix<float> W = random_matrix<float>(out, in, gen), X = random_matrix<float>(T, in, gen);
  const Matrix<float> dY = random_matrix<float>(T, out, gen);

  // float64 reference, token by token.
  const MatD Xr = X.cast<double>(), Wr = W.cast<double>(), dYr = dY.cast<double>();
  MatD Y = Xr * Wr.transpose(), dX = dYr * Wr;
  std::vector<MatD> dA(3), dB(3);
  for (int id = 0; id < 3; ++id) {
    const auto& sl = set.at(id);
    dA[static_cast<std::size_t>(id)] = MatD::Zero(sl.A.rows(), in);
    dB[static_cast<std::size_t>(id)] = MatD::Zero(out, sl.A.rows());
  }
  for (Index t = 0; t < T; ++t) {
    const int id = ids[static_cast<std::size_t>(t)];
    if (id < 0) continue;
    const auto& sl = set.at(id);
    const MatD A = sl.A.cast<double>(), B = sl.B.cast<double>();
    const double s = sl.scaling;
    Y.row(t) += s * (Xr.row(t) * A.transpose()) * B.transpose();
    dA[static_cast<std::size_t>(id)] += s * (dYr.row(t) * B).transpose() * Xr.row(t);
    dB[static_cast<std::size_t>(id)] += s * dYr.row(t).transpose() * (Xr.row(t) * A.transpose());
    dX.row(t) += s * (dYr.row(t) * B) * A;
  }
  const bool used[3] = {std::count(ids.begin(), ids.end(), 0) > 0, std::count(ids.begin(), ids.end(), 1) > 0, true};

  for (int world = 2; world <= 4; ++world) {
    INFO("world = " << world);
    tp::LocalGroup group(world);
    for (TpLayout layout : {TpLayout::column, TpLayout::row}) {
      INFO(tp::layout_name(layout));
      const bool col = layout == TpLayout::column;
      PerRank<Matrix<float>> Yk(world), dXk(world);
      PerRank<std::vector<Matrix<float>>> dAk(world), dBk(world);
      PerRank<std::vector<std::string>> names(world);
      group.run([&](tp::LocalComm& cm) {
        const auto local = tp::shard(set, layout, cm.rank(), world);
        for (int id = 0; id < local.capacity(); ++id) names[cm.rank()].push_back(local.at(id).name);
        const Matrix<float> Wk = tp::shard_weight<float>(W, layout, cm.rank(), world);
        const auto range = tp::shard_range(col ? out : in, cm.rank(), world);
        const Matrix<float> Xk = col ? X : Matrix<float>(X.middleCols(range.offset, range.size));
        const Matrix<float> dYk = col ? Matrix<float>(dY.middleCols(range.offset, range.size)) : dY;
        Yk[cm.rank()] = tp::batched_apply(local, layout, Wk, Xk, ids, cm);
        auto g = tp::batched_backward(local, layout, Xk, ids, dYk, cm, &Wk);
        dAk[cm.rank()] = g.dA;
        dBk[cm.rank()] = g.dB;
        dXk[cm.rank()] = g.dX;
      });
      for (int k = 0; k < world; ++k) CHECK(names[k] == std::vector<std::string>{"a0", "a1b", "a2"});
      if (col) {
        CHECK(rel_error(join_cols(Yk.v), Y) < tol);
        require_replicated(dXk.v);
        CHECK(rel_error(dXk.v[0], dX) < tol);
      } else {
        require_replicated(Yk.v);
        CHECK(rel_error(Yk.v[0], Y) < tol);
        CHECK(rel_error(join_cols(dXk.v), dX) < tol);
      }
      for (std::size_t id = 0; id < 3; ++id) {
        INFO("adapter id " << id);
        if (!used[id]) {
          CHECK(dAk.v[0][id].size() == 0);
          continue;
        }
        std::vector<Matrix<float>> a, b;
        for (int k = 0; k < world; ++k) {
          a.push_back(dAk[k][id]);
          b.push_back(dBk[k][id]);
        }
        if (col) {
          require_replicated(a);
          CHECK(rel_error(a[0], dA[id]) < tol);
          CHECK(rel_error(join_rows(b), dB[id]) < tol);
        } else {
          require_replicated(b);
          CHECK(rel_error(join_cols(a), dA[id]) < tol);
          CHECK(rel_error(b[0], dB[id]) < tol);
        }
      }
    }
  }
}

TEST_CASE("load_peft_shard reads each rank's slice of a PEFT folder: equal to sharding the loaded adapter",
          "[tp][peft]") {
  Generator gen(lora::test::fresh_seed());
  lora::test::TempDir tmp("tp-peft");
  const Index in = 29, out = 23;
  const bool dora = GENERATE(false, true);
  const io::dtype type = GENERATE(io::dtype::F32, io::dtype::BF16);
  INFO("dora = " << dora << ", dtype = " << io::dtype_name(type));
  io::PeftAdapter a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  for (const char* name : {"model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
                           "model.layers.0.self_attn.qkv_proj"}) {
    AdapterOptions opts;
    opts.name = name;
    io::PeftModule mod{name,
                       LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                           random_matrix<float>(4, in, gen), random_matrix<float>(out, 4, gen), 8.0, opts),
                       io::dtype::F32, io::PeftModuleKind::linear, std::nullopt};
    if (dora) {
      Vector<float> m(out);
      for (Index i = 0; i < out; ++i) m(i) = static_cast<float>(gen.uniform(0.5, 2.0));
      mod.adapter = DoraAdapter<float, cpu, dynamic_scaling>(mod.adapter.lora(), m);
    } else {
      Vector<float> b(out);
      for (Index i = 0; i < out; ++i) b(i) = static_cast<float>(gen.normal(0.0, 1.0));
      mod.lora_bias = b;
    }
    a.modules.push_back(std::move(mod));
  }
  io::save_peft_adapter(tmp.path / "a", a, type);
  const io::PeftAdapter whole = io::load_peft_adapter(tmp.path / "a");
  const int world = 3;
  for (int rank = 0; rank < world; ++rank) {
    const tp::PeftShard s = tp::load_peft_shard(tmp.path / "a", rank, world);
    REQUIRE(s.modules.size() == 3);
    for (const io::PeftModule& w : whole.modules) {
      INFO(w.name << ", rank " << rank);
      const tp::PeftShardModule& m = s.at(w.name);
      CHECK(m.layout == tp::megatron_layout(w.name));
      CHECK(m.in_features == in);
      CHECK(m.out_features == out);
      CHECK(m.module.adapter.scaling() == w.adapter.scaling());
      if (!m.layout) {  // fused qkv_proj: whole
        CHECK(m.module.adapter.A() == w.adapter.A());
        CHECK(m.module.adapter.B() == w.adapter.B());
        CHECK(m.module.is_dora() == w.is_dora());
        if (dora) CHECK(m.module.adapter.magnitude() == w.adapter.magnitude());
        CHECK(m.module.lora_bias == w.lora_bias);
        continue;
      }
      const auto want = tp::shard(w.adapter.lora(), *m.layout, rank, world);
      CHECK(m.range == tp::shard_range(*m.layout == TpLayout::column ? out : in, rank, world));
      CHECK(m.module.adapter.A() == want.A());
      CHECK(m.module.adapter.B() == want.B());
      const bool col = *m.layout == TpLayout::column;
      auto cut = [&](const Vector<float>& v) {
        return col ? Vector<float>(v.segment(m.range.offset, m.range.size)) : v;
      };
      if (dora) {
        REQUIRE(m.module.is_dora());
        CHECK(m.module.adapter.magnitude() == cut(w.adapter.magnitude()));
      } else {
        REQUIRE(m.module.lora_bias);
        CHECK(*m.module.lora_bias == cut(*w.lora_bias));
      }
    }
  }
  CHECK_THROWS_WITH(tp::load_peft_shard(tmp.path / "a", 0, 30),
                    Catch::Matchers::ContainsSubstring("cannot be split over 30 ranks"));
}

TEST_CASE("sharding refuses what it cannot split, naming the adapter, layout and rank", "[tp]") {
  Generator gen(lora::test::fresh_seed());
  AdapterOptions opts;
  opts.name = "down";
  const auto ad = LowRankAdapter<float>::from_factors(random_matrix<float>(6, 12, gen), random_matrix<float>(20, 6, gen),
                                                      12.0, opts);
  // row-parallel over 4: in_k = 3 < r = 6
  CHECK_THROWS_WITH(tp::shard(ad, TpLayout::row, 1, 4),
                    Catch::Matchers::ContainsSubstring("tp::shard (row-parallel, rank 1 of 4), adapter 'down'") &&
                        Catch::Matchers::ContainsSubstring("rank r = 6 exceeds"));
  CHECK_THROWS_WITH(tp::shard(ad, TpLayout::column, 0, 21), Catch::Matchers::ContainsSubstring("cannot be split"));
  CHECK_NOTHROW(tp::shard(ad, TpLayout::column, 2, 3));
  const Matrix<float> W = random_matrix<float>(20, 12, gen);
  CHECK_THROWS_WITH(tp::shard_weight<float>(W, TpLayout::row, tp::ShardRange{10, 4}),
                    Catch::Matchers::ContainsSubstring("is not a non-empty part of [0, 12)"));
}

TEST_CASE("read_block converts just a block of a mapped tensor, any float dtype", "[tp][peft]") {
  Generator gen(lora::test::fresh_seed());
  const Matrix<float> M = random_matrix<float>(9, 13, gen);
  for (io::dtype type : {io::dtype::F32, io::dtype::F16, io::dtype::BF16, io::dtype::F64}) {
    INFO(io::dtype_name(type));
    const auto bytes = io::serialize_safetensors({io::TensorData::from_matrix("m", M, type)});
    const auto f = io::SafetensorsFile::from_bytes(bytes, "block.safetensors");
    const Matrix<float> whole = f.tensor("m").to_matrix<float>();
    for (auto [r0, nr, c0, nc] : {std::array<Index, 4>{0, 9, 0, 13}, {2, 3, 5, 7}, {8, 1, 12, 1}, {0, 9, 6, 1}})
      CHECK(tp::read_block<float>(f.tensor("m"), r0, nr, c0, nc) == whole.block(r0, c0, nr, nc));
    CHECK_THROWS_WITH(tp::read_block<float>(f.tensor("m"), 4, 6, 0, 1),
                      Catch::Matchers::ContainsSubstring("block.safetensors: tensor 'm' is [9 x 13]; the block rows [4, 10)"));
  }
}
