"""Scale-out across the machines of a Ray cluster, simulated on this host: two Ray nodes (each with its own
raylet and object store, as two machines would have), one demo replica on each, the HTTP proxy on the head.
Sessions reach the replicas on both nodes; losing a whole node ends only the sessions it held."""

from __future__ import annotations

import asyncio
import socket

import pytest

ray = pytest.importorskip("ray", reason="scale-out needs Ray Serve: pip install -e '.[scaleout]'")
serve = pytest.importorskip("ray.serve")

from test_scaleout import DEADLINE, RAY_PATIENCE, Caller, _pages_grow, _started  # after the skip checks

SLOTS = 1  # the router prefers the proxy's own node while it has room: one slot each spreads two callers


@pytest.mark.slow
def test_replicas_on_two_nodes_and_a_lost_node_ends_only_its_sessions(monkeypatch):
    from ray.cluster_utils import Cluster

    from personaplex.scaleout.deployment import APP_NAME, ReplicaSettings, ScaleOptions, build_application
    from personaplex.scaleout.stats import replica_stats

    for name, value in RAY_PATIENCE.items():  # read by the nodes' processes: set before they start
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("ray.serve._private.api.HTTP_PROXY_TIMEOUT", 300)  # see test_scaleout.cluster
    # A custom resource that each node has once: one replica per node, as one GPU per machine would do.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"engine": 1}})
    worker = cluster.add_node(num_cpus=2, resources={"engine": 1})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        scale = ScaleOptions(slots=SLOTS, replicas=2, cpus_per_replica=0.5, extra_actor_options={"resources": {"engine": 1}})
        app = build_application(ReplicaSettings(model_args={"model": "demo", "device": "cpu"}), scale)
        serve.run(app, name=APP_NAME, route_prefix="/")
        nodes = {row["replica"]: row["node"] for row in replica_stats()}
        assert len(set(nodes.values())) == 2  # one replica on each node
        lost = next(name for name, node in nodes.items() if node == worker.node_id)

        async def scenario():
            callers = [Caller(f"127.0.0.1:{port}", seed) for seed in range(2)]
            for caller in callers:
                caller.start()
            await _started(callers)
            assert {c.replica for c in callers} == set(nodes)  # the proxy on the head reached both nodes
            await _pages_grow(callers, 6)  # both conversations are live
            on_lost = next(c for c in callers if c.replica == lost)
            kept = next(c for c in callers if c.replica != lost)
            cluster.remove_node(worker)  # the machine is gone: its raylet and every process on it
            await asyncio.wait_for(on_lost.closed.wait(), DEADLINE)
            assert not kept.closed.is_set()
            await _pages_grow([kept], 10)  # still receiving frames
            await kept.close()
            newcomer = Caller(f"127.0.0.1:{port}", 9)  # the survivor takes new sessions
            newcomer.start()
            await asyncio.wait_for(newcomer.handshake.wait(), DEADLINE)
            assert newcomer.replica == kept.replica
            await newcomer.close()

        asyncio.run(asyncio.wait_for(scenario(), 600))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
