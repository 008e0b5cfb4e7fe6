"""How a command talks to its user: progress on stderr, and a user-facing error as one line and an exit status."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ..errors import PersonaplexError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def log_to_stderr(level: int | str = logging.INFO) -> None:
    """The servers' log lines on stderr, from ``level`` up: time, level, logger, message."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def announce_ready(info: dict, url: str, extra: str = "") -> None:
    """A server's "ready" lines on stdout (what scripts and the start-up bench wait for): the model, slots and
    queue from ``info`` (``ConversationHub.describe()``), then the address of its web page."""
    from .. import startup

    startup.report("ready to serve, since the process started", startup.seconds_since_process_start())
    print(f"personaplex server ready: model {info['model']}, {info['slots']} conversation slots, "
          f"queue {info['max_queue']}{extra}", flush=True)
    print(f"Access the Web UI directly at {url}", flush=True)


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
