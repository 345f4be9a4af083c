#pragma once
// Merging PEFT adapters into a checkpoint, tensor by tensor, as PEFT's merge_and_unload()
// followed by saving the state dict does:
//
//   LoRA:  W' = W + scale·s·B·A
//   DoRA:  W' = (m ⊘ n) ⊙ (W + scale·s·B·A),  n = ‖W + scale·s·B·A‖_row
//   embedding LoRA: E' = E + scale·s·(B·A)ᵀ;   lora_bias: b' = b + scale·s·b_B
//   modules_to_save copies replace the base tensor; trainable-token rows replace rows
//
// computed in float (double for F64 tensors) from the stored dtype and rounded once to the
// output dtype; tensors that nothing changes are copied byte for byte (or converted when an
// output dtype is given, as model.to(dtype) would). Several adapters merge in order, each on
// the result of the one before (no rounding in between). Adapter paths are mapped onto the
// base's keys (resolve_base_keys: with or without model./transformer./language_model.).
// A folder output from a folder base carries the base's other files (config.json with its
// dtype set to what was written, tokenizer, generation config).
//
//   auto base = lora::io::Checkpoint::open("Llama-3.2-1B/");
//   auto a = lora::io::load_peft_adapter("my-adapter/"), b = lora::io::load_peft_adapter("style/");
//   lora::io::merge_peft_checkpoint(base, a, "merged/", {});
//   lora::io::merge_peft_checkpoint(base, {{&a, 1.0}, {&b, 0.5}}, "stacked/");

#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#if defined(_OPENMP)
#define LORA_IO_OMP(x) _Pragma(#x)
#else
#define LORA_IO_OMP(x)
#endif

namespace lora::io {

namespace detail {

inline float bf16_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/// Round to nearest even, NaN kept quiet (as torch and Eigen do).
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);  // a select, vectorises
}

/// n elements of type `t` at `src` → C.
template <class C>
void load_as(dtype t, const std::byte* src, C* out, std::size_t n) {
  switch (t) {
    case dtype::BF16: {
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = static_cast<C>(bf16_to_float(h));
      }
      return;
    }
    case dtype::F16: {
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = static_cast<C>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h)));
      }
      return;
    }
    case dtype::F32: {
      if constexpr (std::is_same_v<C, float>) {
        std::memcpy(out, src, 4 * n);
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          float f;
          std::memcpy(&f, src + 4 * i, 4);
          out[i] = static_cast<C>(f);
        }
      }
      return;
    }
    case dtype::F64: {
      for (std::size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        out[i] = static_cast<C>(d);
      }
      return;
    }
    default: lora::detail::fail("load_as: dtype {} is not a float type", dtype_name(t));
  }
}

/// n values of C → type `t` at `dst` (rounded to nearest even).
template <class C>
void store_as(dtype t, const C* in, std::byte* dst, std::size_t n) {
  switch (t) {
    case dtype::BF16: {
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t h = float_to_bf16(static_cast<float>(in[i]));
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    }
    case dtype::F16: {
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t h = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(static_cast<float>(in[i])));
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    }
    case dtype::F32: {
      if constexpr (std::is_same_v<C, float>) {
        std::memcpy(dst, in, 4 * n);
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          const float f = static_cast<float>(in[i]);
          std::memcpy(dst + 4 * i, &f, 4);
        }
      }
      return;
    }
    case dtype::F64: {
      for (std::size_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(in[i]);
        std::memcpy(dst + 8 * i, &d, 8);
      }
      return;
    }
    default: lora::detail::fail("store_as: dtype {} is not a float type", dtype_name(t));
  }
}

/// Converts a float tensor's bytes from one float dtype to another.
inline ByteBuffer convert_floats(const TensorView& v, dtype to, BufferPool* pool = nullptr) {
  const std::size_t n = static_cast<std::size_t>(v.numel());
  ByteBuffer out = pool ? pool->acquire(n * dtype_size(to)) : ByteBuffer(n * dtype_size(to));
  constexpr std::size_t chunk = 1 << 16;
  const std::ptrdiff_t chunks = static_cast<std::ptrdiff_t>((n + chunk - 1) / chunk);
  const bool wide = v.type == dtype::F64 || to == dtype::F64;
LORA_IO_OMP(omp parallel for schedule(static))
  for (std::ptrdiff_t c = 0; c < chunks; ++c) {
    const std::size_t b = static_cast<std::size_t>(c) * chunk, len = std::min(chunk, n - b);
    if (wide) {
      std::vector<double> buf(len);
      load_as(v.type, v.bytes.data() + b * dtype_size(v.type), buf.data(), len);
      store_as(to, buf.data(), out.data() + b * dtype_size(to), len);
    } else {
      std::vector<float> buf(len);
      load_as(v.type, v.bytes.data() + b * dtype_size(v.type), buf.data(), len);
      store_as(to, buf.data(), out.data() + b * dtype_size(to), len);
    }
  }
  return out;
}

