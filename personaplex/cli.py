"""The ``personaplex`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from .app.console import run_command
from .app.flags import add_model_arguments
from .errors import PersonaplexError


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
    from .app.model import load_model_for_args, resolve_model_assets
    from .persona import load_voice, record_voice, save_voice_file

    assets = resolve_model_assets(args, need_voices=False)  # building a voice needs no presets
    model = load_model_for_args(args, assets)
    voice = load_voice(args.audio, model.lm.config, model.mimi)
    saved = record_voice(Generator(model.lm), model.lm.new_state, voice.codes)
    output = args.output or Path(args.audio).with_suffix(".safetensors")
    save_voice_file(saved, output, model_name=model.name, source=Path(args.audio).name)
    print(f"wrote {output}: {saved.num_frames} frames ({saved.num_frames * 0.08:.2f} s) of voice for model {model.name}")


def _build_voice(voice: argparse.ArgumentParser) -> None:
    voice_commands = voice.add_subparsers(dest="voice_command", required=True, metavar="ACTION")
    build = voice_commands.add_parser(
        "build", help="encode a recording into a voice file (embeddings + token state) for this model",
        description="Run the voice phase of the system prompt once and save what it leaves: the next "
                    "conversations with this voice start without re-encoding the audio.",
    )
    build.add_argument("audio", type=Path, help="recording of the voice: wav, flac, ogg or mp3 (a few seconds)")
    build.add_argument("-o", "--output", type=Path, help="voice file to write (.safetensors; default: beside the audio)")
    add_model_arguments(build)
    build.set_defaults(run=_cmd_voice_build)


def _module_command(module_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A command whose module has build_parser(parser) and run(args)."""

    def build(parser: argparse.ArgumentParser) -> None:
        module = importlib.import_module(module_name, __package__)
        module.build_parser(parser)
        parser.set_defaults(run=module.run)

    return build


def _builder_only(module_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A command group whose module's build_parser(parser) sets its own ``run`` per action."""
    return lambda parser: importlib.import_module(module_name, __package__).build_parser(parser)


def _build_presets(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(run=_cmd_presets)


def _build_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="path to a .safetensors file (LM or Mimi)")
    parser.set_defaults(run=_cmd_inspect)


# name, one-line help, how to fill in its flags. Filling in a command's flags imports its module, and only
# the modules of the command being run are imported (so --help and argument errors answer at once); none
# of them imports torch or scipy before it runs.
COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("offline", "stream audio files through the model; write agent audio and text", _module_command(".offline")),
    ("voice", "voice prompts: build a reusable voice file from a recording", _build_voice),
    ("serve", "serve live conversations (WebSocket /api/chat) and the web page", _module_command(".server.serve")),
    ("loadtest", "run N concurrent real-time callers against a server; report latency and late frames",
     _module_command(".loadtest")),
    ("client", "stream a recording to a server in real time; save the reply wav and its transcript",
     _module_command(".client")),
    ("scale", "serve from several engine replicas (one per GPU, across machines) behind one endpoint (Ray Serve)",
     _builder_only(".scaleout.cli")),
    ("eval", "evaluate: Full-Duplex-Bench (run, transcribe, score, report) and service-persona adherence",
     _builder_only(".eval.cli")),
    ("presets", "list the built-in model configurations", _build_presets),
    ("inspect", "tell which preset a safetensors weights file fits (reads only its header)", _build_inspect),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``argv``, only the command that ``argv`` names gets its flags filled in
    (every command is still listed, and parsing ``argv`` gives the same result as with the whole parser)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="personaplex",
        description="Run full-duplex speech-to-speech models of the Moshi family (PersonaPlex-7B): "
                    "process recordings offline, serve live conversations, build voices, evaluate, inspect weights.",
    )
    parser.add_argument("--version", action="version", version=f"personaplex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = _command_named(argv) if argv is not None else None
    for name, summary, fill in COMMANDS:
        command = commands.add_parser(name, help=summary)
        if argv is None or name == wanted:
            fill(command)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The command ``argv`` runs: its first word that is not an option (the top level has no valued options)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
