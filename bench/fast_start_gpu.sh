#!/bin/bash
# One GPU-host call for the fast-start work and the hardening benches (bench/NOTES.md, 2026-12-03):
# the hardening benches on 12 of the host's cores, while the other 4 drive the GPU: step speed and kernel
# count of the "triton" set (1 and 64 conversations, FP8 rings), a cold 64-slot start, then the GPU tests of
# the hand-written kernels. Run from the repository root; results in $OUT.
OUT=${OUT:-/tmp/fast_start_out}
source bench/gpu_host_env.sh
cores=$(nproc)
( taskset -c 0-$((cores - 5)) env OUT="$OUT" bash bench/hardening_quiet_host.sh > "$OUT/hardening.log" 2>&1 ) &
GPU="taskset -c $((cores - 4))-$((cores - 1))"
$GPU timeout 200 python3 bench/engine.py --kernels triton --kv fp8 --slots 1 64 --steps 100 --warmup 30 \
  --no-spread-join --profile > "$OUT/engine_triton.txt" 2>&1
$GPU timeout 120 python3 bench/startup.py --kernels triton --runs cold --json "$OUT/startup_triton_64.json" \
  > "$OUT/startup_triton_64.txt" 2>&1
PERSONAPLEX_GOLDEN_DIR=$PWD/.golden $GPU timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_sampling.py tests/test_sampling_kernel.py tests/test_fused_ops.py tests/test_cuda.py -x > "$OUT/gpu_tests.txt" 2>&1
wait
tail -3 "$OUT/gpu_tests.txt"
