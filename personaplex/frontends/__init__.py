"""Front ends: the protocol handlers over the conversation hub, independent of the web framework that carries
them (the aiohttp server in ``personaplex.server``, the Ray Serve app in ``personaplex.scaleout``).

``chat_protocol.py`` is ``/api/chat`` (Ogg/Opus pages, the reference web client's protocol), ``realtime.py`` an
OpenAI-Realtime-style WebSocket for voice-agent frameworks, ``twilio.py`` a Twilio Media Streams bridge for phone
calls; ``codecs.py`` their PCM16 and G.711 audio, ``opus_pool.py`` Opus encoding in worker processes,
``security.py`` the token and Origin primitives, ``session_loop.py`` and ``logs.py`` what the handlers share;
``routes.py`` the server's one route list and the access check that both web frameworks run before any work, and
``http_api.py`` its plain HTTP endpoints (health, voices, metrics, the page).
"""
