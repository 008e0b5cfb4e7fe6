"""The ``personaplex`` command line."""

from __future__ import annotations

import argparse
import sys

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
    print(f"{args.weights}: {len(found)} tensors, {sum(_numel(s) for s in found.values()) / 1e9:.3f}B values")
    for preset in PRESETS.values():
        for part, module in (("LM", build_lm(preset.lm)), ("Mimi", build_mimi(preset.mimi))):
            diff = compare_layouts(model_layout(module), found)
            if diff.ok:
                print(f"fits preset {preset.name!r} ({part})")
                return
    raise PersonaplexError(f"{args.weights} fits no known preset; see 'personaplex presets'")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personaplex",
        description="Run full-duplex speech-to-speech models of the Moshi family (PersonaPlex-7B).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = commands.add_parser("presets", help="list the built-in model configurations")
    presets.set_defaults(run=_cmd_presets)
    inspect = commands.add_parser(
        "inspect", help="tell which preset a safetensors weights file fits (reads only its header)"
    )
    inspect.add_argument("weights", help="path to a .safetensors file (LM or Mimi)")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PersonaplexError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