/// d(rows i0..i0+RB, :) = coef(i0.., :)·basis, added as v += s·d, for RB rows at once with
/// the accumulators of a CT-column tile in registers (each basis load feeds RB FMAs).
template <class C, int RB, int CT>
void add_low_rank_rows(const C* coef, const C* basis, Index r, Index cols, C s, C* const* v) {
  Index j0 = 0;
  for (; j0 + CT <= cols; j0 += CT) {
    C acc[RB][CT] = {};
    for (Index k = 0; k < r; ++k) {
      const C* b = basis + k * cols + j0;
      for (int ii = 0; ii < RB; ++ii) {
        const C c = coef[ii * r + k];
LORA_IO_OMP(omp simd)
        for (int j = 0; j < CT; ++j) acc[ii][j] += c * b[j];
      }
    }
    for (int ii = 0; ii < RB; ++ii) {
      C* vi = v[ii] + j0;
LORA_IO_OMP(omp simd)
      for (int j = 0; j < CT; ++j) vi[j] += acc[ii][j] * s;
    }
  }
  for (; j0 < cols; ++j0)  // the last cols % CT columns
    for (int ii = 0; ii < RB; ++ii) {
      C a = 0;
      for (Index k = 0; k < r; ++k) a += coef[ii * r + k] * basis[k * cols + j0];
      v[ii][j0] += a * s;
    }
}

/// The merge of one weight, rows at a time (rows of W: output features, or input features
/// with fan_in_fan_out), never holding the [out × in] delta: for row i,
///   v = W(i, :) + s·Σ_k coef(i, k)·basis(k, :)   (coef = B, basis = A; or Aᵀ and Bᵀ),
/// as PEFT's W + (B·A)·s, then DoRA's scale and one rounding to `to`. Rows are split over
/// OpenMP threads.
template <class C>
void merge_weight_rows(const TensorView& W, const PeftModule& mod, double scale, dtype to, std::byte* out) {
  using M = Matrix<C>;
  // 8 rows × 32 floats of accumulators: 32 ymm registers (measured best on AVX-512 Zen 4,
  // 0.4 ns per element for r = 16 against 2 ns for row-at-a-time).
  constexpr int RB = 8;
  constexpr int CT = std::is_same_v<C, float> ? 32 : 16;
  const auto& ad = mod.adapter;
  const bool fifo = ad.fan_in_fan_out();
  const Index rows = static_cast<Index>(W.shape[0]), cols = static_cast<Index>(W.shape[1]);
  const Index r = ad.rank();
  const C s = static_cast<C>(ad.scaling() * scale);
  const M coef = fifo ? M(ad.A().transpose().template cast<C>()) : M(ad.B().template cast<C>());   // [rows × r]
  const M basis = fifo ? M(ad.B().transpose().template cast<C>()) : M(ad.A().template cast<C>());  // [r × cols]
  const std::size_t in_es = dtype_size(W.type), out_es = dtype_size(to);
  const std::byte* src = W.bytes.data();
  const Index groups = (rows + RB - 1) / RB;

  // V rows i0..i0+n of W + s·ΔW into V (RB × cols).
  auto form = [&](Index i0, Index n, M& V) {
    load_as(W.type, src + static_cast<std::size_t>(i0 * cols) * in_es, V.data(), static_cast<std::size_t>(n * cols));
    C* rowp[RB];
    for (int ii = 0; ii < RB; ++ii) rowp[ii] = V.data() + std::min<Index>(ii, n - 1) * cols;
    if (n == RB) {
      add_low_rank_rows<C, RB, CT>(coef.data() + i0 * r, basis.data(), r, cols, s, rowp);
    } else {
      for (Index ii = 0; ii < n; ++ii) {
        C* one[1] = {rowp[ii]};
        add_low_rank_rows<C, 1, CT>(coef.data() + (i0 + ii) * r, basis.data(), r, cols, s, one);
      }
    }
  };

  Vector<C> col_scale;  // DoRA with fan_in_fan_out: the norms run down W's columns
  if (mod.magnitude && fifo) {
    Vector<C> sq = Vector<C>::Zero(cols);
LORA_IO_OMP(omp parallel)
    {
      Vector<C> local = Vector<C>::Zero(cols);
      M V(RB, cols);
LORA_IO_OMP(omp for schedule(static))
      for (Index g = 0; g < groups; ++g) {
        const Index i0 = g * RB, n = std::min<Index>(RB, rows - i0);
        form(i0, n, V);
        local += V.topRows(n).colwise().squaredNorm().transpose();
      }
LORA_IO_OMP(omp critical)
      sq += local;
    }
    col_scale = mod.magnitude->template cast<C>().cwiseQuotient(sq.cwiseSqrt());
  }
  const Vector<C> mag = mod.magnitude ? Vector<C>(mod.magnitude->template cast<C>()) : Vector<C>();

LORA_IO_OMP(omp parallel)
  {
    M V(RB, cols);
LORA_IO_OMP(omp for schedule(static))
    for (Index g = 0; g < groups; ++g) {
      const Index i0 = g * RB, n = std::min<Index>(RB, rows - i0);
      form(i0, n, V);
      if (mod.magnitude) {
        for (Index ii = 0; ii < n; ++ii) {
          if (fifo)
            V.row(ii).array() *= col_scale.transpose().array();
          else
            V.row(ii) *= mag(i0 + ii) / V.row(ii).norm();
        }
      }
      store_as(to, V.data(), out + static_cast<std::size_t>(i0 * cols) * out_es, static_cast<std::size_t>(n * cols));
    }
  }
}

}  // namespace detail

