#!/usr/bin/env bash
# lora quantize / lora dequantize: layout of the bnb-4bit output, round trip,
# folder mode, and bad input (exit 1, one line on stderr, no output written).
# Usage: bash quantize.sh <path to lora> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
check() {  # check <description> <command...>
  local what=$1
  shift
  if "$@"; then echo "ok   $what"; else echo "FAIL $what"; fails=$((fails + 1)); fi
}
BASE="$DATA/peft/lora_r8_a16_all/base/model.safetensors"

# --- file mode, double quantisation -------------------------------------------
check "quantize --double-quant exits 0" "$LORA" quantize "$BASE" --out "$TMP/q.safetensors" --double-quant
check "dequantize exits 0" "$LORA" dequantize "$TMP/q.safetensors" --out "$TMP/d.safetensors"
check "dequantize --dtype bf16 exits 0" "$LORA" dequantize "$TMP/q.safetensors" --out "$TMP/d16.safetensors" --dtype bf16
check "dequantize --dtype BFloat16 (any case) is --dtype bf16" bash -c '"$1" dequantize "$2/q.safetensors" --out "$2/dB.safetensors" --dtype BFloat16 > /dev/null && cmp -s "$2/dB.safetensors" "$2/d16.safetensors"' _ "$LORA" "$TMP"
check "quantize --blocksize 128 exits 0" "$LORA" quantize "$BASE" --out "$TMP/q128.safetensors" --blocksize 128 --skip lm_head

