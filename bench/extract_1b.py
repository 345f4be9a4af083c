#!/usr/bin/env python3
"""lora extract on a whole Llama-3.2-1B-shaped checkpoint pair, against numpy's dense SVD.

mergekit's extract_lora runs a dense torch SVD of each module's ΔW; mergekit and torch are
not installable on the build machine, so numpy.linalg.svd (LAPACK gesdd through the system's
LAPACK) of the formed float32 ΔW stands in for it. numpy is needed by this script only
(never by the build or the tests).

  extract_1b.py gen DIR [--layers 16] [--rank 32] [--noise 0.15] [--seed 1]
      DIR/base.safetensors and DIR/tuned.safetensors (bf16): the 7 linear weights of every
      layer (hidden 2048, intermediate 8192, 8 KV heads of 64: q/o 2048x2048, k/v 512x2048,
      gate/up 8192x2048, down 2048x8192) and the RMSNorm weights; W ~ N(0, 0.02²),
      T = bf16(W + ΔW), ΔW = planted rank-`rank` part (σ_i ∝ 0.9^i, rms 1e-3) + Gaussian
      noise of rms `noise` × that part's rms (plus T's bf16 rounding).
  extract_1b.py run DIR LORA [--rank 32] [--layers 0,1,...] [--whole] [--json OUT]
      Layer by layer (all, or --layers), alternating which goes first: `lora extract --only model.layers.<i>.`
      (wall time of the process, per-module seconds from its --json) and, for the same
      modules, numpy: read both tensors, ΔW = T − W in float32, U,S,Vᵀ = svd(ΔW), B = U_k·S_k,
      A = V_kᵀ, timed per module. Errors of the rank-k truncation: relative Frobenius
      √(Σ_{i>k} σ_i²)/‖ΔW‖_F and spectral σ_{k+1}/σ_1, compared per module.
      --whole then runs `lora extract` once on every layer (one process, the whole
      checkpoint) and sets its per-module-type time against numpy's measured mean per
      module type times the module count (every layer has the same shapes).
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, INTER, KV = 2048, 8192, 512
MODULES = [("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", KV, HIDDEN), ("self_attn.v_proj", KV, HIDDEN),
           ("self_attn.o_proj", HIDDEN, HIDDEN), ("mlp.gate_proj", INTER, HIDDEN), ("mlp.up_proj", INTER, HIDDEN),
           ("mlp.down_proj", HIDDEN, INTER)]


def tensors(layers):
    out = []
    for i in range(layers):
        out.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)))
        for m, o, n in MODULES:
            out.append((f"model.layers.{i}.{m}.weight", (o, n)))
        out.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)))
    out.append(("model.norm.weight", (HIDDEN,)))
    return out


def to_bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_header(f, specs):
    header, off = {}, 0
    for name, shape in specs:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    f.write(struct.pack("<Q", len(h)))
    f.write(h)


def gen(a):
    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    specs = tensors(a.layers)
    with open(os.path.join(a.dir, "base.safetensors"), "wb") as fb, \
            open(os.path.join(a.dir, "tuned.safetensors"), "wb") as ft:
        write_header(fb, specs)
        write_header(ft, specs)
        for name, shape in specs:
            if len(shape) == 1:
                w = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
                fb.write(to_bf16(w).tobytes())
                ft.write(to_bf16(w + 0.01 * rng.standard_normal(shape, dtype=np.float32)).tobytes())
                continue
            o, n = shape
            w = to_bf16(0.02 * rng.standard_normal(shape, dtype=np.float32))
            fb.write(w.tobytes())
            s = 0.9 ** np.arange(a.rank, dtype=np.float32)
            u = rng.standard_normal((o, a.rank), dtype=np.float32)
            v = rng.standard_normal((a.rank, n), dtype=np.float32)
            low = (u * s) @ v
            low *= 1e-3 / np.sqrt(np.mean(low * low))
            low += (a.noise * 1e-3) * rng.standard_normal(shape, dtype=np.float32)
            wf = (w.astype(np.uint32) << 16).view(np.float32)
            ft.write(to_bf16(wf + low).tobytes())
            print(f"{name} {o}x{n}", file=sys.stderr, flush=True)


class Safetensors:
    def __init__(self, path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.base = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def f32(self, name):
        h = self.header[name]
        b, e = h["data_offsets"]
        assert h["dtype"] == "BF16", h
        raw = self.mm[self.base + b:self.base + e].view(np.uint16).reshape(h["shape"])
        return (raw.astype(np.uint32) << 16).view(np.float32)


def dense(base, tuned, name, k):
    t0 = time.perf_counter()
    d = tuned.f32(name) - base.f32(name)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    b = u[:, :k] * s[:k]
    a = vt[:k]
    secs = time.perf_counter() - t0
    s = s.astype(np.float64)
    del b, a, u, vt, d
    return secs, float(np.sqrt(np.sum(s[k:] ** 2)) / np.sqrt(np.sum(s ** 2))), float(s[k] / s[0])


def run(a):
    base = Safetensors(os.path.join(a.dir, "base.safetensors"))
    tuned = Safetensors(os.path.join(a.dir, "tuned.safetensors"))
    all_layers = sorted({int(n.split(".")[2]) for n in base.header if n.startswith("model.layers.")})
    layers = [int(x) for x in a.layers.split(",")] if a.layers else all_layers
    rows, tot_ours, tot_dense = [], 0.0, 0.0
    tmp = tempfile.mkdtemp(prefix="extract_1b_")
    for i in layers:
        names = [f"model.layers.{i}.{m}.weight" for m, _, _ in MODULES]
        res = {}

        def ours():
            out = os.path.join(tmp, f"l{i}")
            t0 = time.perf_counter()
            p = subprocess.run([a.lora, "extract", "--base", base_path(a), "--tuned", tuned_path(a), "--rank",
                                str(a.rank), "--only", f"model.layers.{i}.", "--json", "--out", out],
                               capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(f"lora extract failed: {p.stderr}")
            subprocess.run(["rm", "-rf", out], check=True)
            res["ours"] = (wall, {m["name"] + ".weight": m for m in json.loads(p.stdout)["modules"]})

        def numpy_route():
            res["dense"] = {n: dense(base, tuned, n, a.rank) for n in names}

        if i % 2 == 0:
            ours(), numpy_route()
        else:
            numpy_route(), ours()
        wall, mods = res["ours"]
        tot_ours += wall
        for n in names:
            m, (ds, dfro, dspec) = mods[n], res["dense"][n]
            tot_dense += ds
            rows.append({"name": n, "ours_s": m.get("seconds"), "dense_s": ds, "ours_fro": m["rel_fro_error"],
                         "dense_fro": dfro, "ours_spec": m["rel_spectral_error"], "dense_spec": dspec})
        print(f"layer {i}: lora extract {wall:.1f} s (process), numpy {sum(res['dense'][n][0] for n in names):.1f} s; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    os.rmdir(tmp)
    print(f"\n{'module':<12} {'n':>3} {'ours s':>9} {'numpy s':>9} {'ratio':>6} {'max |Δfro|/fro':>15} "
          f"{'max |Δspec|/spec':>17} {'fro err':>9}")
    for m, o, n in MODULES:
        sel = [r for r in rows if r["name"].endswith(m + ".weight")]
        so, sd = sum(r["ours_s"] for r in sel), sum(r["dense_s"] for r in sel)
        dfro = max(abs(r["ours_fro"] - r["dense_fro"]) / r["dense_fro"] for r in sel)
        dspec = max(abs(r["ours_spec"] - r["dense_spec"]) / r["dense_spec"] for r in sel)
        print(f"{m.split('.')[1]:<12} {len(sel):>3} {so:>9.1f} {sd:>9.1f} {sd / so:>6.1f} {dfro:>15.2e} {dspec:>17.2e} "
              f"{np.mean([r['dense_fro'] for r in sel]):>9.5f}")
    so = sum(r["ours_s"] for r in rows)
    print(f"{'all':<12} {len(rows):>3} {so:>9.1f} {tot_dense:>9.1f} {tot_dense / so:>6.1f}   "
          f"(lora extract processes: {tot_ours:.1f} s wall, ratio {tot_dense / tot_ours:.1f})")
    whole = None
    if a.whole:
        out = os.path.join(tempfile.mkdtemp(prefix="extract_1b_"), "ex")
        t0 = time.perf_counter()
        p = subprocess.run([a.lora, "extract", "--base", base_path(a), "--tuned", tuned_path(a), "--rank", str(a.rank),
                            "--json", "--out", out], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"lora extract failed: {p.stderr}")
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        subprocess.run(["rm", "-rf", os.path.dirname(out)], check=True)
        whole = json.loads(p.stdout)["modules"]
        print(f"\nwhole checkpoint: lora extract {len(whole)} modules in {wall:.1f} s wall (one process; adapter "
              f"{size / 2**20:.1f} MiB); load {os.getloadavg()[0]:.1f}")
        print(f"{'module':<12} {'n':>3} {'ours s':>9} {'numpy s (est.)':>15} {'ratio':>6} {'max fro err':>12}")
        est_tot = 0.0
        for m, o, n in MODULES:
            sel = [x for x in whole if x["name"].endswith(m)]
            dense_mean = np.mean([r["dense_s"] for r in rows if r["name"].endswith(m + ".weight")])
            so, est = sum(x["seconds"] for x in sel), dense_mean * len(sel)
            est_tot += est
            print(f"{m.split('.')[1]:<12} {len(sel):>3} {so:>9.1f} {est:>15.1f} {est / so:>6.1f} "
                  f"{max(x['rel_fro_error'] for x in sel):>12.5f}")
        so = sum(x["seconds"] for x in whole)
        print(f"{'all':<12} {len(whole):>3} {so:>9.1f} {est_tot:>15.1f} {est_tot / so:>6.1f}   (wall {wall:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"compared": rows, "whole": whole}, f, indent=1)


def base_path(a):
    return os.path.join(a.dir, "base.safetensors")


def tuned_path(a):
    return os.path.join(a.dir, "tuned.safetensors")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("dir")
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--rank", type=int, default=32)
    g.add_argument("--noise", type=float, default=0.15)
    g.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("lora")
    r.add_argument("--rank", type=int, default=32)
    r.add_argument("--layers")
    r.add_argument("--whole", action="store_true")
    r.add_argument("--json")
    a = p.parse_args()
    gen(a) if a.cmd == "gen" else run(a)


if __name__ == "__main__":
    main()
