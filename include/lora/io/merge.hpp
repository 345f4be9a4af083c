#pragma once
// Merging a PEFT adapter into a checkpoint, tensor by tensor, as PEFT's
// merge_and_unload() followed by saving the state dict does:
//
//   LoRA:  W' = W + scale·s·B·A
//   DoRA:  W' = (m ⊘ n) ⊙ (W + scale·s·B·A),  n = ‖W + scale·s·B·A‖_row
//
// computed in float (double for F64 tensors) from the stored dtype and rounded once to the
// output dtype; tensors that no module targets are copied byte for byte (or converted
// when an output dtype is given, as model.to(dtype) would).
//
//   auto base = lora::io::Checkpoint::open("Llama-3.2-1B/");
//   auto ad = lora::io::load_peft_adapter("my-adapter/");
//   lora::io::merge_peft_checkpoint(base, ad, "merged/", {});

#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include <Eigen/Core>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace lora::io {

struct MergeOptions {
  double scale = 1.0;                  ///< multiplies every module's s ("halve alpha at inference" = 0.5)
  std::optional<dtype> out_dtype;      ///< convert every float tensor to this (F32, F16, BF16 or F64)
  std::function<void(const WriteProgress&)> progress;  ///< called after each tensor is written
};

struct MergeSummary {
  std::size_t merged = 0;    ///< tensors changed by the adapter
  std::size_t copied = 0;    ///< tensors copied unchanged (possibly converted)
  std::uint64_t bytes = 0;   ///< bytes of tensor data written
};

/// Whether a dtype holds floating-point values.
inline bool is_float(dtype t) { return t == dtype::F64 || t == dtype::F32 || t == dtype::F16 || t == dtype::BF16; }

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
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
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
inline std::vector<std::byte> convert_floats(const TensorView& v, dtype to) {
  const std::size_t n = static_cast<std::size_t>(v.numel());
  std::vector<std::byte> out(n * dtype_size(to));
  constexpr std::size_t chunk = 1 << 16;
  const std::ptrdiff_t chunks = static_cast<std::ptrdiff_t>((n + chunk - 1) / chunk);
  const bool wide = v.type == dtype::F64 || to == dtype::F64;
#pragma omp parallel for schedule(static)
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

/// The merge of one weight, in row blocks so that the [out × in] delta is never held whole:
/// block rows of V = W + s·ΔW are formed in compute type C, DoRA-scaled, and stored.
template <class C>
std::vector<std::byte> merge_weight_blocked(const TensorView& W, const PeftModule& mod, double scale, dtype to) {
  using M = Matrix<C>;
  const auto& ad = mod.adapter;
  const bool fifo = ad.fan_in_fan_out();
  const Index rows = static_cast<Index>(W.shape[0]), cols = static_cast<Index>(W.shape[1]);
  const C s = static_cast<C>(ad.scaling() * scale);
  const M A = ad.A().template cast<C>();  // [r × in]
  const M B = ad.B().template cast<C>();  // [out × r]
  // Rows of W: output features (W [out × in]), or input features with fan_in_fan_out (W [in × out]).
  // Block of ΔW rows [r0, r0+len): B.middleRows·A, or (A.middleCols)ᵀ·Bᵀ with fan_in_fan_out.
  const M Bt = B.transpose();
  const Index block = std::max<Index>(1, std::min<Index>(rows, (Index{1} << 16) / std::max<Index>(cols, 1)));
  const Index nblocks = (rows + block - 1) / block;
  const std::size_t in_es = dtype_size(W.type), out_es = dtype_size(to);
  std::vector<std::byte> out(static_cast<std::size_t>(rows * cols) * out_es);

  auto form = [&](Index r0, Index len, M& V) {
    V.resize(len, cols);
    load_as(W.type, W.bytes.data() + static_cast<std::size_t>(r0 * cols) * in_es, V.data(),
            static_cast<std::size_t>(len * cols));
    if (fifo)
      V.noalias() += s * (A.middleCols(r0, len).transpose() * Bt);
    else
      V.noalias() += s * (B.middleRows(r0, len) * A);
  };

  Vector<C> col_scale;  // DoRA with fan_in_fan_out: the norms run down W's columns
  if (mod.magnitude && fifo) {
    Vector<C> sq = Vector<C>::Zero(cols);
#pragma omp parallel
    {
      Vector<C> local = Vector<C>::Zero(cols);
      M V;
#pragma omp for schedule(static)
      for (Index b = 0; b < nblocks; ++b) {
        const Index r0 = b * block, len = std::min(block, rows - r0);
        form(r0, len, V);
        local += V.colwise().squaredNorm().transpose();
      }
#pragma omp critical
      sq += local;
    }
    col_scale = mod.magnitude->template cast<C>().cwiseQuotient(sq.cwiseSqrt());
  }

#pragma omp parallel
  {
    M V;
#pragma omp for schedule(dynamic, 1)
    for (Index b = 0; b < nblocks; ++b) {
      const Index r0 = b * block, len = std::min(block, rows - r0);
      form(r0, len, V);
      if (mod.magnitude) {
        if (fifo) {
          V = V * col_scale.asDiagonal();
        } else {
          const Vector<C> n = V.rowwise().norm();
          V = (mod.magnitude->template cast<C>().segment(r0, len).cwiseQuotient(n)).asDiagonal() * V;
        }
      }
      store_as(to, V.data(), out.data() + static_cast<std::size_t>(r0 * cols) * out_es,
               static_cast<std::size_t>(len * cols));
    }
  }
  return out;
}

}  // namespace detail

