"""Start-up progress on the console: what is being loaded or captured, and how long it took.

A GPU server spends its start reading weights, building the engine and capturing one CUDA graph per
batch bucket (plus, with the "compile" kernels, compiling them): each phase is logged as it ends, as
``start-up: <phase> in <seconds> s``, so that someone waiting sees why (``bench/startup.py`` reads
these lines to tabulate a start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

log = logging.getLogger("personaplex.startup")
_IMPORTED = time.monotonic()


def seconds_since_process_start() -> float:
    """Wall time since this process started (Linux: from /proc; elsewhere since this module's import)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def report(phase: str, seconds: float, detail: str = "") -> None:
    log.info("start-up: %s in %.2f s%s", phase, seconds, f" ({detail})" if detail else "")


def begin(phase: str) -> None:
    """Say that a phase that may take long has started."""
    log.info("start-up: %s ...", phase)


@contextlib.contextmanager
def phase(name: str, detail: str = "", announce: bool = False) -> Iterator[None]:
    """Time the block and report it as ``name`` (``announce``: also say when it starts)."""
    if announce:
        begin(name)
    started = time.perf_counter()
    yield
    report(name, time.perf_counter() - started, detail)
