#!/usr/bin/env bash
# lora info: an adapter folder's config, contents and tensors; a plain file's tensors.
# Called as: bash info.sh <lora binary> <tests/data>
source "$(dirname "$0")/common.sh" "$@"
P=$DATA/peft
out=$("$LORA" info "$P/modules_to_save_lm_head_embed/adapter") || fail "info on a modules_to_save adapter"
for want in "PEFT LORA adapter" "PEFT version    0.21.0" "r 8  alpha 16" "targets         q_proj, v_proj" \
    "modules_to_save lm_head, embed_tokens" "4 adapted (0 embedding), 2 whole tensors" \
    "3,584 LoRA (A, B)" "16,384 whole tensors" "lm_head.weight (modules_to_save) replaces the base's" \
    "base_model.model.lm_head.weight *F32 *\[128, 64\] *32,768"; do
  echo "$out" | grep -q -- "$want" || fail "modules_to_save adapter: output lacks '$want'"
done
out=$("$LORA" info "$P/embedding_lora/adapter") || fail "info on an embedding adapter"
echo "$out" | grep -q "3 adapted (1 embedding)" || fail "embedding module not counted"
out=$("$LORA" info "$P/trainable_tokens_tied/adapter") || fail "info on a trainable-tokens adapter"
echo "$out" | grep -q "trainable tokens input embedding: 3 ids" || fail "trainable tokens not shown"
out=$("$LORA" info "$P/lora_r16_bf16_saved/adapter/adapter_model.safetensors") || fail "info on a file"
echo "$out" | grep -q "16 tensors, 14,336 parameters, 28,672 bytes" || fail "file totals: $out"
"$LORA" info "$P/nope" > /dev/null 2> /tmp/info_err.$$ && fail "a missing folder must fail"
grep -q "no such file" /tmp/info_err.$$ || fail "missing folder message: $(cat /tmp/info_err.$$)"
rm -f /tmp/info_err.$$
if [ $fails -ne 0 ]; then
  echo "$fails failure(s)"
  exit 1
fi
echo "info.sh: all passed"
