# Sourced by every tests/cli/*.sh (not a test itself): `source "$(dirname "$0")/common.sh" "$@"`.
# Arguments: <path to lora> <tests/data> <path to fixture_facts>. Sets LORA, DATA, TMP (a scratch folder removed on
# exit), PY (python3), fails = 0 and fail <message> (prints FAIL and counts it); fx and grouped
# (below) read expected counts and sizes from the fixtures.
set -u
LORA=$1
DATA=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

# Facts of a fixture read from its own files, so that an expectation follows the fixture's
# shapes (tests also run on held-out fixtures of other sizes) instead of one fixture's numbers
# (tests/support/fixture_facts.cpp, the third argument):
#   fx count  FILE REGEX   tensors of a safetensors file whose name matches REGEX (a search)
#   fx numel  FILE REGEX   their elements, summed
#   fx bytes  FILE REGEX   their data bytes, summed
#   fx shape  FILE NAME    a tensor's shape as "d0, d1"
#   fx layers FILE         distinct <i> of its layers.<i>. names
#   fx json   FILE KEY     a top-level integer of a JSON file (config.json)
# A count or size of 0 is an error (on stderr, with nothing on stdout), so that an expectation
# built from it fails instead of being trivially met. grouped N prints N as 1,234 (lora's tables).
FACTS=${3:?"usage: <test>.sh <path to lora> <tests/data> <path to fixture_facts>"}
fx() { "$FACTS" "$@"; }
grouped() {
  local n=$1 out=""
  while [ ${#n} -gt 3 ]; do out=",${n: -3}$out"; n=${n:0:${#n}-3}; done
  echo "$n$out"
}
