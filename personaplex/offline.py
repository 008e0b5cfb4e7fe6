"""``personaplex offline``: run recorded user audio through the model as a live caller would.

Each input file is streamed frame by frame (80 ms) after the persona's system prompt, exactly like a
live conversation; the agent's audio is written with the input's duration, and the text channel as a
JSON list with one entry per frame (reference format). Several inputs run together as one batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .app.console import run_command
from .app.flags import CONTEXT_POLICY_CHOICES, DEFAULT_TEXT_PROMPT, add_model_arguments, add_sampling_arguments
from .app.recordings import Job, run_recordings, transcript_path
from .errors import UsageError


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
    parser.add_argument("--context-policy", choices=CONTEXT_POLICY_CHOICES, default="sliding",
                        help="what an input longer than the model's context (4 min for PersonaPlex-7B) keeps: "
                             "'sliding' (default, as the reference) forgets the oldest frames, the system prompt "
                             "first; 'pin-persona' keeps the system prompt and slides over the conversation after "
                             "it. Inputs of any length are accepted either way")
    add_sampling_arguments(parser)
    add_model_arguments(parser)
    return parser


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


def run(args: argparse.Namespace) -> None:
    run_recordings(plan_jobs(args), args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