/// How adapter module paths name base checkpoint tensors: a path that starts with `strip`
/// has it replaced by `add` (strip "" adds a prefix, add "" removes one; equal: identity).
/// A GPT-2 adapter ("transformer.h.0.attn.c_attn") on the hub's GPT-2 checkpoint
/// ("h.0.attn.c_attn.weight") needs {"transformer.", ""}.
struct BaseKeyMap {
  std::string strip, add;

  /// The base key of an adapter-side path or key.
  std::string operator()(std::string_view k) const {
    if (k.substr(0, strip.size()) != strip) return std::string(k);
    return add + std::string(k.substr(strip.size()));
  }
  bool identity() const { return strip == add; }
  /// "'transformer.' -> ''", for messages.
  std::string describe() const { return identity() ? "identity" : fmt::format("'{}' -> '{}'", strip, add); }
};

/// Parses "OLD=NEW" (paths starting with OLD get NEW instead) or "NEW" (NEW is prepended).
inline BaseKeyMap parse_base_key_map(std::string_view s) {
  const auto eq = s.find('=');
  if (eq == std::string_view::npos) return {"", std::string(s)};
  return {std::string(s.substr(0, eq)), std::string(s.substr(eq + 1))};
}

/// One adapter of a stacked merge and its strength (a multiplier on every module's s).
struct ScaledAdapter {
  const PeftAdapter* adapter = nullptr;
  double scale = 1.0;
};

namespace detail {
/// The adapter-side keys a merge must find in the base: each module's weight, each whole
/// tensor's key and each trainable-token embedding's weight.
inline std::vector<std::string> keys_needed(const std::vector<ScaledAdapter>& adapters) {
  std::set<std::string> keys;
  for (const auto& sa : adapters) {
    for (const auto& m : sa.adapter->modules) keys.insert(m.name + ".weight");
    for (const auto& t : sa.adapter->saved) keys.insert(t.key);
    for (const auto& t : sa.adapter->trainable_tokens) keys.insert(t.module + ".weight");
  }
  return {keys.begin(), keys.end()};
}
}  // namespace detail

