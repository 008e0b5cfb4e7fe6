#!/bin/bash
# Start-up and step-speed measurements of the kernel sets on one GPU host, in two parts that each fit a
# 10-minute run (bench/NOTES.md, 2026-12-02). Run from the repository root; results go to $OUT.
#   bash bench/startup_gpu.sh a   # "triton" kernels: cold/warm start (64 FP8 slots), offline, step speed, 128 slots
#   bash bench/startup_gpu.sh b   # "compile" kernels: cold and warm start, step speed; the CUDA tests
set -o pipefail
OUT=${OUT:-/tmp/startup_out}
source bench/gpu_host_env.sh
python3 -c "import torch, triton, sphn, aiohttp; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
free -g | head -2
ENGINE="bench/engine.py --kv fp8 --slots 1 64 --steps 100 --warmup 30 --no-spread-join"
case "$1" in
a)
  python3 bench/startup.py --kernels triton --runs cold,warm --offline --json "$OUT/startup_triton_64.json" 2>&1 \
    | tee "$OUT/startup_triton_64.txt"
  python3 $ENGINE --kernels triton 2>&1 | tee "$OUT/engine_triton.txt"
  python3 bench/startup.py --kernels triton --runs cold --max-conversations 128 --json "$OUT/startup_triton_128.json" 2>&1 \
    | tee "$OUT/startup_triton_128.txt"
  ;;
b)
  python3 bench/startup.py --kernels compile --runs cold,warm --cache-home /tmp/compile_cache --limit 330 \
    --json "$OUT/startup_compile_64.json" 2>&1 | tee "$OUT/startup_compile_64.txt"
  XDG_CACHE_HOME=/tmp/compile_cache timeout 150 python3 $ENGINE --kernels compile 2>&1 | tee "$OUT/engine_compile.txt"
  PERSONAPLEX_GOLDEN_DIR=$PWD/.golden timeout 120 python3 -m pytest -q tests/engine/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
  ;;
esac
