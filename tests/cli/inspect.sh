#!/usr/bin/env bash
# lora inspect / compress / combine / similarity on the PEFT fixtures.
# usage: bash inspect.sh <path to lora> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
fail() { echo "FAIL: $*"; exit 1; }
P=$DATA/peft
W=$P/weighted_combos/adapters

# --- inspect: table ---
"$LORA" inspect "$P/lora_r8_a16_all/adapter" > "$TMP/table.txt" || fail "inspect exited non-zero"
grep -q "model.layers.0.self_attn.q_proj" "$TMP/table.txt" || fail "table lacks q_proj"
grep -q "keeps 90% of the energy" "$TMP/table.txt" || fail "table lacks the recommendation"
n=$(fx count "$P/lora_r8_a16_all/adapter/adapter_model.safetensors" 'lora_A\.weight$')
[ "$(grep -c '_proj ' "$TMP/table.txt")" -eq "$n" ] || fail "table should list the adapter's $n modules"

# --- inspect: JSON with the fields the issue lists ---
"$LORA" inspect "$P/rslora_r16_a8_attn/adapter" --json --energy 0.5,0.9,0.99 > "$TMP/out.json" || fail "inspect --json"
for f in '"modules"' '"name": "model.layers.0.self_attn.q_proj"' '"out_features"' '"in_features"' '"rank": 16' \
         '"alpha"' '"scaling": 2.0' '"singular_values"' '"frobenius_norm"' '"spectral_norm"' '"stable_rank"' \
         '"entropy_rank"' '"energy_rank"' '"0.5"' '"0.99"' '"summary"' '"recommendations"'; do
  grep -q -- "$f" "$TMP/out.json" || fail "JSON lacks $f"
done
grep -q 'base_model' "$TMP/out.json" && fail "JSON names should not carry the base_model.model. prefix"
if command -v python3 > /dev/null && python3 -c 'import json' 2> /dev/null; then
  n=$(fx count "$P/rslora_r16_a8_attn/adapter/adapter_model.safetensors" 'lora_A\.weight$')
  python3 - "$TMP/out.json" "$n" << 'PY' || fail "JSON content"
import json, sys
d = json.load(open(sys.argv[1]))
assert len(d["modules"]) == int(sys.argv[2]), (len(d["modules"]), sys.argv[2])
for m in d["modules"]:
    s = m["singular_values"]
    assert len(s) == m["rank"] == 16
    assert all(a >= b for a, b in zip(s, s[1:])), "descending"
    assert abs(m["spectral_norm"] - s[0]) < 1e-12
    assert abs(m["frobenius_norm"] - sum(x * x for x in s) ** 0.5) < 1e-9
    assert set(m["energy_rank"]) == {"0.5", "0.9", "0.99"}
    assert 1 <= m["energy_rank"]["0.5"] <= m["energy_rank"]["0.9"] <= m["energy_rank"]["0.99"] <= 16
    assert 1 <= m["entropy_rank"] <= 16 and 1 <= m["stable_rank"] <= 16
PY
fi

# --- inspect: plot and base ---
"$LORA" inspect "$P/lora_r8_a16_all/adapter" --plot "$TMP/s.svg" --base "$P/lora_r8_a16_all/base/model.safetensors" \
  > "$TMP/b.txt" || fail "inspect --plot --base"
head -c 200 "$TMP/s.svg" | grep -q "<svg" || fail "plot is not an SVG"
grep -q "</svg>" "$TMP/s.svg" || fail "plot is truncated"
grep -q "intruders" "$TMP/b.txt" || fail "--base should add an intruder column"

