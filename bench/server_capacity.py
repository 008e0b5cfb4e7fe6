"""How many simultaneous real-time conversations one server sustains, end to end.

    python bench/server_capacity.py [--clients 8,max,24,32] [--duration 20] [--kv-dtype fp8 --clients max,48]
    python bench/server_capacity.py --model demo --device cpu --clients 1,2 --duration 3   # quick CPU check
    python bench/server_capacity.py --kv-dtype fp8 --max-conversations 160 --clients 150,160 \
        --front-end-processes 6 --duration 60                                         # several front-end processes
    python bench/server_capacity.py --preset demo --checkpoint /tmp/demo_random.safetensors --device cpu \
        --clients 1,max --duration 3 --processes 1                                          # the random-weights path

Starts the real ``personaplex serve`` (by default the 7B layout with random bf16 weights, a real-size
random Mimi and a synthetic 32,000-piece tokenizer, as in ``offline_throughput.py``; the real
``--model personaplex`` weights work too when available), makes one short warm-up call (the load
test's persona lands in the prefix cache), then for each client count runs the real ``personaplex
loadtest`` (real-time Ogg/Opus callers, spread over several processes) and reads the server's
/metrics before and after. ``max`` in ``--clients`` is the server's slot count (what fits the GPU
unless ``--max-conversations`` is given); counts run in the order given, the table lists them sorted.

Per count: callers without error, agent frames late (an 80 ms playback buffer ran dry) or missing,
the server's input underruns (ticks that found less than a frame of a caller's audio and used
silence), caller latency (median of the callers' p50, worst caller's p99), the server's engine tick
p50/p99 (from its histogram, interpolated within a bucket), late and skipped ticks. A count is
*sustained* when every caller finished without error, fewer than 1% of the agent's frames were late
or missing, and the engine skipped no tick.

``--time-limit`` bounds the whole run (for a machine lent for a fixed time): a count that would not
finish in the time left is skipped, and a server that is not ready in time is stopped; what was
measured is always printed and, with ``--json``, written after every count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FIRST_OVERHEAD_SECONDS = 15.0  # a count's time beyond --duration (callers' start, joins, tail), until measured

WRITE_CHECKPOINT = """
import os, sys, torch
from personaplex.config import get_preset
from personaplex.random_weights import write_random_lm_checkpoint
preset, path, device = sys.argv[1:]
write_random_lm_checkpoint(get_preset(preset).lm, path + ".partial", dtype=torch.bfloat16, device=device)
os.replace(path + ".partial", path)
"""


def random_assets(work: Path, checkpoint: Path, device: str, preset_name: str) -> list[str]:
    """Model flags for a preset's layout with random weights (built once, like offline_throughput.py)."""
    from offline_throughput import synthetic_tokenizer
    from safetensors.torch import save_file

    from personaplex.config import get_preset
    from personaplex.demo import synthesize_voice, wav_bytes
    from personaplex.random_weights import random_mimi_state_dict

    preset = get_preset(preset_name)
    if not checkpoint.exists():
        # In a child process: the weights drawn on the GPU (and the CUDA context) must not stay allocated
        # in this process, or the server would see that much less free memory and size fewer slots.
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, preset_name, str(checkpoint), device], cwd=ROOT,
                       check=True)
        print(f"random {preset_name} checkpoint written in {time.perf_counter() - started:.1f} s", flush=True)
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


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets [(upper bound, count)], +Inf last."""
    buckets = [(float(le), float(count)) for le, count in
               re.findall(rf'^{re.escape(name)}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)]
    return sorted(buckets)


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """The q-quantile of the observations between two scrapes, interpolated linearly within its bucket
    (as Prometheus' histogram_quantile does); the largest finite bound when it falls in +Inf."""
    counts = dict(before)
    delta = [(le, count - counts.get(le, 0.0)) for le, count in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in delta:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


class ServerOutput(threading.Thread):
    """Echoes the server's output (so that its pipe never fills) and finds its URL and slot count."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.url: str | None = None
        self.slots: int | None = None
        self.ready = threading.Event()  # set when the server listens, or when it exited

    def run(self) -> None:
        for line in self.stream:
            print("  |", line.rstrip(), flush=True)
            found = re.search(r"(\d+) conversation slots", line)
            if found:
                self.slots = int(found.group(1))
            found = re.search(r"directly at (\S+)", line)
            if found and self.url is None:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()


def cpu_seconds(stat_path: Path) -> float:
    """User + system CPU seconds of a process or thread, from its /proc stat line (0 once it is gone)."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_tree(root: int) -> list[int]:
    """root and its descendants (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(parents.get(pid, []))
    return tree


def server_cpu(root: int) -> dict[str, float]:
    """CPU seconds of the server so far: per process of its tree and per thread of its first process (the
    engine's: its busiest thread is the engine thread or the event loop)."""
    return {**{f"process {pid}": cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in process_tree(root)},
            **{f"thread {task.name}": cpu_seconds(task / "stat") for task in Path(f"/proc/{root}/task").glob("*")}}


def cpu_use(before: dict[str, float], after: dict[str, float], seconds: float, root: int) -> dict[str, float]:
    """Cores used between two ``server_cpu`` samples: the whole tree, its first process, its busiest other
    process (a front end or an Opus worker) and the first process's busiest thread."""
    used = {key: (value - before.get(key, 0.0)) / max(seconds, 1e-9) for key, value in after.items()}
    processes = {key: value for key, value in used.items() if key.startswith("process")}
    return {
        "server_cores": sum(processes.values()),
        "engine_process_cores": processes.get(f"process {root}", 0.0),
        "busiest_other_process_cores": max((v for k, v in processes.items() if k != f"process {root}"), default=0.0),
        "busiest_engine_thread_cores": max((v for k, v in used.items() if k.startswith("thread")), default=0.0),
    }


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


def run_load(
    url: str, count: int, duration: float, processes: int, report: Path, timeout: float,
) -> tuple[float, float]:
    """One ``personaplex loadtest`` run; returns its wall time and the CPU seconds it used (all its processes:
    the load generator shares the host, and a saturated one would measure itself, not the server)."""
    command = [sys.executable, "-m", "personaplex", "loadtest", "--url", url.replace("http", "ws") + "/api/chat",
               "-n", str(count), "--duration", str(duration), "--processes", str(min(processes, count)),
               "--json", str(report), "--max-missing", "100", "--max-late", "100"]  # measured here, not judged
    started = time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = subprocess.Popen(command, cwd=ROOT)
    try:
        load.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        print(f"load test of {count} callers still running after {timeout:.0f} s: stopped", flush=True)
        load.terminate()
        try:
            load.wait(10)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - started, (used.ru_utime - children.ru_utime) + (used.ru_stime - children.ru_stime)


def measure(count: int, results: list[dict], before: str, after: str, seconds: float, cpu: dict[str, float]) -> dict:
    """One row of the table from the load test's per-caller results and the server's metrics."""
    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    ok = sum(r["error"] is None for r in results)
    expected = sum(r["sent_frames"] for r in results)
    late = sum(r["late"] for r in results)
    missing = sum(r["missing"] for r in results)
    errors = sorted({r["error"] for r in results if r["error"]})
    ticks = delta("personaplex_tick_seconds_count")
    tick_before = histogram(before, "personaplex_tick_seconds")
    tick_after = histogram(after, "personaplex_tick_seconds")
    skipped = delta("personaplex_skipped_ticks_total")
    p50s = sorted(r["latency_p50"] for r in results if r["latency_p50"] is not None)
    row = {
        "callers": count,
        "ok": ok,
        "refused": delta("personaplex_conversations_refused_total"),
        "sent_frames": expected,
        "agent_frames": sum(r["frames"] for r in results),
        "late_frames": late,
        "missing_frames": missing,
        "late": late / max(expected, 1),
        "missing": missing / max(expected, 1),
        "underruns": delta("personaplex_input_underrun_frames_total"),
        "latency_p50": p50s[len(p50s) // 2] if p50s else None,
        "latency_p99_worst": max((r["latency_p99"] for r in results if r["latency_p99"] is not None), default=None),
        "join_seconds_max": max((r["join_seconds"] for r in results if r["join_seconds"] is not None), default=None),
        "ticks": ticks,
        "tick_mean": delta("personaplex_tick_seconds_sum") / max(ticks, 1),
        "tick_p50": histogram_quantile(0.50, tick_before, tick_after),
        "tick_p99": histogram_quantile(0.99, tick_before, tick_after),
        "late_ticks": delta("personaplex_late_ticks_total"),
        "skipped_ticks": skipped,
        "seconds": round(seconds, 1),
        "errors": errors[:3],
        **{key: round(value, 2) for key, value in cpu.items()},
    }
    row["sustained"] = bool(count and ok == count and expected and (late + missing) < 0.01 * expected and skipped == 0)
    return row


def format_table(result: dict) -> str:
    def ms(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value * 1000:.{digits}f}"

    header = ("| callers | ok | late | missing | underruns | latency p50 ms | worst p99 ms | tick p50 ms | tick p99 ms "
              "| late ticks | skipped ticks | sustained |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(result["rows"], key=lambda r: r["callers"]):
        lines.append(
            f"| {row['callers']} | {row['ok']} | {row['late']:.2%} | {row['missing']:.2%} | {row['underruns']:.0f} | "
            f"{ms(row['latency_p50'])} | {ms(row['latency_p99_worst'])} | {ms(row['tick_p50'], 1)} | "
            f"{ms(row['tick_p99'], 1)} | {row['late_ticks']:.0f} | {row['skipped_ticks']:.0f} | "
            f"{'yes' if row['sustained'] else 'no'} |")
    lines.append("")
    lines.append(f"CPU cores used ({os.cpu_count()} on the host), averaged over each count's run:")
    lines.append("| callers | load test | server, all processes | engine process | its busiest thread "
                 "| busiest front end / Opus worker |")
    lines.append("|---|---|---|---|---|---|")
    for row in sorted(result["rows"], key=lambda r: r["callers"]):
        lines.append(f"| {row['callers']} | {row.get('loadtest_cores', 0):.2f} | {row.get('server_cores', 0):.2f} | "
                     f"{row.get('engine_process_cores', 0):.2f} | {row.get('busiest_engine_thread_cores', 0):.2f} | "
                     f"{row.get('busiest_other_process_cores', 0):.2f} |")
    best = result.get("largest_sustained")
    slots = result.get("slots")
    lines.append("")
    lines.append(f"largest sustained: {f'{best} callers' if best is not None else 'none'} "
                 f"({slots} slots, KV {result['kv_dtype']}, {result['duration']:g} s calls); "
                 f"server ready after {result['server_ready_seconds']} s; status: {result['status']}")
    if result.get("skipped"):
        lines.append(f"not run (time limit): {', '.join(str(c) for c in result['skipped'])} callers")
    return "\n".join(lines)


def parse_counts(text: str) -> list[str]:
    counts = [c.strip() for c in text.split(",") if c.strip()]
    for count in counts:
        if count != "max" and not (count.isdigit() and int(count) > 0):
            raise argparse.ArgumentTypeError(f"--clients takes positive numbers and 'max', got {count!r}")
    return counts


def main() -> None:
    began = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "personaplex", "demo"], default="random",
                        help="random: --preset's layout with random weights (default); personaplex: the real "
                             "weights; demo: the built-in demo model")
    parser.add_argument("--preset", default="personaplex-7b", help="layout of the random weights")
    parser.add_argument("--clients", type=parse_counts, default=parse_counts("1,8,16,24,32,max"),
                        help="client counts to try, in this order ('max': the server's slots)")
    parser.add_argument("--kv-dtype", choices=["model", "fp8"], default="model", help="the server's KV precision")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each caller streams")
    parser.add_argument("--warm-up", type=float, default=2.0,
                        help="seconds of one caller before the counts, not measured (0: none)")
    parser.add_argument("--max-conversations", type=int, default=None,
                        help="server slots (default: what fits the GPU; callers past it are refused and counted)")
    parser.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1), help="load test processes")
    parser.add_argument("--front-end-processes", type=int, default=1, metavar="N",
                        help="the server's --front-end-processes: the engine in one process, the connections in N "
                             "others (default 1: one server process)")
    parser.add_argument("--opus-workers", type=int, default=None,
                        help="the server's --opus-workers (default: the server's; with N front-end processes they "
                             "are divided among them)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole run, start included: counts that would not fit are skipped")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (after every count)")
    args = parser.parse_args()
    # SIGTERM (a time limit around this script) ends it like Ctrl-C: the server is stopped, results kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def left() -> float:
        return math.inf if args.time_limit is None else args.time_limit - (time.monotonic() - began)

    result = {"model": args.model, "preset": args.preset if args.model == "random" else args.model,
              "kv_dtype": args.kv_dtype, "device": args.device, "duration": args.duration,
              "front_end_processes": args.front_end_processes,
              "clients": ",".join(args.clients), "slots": None, "server_ready_seconds": None, "status": "starting",
              "rows": [], "skipped": [], "largest_sustained": None}

    def save() -> None:
        sustained = [row["callers"] for row in result["rows"] if row["sustained"]]
        result["largest_sustained"] = max(sustained, default=None)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")

    work = Path(tempfile.mkdtemp(prefix="server_capacity_"))
    if args.model == "random":
        model_flags = random_assets(work, args.checkpoint, args.device, args.preset)
    else:
        model_flags = ["--model", args.model]
    slots = ["--max-conversations", str(args.max_conversations)] if args.max_conversations else []
    front_ends = ["--front-end-processes", str(args.front_end_processes)]
    if args.opus_workers is not None:
        front_ends += ["--opus-workers", str(args.opus_workers)]
    command = [sys.executable, "-m", "personaplex", "serve", "--host", "127.0.0.1", "--port", str(args.port),
               "--device", args.device, *slots, *front_ends, "--kv-dtype", args.kv_dtype, "--max-queue", "0",
               "--static", "none",
               *model_flags]
    print("server:", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ServerOutput(server.stdout)
    output.start()
    try:
        output.ready.wait(timeout=None if math.isinf(left()) else max(0.0, left()))
        url = output.url
        if url is None:
            result["status"] = ("the server exited before it was ready" if output.ready.is_set() else  # output ended
                                f"the server was not ready after {time.perf_counter() - started:.0f} s (time limit)")
            print(result["status"], flush=True)
            save()
            sys.exit(1)
        result["server_ready_seconds"] = round(time.perf_counter() - started, 1)
        result["slots"] = output.slots
        print(f"server ready after {result['server_ready_seconds']} s (load, compilation, graph capture, warm-up "
              f"join); {output.slots} slots", flush=True)
        result["status"] = "running"
        save()
        if args.warm_up > 0 and left() > args.warm_up + args.duration + FIRST_OVERHEAD_SECONDS:
            print(f"warm-up call ({args.warm_up:g} s, not measured)", flush=True)
            run_load(url, 1, args.warm_up, 1, work / "warm_up.json", min(left(), args.warm_up + 60))
        overhead = FIRST_OVERHEAD_SECONDS
        for spec in args.clients:
            count = output.slots if spec == "max" else int(spec)
            if any(row["callers"] == count for row in result["rows"]):
                continue
            if server.poll() is not None:
                result["status"] = f"the server exited (code {server.returncode})"
                break
            if left() < args.duration + overhead:
                print(f"{count} callers skipped: {left():.0f} s left, a count takes ~{args.duration + overhead:.0f} s",
                      flush=True)
                result["skipped"].append(count)
                continue
            report = work / f"load_{count}.json"
            before, cpu_before = scrape(url), server_cpu(server.pid)
            seconds, load_cpu = run_load(url, count, args.duration, args.processes, report, left())
            after, cpu_after = scrape(url), server_cpu(server.pid)
            cpu = {"loadtest_cores": load_cpu / seconds, **cpu_use(cpu_before, cpu_after, seconds, server.pid)}
            overhead = max(overhead, seconds - args.duration)
            results = json.loads(report.read_text()) if report.exists() else []
            row = measure(count, results, before, after, seconds, cpu)
            result["rows"].append(row)
            save()
            print(f"{count} callers: {row['ok']} ok, late {row['late']:.2%}, missing {row['missing']:.2%}, "
                  f"tick p99 {1000 * (row['tick_p99'] or 0):.1f} ms, skipped ticks {row['skipped_ticks']:.0f}: "
                  f"{'sustained' if row['sustained'] else 'NOT sustained'} ({seconds:.0f} s)", flush=True)
        if result["status"] == "running":
            result["status"] = "partial (time limit)" if result["skipped"] else "complete"
    finally:
        if result["status"] in ("starting", "running"):
            result["status"] = "interrupted"
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        output.join(5)
        save()
        if result["rows"]:
            print()
            print(format_table(result), flush=True)
    if not result["rows"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
