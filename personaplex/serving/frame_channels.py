"""Shared-memory channels between a front-end process and the engine process: user audio in, agent frames out.

One block of shared memory per front-end process holds ``channels`` channels; a conversation of that
process uses one channel from its join until both sides are done with it. Each channel has

- an **input ring** (front end writes, engine reads): ``INPUT_RING_SAMPLES`` float32 samples of the
  caller's 24 kHz PCM and two int64 counters, samples ever written (front end) and samples ever read
  (engine). Single producer, single consumer: no lock, only the counters move.
- an **output ring** (engine writes, front end reads): ``OUTPUT_RING_FRAMES`` agent frames (1920 float32
  samples + the frame's text piece, UTF-8, at most ``MAX_TEXT_BYTES``) and one int64 counter, frames ever
  written. The engine writes a frame's data before its counter, the front end reads the counter before
  the data (the stores are ordered on x86-64 and the reads of one process see them in order).

The counters that the engine reads are written by the front end, which the engine does not trust: every
read is checked (``InputRing.take``) and a counter out of range resynchronises the ring, drops what it held
and is reported; nothing a front end writes here can make the engine read outside the block. Samples are
copied out, made finite and bounded before they reach the engine.

Layout of a channel (bytes): input counters [16] · input samples [4 x INPUT_RING_SAMPLES] · output counter [8]
· output frames [OUTPUT_RING_FRAMES x (4 x FRAME_SIZE)] · text lengths [4 x OUTPUT_RING_FRAMES] · text
[MAX_TEXT_BYTES x OUTPUT_RING_FRAMES].
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from ..config import FRAME_SIZE

INPUT_RING_SAMPLES = 1 << 15  # 1.37 s at 24 kHz: the engine empties it every 80 ms tick
OUTPUT_RING_FRAMES = 32  # 2.56 s of agent frames: more than a slow reader may fall behind (2 s) before it is ended
# Samples reach the engine within +-MAX_SAMPLE: decoded audio stays within about +-1.2 (unchanged here, as in
# one process), whatever a broken front end writes.
MAX_SAMPLE = 2.0
MAX_TEXT_BYTES = 252  # one frame's text piece (a token: a few characters); longer pieces are cut at a character

_INPUT_COUNTERS = 16
_INPUT_BYTES = 4 * INPUT_RING_SAMPLES
_OUTPUT_COUNTER = 8
_OUTPUT_FRAME_BYTES = 4 * FRAME_SIZE * OUTPUT_RING_FRAMES
_TEXT_LENGTHS = 4 * OUTPUT_RING_FRAMES
_TEXT_BYTES = MAX_TEXT_BYTES * OUTPUT_RING_FRAMES
CHANNEL_BYTES = _INPUT_COUNTERS + _INPUT_BYTES + _OUTPUT_COUNTER + _OUTPUT_FRAME_BYTES + _TEXT_LENGTHS + _TEXT_BYTES


class ChannelBroken(Exception):
    """A ring's counters are out of range (a front end wrote garbage, or fell too far behind)."""


class InputRing:
    """The caller's audio of one channel, front end -> engine."""

    def __init__(self, buffer: memoryview, offset: int):
        self._counters = np.ndarray((2,), dtype=np.int64, buffer=buffer, offset=offset)  # [written, read]
        self._samples = np.ndarray((INPUT_RING_SAMPLES,), dtype=np.float32, buffer=buffer,
                                   offset=offset + _INPUT_COUNTERS)

    def reset(self) -> None:
        self._counters[:] = 0

    def put(self, pcm: np.ndarray) -> int:
        """Front end: append float32 samples; returns how many did not fit (dropped, the newest)."""
        written, read = int(self._counters[0]), int(self._counters[1])
        room = INPUT_RING_SAMPLES - (written - read)
        count = min(len(pcm), max(0, room))
        start = written % INPUT_RING_SAMPLES
        first = min(count, INPUT_RING_SAMPLES - start)
        self._samples[start:start + first] = pcm[:first]
        self._samples[:count - first] = pcm[first:count]
        self._counters[0] = written + count  # after the samples: the engine reads the counter first
        return len(pcm) - count

    def take(self) -> np.ndarray | None:
        """Engine: every sample written since the last call (a copy, finite, within +-MAX_SAMPLE); None when empty.
        Raises ``ChannelBroken`` (after resynchronising) when the front end's counter is out of range."""
        written, read = self._counters.tolist()
        available = written - read
        if available == 0:
            return None
        if not 0 < available <= INPUT_RING_SAMPLES:
            self._counters[1] = written
            raise ChannelBroken(f"input counter out of range ({available} samples)")
        start = read % INPUT_RING_SAMPLES
        if start + available <= INPUT_RING_SAMPLES:
            pcm = self._samples[start:start + available].copy()
        else:
            pcm = np.concatenate((self._samples[start:], self._samples[:start + available - INPUT_RING_SAMPLES]))
        self._counters[1] = written
        # Two reductions in the common case (NaN fails both comparisons), the repair only when needed.
        if not (-MAX_SAMPLE <= pcm.min() and pcm.max() <= MAX_SAMPLE):
            np.nan_to_num(pcm, copy=False, nan=0.0, posinf=MAX_SAMPLE, neginf=-MAX_SAMPLE)
            np.clip(pcm, -MAX_SAMPLE, MAX_SAMPLE, out=pcm)
        return pcm

    @property
    def waiting_samples(self) -> int:
        return max(0, int(self._counters[0]) - int(self._counters[1]))


