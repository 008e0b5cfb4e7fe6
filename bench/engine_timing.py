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


def parts_of_a_frame(engine, pcm: torch.Tensor | None = None) -> dict:
    """Each part of a frame of the engine's live slots as a function of nothing, on the engine's own state
    (what the kernel count and the GPU profile time one by one); ``pcm`` [B, 1920]: the input (default silence)."""
    from personaplex.lm.sampling import TokenSampling

    batch, length = engine._bucket()
    model, device = engine.generator.model, engine.device
    gen_state, lm_state = engine.gen_state.slots(0, batch), engine.lm_state.slots(0, batch)
    encoder, decoder = engine.encoder.slots(0, batch), engine.decoder.slots(0, batch)
    positions = gen_state.offset.clamp(max=length - 1)
    x = torch.randn(batch, 1, model.config.dim, device=device, dtype=model.dtype)
    kernels = engine.kernels.lm
    sampling = TokenSampling.fill(batch, 0.8, 250, device)
    seed = torch.zeros(batch, dtype=torch.long, device=device)
    depth_steps = engine.config.agent_codebooks
    tokens = torch.zeros(batch, model.config.dep_q + 1, dtype=torch.long, device=device)
    pcm = torch.zeros(batch, 1920, device=device) if pcm is None else pcm
    frame, _ = engine._frame_fn(batch, length)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    return {
        "Mimi encode": lambda: engine.mimi.encode_frame(pcm, encoder, engine.kernels.codec),
        "LM embed": lambda: kernels.embed(torch.zeros(batch, 1, 1 + model.config.n_q, dtype=torch.long, device=device)),
        f"temporal ({model.config.num_layers} layers)": lambda: model.transformer(
            x, positions, lm_state.keys, lm_state.values, length, lm_state.key_scales, lm_state.value_scales,
            kernels=kernels, pinned=lm_state.pinned),
        "out norm + text head": lambda: model.text_linear(model.out_norm(x)),
        f"depth ({depth_steps} steps) + sampling": lambda: kernels.forward_depth(
            x[:, 0], tokens[:, 0], torch.full((batch, depth_steps), -1, device=device), depth_steps, sampling, seed,
            seed),
        "Mimi decode": lambda: engine.mimi.decode_frame(tokens[:, 1:1 + depth_steps], decoder, engine.kernels.codec),
        "whole frame (all of the above + glue)": lambda: frame(pcm, active),
    }
