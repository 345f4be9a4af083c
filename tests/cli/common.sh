# Sourced by every tests/cli/*.sh (not a test itself): `source "$(dirname "$0")/common.sh" "$@"`.
# Arguments: <path to lora> <tests/data>. Sets LORA, DATA, TMP (a scratch folder removed on
# exit), PY (python3), fails = 0 and fail <message> (prints FAIL and counts it).
set -u
LORA=$1
DATA=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
