#!/usr/bin/env bash
# lora merge: good runs give PEFT's merged tensors; bad input exits 1 with one line on
# stderr and leaves no output. Called as: bash merge.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"

# Compares two safetensors files: same keys, dtypes, shapes; values within 1e-6 relative
# per tensor (python3 stdlib only; skipped without python3).
compare() {
  command -v python3 > /dev/null || return 0
  python3 - "$1" "$2" "${3:-1e-6}" <<'EOF'
import json, struct, sys, math
def load(p):
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop('__metadata__', None)
    out = {}
    for k, v in h.items():
        s, e = v['data_offsets']
        raw = b[8 + n + s:8 + n + e]
        if v['dtype'] == 'F32':
            vals = struct.unpack('<%df' % (len(raw) // 4), raw)
        elif v['dtype'] == 'BF16':
            vals = [struct.unpack('<f', struct.pack('<I', x << 16))[0] for x in struct.unpack('<%dH' % (len(raw) // 2), raw)]
        else:
            vals = list(raw)
        out[k] = (v['dtype'], v['shape'], vals)
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
if sorted(a) != sorted(b):
    sys.exit('keys differ')
for k in a:
    if a[k][:2] != b[k][:2]:
        sys.exit('%s: dtype/shape %s vs %s' % (k, a[k][:2], b[k][:2]))
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(a[k][2], b[k][2])))
    den = math.sqrt(sum(y * y for y in b[k][2])) or 1.0
    if num / den > float(sys.argv[3] if len(sys.argv) > 3 else 1e-6):
        sys.exit('%s: relative error %g' % (k, num / den))
EOF
}

A0="$DATA/peft/lora_r8_a16_all/adapter"
B0="$DATA/peft/lora_r8_a16_all/base/model.safetensors"

# --- good runs ---------------------------------------------------------------
for c in lora_r8_a16_all rslora_r16_a8_attn dora_r4_a8_qv patterns_all; do
  out="$TMP/$c.safetensors"
  if ! "$LORA" merge --base "$DATA/peft/$c/base/model.safetensors" --adapter "$DATA/peft/$c/adapter" \
      --out "$out" > "$TMP/stdout" 2> "$TMP/stderr"; then
    fail "$c: exit $? ($(cat "$TMP/stderr"))"
    continue
  fi
  [ -s "$TMP/stderr" ] && fail "$c: unexpected stderr: $(cat "$TMP/stderr")"
  grep -q "merged" "$TMP/stdout" || fail "$c: no summary on stdout"
  msg=$(compare "$out" "$DATA/peft/$c/merged.safetensors" 2>&1) || fail "$c: $msg"
done

# folder output, --progress, --dtype bf16, --scale 0 gives the base back
"$LORA" merge --base "$DATA/peft/lora_r8_a16_all/base/model.safetensors" --adapter "$DATA/peft/lora_r8_a16_all/adapter" \
  --out "$TMP/folder" --dtype bf16 --progress > /dev/null 2> "$TMP/stderr" || fail "folder output: $(cat "$TMP/stderr")"
[ -f "$TMP/folder/model.safetensors" ] || fail "folder output: no model.safetensors"
grep -q "100%" "$TMP/stderr" || fail "--progress printed nothing"
head -c 400 "$TMP/folder/model.safetensors" | grep -q '"BF16"' || fail "--dtype bf16 not applied"
"$LORA" merge --base "$DATA/peft/lora_r8_a16_all/base/model.safetensors" --adapter "$DATA/peft/lora_r8_a16_all/adapter" \
  --out "$TMP/zero.safetensors" --scale 0 > /dev/null 2>&1 || fail "--scale 0 failed"
cmp -s "$TMP/zero.safetensors" "$DATA/peft/lora_r8_a16_all/base/model.safetensors" || \
  { msg=$(compare "$TMP/zero.safetensors" "$DATA/peft/lora_r8_a16_all/base/model.safetensors" 0) || fail "--scale 0: $msg"; }
"$LORA" merge --help | grep -q -- "--adapter" || fail "--help"

# real PEFT folders (issue 19): modules_to_save, embedding LoRA, lora_bias, trainable
# tokens (tied too), a bf16 adapter; the output folder carries config.json with its dtype
for c in modules_to_save_lm_head modules_to_save_lm_head_embed embedding_lora lora_bias trainable_tokens \
    trainable_tokens_tied lora_r16_bf16_saved; do
  if ! "$LORA" merge --base "$DATA/peft/$c/base" --adapter "$DATA/peft/$c/adapter" --out "$TMP/$c" \
      > "$TMP/stdout" 2> "$TMP/stderr"; then
    fail "$c: exit $? ($(cat "$TMP/stderr"))"
    continue
  fi
  [ -s "$TMP/stderr" ] && fail "$c: unexpected stderr: $(cat "$TMP/stderr")"
  tol=1e-6
  [ $c = lora_r16_bf16_saved ] && tol=5e-3  # PEFT's bf16 adapter rounds dW first; tests/io checks per element
  msg=$(compare "$TMP/$c/model.safetensors" "$DATA/peft/$c/merged.safetensors" $tol 2>&1) || fail "$c: $msg"
  grep -q '"dtype"' "$TMP/$c/config.json" 2> /dev/null || fail "$c: no config.json with a dtype in the output folder"
  grep -q "config.json" "$TMP/stdout" || fail "$c: copied files not reported"
done
grep -q '"bfloat16"' "$TMP/lora_r16_bf16_saved/config.json" || fail "bf16 merge: config.json dtype is not bfloat16"

# two adapters in one run equal the two merges one after the other
W="$DATA/peft/weighted_combos"
{ "$LORA" merge --base "$W/base/model.safetensors" --adapter "$W/adapters/a1" --out "$TMP/s1.safetensors" > /dev/null 2>&1 &&
  "$LORA" merge --base "$TMP/s1.safetensors" --adapter "$W/adapters/a3" --scale 0.5 --out "$TMP/s2.safetensors" > /dev/null 2>&1; } ||
  fail "sequential merges failed"
"$LORA" merge --base "$W/base/model.safetensors" --adapter "$W/adapters/a1" --adapter "$W/adapters/a3:0.5" \
  --out "$TMP/stack.safetensors" > "$TMP/stdout" 2> "$TMP/stderr" || fail "stacked merge: $(cat "$TMP/stderr")"
grep -q "merged 2 adapters" "$TMP/stdout" || fail "stacked merge: summary does not say 2 adapters: $(cat "$TMP/stdout")"
msg=$(compare "$TMP/stack.safetensors" "$TMP/s2.safetensors" 2>&1) || fail "stacked != sequential: $msg"

if command -v python3 > /dev/null; then
  # a base without the "model." prefix is mapped (and said so); --base-prefix forces a mapping
  python3 - "$B0" "$TMP/bare.safetensors" <<'EOF'
import json, struct, sys
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[:8])[0]
h = json.loads(b[8:8 + n])
h2 = {(k[6:] if k.startswith('model.') else k): v for k, v in h.items()}
hb = json.dumps(h2).encode(); hb += b' ' * (-len(hb) % 8)
open(sys.argv[2], 'wb').write(struct.pack('<Q', len(hb)) + hb + b[8 + n:])
EOF
  "$LORA" merge --base "$TMP/bare.safetensors" --adapter "$A0" --out "$TMP/bare-merged.safetensors" > /dev/null \
    2> "$TMP/stderr" || fail "bare base: $(cat "$TMP/stderr")"
  grep -q "'model.' -> ''" "$TMP/stderr" || fail "bare base: mapping not reported: $(cat "$TMP/stderr")"
  "$LORA" merge --base "$TMP/bare.safetensors" --adapter "$A0" --base-prefix "model.=" --out "$TMP/bare2.safetensors" \
    > /dev/null 2>&1 || fail "--base-prefix model.= failed"
  cmp -s "$TMP/bare-merged.safetensors" "$TMP/bare2.safetensors" || fail "--base-prefix gives another result"

  # a config that targets q/v only: the other modules' tensors are not merged, and said so
  mkdir -p "$TMP/qv"
  cp "$A0/"* "$TMP/qv/"
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); j['target_modules']=['q_proj','v_proj']; json.dump(j,open(sys.argv[1],'w'))" \
    "$TMP/qv/adapter_config.json"
  "$LORA" merge --base "$B0" --adapter "$TMP/qv" --out "$TMP/qv.safetensors" > "$TMP/stdout" 2> "$TMP/stderr" ||
    fail "q/v config: $(cat "$TMP/stderr")"
  n=$(fx count "$A0/adapter_model.safetensors" '\.[qv]_proj\.lora_A\.weight$')  # q and v of each layer
  grep -q "into $n tensors" "$TMP/stdout" || fail "q/v config: not $n tensors merged: $(cat "$TMP/stdout")"
  grep -q "not merged" "$TMP/stderr" || fail "q/v config: skipped tensors not reported"
fi

# --- bad input: exit 1, one line on stderr, no output ------------------------
mkdir -p "$TMP/bad_r" "$TMP/bad_json"
cp "$DATA/peft/lora_r8_a16_all/adapter/"* "$TMP/bad_r/"
sed -i 's/"r": 8,/"r": 4,/' "$TMP/bad_r/adapter_config.json"
cp "$DATA/peft/lora_r8_a16_all/adapter/"* "$TMP/bad_json/"
echo '{ "r": 8,' > "$TMP/bad_json/adapter_config.json"
head -c 1000 "$DATA/peft/lora_r8_a16_all/base/model.safetensors" > "$TMP/truncated.safetensors"

B="$DATA/peft/lora_r8_a16_all/base/model.safetensors"
A="$DATA/peft/lora_r8_a16_all/adapter"
bad() {  # bad <name> <expected substring> <args...>
  local name=$1 want=$2
  shift 2
  rm -rf "$TMP/out.safetensors" "$TMP/outdir"
  "$LORA" merge "$@" > /dev/null 2> "$TMP/stderr"
  local rc=$?
  [ $rc -eq 1 ] || fail "$name: exit $rc, expected 1"
  [ "$(wc -l < "$TMP/stderr")" -eq 1 ] || fail "$name: stderr is not one line: $(cat "$TMP/stderr")"
  grep -q -- "$want" "$TMP/stderr" || fail "$name: stderr lacks '$want': $(cat "$TMP/stderr")"
  [ -e "$TMP/out.safetensors" ] && fail "$name: output file left behind"
  [ -e "$TMP/outdir" ] && fail "$name: output folder left behind"
  ls -a "$TMP" | grep -q '\.tmp-' && fail "$name: temporary left behind"
  return 0
}
bad "no --base" "--base" --adapter "$A" --out "$TMP/out.safetensors"
bad "no --out" "--out" --base "$B" --adapter "$A"
bad "missing adapter" "does not exist" --base "$B" --adapter "$TMP/nope" --out "$TMP/out.safetensors"
bad "adapter r vs tensors" "r = 4" --base "$B" --adapter "$TMP/bad_r" --out "$TMP/out.safetensors"
bad "adapter config JSON" "not valid JSON" --base "$B" --adapter "$TMP/bad_json" --out "$TMP/outdir"
bad "missing base" "does not exist" --base "$TMP/nope.safetensors" --adapter "$A" --out "$TMP/out.safetensors"
bad "truncated base" "truncated.safetensors" --base "$TMP/truncated.safetensors" --adapter "$A" --out "$TMP/out.safetensors"
bad "adapter/base mismatch" "no key mapping" --base "$DATA/nf4/nf4_reference.safetensors" --adapter "$A" --out "$TMP/outdir"
bad "bad dtype" "--dtype" --base "$B" --adapter "$A" --out "$TMP/out.safetensors" --dtype f8
bad "bad experts layout" "expected auto, out-in or in-out" --base "$B" --adapter "$A" --out "$TMP/out.safetensors" \
  --experts-layout sideways
bad "bad scale" "--scale" --base "$B" --adapter "$A" --out "$TMP/out.safetensors" --scale abc
bad "unknown option" "--frobnicate" --base "$B" --adapter "$A" --out "$TMP/out.safetensors" --frobnicate 1
bad "out folder missing" "does not exist" --base "$B" --adapter "$A" --out "$TMP/no/such/out.safetensors"
bad "bias-less base" "the base layer has no bias" --base "$DATA/peft/lora_bias_nobias/base" \
  --adapter "$DATA/peft/lora_bias_nobias/adapter" --out "$TMP/outdir"
bad "bad strength" "strength" --base "$B" --adapter "$TMP/nope:x" --out "$TMP/out.safetensors"
bad "out is base" "base checkpoint itself" --base "$TMP/zero.safetensors" --adapter "$A" --out "$TMP/zero.safetensors"

if [ $fails -ne 0 ]; then
  echo "$fails failure(s)"
  exit 1
fi
echo "merge.sh: all passed"
