"""The user-audio jitter buffer between a network front end and the engine's fixed 80 ms tick.

Policy (the same for every front end):

- **Too fast / bursts**: samples are buffered up to ``capacity_frames`` model frames; past that the
  *oldest* samples are dropped (counted), so a client that runs ahead never adds more than
  ``capacity_frames`` x 80 ms of latency and memory stays bounded.
- **Steadily ahead** (a client clock a little fast, or one burst that never drained): when the buffer
  never fell below ``target_frames`` during the last ``trim_window`` frames, the oldest audio above that
  level is dropped (counted), so latency returns to the target instead of staying at the capacity.
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
    def __init__(self, frame_size: int, capacity_frames: int, target_frames: int = 2, trim_window: int = 25):
        if capacity_frames < 1:
            raise ValueError("capacity_frames must be at least 1")
        self.frame_size = frame_size
        self.capacity = capacity_frames * frame_size  # samples
        self.target = min(target_frames, capacity_frames) * frame_size
        self.trim_window = trim_window
        self._lowest = self.capacity  # the fewest samples left after a pop in the current window
        self._pops = 0
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
            self._drop_oldest(self._buffered - self.capacity)

    def _drop_oldest(self, count: int) -> None:
        while count > 0:
            head = self._chunks[0]
            if head.size <= count:
                self._chunks.popleft()
                taken = head.size
            else:
                self._chunks[0] = head[count:]
                taken = count
            self._buffered -= taken
            self.dropped_samples += taken
            count -= taken

    def pop_frame(self) -> np.ndarray:
        """One frame [frame_size] float32: the oldest buffered samples, or silence on an underrun."""
        with self._lock:
            frame = self._pop()
            self._lowest = min(self._lowest, self._buffered)
            self._pops += 1
            if self._pops >= self.trim_window:
                self._drop_oldest(self._lowest - self.target)
                self._lowest, self._pops = self.capacity, 0
            return frame

    def _pop(self) -> np.ndarray:
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
