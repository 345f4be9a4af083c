#!/usr/bin/env bash
# lora plan: exact counts, JSON output, a config.json file, and clean errors.
source "$(dirname "$0")/common.sh" "$@"
check() { eval "$2" || fail "$1"; }

out=$("$LORA" plan llama-3-8b --rank 64 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --json)
check "llama-3-8b r64 all seven" '[[ "$out" == *"\"trainable_parameters\": 167772160"* ]]'
out=$("$LORA" plan llama-3.1-8b --rank 16 --targets q_proj,k_proj,v_proj,o_proj --json)
check "llama-3.1-8b r16 attention" '[[ "$out" == *"\"trainable_parameters\": 13631488"* ]]'
out=$("$LORA" plan llama-2-7b --rank 8 --targets q_proj,v_proj)
check "table output" '[[ "$out" == *"trainable parameters  4,194,304"* ]]'
# a real config.json file (the fixtures' tiny Llama: hidden 64, 2 layers, 2 KV heads)
cat > "$TMP/config.json" <<'JSON'
{"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": false}
JSON
out=$("$LORA" plan "$TMP" --rank 8 --targets all-linear --json)
# per layer: q (64+64)8 + k (64+32)8 + v (64+32)8 + o (64+64)8 + 2x(64+176)8 + (176+64)8 = 9344
check "config.json folder" '[[ "$out" == *"\"trainable_parameters\": 18688"* ]]'

# more families (issue 19): gemma2, phi3's fused projections, mixtral's experts
cat > "$TMP/phi3.json" <<'JSON'
{"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128}
JSON
out=$("$LORA" plan "$TMP/phi3.json" --rank 8 --targets qkv_proj,gate_up_proj --json)
# per layer: qkv (64+192)8 + gate_up (64+256)8 = 4608
check "phi3 fused projections" '[[ "$out" == *"\"trainable_parameters\": 9216"* ]]'
cat > "$TMP/mixtral.json" <<'JSON'
{"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "num_local_experts": 4}
JSON
out=$("$LORA" plan "$TMP/mixtral.json" --rank 8 --targets w1,w2,w3 --json)
# per layer: 4 experts x 3 x (64+128)8 = 18432
check "mixtral experts" '[[ "$out" == *"\"trainable_parameters\": 36864"* ]]'
cat > "$TMP/gemma2.json" <<'JSON'
{"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128}
JSON
"$LORA" plan "$TMP/gemma2.json" --rank 8 --targets q_proj > /dev/null 2>&1; check "gemma2 config" '[ $? -eq 0 ]'
echo '{"model_type": "falcon"}' > "$TMP/falcon.json"
"$LORA" plan "$TMP/falcon.json" 2>"$TMP/e"; check "unknown family exit 1" '[ $? -eq 1 ]'
check "unknown family named" 'grep -q "falcon.*not supported" "$TMP/e"'

# errors: exit 1, one line on stderr
for args in "nosuchmodel" "llama-3-8b --rank 0" "llama-3-8b --alpha abc" "llama-3-8b --targets qkv" "llama-3-8b --quant nf3" "llama-3-8b --bogus 1"; do
  "$LORA" plan $args >"$TMP/o" 2>"$TMP/e"; rc=$?
  check "error exit for '$args'" '[ $rc -eq 1 ]'
  check "one stderr line for '$args'" '[ "$(wc -l < "$TMP/e")" -eq 1 ]'
done
echo '{"model_type": "llama", "hidden_size": 64' > "$TMP/bad.json"
"$LORA" plan "$TMP/bad.json" 2>"$TMP/e"; check "invalid json exit 1" '[ $? -eq 1 ]'
check "invalid json message" 'grep -q "not valid JSON" "$TMP/e"'
[ $fails -eq 0 ] && echo "plan.sh: all passed"
exit $((fails > 0))
