#!/usr/bin/env bash
# lora intruders: λ = 1 changes nothing (up to float rounding); the default λ changes exactly the
# modules it reports intruders for; refusals leave nothing. Called as: bash intruders.sh <lora> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
FX=$DATA/peft/lora_r8_a16_all

"$LORA" intruders "$FX/adapter" --base "$FX/base" --lambda 1 --out "$TMP/same" > "$TMP/log" 2>&1 || fail "λ 1: $(cat "$TMP/log")"
"$LORA" diff "$FX/adapter" "$TMP/same" --json > "$TMP/same.json" 2>&1 || fail "diff same"
"$LORA" intruders "$FX/adapter" --base "$FX/base" --top-k 16 --epsilon 0.6 --out "$TMP/m" > "$TMP/log" 2>&1 \
  || fail "intruders: $(cat "$TMP/log")"
"$LORA" diff "$FX/adapter" "$TMP/m" --json > "$TMP/m.json" 2>&1 || fail "diff m"
if command -v python3 > /dev/null; then
  python3 - "$TMP/same.json" "$TMP/m.json" "$TMP/log" <<'PY' || fail "intruder results"
import json, sys
same, m, log = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), open(sys.argv[3]).read()
assert max(x['rel_fro'] for x in same['modules']) < 1e-5, same
with_intruders = {l.split(':')[0] for l in log.splitlines() if 'intruder(s)' in l}
for x in m['modules']:
    changed = x['rel_fro'] > 1e-5
    assert changed == (x['name'] in with_intruders), (x['name'], x['rel_fro'], sorted(with_intruders))
PY
fi
"$LORA" intruders "$FX/adapter" --base "$DATA/peft/combos_ext/adapters/a1/adapter_model.safetensors" --out "$TMP/bad" \
  > /dev/null 2> "$TMP/err" && fail "wrong base accepted"
grep -q "has no" "$TMP/err" || fail "stderr: $(cat "$TMP/err")"
[ ! -e "$TMP/bad" ] || fail "output left behind"
[ $fails -eq 0 ] && echo "intruders: all passed"
exit $((fails > 0))
