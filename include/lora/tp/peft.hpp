#pragma once
// Loading a PEFT adapter folder as the shard one tensor-parallel rank needs: the safetensors
// file is memory-mapped and each factor's slice is converted straight from the mapping, so a
// rank touches only the pages of its rows (B of a column-parallel module: one contiguous run)
// or of its row pieces (A of a row-parallel module: r runs of in_k elements).
//
//   auto s = lora::tp::load_peft_shard("adapters/math", rank, world);   // Megatron layouts by name
//   const auto& q = s.at("model.layers.0.self_attn.q_proj");            // column: B rows [range)
//   auto Y = lora::tp::apply(q.module.adapter.lora(), *q.layout, Wq_k, X, comm);

#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/tp/shard.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lora::tp {

/// Rows [row0, row0 + rows) × columns [col0, col0 + cols) of a 2-D tensor (a 1-D tensor of n
/// elements reads as [n × 1]), converted to S, reading only those elements of the mapping.
template <class S>
Matrix<S> read_block(const io::TensorView& t, Index row0, Index rows, Index col0, Index cols) {
  if (t.shape.empty() || t.shape.size() > 2)
    fail("{}: tensor '{}' has {} dimensions, expected a matrix (1 or 2)", t.file, t.name, t.shape.size());
  const Index R = static_cast<Index>(t.shape[0]);
  const Index Cn = t.shape.size() == 2 ? static_cast<Index>(t.shape[1]) : 1;
  if (row0 < 0 || rows < 0 || col0 < 0 || cols < 0 || row0 + rows > R || col0 + cols > Cn)
    fail("{}: tensor '{}' is [{} x {}]; the block rows [{}, {}) x columns [{}, {}) is outside it", t.file, t.name, R,
         Cn, row0, row0 + rows, col0, col0 + cols);
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    const std::int64_t first = static_cast<std::int64_t>(row0 + i) * Cn + col0;
    if constexpr (std::is_same_v<S, float>) {
      if (t.type == io::dtype::F32) {
        std::memcpy(m.row(i).data(), t.bytes.data() + static_cast<std::size_t>(first) * 4,
                    static_cast<std::size_t>(cols) * 4);
        continue;
      }
    }
    for (Index j = 0; j < cols; ++j) m(i, j) = t.template at<S>(first + j);
  }
  return m;
}

/// The Megatron / vLLM layout of a module, by its last path component: q/k/v/gate/up
/// projections (q_proj, k_proj, v_proj, gate_proj, up_proj, Mixtral's w1, w3, fc1) are
/// column-parallel; o/down (o_proj, down_proj, w2, fc2, out_proj) row-parallel. nullopt for
/// anything else (names like `dense` mean different things in different models), and for
/// fused projections (qkv_proj, gate_up_proj, c_attn, query_key_value): an engine splits each
/// part of a fused output separately, which one contiguous cut of B does not reproduce, so
/// they are loaded whole; pass your own `layout_of` to split them otherwise.
inline std::optional<TpLayout> megatron_layout(std::string_view module) {
  const auto dot = module.rfind('.');
  const std::string_view leaf = dot == std::string_view::npos ? module : module.substr(dot + 1);
  for (std::string_view c : {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "fc1"})
    if (leaf == c) return TpLayout::column;
  for (std::string_view r : {"o_proj", "down_proj", "w2", "fc2", "out_proj"})
    if (leaf == r) return TpLayout::row;
  return std::nullopt;
}

/// One module as a rank holds it.
struct PeftShardModule {
  /// The rank's factors (column: B rows [range); row: A columns [range)), with the DoRA
  /// magnitude and lora_B.bias cut like the output (column: [range); row: whole; a row-
  /// parallel bias is added once, after the all-reduce).
  io::PeftModule module;
  std::optional<TpLayout> layout;  ///< nullopt: loaded whole (replicated on every rank)
  ShardRange range;                ///< the piece of out (column) or in (row); the whole dimension when replicated
  Index in_features = 0, out_features = 0;  ///< of the whole layer
};

/// The shard of an adapter folder for one rank. Whole tensors the folder carries
/// (modules_to_save, trainable tokens) are not part of it: they replace base tensors and are
/// read with io::load_peft_adapter where needed.
struct PeftShard {
  io::PeftConfig config;
  int rank = 0, world = 1;
  std::vector<PeftShardModule> modules;  ///< sorted by name

