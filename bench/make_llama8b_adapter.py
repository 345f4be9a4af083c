#!/usr/bin/env python3
"""Writes a Llama-3-8B-shaped PEFT LoRA adapter (r = 64, bf16, all seven projections,
32 layers: 224 matrices, 168M parameters) for timing `lora inspect`. Random factors
with a decaying spectrum (B's columns scaled by 0.93^i), so the energy ranks are
meaningful. Usage: make_llama8b_adapter.py OUT_FOLDER [--layers 32] [--rank 64]
Never commit the output (≈ 336 MB)."""
import json, os, struct, sys
import numpy as np

def main():
    out = sys.argv[1]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 32
    r = int(sys.argv[sys.argv.index("--rank") + 1]) if "--rank" in sys.argv else 64
    hidden, inter, kv = 4096, 14336, 1024
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    rng = np.random.default_rng(0)
    decay = (0.93 ** np.arange(r)).astype(np.float32)
    header, blobs, offset = {}, [], 0
    def bf16(x):
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    for l in range(layers):
        for m, (o, i) in shapes.items():
            base = f"base_model.model.model.layers.{l}.{m}"
            A = rng.standard_normal((r, i), dtype=np.float32) * (1.0 / np.sqrt(i))
            B = rng.standard_normal((o, r), dtype=np.float32) * decay * 0.01
            for name, t in ((base + ".lora_A.weight", A), (base + ".lora_B.weight", B)):
                b = bf16(t).tobytes()
                header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
                blobs.append(b)
                offset += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": False, "use_dora": False,
           "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

main()
