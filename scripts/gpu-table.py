#!/usr/bin/env python3
"""Prints the ours / PEFT / base-GEMM table from bench_cuda's and peft_lora.py's CSVs;
with --multi MULTI.csv PEFT_MULTI.csv [machine], the many-adapters table (bench_multi_cuda, peft_multi.py);
with --peers OUTDIR [machine], the real peers (bench/peers: vLLM's Triton LoRA ops, bitsandbytes' NF4) beside ours;
with --goals OUTDIR [machine], issue 23's goals from that run's ours.csv, multi.csv and tune_nf4.csv."""
import csv
import sys


def load(path):
    try:
        with open(path) as f:
            return {(r["name"], int(r["in"]), int(r["out"]), int(r["tokens"]), int(r["r"])): (float(r["ms"]), float(r["extra"]))
                    for r in csv.DictReader(f)}
    except OSError:
        return {}


def multi_table(ours_path, peft_path, machine):
    """Many adapters (issue 11): bench_multi_cuda's and peft_multi.py's CSVs."""
    def rows(path):
        try:
            with open(path) as f:
                return {(r["name"], int(r["tokens"]), int(r["adapters"])): (float(r["ms"]), float(r["extra"]))
                        for r in csv.DictReader(f)}
        except OSError:
            return {}
    ours, peft = rows(ours_path), rows(peft_path)
    nan = float("nan")
    g = lambda d, n, t, a, k=0: d.get((n, t, a), (nan, nan))[k]  # noqa: E731
    print(f"\n## Many adapters: in = out = 4096, r 16, bf16, medians of CUDA-event timings; machine: {machine}\n")
    print("| T | adapters | base GEMM ms | single ms | mixed ms (serial / overlap / delta) | mixed/single | mixed/base "
          "| naive loop ms | naive/mixed | PEFT mixed ms | PEFT/ours | PEFT single ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = sorted({(k[1], k[2]) for k in ours if k[0] == "mixed_serial"}, key=lambda x: (x[1], x[0]))
    for t, a in shapes:
        b, one = g(ours, "base_gemm", t, a), g(ours, "single_fused", t, a)
        ms, mo, md = g(ours, "mixed_serial", t, a), g(ours, "mixed_overlap", t, a), g(ours, "mixed_delta", t, a)
        m = min(v for v in (ms, mo, md) if v == v) if any(v == v for v in (ms, mo, md)) else nan
        nv = g(ours, "naive_loop", t, a)
        pm, ps = g(peft, "peft_mixed", t, a), g(peft, "peft_single", t, a)
        print(f"| {t} | {a} | {b:.4f} | {one:.4f} | {ms:.4f} / {mo:.4f} / {md:.4f} | {m/one:.2f} | {m/b:.2f} | {nv:.4f} "
              f"| {nv/m:.1f} | {pm:.4f} | {pm/m:.1f} | {ps:.4f} |")
    for a in (1, 8, 64, 512):
        v = g(peft, "peft_load_skipped", 0, a, 1)
        if v == v:
            print(f"\nPEFT with {a} adapters skipped: adding them took over {v:.0f} s")
    print("\nsingle = LowRankAdapter<bf16, cuda> fused apply over the same T; naive loop = tokens sorted by adapter, "
          "one apply(W, X_i) per adapter; PEFT single = one active adapter.")
    nf4_mixed_table({k: v[0] for k, v in ours.items()})
    bwd = sorted({(k[1], k[2]) for k in ours if k[0] == "bwd_mixed"}, key=lambda x: (x[1], x[0]))
    if bwd:
        print("\n| backward T | adapters | dX GEMM ms | single backward ms | mixed backward ms | mixed/single |")
        print("|---|---|---|---|---|---|")
        for t, a in bwd:
            b, one, m = g(ours, "bwd_base_dx", t, a), g(ours, "bwd_single", t, a), g(ours, "bwd_mixed", t, a)
            print(f"| {t} | {a} | {b:.4f} | {one:.4f} | {m:.4f} | {m/one:.2f} |")


def nf4_mixed_table(rows):
    """Mixed batches over an NF4 base (issue 23): bench_multi_cuda's nf4_* rows, {(name, T, N): ms}."""
    shapes = sorted({(k[1], k[2]) for k in rows if k[0] == "nf4_base"}, key=lambda x: (x[1], x[0]))
    if not shapes:
        return
    print("\nMixed batches over an NF4 base (AdapterSet::apply(Nf4Tensor<cuda>, …)), in = out = 4096, r 16, "
          "blocksize 64; NF4 product = quant::nf4_matmul alone:\n")
    print("| T | adapters | NF4 product µs | mixed serial µs | mixed overlap µs | mixed / NF4 |")
    print("|---|---|---|---|---|---|")
    nan = float("nan")
    for t, a in shapes:
        b, ms, mo = (rows.get((n, t, a), nan) for n in ("nf4_base", "nf4_mixed_serial", "nf4_mixed_overlap"))
        m = min((v for v in (ms, mo) if v == v), default=nan)
        print(f"| {t} | {a} | {b * 1e3:.1f} | {ms * 1e3:.1f} | {mo * 1e3:.1f} | {m / b:.2f} |")


def peers_table(outdir, machine):
    """The real peers (issue 23): peers_vllm.csv (bench/peers/vllm_lora.py) and peers_bnb.csv
    (bench/peers/bnb_gemv) beside ours from the same run (ours*.csv: bench_cuda, first file wins;
    multi.csv and multi_nf4.csv: bench_multi_cuda)."""
    import glob
    import os
    nan = float("nan")

    def get(d, name, i, o, t, r, k=0):
        x = d.get((name, i, o, t, r))
        return x[k] if x else nan
    ours = {}
    for path in sorted(glob.glob(os.path.join(outdir, "ours*.csv"))):
        for k, v in load(path).items():
            ours.setdefault(k, v)
    bnb = load(os.path.join(outdir, "peers_bnb.csv"))
    multi = {}
    for name in ("multi_nf4.csv", "multi.csv"):  # LORA_BENCH_MULTI=nf4 alone first, then all rows
        try:
            with open(os.path.join(outdir, name)) as f:
                for r in csv.DictReader(f):
                    multi.setdefault((r["name"], int(r["tokens"]), int(r["adapters"])), float(r["ms"]))
        except OSError:
            pass
    try:
        with open(os.path.join(outdir, "peers_vllm.csv")) as f:
            vl = {(r["name"], int(r["out"]), int(r["tokens"]), int(r["adapters"])): (float(r["ms"]), float(r["extra"]))
                  for r in csv.DictReader(f)}
    except OSError:
        vl = {}
    us = lambda v: f"{v * 1e3:.1f}" if v == v else "–"  # noqa: E731
    rat = lambda a, b: f"{a / b:.2f}" if a == a and b == b and b > 0 else "–"  # noqa: E731
    v = lambda n, o, t, a=1: vl.get((n, o, t, a), (nan, nan))[0]  # noqa: E731

    def our_single(o, t):
        """Ours and our base GEMM (µs source: bench_cuda's decode set for 2…128, bench_lora's pair else)."""
        b, f = get(ours, "dec_base", 4096, o, t, 16), get(ours, "dec_ours", 4096, o, t, 16)
        if b != b:
            b, f = get(ours, "base_gemm", 4096, o, t, 16), get(ours, "ours_fused_fwd", 4096, o, t, 16)
        return b, f

    print(f"\n## Peers (issue 23), bf16, medians of CUDA-event timings; machine: {machine}\n")
    cp = get(ours, "copy_GBps", 0, 0, 0, 0, 1)
    if vl:
        errs = [x[1] for k, x in vl.items() if k[0].startswith("check_")]
        print(f"vLLM Triton LoRA (lora_shrink + lora_expand after torch.mm; CUDA-graph replay; eager = Python "
              f"dispatch included); worst relative error against float64: {max(errs):.1e}\n")
        print("| in→out | T | our base µs | ours µs | ours/base | torch base µs | vLLM shrink µs | vLLM expand µs "
              "| vLLM layer µs | vLLM/torch base | vLLM eager µs | vLLM/ours |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for o in (4096, 14336):
            for t in sorted({k[2] for k in vl if k[1] == o and k[3] == 1 and k[0] == "vllm_layer"}):
                b, f = our_single(o, t)
                tb, sh, ex, ly, le = (v(n, o, t) for n in ("vllm_base", "vllm_shrink", "vllm_expand", "vllm_layer",
                                                           "vllm_layer_eager"))
                print(f"| 4096→{o} | {t} | {us(b)} | {us(f)} | {rat(f, b)} | {us(tb)} | {us(sh)} | {us(ex)} | {us(ly)} "
                      f"| {rat(ly, tb)} | {us(le)} | {rat(ly, f)} |")
        print("\nmixed batches (tokens spread evenly over the adapters, shuffled); ours = the best of "
              "bench_multi's three schedules, 4096→4096 only:\n")
        print("| in→out | T | adapters | ours single µs | ours mixed µs | ours mixed/single | vLLM single µs "
              "| vLLM mixed µs | vLLM mixed/single | vLLM mixed/ours mixed |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for o in (4096, 14336):
            for t, a in sorted({(k[2], k[3]) for k in vl if k[1] == o and k[3] > 1 and k[0] == "vllm_layer"},
                               key=lambda x: (x[1], x[0])):
                one = multi.get(("single_fused", t, a), nan) if o == 4096 else nan
                ms = [multi.get((n, t, a), nan) for n in ("mixed_serial", "mixed_overlap", "mixed_delta")]
                m = min((x for x in ms if x == x), default=nan) if o == 4096 else nan
                vs, vm = v("vllm_layer", o, t, 1), v("vllm_layer", o, t, a)
                print(f"| 4096→{o} | {t} | {a} | {us(one)} | {us(m)} | {rat(m, one)} | {us(vs)} | {us(vm)} "
                      f"| {rat(vm, vs)} | {rat(vm, m)} |")
    if bnb:
        errs = [x[1] for k, x in bnb.items() if k[0].startswith("check_")]
        print(f"\nbitsandbytes NF4 (blocksize 64; the same packed codes and scales for theirs and ours; "
              f"worst relative error against float64: {max(errs):.1e}; gemv_naive takes one token only):\n")
        print("| W (out×in) | T | cuBLAS bf16 µs | bnb gemv_naive µs | ×cuBLAS | bnb gemm_4bit µs | ×cuBLAS "
              "| ours nf4_gemm µs | ×cuBLAS | ours % of copy | bnb best / ours |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for i, o in ((4096, 14336), (14336, 4096)):
            for t in sorted({k[3] for k in bnb if k[0] == "cublas_bf16" and k[1] == i}):
                cb = get(bnb, "cublas_bf16", i, o, t, 0)
                nv = get(bnb, "bnb_gemv_naive", i, o, t, 0)
                g4 = get(bnb, "bnb_gemm_4bit", i, o, t, 0)
                q = get(bnb, "ours_nf4_gemm", i, o, t, 0)
                qbw = get(bnb, "ours_nf4_gemm", i, o, t, 0, 1)
                best = min((x for x in (nv, g4) if x == x), default=nan)
                pc = f"{qbw / cp * 100:.0f}%" if qbw == qbw and cp == cp else "–"
                print(f"| {o}×{i} | {t} | {us(cb)} | {us(nv)} | {rat(cb, nv)} | {us(g4)} | {rat(cb, g4)} | {us(q)} "
                      f"| {rat(cb, q)} | {pc} | {rat(best, q)} |")
    nf4_mixed_table(multi)


def goals_table(outdir, machine):
    """Issue 23's goals from one run's CSVs in outdir: ours.csv (bench_cuda), multi.csv (bench_multi_cuda)
    and, when present, tune_nf4.csv (tune_nf4: NF4 at 1…16 tokens and QLoRA against the NF4 product in
    alternating batches). A goal reads "met" only when every one of its measured values meets it."""
    import os
    nan = float("nan")
    ours = load(os.path.join(outdir, "ours.csv"))

    def rows(name, key):
        try:
            with open(os.path.join(outdir, name)) as f:
                return {key(r): r for r in csv.DictReader(f)}
        except OSError:
            return {}
    multi = {k: float(r["ms"]) for k, r in rows("multi.csv", lambda r: (r["name"], int(r["tokens"]),
                                                                        int(r["adapters"]))).items()}
    tune = rows("tune_nf4.csv", lambda r: (r["name"], int(r["out"]), int(r["in"]), int(r["tokens"])))

    def get(name, i, o, t, r, k=0):
        v = ours.get((name, i, o, t, r))
        return v[k] if v else nan

    def tcol(name, o, i, t, col):
        r = tune.get((name, o, i, t))
        return float(r[col]) if r else nan
    cp = get("copy_GBps", 0, 0, 0, 0, 1)
    fmt = lambda v: f"{v:.2f}" if v == v else "–"  # noqa: E731
    out = []  # (measure, goal, values text, met)

    def verdict(vals, ok):
        vals = [v for v in vals if v == v]
        return "–" if not vals else ("met" if all(ok(v) for v in vals) else "**not met**")

    for o in (14336, 4096):
        ts = sorted({k[3] for k in ours if k[0] == "dec_ours" and k[1] == 4096 and k[2] == o and k[4] == 16})
        vals = [get("dec_ours", 4096, o, t, 16) / get("dec_base", 4096, o, t, 16) for t in ts]
        out.append((f"single adapter (r 16) / base GEMM, 4096→{o}, T " + " / ".join(map(str, ts)), "≤ 1.15",
                    " / ".join(map(fmt, vals)), verdict(vals, lambda v: v <= 1.15)))
    if tune:
        x1, p1 = tcol("nf4_gemm", 14336, 4096, 1, "x_cublas"), tcol("nf4_gemm", 14336, 4096, 1, "pct_copy")
    else:  # bench_cuda's pair (time_pair: cuBLAS's GEMM and nf4_matmul alternating)
        q = get("ours_nf4_gemm", 4096, 14336, 1, 0)
        x1 = get("base_gemm", 4096, 14336, 1, 0) / q
        p1 = get("ours_nf4_gemm", 4096, 14336, 1, 0, 1) / cp * 100
    ok1 = [v for v in (x1,) if v == v]
    out.append(("NF4 T 1 (14336 × 4096) against cuBLAS bf16; % of copy", "≥ 3.2×, ≥ 80 %",
                f"{fmt(x1)}×, " + (f"{p1:.0f} %" if p1 == p1 else "–"),
                "–" if not ok1 else ("met" if x1 >= 3.2 and p1 >= 80 else "**not met**")))
    ts = [t for t in (2, 4, 8, 16) if (("nf4_gemm", 14336, 4096, t) in tune)] if tune else [16]
    vals = [tcol("nf4_gemm", 14336, 4096, t, "x_cublas") if tune else
            get("base_gemm", 4096, 14336, t, 0) / get("ours_nf4_gemm", 4096, 14336, t, 0) for t in ts]
    out.append(("NF4 against cuBLAS bf16, T " + " / ".join(map(str, ts)), "≥ 2.5×", " / ".join(map(fmt, vals)),
                verdict(vals, lambda v: v >= 2.5)))
    dq = get("ours_nf4_dequant", 4096, 14336, 0, 0, 1) / cp * 100
    if dq != dq:  # tune_nf4's row of the library's dequantiser
        dq = tcol("dequantize", 14336, 4096, 0, "pct_copy")
    out.append(("NF4 dequantise, % of copy", "≥ 85 %", f"{dq:.0f} %" if dq == dq else "–",
                verdict([dq], lambda v: v >= 85)))
    for o in (14336, 4096):
        ts = sorted(k[3] for k in tune if k[0] == "qlora" and k[1] == o and k[2] == 4096)
        vals = [tcol("qlora", o, 4096, t, "pct_copy") for t in ts]  # the qlora rows' third column: their ratio
        out.append((f"QLoRA fused (r 16) / NF4 product alone, {o} × 4096, T " + " / ".join(map(str, ts)), "≤ 1.1",
                    " / ".join(map(fmt, vals)) if vals else "– (tune_nf4 not run)", verdict(vals, lambda v: v <= 1.1)))
    best = lambda *v: min((x for x in v if x == x), default=nan)  # noqa: E731
    sh = sorted({(k[1], k[2]) for k in multi if k[0] == "nf4_base"}, key=lambda x: (x[1], x[0]))
    vals = [best(multi.get(("nf4_mixed_serial", t, a), nan), multi.get(("nf4_mixed_overlap", t, a), nan)) /
            multi[("nf4_base", t, a)] for t, a in sh]
    out.append(("mixed batch over NF4 / NF4 product, (T, adapters) " + " / ".join(f"({t}, {a})" for t, a in sh),
                "≤ 1.15", " / ".join(map(fmt, vals)), verdict(vals, lambda v: v <= 1.15)))
    sh = [(256, 64), (4096, 64), (256, 512)]
    vals = [best(*(multi.get((n, t, a), nan) for n in ("mixed_serial", "mixed_overlap", "mixed_delta"))) /
            multi.get(("single_fused", t, a), nan) for t, a in sh]
    out.append(("mixed / single, (T, adapters) " + " / ".join(f"({t}, {a})" for t, a in sh), "≤ 1.1",
                " / ".join(map(fmt, vals)), verdict(vals, lambda v: v <= 1.1)))
    b1 = multi.get(("bwd_mixed", 256, 64), nan) / multi.get(("bwd_single", 256, 64), nan)
    b2 = multi.get(("bwd_mixed_reuse", 256, 64), nan) / multi.get(("bwd_single_fused", 256, 64), nan)
    out.append(("mixed backward / single, 64 adapters, T 256 (allocating; kept gradients)", "≤ 1.5",
                f"{fmt(b1)}; {fmt(b2)}", verdict([b1, b2], lambda v: v <= 1.5)))
    d = get("ours_dora_fwd", 4096, 4096, 1, 16) / get("base_gemm", 4096, 4096, 1, 16)
    out.append(("DoRA per call / base GEMM, T 1 (4096², r 16)", "≤ 1.3", fmt(d), verdict([d], lambda v: v <= 1.3)))
    print(f"\n## Issue 23's goals, one run; machine: {machine}\n")
    print("| measure | goal | this run | |")
    print("|---|---|---|---|")
    for m, g, v, ok in out:
        print(f"| {m} | {g} | {v} | {ok} |")
    if not tune:
        print("\n(tune_nf4.csv absent: NF4 at T 2…8 and QLoRA need LORA_TUNE=1)")


if len(sys.argv) > 1 and sys.argv[1] == "--goals":
    goals_table(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "?")
    sys.exit(0)

if len(sys.argv) > 1 and sys.argv[1] == "--peers":
    peers_table(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "?")
    sys.exit(0)

if len(sys.argv) > 1 and sys.argv[1] == "--multi":
    multi_table(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "?")
    sys.exit(0)

ours, peft = load(sys.argv[1]), load(sys.argv[2])
machine = sys.argv[3] if len(sys.argv) > 3 else "?"


def get(d, name, i, o, t, r, k=0):
    v = d.get((name, i, o, t, r))
    return v[k] if v else float("nan")


print(f"\n## bf16, median of CUDA-event timings; machine: {machine}\n")
cp = get(ours, "copy_GBps", 0, 0, 0, 0, 1)
gm = get(ours, "gemm8192_TFLOPs", 8192, 8192, 8192, 0, 1)
print(f"ceilings: device copy {cp:.0f} GB/s (read+write), bf16 GEMM 8192^3 {gm:.0f} TFLOP/s\n")
print("| in→out | T | r | base GEMM ms | ours fwd ms | ours/base | PEFT fwd ms | PEFT/torch base | PEFT/ours | base f+b ms | ours f+b ms | ours f+b/base | PEFT f+b ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
shapes = sorted({(k[1], k[2], k[3], k[4]) for k in ours if k[0] == "ours_fused_fwd"})
for i, o, t, r in shapes:
    b = get(ours, "base_gemm", i, o, t, r)
    f = get(ours, "ours_fused_fwd", i, o, t, r)
    pf = get(peft, "peft_fwd", i, o, t, r)
    tb = get(peft, "torch_base_gemm", i, o, t, r)
    bb = get(ours, "base_fwd_bwd", i, o, t, r)
    fb = get(ours, "ours_fwd_bwd", i, o, t, r)
    pfb = get(peft, "peft_fwd_bwd", i, o, t, r)
    print(f"| {i}→{o} | {t} | {r} | {b:.4f} | {f:.4f} | {f/b:.2f} | {pf:.4f} | {pf/tb:.2f} | {pf/f:.2f} | {bb:.4f} | {fb:.4f} | {fb/bb:.2f} | {pfb:.4f} |")
def parts_table(title, columns, names, ratio=None):
    """One row per large-T shape of the named part timings; ratio (i, j): a last column vals[i] / vals[j]."""
    print(title)
    print("| in→out | T | r | " + " | ".join(columns) + (" | ratio |" if ratio else " |"))
    print("|---|---|---|" + "---|" * (len(columns) + (1 if ratio else 0)))
    for i, o, t, r in shapes:
        if t < 4096:
            continue
        vals = [get(ours, n, i, o, t, r) for n in names]
        row = f"| {i}→{o} | {t} | {r} | " + " | ".join(f"{v:.4f}" for v in vals)
        print(row + (f" | {vals[ratio[0]] / vals[ratio[1]]:.2f} |" if ratio else " |"))


parts_table("\nwhere the fused forward goes (ms; base GEMM with contiguous X above):",
            ["base, X strided (ld in+r)", "s·X·Aᵀ (cuBLAS)", "[X, XA]·[W, B]ᵀ GEMM", "fwd concat_k", "fwd accumulate",
             "plain apply(W, X)"],
            ["part_base_strided_x", "part_xa_cublas", "part_wide_gemm", "part_fwd_concat_k", "part_fwd_accumulate",
             "ours_plain_fwd"])
parts_table("\nthe backward alone (ms): dY·W (cuBLAS, contiguous dY) against ours with dY padded to out + rp"
            " (padded_grad) and to out + r; ratio = pad rp / dY·W:",
            ["dY·W", "ours, pad rp", "ours, pad r"], ["part_base_dx", "part_bwd_pad_rp", "part_bwd_pad_r"], (1, 0))
parts_table("\nthe backward's dY pass (ms): s·dY·B and dYᵀ·XA as two cuBLAS GEMMs against one pass over dY"
            " (dy_pass; nan: r > 32 takes the GEMMs); ratio = GEMMs / pass:",
            ["two GEMMs", "dy_pass", "partials", "reduction"],
            ["part_dy_two_gemms", "part_dy_pass", "part_dy_partials", "part_dy_reduce"], (0, 1))
dec = sorted({(k[1], k[2], k[3], k[4]) for k in ours if k[0] == "dec_ours"}, key=lambda x: (x[1], x[2]))
if dec:
    print("\nthe decode regime (issue 23; ms, weights rotated beyond L2; each strategy forced, ratios to the base GEMM):")
    print("| in→out | T | r | base GEMM | ours (planned) | ours/base | stacked/base | concat_k (gemmex)/base "
          "| accumulate/base | parts (µs): stacked GEMM, epilogue, s·X·Aᵀ, concat_k GEMM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, o, t, r in dec:
        b, f = get(ours, "dec_base", i, o, t, r), get(ours, "dec_ours", i, o, t, r)
        st, cc, ac = (get(ours, n, i, o, t, r) for n in ("dec_stacked", "dec_concat_gemmex", "dec_accumulate"))
        pa = [get(ours, n, i, o, t, r) * 1e3 for n in ("dec_part_stacked_gemm", "dec_part_epilogue", "dec_part_xa",
                                                       "dec_part_concat_gemm")]
        print(f"| {i}→{o} | {t} | {r} | {b:.4f} | {f:.4f} | {f/b:.2f} | {st/b:.2f} | {cc/b:.2f} | {ac/b:.2f} | "
              + ", ".join(f"{v:.1f}" for v in pa) + " |")
print("\nDoRA forward (4096→4096, r 16):")
for t in (1, 16384):
    b = get(ours, "base_gemm", 4096, 4096, t, 16)
    f = get(ours, "ours_dora_fwd", 4096, 4096, t, 16)
    pf = get(peft, "peft_dora_fwd", 4096, 4096, t, 16)
    tb = get(peft, "torch_base_gemm", 4096, 4096, t, 16)
    print(f"  T {t}: ours {f:.4f} ms = {f/b:.2f}x base; PEFT {pf:.4f} ms = {pf/tb:.2f}x torch base; ours {pf/f:.1f}x faster")
    fc, bc = get(ours, "ours_dora_fwd_cached", 4096, 4096, t, 16), get(ours, "base_gemm_dora_cached", 4096, 4096, t, 16)
    if fc == fc:
        print(f"  T {t}, norm cached (DoraWorkspace::cache_norm, frozen A, B, m): ours {fc:.4f} ms = {fc/bc:.2f}x base")
parts = [get(ours, n, 4096, 4096, 16384, 16) for n in ("part_dora_norm", "part_dora_scale_w", "part_dora_apply_scaled",
                                                      "part_lora_apply", "part_dora_fwd_one_set")]
print("  T 16384, each part on its own (ms): norm {:.4f}, scale W {:.4f}, apply(scaled) {:.4f}; LoRA apply {:.4f};"
      " DoRA forward on one weight set {:.4f}".format(*parts))
print("\nNF4 (W 14336x4096, blocksize 64):")
for t in (1, 16):
    b = get(ours, "base_gemm", 4096, 14336, t, 0)
    q = get(ours, "ours_nf4_gemm", 4096, 14336, t, 0)
    bw = get(ours, "ours_nf4_gemm", 4096, 14336, t, 0, 1)
    print(f"  GEMV T {t}: ours {q:.4f} ms vs cuBLAS bf16 {b:.4f} ms = {b/q:.2f}x faster; {bw:.0f} GB/s = {bw/cp*100:.0f}% of copy")
dq = get(ours, "ours_nf4_dequant", 4096, 14336, 0, 0)
dbw = get(ours, "ours_nf4_dequant", 4096, 14336, 0, 0, 1)
print(f"  dequantise: {dq:.4f} ms, {dbw:.0f} GB/s = {dbw/cp*100:.0f}% of copy")
qq = get(ours, "ours_nf4_quant", 4096, 14336, 0, 0)
qbw = get(ours, "ours_nf4_quant", 4096, 14336, 0, 0, 1)
print(f"  quantise: {qq:.4f} ms, {qbw:.0f} GB/s")
sp = get(ours, "ours_spectrum", 4096, 4096, 0, 64)
sd = get(peft, "torch_svdvals_dense", 4096, 4096, 0, 64)
sq = get(peft, "torch_qr_route", 4096, 4096, 0, 64)
print(f"\nspectrum 4096x4096 r 64: ours {sp:.3f} ms; torch svdvals(dense) {sd:.1f} ms ({sd/sp:.0f}x); torch QR route {sq:.3f} ms ({sq/sp:.2f}x)")
