#!/usr/bin/env bash
# lora info: an adapter folder's config, contents and tensors; a plain file's tensors.
# Called as: bash info.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
P=$DATA/peft
out=$("$LORA" info "$P/modules_to_save_lm_head_embed/adapter") || fail "info on a modules_to_save adapter"
# counts and sizes from the adapter file itself: its q/v pairs, factor and whole-tensor elements
F=$P/modules_to_save_lm_head_embed/adapter/adapter_model.safetensors
LM=base_model.model.lm_head.weight
adapted=$(fx count "$F" 'lora_A\.weight$')
lora_params=$(grouped "$(fx numel "$F" 'lora_[AB]\.weight$')")
whole_params=$(grouped "$(fx numel "$F" '^base_model\.model\.(lm_head|model\.embed_tokens)\.weight$')")
for want in "PEFT LORA adapter" "PEFT version    0.21.0" "r 8  alpha 16" "targets         q_proj, v_proj" \
    "modules_to_save lm_head, embed_tokens" "$adapted adapted (0 embedding), 2 whole tensors" \
    "$lora_params LoRA (A, B)" "$whole_params whole tensors" "lm_head.weight (modules_to_save) replaces the base's" \
    "$LM *F32 *\[$(fx shape "$F" $LM)\] *$(grouped "$(fx bytes "$F" "^$LM\$")")"; do
  echo "$out" | grep -q -- "$want" || fail "modules_to_save adapter: output lacks '$want'"
done
out=$("$LORA" info "$P/embedding_lora/adapter") || fail "info on an embedding adapter"
F=$P/embedding_lora/adapter/adapter_model.safetensors  # q_proj of each layer and the embedding
adapted=$(($(fx count "$F" 'lora_A\.weight$') + $(fx count "$F" 'lora_embedding_A$')))
echo "$out" | grep -q "$adapted adapted (1 embedding)" || fail "embedding module not counted ($adapted): $out"
out=$("$LORA" info "$P/trainable_tokens_tied/adapter") || fail "info on a trainable-tokens adapter"
echo "$out" | grep -q "trainable tokens input embedding: 3 ids" || fail "trainable tokens not shown"
out=$("$LORA" info "$P/lora_r16_bf16_saved/adapter/adapter_model.safetensors") || fail "info on a file"
F=$P/lora_r16_bf16_saved/adapter/adapter_model.safetensors
totals="$(fx count "$F" .) tensors, $(grouped "$(fx numel "$F" .)") parameters, $(grouped "$(fx bytes "$F" .)") bytes"
echo "$out" | grep -q "$totals" || fail "file totals ($totals): $out"
"$LORA" info "$P/nope" > /dev/null 2> /tmp/info_err.$$ && fail "a missing folder must fail"
grep -q "no such file" /tmp/info_err.$$ || fail "missing folder message: $(cat /tmp/info_err.$$)"
rm -f /tmp/info_err.$$
if [ $fails -ne 0 ]; then
  echo "$fails failure(s)"
  exit 1
fi
echo "info.sh: all passed"
