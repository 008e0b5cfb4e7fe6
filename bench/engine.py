"""The batched engine at full size: frame step time vs number of conversations, joins, memory.

    python bench/engine.py [--preset personaplex-7b] [--slots 1 8 16 32] [--steps 100]

For each number N of conversations: an engine with N slots (7B random bf16 weights in the real
layout, real-size Mimi), every slot joined with the same persona (10 s voice + 60 text tokens; the
first join prefills, the others copy from the prefix cache), then N conversations stepped together.
A step is one 80 ms frame for all of them: Mimi encode + LM + Mimi decode + copy of tokens and audio
to the host, timed by wall clock. Also: a join (new persona, and from the cache) timed right after a
step while the other slots are live, i.e. the time a tick would take that admits a newcomer.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.engine import Engine, SamplingConfig  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.persona import VoicePrompt, build_system_prompt  # noqa: E402
from personaplex.random_weights import random_mimi, write_random_lm_checkpoint  # noqa: E402
from engine_timing import p99, parts_of_a_frame, time_steps  # noqa: E402

GIB = 2**30
TICK_MARGIN = 0.005  # seconds kept free at the end of a tick, as the serving hub keeps


CUDA = torch.cuda.is_available()
# --profile counts GPU kernels; on a CPU (a dry run of the script) it counts operators.
PROFILED = torch.profiler.ProfilerActivity.CUDA if CUDA else torch.profiler.ProfilerActivity.CPU
KERNELS = torch.autograd.DeviceType.CUDA if CUDA else torch.autograd.DeviceType.CPU


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=70, help="steps before timing (crosses the first ring-length bucket)")
    parser.add_argument("--join-chunk", type=int, default=None, help="prompt frames per prefill block of a spread join")
    parser.add_argument("--kv", choices=["model", "fp8"], default="model", help="KV ring storage: model dtype or FP8")
    parser.add_argument("--kernels", choices=["compile", "triton", "eager"], default="compile",
                        help="the engine's kernel set (personaplex.engine.kernels)")
    parser.add_argument("--position", type=int, default=None,
                        help="move every conversation to this frame before timing (e.g. 2990: full-ring reads)")
    parser.add_argument("--no-spread-join", action="store_true", help="skip the real-time join measurement")
    parser.add_argument("--profile", action="store_true", help="count the kernels of one frame (run outside a graph)")
    parser.add_argument("--lazy-capture", action="store_true",
                        help="capture (and compile) only the graphs the run meets, during warm-up, not every bucket")
    parser.add_argument("--join-slack-ms", type=float, default=0.0,
                        help="let a join's prefill blocks run this far into the next tick (its outputs then come later "
                             "but still count as on time while within 80 ms of its due time; the hub uses 0)")
    parser.add_argument("--full-ring", action="store_true",
                        help="also time steps with every conversation at the end of its context (whole ring read) "
                             "and with every ring wrapped (two and a half contexts in)")
    parser.add_argument("--context-policy", nargs="+", choices=["sliding", "pin-persona"], default=["sliding"],
                        help="what conversations keep past the context; several: a table row per policy and size")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")  # the CPU only for a dry run with a small preset
    preset = get_preset(args.preset)
    if not args.checkpoint.exists():
        write_random_lm_checkpoint(preset.lm, args.checkpoint, dtype=torch.bfloat16, device=device.type)
    lm = load_lm(args.checkpoint, preset.lm, device=device, dtype=torch.bfloat16 if CUDA else torch.float32)
    mimi = random_mimi(preset.mimi, device)
    weights = allocated()
    generator = torch.Generator().manual_seed(0)

    def persona(seed: int):
        g = torch.Generator().manual_seed(seed)
        voice = VoicePrompt("random", codes=torch.randint(0, 2048, (125, 8), generator=g))
        return build_system_prompt(preset.lm, voice, torch.randint(4, preset.lm.text_card, (60,), generator=g).tolist())

    prompt = persona(1)
    print(f"device {torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, preset {preset.name}; "
          f"weights + Mimi {weights / GIB:.2f} GiB; prompt {prompt.num_steps} frames; KV rings: {args.kv}; "
          f"kernels: {args.kernels}; position: {args.position or 'natural'}")
    rows, ring_rows = [], []
    for policy in args.context_policy:
        for slots in args.slots:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                row, rings = measure(lm, mimi, slots, prompt, persona, generator, args, policy)
            except torch.OutOfMemoryError:
                print(f"N={slots}: out of GPU memory")
                break
            rows.append((policy, row))
            if rings:
                ring_rows.append((policy, slots, *rings))
            print(f"N={slots} ({policy}): p50 {row[1]:.2f} ms, p99 {row[2]:.2f} ms", flush=True)
            print(f"  row: | {policy} " + table_row(*row), flush=True)  # kept if a later size is cut short

    print("\n| context policy | conversations | step p50 ms | step p99 ms | real-time factor (N x 80 ms / p50) | first join ms "
          "(incl. compile/capture) | join new persona ms | join from cache ms | state GiB/slot | peak GiB | "
          "real-time join: tick latency p50 / max ms | missed ticks | ms until live |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, row in rows:
        print(f"| {policy} " + table_row(*row))
    if ring_rows:
        print("\n| context policy | conversations | rings just full: step p50 / p99 ms | every ring wrapped: p50 / p99 ms "
              "| wrapped vs full |")
        print("|---|---|---|---|---|")
        for policy, slots, full, wrapped in ring_rows:
            print(f"| {policy} | {slots} | {statistics.median(full):.2f} / {p99(full):.2f} | "
                  f"{statistics.median(wrapped):.2f} / {p99(wrapped):.2f} | "
                  f"{statistics.median(wrapped) / statistics.median(full) - 1:+.1%} |")


def table_row(slots, p50, p99_ms, first, new, cached, per_slot, peak, tick, missed, latency) -> str:
    return (f"| {slots} | {p50:.2f} | {p99_ms:.2f} | {slots * 80 / p50:.1f}x | {first:.1f} | {new:.1f} | {cached:.1f} | "
            f"{per_slot:.2f} | {peak:.1f} | {tick} | {missed} | {latency} |")


def measure(lm, mimi, slots, prompt, persona, generator, args, policy: str = "sliding") -> tuple:
    """One row of the table: N conversations stepping together under the context ``policy``; and the step
    times with rings just full and wrapped (``--full-ring``), else None."""
    before = allocated()
    engine = Engine(lm, mimi, max_slots=slots, kv_dtype=args.kv, kernels=args.kernels)
    if args.join_chunk:
        engine.join_chunk_frames = args.join_chunk
    state_bytes = allocated() - before
    sampling = SamplingConfig(seed=5)
    sync()
    t0 = time.perf_counter()
    engine.join(0, 1, prompt, sampling, context_policy=policy)
    sync()
    first_join = 1000 * (time.perf_counter() - t0)
    for slot in range(1, slots):
        engine.join(slot, slot + 1, prompt, sampling, context_policy=policy)
    pcm = 0.05 * torch.randn(slots, 1920, generator=generator)
    if args.position:
        # Timing only: pretend every conversation is this far in (its ring is read up to there).
        for slot in range(slots):
            engine._offsets[slot] = args.position
        engine.gen_state.offset.fill_(args.position)
    # As a server would at start-up: every graph this run can need, captured before timing, and one
    # join run the live way (first-use costs of the prefill's shapes).
    start_frame = args.position or prompt.num_steps
    t0 = time.perf_counter()
    captured = 0 if args.lazy_capture else engine.capture_graphs(up_to_frames=start_frame + args.warmup + args.steps + 40)
    print(f"N={slots}: {captured} CUDA graphs captured in {time.perf_counter() - t0:.1f} s (first use compiles)", flush=True)
    if slots > 1:
        engine.leave(slots - 1)
        engine.warm_up_join(persona(999))
        engine.join(slots - 1, slots, prompt, sampling, context_policy=policy)
        if args.position:
            engine._offsets[slots - 1] = args.position
            engine.gen_state.offset[slots - 1] = args.position
    for _ in range(args.warmup):
        engine.step(pcm)
    if args.profile:
        profile_frame(engine, pcm)
    times = time_steps(engine, pcm, args.steps)
    # Joins while the others are live: leave the last slot, re-join it (new persona, then cached).
    join_new, join_cached = [], []
    for kind, samples in (("new", join_new), ("cached", join_cached)):
        for attempt in range(3):
            engine.leave(slots - 1)
            engine.step(pcm)
            fresh = persona(100 + attempt) if kind == "new" else prompt
            sync()
            t0 = time.perf_counter()
            engine.join(slots - 1, slots, fresh, sampling, context_policy=policy)
            sync()
            samples.append(1000 * (time.perf_counter() - t0))
    ticks, missed, latency = real_time_joins(engine, pcm, persona, sampling, slots, slack=args.join_slack_ms / 1000) \
        if not args.no_spread_join else ([], 0, [])
    rings = None
    if args.full_ring:  # last: it moves every conversation to the end of its context, then past it
        context = engine.config.context
        full = ring_times(engine, pcm, args.steps, context - 5 - args.steps)
        wrapped = ring_times(engine, pcm, args.steps, 2 * context + context // 2)
        rings = full, wrapped
        print(f"N={slots} full ring: p50 {statistics.median(full):.2f} ms, p99 {p99(full):.2f} ms; "
              f"wrapped: p50 {statistics.median(wrapped):.2f} ms, p99 {p99(wrapped):.2f} ms", flush=True)
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    return (slots, statistics.median(times), p99(times), first_join,
            statistics.median(join_new), statistics.median(join_cached), state_bytes / slots / GIB, peak / GIB,
            f"{statistics.median(ticks):.1f} / {max(ticks):.1f}" if ticks else "-", missed if ticks else "-",
            f"{statistics.median(latency):.0f}" if latency else "-"), rings


def ring_times(engine, pcm, steps: int, position: int) -> list[float]:
    """Step times with every conversation moved to ``position``: near the end of the context attention
    reads whole rings (4-minute conversations); past it, the rings have wrapped. Timing only: ring
    contents are whatever is there."""
    for slot in range(engine.max_slots):
        engine._offsets[slot] = position
    engine.gen_state.offset.fill_(position)
    for _ in range(5):  # captures the full-length graph (and the pinning one, for pin-persona slots)
        engine.step(pcm)
    return time_steps(engine, pcm, steps)


def profile_frame(engine, pcm) -> None:
    """Kernels one whole frame launches (the same code a graph replays), and where GPU time goes."""
    from torch.profiler import profile

    batch, length = engine._bucket()
    frame, _ = engine._frame_fn(batch, length)
    active = torch.tensor(engine.active[:batch], device=engine.device)
    with torch.inference_mode():
        frame(pcm[:batch].to(engine.device), active)
        sync()
        with profile(activities=[PROFILED]) as prof:
            frame(pcm[:batch].to(engine.device), active)
            sync()
    kernels = [e for e in prof.events() if e.device_type == KERNELS]
    total = sum(e.device_time for e in kernels) / 1000
    print(f"N={batch}: one frame = {len(kernels)} kernels, {total:.2f} ms of kernel time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(f"N={batch}: kernel time by phase (CUDA events around each part, outside a graph):")
    for phase, ms, count in phase_times(engine, pcm[:batch].to(engine.device)):
        print(f"  {phase:<34} {ms:7.3f} ms  {count:5d} kernels")


def phase_times(engine, pcm):
    """GPU time and kernel count of each part of a frame, each part run and profiled on its own."""
    from torch.profiler import profile

    parts = parts_of_a_frame(engine, pcm)
    results = []
    with torch.inference_mode():
        for phase, run in parts.items():
            run()
            sync()
            with profile(activities=[PROFILED]) as prof:
                run()
                sync()
            events = [e for e in prof.events() if e.device_type == KERNELS]
            results.append((phase, sum(e.device_time for e in events) / 1000, len(events)))
    return results


def real_time_joins(engine, pcm, persona, sampling, slots, attempts: int = 3, period: float = 0.080, slack: float = 0.0):
    """New personas join the last slot while the others talk, paced as the serving hub paces it.

    A tick starts every 80 ms: the live slots' step (its outputs fetched: their latency is the tick's),
    then prefill blocks of the newcomer while the time left in the tick fits one more (a moving
    average of their cost, as the hub does); ``slack`` lets them run that far into the next tick. A tick
    is missed when its outputs arrive more than 80 ms after it was due. Returns (tick latencies ms, missed ticks, ms from the join request until the
    newcomer is live).
    """
    ticks, latency, missed = [], [], 0
    blocks, estimate = [], 0.0
    for attempt in range(attempts):
        engine.leave(slots - 1)
        engine.step(pcm)
        sync()
        start = due = time.perf_counter()
        engine.begin_join(slots - 1, slots, persona(200 + attempt), sampling)
        while not engine.active[slots - 1]:
            engine.step(pcm)
            ticks.append(1000 * (time.perf_counter() - due))
            missed += ticks[-1] > 1000 * period
            while not engine.active[slots - 1] and due + period + slack - time.perf_counter() - TICK_MARGIN > estimate:
                began = time.perf_counter()
                engine.advance_joins(frame_budget=1)  # one block; returns once it ran on the device
                blocks.append(time.perf_counter() - began)
                estimate = blocks[-1] if len(blocks) == 1 else 0.8 * estimate + 0.2 * blocks[-1]
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))
        latency.append(1000 * (time.perf_counter() - start))
        for _ in range(3):  # the newcomer's first ticks
            engine.step(pcm)
            ticks.append(1000 * (time.perf_counter() - due))
            missed += ticks[-1] > 1000 * period
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))
    sync()
    ms = [1000 * b for b in blocks]
    print(f"  prefill blocks of {engine.join_chunk_frames} frames ({'CUDA graphs, scratch slot' if engine.scratch_prefill else 'in place'}):"
          f" {len(ms)} run, p50 {statistics.median(ms):.1f} / max {max(ms):.1f} ms", flush=True)
    return ticks, missed, latency

if __name__ == "__main__":
    main()
