"""``personaplex scale serve`` and ``personaplex scale status``: many engine replicas behind one endpoint.

``scale serve`` deploys the Ray Serve application of ``deployment.py`` on a Ray cluster (a local one by
default, or ``--address`` of one started with ``ray start``) and keeps it up until SIGINT/SIGTERM: the first
signal stops new conversations and lets live ones finish (up to ``--drain-seconds``), a second ends them at
once. ``scale status`` prints each replica's load and frame times from a running cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path

from ..errors import PersonaplexError

log = logging.getLogger("personaplex.scaleout")

# The flags of ``personaplex serve`` that the replicas' hubs read (see ConversationHub.from_args).
MODEL_FLAGS = ("model", "hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "voice_prompt_dir", "device",
               "quantize", "cpu_offload", "offload_layers", "max_conversation_seconds", "input_timeout_seconds",
               "kv_dtype", "opus_workers", "context_policy")


class ScaleOutError(PersonaplexError):
    """The deployment cannot start with these settings."""


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    actions = parser.add_subparsers(dest="scale_command", required=True, metavar="ACTION")
    serve_parser = actions.add_parser(
        "serve", help="deploy one engine replica per GPU (Ray Serve) behind one endpoint and serve until stopped")
    build_serve_parser(serve_parser)
    serve_parser.set_defaults(run=run_serve)
    status = actions.add_parser("status", help="print every replica's load and frame times (from the Ray cluster)")
    status.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                        help="the Ray cluster (default: $RAY_ADDRESS, else the one running on this machine)")
    status.set_defaults(run=run_status)
    return parser


def build_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..server.flags import build_parser

    build_parser(parser)
    parser.description = (
        "Serve live conversations from several engine replicas (one per GPU, on one machine or across the "
        "machines of a Ray cluster) behind one endpoint, with the same routes as 'personaplex serve': "
        "/api/chat, /v1/realtime, /twilio/media-stream, /api/health, /api/voices, /metrics and the web page. "
        "Each new conversation goes to a replica with a free slot; when every slot is busy it waits in the "
        "proxy (--max-queue callers, then HTTP 503)."
    )
    parser.epilog = (
        "examples:\n"
        "  personaplex scale serve --max-conversations 32                         # every GPU of this machine\n"
        "  personaplex scale serve --address auto --replicas auto --max-replicas 8 --max-conversations 32\n"
        "  personaplex scale serve --model demo --device cpu --replicas 2 --max-conversations 2   # try it on a CPU"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:  # the single server's flags whose meaning differs here
        if action.dest == "max_conversations":
            action.help = "conversations per replica (its engine slots; required: what one GPU fits, as a single " \
                          "'personaplex serve' there reports)"
        elif action.dest == "opus_workers":
            action.help = f"processes that Opus-encode the agent's audio, per replica (default {action.default}; 0: " \
                          "in the replica's process)"
        elif action.dest == "max_queue":
            action.help = "callers that may wait in each proxy while every slot is busy (default 16); more get HTTP 503"
        elif action.dest == "front_end_processes":  # Ray Serve's proxy accepts the connections (see run_serve)
            action.help = argparse.SUPPRESS
    group = parser.add_argument_group("replicas (Ray Serve)")
    group.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="Ray cluster to deploy on: 'auto' (the cluster this machine joined with 'ray start') or "
                            "HOST:PORT; default: $RAY_ADDRESS, else a new single-machine Ray instance")
    group.add_argument("--replicas", default=None,
                       help="number of engine replicas, or 'auto' to scale between --min-replicas and "
                            "--max-replicas on load (default: one per GPU of the cluster; 1 without GPUs)")
    group.add_argument("--min-replicas", type=int, default=1, help="with --replicas auto: at least this many (default 1)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="with --replicas auto: at most this many (default: the cluster's GPUs)")
    group.add_argument("--gpus-per-replica", type=float, default=None,
                       help="GPUs each replica reserves (default 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    group.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                       help="where the HTTP proxies listen: on every node (put a load balancer in front) or only "
                            "on the head node (default EveryNode)")
    group.add_argument("--drain-seconds", type=float, default=600.0,
                       help="a replica being removed (scaling down, redeploying) waits this long for its "
                            "conversations to end (default 600)")
    group.add_argument("--stats-window", type=float, default=30.0, metavar="SECONDS",
                       help="the frame-time percentiles of 'personaplex scale status' cover the last SECONDS "
                            "(default 30)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Settings that are wrong whatever the cluster; raises ``ScaleOutError``."""
    if args.max_conversations is None:
        raise ScaleOutError("give --max-conversations: the conversation slots of each replica (a single "
                            "'personaplex serve' on one GPU prints how many fit: 'N conversation slots')")
    if args.max_conversations < 1:
        raise ScaleOutError("--max-conversations must be at least 1")
    if args.allow_voice_upload:
        raise ScaleOutError("--allow-voice-upload is not available with replicas (an upload would live in one "
                            "replica only); put the voice files in --voice-prompt-dir on every node instead")
    if getattr(args, "cpu_offload", False):
        raise ScaleOutError("--cpu-offload is not supported with replicas; give each replica a GPU that holds the "
                            "model (or use --quantize int8)")
    if getattr(args, "front_end_processes", 1) != 1:
        raise ScaleOutError("--front-end-processes is for 'personaplex serve', whose front-end processes accept "
                            "connections themselves; here Ray Serve's proxy accepts them and hands each to a "
                            "replica: add replicas (--replicas) instead")
    if args.opus_workers < 0:
        raise ScaleOutError("--opus-workers must be 0 or more (0: encode in each replica's process)")
    if args.max_queue < 1:  # Serve bounds its queue at 1 or more
        raise ScaleOutError("--max-queue must be at least 1 with replicas (callers waiting in each proxy)")