/// Finds how the adapters' module paths map onto `base`'s keys: among the prefix changes
/// between "", "model.", "transformer.", "language_model.", "model.language_model.",
/// "language_model.model." and "base_model.model.", the one under which every needed key
/// (module weights, whole tensors, embeddings with trainable tokens) is in the base. With
/// `forced`, only that one is checked. Throws lora::error when none fits (naming, for the
/// closest candidates, how many keys they find and one they miss) or when several fit
/// differently (listing them; pass one with --base-prefix).
inline BaseKeyMap resolve_base_keys(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters,
                                    const std::optional<BaseKeyMap>& forced = std::nullopt) {
  const std::vector<std::string> need = detail::keys_needed(adapters);
  if (need.empty()) lora::detail::fail("the adapters to merge carry nothing to merge");
  auto missing_under = [&](const BaseKeyMap& m, std::size_t& found) {
    std::optional<std::string> miss;
    found = 0;
    for (const auto& k : need) {
      if (base.contains(m(k)))
        ++found;
      else if (!miss)
        miss = m(k);
    }
    return miss;
  };
  if (forced) {
    std::size_t found = 0;
    if (auto miss = missing_under(*forced, found))
      lora::detail::fail("{}: with the key mapping {} only {} of {} adapter tensors find their base tensor; e.g. no "
                         "tensor '{}'", base.path().string(), forced->describe(), found, need.size(), *miss);
    return *forced;
  }
  static const char* prefixes[] = {"", "model.", "transformer.", "language_model.", "model.language_model.",
                                   "language_model.model.", "base_model.model."};
  struct Candidate {
    BaseKeyMap map;
    std::size_t found;
    std::optional<std::string> miss;
  };
  std::vector<Candidate> all;
  std::vector<BaseKeyMap> fits;
  std::set<std::vector<std::string>> distinct;
  for (const char* strip : prefixes) {
    if (!std::all_of(need.begin(), need.end(), [&](const std::string& k) { return k.rfind(strip, 0) == 0; })) continue;
    for (const char* add : prefixes) {
      BaseKeyMap m{strip, add};
      if (m.identity() && std::string(strip) != "") continue;  // one identity is enough
      std::size_t found = 0;
      auto miss = missing_under(m, found);
      all.push_back({m, found, miss});
      if (!miss) {
        std::vector<std::string> mapped;
        for (const auto& k : need) mapped.push_back(m(k));
        if (distinct.insert(mapped).second) fits.push_back(m);
      }
    }
  }
  if (fits.size() == 1) return fits.front();
  if (fits.size() > 1) {
    std::vector<std::string> names;
    for (const auto& m : fits) names.push_back(m.describe());
    lora::detail::fail("{}: the adapter's {} tensors match the base under several key mappings ({}); choose one with "
                       "--base-prefix OLD=NEW", base.path().string(), need.size(), fmt::join(names, ", "));
  }
  std::sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) { return a.found > b.found; });
  std::vector<std::string> lines;
  for (std::size_t i = 0; i < all.size() && i < 3; ++i)
    lines.push_back(fmt::format("{} finds {} of {} (no '{}')", all[i].map.describe(), all[i].found, need.size(),
                                all[i].miss.value_or("?")));
  lora::detail::fail("{}: no key mapping puts every adapter tensor on a base tensor (e.g. the adapter's '{}'); closest: "
                     "{}; if the base uses other names, pass --base-prefix OLD=NEW",
                     base.path().string(), need.front(), fmt::join(lines, "; "));
}

/// Throws lora::error unless every module of `adapter` has a float base weight
/// `map(<module>).weight` of shape [out, in] ([in, out] with fan_in_fan_out, and for an
/// embedding [vocab, dim]) in `base`.
inline void check_adapter_fits(const Checkpoint& base, const PeftAdapter& adapter, const BaseKeyMap& map = {}) {
  if (adapter.modules.empty() && adapter.saved.empty() && adapter.trainable_tokens.empty())
    lora::detail::fail("PEFT adapter has no modules");
  for (const auto& m : adapter.modules) {
    const std::string key = map(m.name + ".weight");
    if (!base.contains(key))
      lora::detail::fail("{}: adapter module '{}' has no base weight: the checkpoint has no tensor '{}'",
                         base.path().string(), m.name, key);
    const TensorView& W = base.tensor(key);
    if (!is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has dtype {}; merging needs a float weight (F32, F16, BF16, F64)", W.file,
                         key, dtype_name(W.type));
    const auto& a = m.adapter;
    const std::int64_t want0 = a.fan_in_fan_out() ? a.in_features() : a.out_features();
    const std::int64_t want1 = a.fan_in_fan_out() ? a.out_features() : a.in_features();
    if (W.ndim() != 2 || W.shape[0] != want0 || W.shape[1] != want1)
      lora::detail::fail("{}: tensor '{}' has shape {}, but adapter module '{}' (A [{}, {}], B [{}, {}]) "
                         "needs [{}, {}]",
                         W.file, key, fmt::format("[{}]", fmt::join(W.shape, ", ")), m.name, a.rank(),
                         a.in_features(), a.out_features(), a.rank(), want0, want1);
    if (m.lora_bias && !base.contains(map(m.name + ".bias")))
      lora::detail::fail("{}: adapter module '{}' has lora_bias (lora_B.bias) but the base layer has no bias (no tensor "
                         "'{}'): PEFT refuses this merge too ('Impossible to merge LoRA with lora_bias=True because "
                         "the base layer has no bias')",
                         base.path().string(), m.name, map(m.name + ".bias"));
  }
  for (const auto& t : adapter.saved) {
    const std::string key = map(t.key);
    if (!base.contains(key))
      lora::detail::fail("{}: the adapter's {} tensor '{}' replaces base tensor '{}', which the checkpoint does not "
                         "have", base.path().string(), role_name(t.role), t.data.name, key);
    const TensorView& W = base.tensor(key);
    if (W.shape != t.data.shape)
      lora::detail::fail("{}: the adapter's {} tensor '{}' has shape [{}], but base tensor '{}' has [{}] (a resized "
                         "vocabulary? PEFT cannot load it either)", base.path().string(), role_name(t.role),
                         t.data.name, fmt::join(t.data.shape, ", "), key, fmt::join(W.shape, ", "));
    if (!is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has dtype {}; replacing it needs a float tensor", W.file, key,
                         dtype_name(W.type));
  }
  for (const auto& t : adapter.trainable_tokens) {
    const std::string key = map(t.module + ".weight");
    if (!base.contains(key))
      lora::detail::fail("{}: trainable tokens of '{}' need base tensor '{}', which the checkpoint does not have",
                         base.path().string(), t.module, key);
    const TensorView& W = base.tensor(key);
    if (W.ndim() != 2 || W.shape[1] != t.rows.cols() || !is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has shape [{}] {}, but the trainable-token rows of '{}' are [{}, {}]", W.file,
                         key, fmt::join(W.shape, ", "), dtype_name(W.type), t.module, t.rows.rows(), t.rows.cols());
    for (std::int64_t id : t.indices)
      if (id < 0 || id >= W.shape[0])
        lora::detail::fail("{}: trainable token id {} of '{}' is outside the vocabulary of '{}' ([0, {}))", W.file, id,
                           t.module, key, W.shape[0]);
  }
}

