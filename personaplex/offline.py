"""``personaplex offline``: run recorded user audio through the model as a live caller would.

Each input file is streamed frame by frame (80 ms) after the persona's system prompt, exactly like a
live conversation; the agent's audio is written with the input's duration, and the text channel as a
JSON list with one entry per frame (reference format). Several inputs run together as one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import FRAME_SIZE, SAMPLE_RATE
from .errors import PersonaplexError

DEFAULT_TEXT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)


class UsageError(PersonaplexError):
    """Command-line arguments that do not fit together."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the weights, shared by every command that loads the model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=["personaplex", "demo"], default="personaplex",
                       help="'personaplex': the real weights (Hugging Face or local files); 'demo': a small built-in "
                            "model with random weights that needs no download (untrained: it babbles)")
    group.add_argument("--hf-repo", default=None, help="Hugging Face repo or local snapshot folder (default nvidia/personaplex-7b-v1)")
    group.add_argument("--moshi-weight", type=Path, help="local LM weights (.safetensors) instead of the hub")
    group.add_argument("--mimi-weight", type=Path, help="local Mimi codec weights (.safetensors) instead of the hub")
    group.add_argument("--tokenizer", type=Path, help="local SentencePiece text tokenizer (.model) instead of the hub")
    group.add_argument("--voice-prompt-dir", type=Path, help="folder of voice presets (NATF2.pt, ...) instead of the hub's voices.tgz")
    group.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    group.add_argument("--cpu-offload", action="store_true", help="keep LM layers that do not fit the GPU in host memory")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--seed", type=int, default=-1, help="random seed; -1 picks one (default)")
    group.add_argument("--temp-audio", type=float, default=0.8, help="audio temperature (default 0.8)")
    group.add_argument("--temp-text", type=float, default=0.7, help="text temperature (default 0.7)")
    group.add_argument("--topk-audio", type=int, default=250, help="audio top-k (default 250)")
    group.add_argument("--topk-text", type=int, default=25, help="text top-k (default 25)")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="personaplex offline")
    parser.description = (
        "Stream recorded user audio through the model frame by frame (80 ms), as a live caller would, after the "
        "persona's system prompt. Writes the agent's audio with exactly the input's duration and a JSON list of its "
        "text tokens, one per frame. Several inputs run together as one batch."
    )
    parser.epilog = (
        "example: personaplex offline --model demo --input-wav assets/test/input_assistant.wav "
        "--output-wav out.wav --output-text out.json --voice-prompt NATF2"
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--input-wav", type=Path, nargs="+", required=True, help="user audio file(s): wav, flac, ogg, mp3")
    io.add_argument("--output-wav", type=Path, nargs="+", required=True, help="agent audio output(s), one per input")
    io.add_argument("--output-text", type=Path, nargs="+", required=True, help="JSON token list output(s), one per input")
    persona = parser.add_argument_group("persona (one value for all inputs, or one per input)")
    persona.add_argument("--text-prompt", nargs="+", default=[DEFAULT_TEXT_PROMPT], help="role prompt text")
    persona.add_argument("--text-prompt-file", type=Path, nargs="+", help="read the role prompt(s) from file(s)")
    persona.add_argument("--voice-prompt", nargs="+", default=["NATF2"],
                         help="voice preset name (NATF2, NATF2.pt) or a voice/audio file (default NATF2)")
    add_sampling_arguments(parser)
    add_model_arguments(parser)
    return parser


@dataclass
class Job:
    """One input file and what to do with it."""

    input_path: Path
    output_wav: Path
    output_text: Path
    text_prompt: str
    voice: str
    audio: np.ndarray | None = None  # mono float32 at 24 kHz


def per_input(values: list, count: int, name: str) -> list:
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"{name} takes one value or one per input ({count}), got {len(values)}")
    return values


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    count = len(args.input_wav)
    if len(args.output_wav) != count or len(args.output_text) != count:
        raise UsageError(f"give one --output-wav and one --output-text per --input-wav ({count})")
    if args.text_prompt_file:
        texts = []
        for path in args.text_prompt_file:
            if not path.is_file():
                raise UsageError(f"text prompt file not found: {path}")
            texts.append(path.read_text(encoding="utf-8"))
    else:
        texts = args.text_prompt
    texts = per_input(texts, count, "--text-prompt")
    voices = per_input(args.voice_prompt, count, "--voice-prompt")
    outputs = [p.resolve() for p in args.output_wav + args.output_text]
    if len(set(outputs)) != len(outputs):
        raise UsageError("output paths must all differ")
    return [Job(i, w, t, text, voice) for i, w, t, text, voice in zip(args.input_wav, args.output_wav, args.output_text, texts, voices)]


