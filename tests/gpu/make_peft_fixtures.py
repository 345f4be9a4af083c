#!/usr/bin/env python3
"""PEFT oracles for LoRA on MoE expert parameters (LoraConfig.target_parameters, PEFT's ParamWrapper) and for
DoRA on an embedding (PEFT's DoraEmbeddingVariant).

Run where torch, transformers and PEFT are installed (the GPU machine; CPU math, float32 unless a case
says otherwise):  python3 tests/gpu/make_peft_fixtures.py OUT_DIR
Writes, per case, OUT_DIR/<case>/:
  base/            the tiny base model (save_pretrained: model.safetensors + config.json)
  adapter/         PeftModel.save_pretrained
  merged/          merge_and_unload() saved with save_pretrained (the same file layout as base/)
  wrappers.json    every ParamWrapper PEFT built: its module path as named_modules gives it (with the
                   .base_layer nesting), parameter_name, num_experts, in/out features, whether PEFT swapped
                   them, the experts module's is_transposed, r, scaling, lora_A/lora_B shapes, and the
                   tensor keys the adapter file holds for it
  reference.safetensors  per wrapper <path>.delta_weight = PEFT's get_delta_weight (the layout of the parameter);
                   per adapted embedding <module>.ids and <module>.y, the adapted layer's output for those ids
and OUT_DIR/versions.json. A case that fails is reported in OUT_DIR/errors.txt and skipped.
"""
import json
import os
import sys
import traceback

import torch


def tiny_models():
    import transformers

    cases = []

    def qwen3_moe():
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64, tie_word_embeddings=False)
        return transformers.Qwen3MoeForCausalLM(cfg)

    def gpt_oss():
        cfg = transformers.GptOssConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False)
        return transformers.GptOssForCausalLM(cfg)

    # (case, model factory, LoraConfig kwargs, dtype)
    cases.append(("moe_qwen3_experts", qwen3_moe,
                  dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), torch.float32))
    cases.append(("moe_qwen3_down_only_rslora", qwen3_moe,
                  dict(r=4, lora_alpha=8, use_rslora=True, target_modules=[],
                       target_parameters=["1.mlp.experts.down_proj"]), torch.float32))
    cases.append(("moe_gptoss_patterns", gpt_oss,
                  dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                       rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 16}), torch.float32))
    def llama():
        cfg = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)

    cases.append(("dora_embedding", llama,
                  dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"]), torch.float32))
    cases.append(("moe_qwen3_bf16", qwen3_moe,
                  dict(r=4, lora_alpha=8, target_modules=[],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), torch.bfloat16))
    return cases


def main():
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, f)
    errors = []
    for case, make, kw, dtype in tiny_models():
        try:
            torch.manual_seed(1234)
            d = os.path.join(out, case)
            model = make().to(dtype).eval()
            with torch.no_grad():  # random, non-zero everywhere (the factory's init may leave zeros)
                for p in model.parameters():
                    p.copy_((torch.randn(p.shape) * 0.5).to(p.dtype))
            model.save_pretrained(os.path.join(d, "base"))
            pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
            with torch.no_grad():  # B random too (init_lora_weights=False already does, be explicit)
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.copy_((torch.randn(p.shape) * 0.3).to(p.dtype))
            pm.save_pretrained(os.path.join(d, "adapter"))
            wrappers, ref = [], {}
            sd_keys = set(pm.state_dict().keys())
            for name, mod in pm.named_modules():
                if type(mod).__name__ != "ParamWrapper":
                    continue
                path = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
                base = mod.get_base_layer()
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                keys = sorted(k for k in sd_keys if k.startswith(name + ".lora_") and "base_layer.lora" not in k[len(name):])
                wrappers.append(dict(path=path, parameter_name=mod.parameter_name, num_experts=int(mod.num_experts),
                                     in_features=int(mod.in_features), out_features=int(mod.out_features),
                                     swapped=bool(mod._did_swap_in_out_features),
                                     is_transposed=bool(getattr(base, "is_transposed", False)),
                                     param_shape=list(getattr(base, mod.parameter_name).shape),
                                     r=int(mod.r["default"]), scaling=float(mod.scaling["default"]),
                                     lora_A=list(A.shape), lora_B=list(B.shape), state_dict_keys=keys))
                with torch.no_grad():
                    ref[path + ".delta_weight"] = mod.get_delta_weight("default").detach().contiguous().clone()
            for name, mod in pm.named_modules():
                if hasattr(mod, "lora_embedding_A") and "default" in getattr(mod, "lora_embedding_A", {}):
                    path = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
                    vocab = mod.get_base_layer().weight.shape[0]
                    ids = torch.tensor([0, vocab - 1, 5, 5, 17], dtype=torch.int64)
                    with torch.no_grad():
                        ref[path + ".ids"] = ids
                        ref[path + ".y"] = mod(ids.view(1, -1))[0].detach().contiguous().clone()
            save_file(ref, os.path.join(d, "reference.safetensors"))
            with open(os.path.join(d, "wrappers.json"), "w") as f:
                json.dump(wrappers, f, indent=1)
            merged = pm.merge_and_unload()
            # In the base's file layout (save_pretrained reverts transformers' expert fusing), so that
            # merged/ and base/ have the same keys.
            merged.save_pretrained(os.path.join(d, "merged"))
            print(case, "ok:", len(wrappers), "wrappers", file=sys.stderr)
        except Exception:
            errors.append(f"== {case}\n{traceback.format_exc()}")
            print(errors[-1], file=sys.stderr)
    with open(os.path.join(out, "errors.txt"), "w") as f:
        f.write("\n".join(errors))


if __name__ == "__main__":
    main()
