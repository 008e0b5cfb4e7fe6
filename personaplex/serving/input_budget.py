"""What one client may send: user audio at real time plus a burst, and a bounded message rate.

Every front end checks each incoming message against its connection's ``InputBudget`` *before* it
parses or decodes it, so a client that floods the server is refused with almost no work done for it:

- **Messages**: a token bucket of ``max_messages_per_second`` that holds ``burst_seconds`` worth of
  messages. Real clients send 12-50 messages a second (one per 20-80 ms of audio).
- **Audio**: a token bucket of audio seconds filled at real time (1 s per second), holding
  ``burst_seconds`` (what a client may send ahead, e.g. after a network stall). A message is decoded
  only while the bucket is not empty; its decoded duration is then taken out. A new connection starts
  with ``INITIAL_AUDIO_SECONDS`` (the bucket fills from there, also while the persona is applied), so
  that reconnecting does not buy a whole burst each time.

A client over either budget is ended by its front end with a reason (``InputRateExceeded``): sending
faster than real time serves no conversation, and the work it causes would be taken from everyone else.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import PersonaplexError


INITIAL_AUDIO_SECONDS = 1.0


class InputRateExceeded(PersonaplexError):
    """The client sent more than its budget; the message says which and what the limit is."""


class InputBudget:
    def __init__(self, burst_seconds: float = 3.0, max_messages_per_second: float = 200.0,
                 clock: Callable[[], float] = time.monotonic):
        if burst_seconds <= 0 or max_messages_per_second <= 0:
            raise ValueError("burst_seconds and max_messages_per_second must be positive")
        self.burst_seconds = burst_seconds
        self.max_messages_per_second = max_messages_per_second
        self._clock = clock
        self._updated = clock()
        self._audio = min(burst_seconds, INITIAL_AUDIO_SECONDS)  # seconds the client may still send ahead
        self._messages = burst_seconds * max_messages_per_second
        self.messages = 0  # accepted so far
        self.audio_seconds = 0.0  # decoded so far

    def _refill(self) -> None:
        now = self._clock()
        elapsed, self._updated = now - self._updated, now
        self._audio = min(self.burst_seconds, self._audio + elapsed)
        self._messages = min(self.burst_seconds * self.max_messages_per_second,
                             self._messages + elapsed * self.max_messages_per_second)

    def take_message(self) -> None:
        """Count one incoming message; raises ``InputRateExceeded`` past the message rate."""
        self._refill()
        if self._messages < 1:
            raise InputRateExceeded(f"the client sends more than {self.max_messages_per_second:g} messages a "
                                    "second (send audio in chunks of 20-100 ms, in real time)")
        self._messages -= 1
        self.messages += 1

    def check_audio(self) -> None:
        """Before decoding an audio message: raises ``InputRateExceeded`` when the client is already more
        than the burst ahead of real time."""
        self._refill()
        if self._audio <= 0:
            raise InputRateExceeded(f"the client sends audio faster than real time (more than "
                                    f"{self.burst_seconds:g} s ahead); stream it as it is recorded")

    def spend_audio(self, seconds: float) -> None:
        """After decoding: take the message's duration (seconds) out of the audio bucket."""
        self._audio -= seconds
        self.audio_seconds += seconds
