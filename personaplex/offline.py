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
    group.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none",
                       help="store the LM's matmul weights in 8 bits (needs torchao): 'int8' halves the weights' "
                            "memory (7B: 8.1 GiB instead of 15.6), 'fp8' too and uses FP8 matmuls on GPUs that have "
                            "them (compute capability >= 8.9); default none (bf16 on GPU)")
    group.add_argument("--cpu-offload", action="store_true",
                       help="keep the LM layers that do not fit the GPU in host memory and stream them in every frame; "
                            "says up front whether that keeps real time on this machine's host link")
    group.add_argument("--offload-layers", type=int, metavar="N",
                       help="with --cpu-offload: offload exactly the last N of the temporal layers (default: as few as fit)")


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
    io = parser.add_argument_group("inputs and outputs (files, or a whole folder)")
    io.add_argument("--input-wav", type=Path, nargs="+", help="user audio file(s): wav, flac, ogg, mp3")
    io.add_argument("--output-wav", type=Path, nargs="+", help="agent audio output(s), one per input")
    io.add_argument("--output-text", type=Path, nargs="+",
                    help="JSON token list output(s), one per input; the agent's words as plain text go beside each "
                         "(same name, .txt)")
    io.add_argument("--input-dir", type=Path, help="process every audio file in this folder (instead of --input-wav)")
    io.add_argument("--output-dir", type=Path, help="with --input-dir: write <name>.wav and <name>.json here")
    io.add_argument("--batch-size", type=int, help="conversations run at once (default: as many as fit the GPU's "
                                                   "memory, at most 64; 4 on a CPU); "
                                                   "a finished input's slot takes the next input at once")
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
    if args.input_dir is not None:
        if args.input_wav or args.output_wav or args.output_text or args.output_dir is None:
            raise UsageError("--input-dir goes with --output-dir, not with --input-wav/--output-wav/--output-text")
        if not args.input_dir.is_dir():
            raise UsageError(f"input folder not found: {args.input_dir}")
        from .persona import AUDIO_SUFFIXES

        inputs = sorted(p for p in args.input_dir.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not inputs:
            raise UsageError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {args.input_dir}")
        args.input_wav = inputs
        args.output_wav = [args.output_dir / f"{p.stem}.wav" for p in inputs]
        args.output_text = [args.output_dir / f"{p.stem}.json" for p in inputs]
    elif not (args.input_wav and args.output_wav and args.output_text):
        raise UsageError("give --input-wav, --output-wav and --output-text (or --input-dir and --output-dir)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
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
    outputs = [p.resolve() for p in args.output_wav + args.output_text + [transcript_path(t) for t in args.output_text]]
    if len(set(outputs)) != len(outputs):
        raise UsageError("output paths must all differ (the words go to each --output-text's name with .txt: "
                         "give the JSON outputs another suffix, e.g. .json)")
    return [Job(i, w, t, text, voice) for i, w, t, text, voice in zip(args.input_wav, args.output_wav, args.output_text, texts, voices)]


def transcript_path(output_text: Path) -> Path:
    """Where the agent's words go as plain text: beside the JSON token list, with .txt."""
    return output_text.with_suffix(".txt")


def resolve_model_assets(args: argparse.Namespace, need_voices: bool = True):
    """Where the weights come from: the demo model, local files, or the Hugging Face hub."""
    if args.model == "demo":
        from .demo import demo_assets

        return demo_assets()
    from .hub import DEFAULT_REPO, resolve_assets

    return resolve_assets(
        args.hf_repo or DEFAULT_REPO, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
        tokenizer=args.tokenizer, voice_prompt_dir=args.voice_prompt_dir, need_voices=need_voices,
    )


def load_model_for_args(args: argparse.Namespace, assets, *, slots: int = 1, input_frames: list[int] | None = None):
    """Load the model as the model flags ask (device, --quantize, --cpu-offload), after saying what to expect
    on this hardware (real time or not, how long a CPU run takes). ``slots``: conversations run at once."""
    import torch

    from .deploy.plan import plan_load
    from .loading import default_device, load_model, preset_of

    device = args.device or default_device()
    quantize = getattr(args, "quantize", "none")
    offload = getattr(args, "offload_layers", None)
    if offload is not None and not args.cpu_offload:
        raise UsageError("--offload-layers goes with --cpu-offload")
    if torch.device(device).type == "cuda" and getattr(args, "batch_size", None) is None:
        slots = 1  # the memory check asks for one conversation; the batch then grows into what is left
    plan = plan_load(preset_of(assets), device, quantize=quantize, cpu_offload=args.cpu_offload, offload_layers=offload,
                     slots=slots, input_frames=input_frames)
    for message in plan.messages:
        log(message)
    return load_model(assets, plan.device, quantize=plan.quantize, offload_layers=plan.offload_layers)


def sampling_from_args(args: argparse.Namespace):
    from .engine import SamplingConfig

    return SamplingConfig(
        text_temperature=args.temp_text, text_top_k=args.topk_text, audio_temperature=args.temp_audio,
        audio_top_k=args.topk_audio, greedy=args.greedy, seed=None if args.seed < 0 else args.seed,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    import time
    from collections import deque

    import torch
    from tqdm import tqdm

    from . import startup
    from .audio import read_audio
    from .engine import Engine, slots_that_fit
    from .persona import build_system_prompt, load_voice, resolve_voice

    jobs = plan_jobs(args)
    for job in jobs:  # read inputs before loading gigabytes of weights: bad files fail fast
        job.audio = read_audio(job.input_path)
    for job in jobs:
        job.output_wav.parent.mkdir(parents=True, exist_ok=True)
        job.output_text.parent.mkdir(parents=True, exist_ok=True)

    assets = resolve_model_assets(args)
    frames = [-(-len(job.audio) // FRAME_SIZE) for job in jobs]
    loading = time.perf_counter()
    model = load_model_for_args(args, assets, slots=min(len(jobs), args.batch_size or 4), input_frames=frames)
    log(f"start-up: load model (read weights, build) in {time.perf_counter() - loading:.2f} s")
    if model.untrained:
        log("note: the demo model has random, untrained weights: its speech and text are noise, not answers")
    slots = min(len(jobs), args.batch_size or min(64, slots_that_fit(model.lm, model.mimi)))
    log(f"model {model.name} on {model.device} ({model.lm.dtype}); {len(jobs)} input(s), {slots} at a time")

    prompts: dict[tuple[str, str], object] = {}

    def prompt_for(job: Job):
        key = (job.voice, job.text_prompt)
        if key not in prompts:
            voice = load_voice(resolve_voice(job.voice, model.voices_dir), model.lm.config, model.mimi)
            prompts[key] = build_system_prompt(model.lm.config, voice, model.tokenizer.encode_prompt(job.text_prompt))
        return prompts[key]

    for job in jobs:  # every persona is checked before the first frame runs
        prompt_for(job)

    # Continuous batching: a slot freed by a finished input takes the next one at once; the engine
    # guarantees each conversation the same frames as if it ran alone.
    engine = Engine(model.lm, model.mimi, max_slots=slots)
    longest = max(prompt.num_steps for prompt in prompts.values()) + max(-(-len(j.audio) // FRAME_SIZE) for j in jobs)
    capturing = time.perf_counter()
    if engine.capture_graphs(up_to_frames=longest):  # no capture pauses once conversations run
        log(f"start-up: CUDA graphs ({engine.kernels.name} kernels) in {time.perf_counter() - capturing:.2f} s")
    sampling = sampling_from_args(args)
    waiting = deque(jobs)
    running: dict[int, Conversation] = {}
    total_frames = sum(-(-len(job.audio) // FRAME_SIZE) for job in jobs)
    pcm = torch.zeros(slots, FRAME_SIZE)
    started = time.perf_counter()
    done_frames = 0  # counted here: a progress bar that is off (no terminal) counts nothing
    rate_reported = False
    first_frame = True
    with tqdm(total=total_frames, unit="frame", desc="conversations", file=sys.stderr, disable=None) as progress:
        def say(message: str) -> None:  # above the progress bar on a terminal, not inside it
            progress.write(message, file=sys.stderr)

        while waiting or running:
            for slot in engine.free_slots():
                if not waiting:
                    break
                job = waiting.popleft()
                engine.join(slot, slot + 1, prompt_for(job), sampling)
                running[slot] = Conversation(job)
            pcm.zero_()
            for slot, conversation in running.items():
                chunk = conversation.next_input()
                pcm[slot, : len(chunk)] = torch.from_numpy(chunk)
            out = engine.step(pcm)
            if first_frame:
                first_frame = False
                say(f"start-up: first frame {startup.seconds_since_process_start():.2f} s after launch")
            progress.update(len(running))
            done_frames += len(running)
            for slot, conversation in list(running.items()):
                conversation.record(out.pcm[slot].numpy(), int(out.tokens[slot, 0]))
                if conversation.done:
                    conversation.write(model.tokenizer, say)
                    engine.leave(slot)
                    del running[slot]
            elapsed = time.perf_counter() - started
            if not rate_reported and elapsed >= RATE_REPORT_AFTER_SECONDS and (waiting or running):
                say(measured_rate(done_frames, total_frames, elapsed))
                rate_reported = True
    elapsed = time.perf_counter() - started
    seconds = sum(len(job.audio) for job in jobs) / SAMPLE_RATE
    log(f"processed {seconds:.1f} s of audio in {elapsed:.1f} s ({seconds / elapsed:.2g}x real time)")


# The up-front estimate comes from a quick measurement and can be far off on a busy machine: once the run
# has gone this long, the rate it really gets replaces it.
RATE_REPORT_AFTER_SECONDS = 10.0


def measured_rate(done_frames: int, total_frames: int, elapsed: float) -> str:
    """One line: the frame rate measured so far (all conversations together) and the time left at that rate."""
    from .deploy.realtime import format_duration

    per_second = done_frames / max(elapsed, 1e-9)
    speed = per_second * FRAME_SIZE / SAMPLE_RATE  # seconds of audio per second of wall time
    rate = f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.2g}"
    return (f"measured: {rate} frames/s ({speed:.2g}x real time) over the first {elapsed:.0f} s; "
            f"about {format_duration((total_frames - done_frames) / per_second)} left at this rate")


class Conversation:
    """One input file streaming through a slot."""

    def __init__(self, job: Job):
        self.job = job
        self.frames = -(-len(job.audio) // FRAME_SIZE)
        self.position = 0
        self.agent_audio: list[np.ndarray] = []
        self.agent_text: list[int] = []

    def next_input(self) -> np.ndarray:
        return self.job.audio[self.position * FRAME_SIZE : (self.position + 1) * FRAME_SIZE]

    def record(self, pcm: np.ndarray, text_token: int) -> None:
        self.agent_audio.append(pcm)
        self.agent_text.append(text_token)
        self.position += 1

    @property
    def done(self) -> bool:
        return self.position >= self.frames

    def write(self, tokenizer, say=log) -> None:
        """The agent's audio with exactly the input's duration, and one JSON entry per frame."""
        import sphn

        job = self.job
        audio = np.concatenate(self.agent_audio)[: len(job.audio)]
        sphn.write_wav(str(job.output_wav), np.clip(audio, -1.0, 1.0).astype(np.float32), SAMPLE_RATE)
        # The token list keeps the reference format (one raw piece per frame, byte pieces as "<0xC3>"); the
        # text file is what was said, byte pieces joined into characters.
        with open(job.output_text, "w", encoding="utf-8") as f:
            json.dump([tokenizer.piece(t) for t in self.agent_text], f, ensure_ascii=False)
        transcript_path(job.output_text).write_text(tokenizer.transcript(self.agent_text) + "\n", encoding="utf-8")
        say(f"wrote {job.output_wav} ({len(job.audio) / SAMPLE_RATE:.2f} s), {job.output_text} and "
            f"{transcript_path(job.output_text).name}")


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    parser = build_parser()
    return run_command(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
