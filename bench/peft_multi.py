#!/usr/bin/env python3
"""Times PEFT's mixed-batch inference (PEFT 0.21, PyTorch 2.11, bf16, CUDA events,
median): a PeftModel holding N LoRA adapters (r 16, alpha 32) on one Linear
4096 -> 4096, forward(x, adapter_names=[...]) with T tokens spread evenly (then
shuffled) over the N adapters, as bench/cuda/bench_multi.cu does. Also PEFT
with one active adapter and torch's F.linear alone at the same T.
CSV columns as bench_multi: name,tokens,adapters,r,ms,extra.

  python3 bench/peft_multi.py out.csv

Unlike bench_multi, W is not rotated among copies at T <= 16 (one model per N;
4 copies of a 512-adapter model take long to build), so PEFT's base GEMM may
read W from L2 there: that favours PEFT. Combinations whose adapter loading
exceeds LORA_PEFT_MULTI_LOAD_S seconds (default 120) are skipped and reported.
"""
import os
import random
import sys
import time

import torch
import peft
from peft import LoraConfig, get_peft_model

from peft_common import One, time_ms

dev = "cuda"
dt = torch.bfloat16
IN = OUT = 4096
R = 16
out_file = open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout
out_file.write("name,tokens,adapters,r,ms,extra\n")
load_limit = float(os.environ.get("LORA_PEFT_MULTI_LOAD_S", "120"))


def emit(name, t, n, ms, extra=0.0):
    out_file.write(f"{name},{t},{n},{R},{ms:.5f},{extra:.4f}\n")
    out_file.flush()


def model_with(n):
    """A PeftModel with adapters a0 … a{n-1}; returns (model, seconds to add them)."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    t0 = time.time()
    pm = get_peft_model(One(IN, OUT).to(dev, dt), cfg, adapter_name="a0")
    for k in range(1, n):
        pm.add_adapter(f"a{k}", cfg)
        if time.time() - t0 > load_limit:
            return None, time.time() - t0
    pm.to(dev, dt)
    pm.eval()
    torch.cuda.synchronize()
    return pm, time.time() - t0


if __name__ == "__main__":
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
    rng = random.Random(4321)
    for n in (1, 8, 64, 512):
        pm, load_s = model_with(n)
        if pm is None:
            print(f"peft_multi: N {n}: adding adapters took over {load_limit:.0f} s; skipped", file=sys.stderr)
            emit("peft_load_skipped", 0, n, 0.0, load_s)
            continue
        emit("peft_load_s", 0, n, 0.0, load_s)
        w = pm.base_model.model.proj.base_layer.weight
        for t in (1, 16, 256, 4096):
            ids = [i % n for i in range(t)]
            rng.shuffle(ids)
            names = [f"a{i}" for i in ids]
            x = torch.randn(t, IN, device=dev, dtype=dt)
            slow = min(n, t) >= 64
            batch, batches = (2, 5) if slow else (10, 15)
            with torch.no_grad():
                try:
                    ms = time_ms(lambda k: pm(x, adapter_names=names), batch, batches, warmup=2)
                    emit("peft_mixed", t, n, ms)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"peft_multi: T {t} N {n}: mixed forward failed: {e}", file=sys.stderr)
                    ms = float("nan")
                pm.set_adapter("a0")
                one = time_ms(lambda k: pm(x), 10, 15, warmup=2)
                emit("peft_single", t, n, one)
                emit("torch_base_gemm", t, n, time_ms(lambda k: torch.nn.functional.linear(x, w), 10, 15, warmup=2))
            print(f"peft_multi: T {t:5d} N {n:3d}: mixed {ms:.4f} ms, single {one:.4f} ms", file=sys.stderr)
        del pm
        torch.cuda.empty_cache()