/// The merged bytes of one base weight W ([out, in], or [in, out] with fan_in_fan_out)
/// for module `mod`, in dtype `to`; `pool` (optional) supplies the buffer.
inline ByteBuffer merge_weight(const TensorView& W, const PeftModule& mod, double scale, dtype to,
                               BufferPool* pool = nullptr) {
  if (!is_float(W.type) || !is_float(to))
    lora::detail::fail("{}: tensor '{}': merging needs float dtypes, got {} → {}", W.file, W.name, dtype_name(W.type),
                       dtype_name(to));
  const auto& a = mod.adapter;
  const std::int64_t want0 = a.fan_in_fan_out() ? a.in_features() : a.out_features();
  const std::int64_t want1 = a.fan_in_fan_out() ? a.out_features() : a.in_features();
  if (W.ndim() != 2 || W.shape[0] != want0 || W.shape[1] != want1)
    lora::detail::fail("{}: tensor '{}' has shape {}, adapter module '{}' needs [{}, {}]", W.file, W.name,
                       fmt::format("[{}]", fmt::join(W.shape, ", ")), mod.name, want0, want1);
  const std::size_t n = static_cast<std::size_t>(W.numel()) * dtype_size(to);
  ByteBuffer out = pool ? pool->acquire(n) : ByteBuffer(n);
  if (W.type == dtype::F64 || to == dtype::F64)
    detail::merge_weight_rows<double>(W, mod, scale, to, out.data());
  else
    detail::merge_weight_rows<float>(W, mod, scale, to, out.data());
  return out;
}

/// One change a merge makes to one base tensor, applied in order.
struct MergeStep {
  enum class Kind {
    low_rank,  ///< W += scale·s·B·A (DoRA: then the magnitude's row scaling)
    bias,      ///< b += scale·s·b_B (lora_bias)
    replace,   ///< the tensor becomes a saved whole tensor (modules_to_save, base_layer, trained bias)
    rows,      ///< rows indices[i] become the trainable-token rows
  };
  Kind kind = Kind::low_rank;
  const PeftModule* module = nullptr;
  double scale = 1.0;
  const PeftSavedTensor* saved = nullptr;
  const PeftTrainableTokens* tokens = nullptr;
};

