"""The user-audio jitter buffer between a network front end and the engine's fixed 80 ms tick.

Policy (the same for every front end):

- **Too fast / bursts**: samples are buffered up to ``capacity_frames`` model frames; past that the
  *oldest* samples are dropped (counted), so a client that runs ahead never adds more than
  ``capacity_frames`` x 80 ms of latency and memory stays bounded.
- **Too slow**: a tick that finds less than one full frame takes a frame of silence instead (an
  underrun, counted); the partial samples stay and are used once the rest arrives, so the audio that
  did arrive is never cut.
- **Stopped sending**: the engine asks ``idle_seconds``; the hub ends a conversation whose client has
  sent nothing for longer than its input timeout.

The network side calls ``push`` (any length, any thread); the engine thread calls ``pop_frame``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class InputJitterBuffer:
    def __init__(self, frame_size: int, capacity_frames: int):
        if capacity_frames < 1:
            raise ValueError("capacity_frames must be at least 1")
        self.frame_size = frame_size
        self.capacity = capacity_frames * frame_size  # samples
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._last_push = time.monotonic()
        self.received_samples = 0
        self.dropped_samples = 0  # oldest samples discarded because the client ran ahead
        self.underruns = 0  # frames of silence given because too little had arrived

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    def push(self, pcm: np.ndarray) -> None:
        """Append float32 mono 24 kHz samples [T]; drops the oldest samples past the capacity."""
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._lock:
            self._last_push = time.monotonic()
            if samples.size == 0:
                return
            self.received_samples += samples.size
            if samples.size >= self.capacity:
                self.dropped_samples += self._buffered + samples.size - self.capacity
                self._chunks.clear()
                self._chunks.append(samples[-self.capacity :].copy())
                self._buffered = self.capacity
                return
            self._chunks.append(samples.copy())
            self._buffered += samples.size
            excess = self._buffered - self.capacity
            while excess > 0:
                head = self._chunks[0]
                if head.size <= excess:
                    self._chunks.popleft()
                    taken = head.size
                else:
                    self._chunks[0] = head[excess:]
                    taken = excess
                self._buffered -= taken
                self.dropped_samples += taken
                excess -= taken

    def pop_frame(self) -> np.ndarray:
        """One frame [frame_size] float32: the oldest buffered samples, or silence on an underrun."""
        with self._lock:
            if self._buffered < self.frame_size:
                self.underruns += 1
                return np.zeros(self.frame_size, dtype=np.float32)
            frame = np.empty(self.frame_size, dtype=np.float32)
            filled = 0
            while filled < self.frame_size:
                head = self._chunks[0]
                take = min(head.size, self.frame_size - filled)
                frame[filled : filled + take] = head[:take]
                if take == head.size:
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
                filled += take
            self._buffered -= self.frame_size
            return frame

    def idle_seconds(self, now: float | None = None) -> float:
        """Seconds since the client last sent audio (or since the buffer was made)."""
        return (now if now is not None else time.monotonic()) - self._last_push

    def reset_idle(self) -> None:
        with self._lock:
            self._last_push = time.monotonic()
