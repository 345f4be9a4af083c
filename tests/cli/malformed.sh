#!/usr/bin/env bash
# Every lora command given malformed or inconsistent input: exit status 1, exactly one
# line on stderr ("lora <cmd>: error: ..."), no crash (no signal, no sanitizer report),
# and nothing left in the output folder (no output file, no temporary file).
# Called as: bash malformed.sh <lora binary> <tests/data> <fixture_facts>
# With MALFORMED_TABLE=<file>, appends a markdown row per case (command, input, status,
# message) for docs/reliability.md.
source "$(dirname "$0")/common.sh" "$@"
BAD=$TMP/bad
OUT=$TMP/out
cases=0

BASE=$DATA/peft/lora_r8_a16_all/base/model.safetensors
ADAPTER=$DATA/peft/lora_r8_a16_all/adapter
DORA=$DATA/peft/dora_r4_a8_qv/adapter
mkdir -p "$BAD" "$OUT"

# ---- malformed inputs, made from the fixtures (python3 standard library only) --------
"$PY" - "$BASE" "$ADAPTER" "$DORA" "$BAD" <<'PYEOF'
import json, os, shutil, struct, sys
base, adapter, dora, bad = sys.argv[1:5]

def split(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]

def join(header, data, raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data

def first(h):
    return next(k for k in h if k != "__metadata__")

def last(h):
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])