# --- inspect: bad input -> exit 1, one line on stderr, no output file ---
bad() {  # expected-substring args...
  local want=$1; shift
  "$LORA" "$@" > "$TMP/o.txt" 2> "$TMP/e.txt" && fail "'$*' should fail"
  [ "$(wc -l < "$TMP/e.txt")" -eq 1 ] || fail "'$*' should print one line on stderr, got: $(cat "$TMP/e.txt")"
  grep -q -- "$want" "$TMP/e.txt" || fail "'$*': message lacks '$want': $(cat "$TMP/e.txt")"
}
bad "not a folder" inspect "$TMP/missing"
bad "thresholds must be in (0, 1]" inspect "$P/lora_r8_a16_all/adapter" --energy 0.9,1.5
bad "expected one PEFT adapter folder" inspect
mkdir "$TMP/broken" && cp "$P/lora_r8_a16_all/adapter/adapter_config.json" "$TMP/broken/"
bad "adapter_model.safetensors" inspect "$TMP/broken" --plot "$TMP/never.svg"
[ -e "$TMP/never.svg" ] && fail "a failed inspect must not write the plot"
bad "no tensor" inspect "$P/lora_r8_a16_all/adapter" --base "$DATA/nf4/nf4_reference.safetensors"
# use_dora must agree with the tensors (lora_magnitude_vector), as for every other command
"$LORA" inspect "$P/dora_r4_a8_qv/adapter" > /dev/null || fail "inspect of a DoRA adapter"
cp -r "$P/dora_r4_a8_qv/adapter" "$TMP/dora_off" && cp -r "$P/lora_r8_a16_all/adapter" "$TMP/dora_on"
sed -i 's/"use_dora": *true/"use_dora": false/' "$TMP/dora_off/adapter_config.json"
sed -i 's/"use_dora": *false/"use_dora": true/' "$TMP/dora_on/adapter_config.json"
grep -q '"use_dora": *false' "$TMP/dora_off/adapter_config.json" || fail "could not edit the DoRA config"
grep -q '"use_dora": *true' "$TMP/dora_on/adapter_config.json" || fail "could not edit the LoRA config"
bad "lora_magnitude_vector' is a DoRA magnitude, but the config has use_dora = false" inspect "$TMP/dora_off"
bad "has no lora_magnitude_vector, but the config has use_dora = true" inspect "$TMP/dora_on" --plot "$TMP/never.svg"
[ -e "$TMP/never.svg" ] && fail "a failed inspect must not write the plot"

# --- compress ---
"$LORA" compress "$P/lora_r8_a16_all/adapter" --rank 3 --out "$TMP/c3" > /dev/null || fail "compress --rank"
"$LORA" inspect "$TMP/c3" --json > "$TMP/c3.json" || fail "inspect of the compressed adapter"
grep -q '"rank": 3' "$TMP/c3.json" || fail "compressed adapter should have r = 3"
grep -q '"rank": 8' "$TMP/c3.json" && fail "compressed adapter still has r = 8 modules"
"$LORA" compress "$P/patterns_all/adapter" --energy 0.9 --out "$TMP/ce" > /dev/null || fail "compress --energy"
grep -q '"rank_pattern"' "$TMP/ce/adapter_config.json" || fail "energy compression should write rank_pattern"
bad "exactly one of" compress "$P/lora_r8_a16_all/adapter" --rank 2 --energy 0.9 --out "$TMP/n1"
bad "--energy must be in" compress "$P/lora_r8_a16_all/adapter" --energy 2 --out "$TMP/n2"
[ -e "$TMP/n1" ] || [ -e "$TMP/n2" ] && fail "a failed compress must not write its output"
# modules_to_save copies and an embedding's table are carried over (issue 19)
"$LORA" compress "$P/modules_to_save_lm_head_embed/adapter" --rank 4 --out "$TMP/cm" > "$TMP/cm.txt" || fail "compress of a modules_to_save adapter"
grep -q "carried over unchanged: 2 whole tensors" "$TMP/cm.txt" || fail "compress did not carry the modules_to_save copies"
head -c 4000 "$TMP/cm/adapter_model.safetensors" | grep -q "base_model.model.lm_head.weight" || fail "lm_head copy missing after compress"
"$LORA" compress "$P/embedding_lora/adapter" --rank 2 --out "$TMP/ce2" > /dev/null || fail "compress of an embedding adapter"
head -c 4000 "$TMP/ce2/adapter_model.safetensors" | grep -q "lora_embedding_A" || fail "embedding LoRA not kept as one by compress"