/// Throws lora::error unless every module of `adapter` has a float base weight
/// `<module>.weight` of shape [out, in] ([in, out] with fan_in_fan_out) in `base`.
inline void check_adapter_fits(const Checkpoint& base, const PeftAdapter& adapter) {
  if (adapter.modules.empty()) lora::detail::fail("PEFT adapter has no modules");
  for (const auto& m : adapter.modules) {
    const std::string key = m.name + ".weight";
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
      lora::detail::fail("{}: tensor '{}' has shape {}, but adapter module '{}' (lora_A [{}, {}], lora_B [{}, {}]) "
                         "needs [{}, {}]",
                         W.file, key, fmt::format("[{}]", fmt::join(W.shape, ", ")), m.name, a.rank(),
                         a.in_features(), a.out_features(), a.rank(), want0, want1);
  }
}

/// The merged bytes of one base weight W for module `mod`, in dtype `to`.
inline std::vector<std::byte> merge_weight(const TensorView& W, const PeftModule& mod, double scale, dtype to) {
  if (!is_float(W.type) || !is_float(to))
    lora::detail::fail("{}: tensor '{}': merging needs float dtypes, got {} → {}", W.file, W.name, dtype_name(W.type),
                       dtype_name(to));
  if (W.type == dtype::F64 || to == dtype::F64) return detail::merge_weight_blocked<double>(W, mod, scale, to);
  return detail::merge_weight_blocked<float>(W, mod, scale, to);
}

/// Merges `adapter` into `base` and writes the result to `out`: a file when `out` ends in
/// ".safetensors", else a folder with the base's shard layout (model.safetensors for a
/// single-file base). Same keys, order, shapes and dtypes as the base (dtypes of float
/// tensors changed to options.out_dtype when set). Atomic; nothing is written when the
/// adapter does not fit the base.
inline MergeSummary merge_peft_checkpoint(const Checkpoint& base, const PeftAdapter& adapter,
                                          const std::filesystem::path& out, const MergeOptions& options = {}) {
  check_adapter_fits(base, adapter);
  if (options.out_dtype && !is_float(*options.out_dtype))
    lora::detail::fail("output dtype must be F32, F16, BF16 or F64, got {}", dtype_name(*options.out_dtype));
  if (!std::isfinite(options.scale)) lora::detail::fail("merge scale must be finite, got {}", options.scale);
  std::map<std::string, const PeftModule*> target;
  for (const auto& m : adapter.modules) target[m.name + ".weight"] = &m;

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

  MergeSummary summary;
  write_checkpoint(
      out, layout,
      [&](const TensorSpec& spec) {
        const TensorView& v = base.tensor(spec.name);
        summary.bytes += spec.nbytes();
        if (auto it = target.find(spec.name); it != target.end()) {
          ++summary.merged;
          return TensorBytes::own(merge_weight(v, *it->second, options.scale, spec.type));
        }
        ++summary.copied;
        if (spec.type == v.type) return TensorBytes::borrow(v.bytes);
        return TensorBytes::own(detail::convert_floats(v, spec.type));
      },
      options.progress);
  return summary;
}

}  // namespace lora::io
