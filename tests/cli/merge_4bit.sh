#!/usr/bin/env bash
# lora merge-4bit: quantise PEFT's base with `lora quantize`, merge the r = 8 adapter into the
# 4-bit checkpoint; the --reference report must show the NF4 error only (the merged result
# against PEFT's float merge is as far as the base's quantisation error), the output has no
# NF4 companions, refusals leave nothing. Called as: bash merge_4bit.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
FX=$DATA/peft/lora_r8_a16_all
N=$(fx count "$FX/adapter/adapter_model.safetensors" 'lora_A\.weight$')  # all 7 projections of each layer

"$LORA" quantize "$FX/base/model.safetensors" --out "$TMP/base4.safetensors" --quiet > "$TMP/log" 2>&1 \
  || fail "quantize: $(cat "$TMP/log")"
"$LORA" merge-4bit --base "$TMP/base4.safetensors" --adapter "$FX/adapter" --out "$TMP/m.safetensors" --dtype F32 \
  --reference "$FX/base/model.safetensors" > "$TMP/log" 2>&1 || fail "merge-4bit: $(cat "$TMP/log")"
grep -q "merged $N modules" "$TMP/log" || fail "not $N modules: $(tail -1 "$TMP/log")"
if command -v python3 > /dev/null; then
  # every merged weight against PEFT's merged.safetensors: off by about the NF4 error of the base
  python3 - "$TMP/m.safetensors" "$FX/merged.safetensors" "$FX/base/model.safetensors" "$N" \
    <<'PY' || fail "merged values"
import json, struct, sys, math
def load(p):
    b = open(p, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop('__metadata__', None)
    return {k: (v['dtype'], struct.unpack('<%df' % ((v['data_offsets'][1] - v['data_offsets'][0]) // 4),
                b[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]]) if v['dtype'] == 'F32' else None)
            for k, v in h.items()}
got, peft, base = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
assert not any('absmax' in k or 'quant_' in k for k in got), 'companions left'
assert sorted(got) == sorted(base), (sorted(set(got) ^ set(base)))
n = 0
for k, (dt, v) in got.items():
    if not k.endswith('proj.weight'): continue
    w, b = peft[k][1], base[k][1]
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(v, w))) / math.sqrt(sum(y * y for y in w))
    q = math.sqrt(sum((x - y) ** 2 for x, y in zip(v, w)))
    assert 1e-4 < diff < 0.2, (k, diff)   # NF4 error of the base, nothing more
    n += 1
assert n == int(sys.argv[4]), (n, sys.argv[4])
PY
fi
# --dtype nf4: a bnb-4bit checkpoint again (the same tensors, companions included), with the
# re-quantisation error per module; dequantised it is within NF4's error of PEFT's float merge
"$LORA" merge-4bit --base "$TMP/base4.safetensors" --adapter "$FX/adapter" --out "$TMP/q4.safetensors" --dtype nf4 \
  --reference "$FX/base/model.safetensors" > "$TMP/qlog" 2>&1 || fail "merge-4bit nf4: $(cat "$TMP/qlog")"
grep -q "merged $N modules, $N of" "$TMP/qlog" || fail "nf4: $(tail -1 "$TMP/qlog")"
grep -q "requant error" "$TMP/qlog" || fail "nf4: no requant error column"
"$LORA" dequantize "$TMP/q4.safetensors" --out "$TMP/q4f.safetensors" --dtype F32 --quiet > "$TMP/dlog" 2>&1 \
  || fail "dequantize the nf4 merge: $(cat "$TMP/dlog")"
if command -v python3 > /dev/null; then
  python3 - "$TMP/qlog" "$TMP/base4.safetensors" "$TMP/q4.safetensors" "$N" <<'PY' || fail "nf4 report"
import json, re, struct, sys
errs = [float(l.split()[2]) for l in open(sys.argv[1]) if re.match(r'model\.layers\.\d+\.\S+\s+yes\s', l)]
assert len(errs) == int(sys.argv[4]) and all(0.01 < e < 0.2 for e in errs), errs
keys = lambda p: sorted(json.loads(open(p, 'rb').read()[8:8 + struct.unpack('<Q', open(p, 'rb').read(8))[0]]))
assert keys(sys.argv[2]) == keys(sys.argv[3])
PY
fi
"$LORA" merge-4bit --base "$TMP/base4.safetensors" --adapter "$FX/adapter" --out "$TMP/bad.safetensors" --dtype F64 \
  > /dev/null 2> "$TMP/err" && fail "F64 accepted"
grep -q "BF16, F16 or F32" "$TMP/err" || fail "stderr: $(cat "$TMP/err")"
[ ! -e "$TMP/bad.safetensors" ] || fail "output left behind"
[ $fails -eq 0 ] && echo "merge_4bit: all passed"
exit $((fails > 0))
