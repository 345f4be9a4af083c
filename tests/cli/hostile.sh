#!/usr/bin/env bash
# Issue 21, end to end: command lines that would overwrite their own inputs, special files
# given as inputs, hostile configs (deep JSON, catastrophic patterns, huge integers), and
# concurrent writers of one output. Each case: the exit status and the one stderr line
# expected, no input changed, nothing left behind, and no hang (every run under `timeout`).
# Called as: bash hostile.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
cases=0

# Private copies of the fixtures, so that "the input is unchanged" can be checked by hash.
cp -r "$DATA/peft/lora_r8_a16_all/base" "$TMP/base"
cp -r "$DATA/peft/lora_r8_a16_all/adapter" "$TMP/adapter"
BASE=$TMP/base
ADAPTER=$TMP/adapter
snapshot() { (cd "$TMP" && find base adapter other -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum); }
mkdir -p "$TMP/other"
echo "my notes" > "$TMP/other/notes.txt"
mkdir -p "$TMP/other/src" && echo "int main(){}" > "$TMP/other/src/main.c"
BEFORE=$(snapshot)

# refuse NAME WANT CMD...: exit 1, one stderr line containing WANT, inputs unchanged,
# no temporary next to the inputs or outputs.
refuse() {
  local name=$1 want=$2
  shift 2
  cases=$((cases + 1))
  local err rc
  err=$(timeout 20 "$LORA" "$@" 2>&1 >/dev/null)
  rc=$?
  [ $rc -eq 1 ] || fail "$name: exit status $rc, expected 1 (stderr: $err)"
  [ "$(printf '%s\n' "$err" | grep -c .)" -eq 1 ] || fail "$name: expected one line on stderr, got: $err"
  case "$err" in *"$want"*) ;; *) fail "$name: stderr lacks '$want': $err" ;; esac
  [ "$(snapshot)" = "$BEFORE" ] || fail "$name: an input changed"
  [ -z "$(find "$TMP" -name '.*.tmp-*' | head -1)" ] || fail "$name: left a temporary: $(find "$TMP" -name '.*.tmp-*')"
}

# ---- class 10: never touch an input ----------------------------------------------------
refuse "merge --out inside the base folder" "inside the input folder" \
  merge --base "$BASE" --adapter "$ADAPTER" --out "$BASE/model.safetensors"
refuse "merge --out = the base folder" "base checkpoint itself" merge --base "$BASE" --adapter "$ADAPTER" --out "$BASE"
refuse "merge --out = the adapter folder" "is the input" merge --base "$BASE" --adapter "$ADAPTER" --out "$ADAPTER"
refuse "merge --out holds the inputs" "holds the input" merge --base "$BASE" --adapter "$ADAPTER" --out "$TMP"
refuse "inspect --plot onto the adapter's weights" "inside the input folder" \
  inspect "$ADAPTER" --plot "$ADAPTER/adapter_model.safetensors"
refuse "compress --out = its input" "is the input" compress "$ADAPTER" --rank 2 --out "$ADAPTER"
refuse "combine --out = an input" "is the input" combine --adapter "$ADAPTER" --adapter "$ADAPTER" --weights 1,1 \
  --type cat --out "$ADAPTER"
refuse "merge --out = a folder of unrelated files" "--force" merge --base "$BASE" --adapter "$ADAPTER" --out "$TMP/other"
refuse "quantize --out = its input folder" "is the input" quantize "$BASE" --out "$BASE"
ln -s "$ADAPTER" "$TMP/alias"
refuse "compress --out = a link to its input" "is the input" compress "$ADAPTER" --rank 2 --out "$TMP/alias"
rm "$TMP/alias"
# --force replaces the unrelated folder; a previous output of ours is replaced without it
cases=$((cases + 1))
cp -r "$TMP/other" "$TMP/other2"
timeout 60 "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$TMP/other2" --force --quiet >/dev/null 2>&1 ||
  fail "--force: merge into a folder of other files failed"