class OutputRing:
    """The agent's frames of one channel, engine -> front end."""

    def __init__(self, buffer: memoryview, offset: int):
        self._written = np.ndarray((1,), dtype=np.int64, buffer=buffer, offset=offset)
        offset += _OUTPUT_COUNTER
        self._pcm = np.ndarray((OUTPUT_RING_FRAMES, FRAME_SIZE), dtype=np.float32, buffer=buffer, offset=offset)
        offset += _OUTPUT_FRAME_BYTES
        self._text_lengths = np.ndarray((OUTPUT_RING_FRAMES,), dtype=np.int32, buffer=buffer, offset=offset)
        offset += _TEXT_LENGTHS
        self._text = np.ndarray((OUTPUT_RING_FRAMES, MAX_TEXT_BYTES), dtype=np.uint8, buffer=buffer, offset=offset)

    def reset(self) -> None:
        self._written[0] = 0

    @property
    def written(self) -> int:
        return int(self._written[0])

    def put(self, pcm: np.ndarray, text: str | None) -> int:
        """Engine: append one frame (float32 [FRAME_SIZE], its text piece or None); returns frames written."""
        index = int(self._written[0])
        row = index % OUTPUT_RING_FRAMES
        self._pcm[row] = pcm
        data = _cut_utf8(text.encode("utf-8"), MAX_TEXT_BYTES) if text else b""
        self._text[row, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._text_lengths[row] = len(data) if text else -1  # -1: no text piece (padding)
        self._written[0] = index + 1
        return index + 1

    def get(self, index: int) -> tuple[np.ndarray, str | None]:
        """Front end: frame ``index`` (0-based, < ``written``; a copy). Raises ``ChannelBroken`` when it was
        already overwritten (the front end fell more than ``OUTPUT_RING_FRAMES`` behind)."""
        if not self.written - OUTPUT_RING_FRAMES <= index < self.written:
            raise ChannelBroken(f"agent frame {index} is no longer in the ring ({self.written} written)")
        row = index % OUTPUT_RING_FRAMES
        pcm = self._pcm[row].copy()
        length = int(self._text_lengths[row])
        text = bytes(self._text[row, :length]).decode("utf-8", "replace") if length >= 0 else None
        if self.written - OUTPUT_RING_FRAMES > index:  # overwritten while being copied
            raise ChannelBroken(f"agent frame {index} was overwritten while read")
        return pcm, text


def _cut_utf8(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


_CREATED_HERE: set[str] = set()  # blocks this process created (and registered with its resource tracker)


@dataclass
class Channel:
    input: InputRing
    output: OutputRing

    def reset(self) -> None:
        self.input.reset()
        self.output.reset()


class ChannelBlock:
    """The shared memory of one front-end process: ``count`` channels. The engine process creates it (and
    unlinks it); the front-end process attaches by name."""

    def __init__(self, memory: shared_memory.SharedMemory, count: int, owner: bool):
        if memory.size < count * CHANNEL_BYTES:
            raise ValueError(f"shared memory {memory.name} holds {memory.size} bytes, {count} channels need "
                             f"{count * CHANNEL_BYTES}")
        self.memory = memory
        self.count = count
        self.owner = owner
        buffer = memory.buf
        self.channels = []
        for index in range(count):
            base = index * CHANNEL_BYTES
            self.channels.append(Channel(InputRing(buffer, base),
                                         OutputRing(buffer, base + _INPUT_COUNTERS + _INPUT_BYTES)))

    @property
    def name(self) -> str:
        return self.memory.name

    @classmethod
    def create(cls, count: int) -> ChannelBlock:
        memory = shared_memory.SharedMemory(create=True, size=max(1, count) * CHANNEL_BYTES)
        _CREATED_HERE.add(memory._name)  # noqa: SLF001 - see attach
        block = cls(memory, count, owner=True)
        for channel in block.channels:
            channel.reset()
        return block

    @classmethod
    def attach(cls, name: str, count: int) -> ChannelBlock:
        memory = shared_memory.SharedMemory(name=name, create=False)
        # Python < 3.13 registers an attached block with this process's resource tracker, which would unlink
        # it when this process exits: the engine process owns it (and unlinks it), so it is unregistered here
        # (unless this process created it: one registration, which its unlink removes).
        if memory._name in _CREATED_HERE:  # noqa: SLF001
            return cls(memory, count, owner=False)
        try:
            from multiprocessing import resource_tracker

            resource_tracker.unregister(memory._name, "shared_memory")  # noqa: SLF001 - see above
        except Exception:  # noqa: BLE001 - a Python that does not track attached blocks
            pass
        return cls(memory, count, owner=False)

    def close(self) -> None:
        """Detach (and unlink, for the owner). Views into the block must be gone first."""
        self.channels = []
        try:
            self.memory.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                self.memory.unlink()
            except FileNotFoundError:
                pass
            _CREATED_HERE.discard(self.memory._name)  # noqa: SLF001
