"""The hub of one scale-out replica: a ``ConversationHub`` that names its replica and keeps its own figures.

The load reports (``0x04`` metadata, ``/api/health``) carry the replica's name, so a client and an operator
see which replica holds a conversation; ``stats()`` gives what the scale-out benchmark and ``personaplex
scale status`` compare across replicas (conversations opened, slots busy, frame-time percentiles).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque

import numpy as np

from ..serving.hub import ConversationHub

RECENT_TICKS = 100_000  # about 2 h of 80 ms ticks


class _TickRecorder:
    """Stands in for the hub's tick histogram: forwards every observation and keeps the recent ones with
    their time, so that percentiles over a recent window are exact rather than bucketed."""

    def __init__(self, histogram):
        self._histogram = histogram
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_TICKS)

    def observe(self, seconds: float) -> None:
        self.recent.append((time.monotonic(), seconds))
        self._histogram.observe(seconds)

    def since(self, start: float) -> np.ndarray:
        return np.array([seconds for at, seconds in list(self.recent) if at >= start], dtype=np.float64)


class ReplicaHub(ConversationHub):
    """A ``ConversationHub`` for one replica of a scale-out deployment."""

    def __init__(self, model, options=None, *, engine=None, replica: str = ""):
        super().__init__(model, options, engine=engine)
        self.replica = replica
        self.opened = 0
        self._ticks = _TickRecorder(self.metrics.tick_seconds)
        self.metrics.tick_seconds = self._ticks  # the engine thread observes through the recorder

    async def open(self, request, *, front_end: str, on_queue_position=None, **options):
        conversation = await super().open(request, front_end=front_end, on_queue_position=on_queue_position,
                                          **options)
        self.opened += 1
        return conversation

    def load(self) -> dict:
        return {**super().load(), "replica": self.replica}

    def stats(self, window_seconds: float = 30.0) -> dict:
        """This replica's figures: who it is, its load, conversations opened, and the frame times (ms) of the
        ticks of the last ``window_seconds`` (ticks run only while conversations are live or joining)."""
        ticks = self._ticks.since(time.monotonic() - window_seconds) * 1000
        skipped = self.metrics.registry.get_sample_value("personaplex_skipped_ticks_total") or 0.0
        return {
            "replica": self.replica, "pid": os.getpid(), "host": socket.gethostname(),
            "device": str(self.model.lm.device), **super().load(), "slots": self.engine.max_slots,
            "conversations_opened": self.opened, "ticks": int(ticks.size),
            "tick_p50_ms": float(np.percentile(ticks, 50)) if ticks.size else None,
            "tick_p99_ms": float(np.percentile(ticks, 99)) if ticks.size else None,
            "tick_max_ms": float(ticks.max()) if ticks.size else None,
            "window_seconds": window_seconds, "late_ticks_total": self.late_ticks, "skipped_ticks_total": int(skipped),
        }
