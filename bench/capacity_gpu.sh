#!/bin/bash
# Real-time callers end to end on one GPU host, the server with several front-end processes (bench/NOTES.md):
# 160 FP8 slots with 150 and 160 callers, then an H100-sized budget of 64 slots with 64 callers; 60 s calls,
# the real `personaplex loadtest` on the same host (its CPU use is in the tables). One 10-minute run; from the
# repository root, results in $OUT.
#   bash bench/capacity_gpu.sh [front-end processes for 160 slots, default 6] [load test processes, default 8]
OUT=${OUT:-/tmp/capacity_out}
source bench/gpu_host_env.sh
FRONT_ENDS=${1:-6}
LOAD=${2:-8}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())"
timeout 380 python3 bench/server_capacity.py --kv-dtype fp8 --max-conversations 160 --clients 150,160 \
  --duration 60 --front-end-processes "$FRONT_ENDS" --processes "$LOAD" --time-limit 370 \
  --json "$OUT/capacity_160.json" > "$OUT/capacity_160.txt" 2>&1
timeout 200 python3 bench/server_capacity.py --kv-dtype fp8 --max-conversations 64 --clients 64 \
  --duration 60 --front-end-processes 2 --processes "$LOAD" --time-limit 190 \
  --json "$OUT/capacity_64.json" > "$OUT/capacity_64.txt" 2>&1
tail -n 16 "$OUT"/capacity_*.txt
