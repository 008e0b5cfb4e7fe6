"""The ``personaplex`` command line as a newcomer meets it: help and argument errors answer without loading
torch or scipy (they take seconds to import), ``--version`` works, and the load test and the client share
their default server URL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from personaplex import __version__
from personaplex.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "aiohttp", "pyloudnorm", "sentencepiece", "safetensors", "ray")

# Every command's --help, and an argument error for each kind of command, in one fresh interpreter: which of
# the heavy modules did building and parsing import?
PROBE = """
import json, sys
from personaplex.cli import build_parser
cases = [["--help"], ["offline", "--help"], ["offline", "--seed", "x"], ["voice", "build", "--help"],
         ["serve", "--help"], ["serve", "--port", "x"], ["client", "--help"], ["loadtest", "--help"],
         ["loadtest", "--clients", "x"], ["scale", "serve", "--help"], ["eval", "fdb", "score", "--help"],
         ["presets", "--help"], ["inspect"]]
for argv in cases:
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit:
        pass
build_parser()  # every command's flags at once
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_help_and_argument_errors_import_neither_torch_nor_scipy():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "personaplex" in imported
    assert not imported & set(HEAVY), f"imported for --help: {sorted(imported & set(HEAVY))}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"personaplex {__version__}"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, summary, _ in COMMANDS:
        assert name in out and summary[:30] in out


@pytest.mark.parametrize("argv", [["offline", "--model", "demo", "--input-wav", "a.wav"],
                                  ["serve", "--model", "demo", "--port", "0"],
                                  ["loadtest", "-n", "2", "--duration", "5"],
                                  ["eval", "fdb", "score", "--data", "d"]])
def test_parsing_one_command_equals_parsing_with_every_command(argv):
    assert vars(build_parser(argv).parse_args(argv)).keys() == vars(build_parser().parse_args(argv)).keys()
    only = {k: v for k, v in vars(build_parser(argv).parse_args(argv)).items() if k != "run"}
    whole = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "run"}
    assert only == whole


def test_loadtest_and_client_default_to_the_same_url():
    loadtest = build_parser().parse_args(["loadtest", "-n", "2", "--duration", "5"])
    client = build_parser().parse_args(["client", "question.wav"])
    assert loadtest.url == client.url == "ws://localhost:8998/api/chat"
    assert loadtest.max_missing == client.max_missing == 1.0
