#!/usr/bin/env bash
# scripts/racecheck-triage.py on synthetic compute-sanitizer racecheck logs: it must pass a log
# whose hazards all lie in cuBLAS's nvjet kernels (tests passed), and fail one with a hazard
# in any other kernel, one whose tests failed, and one where the sanitizer itself failed.
# Usage: bash racecheck_triage.sh <repo root>. Exit 77 (skipped) without python3.
set -u
root=${1:?repo root}
command -v python3 > /dev/null || { echo "skipped: no python3"; exit 77; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
triage() { python3 "$root/scripts/racecheck-triage.py" "$1" > "$T/out.txt"; }
fail() { echo "FAIL: $*"; cat "$T/out.txt" 2> /dev/null; exit 1; }

nvjet='========= Error: Race reported between Write access at nvjet_sm90_tst_64x8_64x16_2x4_h_bz_TNT+0x1a0
=========     and Read access at nvjet_sm90_tst_64x8_64x16_2x4_h_bz_TNT+0x2b0 [12 hazards]
========= '
ours='========= Error: Race reported between Write access at void lora::detail::nf4_stream_kernel<__nv_bfloat16>(...)+0x3bd0
=========     and Read access at void lora::detail::nf4_stream_kernel<__nv_bfloat16>(...)+0x5e90 [208 hazards]
========= '
passed='All tests passed (708 assertions in 9 test cases)'

printf '%s\n%s\n%s\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n' "$nvjet" "$nvjet" "$passed" > "$T/cublas.log"
triage "$T/cublas.log" || fail "cuBLAS-only hazards must pass"
grep -q "2 hazards, 2 in cuBLAS (nvjet), 0 in ours" "$T/out.txt" || fail "counts of the cuBLAS-only log"

printf '%s\n%s\n%s\n' "$nvjet" "$ours" "$passed" > "$T/ours.log"
triage "$T/ours.log" && fail "a hazard in our kernel must fail"
grep -q "1 in ours" "$T/out.txt" || fail "counts of the log with our hazard"
grep -q "nf4_stream_kernel" "$T/out.txt" || fail "our hazard must be printed"

printf '%s\ntest cases: 9 | 8 passed | 1 failed\n' "$nvjet" > "$T/testfail.log"
triage "$T/testfail.log" && fail "failed tests must fail"

printf '========= Internal Sanitizer Error: The Sanitizer failed to handle a hardware exception.\n%s\n' "$passed" \
  > "$T/internal.log"
triage "$T/internal.log" && fail "an internal sanitizer error must fail"

printf '%s\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n' "$passed" > "$T/clean.log"
triage "$T/clean.log" || fail "a clean log must pass"
echo "racecheck-triage: ok"