def resolve_model_assets(args: argparse.Namespace):
    """Where the weights come from: the demo model, local files, or the Hugging Face hub."""
    if args.model == "demo":
        from .demo import demo_assets

        return demo_assets()
    from .hub import DEFAULT_REPO, resolve_assets

    return resolve_assets(
        args.hf_repo or DEFAULT_REPO, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
        tokenizer=args.tokenizer, voice_prompt_dir=args.voice_prompt_dir,
    )


def sampling_from_args(args: argparse.Namespace):
    from .engine import SamplingConfig

    return SamplingConfig(
        text_temperature=args.temp_text, text_top_k=args.topk_text, audio_temperature=args.temp_audio,
        audio_top_k=args.topk_audio, greedy=args.greedy, seed=None if args.seed < 0 else args.seed,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .audio import read_audio
    from .engine import Engine
    from .loading import load_model
    from .persona import build_system_prompt, load_voice, resolve_voice

    if args.cpu_offload:
        raise UsageError("--cpu-offload is not supported yet; use a GPU with >= 20 GB or --model demo")
    jobs = plan_jobs(args)
    for job in jobs:  # read inputs before loading gigabytes of weights: bad files fail fast
        job.audio = read_audio(job.input_path)
    for job in jobs:
        job.output_wav.parent.mkdir(parents=True, exist_ok=True)
        job.output_text.parent.mkdir(parents=True, exist_ok=True)

    assets = resolve_model_assets(args)
    model = load_model(assets, args.device)
    log(f"model {model.name} on {model.device} ({model.lm.dtype}), {len(jobs)} input(s)")
    if model.untrained:
        log("note: the demo model has random, untrained weights: its speech and text are noise, not answers")

    # Group identical personas into contiguous slots so each persona's prompt is prefilled once per group.
    personas: dict[tuple[str, str], list[int]] = {}
    for index, job in enumerate(jobs):
        personas.setdefault((job.voice, job.text_prompt), []).append(index)
    order = [i for members in personas.values() for i in members]
    engine = Engine(model.lm, model.mimi, max_slots=len(jobs))
    sampling = sampling_from_args(args)
    slot = 0
    for (voice, text), members in personas.items():
        voice_path = resolve_voice(voice, model.voices_dir)
        voice_prompt = load_voice(voice_path, model.lm.config, model.mimi)
        prompt = build_system_prompt(model.lm.config, voice_prompt, model.tokenizer.encode_prompt(text))
        engine.join(slot, slot + len(members), prompt, sampling)
        slot += len(members)

    frames = [-(-len(jobs[i].audio) // FRAME_SIZE) for i in order]
    total = max(frames)
    agent_audio = [[] for _ in order]
    agent_text = [[] for _ in order]
    pcm = torch.zeros(len(order), FRAME_SIZE)
    with tqdm(total=total, unit="frame", desc="conversation", file=sys.stderr, disable=None) as progress:
        for tick in range(total):
            pcm.zero_()
            for row, index in enumerate(order):
                chunk = jobs[index].audio[tick * FRAME_SIZE : (tick + 1) * FRAME_SIZE]
                pcm[row, : len(chunk)] = torch.from_numpy(chunk)
            out = engine.step(pcm)
            for row in range(len(order)):
                if tick < frames[row]:
                    agent_audio[row].append(out.pcm[row].numpy())
                    agent_text[row].append(int(out.tokens[row, 0]))
            progress.update(1)

    import sphn

    for row, index in enumerate(order):
        job = jobs[index]
        audio = np.concatenate(agent_audio[row])[: len(job.audio)]
        sphn.write_wav(str(job.output_wav), np.clip(audio, -1.0, 1.0).astype(np.float32), SAMPLE_RATE)
        with open(job.output_text, "w", encoding="utf-8") as f:
            json.dump([model.tokenizer.piece(t) for t in agent_text[row]], f, ensure_ascii=False)
        log(f"wrote {job.output_wav} ({len(job.audio) / SAMPLE_RATE:.2f} s) and {job.output_text}")


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    parser = build_parser()
    return run_command(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
