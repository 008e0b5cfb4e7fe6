"""Scale-out: engine replicas (one per GPU) behind one endpoint, on one machine or a Ray cluster (Ray Serve).

``deployment.py`` is the Serve deployment (one ``ReplicaHub`` per replica), ``asgi.py`` the single
server's routes over a hub as a Starlette application, ``stats.py`` per-replica figures, ``cli.py``
``personaplex scale serve|status``. Needs ``pip install "personaplex[scaleout]"`` (Ray Serve).
"""
