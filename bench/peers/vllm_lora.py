#!/usr/bin/env python3
"""vLLM's Triton LoRA kernels at our shapes (issue 23): vllm_lora.py VLLM_OPS_DIR OUT.csv

VLLM_OPS_DIR holds vLLM's lora_shrink_op.py, lora_expand_op.py, kernel_utils.py and utils.py
(never committed here; bench/peers/vllm_shim.py loads them without the vllm package). A LoRA
linear layer as vLLM's punica wrapper runs it: the base GEMM (torch.mm, cuBLAS), then
lora_shrink into a float32 buffer [1, T, r] (scaling applied there) and lora_expand with
add_inputs=True onto the base output, bf16, r 16, scaling 2 (alpha 32), with the kernel
metadata vLLM's LoRAKernelMeta prepares (tokens sorted by adapter, counts, start offsets;
prepared once per batch, outside the timing, as vLLM does for all layers of a step).

Shapes (ours: bench/cuda/bench_cuda.cu and bench_multi.cu): single adapter, in 4096 → out 4096 and
14336, T 1…128 (plus 256 and 4096 for the mixed/single ratio); mixed batches of 64 adapters at
T 256 and 4096 and of 512 adapters at T 256, tokens spread evenly over the adapters and
shuffled. W ~ N(0, 0.02²), A, B ~ N(0, 0.02²), X ~ N(0, 1), as ours. For T ≤ 128 the base
weights rotate among copies that together exceed 3× L2 (bench_decode's rule).

Correctness first, every shape: the layer's output and the LoRA term alone (expand without
add_inputs onto a NaN-filled output, so every element must be written) against float64 on the
GPU from the same bf16 inputs; a relative error above 2e-2 or any NaN fails the run.

Timing: CUDA events around batches of 10 calls, 15 rounds, rotated order, one untimed call per
round, medians (bench/cuda/common.cuh). Each variant's 10 calls are captured in one CUDA graph and
replayed (vLLM decodes under CUDA graphs; Python's launch cost would otherwise dominate small T);
the whole layer is also timed eagerly (vllm_*_eager), Python dispatch included.

CSV: name,in,out,tokens,adapters,r,ms,extra (check_* rows: extra = relative error).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_shim import load_vllm_lora_ops  # noqa: E402

R = 16
SCALING = 2.0
IN = 4096


class Meta:
    """The per-batch metadata of vLLM's LoRAKernelMeta.prepare_tensors, int32 on the device."""

    def __init__(self, ids: torch.Tensor, max_loras: int):
        dev = torch.device("cuda")
        ids = ids.to(dev, torch.int32)
        self.mapping = ids
        self.sorted_idx = torch.sort(ids, stable=True).indices.to(torch.int32)
        active, counts = torch.unique(ids, sorted=True, return_counts=True)
        n = active.numel()
        self.lora_ids = torch.full((max_loras + 1,), -1, dtype=torch.int32, device=dev)
        self.lora_ids[:n] = active.to(torch.int32)
        self.num_tokens = torch.zeros(max_loras + 1, dtype=torch.int32, device=dev)
        self.num_tokens[:n] = counts.to(torch.int32)
        self.start = torch.zeros(max_loras + 2, dtype=torch.int32, device=dev)
        self.start[1 : n + 1] = torch.cumsum(counts, 0).to(torch.int32)
        self.no_lora = torch.tensor([False])
        self.num_active = torch.tensor([n])

    def args(self):
        return (self.mapping, self.sorted_idx, self.num_tokens, self.start, self.lora_ids, self.no_lora,
                self.num_active)


def time_all(fns, batch=10, batches=15, warmup=3, graph=True):
    """Median ms per call of each f(i); see the module docstring."""
    n = len(fns)
    for k in range(warmup):
        for f in fns:
            f(k)
    torch.cuda.synchronize()
    if graph:
        runs = []
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(batch):
                    f(i)
            runs.append(g.replay)
        torch.cuda.synchronize()
    else:
        runs = [lambda f=f: [f(i) for i in range(batch)] for f in fns]
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    t = [[] for _ in range(n)]
    for b in range(batches):
        first = b % n
        runs[first]()
        ev[0].record()
        for j in range(n):
            runs[(first + j) % n]()
            ev[j + 1].record()
        ev[n].synchronize()
        for j in range(n):
            t[(first + j) % n].append(ev[j].elapsed_time(ev[j + 1]) / batch)
    return [sorted(v)[len(v) // 2] for v in t]


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double()
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y - ref).norm() / ref.norm()).item()


