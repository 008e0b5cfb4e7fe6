#!/bin/bash
# The fast-start measurements of the "triton" set (hand-written kernels, nothing compiled) on one GPU host,
# in two parts that each fit a 10-minute run (bench/NOTES.md). Run from the repository root; results in $OUT.
#   bash bench/fast_start_gpu.sh a   # step speed + kernel count (1 and 64 conversations, FP8 rings), cold and
#                                    # warm start with 64 slots and offline's first frame; the persona-flood
#                                    # bench on 12 of the host's cores meanwhile (the demo model on the CPU)
#   bash bench/fast_start_gpu.sh b   # cold start with 128 slots, then the GPU tests of the kernels
#   bash bench/fast_start_gpu.sh c   # one call: step speed + profile, the GPU tests of the kernels, cold start
#                                    # with 128 slots (the host otherwise quiet)
OUT=${OUT:-/tmp/fast_start_out}
source bench/gpu_host_env.sh
cores=$(nproc)
GPU="taskset -c $((cores - 4))-$((cores - 1))"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
case "$1" in
a)
  ( taskset -c 0-$((cores - 5)) env OUT="$OUT" bash bench/hardening_quiet_host.sh persona_flood \
      > "$OUT/hardening.log" 2>&1 ) &
  $GPU timeout 200 python3 bench/engine.py --kernels triton --kv fp8 --slots 1 64 --steps 100 --warmup 30 \
    --no-spread-join --profile > "$OUT/engine_triton.txt" 2>&1
  $GPU timeout 240 python3 bench/startup.py --kernels triton --runs cold,warm --offline \
    --json "$OUT/startup_triton_64.json" > "$OUT/startup_triton_64.txt" 2>&1
  wait
  ;;
b)
  $GPU timeout 150 python3 bench/startup.py --kernels triton --runs cold --max-conversations 128 \
    --json "$OUT/startup_triton_128.json" > "$OUT/startup_triton_128.txt" 2>&1
  PERSONAPLEX_GOLDEN_DIR=$PWD/.golden $GPU timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/layers/test_fused_ops.py tests/lm/test_sampling_kernel.py tests/lm/test_sampling.py tests/engine/test_cuda.py > "$OUT/gpu_tests.txt" 2>&1
  tail -3 "$OUT/gpu_tests.txt"
  ;;
c)
  $GPU timeout 170 python3 bench/engine.py --kernels triton --kv fp8 --slots 1 64 --steps 100 --warmup 30 \
    --no-spread-join --profile > "$OUT/engine_triton.txt" 2>&1
  PERSONAPLEX_GOLDEN_DIR=$PWD/.golden $GPU timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/layers/test_fused_ops.py tests/lm/test_sampling_kernel.py tests/engine/test_cuda.py -k "not compile" > "$OUT/gpu_tests.txt" 2>&1
  # Last, so that a run cut short keeps the rest: the 128-slot cold start.
  $GPU timeout 110 python3 bench/startup.py --kernels triton --runs cold --max-conversations 128 \
    --json "$OUT/startup_triton_128.json" > "$OUT/startup_triton_128.txt" 2>&1
  ;;
esac
tail -n 4 "$OUT"/*.txt