# --- combine ---
for t in svd cat linear; do
  if [ $t = linear ]; then ad=("--adapter" "$W/a1" "--adapter" "$W/a2"); else ad=("--adapter" "$W/a1" "--adapter" "$W/a3"); fi
  "$LORA" combine "${ad[@]}" --weights 0.6,0.4 --type $t --out "$TMP/m_$t" > /dev/null || fail "combine --type $t"
  [ -f "$TMP/m_$t/adapter_model.safetensors" ] || fail "combine $t wrote no weights"
done
grep -q '"r": 12' "$TMP/m_cat/adapter_config.json" || fail "cat of r = 8 and r = 4 should have r = 12"
"$LORA" combine --adapter "$W/a1" --adapter "$W/a3" --weights 1,1 --type svd --rank 5 --out "$TMP/m5" > /dev/null || fail "svd --rank"
grep -q '"r": 5' "$TMP/m5/adapter_config.json" || fail "svd --rank 5 should have r = 5"
bad "same r" combine --adapter "$W/a1" --adapter "$W/a3" --weights 1,1 --type linear --out "$TMP/n3"
bad "one weight per" combine --adapter "$W/a1" --adapter "$W/a3" --weights 1 --type cat --out "$TMP/n4"
bad "--density" combine --adapter "$W/a1" --adapter "$W/a3" --weights 1,1 --type ties --out "$TMP/n5"
[ -e "$TMP/n3" ] || [ -e "$TMP/n4" ] || [ -e "$TMP/n5" ] && fail "a failed combine must not write its output"

# --- similarity ---
"$LORA" similarity "$W/a1" "$W/a1" > "$TMP/sim.txt" || fail "similarity"
grep -q "mean φ over the grids: A 1.0000, ΔW 1.0000" "$TMP/sim.txt" || fail "an adapter is fully similar to itself"
"$LORA" similarity "$W/a1" "$W/a3" --json > "$TMP/sim.json" || fail "similarity --json"
grep -q '"phi_A"' "$TMP/sim.json" || fail "similarity JSON lacks phi_A"
bad "expected two PEFT adapter folders" similarity "$W/a1"


# --- issue 19: natural layer order, Conv1D in/out as the layer sees them, whole tensors ---
if command -v python3 > /dev/null; then
  mkdir -p "$TMP/twelve"
  python3 - "$TMP/twelve" <<'EOF'
import json, struct, sys, math
d = sys.argv[1]
tensors = {}
for l in range(12):
    for ab, shape in (("lora_A", (4, 16)), ("lora_B", (16, 4))):
        n = shape[0] * shape[1]
        tensors["base_model.model.model.layers.%d.self_attn.q_proj.%s.weight" % (l, ab)] = (shape, [math.sin(0.37 * i + l + (ab == "lora_B")) for i in range(n)])
header, data = {}, b""
for k, (shape, vals) in sorted(tensors.items()):
    raw = struct.pack("<%df" % len(vals), *vals)
    header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
hb = json.dumps(header).encode(); hb += b" " * (-len(hb) % 8)
open(d + "/adapter_model.safetensors", "wb").write(struct.pack("<Q", len(hb)) + hb + data)
json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, open(d + "/adapter_config.json", "w"))
EOF
  "$LORA" inspect "$TMP/twelve" --json > "$TMP/twelve.json" || fail "inspect of a 12-layer adapter"
  order=$(python3 -c "import json,sys; print(' '.join(m['name'].split('.')[2] for m in json.load(open(sys.argv[1]))['modules']))" "$TMP/twelve.json")
  [ "$order" = "0 1 2 3 4 5 6 7 8 9 10 11" ] || fail "modules not in natural order: $order"
  mkdir -p "$TMP/fifo"
  cp "$P/lora_r8_a16_all/adapter/"* "$TMP/fifo/"
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); j['fan_in_fan_out']=True; json.dump(j,open(sys.argv[1],'w'))" "$TMP/fifo/adapter_config.json"
  "$LORA" inspect "$TMP/fifo" --json > "$TMP/fifo.json" || fail "inspect of a fan_in_fan_out adapter"
  # the layer's in/out: the base's v_proj.weight is [out, in]
  v_shape=$(fx shape "$P/lora_r8_a16_all/base/model.safetensors" model.layers.0.self_attn.v_proj.weight)
  python3 - "$TMP/fifo.json" "$v_shape" <<'EOF' || fail "Conv1D in/out are not as the layer sees them"