  const PeftShardModule* find(std::string_view name) const {
    auto it = std::lower_bound(modules.begin(), modules.end(), name,
                               [](const PeftShardModule& m, std::string_view n) { return m.module.name < n; });
    return it != modules.end() && it->module.name == name ? &*it : nullptr;
  }
  const PeftShardModule& at(std::string_view name) const {
    if (auto* m = find(name)) return *m;
    fail("tp::PeftShard (rank {} of {}): no module '{}' ({} modules)", rank, world, name, modules.size());
  }
};

/// Loads the modules of a PEFT folder (checked as io::load_peft_adapter checks them) as rank
/// `rank` of `world` holds them, each split by `layout_of(module)` (megatron_layout by
/// default; nullopt and embedding modules: whole), reading only the rank's slice of each
/// sharded factor from the mapped file. Throws lora::error naming the folder and module when a
/// piece would be empty or r exceeds a shard's dimension.
inline PeftShard load_peft_shard(const std::filesystem::path& folder, int rank, int world,
                                 const std::function<std::optional<TpLayout>(std::string_view)>& layout_of =
                                     megatron_layout) {
  auto opened = io::detail::open_peft_folder(folder);
  PeftShard out;
  out.config = std::move(opened.first);
  out.rank = rank;
  out.world = world;
  const io::SafetensorsFile& f = opened.second;
  const io::PeftConfig& cfg = out.config;
  const io::PeftFileTensors scan = io::scan_peft_tensors(f, cfg);
  if (!scan.params.empty())
    fail("{}: tp::load_peft_shard: {} LoRA(s) on parameters (target_parameters, e.g. '{}'), which tensor-parallel "
         "loading does not support", f.path(), scan.params.size(), scan.params.front().path);
  for (const io::PeftModuleTensors& p : scan.modules) {
    const Index r = static_cast<Index>(p.A->shape[0]);
    const Index in = static_cast<Index>(p.A->shape[1]), outf = static_cast<Index>(p.B->shape[0]);
    const std::optional<TpLayout> layout =
        p.kind == io::PeftModuleKind::embedding ? std::nullopt : layout_of(p.name);
    const std::string where = layout ? fmt::format("{}: {}", f.path(), detail::where(*layout, rank, world))
                                     : f.path();
    const bool col = layout == TpLayout::column;
    ShardRange range = {0, layout == TpLayout::row ? in : outf};
    if (layout)
      range = detail::with_context(where, p.name, [&] { return shard_range(col ? outf : in, rank, world); });
    AdapterOptions opts;
    opts.fan_in_fan_out = cfg.fan_in_fan_out;
    opts.name = p.name;
    const double alpha = cfg.alpha_for(p.name);
    const dynamic_scaling policy{cfg.use_rslora};
    auto adapter = detail::with_context(where, p.name, [&] {
      if (p.kind == io::PeftModuleKind::embedding)
        return embedding_adapter<float, dynamic_scaling>(p.A->to_matrix<float>(), p.B->to_matrix<float>(), alpha,
                                                         opts, policy);
      Matrix<float> A = layout == TpLayout::row ? read_block<float>(*p.A, 0, r, range.offset, range.size)
                                                : p.A->to_matrix<float>();
      Matrix<float> B = col ? read_block<float>(*p.B, range.offset, range.size, 0, r) : p.B->to_matrix<float>();
      return LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(std::move(A), std::move(B), alpha, opts, policy);
    });
    auto vec = [&](const io::TensorView* v) {
      const Matrix<float> m = col ? read_block<float>(*v, range.offset, range.size, 0, 1) : v->to_matrix<float>();
      return Vector<float>(Eigen::Map<const Vector<float>>(m.data(), m.size()));
    };
    std::optional<Vector<float>> magnitude;
    if (p.magnitude) magnitude = vec(p.magnitude);
    io::PeftModule mod{p.name,
                       detail::with_context(where, p.name, [&] {
                         return ModuleAdapter<float, cpu, dynamic_scaling>(std::move(adapter), std::move(magnitude));
                       }),
                       p.A->type, p.kind, std::nullopt};
    if (p.bias) mod.lora_bias = vec(p.bias);
    out.modules.push_back({std::move(mod), layout, range, in, outf});
  }
  return out;
}

}  // namespace lora::tp
