#!/bin/bash
# Long calls on one GPU host (bench/NOTES.md, 2026-12-03): step times with rings just full and with every
# ring wrapped under both context policies, bf16 and FP8 rings, 1 and 64 conversations; the Triton decode
# attention tests (pinned path, any head dim) compiled for the GPU; a per-phase profile of the "triton"
# kernel set's frame. Run from the repository root; results go to $OUT.
#   bash bench/long_context_gpu.sh          # everything above (about 5 minutes)
#   bash bench/long_context_gpu.sh pinned   # only the 64-conversation rows, both policies and ring types
set -o pipefail
OUT=${OUT:-/tmp/long_out}
source bench/gpu_host_env.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "$1" = pinned ]; then
  for kv in fp8 model; do
    timeout 110 python3 bench/engine.py --kernels triton --kv $kv --slots 64 --steps 30 --warmup 5 --no-spread-join \
      --lazy-capture --full-ring --context-policy sliding pin-persona 2>&1 | tee "$OUT/engine_long_${kv}_64.txt"
  done
  exit
fi
PERSONAPLEX_GOLDEN_DIR=$PWD/.golden timeout 180 python3 -m pytest -q tests/layers/test_decode_attention.py tests/engine/test_cuda.py 2>&1 \
  | tail -15 | tee "$OUT/cuda_tests.txt"
for kv in fp8 model; do
  timeout 240 python3 bench/engine.py --kernels triton --kv $kv --slots 1 64 --steps 50 --warmup 10 --no-spread-join \
    --lazy-capture --full-ring --context-policy sliding pin-persona 2>&1 | tee "$OUT/engine_long_$kv.txt"
done
timeout 120 python3 bench/engine.py --kernels triton --kv fp8 --slots 64 --steps 20 --warmup 10 --no-spread-join \
  --lazy-capture --profile 2>&1 | tee "$OUT/engine_profile_triton_fp8_64.txt"
