#!/usr/bin/env bash
# lora combine: the ties/magnitude_prune types give PEFT's factors (tests/data/peft/combos_ext);
# refusals exit 1 with one line on stderr and leave no output.
# Called as: bash combine.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
FX=$DATA/peft/combos_ext
NT=$(fx count "$FX/adapters/a1/adapter_model.safetensors" 'lora_[AB]\.weight$')  # A and B of a1's modules

# out/adapter_model.safetensors against reference <module>.<combo>.lora_A/B (1e-5 relative per tensor)
compare() {
  command -v python3 > /dev/null || return 0
  python3 - "$1" "$FX/reference.safetensors" "$2" "$NT" <<'PY'
import json, struct, sys, math
def load(p):
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop('__metadata__', None)
    return {k: struct.unpack('<%df' % ((v['data_offsets'][1] - v['data_offsets'][0]) // 4),
                             b[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]])
            for k, v in h.items() if v['dtype'] == 'F32'}
got, ref, combo = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
n = 0
for k, v in got.items():
    mod, part = k[len('base_model.model.'):].rsplit('.', 2)[0], k.rsplit('.', 2)[1]
    w = ref['%s.%s.%s' % (mod, combo, part)]
    err = math.sqrt(sum((x - y) ** 2 for x, y in zip(v, w))) / math.sqrt(sum(y * y for y in w))
    if err > 1e-5: sys.exit('%s: relative error %g' % (k, err))
    n += 1
if n != int(sys.argv[4]): sys.exit('%d tensors compared, expected %s' % (n, sys.argv[4]))
PY
}

"$LORA" combine --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a2" --weights 0.7,-0.4 --type ties \
  --density 0.3 --majority-sign frequency --out "$TMP/ties" > "$TMP/log" 2>&1 || fail "ties: $(cat "$TMP/log")"
compare "$TMP/ties/adapter_model.safetensors" ties_d03_freq_neg || fail "ties differs from PEFT"
"$LORA" combine --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a2" --weights 0.7,0.5 --type magnitude_prune \
  --density 0.5 --out "$TMP/mp" > "$TMP/log" 2>&1 || fail "magnitude_prune: $(cat "$TMP/log")"
compare "$TMP/mp/adapter_model.safetensors" mp_d05 || fail "magnitude_prune differs from PEFT"

# rsLoRA first: inherited, as PEFT does
"$LORA" combine --adapter "$FX/adapters/a4" --adapter "$FX/adapters/a1" --weights 0.6,0.4 --type svd \
  --out "$TMP/rs" > "$TMP/log" 2>&1 || fail "svd rslora: $(cat "$TMP/log")"
grep -q '"use_rslora": true' "$TMP/rs/adapter_config.json" || fail "use_rslora not inherited from the first adapter"
grep -q "rsLoRA, from the first adapter" "$TMP/log" || fail "no rsLoRA note: $(cat "$TMP/log")"

# ΔW space accepts unequal ranks and a rank
"$LORA" combine --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a3" --weights 0.5,0.5 --type dare_ties \
  --density 0.5 --space delta --rank 6 --seed 7 --out "$TMP/delta" > "$TMP/log" 2>&1 || fail "delta: $(cat "$TMP/log")"
grep -q '"r": 6' "$TMP/delta/adapter_config.json" || fail "delta: r is not 6"

# refusals: one line, exit 1, nothing written
refuse() {
  local want=$1; shift
  "$LORA" combine "$@" --out "$TMP/bad" > "$TMP/out" 2> "$TMP/err"
  local rc=$?
  [ $rc -eq 1 ] || fail "exit $rc for: $* ($(cat "$TMP/err"))"
  grep -q -- "$want" "$TMP/err" || fail "stderr lacks '$want': $(cat "$TMP/err")"
  [ "$(wc -l < "$TMP/err")" -eq 1 ] || fail "stderr is not one line: $(cat "$TMP/err")"
  [ ! -e "$TMP/bad" ] || fail "output left behind for: $*"
}
refuse "same r" --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a3" --weights 0.5,0.5 --type ties --density 0.5
refuse "needs --density" --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a2" --weights 0.5,0.5 --type dare_linear
refuse "total or frequency" --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a2" --weights 0.5,0.5 --type ties \
  --density 0.5 --majority-sign most
refuse "--density must be in" --adapter "$FX/adapters/a1" --adapter "$FX/adapters/a2" --weights 0.5,0.5 --type ties \
  --density 1.5

[ $fails -eq 0 ] && echo "combine: all passed"
exit $((fails > 0))