/// The base tensor after `steps` (each on the result of the one before, in float, or double
/// for F64 tensors), rounded once to `to`.
inline ByteBuffer apply_merge_steps(const TensorView& base, const std::vector<MergeStep>& steps, dtype to,
                                    BufferPool* pool = nullptr) {
  if (!is_float(base.type) || !is_float(to))
    lora::detail::fail("{}: tensor '{}': merging needs float dtypes, got {} → {}", base.file, base.name,
                       dtype_name(base.type), dtype_name(to));
  if (steps.size() == 1 && steps[0].kind == MergeStep::Kind::low_rank)
    return merge_weight(base, *steps[0].module, steps[0].scale, to, pool);
  auto run = [&](auto zero) {
    using C = decltype(zero);
    const dtype work = std::is_same_v<C, double> ? dtype::F64 : dtype::F32;
    const std::size_t n = static_cast<std::size_t>(base.numel());
    std::vector<C> cur(n);
    detail::load_as(base.type, base.bytes.data(), cur.data(), n);
    for (const MergeStep& st : steps) {
      switch (st.kind) {
        case MergeStep::Kind::low_rank: {
          TensorView v{base.name, base.file, work, base.shape,
                       std::span<const std::byte>(reinterpret_cast<const std::byte*>(cur.data()), n * sizeof(C))};
          const ByteBuffer next = merge_weight(v, *st.module, st.scale, work);
          std::memcpy(cur.data(), next.data(), n * sizeof(C));
          break;
        }
        case MergeStep::Kind::bias: {
          const auto& b = *st.module->lora_bias;
          if (base.ndim() != 1 || static_cast<Index>(n) != b.size())
            lora::detail::fail("{}: tensor '{}' has shape [{}], but lora_B.bias of '{}' has {} elements", base.file,
                               base.name, fmt::join(base.shape, ", "), st.module->name, b.size());
          // PEFT: bias + lora_B.bias * scaling, in the bias' dtype (float32 here).
          const C s = static_cast<C>(st.module->adapter.scaling() * st.scale);
          for (std::size_t i = 0; i < n; ++i) cur[i] += static_cast<C>(b[static_cast<Index>(i)]) * s;
          break;
        }
        case MergeStep::Kind::replace: {
          const TensorData& d = st.saved->data;
          if (d.shape != base.shape)
            lora::detail::fail("{}: tensor '{}' has shape [{}], the adapter's '{}' has [{}]", base.file, base.name,
                               fmt::join(base.shape, ", "), d.name, fmt::join(d.shape, ", "));
          detail::load_as(d.type, d.bytes.data(), cur.data(), n);
          break;
        }
        case MergeStep::Kind::rows: {
          const auto& t = *st.tokens;
          const std::int64_t rows = base.shape.at(0), cols = base.shape.at(1);
          if (t.rows.cols() != cols)
            lora::detail::fail("{}: tensor '{}' has rows of {}, the trainable tokens of '{}' have {}", base.file,
                               base.name, cols, t.module, t.rows.cols());
          for (std::size_t i = 0; i < t.indices.size(); ++i) {
            const std::int64_t id = t.indices[i];
            if (id < 0 || id >= rows)
              lora::detail::fail("{}: trainable token id {} is outside '{}' ([0, {}))", base.file, id, base.name, rows);
            for (std::int64_t j = 0; j < cols; ++j)
              cur[static_cast<std::size_t>(id * cols + j)] = static_cast<C>(t.rows(static_cast<Index>(i), j));
          }
          break;
        }
      }
    }
    const std::size_t bytes = n * dtype_size(to);
    ByteBuffer out = pool ? pool->acquire(bytes) : ByteBuffer(bytes);
    detail::store_as(to, cur.data(), out.data(), n);
    return out;
  };
  if (base.type == dtype::F64 || to == dtype::F64) return run(double{});
  return run(float{});
}

/// What a stacked merge does to each base tensor: the steps, in adapter order and within an
/// adapter whole-tensor replacements first, then LoRA deltas and biases, then token rows
/// (as loading the adapter and then merge_and_unload does). With `tied` (tied input and
/// output embeddings) the token rows of an embedding also replace lm_head's rows.
inline std::map<std::string, std::vector<MergeStep>> merge_plan(const Checkpoint& base,
                                                                const std::vector<ScaledAdapter>& adapters,
                                                                const BaseKeyMap& map, double scale, bool tied) {
  std::map<std::string, std::vector<MergeStep>> plan;
  for (const auto& sa : adapters) {
    const PeftAdapter& ad = *sa.adapter;
    check_adapter_fits(base, ad, map);
    for (const auto& t : ad.saved) plan[map(t.key)].push_back({MergeStep::Kind::replace, nullptr, 1.0, &t, nullptr});
    for (const auto& m : ad.modules) {
      plan[map(m.name + ".weight")].push_back({MergeStep::Kind::low_rank, &m, sa.scale * scale, nullptr, nullptr});
      if (m.lora_bias) plan[map(m.name + ".bias")].push_back({MergeStep::Kind::bias, &m, sa.scale * scale, nullptr, nullptr});
    }
    for (const auto& t : ad.trainable_tokens) {
      plan[map(t.module + ".weight")].push_back({MergeStep::Kind::rows, nullptr, 1.0, nullptr, &t});
      const std::string head = map("lm_head.weight");
      if (tied && base.contains(head) && base.tensor(head).shape == base.tensor(map(t.module + ".weight")).shape)
        plan[head].push_back({MergeStep::Kind::rows, nullptr, 1.0, nullptr, &t});
    }
  }
  return plan;
}

struct MergeOptions {
  double scale = 1.0;                  ///< multiplies every module's s ("halve alpha at inference" = 0.5)
  std::optional<dtype> out_dtype;      ///< convert every float tensor to this (F32, F16, BF16 or F64)
  std::function<void(const WriteProgress&)> progress;  ///< called after each tensor is written
  /// How adapter paths name base tensors; unset: found by resolve_base_keys.
  std::optional<BaseKeyMap> base_keys;
  /// Tied input/output embeddings (trainable-token rows then go into lm_head too); unset:
  /// the base folder's config.json "tie_word_embeddings", else whether lm_head.weight and
  /// the embedding hold the same bytes.
  std::optional<bool> tie_word_embeddings;
  /// For a folder output from a folder base: copy the base's other files (config.json with
  /// its dtype set to what was written, generation_config.json, tokenizer files, …).
  bool copy_base_files = true;
};

