"""The Ray Serve deployment: one engine replica per GPU, each owning one ``ConversationHub``.

Every replica is a Ray actor that loads the model, starts its hub (one engine thread, ``slots``
conversation slots) and serves the single server's routes (``asgi.py``) behind Ray Serve's HTTP proxy,
which listens on every node and routes each request to a replica of the deployment.

Why ``max_ongoing_requests`` = slots: Serve counts a WebSocket as one ongoing request for its whole
life, and its router (power of two choices over the replicas' live queue lengths) never sends a
request to a replica that already has ``max_ongoing_requests`` of them; the replica itself rejects
any excess and the router tries another. So a new conversation goes to a replica with a free slot, or
waits in the proxy (at most ``max_queued_requests`` callers; more get HTTP 503) until one frees. The
hub's own queue is therefore not used (``max_queue`` 0 in the replica). Short HTTP requests (the web
page, ``/api/voices``) count too while they run, so a replica with every slot in a conversation serves
them only once a slot frees; Serve's own ``/-/healthz`` on the proxy answers regardless.

A replica that dies (a crashed process, a lost node, a failed health check) takes only its own
conversations with it: their WebSockets close, the other replicas' conversations never notice, new
conversations go to the survivors, and the Serve controller starts a replacement.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from ..app.console import log_to_stderr
from ..frontends.opus_pool import OpusEncoderPool
from .replica_hub import ReplicaHub

log = logging.getLogger("personaplex.scaleout")

APP_NAME = "personaplex"
DEPLOYMENT_NAME = "Conversations"


@dataclass
class ReplicaSettings:
    """What every replica needs to build its hub and routes (pickled to the replicas)."""

    model_args: dict  # the model and limit flags of ``personaplex serve`` (see ``ConversationHub.from_args``)
    static_dir: Path | None = None
    auth_token: str | None = None
    phone_personas: Path | None = None
    log_level: str = "INFO"
    stats_window_seconds: float = 30.0  # the frame-time percentiles of ``record_routing_stats`` cover this


@serve.ingress()
class ConversationReplica:
    """One engine on one device: a ``ReplicaHub`` and the single server's routes over it."""

    async def __init__(self, settings: ReplicaSettings):
        log_to_stderr(settings.log_level)
        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        args = replica_args(settings.model_args)
        # Loading takes seconds to minutes: off the replica's event loop, which answers Serve's probes.
        self.hub = await asyncio.to_thread(ReplicaHub.from_args, args)
        self.hub.replica = self.replica
        await self.hub.start()
        # Started by the app on its first conversation: on the event loop that serves the WebSockets.
        self.encoders = OpusEncoderPool(args.opus_workers) if getattr(args, "opus_workers", 0) else None
        info = self.hub.describe()
        log.info("replica %s ready: model %s, %d conversation slots, pid %d", self.replica, info["model"],
                 info["slots"], os.getpid())

    def __serve_build_asgi_app__(self):
        from .asgi import build_asgi_app

        return build_asgi_app(self.hub, static_dir=self.settings.static_dir, auth_token=self.settings.auth_token,
                              phone_personas=self.settings.phone_personas, replica=self.replica, encoders=self.encoders)

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        thread = self.hub._thread
        if not self.hub.accepting or thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    async def record_routing_stats(self) -> dict:
        """Serve's per-replica statistics hook (also read by ``stats.replica_stats``): load and frame times."""
        import ray

        return {**self.hub.stats(self.settings.stats_window_seconds), "node": ray.get_runtime_context().get_node_id()}

    async def __del__(self):
        await self.hub.close("the replica is shutting down")
        if self.encoders is not None:
            await self.encoders.close()


def replica_args(model_args: dict) -> argparse.Namespace:
    """The flags of ``personaplex serve`` with its defaults, overridden by ``model_args``."""
    from ..server.flags import build_parser

    args = build_parser().parse_args([])
    for name, value in model_args.items():
        setattr(args, name, value)
    return args


@dataclass
class ScaleOptions:
    """How many replicas and what each takes."""

    slots: int  # conversations per replica (= max_ongoing_requests)
    replicas: int | None = 1  # fixed count; None: autoscaling between min and max
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_queued: int = -1  # callers waiting in each proxy for a free slot; -1: no limit
    target_busy_fraction: float = 0.75  # autoscaling keeps this share of the slots busy
    upscale_delay_s: float = 10.0
    load_window_s: float = 30.0  # the load the autoscaler compares with its target is averaged over this
    downscale_delay_s: float = 300.0
    drain_seconds: float = 600.0  # a replica being removed waits this long for its conversations to end
    extra_actor_options: dict = field(default_factory=dict)


def build_application(settings: ReplicaSettings, scale: ScaleOptions):
    """The bound Serve application (pass it to ``serve.run``)."""
    if scale.slots < 1:
        raise ValueError("slots must be at least 1")
    actor_options = {"num_cpus": scale.cpus_per_replica, "num_gpus": scale.gpus_per_replica,
                     **scale.extra_actor_options}
    options: dict = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": scale.slots,
        "max_queued_requests": scale.max_queued,
        "ray_actor_options": actor_options,
        "graceful_shutdown_timeout_s": scale.drain_seconds,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if scale.replicas is None:
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": max(1.0, scale.slots * scale.target_busy_fraction),
            "upscale_delay_s": scale.upscale_delay_s,
            "look_back_period_s": scale.load_window_s,
            "downscale_delay_s": scale.downscale_delay_s,
        }
    else:
        options["num_replicas"] = scale.replicas
    model_args = dict(settings.model_args, max_conversations=scale.slots, max_queue=0)
    settings = ReplicaSettings(**{**settings.__dict__, "model_args": model_args})
    return serve.deployment(**options)(ConversationReplica).bind(settings)
