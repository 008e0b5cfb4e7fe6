"""Per-replica figures of a running scale-out deployment, read from the Ray cluster (not over HTTP).

Over HTTP a request reaches whichever replica Serve picks, and waits while every slot is in a
conversation; here each replica actor is asked directly through Serve's per-replica statistics hook
(``record_routing_stats``), which never counts as a request. Needs ``ray.init`` on the cluster first.
"""

from __future__ import annotations

from .deployment import APP_NAME, DEPLOYMENT_NAME

SERVE_NAMESPACE = "serve"
REPLICA_PREFIX = "SERVE_REPLICA::"


def replica_names(app: str = APP_NAME, deployment: str = DEPLOYMENT_NAME) -> list[str]:
    """The actor names of the deployment's live replicas (also their ``replica`` in metadata and health)."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                  if entry["namespace"] == SERVE_NAMESPACE and entry["name"].startswith(prefix))


def replica_actor(name: str):
    import ray

    return ray.get_actor(name, namespace=SERVE_NAMESPACE)


def replica_stats(app: str = APP_NAME, deployment: str = DEPLOYMENT_NAME, timeout: float = 10.0) -> list[dict]:
    """``ReplicaHub.stats()`` of every live replica; replicas that do not answer (dying, still loading) are
    listed with an ``error``."""
    import ray

    names = replica_names(app, deployment)
    pending = []
    for name in names:
        try:
            pending.append((name, replica_actor(name).record_routing_stats.remote()))
        except ValueError:  # gone since it was listed
            continue
    results = []
    for name, ref in pending:
        try:
            stats = ray.get(ref, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - a dead or busy replica is a result here
            stats = {"replica": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        results.append(stats or {"replica": name, "error": "not ready"})
    return results


def format_stats(rows: list[dict]) -> str:
    """A table of ``replica_stats()``."""
    header = ("| replica | host | node | pid | device | slots busy/total | conversations opened | tick p50 ms | tick p99 ms "
              "| tick max ms | late ticks | skipped ticks |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    for row in rows:
        name = row["replica"].rsplit("#", 1)[-1]
        if "error" in row:
            lines.append(f"| {name} | {row['error']} ||||||||||")
            continue
        lines.append(f"| {name} | {row['host']} | {row.get('node', '')[:8]} | {row['pid']} | {row['device']} | {row['slots_busy']}/{row['slots']} "
                     f"| {row['conversations_opened']} | {ms(row['tick_p50_ms'])} | {ms(row['tick_p99_ms'])} "
                     f"| {ms(row['tick_max_ms'])} | {row['late_ticks_total']} | {row['skipped_ticks_total']} |")
    return "\n".join(lines)