struct MergeSummary {
  std::size_t merged = 0;    ///< tensors changed by the adapters
  std::size_t copied = 0;    ///< tensors copied unchanged (possibly converted)
  std::uint64_t bytes = 0;   ///< bytes of tensor data written
  BaseKeyMap key_map;        ///< how adapter paths were mapped to base keys
  std::vector<std::string> files_copied;   ///< other files of the base folder written to the output
  std::vector<std::string> files_skipped;  ///< base folder entries not copied (weights in other formats, folders)
};

/// Whether a file of a model folder holds weights in some format (so a merged folder must not
/// carry it: it would hold the unmerged model): *.safetensors, *.bin, *.pt, *.pth, *.ckpt,
/// *.h5, *.msgpack, *.gguf, *.onnx and the weight indexes (*.index.json).
inline bool is_weight_file(const std::filesystem::path& p) {
  static const std::set<std::string> ext = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                                            ".msgpack",     ".gguf", ".onnx", ".pkl"};
  const std::string name = p.filename().string();
  return ext.count(p.extension().string()) || detail::ends_with(name, ".index.json");
}

/// transformers' name of a dtype in config.json ("float32", "bfloat16", …).
inline const char* torch_dtype_name(dtype t) {
  switch (t) {
    case dtype::F32: return "float32";
    case dtype::BF16: return "bfloat16";
    case dtype::F16: return "float16";
    case dtype::F64: return "float64";
    default: return "float32";
  }
}

namespace detail {
inline bool tied_embeddings(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters, const BaseKeyMap& map) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::is_directory(base.path()) ? base.path() / "config.json" : base.path().parent_path() / "config.json";
  if (fs::exists(cfg)) {
    const auto j = read_json_file(cfg);
    if (j.is_object() && j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean())
      return j["tie_word_embeddings"].get<bool>();
  }
  const std::string head = map("lm_head.weight");
  if (!base.contains(head)) return false;
  for (const auto& sa : adapters)
    for (const auto& t : sa.adapter->trainable_tokens) {
      const std::string emb = map(t.module + ".weight");
      if (base.contains(emb) && base.tensor(emb).bytes.size() == base.tensor(head).bytes.size() &&
          std::memcmp(base.tensor(emb).bytes.data(), base.tensor(head).bytes.data(), base.tensor(head).bytes.size()) == 0)
        return true;
    }
  return false;
}
}  // namespace detail

