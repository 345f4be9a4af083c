// llama.cpp's logits for a fixed token sequence: a base model with each given adapter (or none).
// usage: logits <model.gguf> <out.bin> [adapter.gguf | -]   (writes n_tokens × n_vocab float32)
#include <llama.h>

#include <cstdio>
#include <string_view>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: %s <model.gguf> <out.bin> [adapter.gguf | -]\n", argv[0]);
    return 2;
  }
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = 64;
  cp.n_batch = 64;
  cp.n_ubatch = 64;
  cp.n_threads = cp.n_threads_batch = 1;  // one thread: the same summation order every run
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) return 1;
  if (argc == 4 && std::string_view(argv[3]) != "-") {
    llama_adapter_lora* a = llama_adapter_lora_init(model, argv[3]);
    if (!a) return 1;
    float scale = 1.0f;
    if (llama_set_adapters_lora(ctx, &a, 1, &scale) != 0) return 1;
  }
  const std::vector<llama_token> toks = {1, 5, 17, 42, 99, 3, 64, 120, 7, 33, 88, 2};
  llama_batch b = llama_batch_init(static_cast<int32_t>(toks.size()), 0, 1);
  b.n_tokens = static_cast<int32_t>(toks.size());
  for (int i = 0; i < b.n_tokens; ++i) {
    b.token[i] = toks[i];
    b.pos[i] = i;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = 0;
    b.logits[i] = 1;
  }
  if (llama_decode(ctx, b) != 0) return 1;
  const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 1;
  for (int i = 0; i < b.n_tokens; ++i) std::fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
  std::fclose(out);
  llama_batch_free(b);
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
