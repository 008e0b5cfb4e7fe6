"""Time from "persona given" to "ready to talk": system prompt by prefill vs frame-by-frame stepping.

    python bench/persona_start.py [--preset personaplex-7b] [--voice-seconds 10] [--text-tokens 60]

Uses the random checkpoint written by bench/lm_7b.py (or writes one). The voice is a synthetic 10 s
recording given three ways: as an audio file (read, -24 LUFS, Mimi-encoded, then prefilled), as saved
embeddings (a voice file: replayed by prefill), and, for comparison, stepped frame by frame as the
reference does. Each path starts from a fresh slot and ends when the slot is ready for the first
user frame (device synchronised). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personaplex.config import get_preset  # noqa: E402
from personaplex.lm.generator import Generator  # noqa: E402
from personaplex.loading import load_lm  # noqa: E402
from personaplex.persona import (  # noqa: E402
    apply_system_prompt,
    build_system_prompt,
    load_voice,
    record_voice,
)
from personaplex.random_weights import random_mimi, write_random_lm_checkpoint  # noqa: E402


def synthetic_voice(path: Path, seconds: float) -> Path:
    """A speech-like test signal: a gliding harmonic tone with syllable-rate amplitude, plus noise."""
    import wave

    rate = 24_000
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    signal = 0.2 * voiced * envelope + 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(1000 * (time.perf_counter() - t0))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="personaplex-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--voice-seconds", type=float, default=10.0)
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personaplex_random_lm.safetensors"))
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.checkpoint.exists():
        write_random_lm_checkpoint(preset.lm, args.checkpoint, dtype=dtype, device=args.device)
    lm = load_lm(args.checkpoint, preset.lm, device=device, dtype=dtype)
    mimi = random_mimi(preset.mimi, device)
    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    text_tokens = torch.randint(4, preset.lm.text_card, (args.text_tokens,)).tolist()
    voice_wav = synthetic_voice(Path(tempfile.mkdtemp()) / "voice.wav", args.voice_seconds)

    with torch.inference_mode():
        audio_voice = load_voice(voice_wav, preset.lm, mimi)
        saved = record_voice(generator, lm.new_state, audio_voice.codes.to(device))
        from personaplex.persona import VoicePrompt

        saved_voice = VoicePrompt("saved", saved=saved)
        prompt_audio = build_system_prompt(preset.lm, audio_voice, text_tokens)
        prompt_saved = build_system_prompt(preset.lm, saved_voice, text_tokens)

        def from_audio_file():
            voice = load_voice(voice_wav, preset.lm, mimi)
            prompt = build_system_prompt(preset.lm, voice, text_tokens)
            apply_system_prompt(generator, gen_state, lm_state, prompt.frames, None)

        def from_voice_file():
            apply_system_prompt(generator, gen_state, lm_state, prompt_saved.frames, prompt_saved.saved_voice)

        def stepwise_codes():
            apply_system_prompt(generator, gen_state, lm_state, prompt_audio.frames, None, stepwise=True)

        def stepwise_saved():
            apply_system_prompt(generator, gen_state, lm_state, prompt_saved.frames, prompt_saved.saved_voice, stepwise=True)

        rows = [
            ("audio file -> Mimi encode -> prefill", from_audio_file, prompt_audio.num_steps),
            ("voice file (saved embeddings) -> prefill", from_voice_file, prompt_saved.num_steps),
            ("Mimi codes -> stepped frame by frame (reference style)", stepwise_codes, prompt_audio.num_steps),
            ("voice file -> stepped frame by frame (reference style)", stepwise_saved, prompt_saved.num_steps),
        ]
        for _, fn, _ in rows:
            fn()  # warm-up (kernels, allocator)
        print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, preset {preset.name}, "
              f"voice {args.voice_seconds:.1f} s ({audio_voice.num_frames} frames), text {args.text_tokens} tokens")
        print("\n| persona start | prompt frames | p50 ms | min ms | max ms |\n|---|---|---|---|---|")
        for name, fn, frames in rows:
            samples = timed(fn, args.repeats, device)
            print(f"| {name} | {frames} | {statistics.median(samples):.1f} | {min(samples):.1f} | {max(samples):.1f} |")


if __name__ == "__main__":
    main()
