"""Timing one conversation's frames through the engine, shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch


def time_one_conversation(engine, prompt, sampling, warmup: int, steps: int) -> list[float]:
    """Join ``prompt`` in slot 0, capture the graphs the run needs, then wall-clock milliseconds per frame
    (each ``step`` waits for its outputs, as a real-time tick does)."""
    engine.join(0, 1, prompt, sampling)
    engine.capture_graphs(up_to_frames=prompt.num_steps + warmup + steps + 8)
    pcm = 0.05 * torch.randn(1, 1920, generator=torch.Generator().manual_seed(1))
    for _ in range(warmup):
        engine.step(pcm)
    return time_steps(engine, pcm, steps)


def time_steps(engine, pcm: torch.Tensor, steps: int) -> list[float]:
    """Wall-clock milliseconds of ``steps`` engine steps (each waits for its outputs)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step(pcm)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
