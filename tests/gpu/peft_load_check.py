#!/usr/bin/env python3
"""Checks that PEFT loads an adapter folder written by lora::io::save_peft_adapter.

Needs PEFT 0.21, torch, transformers and safetensors (the GPU machine). For one fixture
case, it builds the tiny Llama base model of tests/data (config from tests/data/README.md,
weights from <case>/base/model.safetensors), then

  1. loads <saved> with PeftModel.from_pretrained: no missing or unexpected adapter keys;
  2. compares every LoRA parameter (lora_A, lora_B, lora_magnitude_vector) and every
     scaling with PEFT's own load of the original <case>/adapter;
  3. runs every adapted layer on the fixture input x: output equals the fixture's y;
  4. runs the whole model on random tokens: logits equal those of the original adapter.

Prints one line: "PASS peft_load_check <case> ..." or "FAIL peft_load_check <case>: why",
exit status 0 / 1.

Usage (from the repository root, after building the examples):
  build/examples/peft_roundtrip tests/data/peft/dora_r4_a8_qv/adapter /tmp/saved_dora
  python3 tests/gpu/peft_load_check.py tests/data/peft/dora_r4_a8_qv /tmp/saved_dora
  # all cases, and a bf16 save (compared with bf16 tolerances):
  for c in lora_r8_a16_all rslora_r16_a8_attn dora_r4_a8_qv patterns_all; do
    build/examples/peft_roundtrip tests/data/peft/$c/adapter /tmp/saved_$c &&
    python3 tests/gpu/peft_load_check.py tests/data/peft/$c /tmp/saved_$c
    build/examples/peft_roundtrip tests/data/peft/$c/adapter /tmp/saved16_$c bf16 &&
    python3 tests/gpu/peft_load_check.py tests/data/peft/$c /tmp/saved16_$c --tol 1e-2
  done
"""
import argparse
import logging
import os
import sys
import warnings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", help="fixture case folder, e.g. tests/data/peft/dora_r4_a8_qv")
    ap.add_argument("saved", help="adapter folder written by save_peft_adapter")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (use ~1e-2 for a bf16/f16 save)")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "0") != "" else "cpu")
    args = ap.parse_args()
    name = os.path.basename(os.path.normpath(args.case))

    def fail(why):
        print(f"FAIL peft_load_check {name}: {why}")
        sys.exit(1)

    try:
        import torch
        import peft
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import torch/peft/transformers/safetensors: {e}")

    device = args.device if (args.device == "cpu" or torch.cuda.is_available()) else "cpu"
    torch.manual_seed(0)

    def base_model():
        cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
        m = LlamaForCausalLM(cfg).float()
        sd = load_file(os.path.join(args.case, "base", "model.safetensors"))
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            fail(f"base model does not match the fixture: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return m.to(device).eval()

    # 1. load ours, catching PEFT's warnings about missing/unexpected keys
    caught = []

    class Grab(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    handler = Grab()
    logging.getLogger().addHandler(handler)
    for lg in ("peft", "transformers"):
        logging.getLogger(lg).addHandler(handler)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            ours = PeftModel.from_pretrained(base_model(), args.saved).eval()
        except Exception as e:  # noqa: BLE001
            fail(f"PeftModel.from_pretrained({args.saved}) raised {type(e).__name__}: {e}")
        caught += [str(x.message) for x in w]
    bad = [m for m in caught if "missing adapter keys" in m.lower() or "unexpected keys" in m.lower()
           or "missing keys" in m.lower()]
    if bad:
        fail(f"PEFT warned while loading: {bad[0][:300]}")
    theirs = PeftModel.from_pretrained(base_model(), os.path.join(args.case, "adapter")).eval()

    # 2. parameters and scalings
    def lora_state(model):
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}

    so, st = lora_state(ours), lora_state(theirs)
    if sorted(so) != sorted(st):
        diff = sorted(set(so) ^ set(st))
        fail(f"adapter parameters differ from PEFT's own load: {diff[:4]}")
    worst = 0.0
    for k in st:
        a, b = so[k].float(), st[k].float()
        if a.shape != b.shape:
            fail(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        if err > args.tol:
            fail(f"{k}: relative difference {err:.3g} > {args.tol}")
    layers_o = {n: m for n, m in ours.named_modules() if hasattr(m, "scaling") and hasattr(m, "lora_A")}
    layers_t = {n: m for n, m in theirs.named_modules() if hasattr(m, "scaling") and hasattr(m, "lora_A")}
    if sorted(layers_o) != sorted(layers_t):
        fail(f"adapted layers differ: {sorted(set(layers_o) ^ set(layers_t))[:4]}")
    for n in layers_t:
        so_, st_ = layers_o[n].scaling, layers_t[n].scaling
        if set(so_) != set(st_) or any(abs(so_[a] - st_[a]) > 1e-12 * max(1.0, abs(st_[a])) for a in st_):
            fail(f"{n}: scaling {so_} vs PEFT's {st_}")
        ro, rt = layers_o[n].r, layers_t[n].r
        if ro != rt:
            fail(f"{n}: r {ro} vs PEFT's {rt}")

    # 3. layer outputs on the fixture inputs
    ref = load_file(os.path.join(args.case, "reference.safetensors"))
    checked = 0
    with torch.no_grad():
        for key in ref:
            if not key.endswith(".x"):
                continue
            module = key[: -len(".x")]
            layer = ours.get_submodule("base_model.model." + module)
            y = layer(ref[key].to(device)).float().cpu()
            want = ref[module + ".y"]
            err = ((y - want).norm() / want.norm()).item()
            worst = max(worst, err)
            if err > args.tol:
                fail(f"layer {module}: output differs from the fixture's y by {err:.3g} (relative)")
            checked += 1
        # 4. whole model
        ids = torch.randint(0, 128, (2, 11), device=device)
        lo, lt = ours(ids).logits.float(), theirs(ids).logits.float()
        err = ((lo - lt).norm() / lt.norm()).item()
        worst = max(worst, err)
        if err > args.tol:
            fail(f"model logits differ from PEFT's load of the original by {err:.3g} (relative)")
    if checked == 0:
        fail("no layer outputs checked (reference.safetensors has no <module>.x)")
    print(f"PASS peft_load_check {name}: peft {peft.__version__}, {len(layers_t)} layers, {checked} layer outputs "
          f"and logits match, worst relative error {worst:.2e} ({device})")


if __name__ == "__main__":
    main()
