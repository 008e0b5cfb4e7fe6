"""Logging what clients can cause at will, without letting them fill the disk."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("personaplex.server")
LOG_INTERVAL_SECONDS = 10.0


class RateLimitedLog:
    """Log a recurring event at most once per interval, saying how many were not logged: what a client can
    trigger at will must not be able to fill the disk."""

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL_SECONDS):
        self.logger = logger
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last message)"
        self._last, self._suppressed = now, 0
        self.logger.log(level, message, *args)