def variants(path):
    """name -> bytes: every way a safetensors file can be broken."""
    raw = open(path, "rb").read()
    h, data = split(path)
    out = {}
    out["empty_file"] = b""
    out["short_file"] = raw[:5]
    out["truncated"] = raw[: len(raw) // 2]
    out["truncated_by_one"] = raw[:-1]
    out["len_past_end"] = struct.pack("<Q", len(raw)) + raw[8:]
    out["len_huge"] = struct.pack("<Q", 2**64 - 1) + raw[8:]
    hb = json.dumps(h).encode()
    out["invalid_json"] = join(None, data, hb[:-2] + b"!}")
    out["header_not_object"] = join(None, data, b"[1, 2, 3]")
    def edit(name, fn):
        hh = json.loads(json.dumps(h)); fn(hh); out[name] = join(hh, data)
    edit("unknown_dtype", lambda hh: hh[first(hh)].update(dtype="F33"))
    edit("dtype_not_string", lambda hh: hh[first(hh)].update(dtype=32))
    def oob(hh):
        k = last(hh); b0, e0 = hh[k]["data_offsets"]; hh[k]["data_offsets"] = [b0 + 64, e0 + 64]
    edit("offsets_out_of_range", oob)
    def rev(hh):
        k = first(hh); b0, e0 = hh[k]["data_offsets"]; hh[k]["data_offsets"] = [e0, b0]
    edit("offsets_reversed", rev)
    def ovl(hh):
        ks = sorted((k for k in hh if k != "__metadata__"), key=lambda k: hh[k]["data_offsets"][0])
        a, b = ks[0], ks[1]
        n = hh[b]["data_offsets"][1] - hh[b]["data_offsets"][0]
        hh[b]["data_offsets"] = [hh[a]["data_offsets"][0], hh[a]["data_offsets"][0] + n]
    edit("offsets_overlap", ovl)
    edit("offsets_negative", lambda hh: hh[first(hh)].update(data_offsets=[-4, 0]))
    edit("offsets_one_value", lambda hh: hh[first(hh)].update(data_offsets=[0]))
    def shape(hh):
        k = first(hh); s = hh[k]["shape"]; hh[k]["shape"] = [s[0] + 1] + s[1:]
    edit("shape_not_matching_bytes", shape)
    def neg(hh):
        k = first(hh); s = hh[k]["shape"]; hh[k]["shape"] = [-s[0]] + s[1:]
    edit("negative_dim", neg)
    edit("shape_overflow", lambda hh: hh[first(hh)].update(shape=[2**31, 2**31, 2**31]))
    edit("shape_wraps_to_zero", lambda hh: hh[first(hh)].update(dtype="F64", shape=[2**61]))
    edit("metadata_not_strings", lambda hh: hh.update(__metadata__={"format": 1}))
    return out

def write(path, b):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(b)

# Broken model files.
for name, b in variants(base).items():
    write(f"{bad}/model/{name}.safetensors", b)

# Broken adapter folders: each a copy of a fixture with one thing wrong.
def folder(name, src=adapter, config=None, weights=None, drop=()):
    d = f"{bad}/adapter/{name}"
    os.makedirs(d, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if f not in drop:
            shutil.copy(os.path.join(src, f), d)
    if config is not None:
        open(f"{d}/adapter_config.json", "wb").write(config if isinstance(config, bytes) else json.dumps(config).encode())
    if weights is not None:
        open(f"{d}/adapter_model.safetensors", "wb").write(weights)

cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
def c(**kw):
    x = dict(cfg); x.update(kw)
    for k, v in list(x.items()):
        if v is KeyError: del x[k]
    return x
os.makedirs(f"{bad}/adapter/empty_folder", exist_ok=True)
folder("no_config", drop=("adapter_config.json",))
folder("no_weights", drop=("adapter_model.safetensors",))
folder("config_invalid_json", config=json.dumps(cfg).encode()[:-10])
folder("config_empty_file", config=b"")
folder("config_not_object", config=b"[8, 16]")
folder("config_without_r", config=c(r=KeyError))
folder("r_zero", config=c(r=0))
folder("r_negative", config=c(r=-8))
folder("r_fractional", config=c(r=7.5))
folder("r_string", config=c(r="8"))
folder("r_disagrees_with_tensors", config=c(r=4))
folder("alpha_not_a_number", config=c(lora_alpha="sixteen"))
folder("alpha_nan_literal", config=json.dumps(c(lora_alpha=float("nan"))).encode())  # Python writes NaN: not JSON
folder("alpha_infinite", config=json.dumps(c(lora_alpha=float("inf"))).encode())
folder("rank_pattern_zero", config=c(rank_pattern={"q_proj": 0}))
folder("rank_pattern_disagrees", config=c(rank_pattern={"q_proj": 3}))
folder("rank_pattern_bad_regex", config=c(rank_pattern={"q_proj(": 8}))
folder("use_dora_without_magnitude", config=c(use_dora=True))
folder("magnitude_without_use_dora", src=dora,
       config=dict(json.load(open(os.path.join(dora, "adapter_config.json"))), use_dora=False))
folder("peft_type_not_lora", config=c(peft_type="IA3"))
folder("target_modules_number", config=c(target_modules=7))
for name, b in variants(os.path.join(adapter, "adapter_model.safetensors")).items():
    folder("weights_" + name, weights=b)
# Adapter tensors that parse but do not fit together.
h, data = split(os.path.join(adapter, "adapter_model.safetensors"))
def wedit(name, fn):
    hh = json.loads(json.dumps(h)); fn(hh); folder(name, weights=join(hh, data))
a_keys = sorted(k for k in h if k.endswith("lora_A.weight"))
wedit("lora_A_missing", lambda hh: hh.pop(a_keys[0]))
wedit("lora_B_missing", lambda hh: hh.pop(a_keys[0].replace("lora_A", "lora_B")))
def a_1d(hh):
    k = a_keys[0]; s = hh[k]["shape"]; hh[k]["shape"] = [s[0] * s[1]]
wedit("lora_A_1d", a_1d)
def a_int(hh):
    hh[a_keys[0]]["dtype"] = "I32"
wedit("lora_A_integer_dtype", a_int)
def b_r(hh):
    k = a_keys[0].replace("lora_A", "lora_B"); s = hh[k]["shape"]; hh[k]["shape"] = [s[0] * 2, s[1] // 2]
wedit("lora_B_rank_mismatch", b_r)
def foreign(hh):
    k = a_keys[0]; hh["base_model.model.something.else"] = hh.pop(k)
wedit("not_a_lora_tensor", foreign)
wedit("no_tensors", lambda hh: [hh.pop(k) for k in list(hh) if k != "__metadata__"])

# HF config.json for `lora plan`.
hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
def hfc(name, text):
    write(f"{bad}/hf/{name}/config.json", text if isinstance(text, bytes) else json.dumps(text).encode())
hfc("invalid_json", json.dumps(hf).encode()[:-3])
hfc("empty_file", b"")
hfc("not_object", b"\"llama\"")
hfc("no_hidden_size", {k: v for k, v in hf.items() if k != "hidden_size"})
hfc("negative_layers", dict(hf, num_hidden_layers=-2))
hfc("hidden_size_string", dict(hf, hidden_size="64"))
hfc("heads_zero", dict(hf, num_attention_heads=0))
hfc("layers_huge", dict(hf, num_hidden_layers=99999999999))
hfc("kv_heads_not_dividing_heads", dict(hf, num_key_value_heads=3))
hfc("kv_heads_more_than_heads", dict(hf, num_key_value_heads=8))
hfc("hidden_not_divisible_by_heads", dict(hf, num_attention_heads=6, num_key_value_heads=3))
hfc("gpt2_embd_not_divisible_by_heads", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 6, "vocab_size": 128})
hfc("vocab_float", dict(hf, vocab_size=1e30))
hfc("kv_heads_zero", dict(hf, num_key_value_heads=0))
hfc("unknown_model_type", dict(hf, model_type="mamba", architectures=["MambaForCausalLM"]))
os.makedirs(f"{bad}/hf/empty_folder", exist_ok=True)
PYEOF
[ $? -eq 0 ] || { echo "FAIL: could not generate the malformed inputs"; exit 1; }

# ---- the check -----------------------------------------------------------------------
# Known gaps, reported (KNOWN) instead of failing the test; each names the owner's bug.
# (None open: the two DoRA/use_dora cases of inspect and plan's head counts were fixed.)
declare -A known=()
known_seen=0
# expect_error <command> <case name> <args...>: run with an empty $OUT; outputs go into $OUT.
expect_error() {
  local cmd=$1
  local name="$1 $2"
  shift 2
  cases=$((cases + 1))
  local fails_before=$fails
  rm -rf "$OUT" && mkdir -p "$OUT"
  "$LORA" "$cmd" "$@" > "$TMP/stdout" 2> "$TMP/stderr" < /dev/null
  local st=$?
  local lines msg
  lines=$(wc -l < "$TMP/stderr")
  msg=$(head -c 400 "$TMP/stderr" | head -n 1)
  if [ $st -gt 128 ]; then
    fail "$name: killed by signal $((st - 128)): $(head -c 2000 "$TMP/stderr")"
  elif [ $st -ne 1 ]; then
    fail "$name: exit status $st, expected 1 (stderr: $(head -c 300 "$TMP/stderr"))"
  fi
  if [ "$lines" -ne 1 ]; then
    fail "$name: $lines lines on stderr, expected 1: $(head -c 600 "$TMP/stderr")"
  elif ! grep -q "^lora $cmd: error: ." "$TMP/stderr"; then
    fail "$name: stderr is not 'lora $cmd: error: ...': $msg"
  fi
  if grep -q "Sanitizer\|runtime error" "$TMP/stderr"; then fail "$name: sanitizer report"; fi
  local left
  left=$(ls -A "$OUT")
  [ -z "$left" ] || fail "$name: left in the output folder: $left"
  if [ $fails -gt $fails_before ] && [ -n "${known[$name]:-}" ]; then
    echo "KNOWN: $name (${known[$name]}): not counted"
    fails=$fails_before
    known_seen=$((known_seen + 1))
  fi
  if [ -n "${MALFORMED_TABLE:-}" ]; then
    local shown=${msg//$TMP/<tmp>}
    shown=${shown//$DATA/<data>}
    shown=${shown//|/\\|}
    echo "| $cmd | ${name#"$cmd "} | $st | ${shown:0:220} |" >> "$MALFORMED_TABLE"
  fi
}

commands=$("$LORA" --help | sed -n 's/^  \([a-z][a-z-]*\)  .*/\1/p')
covered=" merge inspect quantize dequantize plan compress combine similarity "
has() { [[ " $commands " == *" $1 "* ]] || [[ $'\n'"$commands"$'\n' == *$'\n'"$1"$'\n'* ]]; }

# lora merge: broken base (good adapter), broken adapter (good base), both output kinds.
if has merge; then
  for f in "$BAD"/model/*.safetensors; do
    n=$(basename "$f" .safetensors)
    expect_error merge "base:$n" --base "$f" --adapter "$ADAPTER" --out "$OUT/merged.safetensors"
  done
  for d in "$BAD"/adapter/*/; do
    n=$(basename "$d")
    expect_error merge "adapter:$n" --base "$BASE" --adapter "$d" --out "$OUT/merged.safetensors"
  done
  expect_error merge "adapter:weights_truncated (folder output)" --base "$BASE" \
    --adapter "$BAD/adapter/weights_truncated" --out "$OUT/merged"
  expect_error merge "base:missing file" --base "$TMP/nope.safetensors" --adapter "$ADAPTER" --out "$OUT/m.safetensors"
  expect_error merge "base:empty folder" --base "$BAD/adapter/empty_folder" --adapter "$ADAPTER" --out "$OUT/m.safetensors"
  expect_error merge "adapter for another model (dora adapter on shapes of a 2-layer llama)" \
    --base "$BAD/model/truncated_by_one.safetensors" --adapter "$DORA" --out "$OUT/m.safetensors"
  expect_error merge "option:--scale nan" --base "$BASE" --adapter "$ADAPTER" --out "$OUT/m.safetensors" --scale nan
  expect_error merge "option:--dtype f8" --base "$BASE" --adapter "$ADAPTER" --out "$OUT/m.safetensors" --dtype f8
  expect_error merge "option:missing --out" --base "$BASE" --adapter "$ADAPTER"
fi

# lora inspect: every broken adapter, with and without an output plot.
if has inspect; then
  for d in "$BAD"/adapter/*/; do
    n=$(basename "$d")
    expect_error inspect "adapter:$n" "$d" --plot "$OUT/spectrum.svg"
  done
  for f in "$BAD"/model/*.safetensors; do
    n=$(basename "$f" .safetensors)
    expect_error inspect "base:$n" "$ADAPTER" --base "$f" --plot "$OUT/spectrum.svg"
  done
  expect_error inspect "option:--energy 1.5" "$ADAPTER" --energy 1.5
  expect_error inspect "option:--energy abc" "$ADAPTER" --energy abc
  expect_error inspect "no argument"
fi

# lora quantize: every broken model file.
if has quantize; then
  for f in "$BAD"/model/*.safetensors; do
    n=$(basename "$f" .safetensors)
    expect_error quantize "model:$n" "$f" --out "$OUT/q.safetensors"
  done
  expect_error quantize "model:empty folder" "$BAD/adapter/empty_folder" --out "$OUT/q"
  expect_error quantize "option:--blocksize 48" "$BASE" --out "$OUT/q.safetensors" --blocksize 48
  expect_error quantize "option:--blocksize 0" "$BASE" --out "$OUT/q.safetensors" --blocksize 0
  expect_error quantize "option:--blocksize -64" "$BASE" --out "$OUT/q.safetensors" --blocksize -64
fi

# lora dequantize: broken model files, and broken bnb layouts made from a good quantisation.
if has dequantize; then
  for f in "$BAD"/model/*.safetensors; do
    n=$(basename "$f" .safetensors)
    expect_error dequantize "model:$n" "$f" --out "$OUT/d.safetensors"
  done
  if has quantize && "$LORA" quantize "$BASE" --out "$TMP/q.safetensors" > /dev/null 2>&1 &&
     "$LORA" quantize "$BASE" --out "$TMP/qdq.safetensors" --double-quant > /dev/null 2>&1; then
    "$PY" - "$TMP/q.safetensors" "$TMP/qdq.safetensors" "$BAD/bnb" <<'PYEOF'
import json, os, struct, sys
q, qdq, bad = sys.argv[1:4]
os.makedirs(bad, exist_ok=True)
def split(path):
    b = open(path, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), bytearray(b[8 + n:])
def save(name, h, data):
    hb = json.dumps(h).encode()
    open(f"{bad}/{name}.safetensors", "wb").write(struct.pack("<Q", len(hb)) + hb + bytes(data))
for src, tag in ((q, ""), (qdq, "dq_")):
    h, data = split(src)
    blobs = sorted(k for k in h if k.endswith(".quant_state.bitsandbytes__nf4"))
    k = blobs[0]; w = k[: -len(".quant_state.bitsandbytes__nf4")]
    b0, e0 = h[k]["data_offsets"]; js = json.loads(bytes(data[b0:e0]))
    def blob(name, new):
        """Replace the JSON blob of the first weight (appended at the end of the data)."""
        hh = json.loads(json.dumps(h)); raw = new if isinstance(new, bytes) else json.dumps(new).encode()
        d = bytearray(data); hh[k]["data_offsets"] = [len(d), len(d) + len(raw)]; hh[k]["shape"] = [len(raw)]
        d += raw; save(tag + name, hh, d)
    blob("quant_state_invalid_json", json.dumps(js).encode()[:-4])
    blob("quant_state_not_object", b"[64]")
    blob("quant_type_fp4", dict(js, quant_type="fp4"))
    blob("blocksize_0", dict(js, blocksize=0))
    blob("blocksize_48", dict(js, blocksize=48))
    blob("blocksize_string", dict(js, blocksize="64"))
    blob("shape_bigger_than_codes", dict(js, shape=[js["shape"][0] * 4, js["shape"][1]]))
    blob("shape_negative", dict(js, shape=[-js["shape"][0], js["shape"][1]]))
    blob("shape_overflow", dict(js, shape=[2**40, 2**40]))
    blob("dtype_unknown", dict(js, dtype="float8"))
    blob("no_shape", {x: v for x, v in js.items() if x != "shape"})
    if tag:
        blob("nested_offset_string", dict(js, nested_offset="0.1"))
        blob("nested_blocksize_128", dict(js, nested_blocksize=128))
    def drop(name, key):
        hh = json.loads(json.dumps(h)); hh.pop(key); save(tag + name, hh, data)
    drop("absmax_missing", w + ".absmax")
    drop("weight_missing", w)
    if tag:
        drop("nested_quant_map_missing", w + ".nested_quant_map")
    def shrink(name, key):
        hh = json.loads(json.dumps(h)); b, e = hh[key]["data_offsets"]; sz = (e - b) // hh[key]["shape"][0]
        hh[key]["shape"] = [hh[key]["shape"][0] - 1] + hh[key]["shape"][1:]; hh[key]["data_offsets"] = [b, e - sz]
        save(tag + name, hh, data)
    shrink("absmax_one_short", w + ".absmax")
    shrink("quant_map_15_values", w + ".quant_map")
    def qm(hh_data):
        pass
    hh = json.loads(json.dumps(h)); d = bytearray(data); b, e = hh[w + ".quant_map"]["data_offsets"]
    d[b:b + 4] = struct.pack("<f", 0.5); save(tag + "quant_map_not_nf4", hh, d)
    hh = json.loads(json.dumps(h)); hh[k]["dtype"] = "I8"; save(tag + "quant_state_dtype_I8", hh, data)
PYEOF
    for f in "$BAD"/bnb/*.safetensors; do
      n=$(basename "$f" .safetensors)
      expect_error dequantize "bnb:$n" "$f" --out "$OUT/d.safetensors"
    done
  else
    fail "dequantize: could not make a good quantised file to break"
  fi
  expect_error dequantize "option:--dtype i8" "$BASE" --out "$OUT/d.safetensors" --dtype i8
fi

# lora plan: broken HF config.json files (plan writes no file; stdout only).
if has plan; then
  for d in "$BAD"/hf/*/; do
    n=$(basename "$d")
    if [ -f "$d/config.json" ]; then
      expect_error plan "config:$n" "$d/config.json"
    else
      expect_error plan "config:$n" "$d"
    fi
  done
  expect_error plan "option:--rank 0" llama-3-8b --rank 0
  expect_error plan "option:--rank -4" llama-3-8b --rank -4
  expect_error plan "option:--alpha nan" llama-3-8b --alpha nan
  expect_error plan "unknown preset" llama-9-1t
fi

# lora compress / combine / similarity: every broken adapter in each adapter position.
if has compress; then
  for d in "$BAD"/adapter/*/; do
    n=$(basename "$d")
    expect_error compress "adapter:$n" "$d" --rank 2 --out "$OUT/compressed"
  done
  expect_error compress "option:--rank 0" "$ADAPTER" --rank 0 --out "$OUT/compressed"
  expect_error compress "option:--energy 0" "$ADAPTER" --energy 0 --out "$OUT/compressed"
  expect_error compress "option:--energy nan" "$ADAPTER" --energy nan --out "$OUT/compressed"
  expect_error compress "option:neither --rank nor --energy" "$ADAPTER" --out "$OUT/compressed"
fi
if has combine; then
  for d in "$BAD"/adapter/*/; do
    n=$(basename "$d")
    expect_error combine "adapter:$n" --adapter "$ADAPTER" --adapter "$d" --weights 0.5,0.5 --type linear \
      --out "$OUT/combined"
  done
  expect_error combine "weights count differs" --adapter "$ADAPTER" --adapter "$ADAPTER" --weights 1 --type svd \
    --rank 4 --out "$OUT/combined"
  expect_error combine "weight nan" --adapter "$ADAPTER" --adapter "$ADAPTER" --weights 1,nan --type cat \
    --out "$OUT/combined"
  expect_error combine "unknown type" --adapter "$ADAPTER" --adapter "$ADAPTER" --weights 1,1 --type ties \
    --out "$OUT/combined"
  expect_error combine "rank mismatch for linear (r 8 and r 4)" --adapter "$ADAPTER" --adapter "$DORA" \
    --weights 1,1 --type linear --out "$OUT/combined"
fi
if has similarity; then
  for d in "$BAD"/adapter/*/; do
    n=$(basename "$d")
    expect_error similarity "adapter:$n" "$ADAPTER" "$d"
  done
  expect_error similarity "one folder only" "$ADAPTER"
fi

# Commands this script does not know yet: the generic inputs (a broken adapter folder,
# a broken model file, an empty folder) as the first argument, with an output path.
for cmd in $commands; do
  [[ "$covered" == *" $cmd "* ]] && continue
  echo "note: '$cmd' has no specific malformed cases here; generic ones only"
  for input in "$BAD/adapter/r_disagrees_with_tensors" "$BAD/adapter/weights_truncated" \
               "$BAD/model/len_past_end.safetensors" "$BAD/adapter/empty_folder"; do
    expect_error "$cmd" "generic:$(basename "$input")" "$input" "$ADAPTER" --out "$OUT/out"
  done
done

echo "malformed.sh: $cases cases, $fails failures, $known_seen known gaps"
[ $fails -eq 0 ]
