"""The agent's Opus encoding in worker processes, so that the event loop only moves bytes.

Encoding 80 ms of agent audio takes the Opus library ~0.6-1.4 ms, during which it holds the GIL: with
the server's event loop doing it for every caller it was three quarters of the loop's work
(``bench/server_front_end.py --profile``), and the loop fell behind at a few dozen callers while the GPU
had time to spare. Here each conversation's encoder lives in one of a few worker processes (chosen
round robin); the loop sends it the frame's samples and awaits the finished Ogg pages, byte for byte
what ``OpusPageWriter`` produces in-process.

A worker that dies ends only the conversations whose streams it held (their next frame fails); new
conversations go to the workers left, or are encoded in-process when none is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection

import numpy as np

from ..ogg import OpusPageWriter, PageStream

log = logging.getLogger("personaplex.server")


class OpusWorkerError(RuntimeError):
    """The worker process that held this stream's encoder is gone."""


def _serve(conn: Connection) -> None:
    """A worker's loop: one ``OpusPageWriter`` per open stream; requests are answered in order."""
    # Ctrl-C in a terminal reaches the whole process group: the server decides when its workers stop (after
    # its conversations were told it is shutting down), not the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writers: dict[int, OpusPageWriter] = {}
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        kind, stream = request[0], request[1]
        if kind == "append":
            writer = writers.get(stream)
            if writer is None:
                writer = writers[stream] = OpusPageWriter()
            try:
                pages = writer.append(np.frombuffer(request[3], dtype=np.float32))
                conn.send((request[2], pages, writer.position(), None))
            except Exception as exc:  # noqa: BLE001 - reported to the one stream that asked
                conn.send((request[2], [], writer.position(), f"{type(exc).__name__}: {exc}"))
        elif kind == "close":
            writers.pop(stream, None)
        elif kind == "stop":
            return


class _Worker:
    def __init__(self, context, loop: asyncio.AbstractEventLoop, index: int):
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child,), name=f"personaplex-opus-{index}", daemon=True)
        self.process.start()
        child.close()
        self.loop = loop
        self.pending: dict[int, asyncio.Future] = {}
        self.alive = True
        loop.add_reader(self.conn.fileno(), self._readable)

    def request(self, message: tuple, request_id: int) -> asyncio.Future:
        future = self.loop.create_future()
        if not self.alive:
            future.set_exception(OpusWorkerError("the Opus encoder process of this conversation stopped"))
            return future
        self.pending[request_id] = future
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            self._lost()
        return future

    def send(self, message: tuple) -> None:
        if self.alive:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self._lost()

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                request_id, pages, position, error = self.conn.recv()
                future = self.pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if error is None:
                    future.set_result((pages, position))
                else:
                    future.set_exception(OpusWorkerError(f"Opus encoding failed: {error}"))
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        log.error("Opus encoder process %s stopped (exit code %s); its conversations end",
                  self.process.name, self.process.exitcode)
        self.loop.remove_reader(self.conn.fileno())
        for future in self.pending.values():
            if not future.done():
                future.set_exception(OpusWorkerError("the Opus encoder process of this conversation stopped"))
        self.pending.clear()

    def shut_down(self) -> None:
        """Ask the worker to exit (on the event loop's thread); ``join`` waits for it."""
        if self.alive:
            self.send(("stop", 0))
            self.loop.remove_reader(self.conn.fileno())
            self.alive = False

    def join(self) -> None:
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=2)
        self.conn.close()


class PooledPageWriter(PageStream):
    """``OpusPageWriter``'s interface (``encode``, ``finish``, ``close``) over an encoder in a worker."""

    def __init__(self, worker: _Worker, stream: int, ids: itertools.count):
        super().__init__()
        self._worker, self._stream, self._ids = worker, stream, ids

    async def encode(self, pcm: np.ndarray) -> list[bytes]:
        samples = np.ascontiguousarray(np.asarray(pcm, dtype=np.float32).reshape(-1))
        request_id = next(self._ids)
        pages, (self._serial, self._sequence, self._granule) = await self._worker.request(
            ("append", self._stream, request_id, samples.tobytes()), request_id
        )
        return pages

    def close(self) -> None:
        """Release the encoder in its worker (after ``finish``; the stream is over)."""
        self._worker.send(("close", self._stream))


class OpusEncoderPool:
    """``workers`` processes that encode the agent's audio for every conversation of a server."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError("an Opus encoder pool needs at least one worker")
        self.size = workers
        self._workers: list[_Worker] = []
        self._streams = itertools.count()
        self._requests = itertools.count()
        self._next = itertools.count()
        self.started = False

    async def start(self) -> None:
        """Start the worker processes (spawned: the server process may hold CUDA state and threads), tied
        to the running event loop: the one that serves the conversations."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(context, loop, index) for index in range(self.size)]
        self.started = True

    def open(self) -> PooledPageWriter | OpusPageWriter:
        """A page writer for one new stream: in a live worker, or in-process when none is left."""
        alive = [worker for worker in self._workers if worker.alive]
        if not alive:
            return OpusPageWriter()
        worker = alive[next(self._next) % len(alive)]
        return PooledPageWriter(worker, next(self._streams), self._requests)

    async def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.shut_down()
        await asyncio.gather(*(asyncio.to_thread(worker.join) for worker in workers))

    @property
    def alive(self) -> int:
        return sum(worker.alive for worker in self._workers)
