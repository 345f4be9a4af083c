#!/usr/bin/python3
"""Writes the seed inputs of the fuzz targets into tests/fuzz/seeds/<target>/ (small,
hand-made, valid and near-valid). scripts/fuzz starts from these plus corpus/<target>/
and merges what it finds into corpus/<target>/."""
import json, os, struct, sys
import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
data = os.path.join(here, "..", "data")
out = os.path.join(here, "seeds")

DT = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}

def st(tensors, meta=None, header_extra=None):
    """safetensors bytes from [(name, dtype, shape, ndarray bytes)]."""
    h, blobs, off = {}, [], 0
    if meta: h["__metadata__"] = meta
    for name, dt, shape, raw in tensors:
        h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw); off += len(raw)
    if header_extra: h.update(header_extra)
    hj = json.dumps(h, separators=(",", ":")).encode()
    hj += b" " * ((8 - (8 + len(hj)) % 8) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)

def arr(dt, shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(int(np.prod(shape)) if shape else 1) * 0.5
    if dt.startswith("F"): return a.astype(DT[dt]).tobytes()
    if dt == "BF16": return (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return (a * 10).astype(DT[dt]).tobytes()

def write(target, name, b):
    d = os.path.join(out, target); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f: f.write(b)

# --- safetensors ---------------------------------------------------------------------
for i, dt in enumerate(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]):
    write("safetensors", f"dtype_{dt}", st([("t", dt, [2, 3], arr(dt, [2, 3], i)), ("v", dt, [4], arr(dt, [4], i + 9))],
                                           meta={"format": "pt"}))
write("safetensors", "empty_header", st([]))
write("safetensors", "scalar_and_zero", st([("s", "F32", [], arr("F32", [])), ("z", "F32", [0, 5], b"")]))
write("safetensors", "three_dims", st([("c", "F32", [2, 2, 2], arr("F32", [8]))]))
# near-misses the parser must reject
write("safetensors", "reversed", st([("a", "F32", [1], b"\0" * 4)]).replace(b"[0,4]", b"[4,0]"))
write("safetensors", "overlap", st([("a", "F32", [2], b"\0" * 8), ("b", "F32", [2], b"\0" * 8)]).replace(b"[8,16]", b"[4,12]"))
write("safetensors", "huge_shape_wraps", st([], header_extra={"w": {"dtype": "F64", "shape": [2**61], "data_offsets": [0, 0]}}))
write("safetensors", "huge_2d_wraps", st([], header_extra={"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 0]}}))
write("safetensors", "neg_dim", st([], header_extra={"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}))
write("safetensors", "len_past_end", struct.pack("<Q", 1 << 40) + b"{}")

# --- PEFT config ---------------------------------------------------------------------
for root, _, files in os.walk(os.path.join(data, "peft")):
    for f in files:
        if f == "adapter_config.json":
            tag = os.path.relpath(root, os.path.join(data, "peft")).replace(os.sep, "_")
            write("peft_config", tag, open(os.path.join(root, f), "rb").read())
small = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
         "rank_pattern": {"q_proj": 3, "layers\\.1\\..*": 1}, "alpha_pattern": {"v_proj": 2.5},
         "use_rslora": True, "use_dora": False, "fan_in_fan_out": False}
write("peft_config", "small", json.dumps(small).encode())
write("peft_config", "regex_targets", json.dumps({"r": 4, "target_modules": ".*\\.(q|v)_proj"}).encode())
write("peft_config", "float_r", json.dumps({"r": 4.0, "lora_alpha": 1e300}).encode())
write("peft_config", "no_r", json.dumps({"lora_alpha": 8}).encode())
write("peft_config", "r_zero", json.dumps({"r": 0}).encode())
write("peft_config", "alpha_string", json.dumps({"r": 2, "lora_alpha": "sixteen"}).encode())

# --- PEFT adapter folders (config \0 safetensors) ---------------------------------------
def adapter(modules, cfg, dtype="F32", dora=False):
    t = []
    for m, (r, i, o) in modules.items():
        k = "base_model.model." + m
        t.append((k + ".lora_A.weight", dtype, [r, i], arr(dtype, [r, i], r * 7 + i)))
        t.append((k + ".lora_B.weight", dtype, [o, r], arr(dtype, [o, r], o * 5 + r)))
        if dora: t.append((k + ".lora_magnitude_vector", dtype, [o], arr(dtype, [o], o)))
    t.sort()
    return json.dumps(cfg).encode() + b"\0" + st(t, meta={"format": "pt"})
mods = {"model.layers.0.self_attn.q_proj": (2, 3, 4), "model.layers.0.self_attn.v_proj": (2, 3, 2)}
write("peft_adapter", "lora", adapter(mods, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}))
write("peft_adapter", "dora_bf16", adapter(mods, {"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "BF16", True))
write("peft_adapter", "rank_pattern", adapter({"model.layers.0.mlp.up_proj": (3, 2, 2), "model.layers.1.mlp.up_proj": (1, 2, 2)},
      {"r": 1, "lora_alpha": 2, "rank_pattern": {"layers.0.mlp.up_proj": 3}, "alpha_pattern": {"up_proj": 3}, "use_rslora": True,
       "target_modules": "model\\.layers\\.\\d+\\.mlp\\.up_proj"}, "F16"))
write("peft_adapter", "r_mismatch", adapter(mods, {"r": 3, "lora_alpha": 4}))
write("peft_adapter", "empty", b'{"r": 2}\0' + st([]))

# --- bnb quant_state ------------------------------------------------------------------
blob = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 16]}
write("bnb_quant_state", "plain", b"\0" + json.dumps(blob).encode())
blob_dq = dict(blob, nested_blocksize=256, nested_dtype="float32", nested_offset=0.0123)
write("bnb_quant_state", "double_quant", b"\2" + json.dumps(blob_dq).encode())
write("bnb_quant_state", "fp16_1d", b"\0" + json.dumps(dict(blob, dtype="float16", shape=[128])).encode())
write("bnb_quant_state", "huge_shape", b"\0" + json.dumps(dict(blob, shape=[2**32, 2**32])).encode())
write("bnb_quant_state", "fp4", b"\0" + json.dumps(dict(blob, quant_type="fp4")).encode())
# whole files (first byte odd): two weights, one double-quantised, plus a non-bnb tensor
nf4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
def bnb_tensors(name, shape, bs, dq):
    n = int(np.prod(shape)); nb = (n + bs - 1) // bs
    rng = np.random.default_rng(n)
    t = [(name, "U8", [(n + 1) // 2, 1], rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8).tobytes()),
         (name + ".quant_map", "F32", [16], np.array(nf4, "<f4").tobytes())]
    b = dict(quant_type="nf4", blocksize=bs, dtype="float32", shape=shape)
    if dq:
        t.append((name + ".absmax", "U8", [nb], rng.integers(0, 256, nb, dtype=np.uint8).tobytes()))
        nnb = (nb + 255) // 256
        t.append((name + ".nested_absmax", "F32", [nnb], np.abs(rng.standard_normal(nnb)).astype("<f4").tobytes()))
        t.append((name + ".nested_quant_map", "F32", [256], np.linspace(-1, 1, 256).astype("<f4").tobytes()))
        b.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.5)
    else:
        t.append((name + ".absmax", "F32", [nb], np.abs(rng.standard_normal(nb)).astype("<f4").tobytes()))
    js = json.dumps(b).encode()
    t.append((name + ".quant_state.bitsandbytes__nf4", "U8", [len(js)], js))
    return t
files = bnb_tensors("m.q.weight", [6, 40], 32, False) + bnb_tensors("m.k.weight", [3, 64], 64, True) + \
        [("m.norm.weight", "BF16", [4], arr("BF16", [4]))]
write("bnb_quant_state", "file_two_weights", b"\1" + st(sorted(files)))
print("seeds written to", out)
