#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/multi/peft_collection.hpp>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::MatD;
using lora::test::rel_error;

namespace {
}  // namespace

TEST_CASE("a folder of PEFT adapters serves a mixed batch: each token gets what its adapter alone gives",
          "[multi][peft]") {
  multi::AdapterCollection c;
  const int a1 = c.load("a1", data("peft/weighted_combos/adapters/a1"));
  const int a2 = c.load("a2", data("peft/weighted_combos/adapters/a2"));
  const int a3 = c.load("a3", data("peft/weighted_combos/adapters/a3"));
  CHECK(c.names() == std::vector<std::string>{"a1", "a2", "a3"});
  auto base = io::SafetensorsFile::open(data("peft/weighted_combos/base/model.safetensors"));
  const auto single = std::vector<io::PeftAdapter>{io::load_peft_adapter(data("peft/weighted_combos/adapters/a1")),
                                                   io::load_peft_adapter(data("peft/weighted_combos/adapters/a2")),
                                                   io::load_peft_adapter(data("peft/weighted_combos/adapters/a3"))};
  Generator gen(lora::test::fresh_seed());
  int modules = 0;
  for (const auto& [name, set] : c.layers()) {
    INFO(name);
    const Matrix<float> W = base.tensor(name + ".weight").to_matrix<float>();
    const Index T = 24;
    Matrix<float> X = lora::test::random_matrix<float>(T, W.cols(), gen);
    std::vector<int> ids(T);
    for (auto& i : ids) i = static_cast<int>(gen.next() % 4) - 1;
    const auto Y = multi::batched_apply(set, W, X, c.layer_ids(name, ids));
    for (Index t = 0; t < T; ++t) {
      const int id = ids[static_cast<std::size_t>(t)];
      Matrix<float> want;
      if (id < 0 || !single[static_cast<std::size_t>(id)].contains(name))
        want = X.row(t) * W.transpose();
      else
        want = single[static_cast<std::size_t>(id)].at(name).adapter.apply(W, X.row(t));
      CHECK(rel_error(Y.row(t), want) < 1e-5);
    }
    ++modules;
  }
  // q, v and down of every layer of the base
  CHECK(modules == lora::test::peft_case_modules("weighted_combos", "adapters/a1"));
  CHECK(a1 == 0);
  CHECK(a3 == 2);

  // hot-swap: unload a2, load it again under another name: it takes the free id 1
  c.unload("a2");
  CHECK(c.id_of("a2") == -1);
  CHECK_THROWS_WITH(c.layer_ids("model.layers.0.self_attn.q_proj", std::vector<int>{1}),
                    Catch::Matchers::ContainsSubstring("adapter id 1 is not loaded"));
  CHECK(c.load("a2-again", data("peft/weighted_combos/adapters/a2")) == a2);
  CHECK_THROWS_WITH(c.load("a1", data("peft/weighted_combos/adapters/a1")),
                    Catch::Matchers::ContainsSubstring("an adapter named 'a1' is already loaded"));
  CHECK_THROWS_WITH(c.load("dora", data("peft/dora_r4_a8_qv/adapter")), Catch::Matchers::ContainsSubstring("DoRA"));
  CHECK_THROWS_AS(c.layer("model.layers.0.mlp.up_proj"), lora::error);
}