def replica_plan(args: argparse.Namespace, cluster_gpus: float):
    """The ``ScaleOptions`` for these flags on a cluster with ``cluster_gpus`` GPUs; raises ``ScaleOutError``."""
    from .deployment import ScaleOptions

    check_flags(args)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if gpus < 0 or args.cpus_per_replica < 0:
        raise ScaleOutError("--gpus-per-replica and --cpus-per-replica cannot be negative")
    fit = int(cluster_gpus // gpus) if gpus > 0 else None  # replicas the cluster's GPUs hold now
    options = {"slots": args.max_conversations, "gpus_per_replica": gpus, "cpus_per_replica": args.cpus_per_replica,
               "max_queued": args.max_queue, "drain_seconds": args.drain_seconds}
    if args.replicas in (None, ""):
        if fit == 0:
            raise ScaleOutError(f"the cluster has {cluster_gpus:g} GPUs, fewer than --gpus-per-replica {gpus:g}")
        return ScaleOptions(replicas=fit or 1, **options)
    if args.replicas == "auto":
        top = args.max_replicas or fit or 1
        if not 1 <= args.min_replicas <= top:
            raise ScaleOutError(f"need 1 <= --min-replicas ({args.min_replicas}) <= --max-replicas ({top})")
        return ScaleOptions(replicas=None, min_replicas=args.min_replicas, max_replicas=top, **options)
    try:
        count = int(args.replicas)
    except ValueError:
        raise ScaleOutError(f"--replicas must be a number or 'auto', got {args.replicas!r}") from None
    if count < 1:
        raise ScaleOutError("--replicas must be at least 1")
    if fit is not None and count > fit:
        log.warning("%d replicas need %g GPUs; the cluster has %g now: the others wait for GPUs to join",
                    count, count * gpus, cluster_gpus)
    return ScaleOptions(replicas=count, **options)


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ScaleOutError('scale-out needs Ray Serve: pip install "personaplex[scaleout]" '
                            '(or pip install "ray[serve]")') from None
    return ray, serve


def run_serve(args: argparse.Namespace) -> None:
    ray, serve = _import_ray()

    from ..app.console import log_to_stderr
    from ..frontends.twilio import PhonePersonas
    from ..server.flags import access_host, static_folder
    from .deployment import APP_NAME, ReplicaSettings, build_application

    log_to_stderr()
    static_dir = static_folder(args.static)
    http_options: dict = {"host": args.host if args.host != "localhost" else "127.0.0.1", "port": args.port,
                          "location": args.proxy_location}
    if args.ssl is not None:  # the proxies serve TLS themselves; the files must exist on every proxy's node
        from ..server.tls import CERT_FILE, KEY_FILE, tls_context

        tls_context(args.ssl)  # checks the folder, generating a self-signed certificate when empty
        folder = Path(args.ssl).expanduser().resolve()
        http_options.update(ssl_certfile=str(folder / CERT_FILE), ssl_keyfile=str(folder / KEY_FILE))
    PhonePersonas.given(args.phone_personas)  # a bad file fails here, before any replica loads weights
    check_flags(args)  # before starting Ray or loading anything
    started_here = args.address is None
    if started_here:  # every replica runs on this machine: its files must be here (on a cluster, on each node)
        for flag in ("moshi_weight", "mimi_weight", "tokenizer", "voice_prompt_dir"):
            path = getattr(args, flag, None)
            if path is not None and not Path(path).expanduser().exists():
                raise ScaleOutError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    ray.init(address=args.address, include_dashboard=False if started_here else None, logging_level=logging.WARNING)
    try:
        scale = replica_plan(args, ray.cluster_resources().get("GPU", 0.0))
        model_args = {name: getattr(args, name, None) for name in MODEL_FLAGS}
        settings = ReplicaSettings(model_args=model_args, static_dir=static_dir, auth_token=args.auth_token,
                                   phone_personas=args.phone_personas, stats_window_seconds=args.stats_window)
        serve.start(http_options=http_options)
        count = f"{scale.replicas}" if scale.replicas else f"{scale.min_replicas}-{scale.max_replicas} (autoscaling)"
        print(f"starting {count} replicas with {scale.slots} conversation slots each (each loads the model)",
              flush=True)
        try:
            serve.run(build_application(settings, scale), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica could not start (bad weights, out of memory...)
            raise ScaleOutError(f"the replicas did not start: {str(exc)[:600]} (the replicas' log above says why)")
        scheme = "https" if args.ssl is not None else "http"
        print(f"personaplex scale-out ready: {count} replicas x {scale.slots} slots", flush=True)
        print(f"Access the Web UI directly at {scheme}://{access_host(args.host)}:{args.port}", flush=True)
        _wait_for_signal()
        _stop(serve, APP_NAME, started_here)
    finally:
        ray.shutdown()
    print("stopped", flush=True)


def _wait_for_signal() -> None:
    """Return at SIGINT or SIGTERM."""
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: signals.append(1))
    while not signals:
        time.sleep(0.2)


def _stop(serve, app_name: str, started_here: bool) -> None:
    """Graceful stop: no new conversations, live ones may finish (up to --drain-seconds); a second signal
    ends them at once (their clients see the connection close)."""
    from .stats import replica_actor, replica_names, replica_stats

    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.append(1))
    serve.delete(app_name, _blocking=False)
    print("stopping: no new conversations; live ones may finish (signal again to end them now)", flush=True)
    last_report = 0.0
    while not interrupted:
        statuses = serve.status().applications
        if app_name not in statuses:
            break
        if time.monotonic() - last_report > 10:
            busy = sum(row.get("slots_busy", 0) for row in replica_stats(app_name) if "error" not in row)
            print(f"waiting for {busy} conversations to end", flush=True)
            last_report = time.monotonic()
        time.sleep(0.5)
    if started_here:
        serve.shutdown()  # stops every replica now
    elif interrupted:  # a shared cluster: stop only this application's replicas
        import ray

        for name in replica_names(app_name):
            ray.kill(replica_actor(name), no_restart=True)


def run_status(args: argparse.Namespace) -> None:
    ray, _ = _import_ray()

    from .stats import format_stats, replica_stats

    try:
        ray.init(address=args.address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ScaleOutError(f"no Ray cluster at {args.address!r} ({exc}); start one with 'personaplex scale serve'")
    try:
        rows = replica_stats()
        if not rows:
            raise ScaleOutError("no personaplex replicas are running on this cluster")
        print(format_stats(rows))
    finally:
        ray.shutdown()

