// `lora merge` throughput: a generated Llama-3.2-1B-shaped bf16 checkpoint (16 layers,
// hidden 2048, intermediate 8192, 32 heads / 8 KV heads, vocab 128256, tied embeddings:
// 1.24 B parameters, 2.47 GB) merged with an r = 16 adapter on all 7 projections, against
// copying the same file as `cp` does (copy_file_range) and, optionally, a read/write copy.
// Every output is fsynced (the merge's atomic write does). Runs alternate call by call
// (copy, merge, copy, ...); the input is read once first, so both sides start from a warm
// page cache.
//
//   bench_merge [workdir=/tmp/lora-bench-merge] [repeats=3] [threads=0 (all)] [rw=0]
//
// The checkpoint and adapter are generated once in workdir (never commit them). Prints each
// run, the medians and merge/copy (goal <= 1.2). Not a Google Benchmark loop: one run takes
// seconds and the ratio is the result.
#include <lora/io/merge.hpp>
#include <lora/io/peft.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using lora::io::dtype;

namespace {

struct Shape {
  std::string name;
  std::vector<std::int64_t> shape;
};

std::vector<Shape> llama_1b() {
  const std::int64_t h = 2048, inter = 8192, kv = 512, vocab = 128256;
  std::vector<Shape> t;
  t.push_back({"model.embed_tokens.weight", {vocab, h}});
  for (int l = 0; l < 16; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    t.push_back({p + "input_layernorm.weight", {h}});
    t.push_back({p + "mlp.down_proj.weight", {h, inter}});
    t.push_back({p + "mlp.gate_proj.weight", {inter, h}});
    t.push_back({p + "mlp.up_proj.weight", {inter, h}});
    t.push_back({p + "post_attention_layernorm.weight", {h}});
    t.push_back({p + "self_attn.k_proj.weight", {kv, h}});
    t.push_back({p + "self_attn.o_proj.weight", {h, h}});
    t.push_back({p + "self_attn.q_proj.weight", {h, h}});
    t.push_back({p + "self_attn.v_proj.weight", {kv, h}});
  }
  t.push_back({"model.norm.weight", {h}});
  std::sort(t.begin(), t.end(), [](auto& a, auto& b) { return a.name < b.name; });
  return t;
}

/// Cheap reproducible bf16 noise (xorshift), ~N(0, 0.02)-sized values.
lora::io::ByteBuffer noise_bf16(std::uint64_t n, std::uint64_t seed) {
  lora::io::ByteBuffer out(n * 2);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (std::uint64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const float v = (static_cast<float>(x >> 40) / static_cast<float>(1 << 24) - 0.5f) * 0.07f;
    const std::uint16_t b = lora::io::float_to_bf16(v);
    std::memcpy(out.data() + 2 * i, &b, 2);
  }
  return out;
}

void generate(const fs::path& dir) {
  const fs::path base = dir / "base" / "model.safetensors";
  if (!fs::exists(base)) {
    fs::create_directories(dir / "base");
    std::vector<lora::io::TensorSpec> specs;
    for (auto& s : llama_1b()) specs.push_back({s.name, dtype::BF16, s.shape});
    auto layout = lora::io::CheckpointLayout::split(specs, ~std::uint64_t{0});
    layout.single_file = true;
    std::uint64_t seed = 1;
    fmt::print(stderr, "generating {} ...\n", base.string());
    lora::io::write_checkpoint(base, layout, [&](const lora::io::TensorSpec& s) {
      return lora::io::TensorBytes::own(noise_bf16(s.numel(), seed++));
    });
  }
  const fs::path adapter = dir / "adapter";
  if (!fs::exists(adapter / "adapter_model.safetensors")) {
    fmt::print(stderr, "generating {} ...\n", adapter.string());
    lora::io::PeftAdapter ad;
    ad.config.r = 16;
    ad.config.lora_alpha = 32;
    ad.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    lora::Generator gen(7);
    for (auto& s : llama_1b()) {
      if (s.name.find("proj") == std::string::npos) continue;
      const std::string mod = s.name.substr(0, s.name.size() - 7);
      const auto out = s.shape[0], in = s.shape[1];
      lora::Matrix<float> A(16, in), B(out, 16);
      for (Eigen::Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<float>(gen.normal(0.0, 0.02));
      for (Eigen::Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<float>(gen.normal(0.0, 0.02));
      lora::AdapterOptions o;
      o.name = mod;
      ad.modules.push_back({mod, lora::LowRankAdapter<float, lora::cpu, lora::dynamic_scaling>::from_factors(A, B, 32, o),
                            dtype::F32});
    }
    std::sort(ad.modules.begin(), ad.modules.end(), [](auto& a, auto& b) { return a.name < b.name; });
    lora::io::save_peft_adapter(adapter, ad);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void fsync_path(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

/// Reads the whole file once so that every timed run starts from a warm page cache.
void warm(const fs::path& p) {
  std::vector<char> buf(1 << 22);
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path dir = argc > 1 ? fs::path(argv[1]) : fs::path("/tmp/lora-bench-merge");
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  const unsigned threads = argc > 3 ? static_cast<unsigned>(std::max(0, std::atoi(argv[3]))) : 0;
  const bool rw = argc > 4 && std::atoi(argv[4]) != 0;
  try {
    generate(dir);
    const fs::path base = dir / "base" / "model.safetensors";
    const fs::path copy = dir / "copy.safetensors", merged = dir / "merged.safetensors";
    warm(base);
    std::vector<double> t_copy, t_copy_user, t_merge, t_load;
    for (int i = 0; i < repeats; ++i) {
      fs::remove(copy);
      ::sync();
      auto t0 = std::chrono::steady_clock::now();
      fs::copy_file(base, copy, fs::copy_options::overwrite_existing);
      fsync_path(copy);
      t_copy.push_back(seconds_since(t0));

      // a user-space copy (read + write, 4 MiB blocks, buffered; fsync at the end)
      fs::remove(copy);
      ::sync();
      t0 = std::chrono::steady_clock::now();
      if (rw) {
        std::vector<char> buf(1 << 22);
        int in = ::open(base.c_str(), O_RDONLY | O_CLOEXEC);
        int out = ::open(copy.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        ssize_t n;
        while ((n = ::read(in, buf.data(), buf.size())) > 0)
          if (::write(out, buf.data(), static_cast<std::size_t>(n)) != n) throw std::runtime_error("write failed");
        ::fsync(out);
        ::close(in);
        ::close(out);
      }
      t_copy_user.push_back(seconds_since(t0));
      fs::remove(copy);

      fs::remove(merged);
      ::sync();
      t0 = std::chrono::steady_clock::now();
      const auto ad = lora::io::load_peft_adapter(dir / "adapter");
      const auto ck = lora::io::Checkpoint::open(base);
      t_load.push_back(seconds_since(t0));
      lora::io::MergeOptions opt;
      opt.threads = threads;
      lora::io::merge_peft_checkpoint(ck, ad, merged, opt);
      t_merge.push_back(seconds_since(t0));
      fmt::print(stderr, "run {}: copy {:.2f} s, read+write copy {:.2f} s, merge {:.2f} s (load {:.2f} s)\n", i + 1,
                 t_copy.back(), t_copy_user.back(), t_merge.back(), t_load.back());
    }
    fs::remove(merged);
    const double c = median(t_copy), cu = median(t_copy_user), m = median(t_merge);
    fmt::print("checkpoint: {} ({:.2f} GB, bf16), adapter r=16 on 7 projections x 16 layers\n", base.string(),
               fs::file_size(base) / 1e9);
    fmt::print("median of {}: copy_file+fsync {:.2f} s, {}merge ({} threads) {:.2f} s\n", repeats, c,
               rw ? fmt::format("read/write copy+fsync {:.2f} s, ", cu) : "",
               threads ? threads : std::max(1u, std::thread::hardware_concurrency()), m);
    fmt::print("merge / copy = {:.2f} (vs copy_file){}; goal <= 1.2\n", m / c,
               rw ? fmt::format(", {:.2f} (vs read/write copy)", m / cu) : "");
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_merge: {}\n", e.what());
    return 1;
  }
  return 0;
}