[ -f "$TMP/other2/model.safetensors" ] && [ ! -e "$TMP/other2/notes.txt" ] || fail "--force: folder not replaced"
timeout 60 "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$TMP/other2" --quiet >/dev/null 2>&1 ||
  fail "merging again into our own output needed --force"

# ---- class 3: special files ------------------------------------------------------------
mkfifo "$TMP/fifo.safetensors"
refuse "FIFO as --base" "FIFO" merge --base "$TMP/fifo.safetensors" --adapter "$ADAPTER" --out "$TMP/o1.safetensors"
mkdir -p "$TMP/fifoad" && cp "$ADAPTER/adapter_config.json" "$TMP/fifoad/" && mkfifo "$TMP/fifoad/adapter_model.safetensors"
refuse "FIFO as adapter_model.safetensors" "FIFO" inspect "$TMP/fifoad"
mkdir -p "$TMP/fifocfg" && cp "$ADAPTER/adapter_model.safetensors" "$TMP/fifocfg/" && mkfifo "$TMP/fifocfg/adapter_config.json"
refuse "FIFO as adapter_config.json" "FIFO" compress "$TMP/fifocfg" --rank 2 --out "$TMP/o2"
mkdir -p "$TMP/dirbase/model.safetensors"
refuse "a folder where model.safetensors should be" "folder" \
  merge --base "$TMP/dirbase" --adapter "$ADAPTER" --out "$TMP/o3.safetensors"
mkdir -p "$TMP/dircfg/adapter_config.json" && cp "$ADAPTER/adapter_model.safetensors" "$TMP/dircfg/"
refuse "a folder where adapter_config.json should be" "folder" inspect "$TMP/dircfg"
rm -rf "$TMP/fifoad" "$TMP/fifocfg" "$TMP/dirbase" "$TMP/dircfg" "$TMP/fifo.safetensors"

# ---- classes 1, 2, 7, 9: hostile configs -----------------------------------------------
mkcfg() {  # mkcfg NAME PYTHON-EXPR-EDITING-c
  mkdir -p "$TMP/$1" && cp "$ADAPTER/adapter_model.safetensors" "$TMP/$1/"
  "$PY" - "$ADAPTER/adapter_config.json" "$TMP/$1/adapter_config.json" "$2" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
exec(sys.argv[3])
open(sys.argv[2], "w").write(c if isinstance(c, str) else json.dumps(c))
PYEOF
}
mkcfg deep 'c = json.dumps(c)[:-1] + ", \"x\": " + "[" * 100000 + "]" * 100000 + "}"'
refuse "adapter_config.json nested 100,000 deep" "nested deeper" inspect "$TMP/deep"
mkcfg catastrophic 'c["rank_pattern"] = {"([a-z_.0-9]|[a-z_.0-9])*Z": 4}'
cases=$((cases + 1))
timeout 20 "$LORA" inspect "$TMP/catastrophic" >/dev/null 2>&1
[ $? -ne 124 ] || fail "catastrophic rank_pattern hangs"
mkcfg lookahead 'c["target_modules"] = "(?=q).*"'
refuse "look-ahead in target_modules" "target_modules" inspect "$TMP/lookahead"
mkcfg typeerr 'c["peft_type"] = 5'
refuse "peft_type of the wrong type" "peft_type" inspect "$TMP/typeerr"
mkcfg bigr 'c = json.dumps(c).replace("\"r\": 8", "\"r\": 18446744073709551615")'
refuse "r near 2^64" "'r'" inspect "$TMP/bigr"
refuse "--rank 1e300" "--rank" compress "$ADAPTER" --rank 1e300 --out "$TMP/o4"
refuse "--rank 2^64" "--rank" compress "$ADAPTER" --rank 18446744073709551616 --out "$TMP/o4"
rm -rf "$TMP/deep" "$TMP/catastrophic" "$TMP/lookahead" "$TMP/typeerr" "$TMP/bigr"

