#!/usr/bin/env bash
# The script of the recorded peers run in docs/performance.md ("Peers on the H200"): gpu-check's
# benchmark half with the peers, fitted into one 300 s device call (no tests, no PEFT), run from
# the repository root on the GPU machine as `bash bench/peers/one-call.sh` with $OUT set. Expects
# .dev/peers/{vllm,bitsandbytes/csrc} (bench/peers/run) and .dev/peers/snap, a `git archive` of
# the commit to measure (CMakeLists.txt cmake include bench scripts) with its short hash in
# snap/COMMIT, so that a shared, moving working tree is not what gets built. scripts/gpu-check
# with LORA_PEERS is the ordinary way; this one exists so that the published run can be redone.
set -u
T0=$SECONDS
R=$PWD
S=$R/.dev/peers/snap
P=$R/.dev/peers
L=/tmp/h7logs
mkdir -p "$L" "$OUT"
export CMAKE_PREFIX_PATH=$R/.dev/thirdparty PATH=$PATH:/usr/local/cuda/bin
left() { echo $((BUDGET - (SECONDS - T0))); }
BUDGET=${BUDGET:-285}
cd "$S" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -1
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  cat COMMIT
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
(cmake -S . -B b -DCMAKE_BUILD_TYPE=Release -DLORA_WITH_CUDA=ON -DLORA_CUDA_COMPILE_ONLY=OFF -DLORA_BUILD_TESTS=OFF \
   -DLORA_BUILD_BENCH=ON -DLORA_BUILD_TOOLS=OFF -DLORA_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES=90-real &&
 cmake --build b --target bench_cuda bench_multi_cuda -j"$(nproc)") >"$L/build.log" 2>&1 &
b1=$!
bash bench/peers/run build "$P" "$OUT" "$L" bp >"$L/peers_build.out" 2>&1 &
b2=$!
# Triton compiles vLLM's kernels into its cache while the C++ builds; the timed run comes later.
PYTHONUNBUFFERED=1 timeout 150 python3 bench/peers/vllm_lora.py "$P/vllm" "$L/vllm_warm.csv" >"$L/vllm_warm.err" 2>&1 &
b3=$!
wait $b1; r1=$?
wait $b2
wait $b3; r3=$?
echo "built at $((SECONDS - T0)) s (ours rc $r1, vLLM warm-up rc $r3)"
[ $r1 = 0 ] || grep -E "error" "$L/build.log" | head -20
cat "$L/peers_build.out"
grep -E "FAILED|Error|error" "$L/vllm_warm.err" | head -10
# The peers first (so that they are measured whatever the time left), then ours.
timeout $(( $(left) > 120 ? 110 : $(left) / 2 )) bash bench/peers/run bench "$P" "$OUT" "$L" bp 2>&1 | tail -70
echo "peers done at $((SECONDS - T0)) s"
[ -x b/bench/cuda/bench_multi_cuda ] && timeout $(( $(left) > 140 ? 70 : $(left) / 2 )) b/bench/cuda/bench_multi_cuda "$OUT/multi.csv" 2>"$L/bench_multi.err"
echo "multi done at $((SECONDS - T0)) s"; grep -E "^T +(256|4096) N +(1|64|512):" "$L/bench_multi.err"
# Mixed batches over an NF4 base (AdapterSet::apply(Nf4Tensor<cuda>, …)) against the NF4 product alone.
[ -x b/bench/cuda/bench_multi_cuda ] && LORA_BENCH_MULTI=nf4 timeout 40 b/bench/cuda/bench_multi_cuda "$OUT/multi_nf4.csv" 2>"$L/bench_multi_nf4.err"
grep -E "^nf4" "$L/bench_multi_nf4.err"
[ -x b/bench/cuda/bench_cuda ] && timeout $(( $(left) - 8 )) b/bench/cuda/bench_cuda "$OUT/ours.csv" 2>"$L/bench_cuda.err"
echo "ours done at $((SECONDS - T0)) s (rc $?)"; grep -E "^decode" "$L/bench_cuda.err" | head -20
python3 scripts/gpu-table.py --peers "$OUT" "$(head -1 "$OUT/env.txt"), commit $(cat COMMIT)" >"$OUT/table_peers.md" 2>&1
cat "$OUT/table_peers.md"
tar -czf "$OUT/logs.tgz" -C /tmp h7logs
