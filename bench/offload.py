"""CPU offload on the GPU: host link bandwidth, the up-front estimate, and the measured frame time.

    python bench/offload.py [--offload 16] [--quantize none int8] [--steps 60]

Measures the pinned host-to-device bandwidth first and prints the estimate the offline tool prints,
then for each weight storage (bf16, int8): the 7B LM (random bf16 weights in the real layout, written
once to --checkpoint) loaded with its last --offload temporal layers in pinned host memory, streamed
through two staging buffers with prefetch on a side stream; one conversation in the engine, whole
frame (Mimi encode, LM, Mimi decode, copy out) replayed as a CUDA graph that contains the copies.
Also checks that the offloaded model's outputs equal the resident model's (same weights, teacher-forced
steps) and times the resident model for reference.
Dry run on a CPU: ``python bench/offload.py --device cpu --preset tiny --offload 1 --steps 3``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.deploy.estimates import measure_host_to_device_bandwidth, offload_estimate  # noqa: E402
from personaplex.engine import Engine, SamplingConfig  # noqa: E402
from personaplex.lm.generator import Generator  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.persona import VoicePrompt, build_system_prompt  # noqa: E402
from personaplex.random_weights import random_mimi, ensure_random_lm_checkpoint  # noqa: E402
from engine_timing import p99, time_one_conversation  # noqa: E402

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--offload", type=int, default=16, help="temporal layers kept in host memory (the last ones)")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=["none", "int8", "fp8"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or --device cpu --preset tiny --offload 1 for a dry run")
    preset = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, preset {preset.name}, "
          f"{args.offload} of {preset.lm.num_layers} temporal layers offloaded", flush=True)
    ensure_random_lm_checkpoint(preset.lm, args.checkpoint, device=device.type)
    bandwidth = measure_host_to_device_bandwidth(device) if cuda else 10e9
    print(f"host -> device bandwidth (pinned, 256 MiB copy): {bandwidth / 1e9:.1f} GB/s"
          + ("" if cuda else " (assumed: no GPU)"), flush=True)
    mimi = random_mimi(preset.mimi, device)
    draw = torch.Generator().manual_seed(0)
    voice_frames, text_tokens = (125, 60) if preset.lm.context >= 1000 else (4, 3)
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (voice_frames, 8), generator=draw))
    room = dataclasses.replace(preset.lm, context=max(preset.lm.context, 3000))
    prompt = build_system_prompt(room, voice, torch.randint(4, preset.lm.text_card, (text_tokens,), generator=draw).tolist())

    rows = []
    for quantize in args.quantize:
        estimate = offload_estimate(preset.lm, args.offload, quantize, dtype, bandwidth)
        print(f"[{quantize}] estimate: {estimate.describe()}", flush=True)
        for offloaded in (0, args.offload):
            t0 = time.perf_counter()
            try:
                row = measure(args, preset, dtype, device, mimi, prompt, quantize, offloaded)
            except Exception as error:  # keep the other rows
                traceback.print_exc()
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            row.update(quantize=quantize, offloaded=offloaded, estimate=estimate.transfer_ms if offloaded else 0.0)
            rows.append(row)
            print(f"[{quantize}, {offloaded} offloaded] done in {time.perf_counter() - t0:.0f} s", flush=True)
    identical = {}
    for quantize in args.quantize:
        pair = [r for r in rows if r["quantize"] == quantize and "outputs" in r]
        if len(pair) == 2:
            identical[quantize] = torch.equal(pair[0]["outputs"], pair[1]["outputs"])

    print(f"\nall runs in {time.perf_counter() - started:.0f} s; {args.steps} timed steps after {args.warmup} warm-up steps\n")
    print("| weights | layers offloaded | GiB on the GPU (weights + staging) | GiB in pinned host memory | estimated transfer "
          "ms/frame | frame p50 ms | frame p99 ms | real time (p99 < 80 ms) | outputs equal resident |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['quantize']} | {row['offloaded']} | failed: {row['error']} |")
            continue
        same = identical.get(row["quantize"], "n/a") if row["offloaded"] else "-"
        print(f"| {row['quantize']} | {row['offloaded']} | {row['device_gib']:.2f} | {row['host_gib']:.2f} | "
              f"{row['estimate']:.0f} | {row['p50']:.1f} | {row['p99']:.1f} | {'yes' if row['p99'] < 80 else 'NO'} | {same} |")


def measure(args, preset, dtype, device, mimi, prompt, quantize, offloaded) -> dict:
    cuda = device.type == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    base = allocated()
    lm = load_lm(args.checkpoint, preset.lm, device=device, dtype=dtype, quantize=quantize,
                 offload_layers=offloaded, preset_name=preset.name)
    device_bytes = allocated() - base
    layers = lm.transformer.layers
    host_bytes = getattr(layers, "streamed_bytes", 0)
    outputs = teacher_forced(lm, preset, steps=6)
    engine = Engine(lm, mimi, max_slots=1, kernels="eager")
    times = time_one_conversation(engine, prompt, SamplingConfig(seed=5), args.warmup, args.steps)
    del engine, lm
    return dict(device_gib=device_bytes / GIB, host_gib=host_bytes / GIB, p50=statistics.median(times),
                p99=p99(times), outputs=outputs)


def teacher_forced(lm, preset, steps: int) -> torch.Tensor:
    """Text and audio logits of a few steps with every token forced (eager, no graph)."""
    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    draw = torch.Generator().manual_seed(3)
    outputs = []
    with torch.inference_mode():
        for _ in range(steps):
            forced = torch.randint(0, preset.lm.card, (1, preset.lm.num_channels), generator=draw)
            forced[:, 0] = torch.randint(0, preset.lm.text_card, (1,), generator=draw)
            forced = forced.to(lm.device)
            result = generator.step(
                gen_state, lm_state, forced, depth_steps=lm.config.agent_codebooks, return_audio_logits=True
            )
            outputs += [result.text_logits.float().flatten().cpu(), result.audio_logits.float().flatten().cpu()]
    return torch.cat(outputs)


if __name__ == "__main__":
    main()