# packed NF4 codes stored as F16 (class 5): refused, not dequantised
cases=$((cases + 1))
timeout 60 "$LORA" quantize "$BASE/model.safetensors" --out "$TMP/q.safetensors" >/dev/null 2>&1 || fail "quantize failed"
"$PY" - "$TMP/q.safetensors" "$TMP/q16.safetensors" <<'PYEOF'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
k = next(k for k in h if k.endswith("q_proj.weight"))
assert h[k]["dtype"] == "U8"
h[k]["dtype"] = "F16"
h[k]["shape"] = [h[k]["shape"][0] // 2, h[k]["shape"][1]]
hb = json.dumps(h).encode()
open(sys.argv[2], "wb").write(struct.pack("<Q", len(hb)) + hb + b[8 + n:])
PYEOF
refuse "NF4 codes stored as F16" "expected U8" dequantize "$TMP/q16.safetensors" --out "$TMP/dq.safetensors"
rm -f "$TMP/q.safetensors" "$TMP/q16.safetensors"

# NaN/Inf (class 6): merge, combine and quantize refuse, inspect reports; file and tensor named
mkdir -p "$TMP/nan"
cp "$ADAPTER/adapter_config.json" "$TMP/nan/"
"$PY" - "$ADAPTER/adapter_model.safetensors" "$TMP/nan/adapter_model.safetensors" "$BASE/model.safetensors" "$TMP/nanbase.safetensors" <<'PYEOF'
import json, struct, sys
def poison(src, dst, suffix, value):
    b = bytearray(open(src, "rb").read())
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    k = sorted(x for x in h if x.endswith(suffix))[0]
    assert h[k]["dtype"] == "F32", h[k]["dtype"]
    at = 8 + n + h[k]["data_offsets"][0] + 4 * 5
    b[at:at + 4] = struct.pack("<f", value)
    open(dst, "wb").write(bytes(b))
poison(sys.argv[1], sys.argv[2], "q_proj.lora_A.weight", float("nan"))
poison(sys.argv[3], sys.argv[4], "k_proj.weight", float("inf"))
PYEOF
refuse "merge: NaN in lora_A" "q_proj.lora_A.weight" merge --base "$BASE" --adapter "$TMP/nan" --out "$TMP/o5"
refuse "combine: NaN in lora_A" "non-finite" combine --adapter "$TMP/nan" --adapter "$ADAPTER" --weights 1,1 --type cat \
  --out "$TMP/o6"
refuse "inspect: NaN in lora_A" "q_proj.lora_A.weight" inspect "$TMP/nan"
refuse "quantize: Inf in a base weight" "k_proj.weight" quantize "$TMP/nanbase.safetensors" --out "$TMP/o7.safetensors"
rm -rf "$TMP/nan" "$TMP/nanbase.safetensors"

# the same module under two keys; a DoRA magnitude twice; zero-size factors (classes 5, 7)
"$PY" - "$ADAPTER" "$DATA/peft/dora_r4_a8_qv/adapter" "$TMP" <<'PYEOF'
import json, os, shutil, struct, sys
ad, dora, tmp = sys.argv[1:4]
def split(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]
def write(folder, cfg_src, entries, cfg_edit=None):
    # entries: list of (name, dtype, shape, bytes)
    os.makedirs(folder, exist_ok=True)
    c = json.load(open(os.path.join(cfg_src, "adapter_config.json")))
    if cfg_edit: cfg_edit(c)
    json.dump(c, open(os.path.join(folder, "adapter_config.json"), "w"))
    h, data, off = {}, b"", 0
    for name, dt, shape, raw in entries:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    hb = json.dumps(h).encode()
    open(os.path.join(folder, "adapter_model.safetensors"), "wb").write(struct.pack("<Q", len(hb)) + hb + data)
def entries_of(src):
    h, data = split(os.path.join(src, "adapter_model.safetensors"))
    return [(k, v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h.items()
            if k != "__metadata__"]
e = entries_of(ad)
a = next(x for x in e if x[0].endswith("q_proj.lora_A.weight"))
write(os.path.join(tmp, "twokeys"), ad, e + [(a[0].replace("base_model.model.", ""),) + a[1:]])
d = entries_of(dora)
m = next(x for x in d if x[0].endswith("lora_magnitude_vector"))
write(os.path.join(tmp, "twomag"), dora, d + [(m[0] + ".weight",) + m[1:]])
write(os.path.join(tmp, "zero"), ad, [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", [40000, 0], b""),
                                      ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", [0, 40000], b"")],
      lambda c: c.update(r=40000))
PYEOF
refuse "the same module with and without base_model.model." "under two keys" merge --base "$BASE" --adapter "$TMP/twokeys" \
  --out "$TMP/o8"
refuse "a DoRA magnitude under two keys" "under two keys" inspect "$TMP/twomag"
refuse "r = 40000 with zero-size factors" "zero-size" inspect "$TMP/zero"
rm -rf "$TMP/twokeys" "$TMP/twomag" "$TMP/zero"

# plan's config.json: a FIFO, 64.0 as an integer, near-2^64 integers, head products that overflowed
mkdir -p "$TMP/plan"
LLAMA='"model_type": "llama", "intermediate_size": 176, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128'
echo "{$LLAMA, \"hidden_size\": 64.0, \"num_attention_heads\": 4}" > "$TMP/plan/config.json"
cases=$((cases + 1))
out=$(timeout 20 "$LORA" plan "$TMP/plan" --rank 8 --targets q_proj --json 2>&1) || fail "plan: hidden_size 64.0 refused: $out"
case "$out" in *'"trainable_parameters": 2048'*) ;; *) fail "plan: hidden_size 64.0 not read as 64: $out" ;; esac
echo "{$LLAMA, \"hidden_size\": 18446744073709551615, \"num_attention_heads\": 4}" > "$TMP/plan/config.json"
refuse "plan: hidden_size near 2^64" "'hidden_size'" plan "$TMP/plan" --rank 8
echo "{${LLAMA/\"num_key_value_heads\": 2, /}, \"hidden_size\": 64, \"num_attention_heads\": 4194304, \"head_dim\": 4194304}" > "$TMP/plan/config.json"
refuse "plan: heads x head_dim overflow" "head_dim" plan "$TMP/plan" --rank 8
echo "{$LLAMA, \"hidden_size\": 64, \"num_attention_heads\": 4, \"tie_word_embeddings\": \"yes\"}" > "$TMP/plan/config.json"
refuse "plan: a type error names the key" "tie_word_embeddings" plan "$TMP/plan" --rank 8
rm "$TMP/plan/config.json" && mkfifo "$TMP/plan/config.json"
refuse "plan: config.json is a FIFO" "FIFO" plan "$TMP/plan" --rank 8
rm -rf "$TMP/plan"

# ---- class 12: concurrent writers of one folder ----------------------------------------
cases=$((cases + 1))
pids=()
for i in 1 2 3 4 5 6; do
  timeout 120 "$LORA" merge --base "$BASE" --adapter "$ADAPTER" --out "$TMP/shared" --quiet >"$TMP/c$i.out" 2>"$TMP/c$i.err" &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || fail "concurrent writer $((i + 1)) failed: $(cat "$TMP/c$((i + 1)).err")"
done
[ -f "$TMP/shared/model.safetensors" ] || fail "concurrent writers: no output"
[ -z "$(find "$TMP" -name '.*.tmp-*' | head -1)" ] || fail "concurrent writers left $(find "$TMP" -name '.*.tmp-*')"

[ "$(snapshot)" = "$BEFORE" ] || fail "an input changed"
echo "hostile.sh: $cases cases, $fails failures"
[ $fails -eq 0 ]
