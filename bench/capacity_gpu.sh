#!/bin/bash
# Real-time callers end to end on one GPU host, the server with several front-end processes (bench/NOTES.md),
# 60 s calls, the real `personaplex loadtest` on the same host (its CPU use is in the tables). From the
# repository root, results in $OUT.
#   bash bench/capacity_gpu.sh big [front-end processes, default 6] [load test processes, default 8] [counts] [time limit s]
#       150 FP8 slots (what an H200 holds beside the 7B: 160 do not fit), 150 callers, then 100
#   bash bench/capacity_gpu.sh budget [load test processes, default 8]
#       an H100-sized budget: 64 FP8 slots, 64 callers, 2 front-end processes
OUT=${OUT:-/tmp/capacity_out}
source bench/gpu_host_env.sh
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())"
case "$1" in
big)
  timeout 380 python3 bench/server_capacity.py --kv-dtype fp8 --max-conversations 150 --clients "${4:-150,100}" \
    --duration 60 --front-end-processes "${2:-6}" --processes "${3:-8}" --time-limit "${5:-370}" \
    --json "$OUT/capacity_150.json" > "$OUT/capacity_150.txt" 2>&1
  ;;
budget)
  timeout 200 python3 bench/server_capacity.py --kv-dtype fp8 --max-conversations 64 --clients 64 \
    --duration 60 --front-end-processes 2 --processes "${2:-8}" --time-limit 190 \
    --json "$OUT/capacity_64.json" > "$OUT/capacity_64.txt" 2>&1
  ;;
esac
tail -n 16 "$OUT"/capacity_*.txt
