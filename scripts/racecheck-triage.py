#!/usr/bin/env python3
"""racecheck-triage.py LOG: reads a compute-sanitizer racecheck log of the CUDA tests and
exits 0 when the tests passed, the sanitizer itself did not fail, and every hazard it
reported lies in cuBLAS's Hopper GEMM kernels (names with "nvjet"), which order shared memory
through mbarriers and the async proxy that racecheck does not follow (docs/reliability.md).
Prints one line: hazards in total, in cuBLAS, in ours."""
import re
import sys

text = open(sys.argv[1], errors="replace").read().splitlines()
ours, cublas = [], 0
i = 0
while i < len(text):
    line = text[i]
    if re.search(r"hazard detected|Race reported", line):
        block = [line]
        j = i + 1
        while j < len(text) and text[j].startswith("=========     "):
            block.append(text[j])
            j += 1
        if any("nvjet" in b for b in block):
            cublas += 1
        else:
            ours.append("\n".join(block))
        i = j
        continue
    i += 1
internal = any("Internal Sanitizer Error" in l for l in text)
passed = any(l.startswith("All tests passed") for l in text)
print(f"racecheck: {cublas + len(ours)} hazards, {cublas} in cuBLAS (nvjet), {len(ours)} in ours;"
      f" tests {'passed' if passed else 'FAILED'}{'; sanitizer internal error' if internal else ''}")
for b in ours[:5]:
    print(b)
sys.exit(0 if passed and not internal and not ours else 1)
