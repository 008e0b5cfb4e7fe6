"""The ``personaplex`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .errors import PersonaplexError


def run_command(action: Callable[[], None]) -> int:
    """Run a command; a user-facing error becomes one line on stderr and exit status 2, never a traceback."""
    try:
        action()
    except PersonaplexError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _cmd_presets(args: argparse.Namespace) -> None:
    from .checkpoint import build_lm
    from .config import PRESETS

    print(f"{'preset':<16} {'LM parameters':>14}  {'dep_q':>5}  {'context':>7}  description")
    for preset in PRESETS.values():
        params = sum(p.numel() for p in build_lm(preset.lm).parameters())
        print(f"{preset.name:<16} {params / 1e9:>13.3f}B  {preset.lm.dep_q:>5}  {preset.lm.context:>7}  {preset.description}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import build_lm, build_mimi, compare_layouts, file_layout, model_layout
    from .config import PRESETS

    found = file_layout(args.weights)
    values = sum(_numel(s) for s in found.values())
    print(f"{args.weights}: {len(found)} tensors, {values / 1e9:.3f}B values")
    for preset in PRESETS.values():
        for part, module in (("LM", build_lm(preset.lm)), ("Mimi", build_mimi(preset.mimi))):
            if compare_layouts(model_layout(module), found).ok:
                print(f"fits preset {preset.name!r} ({part})")
                return
    raise PersonaplexError(f"{args.weights} fits no known preset; see 'personaplex presets'")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cmd_voice_build(args: argparse.Namespace) -> None:
    from .lm.generator import Generator
    from .offline import load_model_for_args, resolve_model_assets
    from .persona import load_voice, record_voice, save_voice_file

    assets = resolve_model_assets(args, need_voices=False)  # building a voice needs no presets
    model = load_model_for_args(args, assets)
    voice = load_voice(args.audio, model.lm.config, model.mimi)
    saved = record_voice(Generator(model.lm), model.lm.new_state, voice.codes)
    output = args.output or Path(args.audio).with_suffix(".safetensors")
    save_voice_file(saved, output, model_name=model.name, source=Path(args.audio).name)
    print(f"wrote {output}: {saved.num_frames} frames ({saved.num_frames * 0.08:.2f} s) of voice for model {model.name}")


def build_parser() -> argparse.ArgumentParser:
    from . import offline

    parser = argparse.ArgumentParser(
        prog="personaplex",
        description="Run full-duplex speech-to-speech models of the Moshi family (PersonaPlex-7B): "
                    "process recordings offline, build voices, inspect weights.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    offline_parser = commands.add_parser(
        "offline", help="stream audio files through the model; write agent audio and text"
    )
    offline.build_parser(offline_parser)
    offline_parser.set_defaults(run=offline.run)

    voice = commands.add_parser("voice", help="voice prompts: build a reusable voice file from a recording")
    voice_commands = voice.add_subparsers(dest="voice_command", required=True, metavar="ACTION")
    build = voice_commands.add_parser(
        "build", help="encode a recording into a voice file (embeddings + token state) for this model",
        description="Run the voice phase of the system prompt once and save what it leaves: the next "
                    "conversations with this voice start without re-encoding the audio.",
    )
    build.add_argument("audio", type=Path, help="recording of the voice: wav, flac, ogg or mp3 (a few seconds)")
    build.add_argument("-o", "--output", type=Path, help="voice file to write (.safetensors; default: beside the audio)")
    offline.add_model_arguments(build)
    build.set_defaults(run=_cmd_voice_build)

    from . import client, loadtest
    from .server import serve

    # Commands whose module has build_parser(parser) and run(args).
    for name, module, summary in (
        ("serve", serve, "serve live conversations (WebSocket /api/chat) and the web page"),
        ("loadtest", loadtest, "run N concurrent real-time callers against a server; report latency and late frames"),
        ("client", client, "stream a recording to a server in real time; save the reply wav and its transcript"),
    ):
        command = commands.add_parser(name, help=summary)
        module.build_parser(command)
        command.set_defaults(run=module.run)

    from .scaleout import cli as scaleout_cli  # imports Ray only when a scale command runs

    scale_parser = commands.add_parser(
        "scale", help="serve from several engine replicas (one per GPU, across machines) behind one endpoint (Ray Serve)"
    )
    scaleout_cli.build_parser(scale_parser)

    from .eval import cli as eval_cli

    eval_parser = commands.add_parser(
        "eval", help="evaluate: Full-Duplex-Bench (run, transcribe, score, report) and service-persona adherence"
    )
    eval_cli.build_parser(eval_parser)

    presets = commands.add_parser("presets", help="list the built-in model configurations")
    presets.set_defaults(run=_cmd_presets)
    inspect = commands.add_parser("inspect", help="tell which preset a safetensors weights file fits (reads only its header)")
    inspect.add_argument("weights", type=Path, help="path to a .safetensors file (LM or Mimi)")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
