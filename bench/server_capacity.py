"""How many simultaneous real-time conversations one server sustains, end to end.

    python bench/server_capacity.py [--clients 1,8,16,24,32,40] [--duration 30] [--kv-dtype fp8 --clients 32,48,64]
    python bench/server_capacity.py --model demo --device cpu --clients 1,2 --duration 3   # quick CPU check
    python bench/server_capacity.py --preset demo --checkpoint /tmp/demo_random.safetensors --device cpu \
        --clients 1 --duration 3                                                           # the random-weights path

Starts the real ``personaplex serve`` (by default the 7B layout with random bf16 weights, a real-size
random Mimi and a synthetic 32,000-piece tokenizer, as in ``offline_throughput.py``; the real
``--model personaplex`` weights work too when available), then for each client count runs the real
``personaplex loadtest`` (real-time Ogg/Opus callers, spread over several processes) and reads the
server's /metrics. A count is *sustained* when every caller finished without error, fewer than 1% of
the agent's frames were late or missing, and the engine skipped no tick.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def random_assets(work: Path, checkpoint: Path, device: str, preset_name: str) -> list[str]:
    """Model flags for a preset's layout with random weights (built once, like offline_throughput.py)."""
    import torch
    from offline_throughput import synthetic_tokenizer
    from safetensors.torch import save_file

    from personaplex.config import get_preset
    from personaplex.demo import synthesize_voice, wav_bytes
    from personaplex.random_weights import random_mimi_state_dict, write_random_lm_checkpoint

    preset = get_preset(preset_name)
    if not checkpoint.exists():
        write_random_lm_checkpoint(preset.lm, checkpoint, dtype=torch.bfloat16, device=device)
    mimi = work / "mimi.safetensors"
    save_file(random_mimi_state_dict(preset.mimi), str(mimi))
    tokenizer = synthetic_tokenizer(work / "tokenizer.model", preset.lm.text_card)
    voices = work / "voices"
    voices.mkdir()
    (voices / "NATF2.wav").write_bytes(wav_bytes(synthesize_voice("NATF2", seconds=10.0)))
    return ["--moshi-weight", str(checkpoint), "--mimi-weight", str(mimi), "--tokenizer", str(tokenizer),
            "--voice-prompt-dir", str(voices)]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "personaplex", "demo"], default="random",
                        help="random: --preset's layout with random weights (default); personaplex: the real "
                             "weights; demo: the built-in demo model")
    parser.add_argument("--preset", default="personaplex-7b", help="layout of the random weights")
    parser.add_argument("--clients", default="1,8,16,24,32,40", help="client counts to try, in order")
    parser.add_argument("--kv-dtype", choices=["model", "fp8"], default="model", help="the server's KV precision")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each caller streams")
    parser.add_argument("--max-conversations", type=int, default=None,
                        help="server slots (default: what fits the GPU; callers past it are refused and counted)")
    parser.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1), help="load test processes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    parser.add_argument("--port", type=int, default=8998)
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="server_capacity_"))
    if args.model == "random":
        model_flags = random_assets(work, args.checkpoint, args.device, args.preset)
    else:
        model_flags = ["--model", args.model]
    slots = ["--max-conversations", str(args.max_conversations)] if args.max_conversations else []
    command = [sys.executable, "-m", "personaplex", "serve", "--host", "127.0.0.1", "--port", str(args.port),
               "--device", args.device, *slots, "--kv-dtype", args.kv_dtype, "--max-queue", "0", "--static", "none",
               *model_flags]
    print("server:", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in server.stdout:
        print("  |", line.rstrip(), flush=True)
        found = re.search(r"directly at (\S+)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        sys.exit("the server did not start")
    print(f"server ready after {time.perf_counter() - started:.1f} s (load + graph capture)", flush=True)
    rows = []
    try:
        for count in counts:
            before = urllib.request.urlopen(url + "/metrics").read().decode()
            report = work / f"load_{count}.json"
            load = [sys.executable, "-m", "personaplex", "loadtest", "--url", url.replace("http", "ws") + "/api/chat",
                    "-n", str(count), "--duration", str(args.duration), "--processes", str(args.processes),
                    "--json", str(report)]
            subprocess.run(load, cwd=ROOT, check=False)
            after = urllib.request.urlopen(url + "/metrics").read().decode()
            results = json.loads(report.read_text()) if report.exists() else []
            ok = sum(r["error"] is None for r in results)
            frames = sum(r["frames"] for r in results)
            expected = sum(r["sent_frames"] for r in results) or 1
            late = sum(r["late"] for r in results)
            missing = sum(r["missing"] for r in results)
            p50 = sorted(r["latency_p50"] or 0 for r in results)[len(results) // 2] if results else 0
            p99 = max((r["latency_p99"] or 0 for r in results), default=0)
            ticks = metric(after, "personaplex_tick_seconds_count") - metric(before, "personaplex_tick_seconds_count")
            tick_time = (metric(after, "personaplex_tick_seconds_sum") - metric(before, "personaplex_tick_seconds_sum"))
            late_ticks = metric(after, "personaplex_late_ticks_total") - metric(before, "personaplex_late_ticks_total")
            skipped = metric(after, "personaplex_skipped_ticks_total") - metric(before, "personaplex_skipped_ticks_total")
            sustained = ok == count and (late + missing) < 0.01 * expected and skipped == 0
            rows.append((count, ok, frames, late / expected, missing / expected, p50, p99,
                         tick_time / max(ticks, 1), late_ticks, skipped, sustained))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print()
    print("| callers | ok | agent frames | late | missing | latency p50 ms | worst p99 ms | mean tick ms "
          "| late ticks | skipped ticks | sustained |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for count, ok, frames, late, missing, p50, p99, tick, late_ticks, skipped, sustained in rows:
        print(f"| {count} | {ok} | {frames} | {late:.2%} | {missing:.2%} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | "
              f"{tick * 1000:.1f} | {late_ticks:.0f} | {skipped:.0f} | {'yes' if sustained else 'no'} |")


if __name__ == "__main__":
    main()
