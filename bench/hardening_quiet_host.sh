#!/bin/bash
# The hardening benches on a quiet many-core host (the GPU host's CPUs; the demo model runs on the CPU):
# attacks with an ordinary caller beside them, then persona floods. Results go to $OUT (bench/NOTES.md).
#   bash bench/hardening_quiet_host.sh                 # both
#   bash bench/hardening_quiet_host.sh persona_flood   # only the persona floods (or: attacks)
set -o pipefail
BENCHES=${1:-"attacks persona_flood"}
OUT=${OUT:-/tmp/hardening_out}
source bench/gpu_host_env.sh
echo "cores $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/host.txt"
if [[ " $BENCHES " == *" attacks "* ]]; then
  timeout 240 python3 bench/attacks.py --duration 12 --log "$OUT/attacks_server.log" 2>&1 | tee "$OUT/attacks.txt"
fi
if [[ " $BENCHES " == *" persona_flood "* ]]; then
  timeout 290 python3 bench/persona_flood.py --phase-seconds 15 --attackers 4 \
    --server-args --max-conversations 2 --max-queue 0 2>&1 | tee "$OUT/persona_flood.txt"
fi
echo "load after $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/host.txt"
