"""Front ends for established protocols over the conversation hub: an OpenAI-Realtime-style WebSocket
(``realtime.py``) for voice-agent frameworks, and a Twilio Media Streams bridge (``twilio.py``) for phone
calls, with their audio codecs (``codecs.py``) and aiohttp routes (``routes.py``)."""
