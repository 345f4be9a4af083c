#!/usr/bin/env python3
"""Times PEFT's LoRA layer (PEFT 0.21, PyTorch 2.11, bf16, CUDA events, median)
on the shapes of bench/cuda/bench_cuda.cu and writes the same CSV columns:
name,in,out,tokens,r,ms,extra.

  python3 bench/peft_lora.py out.csv

Decode shapes (tokens <= 16) rotate among 4 layers so weights come from device
memory, as in bench_cuda.
"""
import sys

import torch
import peft
from peft import LoraConfig, get_peft_model

from peft_common import One, time_ms

dev = "cuda"
dt = torch.bfloat16
out_file = open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout
out_file.write("name,in,out,tokens,r,ms,extra\n")


def emit(name, i, o, t, r, ms, extra=0.0):
    out_file.write(f"{name},{i},{o},{t},{r},{ms:.5f},{extra:.4f}\n")
    out_file.flush()


def peft_layer(i, o, r, dora):
    m = One(i, o).to(dev, dt)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0, use_dora=dora,
                     init_lora_weights=False)  # random A and B (B != 0)
    pm = get_peft_model(m, cfg).to(dev, dt)
    pm.eval()
    return pm


def bench(i, o, t, r, dora=False):
    sets = 4 if t <= 16 else 1
    layers = [peft_layer(i, o, r, dora) for _ in range(sets)]
    x = torch.randn(t, i, device=dev, dtype=dt)
    with torch.no_grad():
        ms = time_ms(lambda k: layers[k % sets](x))
        emit("peft_dora_fwd" if dora else "peft_fwd", i, o, t, r, ms)
        if dora:
            return
        ws = [l.base_model.model.proj.base_layer.weight for l in layers]
        emit("torch_base_gemm", i, o, t, r, time_ms(lambda k: torch.nn.functional.linear(x, ws[k % sets])))
    # forward + backward with W frozen (dX, dA, dB): what a fine-tuning step needs.
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(t, o, device=dev, dtype=dt)

    def step(k):
        y = layers[k % sets](xg)
        y.backward(gy)

    emit("peft_fwd_bwd", i, o, t, r, time_ms(step))


def spectrum(i, o, r):
    A = torch.randn(r, i, device=dev, dtype=torch.float32) * 0.02
    B = torch.randn(o, r, device=dev, dtype=torch.float32) * 0.02
    s = 2.0

    def dense(_):
        torch.linalg.svdvals(s * (B @ A))
        torch.cuda.synchronize()

    def qr_route(_):
        _, rb = torch.linalg.qr(B)
        _, ra = torch.linalg.qr(A.T)
        torch.linalg.svdvals(s * (rb @ ra.T))
        torch.cuda.synchronize()

    emit("torch_svdvals_dense", i, o, 0, r, time_ms(dense, batch=1, batches=3))
    emit("torch_qr_route", i, o, 0, r, time_ms(qr_route, batch=1, batches=21))


if __name__ == "__main__":
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
    for t in (1, 16, 4096, 16384):
        for r in (16, 64):
            bench(4096, 4096, t, r)
    for t in (1, 16, 4096, 16384):
        bench(4096, 14336, t, 16)
    for t in (1, 16384):
        bench(4096, 4096, t, 16, dora=True)
    spectrum(4096, 4096, 64)