check "layout, values and round trip" python3 - "$BASE" "$TMP" <<'PY'
import json, struct, sys, math
base, t = sys.argv[1], sys.argv[2]
def load(p):
    f = open(p, 'rb').read(); n = struct.unpack('<Q', f[:8])[0]
    h = json.loads(f[8:8 + n]); h.pop('__metadata__', None)
    def get(k):
        d = h[k]; s, e = d['data_offsets']; raw = f[8 + n + s:8 + n + e]
        fmt = {'F32': 'f', 'U8': 'B', 'I64': 'q'}.get(d['dtype'])
        if d['dtype'] == 'BF16':
            return [struct.unpack('<f', b'\0\0' + raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
        return list(struct.unpack('<%d%s' % (len(raw) // struct.calcsize(fmt), fmt), raw))
    return h, get
hb, gb = load(base)
hq, gq = load(t + '/q.safetensors')
hd, gd = load(t + '/d.safetensors')
h16, g16 = load(t + '/d16.safetensors')
h128, g128 = load(t + '/q128.safetensors')
w = 'model.layers.0.self_attn.q_proj.weight'
# sizes from the base's q_proj: two codes a byte, one absmax a block of 64, one nested absmax a 256 of those
shape = hb[w]['shape']; numel = shape[0] * shape[1]; blocks = -(-numel // 64)
assert hq[w]['dtype'] == 'U8' and hq[w]['shape'] == [numel // 2, 1], hq[w]
for suf, dt, s in [('.absmax', 'U8', [blocks]), ('.quant_map', 'F32', [16]),
                   ('.nested_absmax', 'F32', [-(-blocks // 256)]), ('.nested_quant_map', 'F32', [256])]:
    assert hq[w + suf]['dtype'] == dt and hq[w + suf]['shape'] == s, (suf, hq[w + suf], s)
blob = json.loads(bytes(gq(w + '.quant_state.bitsandbytes__nf4')).decode())
assert blob['quant_type'] == 'nf4' and blob['blocksize'] == 64 and blob['shape'] == shape, blob
assert blob['dtype'] == 'float32' and blob['nested_blocksize'] == 256 and blob['nested_dtype'] == 'float32', blob
assert abs(gq(w + '.quant_map')[0] + 1.0) < 1e-7 and gq(w + '.quant_map')[7] == 0.0
# not quantised: lm_head and embed_tokens (default --skip), norms (1-D)
assert hq['lm_head.weight']['dtype'] == 'F32' and hq['model.embed_tokens.weight']['dtype'] == 'F32'
assert hq['model.layers.0.input_layernorm.weight']['dtype'] == 'F32'
assert not any(k.startswith('lm_head.weight.') for k in hq)
# round trip: same keys as the base, values within NF4's error of each block
assert set(hd) == set(hb), set(hd) ^ set(hb)
for k in hb:
    a, b = gb(k), gd(k)
    assert hd[k]['shape'] == hb[k]['shape'] and hd[k]['dtype'] == 'F32', k
    if hq[k]['dtype'] == 'F32':
        assert a == b, k
        continue
    for blk in range(0, len(a), 64):
        am = max(abs(x) for x in a[blk:blk + 64])
        for x, y in zip(a[blk:blk + 64], b[blk:blk + 64]):
            assert abs(x - y) <= 0.16 * am * 1.02 + 1e-7, (k, x, y, am)
    rel = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / sum(x * x for x in a))
    assert 0.03 < rel < 0.15, (k, rel)
# dequantised values are code x absmax: they requantise to themselves
assert h16[w]['dtype'] == 'BF16'
for x, y in zip(gd(w), g16(w)):
    assert abs(x - y) <= abs(x) * 2 ** -8, (x, y)
# blocksize 128 without double quantisation: float absmax, no nested tensors
assert h128[w + '.absmax']['dtype'] == 'F32' and h128[w + '.absmax']['shape'] == [-(-numel // 128)]
assert w + '.nested_absmax' not in h128
assert json.loads(bytes(g128(w + '.quant_state.bitsandbytes__nf4')).decode())['blocksize'] == 128
assert h128['model.embed_tokens.weight']['dtype'] == 'U8'  # --skip lm_head only
PY

# --- folder mode -------------------------------------------------------------
mkdir -p "$TMP/model"
cp "$BASE" "$TMP/model/model.safetensors"
echo '{"model_type": "llama", "hidden_size": 64}' > "$TMP/model/config.json"
echo 'tokenizer' > "$TMP/model/tokenizer.json"
check "quantize a folder" "$LORA" quantize "$TMP/model" --out "$TMP/model-bnb" --double-quant
check "folder output has config with quantization_config and copies other files" python3 - "$TMP/model-bnb" <<'PY'
import json, sys, os
d = sys.argv[1]
c = json.load(open(d + '/config.json'))
q = c['quantization_config']
assert q['quant_method'] == 'bitsandbytes' and q['load_in_4bit'] and q['bnb_4bit_quant_type'] == 'nf4', q
assert q['bnb_4bit_use_double_quant'] is True and c['model_type'] == 'llama'
assert open(d + '/tokenizer.json').read() == 'tokenizer\n'
assert os.path.exists(d + '/model.safetensors')
PY
check "dequantize a folder" "$LORA" dequantize "$TMP/model-bnb" --out "$TMP/model-f32"
check "dequantised folder config has no quantization_config" python3 -c "
import json, sys; c = json.load(open(sys.argv[1] + '/config.json')); assert 'quantization_config' not in c" "$TMP/model-f32"

# --- bad input -----------------------------------------------------------------
bad() {  # bad <description> <expected stderr substring> <output path> <args...>
  local what=$1 want=$2 outp=$3
  shift 3
  "$LORA" "$@" > "$TMP/stdout" 2> "$TMP/stderr"
  local rc=$?
  local lines
  lines=$(wc -l < "$TMP/stderr")
  if [[ $rc -eq 1 && $lines -eq 1 ]] && grep -qF -- "$want" "$TMP/stderr" && [[ ! -e $outp ]]; then
    echo "ok   $what"
  else
    echo "FAIL $what (rc=$rc, stderr: $(cat "$TMP/stderr"), output exists: $([[ -e $outp ]] && echo yes || echo no))"
    fails=$((fails + 1))
  fi
}
bad "missing input" "no such file" "$TMP/x1" quantize "$TMP/nope.safetensors" --out "$TMP/x1"
bad "bad blocksize" "blocksize must be a power of two from 32 to 4096, got 48" "$TMP/x2" quantize "$BASE" --out "$TMP/x2" --blocksize 48
bad "blocksize too large" "got 8192" "$TMP/x3" quantize "$BASE" --out "$TMP/x3" --blocksize 8192
printf 'garbage' > "$TMP/bad.safetensors"
bad "corrupt safetensors" "bad.safetensors" "$TMP/x4" quantize "$TMP/bad.safetensors" --out "$TMP/x4"
bad "nothing to dequantise" "no bitsandbytes NF4 weights" "$TMP/x5" dequantize "$BASE" --out "$TMP/x5"
bad "bad dtype" "--dtype must be a float type" "$TMP/x6" dequantize "$TMP/q.safetensors" --out "$TMP/x6" --dtype f8
bad "missing --out" "missing required option --out" "$TMP/x7" quantize "$BASE"
bad "everything skipped" "no 2-D floating-point .weight tensors" "$TMP/x8" quantize "$BASE" --out "$TMP/x8" --skip lm_head,embed_tokens,self_attn,mlp
bad "output folder's parent missing" "does not exist" "$TMP/no/such/dir/q.safetensors" quantize "$BASE" --out "$TMP/no/such/dir/q.safetensors"
# A checkpoint whose quant_state is damaged: truncated packed weight.
python3 - "$TMP/q.safetensors" "$TMP/broken.safetensors" <<'PY'
import json, struct, sys
f = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', f[:8])[0]
h = json.loads(f[8:8 + n]); meta = h.pop('__metadata__', None)
w = 'model.layers.0.self_attn.q_proj.weight'
blob_key = w + '.quant_state.bitsandbytes__nf4'
s, e = h[blob_key]['data_offsets']
blob = json.loads(f[8 + n + s:8 + n + e]); blob['shape'][1] *= 2   # claims twice the elements
raw = {k: f[8 + n + v['data_offsets'][0]:8 + n + v['data_offsets'][1]] for k, v in h.items()}
raw[blob_key] = json.dumps(blob).encode()
hdr, data, off = {}, b'', 0
for k, v in h.items():
    b = raw[k]; shape = [len(b)] if k == blob_key else v['shape']
    hdr[k] = {'dtype': v['dtype'], 'shape': shape, 'data_offsets': [off, off + len(b)]}; data += b; off += len(b)
hj = json.dumps(hdr).encode(); hj += b' ' * ((8 - len(hj) % 8) % 8)
open(sys.argv[2], 'wb').write(struct.pack('<Q', len(hj)) + hj + data)
PY
# the base's q_proj [rows, cols]: rows·cols/2 bytes of codes, where [rows, 2·cols] needs rows·cols
rows=$(fx shape "$BASE" model.layers.0.self_attn.q_proj.weight) cols=${rows#*, } rows=${rows%%,*}
bad "damaged quant_state" \
  "packed weight has $((rows * cols / 2)) bytes, shape [$rows,$((2 * cols))] needs $((rows * cols))" \
  "$TMP/x9" dequantize "$TMP/broken.safetensors" --out "$TMP/x9"
# --- progress on stderr: --progress always, --quiet never ------------------------
progress_lines() {  # progress_lines <expect 0|1> <command> <args...>
  local want=$1
  shift
  "$LORA" "$@" > /dev/null 2> "$TMP/progress.err" || return 1
  if [[ $want == 1 ]]; then grep -q "lora $1: 100%" "$TMP/progress.err"; else [[ ! -s "$TMP/progress.err" ]]; fi
}
check "quantize --progress reports 100%" progress_lines 1 quantize "$BASE" --out "$TMP/qp.safetensors" --progress
check "dequantize --progress reports 100%" progress_lines 1 dequantize "$TMP/q.safetensors" --out "$TMP/dp.safetensors" --progress
check "dequantize --quiet prints nothing on stderr" progress_lines 0 dequantize "$TMP/q.safetensors" --out "$TMP/dq.safetensors" --quiet
check "compress --progress reports 100%" progress_lines 1 compress "$DATA/peft/lora_r8_a16_all/adapter" --rank 2 --out "$TMP/cp" --progress
check "combine --progress reports 100%" progress_lines 1 combine --adapter "$DATA/peft/lora_r8_a16_all/adapter" \
  --adapter "$DATA/peft/lora_r8_a16_all/adapter" --weights 0.5,0.5 --type cat --out "$TMP/cb" --progress

ls -a "$TMP" | grep -q '\.tmp-' && { echo "FAIL temporary files left behind"; fails=$((fails + 1)); }

echo "$fails failed"
[[ $fails -eq 0 ]]