def bench(ops, out: int, T: int, N: int, l2: int, gen: torch.Generator, emit, failures: list):
    dev = torch.device("cuda")
    bf = torch.bfloat16
    ops.forget_weights()
    sets = max(4, int(3 * l2 / (out * IN * 2)) + 1) if T <= 128 else 1
    W = [(torch.randn(out, IN, generator=gen, device=dev) * 0.02).to(bf) for _ in range(sets)]
    A = (torch.randn(N, R, IN, generator=gen, device=dev) * 0.02).to(bf).contiguous()
    B = (torch.randn(N, out, R, generator=gen, device=dev) * 0.02).to(bf).contiguous()
    x = torch.randn(T, IN, generator=gen, device=dev).to(bf)
    ids = torch.arange(T, device=dev) % N
    ids = ids[torch.randperm(T, generator=gen, device=dev)]
    meta = Meta(ids, max(N, 1))
    margs = meta.args()
    buf = torch.empty(1, T, R, dtype=torch.float32, device=dev)
    y = torch.empty(T, out, dtype=bf, device=dev)

    def base(i):
        torch.mm(x, W[i % sets].t(), out=y)

    def shrink(i):
        ops.shrink(x, [A], buf, *margs, SCALING)

    def expand(i):
        ops.expand(buf, [B], y, *margs, offset_start=0, add_inputs=True)

    def layer(i):
        base(i)
        shrink(i)
        expand(i)

    # Correctness: the layer, and the LoRA term alone onto NaN.
    x64, ids_l = x.double(), ids.tolist()
    delta = torch.zeros(T, out, dtype=torch.float64, device=dev)
    for a in sorted(set(ids_l)):
        rows = (ids == a).nonzero().flatten()
        delta[rows] = SCALING * (x64[rows] @ A[a].double().t()) @ B[a].double().t()
    ref = x64 @ W[0].double().t() + delta
    layer(0)
    torch.cuda.synchronize()
    e_layer = rel(y, ref)
    y.fill_(float("nan"))
    shrink(0)
    ops.expand(buf, [B], y, *margs, offset_start=0, add_inputs=False)
    torch.cuda.synchronize()
    e_delta = rel(y, delta)
    for name, e in (("check_vllm_layer", e_layer), ("check_vllm_delta", e_delta)):
        emit(name, out, T, N, 0.0, e)
        if not (e <= 2e-2):
            failures.append(f"{name} out {out} T {T} adapters {N}: relative error {e:.3e}")

    tg = time_all([base, shrink, expand, layer])
    te = time_all([base, layer], graph=False)
    for name, v in zip(("vllm_base", "vllm_shrink", "vllm_expand", "vllm_layer"), tg):
        emit(name, out, T, N, v, 0.0)
    emit("vllm_base_eager", out, T, N, te[0], 0.0)
    emit("vllm_layer_eager", out, T, N, te[1], 0.0)
    sh = ops.get_lora_op_configs("shrink", max_loras=N + 1, batch=T, hidden_size=IN, rank=R, num_slices=1)
    ex = ops.get_lora_op_configs("expand", max_loras=N + 1, batch=T, hidden_size=out, rank=R, num_slices=1,
                                 add_inputs=True)
    print(f"vllm {IN}->{out} T {T:4d} adapters {N:3d} (W sets {sets}): base {tg[0]*1e3:7.1f} us, shrink "
          f"{tg[1]*1e3:6.1f}, expand {tg[2]*1e3:6.1f}, layer {tg[3]*1e3:7.1f} = {tg[3]/tg[0]:.2f}x base (graphs); "
          f"eager layer {te[1]*1e3:7.1f} = {te[1]/te[0]:.2f}x; errors {e_layer:.1e} / {e_delta:.1e}; "
          f"shrink BM {sh['block_m']} BK {sh['block_k']} split {sh['split_k']}, expand BM {ex['block_m']} "
          f"BN {ex['block_n']}", file=sys.stderr, flush=True)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    folder, out_csv = sys.argv[1], sys.argv[2]
    ops = load_vllm_lora_ops(folder)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    import triton

    print(f"vllm_lora: {props.name}, L2 {l2 >> 20} MB, torch {torch.__version__}, triton {triton.__version__}",
          file=sys.stderr)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(2323)
    failures: list[str] = []
    with open(out_csv, "w") as f:
        f.write("name,in,out,tokens,adapters,r,ms,extra\n")

        def emit(name, out, T, N, ms, extra):
            f.write(f"{name},{IN},{out},{T},{N},{R},{ms:.5f},{extra:.5g}\n")
            f.flush()

        with torch.inference_mode():
            for out in (4096, 14336):
                for T in (1, 2, 4, 8, 16, 32, 64, 128, 256, 4096):
                    bench(ops, out, T, 1, l2, gen, emit, failures)
                for T, N in ((256, 64), (4096, 64), (256, 512)):
                    bench(ops, out, T, N, l2, gen, emit, failures)
                torch.cuda.empty_cache()
    for m in failures:
        print("vllm_lora: FAILED " + m, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
