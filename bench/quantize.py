"""Weight quantization on the GPU: memory, single-conversation step time, capacity and output deviation.

    python bench/quantize.py [--modes none int8 fp8] [--frames 100] [--steps 100] [--kernels eager|compile] [--kv-dtype fp8]

For each mode the 7B LM (random bf16 weights in the real layout; written once to --checkpoint) is
loaded quantized unit by unit, then:

- memory: weights on the device, peak while loading, and the peak of a one-conversation engine
  (weights + Mimi + KV rings at full context + CUDA graphs + activations);
- step time: one conversation in the engine, whole 80 ms frame (Mimi encode, LM, Mimi decode, copy
  out) replayed as a CUDA graph, wall clock;
- capacity: conversations that fit beside the weights on this GPU and on 12/16/24 GB GPUs (computed
  from the measured weights and the engine's per-slot state, keeping 2 GiB for activations);
- deviation from bf16: every token teacher-forced to the same random values after the same persona
  prompt (so differences cannot cascade), relative L2 error of the text logits and agreement of the
  greedy (argmax) text token and of the 8 agent codebooks, over --frames frames.

``--kernels eager`` (default) steps through the eager kernels; ``--kernels compile`` uses the torch.compile'd step kernels (adds compile time
per mode). A mode that fails prints its error in the table and the others still run.
Dry run on a CPU: ``python bench/quantize.py --device cpu --preset tiny --frames 8 --steps 5``.
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
from personaplex.cuda_graph import CapturedStep  # noqa: E402
from personaplex.deploy.quantize import describe_mode, summarize, torchao_version  # noqa: E402
from personaplex.engine import Engine, SamplingConfig, slot_bytes  # noqa: E402
from personaplex.lm.generator import Generator  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.persona import VoicePrompt, apply_system_prompt, build_system_prompt  # noqa: E402
from personaplex.random_weights import random_mimi, ensure_random_lm_checkpoint  # noqa: E402
from engine_timing import p99, time_one_conversation  # noqa: E402

GIB = 2**30
RESERVE = 2 * GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "fp8"], choices=["none", "int8", "fp8"])
    parser.add_argument("--frames", type=int, default=100, help="teacher-forced frames compared with bf16")
    parser.add_argument("--steps", type=int, default=100, help="timed engine steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--kernels", choices=["eager", "triton", "compile"], default="eager")
    parser.add_argument("--kv-dtype", choices=["model", "fp8"], default="model",
                        help="the engine's KV rings: the model dtype, or FP8 (half the memory per conversation)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or --device cpu --preset tiny for a dry run")
    if "none" not in args.modes:
        args.modes = ["none", *args.modes]  # the reference for the deviation columns
    preset = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, torchao "
          f"{torchao_version()}, preset {preset.name}, kernels: {args.kernels}, KV rings: {args.kv_dtype}", flush=True)
    ensure_random_lm_checkpoint(preset.lm, args.checkpoint, device=device.type)
    mimi = random_mimi(preset.mimi, device)
    draw = torch.Generator().manual_seed(0)
    # 10 s of voice and 60 text tokens; a toy preset's short context gets a toy prompt.
    voice_frames, text_tokens = (125, 60) if preset.lm.context >= 1000 else (4, 3)
    voice = VoicePrompt("random", codes=torch.randint(0, 2048, (voice_frames, 8), generator=draw))
    room = dataclasses.replace(preset.lm, context=max(preset.lm.context, 3000))  # the length guard is for real models
    prompt = build_system_prompt(room, voice, torch.randint(4, preset.lm.text_card, (text_tokens,), generator=draw).tolist())
    forced = torch.randint(0, preset.lm.card, (args.frames, preset.lm.num_channels), generator=draw)
    forced[:, 0] = torch.randint(4, preset.lm.text_card, (args.frames,), generator=draw)

    rows, reference = [], None
    for mode in args.modes:
        t0 = time.perf_counter()
        try:
            row, outputs = measure(mode, args, preset, dtype, device, mimi, prompt, forced)
        except Exception as error:  # keep the other modes' results
            traceback.print_exc()
            rows.append((mode, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"))
            continue
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if mode == "none":
            reference = outputs
        row["deviation"] = deviation(outputs, reference) if reference is not None else "n/a"
        rows.append((mode, row))
        print(f"{mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\nall modes in {time.perf_counter() - started:.0f} s; {args.frames} teacher-forced frames, "
          f"{args.steps} timed steps\n")
    print("| weights | description | weights GiB | load peak GiB | 1-conversation GiB (peak allocated / peak reserved / device used) | "
          "frame p50 ms | frame p99 ms | conversations that fit here | on 12 / 16 / 24 GB | "
          "text logits rel. L2 error | text argmax agreement | audio argmax agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, row in rows:
        if isinstance(row, str):
            print(f"| {mode} | {row} |")
            continue
        error, text_agree, audio_agree = row["deviation"] if row["deviation"] != "n/a" else ("n/a",) * 3
        print(f"| {mode} | {row['description']} | {row['weights']:.2f} | {row['load_peak']:.2f} | "
              f"{row['peak']:.2f} / {row['reserved']:.2f} / {row['device_used']:.2f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['fit_here']} | "
              f"{row['fit_small']} | {error} | {text_agree} | {audio_agree} |")


def measure(mode, args, preset, dtype, device, mimi, prompt, forced):
    cuda = device.type == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    t0 = time.perf_counter()
    lm = load_lm(args.checkpoint, preset.lm, device=device, dtype=dtype, quantize=mode, preset_name=preset.name)
    load_s = time.perf_counter() - t0
    weights = allocated() - base
    load_peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    summary = summarize(lm)
    print(f"{mode}: loaded in {load_s:.1f} s: {summary.describe()}", flush=True)
    outputs = teacher_forced(lm, prompt, forced, cuda)

    # One conversation through the engine, as a server runs it.
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(lm, mimi, max_slots=1, kernels=args.kernels, kv_dtype=args.kv_dtype)
    times = time_one_conversation(engine, prompt, SamplingConfig(seed=5), args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / GIB if cuda else 0.0
    # What the device reports as used (CUDA context and allocator cache included), as nvidia-smi shows it.
    free, total = torch.cuda.mem_get_info(device) if cuda else (0, 0)
    device_used = (total - free) / GIB
    per_slot = slot_bytes(lm, mimi, args.kv_dtype)
    mimi_bytes = sum(p.numel() * p.element_size() for p in mimi.parameters())
    fixed = weights + mimi_bytes + RESERVE
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        fit_here = max(0, int((total - fixed) // per_slot))
    else:
        fit_here = "n/a"
    fit_small = " / ".join(str(max(0, int((gb * 1e9 - 0.5 * GIB - fixed) // per_slot))) for gb in (12, 16, 24))
    del engine, lm
    row = dict(description=describe_mode(mode, device), weights=weights / GIB, load_peak=load_peak / GIB, peak=peak,
               reserved=reserved, device_used=device_used, p50=statistics.median(times), p99=p99(times),
               fit_here=fit_here, fit_small=fit_small)
    return row, outputs


def teacher_forced(lm, prompt, forced, cuda):
    """Text logits [frames, text_card] and agent audio argmax [frames, 8] with every token forced."""
    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    frames = forced.to(lm.device)
    text, audio = [], []
    with torch.inference_mode():
        apply_system_prompt(generator, gen_state, lm_state, prompt.frames, None)

        def step(frame):
            result = generator.step(
                gen_state, lm_state, frame, depth_steps=lm.config.agent_codebooks, return_audio_logits=True
            )
            return result.text_logits, result.audio_logits.argmax(-1)

        run = CapturedStep(step, {"frame": frames[:1]}, gen_state.tensors()) if cuda else None
        for frame in frames:
            logits, codes = run(frame=frame[None]) if cuda else step(frame[None])
            text.append(logits[0].float().cpu())
            audio.append(codes[0].cpu())
    return torch.stack(text), torch.stack(audio)


def deviation(outputs, reference) -> tuple[str, str, str]:
    (text, audio), (text_ref, audio_ref) = outputs, reference
    error = ((text - text_ref).norm() / text_ref.norm()).item()
    text_agree = (text.argmax(-1) == text_ref.argmax(-1)).float().mean().item()
    audio_agree = (audio == audio_ref).float().mean().item()
    return f"{error:.4f}", f"{100 * text_agree:.1f}%", f"{100 * audio_agree:.1f}%"


if __name__ == "__main__":
    main()
