#!/usr/bin/env bash
# lora diff: an adapter against itself (0), against a combination of it (PEFT's ties result),
# modules on one side, the SVG heatmap. Called as: bash diff.sh <lora binary> <tests/data> <fixture_facts>
source "$(dirname "$0")/common.sh" "$@"
FX=$DATA/peft/combos_ext/adapters
n=$(fx count "$FX/a1/adapter_model.safetensors" 'lora_A\.weight$')  # a1's modules (a2's are the same)

"$LORA" diff "$FX/a1" "$FX/a1" > "$TMP/self" 2>&1 || fail "self: $(cat "$TMP/self")"
grep -q "$n shared modules, largest relative difference \([0-9.]*e-1[5-9]\|0.0000e+00\)" "$TMP/self" \
  || fail "self diff: $(tail -1 "$TMP/self")"
"$LORA" diff "$FX/a1" "$FX/a2" --svg "$TMP/h.svg" --json > "$TMP/j" 2>&1 || fail "a1 a2: $(cat "$TMP/j")"
grep -q '<svg' "$TMP/h.svg" || fail "no svg"
[ "$(grep -c '<title>' "$TMP/h.svg")" -eq "$n" ] || fail "svg does not have $n cells"
grep -q '"rel_fro"' "$TMP/j" || fail "json lacks rel_fro"
# modules on one side: q_proj only
"$LORA" extract --base "$DATA/peft/lora_r8_a16_all/base" --tuned "$DATA/peft/lora_r8_a16_all/merged.safetensors" \
  --rank 8 --only q_proj --quiet --out "$TMP/q" > /dev/null 2>&1 || fail "extract q"
"$LORA" diff "$DATA/peft/lora_r8_a16_all/adapter" "$TMP/q" > "$TMP/one" 2>&1 || fail "one side: $(cat "$TMP/one")"
F=$DATA/peft/lora_r8_a16_all/adapter/adapter_model.safetensors
q=$(fx count "$F" 'q_proj\.lora_A\.weight$') all=$(fx count "$F" 'lora_A\.weight$')
grep -q "$q shared modules" "$TMP/one" || fail "shared count ($q): $(tail -1 "$TMP/one")"
[ "$(grep -c '^only in A' "$TMP/one")" -eq $((all - q)) ] || fail "only-in-A count ($((all - q)))"
# the svg is never written over an input
"$LORA" diff "$FX/a1" "$FX/a2" --svg "$FX/a1/adapter_model.safetensors" > /dev/null 2> "$TMP/err" && fail "svg over input accepted"
[ $fails -eq 0 ] && echo "diff: all passed"
exit $((fails > 0))
