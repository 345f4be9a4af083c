#!/usr/bin/env bash
# lora convert (--to gguf / --to peft), check and normalize on the GGUF fixtures (tests/data/gguf):
# byte-identical to llama.cpp's converter for plain LoRA, folds printed for rsLoRA, refusals with
# the reason and no output left behind. Called as: bash gguf.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
G=$2/gguf

# --- PEFT -> GGUF: the converter's bytes (f32 and f16) ---
for a in lora_all_r8 embed_q_r4; do
  for t in f32 f16; do
    "$LORA" convert "$G/adapters/$a" --to gguf --base "$G/hf_base" --out "$TMP/$a.$t.gguf" --outtype $t > "$TMP/log" ||
      fail "convert $a $t exited non-zero"
    cmp -s "$TMP/$a.$t.gguf" "$G/gguf/$a.$t.gguf" || fail "$a.$t.gguf differs from the converter's"
    grep -q "folded into" "$TMP/log" && fail "$a: nothing should be folded"
  done
done

# --- rsLoRA: each module's fold printed ---
"$LORA" convert "$G/adapters/rslora_qv_r4" --to gguf --base "$G/hf_base" --out "$TMP/rs.gguf" > "$TMP/log" || fail "convert rslora"
n=$(fx count "$G/adapters/rslora_qv_r4/adapter_model.safetensors" 'lora_A\.weight$')  # every module is rsLoRA
[ "$(grep -c 'folded into lora_b' "$TMP/log")" -eq "$n" ] ||
  fail "rslora: expected $n folded modules: $(cat "$TMP/log")"
grep -q "×2" "$TMP/log" || fail "rslora: factor 2 not printed"
"$LORA" convert "$G/adapters/patterns_all_r8" --to gguf --base "$G/gguf/base.f16.gguf" --out "$TMP/p.gguf" --outtype q8_0 > "$TMP/log" ||
  fail "convert patterns q8_0 with a GGUF base"
grep -q "alpha_pattern" "$TMP/log" || fail "patterns: alpha_pattern fold not named"

# --- GGUF -> PEFT -> GGUF round trip ---
mkdir -p "$TMP/back"
"$LORA" convert "$TMP/lora_all_r8.f16.gguf" --to peft --base "$G/hf_base" --out "$TMP/back/lora_all_r8" > /dev/null ||
  fail "convert --to peft"
[ -f "$TMP/back/lora_all_r8/adapter_config.json" ] || fail "no adapter_config.json"
"$LORA" convert "$TMP/back/lora_all_r8" --to gguf --base "$G/hf_base" --out "$TMP/again.gguf" --outtype f16 > /dev/null ||
  fail "convert back to gguf"
cmp -s "$TMP/again.gguf" "$G/gguf/lora_all_r8.f16.gguf" || fail "round trip is not identical"