/// Merges `adapters`, in order, into `base` and writes the result to `out`: equal to merging
/// the first, then the next into that result, and so on (computed in float without rounding
/// in between). Each adapter's LoRA deltas (and lora_B biases) are scaled by its scale ×
/// options.scale; its whole tensors (modules_to_save, an embedding's base_layer) replace the
/// base tensors and its trainable-token rows replace the embedding's rows, as
/// merge_and_unload() gives them. `out` is a file when it ends in ".safetensors", else a
/// folder with the base's shard layout (model.safetensors for a single-file base) and, from a
/// folder base, the base's other files (MergeOptions::copy_base_files). Same keys, order,
/// shapes and dtypes as the base (float dtypes changed to options.out_dtype when set).
/// Atomic; nothing is written when an adapter does not fit the base.
///
///   auto a = lora::io::load_peft_adapter("a/"), b = lora::io::load_peft_adapter("b/");
///   lora::io::merge_peft_checkpoint(base, {{&a, 1.0}, {&b, 0.5}}, "merged/");
inline MergeSummary merge_peft_checkpoint(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters,
                                          const std::filesystem::path& out, const MergeOptions& options = {}) {
  namespace fs = std::filesystem;
  if (adapters.empty()) lora::detail::fail("merge needs at least one adapter");
  for (const auto& sa : adapters) {
    if (!sa.adapter) lora::detail::fail("merge: adapter pointer is null");
    if (!std::isfinite(sa.scale)) lora::detail::fail("merge: adapter scale must be finite, got {}", sa.scale);
  }
  if (options.out_dtype && !is_float(*options.out_dtype))
    lora::detail::fail("output dtype must be F32, F16, BF16 or F64, got {}", dtype_name(*options.out_dtype));
  if (!std::isfinite(options.scale)) lora::detail::fail("merge scale must be finite, got {}", options.scale);
  MergeSummary summary;
  summary.key_map = resolve_base_keys(base, adapters, options.base_keys);
  const bool tied = options.tie_word_embeddings.value_or(detail::tied_embeddings(base, adapters, summary.key_map));
  const auto plan = merge_plan(base, adapters, summary.key_map, options.scale, tied);

  auto retype = [&](const TensorView& v) { return options.out_dtype && is_float(v.type) ? *options.out_dtype : v.type; };
  CheckpointLayout layout = layout_of(base, retype);
  const bool single = out.extension() == ".safetensors";
  if (single) {
    CheckpointLayout one;
    one.single_file = true;
    one.shards.push_back(ShardSpec{out.filename().string(), {}, base.shard(0).metadata()});
    for (auto& s : layout.shards)
      for (auto& t : s.tensors) one.shards[0].tensors.push_back(std::move(t));
    layout = std::move(one);
  } else if (!base.sharded()) {
    layout.shards[0].file = "model.safetensors";
  }

  // The float dtype most of the written bytes have: what config.json's dtype should say.
  std::map<dtype, std::uint64_t> float_bytes;
  for (const auto& s : layout.shards)
    for (const auto& t : s.tensors)
      if (is_float(t.type)) float_bytes[t.type] += t.nbytes();
  dtype main_type = dtype::F32;
  std::uint64_t most = 0;
  for (const auto& [t, b] : float_bytes)
    if (b > most) most = b, main_type = t;

  std::function<void(const fs::path&)> extra;
  if (!single && options.copy_base_files && fs::is_directory(base.path())) {
    for (const auto& e : fs::directory_iterator(base.path())) {
      const std::string name = e.path().filename().string();
      const bool ours = e.path().extension() == ".safetensors" || name == checkpoint_index_name;  // written anew
      if (ours) continue;
      if (!e.is_regular_file() || is_weight_file(e.path()))
        summary.files_skipped.push_back(name + (e.is_directory() ? "/" : ""));
      else
        summary.files_copied.push_back(name);
    }
    std::sort(summary.files_copied.begin(), summary.files_copied.end());
    std::sort(summary.files_skipped.begin(), summary.files_skipped.end());
    extra = [&](const fs::path& tmp) {
      for (const auto& name : summary.files_copied) {
        const fs::path from = base.path() / name;
        if (name == "config.json") {
          auto j = detail::read_json_file(from);
          if (j.is_object()) {
            bool set = false;
            for (const char* k : {"dtype", "torch_dtype"})
              if (j.contains(k)) j[k] = torch_dtype_name(main_type), set = true;
            if (!set) j["dtype"] = torch_dtype_name(main_type);
          }
          write_bytes(tmp / name, j.dump(2) + "\n");
        } else {
          fs::copy_file(from, tmp / name);
        }
      }
    };
  }

  BufferPool pool;
  write_checkpoint(
      out, layout,
      [&](const TensorSpec& spec) {
        const TensorView& v = base.tensor(spec.name);
        summary.bytes += spec.nbytes();
        if (auto it = plan.find(spec.name); it != plan.end()) {
          ++summary.merged;
          return TensorBytes::own(apply_merge_steps(v, it->second, spec.type, &pool), &pool);
        }
        ++summary.copied;
        if (spec.type == v.type) return TensorBytes::borrow(v.bytes);
        return TensorBytes::own(detail::convert_floats(v, spec.type, &pool), &pool);
      },
      options.progress, extra);
  return summary;
}

/// Merges one adapter (strength options.scale) into `base`: merge_peft_checkpoint of
/// {{&adapter, 1.0}}.
inline MergeSummary merge_peft_checkpoint(const Checkpoint& base, const PeftAdapter& adapter,
                                          const std::filesystem::path& out, const MergeOptions& options = {}) {
  return merge_peft_checkpoint(base, std::vector<ScaledAdapter>{{&adapter, 1.0}}, out, options);
}

/// The modules `adapter`'s config targets in `base` (2-D "<module>.weight" tensors, through
/// `map`) that the adapter has no tensors for: PEFT creates their LoRA layers with B = 0 and
/// warns about missing keys; they leave the model unchanged. Empty when the config names no
/// targets or uses "all-linear".
inline std::vector<std::string> targeted_without_tensors(const Checkpoint& base, const PeftAdapter& adapter,
                                                         const BaseKeyMap& map = {}) {
  std::vector<std::string> out;
  const PeftConfig& cfg = adapter.config;
  if (!cfg.has_targets()) return out;
  if (std::find(cfg.target_modules.begin(), cfg.target_modules.end(), "all-linear") != cfg.target_modules.end()) return out;
  std::set<std::string> have;
  for (const auto& m : adapter.modules) have.insert(map(m.name));
  for (const auto& key : base.names()) {
    if (!detail::ends_with(key, ".weight") || base.tensor(key).ndim() != 2) continue;
    const std::string base_module = key.substr(0, key.size() - 7);
    // Back to the adapter's path: undo the mapping.
    std::string module = base_module;
    if (!map.identity() && base_module.rfind(map.add, 0) == 0) module = map.strip + base_module.substr(map.add.size());
    if (cfg.targets(module) && !have.count(base_module)) out.push_back(module);
  }
  return out;
}

}  // namespace lora::io
