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

#if defined(_OPENMP)
#define LORA_IO_OMP(x) _Pragma(#x)
#else
#define LORA_IO_OMP(x)
#endif

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
  BufferPool pool;
  write_checkpoint(
      out, layout,
      [&](const TensorSpec& spec) {
        const TensorView& v = base.tensor(spec.name);
        summary.bytes += spec.nbytes();
        if (auto it = target.find(spec.name); it != target.end()) {
          ++summary.merged;
          return TensorBytes::own(merge_weight(v, *it->second, options.scale, spec.type, &pool), &pool);
        }
        ++summary.copied;
        if (spec.type == v.type) return TensorBytes::borrow(v.bytes);
        return TensorBytes::own(detail::convert_floats(v, spec.type, &pool), &pool);
      },
      options.progress);
  return summary;
}

}  // namespace lora::io