# --- refusals: one line with the reason, exit 1, nothing written ---
for x in x_lora_bias_qv_r4:lora_B.bias x_mts_lm_head_qv_r4:modules_to_save; do
  a=${x%%:*} why=${x#*:}
  "$LORA" convert "$G/adapters/$a" --to gguf --base "$G/hf_base" --out "$TMP/x.gguf" 2> "$TMP/err" > /dev/null
  [ $? -eq 1 ] || fail "$a should exit 1"
  grep -q "$why" "$TMP/err" || fail "$a: reason '$why' not given: $(cat "$TMP/err")"
  [ -e "$TMP/x.gguf" ] && fail "$a: output left behind"
done
"$LORA" convert "$G/gguf/lora_all_r8.f32.gguf" --to peft --out "$TMP/nobase" 2> "$TMP/err" > /dev/null && fail "q/k without --base should fail"
grep -q "base model" "$TMP/err" || fail "missing-base message: $(cat "$TMP/err")"
[ -e "$TMP/nobase" ] && fail "failed --to peft left a folder"
"$LORA" convert "$G/adapters/lora_all_r8" --to gguf --base "$G/hf_base" --out "$TMP/y.gguf" --outtype q4_k 2> "$TMP/err" > /dev/null &&
  fail "q4_k output should be refused"

# --- check ---
"$LORA" check "$G/adapters/rslora_qv_r4" --engine llama.cpp > "$TMP/out" || fail "check exited non-zero"
grep -q "mis-scaled" "$TMP/out" && grep -q "rsLoRA" "$TMP/out" && grep -q "llama-adapter.h" "$TMP/out" || fail "check llama.cpp: $(cat "$TMP/out")"
"$LORA" check "$G/adapters/patterns_all_r8" --engine vllm --json > "$TMP/out.json" || fail "check --json"
grep -q '"rank_pattern"' "$TMP/out.json" && grep -q 'peft_helper.py' "$TMP/out.json" || fail "check vllm: $(cat "$TMP/out.json")"
"$LORA" check "$G/adapters/x_lora_bias_qv_r4" --engine tgi > "$TMP/out" || fail "check tgi"
grep -q "ignored" "$TMP/out" || fail "check tgi: lora_bias should be ignored"
"$LORA" check "$G/adapters/lora_all_r8" --engine peft > "$TMP/out" || fail "check peft"
grep -q "computes what PEFT computes" "$TMP/out" || fail "check peft: $(cat "$TMP/out")"
"$LORA" check "$G/adapters/lora_all_r8" --engine onnx 2> /dev/null && fail "unknown engine accepted"

# --- normalize: no mis-scaling left for any engine ---
"$LORA" normalize "$G/adapters/patterns_all_r8" --out "$TMP/norm" > "$TMP/out" || fail "normalize"
grep -q "r = alpha = 8" "$TMP/out" || fail "normalize summary: $(cat "$TMP/out")"
for e in llama.cpp vllm tgi; do
  "$LORA" check "$TMP/norm" --engine $e | grep -q "^mis-scaled" && fail "normalized adapter still mis-scaled for $e"
done
"$LORA" normalize "$G/adapters/patterns_all_r8" --out "$G/adapters/patterns_all_r8" 2> /dev/null && fail "normalize over its input"

# --- GGUF read directly ---
"$LORA" inspect "$G/gguf/rslora_qv_r4.f32.gguf" > "$TMP/out" || fail "inspect of a GGUF adapter"
grep -q "model.layers.1.self_attn.v_proj" "$TMP/out" || fail "inspect GGUF: HF module names"
"$LORA" similarity "$G/gguf/lora_all_r8.f32.gguf" "$G/adapters/lora_all_r8" --json > "$TMP/sim.json" || fail "similarity GGUF vs PEFT"
grep -q "\"mean_phi_delta\": 1.0" "$TMP/sim.json" || grep -q "\"mean_phi_delta\": 0.99999" "$TMP/sim.json" || fail "similarity of an adapter with its GGUF should be 1"
"$LORA" compress "$G/gguf/rslora_qv_r4.f32.gguf" --rank 2 --out "$TMP/c" 2> "$TMP/err" && fail "compress of a llama q/k GGUF without a base should fail"
grep -q "base" "$TMP/err" || fail "compress GGUF message: $(cat "$TMP/err")"

"$LORA" info "$G/gguf/patterns_all_r8.f32.gguf" > "$TMP/out" || fail "info of a GGUF adapter"
# rank 8 everywhere but down_proj (rank_pattern 2); down_proj's lora_a as PEFT's lora_A
F=$G/adapters/patterns_all_r8/adapter_model.safetensors
r8=$(($(fx count "$F" 'lora_A\.weight$') - $(fx count "$F" 'down_proj\.lora_A\.weight$')))
down=$(fx shape "$F" base_model.model.model.layers.0.mlp.down_proj.lora_A.weight)
grep -q "adapter.lora.alpha (FLOAT32) = 8" "$TMP/out" &&
  grep -q "$r8 pair(s) of rank 8: llama.cpp scales them by 1" "$TMP/out" &&
  grep -q "blk.0.ffn_down.weight.lora_a  F32  \[$down\]" "$TMP/out" ||
  fail "info GGUF ($r8, [$down]): $(cat "$TMP/out")"

[ $fails -eq 0 ] && echo "gguf.sh: all passed"
exit $fails
