"""How long a server takes from launch to serving, cold (empty caches) and warm (the caches it left).

    python bench/startup.py --kv-dtype fp8 --max-conversations 64                 # 7B layout, random weights
    python bench/startup.py --kv-dtype fp8 --max-conversations 128 --runs cold
    python bench/startup.py --kernels compile --runs cold,warm                      # PERSONAPLEX_KERNELS
    python bench/startup.py --model demo --device cpu --max-conversations 2 --offline   # quick CPU check

Each run launches the real ``personaplex serve`` in a fresh process whose cache directory
(``XDG_CACHE_HOME``, where the compile cache lives, see ``personaplex.compile_cache``) is empty for the
"cold" run and the one the cold run left for "warm"; no Inductor or Triton cache from elsewhere is
visible to it. It reads the server's ``start-up: <phase> in <s> s`` lines and polls ``/api/health``,
then stops the server. ``--offline`` also times ``personaplex offline`` on a 2-second input with the
warm cache (time to its first frame). Prints one table: rows are phases, columns runs; "after the
weights" is ready minus the end of weight loading (which is disk-bound and reported on its own).
The random 7B checkpoint is written once (``--checkpoint``), as for ``server_capacity.py``.
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
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PHASE = re.compile(r"start-up: (.+?) in ([0-9.]+) s(?: \((.*)\))?\s*$")
FIRST_FRAME = re.compile(r"start-up: first frame ([0-9.]+) s after launch")
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PERSONAPLEX_COMPILE_CACHE")


class Output(threading.Thread):
    """Reads a child's output line by line, stamping each with the seconds since launch."""

    def __init__(self, process: subprocess.Popen, launched: float, log_file):
        super().__init__(daemon=True)
        self.process, self.launched, self.log_file = process, launched, log_file
        self.lines: list[tuple[float, str]] = []
        self.url: str | None = None
        self.listening = threading.Event()

    def run(self) -> None:
        for line in self.process.stdout:
            at = time.perf_counter() - self.launched
            self.lines.append((at, line.rstrip()))
            self.log_file.write(f"{at:8.2f} | {line}")
            self.log_file.flush()
            found = re.search(r"directly at (\S+)", line)
            if found and self.url is None:
                self.url = found.group(1)
                self.listening.set()
        self.listening.set()


