// Serving several PEFT adapters over one base model in one batch.
//
//   multi_adapter <base model.safetensors> <adapter folder> [<adapter folder> ...]
//   e.g. (base model, then the adapters)
//     multi_adapter tests/data/peft/weighted_combos/base/model.safetensors tests/data/peft/weighted_combos/adapters/{a1,a2,a3}
//
// Loads every adapter into one AdapterCollection, builds a batch whose tokens use
// different adapters (and some none), runs each adapted module once for the
// whole batch, and checks every token against its adapter applied alone.
#include <lora/io/safetensors.hpp>
#include <lora/multi/peft_collection.hpp>

#include <filesystem>
#include <fmt/format.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr, "usage: {} <base model.safetensors> <adapter folder>...\n", argv[0]);
    return 2;
  }
  try {
    auto base = lora::io::SafetensorsFile::open(argv[1]);
    lora::multi::AdapterCollection collection;
    std::vector<lora::io::PeftAdapter> alone;
    for (int i = 2; i < argc; ++i) {
      const std::string name = std::filesystem::path(argv[i]).filename().string();
      const int id = collection.load(name, argv[i]);
      alone.push_back(lora::io::load_peft_adapter(argv[i]));
      fmt::print("adapter {} = '{}' (r = {}, alpha = {:g}{})\n", id, name, alone.back().config.r,
                 alone.back().config.lora_alpha, alone.back().config.use_rslora ? ", rsLoRA" : "");
    }
    const int n = argc - 2;
    lora::Generator gen(42);
    std::vector<int> ids(16);
    for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<int>(t % static_cast<std::size_t>(n + 1)) - 1;
    fmt::print("token adapter ids: [{}]  (-1 = base model only)\n\n", fmt::join(ids, ", "));

    double worst = 0;
    for (const auto& [module, set] : collection.layers()) {
      const auto W = base.tensor(module + ".weight").to_matrix<float>();
      lora::Matrix<float> X(static_cast<lora::Index>(ids.size()), W.cols());
      for (lora::Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(gen.normal());
      const auto Y = lora::multi::batched_apply(set, W, X, collection.layer_ids(module, ids));
      double module_worst = 0;
      for (lora::Index t = 0; t < X.rows(); ++t) {
        const int id = ids[static_cast<std::size_t>(t)];
        const auto* m = id >= 0 ? alone[static_cast<std::size_t>(id)].find(module) : nullptr;
        const lora::Matrix<float> want = m ? m->adapter.apply(W, X.row(t)) : lora::Matrix<float>(X.row(t) * W.transpose());
        module_worst = std::max(module_worst, static_cast<double>((Y.row(t) - want).norm() / want.norm()));
      }
      worst = std::max(worst, module_worst);
      fmt::print("{:<36} {} adapters, max rank {:>2}: max relative difference to single-adapter output {:.1e}\n",
                 module, set.size(), set.max_rank(), module_worst);
    }
    fmt::print("\n{}\n", worst < 1e-5 ? "every token matches its own adapter." : "MISMATCH");
    return worst < 1e-5 ? 0 : 1;
  } catch (const lora::error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
