#!/usr/bin/env bash
# Installs the library from the build tree into a temporary prefix, then builds
# a consumer with find_package(lora CONFIG) and another with add_subdirectory.
set -euo pipefail
src=$1 build=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
test -f "$tmp/prefix/include/lora/lora.hpp"
cmake -S "$src/tests/install/consumer" -B "$tmp/b1" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/b1" >/dev/null
"$tmp/b1/consumer"
cmake -S "$src/tests/install/consumer" -B "$tmp/b2" -DLORA_SOURCE_DIR="$src" -DLORA_WITH_CUDA=OFF >/dev/null
cmake --build "$tmp/b2" >/dev/null
# as a subproject, lora builds none of its own tests or tools
test ! -e "$tmp/b2/lora/tests"
"$tmp/b2/consumer"
echo "install + find_package and add_subdirectory: ok"
