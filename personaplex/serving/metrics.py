"""Prometheus metrics of one hub: conversations, the engine tick, errors, sessions per front end.

Each hub has its own registry (several hubs in one process, as in tests, never share counters);
``render()`` gives the Prometheus text exposition format for a ``/metrics`` endpoint.

A server of several processes (``personaplex serve --front-end-processes N``) calls
``enable_shared_metrics(folder)`` in every process before any metric exists: each process then keeps its
values in files of that folder (prometheus_client's multiprocess mode) and ``render()`` in any of them
gives the sum over all processes, those that exited included (their counters stay counted). Gauges sum
over the live processes (only the engine process sets them).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series double the output and say nothing a server needs

PREFIX = "personaplex"
# Tick durations around the 80 ms budget, finer below it.
TICK_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0)
# Conversation lengths: around the 4-minute context of PersonaPlex-7B, up to support-call lengths.
CONVERSATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 240.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0)
JOIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
GAUGE_MODE = "livesum"  # with shared metrics: a gauge is the sum over the live processes

_shared_folder: str | None = None


def enable_shared_metrics(folder: str) -> None:
    """Keep this process's metrics in ``folder``, shared with the other processes of the same server (see
    the module's notes). Call before the first ``HubMetrics``; the folder must be empty at the server's start."""
    global _shared_folder
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # read by prometheus_client's collector
    values.ValueClass = values.MultiProcessValue()
    _shared_folder = folder


def forget_process(pid: int) -> None:
    """With shared metrics: drop the gauges of an exited process (its counters stay in the sums)."""
    if _shared_folder is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _shared_folder)


class HubMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.slots = Gauge(f"{PREFIX}_slots", "Conversation slots of the engine", registry=r,
                           multiprocess_mode=GAUGE_MODE)
        self.active = Gauge(f"{PREFIX}_conversations_active", "Conversations holding a slot (live or joining)",
                            registry=r, multiprocess_mode=GAUGE_MODE)
        self.queued = Gauge(f"{PREFIX}_conversations_queued", "Conversations waiting for a free slot", registry=r,
                            multiprocess_mode=GAUGE_MODE)
        self.sessions = Counter(f"{PREFIX}_sessions", "Conversations opened, per front end", ["front_end"],
                                registry=r)
        # Every frame the engine stepped for a conversation (one per tick while it is live): what a client
        # should have received, whatever the machine's speed (a slow machine skips ticks, see skipped_ticks).
        self.agent_frames = Counter(f"{PREFIX}_agent_frames", "Agent frames (80 ms) stepped for conversations, "
                                    "per front end", ["front_end"], registry=r)
        self.ended = Counter(f"{PREFIX}_conversations_ended", "Conversations ended, per reason", ["reason"],
                             registry=r)
        self.refused = Counter(f"{PREFIX}_conversations_refused", "Conversations refused because the queue was full",
                               registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Errors, per kind", ["kind"], registry=r)
        self.tick_seconds = Histogram(f"{PREFIX}_tick_seconds", "Engine work per 80 ms tick (step and join work)",
                                      buckets=TICK_BUCKETS, registry=r)
        self.late_ticks = Counter(f"{PREFIX}_late_ticks", "Ticks that finished after the next tick was due",
                                  registry=r)
        self.skipped_ticks = Counter(f"{PREFIX}_skipped_ticks",
                                     "Tick times dropped because the engine fell more than one tick behind", registry=r)
        self.join_seconds = Histogram(f"{PREFIX}_join_seconds", "From a slot being granted to the persona applied",
                                      buckets=JOIN_BUCKETS, registry=r)
        # Counted when the engine takes the join, with the policy it was given: how many calls keep their persona.
        self.joins = Counter(f"{PREFIX}_conversation_joins", "Conversations joined to an engine slot, per context "
                             "policy (what a conversation keeps past the model's context)", ["context_policy"],
                             registry=r)
        self.conversation_seconds = Histogram(
            f"{PREFIX}_conversation_seconds", "Length of ended conversations (agent frames stepped, in seconds)",
            buckets=CONVERSATION_BUCKETS, registry=r)
        self.input_dropped = Counter(f"{PREFIX}_input_dropped_seconds",
                                     "User audio dropped because a client sent faster than real time", registry=r)
        self.input_underruns = Counter(f"{PREFIX}_input_underrun_frames",
                                       "Frames of silence used because a client's audio had not arrived", registry=r)
        self.input_decoded = Counter(f"{PREFIX}_input_decoded_seconds", "User audio decoded, per front end",
                                     ["front_end"], registry=r)
        self.input_refused = Counter(f"{PREFIX}_input_refused_messages",
                                     "Client messages refused without being decoded, per reason", ["reason"],
                                     registry=r)
        self.connections_refused = Counter(f"{PREFIX}_connections_refused",
                                           "Connections refused or dropped, per reason: idle_dropped (the oldest idle "
                                           "one, at the connection limit), all_busy (the new one, at the limit), "
                                           "new_connection_rate (an address opening them too fast)", ["reason"],
                                           registry=r)
        for reason in ("idle_dropped", "all_busy", "new_connection_rate"):  # shown from the start, at 0
            self.connections_refused.labels(reason=reason)
        self.persona_builds = Gauge(f"{PREFIX}_persona_builds_in_progress",
                                    "Persona builds (voice decoding and encoding) queued or running", registry=r,
                                    multiprocess_mode=GAUGE_MODE)
        self.prefix_cache_hits = Counter(f"{PREFIX}_prefix_cache_hits", "Joins served from the persona prefix cache",
                                         registry=r)

    def record_error(self, kind: str) -> None:
        """Count an error of a front end or the engine (``kind``: a short snake_case label)."""
        self.errors.labels(kind=kind).inc()

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (with shared metrics: summed over the processes)."""
        if _shared_folder is not None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=_shared_folder)
            return generate_latest(registry).decode("utf-8")
        return generate_latest(self.registry).decode("utf-8")
