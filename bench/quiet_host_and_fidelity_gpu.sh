#!/bin/bash
# One GPU-host call: the hardening benches on 12 of the host's cores (quiet: nothing else runs there) while
# bench/fidelity.py uses the GPU and the other 4 cores; then the pinned CUDA-graph tests. Results in $OUT.
OUT=${OUT:-/tmp/quiet_out}
source bench/gpu_host_env.sh
cores=$(nproc)
( taskset -c 0-$((cores - 5)) env OUT="$OUT" bash bench/hardening_quiet_host.sh > "$OUT/hardening.log" 2>&1 ) &
taskset -c $((cores - 4))-$((cores - 1)) timeout 500 python3 bench/fidelity.py --steps 200 ${FIDELITY_PATHS:+--paths $FIDELITY_PATHS} \
  --json "$OUT/fidelity.json" > "$OUT/fidelity.txt" 2>&1
wait
PERSONAPLEX_GOLDEN_DIR=$PWD/.golden timeout 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py -k pinned \
  > "$OUT/cuda_pinned.txt" 2>&1
tail -5 "$OUT/cuda_pinned.txt"