import json, sys
m = [m for m in json.load(open(sys.argv[1]))["modules"] if m["name"] == "model.layers.0.self_attn.v_proj"][0]
out, inp = (int(d) for d in sys.argv[2].split(','))
assert (m["in_features"], m["out_features"], m["kind"]) == (inp, out, "conv1d"), (m, sys.argv[2])
EOF
fi
"$LORA" inspect "$P/modules_to_save_lm_head_embed/adapter" > "$TMP/mts.txt" || fail "inspect of a modules_to_save adapter"
F=$P/modules_to_save_lm_head_embed/adapter/adapter_model.safetensors
lm=$(grouped "$(fx numel "$F" '^base_model\.model\.lm_head\.weight$')")
grep -q "lm_head.weight.*modules_to_save.*$lm parameters" "$TMP/mts.txt" ||
  fail "modules_to_save copy not listed: $(cat "$TMP/mts.txt")"
lora=$(grouped "$(fx numel "$F" 'lora_[AB]\.weight$')")
grep -q "$lora LoRA parameters" "$TMP/mts.txt" || fail "parameter count ($lora) without thousands separators"
"$LORA" inspect "$P/embedding_lora/adapter" --json | grep -q '"kind": "embedding"' || fail "embedding LoRA not inspected as one"

# spectral spikes: none on the fixture; one direction of layer 1's q_proj made 30x stronger
# (what adding a second adapter that shares it does) is warned about on stderr and in --json
"$LORA" inspect "$P/lora_r8_a16_all/adapter" > /dev/null 2> "$TMP/spk.err" || fail "inspect for spikes"
! grep -q "spectral spike" "$TMP/spk.err" || fail "spike warned on a clean adapter: $(cat "$TMP/spk.err")"
if command -v python3 > /dev/null; then
  python3 - "$P/lora_r8_a16_all/adapter" "$TMP/spiky" <<'PY' || fail "making the spiky adapter"
import json, shutil, struct, sys
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
b = bytearray(open(src + '/adapter_model.safetensors', 'rb').read()); n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n]); k = 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'
s, e = h[k]['data_offsets']; rows, r = h[k]['shape']
v = list(struct.unpack('<%df' % ((e - s) // 4), b[8 + n + s:8 + n + e]))
for i in range(rows): v[i * r] *= 30
b[8 + n + s:8 + n + e] = struct.pack('<%df' % len(v), *v)
open(dst + '/adapter_model.safetensors', 'wb').write(b)
PY
  "$LORA" inspect "$TMP/spiky" --json > "$TMP/spk.json" 2> "$TMP/spk.err" || fail "inspect spiky"
  grep -q "warning: model.layers.1.self_attn.q_proj: σ₁/σ₂" "$TMP/spk.err" || fail "no spike warning: $(cat "$TMP/spk.err")"
  # nothing flagged elsewhere; σ₁ against its type's median ("top") needs 3 q_proj, so 3 layers:
  # below, the gap is the one spike, from 3 layers on the top may come with it
  spikes=$(grep -c "spectral spike" "$TMP/spk.err")
  [ "$(grep "spectral spike" "$TMP/spk.err" | grep -vc "warning: model.layers.1.self_attn.q_proj: ")" = 0 ] ||
    fail "a spike elsewhere: $(cat "$TMP/spk.err")"
  if [ "$(fx layers "$P/lora_r8_a16_all/adapter/adapter_model.safetensors")" -lt 3 ]; then
    [ "$spikes" = 1 ] || fail "more than one spike: $(cat "$TMP/spk.err")"
  else
    [ "$spikes" -le 2 ] || fail "more than a top and a gap spike: $(cat "$TMP/spk.err")"
  fi
  grep -q '"kind": "gap"' "$TMP/spk.json" || fail "spike not in --json"
fi

echo "inspect.sh: all checks passed"
