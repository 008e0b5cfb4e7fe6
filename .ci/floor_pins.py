"""Print ``name==floor`` for every direct dependency in pyproject.toml (one a line), for the floors job.

Every runtime dependency must have a ``>=`` floor: one without is an error, since nothing would then test
the oldest release that the range lets users install. ``--extra NAME`` adds that extra's dependencies
that carry a floor and apply to this Python (self-references like ``personaplex[eval]`` are skipped).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.\-]+)(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;]*)(;(?P<marker>.*))?$")
FLOOR = re.compile(r">=\s*(?P<version>[0-9][0-9A-Za-z.+\-]*)")


def floor_pin(requirement: str) -> str | None:
    """``name[extras]==floor`` for a requirement string, or None when it has no ``>=`` floor."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read requirement {requirement!r}")
    floor = FLOOR.search(match["spec"])
    if floor is None:
        return None
    return f"{match['name']}{match['extras'] or ''}=={floor['version']}"


def applies(requirement: str) -> bool:
    """Whether an environment marker (only python_version ones are used here) holds for this Python."""
    match = REQUIREMENT.match(requirement)
    marker = (match["marker"] or "").strip() if match else ""
    if not marker:
        return True
    python = re.fullmatch(r"python_version\s*(>=|<|==)\s*'([0-9.]+)'", marker)
    if python is None:
        return True  # other markers (platform) are left to pip
    ours = sys.version_info[:2]
    wanted = tuple(int(part) for part in python[2].split("."))
    return {">=": ours >= wanted, "<": ours < wanted, "==": ours == wanted}[python[1]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="also pin this extra's floored dependencies")
    args = parser.parse_args()
    project = tomllib.loads(args.pyproject.read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        pin = floor_pin(requirement)
        if pin is None:
            raise SystemExit(f"dependency {requirement!r} has no '>=' floor: give it one in pyproject.toml")
        pins.append(pin)
    for extra in args.extra:
        for requirement in project["optional-dependencies"][extra]:
            if requirement.startswith(project["name"]) or not applies(requirement):
                continue
            pin = floor_pin(requirement)
            if pin is not None:
                pins.append(pin)
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
