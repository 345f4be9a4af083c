#!/usr/bin/env bash
# lora extract: PEFT's merged checkpoint (base + an r = 8 adapter on all 7 projections) gives
# back the adapter's ΔW (lora diff ~1e-6, float32 rounding of the merge); refusals leave nothing.
# Called as: bash extract.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
FX=$DATA/peft/lora_r8_a16_all
N=$(fx count "$FX/adapter/adapter_model.safetensors" 'lora_A\.weight$')  # the adapter's modules
LAYERS=$(fx count "$FX/base/model.safetensors" 'q_proj\.weight$')       # one q_proj a layer

"$LORA" extract --base "$FX/base" --tuned "$FX/merged.safetensors" --rank 8 --out "$TMP/ex" > "$TMP/log" 2>&1 \
  || fail "extract: $(cat "$TMP/log")"
grep -q "extracted $N modules" "$TMP/log" || fail "not $N modules: $(tail -2 "$TMP/log")"
"$LORA" diff "$FX/adapter" "$TMP/ex" --json > "$TMP/diff.json" 2>&1 || fail "diff: $(cat "$TMP/diff.json")"
if command -v python3 > /dev/null; then
  python3 - "$TMP/diff.json" "$N" <<'PY' || fail "extracted adapter differs from the original"
import json, sys
d = json.load(open(sys.argv[1]))
assert len(d['modules']) == int(sys.argv[2]) and not d['only_a'] and not d['only_b'], d
worst = max(m['rel_fro'] for m in d['modules'])
assert worst < 1e-5, worst
assert min(m['similarity'] for m in d['modules']) > 0.9999
PY
fi
# --energy 1 finds the rank (8) by itself; a rank below 8 reports the error it leaves
"$LORA" extract --base "$FX/base" --tuned "$FX/merged.safetensors" --energy 0.999999 --json --out "$TMP/en" \
  > "$TMP/en.json" 2>&1 || fail "energy: $(cat "$TMP/en.json")"
grep -q '"rank": 8' "$TMP/en.json" || fail "energy did not find r = 8"
"$LORA" extract --base "$FX/base" --tuned "$FX/merged.safetensors" --rank 2 --only q_proj --json --out "$TMP/r2" \
  > "$TMP/r2.json" 2>&1 || fail "rank 2: $(cat "$TMP/r2.json")"
if command -v python3 > /dev/null; then
  python3 - "$TMP/r2.json" "$LAYERS" <<'PY' || fail "rank-2 report"
import json, sys
d = json.load(open(sys.argv[1]))
assert len(d['modules']) == int(sys.argv[2]), d
for m in d['modules']:
    assert 0 < m['rel_fro_error'] < 1 and 0 < m['kept_energy'] < 1, m
    assert abs(m['rel_fro_error'] ** 2 + m['kept_energy'] - 1) < 1e-6, m
PY
fi
# --save-modules: lm_head and embed_tokens copied whole (PEFT's modules_to_save keys and config)
"$LORA" extract --base "$FX/base" --tuned "$FX/merged.safetensors" --rank 8 --only q_proj --json \
  --save-modules lm_head,embed_tokens --out "$TMP/mts" > "$TMP/mts.json" 2>&1 || fail "save-modules: $(cat "$TMP/mts.json")"
if command -v python3 > /dev/null; then
  python3 - "$TMP/mts.json" "$TMP/mts" <<'PY' || fail "save-modules output"
import json, struct, sys
d = json.load(open(sys.argv[1]))
assert d['modules_to_save'] == ['lm_head.weight', 'model.embed_tokens.weight'], d['modules_to_save']
cfg = json.load(open(sys.argv[2] + '/adapter_config.json'))
assert cfg['modules_to_save'] == ['lm_head', 'embed_tokens'], cfg['modules_to_save']
b = open(sys.argv[2] + '/adapter_model.safetensors', 'rb').read()
h = json.loads(b[8:8 + struct.unpack('<Q', b[:8])[0]])
assert 'base_model.model.lm_head.weight' in h and 'base_model.model.model.embed_tokens.weight' in h, sorted(h)
PY
fi

refuse() {
  local want=$1; shift
  "$LORA" extract "$@" > "$TMP/out" 2> "$TMP/err"
  local rc=$?
  [ $rc -eq 1 ] || fail "exit $rc for: $* ($(cat "$TMP/err"))"
  grep -q -- "$want" "$TMP/err" || fail "stderr lacks '$want': $(cat "$TMP/err")"
  [ ! -e "$TMP/bad" ] || fail "output left behind for: $*"
}
refuse "exactly one of" --base "$FX/base" --tuned "$FX/merged.safetensors" --out "$TMP/bad"
refuse "exactly one of" --base "$FX/base" --tuned "$FX/merged.safetensors" --rank 2 --energy 0.9 --out "$TMP/bad"
refuse "--energy must be" --base "$FX/base" --tuned "$FX/merged.safetensors" --energy 1.5 --out "$TMP/bad"
refuse "no tensor of module 'lm_haed'" --base "$FX/base" --tuned "$FX/merged.safetensors" --rank 2 --save-modules lm_haed --out "$TMP/bad"
refuse "identical" --base "$FX/base" --tuned "$FX/base" --rank 2 --out "$TMP/bad"

[ $fails -eq 0 ] && echo "extract: all passed"
exit $((fails > 0))
