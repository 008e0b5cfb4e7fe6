"""``personaplex serve --front-end-processes N``: the engine in this process, the front ends in N others.

One server process runs every WebSocket, Ogg/Opus codec and jitter buffer on one event loop and one GIL,
next to the engine thread's host work: past some tens of callers that process, not the GPU, is the limit.
With N > 1 this process loads the model and runs the ``ConversationHub`` and an ``EngineHost``
(``serving/engine_host.py``); it starts N front-end processes (``front_end_worker.py``, fresh interpreters,
never forks of a process that initialised CUDA) that each run the whole HTTP server and exchange audio
with the engine through shared memory.

- One port: the listening sockets are made here (``listen_on``), before the weights load (a port in use
  fails at once; ``--port 0`` picks one port for all), and every front-end process inherits them and
  accepts on them: whichever process is free first takes a new connection, and connections waiting in
  the backlog are not lost when a front-end process dies. (``SO_REUSEPORT`` would spread connections
  blindly, reset those queued for a process that dies, and let a second server started on the same port
  silently take half the connections.)
- A front-end process that exits is restarted (at most ``MAX_RESTARTS`` in ``RESTART_WINDOW_SECONDS`` each,
  then it is left stopped and the others serve); only its own calls end, at once.
- SIGINT/SIGTERM: the front-end processes stop (each ends its calls with a reason), then the engine; exit 0.
- Metrics: every process writes its own to a shared folder; ``/metrics`` of any process shows the sum.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from .. import startup
from ..app.console import announce_ready
from ..errors import PersonaplexError
from .listener import bind_listening

log = logging.getLogger("personaplex.server")

LISTEN_BACKLOG = 128  # as a single-process server's
START_TIMEOUT_SECONDS = 120.0  # for a front-end process to listen (imports, the Opus workers, TLS)
STOP_GRACE_SECONDS = 10.0  # for a front-end process to end its calls after SIGTERM, before SIGKILL
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
# Settings that are not serve flags, or that the front-end processes must not receive.
_LOCAL_FLAGS = {"func", "command", "handler"}


class FrontEndStartError(PersonaplexError):
    """A front-end process could not start."""


def listen_on(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> tuple[list[socket.socket], int]:
    """Listening sockets for every address of ``host`` on ``port``; returns them and the port (the one
    picked, for port 0). Made here, before the model loads (a port in use fails at once), and inherited by
    the front-end processes, which accept on them; this process never accepts."""
    infos = socket.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets = bind_listening(infos, port, backlog, reuse_address=True)
    return sockets, sockets[0].getsockname()[1]


def serve_flags(args) -> dict:
    """The serve flags a front-end process runs with (JSON types; paths as strings)."""
    flags = {}
    for name, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        if name in _LOCAL_FLAGS or not _plain(value):  # e.g. the command's function: nothing a front end reads
            continue
        flags[name] = value
    return flags


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


class _FrontEnd:
    def __init__(self, index: int):
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.restarts: deque[float] = deque()
        self.listening = asyncio.Event()
        self.given_up = False


class FrontEndProcesses:
    """Starts, watches, restarts and stops the front-end processes of one server."""

    def __init__(self, count: int, socket_path: str, key: str, metrics_folder: str, listening: list[socket.socket]):
        self.count = count
        self.listen_fds = [sock.fileno() for sock in listening]
        self.socket_path = socket_path
        self.key = key
        self.metrics_folder = metrics_folder
        self.front_ends = [_FrontEnd(index) for index in range(count)]
        self.stopping = False
        self._watchers: set[asyncio.Task] = set()
        from prometheus_client import CollectorRegistry, Counter

        self.restarts = Counter("personaplex_front_end_restarts", "Front-end processes restarted after they exited",
                                registry=CollectorRegistry())

    def listening(self, index: int, pid: int, port: int) -> None:
        """``EngineHost.on_listening``."""
        front_end = self.front_ends[index]
        front_end.listening.set()
        log.info("front-end process %d (pid %d) listens on port %d", index, pid, port)

    async def start(self) -> None:
        for front_end in self.front_ends:
            await self._spawn(front_end)
        waits = [asyncio.create_task(f.listening.wait()) for f in self.front_ends]
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while not all(w.done() for w in waits):
                for front_end in self.front_ends:
                    if front_end.process.returncode is not None and not front_end.listening.is_set():
                        raise FrontEndStartError(
                            f"front-end process {front_end.index} exited while starting (code "
                            f"{front_end.process.returncode}); its messages are above")
                if time.monotonic() > deadline:
                    raise FrontEndStartError(f"the front-end processes did not listen within "
                                             f"{START_TIMEOUT_SECONDS:.0f} s")
                await asyncio.sleep(0.05)
        finally:
            for wait in waits:
                wait.cancel()
        for front_end in self.front_ends:
            self._watch(front_end)

    async def _spawn(self, front_end: _FrontEnd) -> None:
        env = {**os.environ, "PERSONAPLEX_FRONT_END_KEY": self.key, "PROMETHEUS_MULTIPROC_DIR": self.metrics_folder}
        front_end.listening.clear()
        front_end.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "personaplex.server.front_end_worker", "--control", self.socket_path,
            "--index", str(front_end.index), "--listen-fds", ",".join(map(str, self.listen_fds)), env=env,
            stdin=asyncio.subprocess.DEVNULL, pass_fds=self.listen_fds)
        log.info("front-end process %d started (pid %d)", front_end.index, front_end.process.pid)

    def _watch(self, front_end: _FrontEnd) -> None:
        task = asyncio.create_task(self._restart_when_gone(front_end))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _restart_when_gone(self, front_end: _FrontEnd) -> None:
        from ..serving.metrics import forget_process

        process = front_end.process
        code = await process.wait()
        forget_process(process.pid)
        if self.stopping:
            return
        now = time.monotonic()
        while front_end.restarts and front_end.restarts[0] < now - RESTART_WINDOW_SECONDS:
            front_end.restarts.popleft()
        if len(front_end.restarts) >= MAX_RESTARTS:
            front_end.given_up = True
            log.error("front-end process %d (pid %d) exited with code %s, its %d-th time in %.0f s: not restarted; "
                      "the other front-end processes serve", front_end.index, process.pid, code, MAX_RESTARTS,
                      RESTART_WINDOW_SECONDS)
            return
        front_end.restarts.append(now)
        self.restarts.inc()
        log.warning("front-end process %d (pid %d) exited with code %s: its calls ended; restarting it",
                    front_end.index, process.pid, code)
        await self._spawn(front_end)
        self._watch(front_end)

    async def stop(self) -> None:
        """SIGTERM to every front-end process (each ends its calls with a reason), SIGKILL after the grace."""
        self.stopping = True
        running = [f.process for f in self.front_ends if f.process is not None and f.process.returncode is None]
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                log.warning("front-end process pid %d did not stop in %.0f s: killed", process.pid,
                            STOP_GRACE_SECONDS)
                process.kill()
                await process.wait()
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


class Prepared:
    """What ``prepare`` set up: the working folder, the listening sockets and their port."""

    def __init__(self, work: str, sockets: list[socket.socket], port: int):
        self.work, self.sockets, self.port = work, sockets, port

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.work, ignore_errors=True)


def prepare(args) -> Prepared:
    """Before the model loads: a private working folder (control socket, shared metrics) and the listening
    sockets. Shared metrics are switched on here, before the hub creates its metrics."""
    from ..serving.metrics import enable_shared_metrics

    work = tempfile.mkdtemp(prefix="personaplex-serve-")  # mode 0700: only this user reaches the socket
    metrics = Path(work) / "metrics"
    metrics.mkdir()
    enable_shared_metrics(str(metrics))
    try:
        sockets, port = listen_on(args.host, args.port)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise OSError(exc.errno, f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    return Prepared(work, sockets, port)


async def serve_with_front_ends(hub, args, *, work: str, listening: list[socket.socket], url: str,
                                opus_workers: int) -> None:
    """Run the engine here and ``args.front_end_processes`` front-end processes until SIGINT/SIGTERM."""
    from ..serving.engine_host import EngineHost

    count = args.front_end_processes
    flags = serve_flags(args)
    key = secrets.token_hex(32)
    socket_path = str(Path(work) / "control.sock")
    processes = FrontEndProcesses(count, socket_path, key, str(Path(work) / "metrics"), listening)
    per_process_workers = opus_workers // count  # 0: each process encodes its callers' audio itself

    def config_for(index: int) -> dict:
        return {"flags": flags, "processes": count, "opus_workers": per_process_workers}

    await hub.start()
    host = EngineHost(hub, key=key, front_ends=count, config_for=config_for, on_listening=processes.listening)
    await host.start(socket_path)
    log.info("front-end processes connect to %s", socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with startup.phase(f"start {count} front-end processes"):
            starting = asyncio.create_task(processes.start())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if not starting.cancelled() and starting.exception() is not None:
                raise starting.exception()
        if not stop.is_set():
            announce_ready(hub.describe(), url, f", {count} front-end processes")
            await stop.wait()
        print("shutting down: ending conversations", flush=True)
    finally:
        host.stopping = True
        await processes.stop()
        await host.close()
        await hub.close()
        shutil.rmtree(work, ignore_errors=True)
    print("stopped", flush=True)


def run_with_front_ends(args, url_for) -> None:
    """``personaplex serve`` with ``args.front_end_processes`` > 1 (flags checked): the listening sockets
    first, then the model and the hub here, then the front-end processes; returns once stopped.
    ``url_for(port)``: the URL to print."""
    from ..serving.hub import ConversationHub

    try:
        prepared = prepare(args)  # before the hub: its metrics are shared, and a port in use fails fast
    except OSError as exc:
        raise FrontEndStartError(f"{exc.strerror or exc}; pick another --port or --host") from None
    try:
        hub = ConversationHub.from_args(args)
        if hub.model.untrained:
            log.info("note: the demo model has random, untrained weights: it babbles")
        asyncio.run(serve_with_front_ends(hub, args, work=prepared.work, listening=prepared.sockets,
                                          url=url_for(prepared.port), opus_workers=args.opus_workers))
    finally:
        prepared.close()
