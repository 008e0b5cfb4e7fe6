"""Scale-out over several GPUs: real-time conversations sustained by N replicas versus one, how sessions
spread over the replicas, frame times per replica, and what a killed replica does to live sessions.

    python bench/scaleout.py                                   # every GPU of this host, 7B layout, random bf16
    python bench/scaleout.py --phases one --clients-per-gpu 32,48,64     # split a long run over commands
    python bench/scaleout.py --phases all,kill --clients-per-gpu 32,48,64
    python bench/scaleout.py --model demo --device cpu --replicas 2 --slots 2 --clients-per-gpu 1,2 \
        --duration 12 --kill-clients-per-gpu 1 --processes 1 # quick CPU check

Starts the real ``personaplex scale serve`` (by default the 7B layout with random bf16 weights, a real-size
random Mimi and a synthetic tokenizer, as ``server_capacity.py`` does) and drives it with the real
``personaplex loadtest`` from this host; per-replica figures come from the Ray cluster
(``personaplex.scaleout.stats``). Phases:

- ``one``: one replica (one GPU); for each count c of ``--clients-per-gpu``, c callers.
- ``all``: ``--replicas`` replicas (default: every GPU); for each c, replicas x c callers. A count is
  *sustained* when every caller finished without error, fewer than 1% of the agent's frames were late
  or missing, and no replica skipped a tick. Reported per replica: conversations it took, tick p50/p99/max.
- ``kill``: replicas x k callers stream for ``--kill-duration`` s; halfway, the replica holding the most
  conversations is killed (its process, ``ray.kill``). Reported: which callers ended early (expected:
  exactly the killed replica's), the others' late/missing frames, where new callers started right after
  the kill went, and how long Serve took to bring up a replacement replica.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FRAME_SECONDS = 0.08


def log(message: str) -> None:
    print(message, flush=True)


class Deployment:
    """``personaplex scale serve`` in a subprocess, and this process attached to its Ray cluster."""

    def __init__(self, args: argparse.Namespace, model_flags: list[str], replicas: int, stats_window: float):
        self.command = [sys.executable, "-m", "personaplex", "scale", "serve", "--host", "127.0.0.1",
                        "--port", str(args.port), "--device", args.device, "--replicas", str(replicas),
                        "--max-conversations", str(args.slots), "--max-queue", str(args.max_queue),
                        "--kv-dtype", args.kv_dtype, "--static", "none", "--stats-window", str(stats_window),
                        *(["--gpus-per-replica", "0"] if args.device == "cpu" else []), *model_flags]
        self.replicas = replicas
        self.url = f"ws://127.0.0.1:{args.port}/api/chat"
        self.process = None

    def __enter__(self):
        import ray

        log("deploy: " + " ".join(self.command[2:]))
        started = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env, start_new_session=True)
        for line in self.process.stdout:
            if "ready" in line or "error" in line.lower():
                log("  | " + line.rstrip()[:300])
            if "Access the Web UI" in line:
                break
        else:
            sys.exit("the deployment did not start")
        self.ready_seconds = time.perf_counter() - started
        log(f"{self.replicas} replicas ready after {self.ready_seconds:.1f} s (Ray start, load, graph capture)")
        # Keep draining its output so that the pipe never blocks it.
        import threading

        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        for _ in range(2):  # first signal: drain; second: stop now
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                time.sleep(3)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def stats_by_replica() -> dict[str, dict]:
    from personaplex.scaleout.stats import replica_stats

    return {row["replica"]: row for row in replica_stats() if "error" not in row}


def proxy_cpu_seconds() -> float:
    """CPU seconds used so far by Serve's HTTP proxy processes on this host (every conversation's messages
    pass through one of them: a possible bottleneck, so it is measured)."""
    total = 0.0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ProxyActor" not in cmdline.read_bytes():
                continue
            fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_load(url: str, clients: int, duration: float, processes: int, report: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "personaplex", "loadtest", "--url", url, "-n", str(clients),
               "--duration", str(duration), "--processes", str(max(1, min(processes, clients))),
               "--json", str(report), "--max-missing", "100", "--max-late", "100"]  # measured here, not judged
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_level(deployment: Deployment, clients: int, args: argparse.Namespace, work: Path) -> dict:
    """``clients`` callers for ``--duration`` s; per-replica figures sampled near the end, under load."""
    before = stats_by_replica()
    report = work / f"load_{deployment.replicas}x_{clients}.json"
    load = start_load(deployment.url, clients, args.duration, args.processes, report)
    time.sleep(4.0)  # past the joins
    proxy_start, proxy_clock = proxy_cpu_seconds(), time.monotonic()
    time.sleep(max(1.0, args.duration - 5.0))  # the replicas' window covers the loaded part of the run
    proxy_share = (proxy_cpu_seconds() - proxy_start) / (time.monotonic() - proxy_clock)
    during = stats_by_replica()
    output, _ = load.communicate()
    results = json.loads(report.read_text()) if report.exists() else []
    expected = sum(r["sent_frames"] for r in results) or 1
    late = sum(r["late"] for r in results)
    missing = sum(r["missing"] for r in results)
    ok = sum(r["error"] is None for r in results)
    replicas = []
    for name, row in sorted(during.items()):
        prior = before.get(name, {})
        replicas.append({
            "replica": name.rsplit("#", 1)[-1], "device": row["device"],
            "conversations": row["conversations_opened"] - prior.get("conversations_opened", 0),
            "busy_under_load": row["slots_busy"], "tick_p50_ms": row["tick_p50_ms"], "tick_p99_ms": row["tick_p99_ms"],
            "tick_max_ms": row["tick_max_ms"],
            "late_ticks": row["late_ticks_total"] - prior.get("late_ticks_total", 0),
            "skipped_ticks": row["skipped_ticks_total"] - prior.get("skipped_ticks_total", 0),
        })
    skipped = sum(r["skipped_ticks"] for r in replicas)
    latencies = sorted(r["latency_p99"] or 0 for r in results)
    level = {
        "replicas": deployment.replicas, "callers": clients, "ok": ok, "late_share": late / expected,
        "missing_share": missing / expected, "worst_latency_p99_ms": 1000 * (latencies[-1] if latencies else 0),
        "skipped_ticks": skipped, "per_replica": replicas, "proxy_cpu_share": proxy_share,
        "sustained": ok == clients and (late + missing) < 0.01 * expected and skipped == 0,
    }
    if ok < clients:
        level["errors"] = sorted({r["error"] for r in results if r["error"]})[:5]
        log(output[-2000:])
    return level


def level_table(levels: list[dict]) -> str:
    header = ("| replicas | callers | ok | late | missing | worst caller p99 ms | skipped ticks | sustained "
              "| sessions per replica | tick p99 ms per replica | proxy CPU (cores) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        spread = " / ".join(str(r["conversations"]) for r in lv["per_replica"])
        p99 = " / ".join("-" if r["tick_p99_ms"] is None else f"{r['tick_p99_ms']:.1f}" for r in lv["per_replica"])
        lines.append(f"| {lv['replicas']} | {lv['callers']} | {lv['ok']} | {lv['late_share']:.2%} | "
                     f"{lv['missing_share']:.2%} | {lv['worst_latency_p99_ms']:.0f} | {lv['skipped_ticks']} | "
                     f"{'yes' if lv['sustained'] else 'no'} | {spread} | {p99} | {lv['proxy_cpu_share']:.2f} |")
    return "\n".join(lines)


def kill_phase(deployment: Deployment, args: argparse.Namespace, work: Path) -> dict:
    import ray

    from personaplex.scaleout.stats import replica_actor

    per_gpu = args.kill_clients_per_gpu or max(1, args.slots // 2)
    clients = deployment.replicas * per_gpu
    report = work / "kill.json"
    load = start_load(deployment.url, clients, args.kill_duration, args.processes, report)
    time.sleep(args.kill_duration / 2)
    before = stats_by_replica()
    victim, victim_row = max(before.items(), key=lambda item: item[1]["slots_busy"])
    log(f"killing replica {victim} (pid {victim_row['pid']}, {victim_row['slots_busy']} live conversations)")
    killed_at = time.monotonic()
    ray.kill(replica_actor(victim), no_restart=True)
    replacement: dict = {}

    def watch_replacement() -> None:  # when Serve's replacement answers, whatever the load is doing
        deadline = killed_at + args.replacement_timeout
        while time.monotonic() < deadline:
            fresh = set(stats_by_replica()) - set(before)
            if fresh:
                replacement.update(name=fresh.pop(), seconds=time.monotonic() - killed_at)
                return
            time.sleep(0.5)

    import threading

    watcher = threading.Thread(target=watch_replacement, daemon=True)
    watcher.start()
    time.sleep(3.0)
    after_kill = stats_by_replica()
    # Callers arriving after the kill (as the killed replica's callers would when they reconnect).
    newcomers = min(victim_row["slots_busy"], sum(r["slots_free"] for r in after_kill.values())) or 1
    new_report = work / "kill_newcomers.json"
    newcomers_started = time.monotonic() - killed_at
    new_load = start_load(deployment.url, newcomers, 10.0, args.processes, new_report)
    new_load.communicate()
    after_new = stats_by_replica()
    load.communicate()
    watcher.join()
    results = json.loads(report.read_text()) if report.exists() else []
    full = args.kill_duration / FRAME_SECONDS
    ended_early = [r for r in results if r["error"] is not None or r["sent_frames"] < 0.9 * full]
    kept = [r for r in results if r not in ended_early]
    kept_expected = sum(r["sent_frames"] for r in kept) or 1
    new_results = json.loads(new_report.read_text()) if new_report.exists() else []
    landed = {name.rsplit("#", 1)[-1]: row["conversations_opened"] - after_kill.get(name, {}).get("conversations_opened", 0)
              for name, row in after_new.items()}
    return {
        "replicas": deployment.replicas, "callers": clients, "killed": victim.rsplit("#", 1)[-1],
        "killed_live_conversations": victim_row["slots_busy"], "ended_early": len(ended_early),
        "others": len(kept), "others_late_share": sum(r["late"] for r in kept) / kept_expected,
        "others_missing_share": sum(r["missing"] for r in kept) / kept_expected,
        "others_with_error": sum(r["error"] is not None for r in kept),
        "survivors_busy_after_kill": {n.rsplit("#", 1)[-1]: r["slots_busy"] for n, r in after_kill.items()},
        "newcomers": newcomers, "newcomers_started_after_kill_seconds": newcomers_started, "newcomers_ok": sum(r["error"] is None and r["frames"] > 0 for r in new_results),
        "newcomers_landed_on": landed,
        "replacement": replacement.get("name", "none").rsplit("#", 1)[-1],
        "replacement_ready_seconds": replacement.get("seconds"),
        "only_its_own_ended": len(ended_early) == victim_row["slots_busy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "personaplex", "demo"], default="random",
                        help="random: --preset's layout with random weights (default); personaplex: the real "
                             "weights; demo: the built-in demo model")
    parser.add_argument("--preset", default="personaplex-7b", help="layout of the random weights")
    parser.add_argument("--device", default="cuda", help="cuda (one GPU per replica) or cpu")
    parser.add_argument("--replicas", type=int, default=None, help="replicas of the 'all' phase (default: every GPU)")
    parser.add_argument("--slots", type=int, default=64, help="conversation slots per replica (default 64)")
    parser.add_argument("--kv-dtype", choices=["model", "fp8"], default="model")
    parser.add_argument("--clients-per-gpu", default="32,48,64", help="caller counts per replica to try, in order")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each caller streams per count")
    parser.add_argument("--phases", default="one,all,kill", help="which of one, all, kill to run (default all three)")
    parser.add_argument("--kill-clients-per-gpu", type=int, default=None,
                        help="callers per replica in the kill phase (default: half the slots, leaving room for "
                             "the killed replica's callers on the others)")
    parser.add_argument("--kill-duration", type=float, default=40.0, help="seconds the kill phase's callers stream")
    parser.add_argument("--replacement-timeout", type=float, default=120.0,
                        help="how long to wait for Serve to replace the killed replica (default 120 s)")
    parser.add_argument("--max-queue", type=int, default=64, help="callers waiting in the proxy for a slot")
    parser.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1), help="load test processes")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--json", type=Path, default=None, help="write every result here as JSON (after each phase)")
    args = parser.parse_args()
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases <= {"one", "all", "kill"}:
        sys.exit(f"--phases takes one, all, kill; got {args.phases!r}")
    counts = [int(n) for n in args.clients_per_gpu.split(",")]
    if args.replicas is None:
        import torch

        args.replicas = torch.cuda.device_count() if args.device != "cpu" else 2
    if args.replicas < 1:
        sys.exit("no GPU found: give --device cpu --replicas N, or run on a machine with GPUs")
    work = Path(tempfile.mkdtemp(prefix="scaleout_"))
    if args.model == "random":
        from server_capacity import random_assets

        model_flags = random_assets(work, args.checkpoint, "cuda" if args.device != "cpu" else "cpu", args.preset)
    else:
        model_flags = ["--model", args.model]
    window = max(5.0, args.duration - 5.0)  # skip the joins at the start of each count
    results: dict = {"replicas": args.replicas, "slots": args.slots, "model": args.model, "preset": args.preset,
                     "duration": args.duration}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")

    if "one" in phases:
        with Deployment(args, model_flags, 1, window) as deployment:
            results["one"] = [run_level(deployment, c, args, work) for c in counts]
        log(level_table(results["one"]))
        save()
    if phases & {"all", "kill"}:
        with Deployment(args, model_flags, args.replicas, window) as deployment:
            results["ready_seconds"] = deployment.ready_seconds
            if "all" in phases:
                results["all"] = []
                for c in counts:
                    results["all"].append(run_level(deployment, args.replicas * c, args, work))
                    log(level_table(results["all"][-1:]))
                    save()
            if "kill" in phases:
                results["kill"] = kill_phase(deployment, args, work)
                save()
    print()
    if "one" in results or "all" in results:
        print(level_table(results.get("one", []) + results.get("all", [])))
        best_one = max((lv["callers"] for lv in results.get("one", []) if lv["sustained"]), default=0)
        best_all = max((lv["callers"] for lv in results.get("all", []) if lv["sustained"]), default=0)
        if best_one and best_all:
            print(f"\nsustained: {best_one} on one GPU, {best_all} on {args.replicas}: "
                  f"{best_all / (best_one * args.replicas):.0%} of linear")
    if "kill" in results:
        print("\nkill:", json.dumps(results["kill"], indent=1))
    print(f"\n(work folder {work})")


if __name__ == "__main__":
    sys.exit(main())
