"""Persona builds (voice decoding, Mimi encoding, tokenizing) on a few worker threads of their own.

A build costs up to seconds of CPU (a 30 s voice sample is 375 Mimi frames), so builds are

- admitted: a caller whose build would exceed ``workers + max_waiting`` builds in progress is refused
  at once (``BuildsBusy``), before any work;
- bounded: ``workers`` threads run builds, at a lower CPU priority than the engine thread (Linux: a
  thread's nice value is its own), so that a flood of builds slows other builds, not live conversations;
- off the event loop: the loop only awaits a future;
- never waited for at shutdown: the threads are daemons (``asyncio.run`` joins only its default
  executor's threads), ``close`` fails every waiting build and asks the running ones to stop at their
  next chunk (``cancelled()`` turns True).

The same persona asked for by several callers at once is built once (they share the result).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import PersonaplexError

log = logging.getLogger("personaplex.serving")

BUILD_NICE = 10  # added to the worker threads' nice value: the engine thread wins the CPU


class BuildsBusy(PersonaplexError):
    """Too many persona builds are in progress; try again shortly."""


class BuildsClosed(PersonaplexError):
    """The builds were stopped (the server is shutting down)."""


class _Job:
    def __init__(self, key: Hashable, work: Callable[[Callable[[], bool]], Any], future: asyncio.Future):
        self.key = key
        self.work = work
        self.future = future
        self.cancel = threading.Event()


class PersonaBuilds:
    """Runs build functions ``work(cancelled) -> result`` on ``workers`` daemon threads; see the module doc."""

    def __init__(self, workers: int = 1, max_waiting: int = 8, *, nice: int = BUILD_NICE):
        if workers < 1 or max_waiting < 0:
            raise ValueError("persona builds need at least 1 worker and max_waiting >= 0")
        self.workers = workers
        self.max_waiting = max_waiting
        self._nice = nice
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight: dict[Hashable, _Job] = {}  # queued or running, by key (event loop only)
        self._counts = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.started = 0  # builds started so far
        self.finished = 0  # builds that ran to the end (a result or an error of their own)
        self.abandoned = 0  # builds that stopped early because they were cancelled
        self.refused = 0  # callers refused because too many builds were in progress
        self.running = 0  # builds running right now (at most ``workers``)
        self.peak_running = 0

    @property
    def in_progress(self) -> int:
        """Builds queued or running right now."""
        return len(self._in_flight)

    async def run(self, key: Hashable, work: Callable[[Callable[[], bool]], Any]) -> Any:
        """The result of ``work`` for ``key`` (shared with a build of the same key already in progress).
        Raises ``BuildsBusy`` when ``workers + max_waiting`` builds are in progress, ``BuildsClosed``
        after ``close``, or what ``work`` raised."""
        if self._closed:
            raise BuildsClosed("the server is shutting down")
        job = self._in_flight.get(key)
        if job is None:
            if len(self._in_flight) >= self.workers + self.max_waiting:
                self.refused += 1
                raise BuildsBusy(f"the server is busy: {len(self._in_flight)} persona builds are in progress already; "
                                 "try again in a few seconds")
            self._start_threads()
            job = _Job(key, work, asyncio.get_running_loop().create_future())
            self._in_flight[key] = job
            job.future.add_done_callback(lambda _, job=job: self._forget(job))
            self._jobs.put(job)
        # Shielded: a caller that leaves does not cancel a build that others (or the cache) may use.
        return await asyncio.shield(job.future)

    def close(self, reason: str = "the server is shutting down") -> None:
        """Fail every build not finished yet and stop the threads (running builds stop at their next
        chunk; nobody waits for them). Call on the event loop."""
        self._closed = True
        for job in list(self._in_flight.values()):
            job.cancel.set()
            if not job.future.done():
                job.future.set_exception(BuildsClosed(reason))
                job.future.exception()  # retrieved: its callers may have left
        for _ in self._threads:
            self._jobs.put(None)

    def _forget(self, job: _Job) -> None:
        if self._in_flight.get(job.key) is job:
            del self._in_flight[job.key]

    def _start_threads(self) -> None:
        while len(self._threads) < self.workers:
            thread = threading.Thread(target=self._work, name=f"personaplex-persona-{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        try:  # Linux: a thread's nice value is its own (and its children's, e.g. the math library's threads)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        except (AttributeError, OSError, ValueError):
            pass
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set() or job.future.done():
                continue
            with self._counts:
                self.started += 1
                self.running += 1
                self.peak_running = max(self.peak_running, self.running)
            try:
                result, error = job.work(job.cancel.is_set), None
            except BaseException as exc:  # handed to the awaiting callers
                result, error = None, exc
            with self._counts:
                self.running -= 1
                if job.cancel.is_set():
                    self.abandoned += 1
                else:
                    self.finished += 1
            loop = job.future.get_loop()
            try:
                loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
        future.exception()  # retrieved: every caller may have left
    else:
        future.set_result(result)