def child_env(cache_home: Path, kernels: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env.update(XDG_CACHE_HOME=str(cache_home), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if kernels:
        env["PERSONAPLEX_KERNELS"] = kernels
    return env


def health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def phases(lines: list[tuple[float, str]]) -> list[dict]:
    """Every ``start-up:`` line: phase, its seconds, detail, and when (since launch) it was logged."""
    found = []
    for at, line in lines:
        match = PHASE.search(line)
        if match:
            found.append({"phase": match.group(1), "seconds": float(match.group(2)), "detail": match.group(3) or "",
                          "logged_at": round(at, 2)})
    return found


def serve_once(name: str, command: list[str], env: dict, work: Path, limit: float) -> dict:
    """Launch the server, wait until /api/health answers, stop it; returns the run's phases and times."""
    print(f"[{name}] launching: {' '.join(command[2:])}", flush=True)
    launched = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(work / f"{name}.log", "w") as log_file:
        output = Output(process, launched, log_file)
        output.start()
        result = {"run": name, "ready_seconds": None, "status": "starting"}
        try:
            output.listening.wait(timeout=limit)
            while output.url and not health(output.url) and time.perf_counter() - launched < limit:
                time.sleep(0.05)
            if output.url and health(output.url):
                result["ready_seconds"] = round(time.perf_counter() - launched, 2)
                result["status"] = "ready"
            else:
                result["status"] = "exited" if process.poll() is not None else f"not ready after {limit:.0f} s"
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            output.join(timeout=10)
    result["phases"] = phases(output.lines)
    print(f"[{name}] {result['status']}" + (f" after {result['ready_seconds']} s" if result["ready_seconds"] else ""),
          flush=True)
    if result["status"] != "ready":
        for _, line in output.lines[-30:]:
            print("   |", line, flush=True)
    return result


def offline_once(name: str, flags: list[str], env: dict, work: Path, limit: float) -> dict:
    """``personaplex offline`` on a short input: seconds from launch to its first frame and to its end."""
    import numpy as np
    import sphn

    wav = work / "input.wav"
    sphn.write_wav(str(wav), (0.05 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32), 24000)
    command = [sys.executable, "-m", "personaplex", "offline", *flags, "--input-wav", str(wav),
               "--output-wav", str(work / "out.wav"), "--output-text", str(work / "out.json"), "--batch-size", "1"]
    print(f"[{name}] launching: {' '.join(command[2:])}", flush=True)
    launched = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=limit)
    total = time.perf_counter() - launched
    (work / f"{name}.log").write_text(completed.stdout)
    lines = [(0.0, line) for line in completed.stdout.splitlines()]
    first = next((float(m.group(1)) for _, line in lines if (m := FIRST_FRAME.search(line))), None)
    status = "done" if completed.returncode == 0 else f"exit code {completed.returncode}"
    if completed.returncode:
        print(completed.stdout[-3000:], flush=True)
    return {"run": name, "status": status, "first_frame_seconds": first, "total_seconds": round(total, 2),
            "phases": phases(lines)}


def table(results: list[dict]) -> str:
    """Phases as rows, runs as columns (seconds); the totals last."""
    names = [r["run"] for r in results]
    order: list[str] = []
    for result in results:
        for p in result["phases"]:
            if p["phase"] not in order:
                order.append(p["phase"])
    rows = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for phase in order:
        cells = []
        for result in results:
            seconds = [p["seconds"] for p in result["phases"] if p["phase"] == phase]
            cells.append(f"{sum(seconds):.2f}" if seconds else "")
        rows.append(f"| {phase} | " + " | ".join(cells) + " |")

    def cell(result: dict, key: str) -> str:
        value = result.get(key)
        return f"**{value:.2f}**" if isinstance(value, (int, float)) else ""

    for label, key in (("launch -> /api/health ready", "ready_seconds"), ("after the weights", "after_weights"),
                       ("offline: launch -> first frame", "first_frame_seconds"),
                       ("offline: launch -> exit", "total_seconds")):
        if any(result.get(key) is not None for result in results):
            rows.append(f"| {label} | " + " | ".join(cell(r, key) for r in results) + " |")
    rows.append("| status | " + " | ".join(r["status"] for r in results) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["random", "personaplex", "demo"], default="random",
                        help="random: --preset's layout with random weights (default)")
    parser.add_argument("--preset", default="personaplex-7b", help="layout of the random weights")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kv-dtype", choices=["model", "fp8"], default="fp8")
    parser.add_argument("--max-conversations", type=int, default=64)
    parser.add_argument("--kernels", default=None, help="PERSONAPLEX_KERNELS for the server (default: its own)")
    parser.add_argument("--runs", default="cold,warm", help="cold (empty cache directory), warm (the cold run's)")
    parser.add_argument("--offline", action="store_true", help="also time `personaplex offline` (warm cache)")
    parser.add_argument("--limit", type=float, default=540.0, help="seconds one start may take before it is stopped")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--cache-home", type=Path, help="the runs' cache directory (default: a new, empty one; "
                        "an existing one makes every run warm)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup_bench_"))
    if args.model == "random":
        from server_capacity import random_assets

        model_flags = random_assets(work, args.checkpoint, args.device, args.preset)
    else:
        model_flags = ["--model", args.model]
    model_flags += ["--device", args.device]
    command = [sys.executable, "-m", "personaplex", "serve", "--host", "127.0.0.1", "--port", "0",
               "--max-conversations", str(args.max_conversations), "--kv-dtype", args.kv_dtype, "--max-queue", "0",
               "--static", "none", "--opus-workers", "0", *model_flags]
    cache_home = args.cache_home or work / "cache"  # empty: the cold run fills it, the warm run reuses it
    cache_home.mkdir(parents=True, exist_ok=True)
    results = []
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if run not in ("cold", "warm"):
            parser.error(f"unknown run {run!r}: cold or warm")
        result = serve_once(run, command, child_env(cache_home, args.kernels), work, args.limit)
        weights = next((p for p in result["phases"] if p["phase"].startswith("load model")), None)
        if result["ready_seconds"] is not None and weights is not None:
            result["after_weights"] = round(result["ready_seconds"] - weights["logged_at"], 2)
        results.append(result)
    if args.offline:
        env = child_env(cache_home, args.kernels)
        results.append(offline_once("offline (warm)", model_flags, env, work, args.limit))
    print(f"\nstart-up, {args.preset if args.model == 'random' else args.model}, {args.max_conversations} slots, "
          f"KV {args.kv_dtype}, kernels {args.kernels or 'server default'}, device {args.device} (logs in {work})\n")
    print(table(results), flush=True)
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "results": results}, indent=1))


if __name__ == "__main__":
    main()
